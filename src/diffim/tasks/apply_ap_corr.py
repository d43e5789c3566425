"""``ApplyApCorrTask``: apply aperture corrections to flux columns (LSST meas_base ``ApplyApCorrTask``)."""

from __future__ import annotations

import lsst.pex.config as pexConfig
import numpy as np
from astropy.table import Table

from ..measure.apcorr import apply_ap_corr
from .base import Struct, Task, timeMethod

__all__ = ["ApplyApCorrConfig", "ApplyApCorrTask", "APDB_FLUX_ALIASES"]

#: LSST algorithm name → APDB flux column prefix, so that DiaSource tables can be corrected directly.
APDB_FLUX_ALIASES = {"base_PsfFlux": "psfFlux"}


class ApplyApCorrConfig(pexConfig.Config):
    """Configuration of :class:`ApplyApCorrTask` (LSST names and defaults)."""

    ignoreList = pexConfig.ListField(
        dtype=str, default=[], doc="flux measurement algorithms in getApCorrNameSet() to ignore"
    )
    doFlagApCorrFailures = pexConfig.Field(
        dtype=bool, default=True, doc="set the general failure flag for a flux when it cannot be aperture-corrected?"
    )
    proxies = pexConfig.DictField(
        keytype=str, itemtype=str, default={},
        doc="flux measurement algorithms to be aperture-corrected by reference to another algorithm; this is a "
        "mapping alg1:alg2, where 'alg1' is the algorithm being corrected, and 'alg2' is the algorithm supplying "
        "the corrections",
    )


def _centroid(catalog: Table) -> tuple[np.ndarray, np.ndarray]:
    for xn, yn in (("slot_Centroid_x", "slot_Centroid_y"), ("x", "y"), ("base_SdssCentroid_x", "base_SdssCentroid_y")):
        if xn in catalog.colnames:
            return np.asarray(catalog[xn], float), np.asarray(catalog[yn], float)
    from ..errors import DiffimValueError

    raise DiffimValueError("The catalogue has no centroid columns (slot_Centroid_x/y or x/y) to evaluate ap-corr at.")


class ApplyApCorrTask(Task):
    """Multiply flux columns (and their errors) by the aperture correction at each source.

    For each algorithm ``name`` with a ``<name>_instFlux`` column (LSST names) or its APDB counterpart
    (``psfFlux`` for ``base_PsfFlux``): ``c = apCorrMap["<name>_instFlux"](x, y)``; where ``c`` is finite and
    > 0 the flux and error are multiplied by ``c`` and ``<name>_flag_apCorr`` is cleared; otherwise the flag
    is set (and the general ``<name>_flag`` too, if ``doFlagApCorrFailures``). ``<name>_apCorr`` and
    ``<name>_apCorrErr`` are recorded.
    """

    ConfigClass = ApplyApCorrConfig
    _DefaultName = "applyApCorr"

    def _targets(self, catalog: Table, apCorrMap: dict | None) -> list[tuple[str, str, str]]:
        """(algorithm supplying the correction, flux column, column prefix) for each flux to correct."""
        names = {k[: -len("_instFlux")] for k in (apCorrMap or {}) if k.endswith("_instFlux")}
        names |= {c[: -len("_instFlux")] for c in catalog.colnames if c.endswith("_instFlux")
                  and not c.startswith("ip_diffim_forced")}
        names |= {alg for alg, apdb in APDB_FLUX_ALIASES.items() if apdb in catalog.colnames}
        out = []
        for name in sorted(names):
            if name in self.config.ignoreList:
                continue
            model_name = self.config.proxies.get(name, name)
            if f"{name}_instFlux" in catalog.colnames:
                out.append((model_name, f"{name}_instFlux", name))
            if name in APDB_FLUX_ALIASES and APDB_FLUX_ALIASES[name] in catalog.colnames:
                apdb = APDB_FLUX_ALIASES[name]
                out.append((model_name, apdb, apdb))
        return out

    @timeMethod
    def run(self, catalog: Table, apCorrMap: dict | None) -> Struct:
        """Correct ``catalog`` in place; returns ``Struct(catalog=..., nCorrected=..., nFailed=...)``."""
        x, y = _centroid(catalog) if len(catalog) else (np.zeros(0), np.zeros(0))
        n_ok = n_fail = 0
        for model_name, flux_col, prefix in self._targets(catalog, apCorrMap):
            err_col = flux_col + "Err"
            flux = np.asarray(catalog[flux_col], float)
            err = np.asarray(catalog[err_col], float) if err_col in catalog.colnames else np.full(len(flux), np.nan)
            new_flux, new_err, flag, c = apply_ap_corr(flux, err, x, y, apCorrMap, model_name)
            catalog[flux_col] = new_flux.astype(np.asarray(catalog[flux_col]).dtype, copy=False)
            if err_col in catalog.colnames:
                catalog[err_col] = new_err.astype(np.asarray(catalog[err_col]).dtype, copy=False)
            catalog[f"{prefix}_apCorr"] = c
            err_model = None if apCorrMap is None else apCorrMap.get(f"{model_name}_instFluxErr")
            catalog[f"{prefix}_apCorrErr"] = (
                np.broadcast_to(np.asarray(err_model(x, y), float), (len(flux),)).copy() if err_model is not None
                else np.full(len(flux), np.nan)
            )
            catalog[f"{prefix}_flag_apCorr"] = flag
            if self.config.doFlagApCorrFailures and f"{prefix}_flag" in catalog.colnames:
                catalog[f"{prefix}_flag"] = np.asarray(catalog[f"{prefix}_flag"], bool) | flag
            n_ok += int((~flag).sum())
            n_fail += int(flag.sum())
            if flag.all() and len(flag):
                self.log.warning("No aperture correction for %s: %s_flag_apCorr set for every source", flux_col, prefix)
        self.metadata["nApCorrApplied"] = n_ok
        self.metadata["nApCorrFailed"] = n_fail
        return Struct(catalog=catalog, nCorrected=n_ok, nFailed=n_fail)
