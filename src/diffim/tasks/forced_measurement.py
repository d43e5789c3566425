"""``ForcedMeasurementTask``: forced PSF photometry of DIA sources on the science (or template) exposure
(LSST meas_base ``ForcedMeasurementTask`` with ``base_TransformedCentroid`` + ``base_PsfFlux``)."""

from __future__ import annotations

import lsst.pex.config as pexConfig
import numpy as np
from astropy.table import Table

from ..errors import DiffimValueError
from ..forced import forced_psf_photometry
from ..model import Exposure
from .base import Struct, Task, timeMethod

__all__ = ["ForcedMeasurementConfig", "ForcedMeasurementTask"]

_SUFFIXES = {
    "instFlux": "flux",
    "instFluxErr": "flux_err",
    "area": "area",
    "flag": "flag",
    "flag_noGoodPixels": "flag_noGoodPixels",
    "flag_edge": "flag_edge",
}


class ForcedMeasurementConfig(pexConfig.Config):
    """Configuration of :class:`ForcedMeasurementTask` (LSST names; the diffim plugin set)."""

    plugins = pexConfig.ListField(
        dtype=str, default=["base_TransformedCentroid", "base_PsfFlux"],
        doc="Forced plugins to run (only base_TransformedCentroid and base_PsfFlux are implemented)",
    )
    doReplaceWithNoise = pexConfig.Field(
        dtype=bool, default=True,
        doc="Replace other sources by noise while measuring (accepted for LSST compatibility; diffim measures "
        "the pixels as they are, which differs only for blended DIA sources)",
    )
    badMaskPlanes = pexConfig.ListField(
        dtype=str, default=[], doc="Mask planes excluded from the PSF fit (base_PsfFlux badMaskPlanes)"
    )
    copyColumns = pexConfig.DictField(
        keytype=str, itemtype=str, default={"id": "objectId", "parent": "parentObjectId", "coord_ra": "coord_ra",
                                            "coord_dec": "coord_dec"},
        doc="Mapping of reference-catalog fields (keys) to forced-catalog fields (values)",
    )

    def validate(self) -> None:
        super().validate()
        unknown = set(self.plugins) - {"base_TransformedCentroid", "base_PsfFlux"}
        if unknown:
            raise pexConfig.FieldValidationError(
                ForcedMeasurementConfig.plugins, self,
                f"Unsupported forced plugins {sorted(unknown)}; diffim implements base_TransformedCentroid and "
                "base_PsfFlux.",
            )


def _positions(diaSources: Table) -> tuple[np.ndarray, np.ndarray]:
    for xn, yn in (("slot_Centroid_x", "slot_Centroid_y"), ("x", "y"), ("base_SdssCentroid_x", "base_SdssCentroid_y")):
        if xn in diaSources.colnames and yn in diaSources.colnames:
            return np.asarray(diaSources[xn], float), np.asarray(diaSources[yn], float)
    raise DiffimValueError(
        f"The DIA-source table has no centroid columns (x/y or slot_Centroid_x/y); columns: {diaSources.colnames[:10]}..."
    )


class ForcedMeasurementTask(Task):
    """Measure PSF fluxes of an exposure at DIA-source positions and add them to the DIA-source table.

    ``run(diaSources, exposure, refWcs=None, isTemplate=False)`` adds, in place,
    ``ip_diffim_forced_PsfFlux_{instFlux, instFluxErr, area, flag, flag_noGoodPixels, flag_edge}`` (or
    ``ip_diffim_forced_template_PsfFlux_*``) in the exposure's counts, and the APDB columns
    ``scienceFlux``/``scienceFluxErr`` (or ``templateFlux``/``templateFluxErr``) in nJy when the exposure has
    a PhotoCalib (else counts; the column unit says which) plus ``forced_PsfFlux_flag*``.
    """

    ConfigClass = ForcedMeasurementConfig
    _DefaultName = "forcedMeasurement"

    @timeMethod
    def run(self, diaSources: Table, exposure: Exposure, refWcs=None, *, isTemplate: bool = False) -> Struct:
        x, y = _positions(diaSources)
        result = forced_psf_photometry(exposure, x, y, ref_wcs=refWcs, bad_mask_planes=list(self.config.badMaskPlanes))
        prefix = "ip_diffim_forced_template_PsfFlux" if isTemplate else "ip_diffim_forced_PsfFlux"
        for suffix, attr in _SUFFIXES.items():
            diaSources[f"{prefix}_{suffix}"] = result[attr]
        apdb = "templateFlux" if isTemplate else "scienceFlux"
        flag_prefix = "forced_template_PsfFlux" if isTemplate else "forced_PsfFlux"
        calib = exposure.photo_calib
        if calib is not None:
            flux, err = calib.inst_flux_to_nanojansky(result.flux, result.flux_err)
            unit = "nJy"
        else:
            flux, err, unit = result.flux, result.flux_err, "count"
        diaSources[apdb] = flux
        diaSources[apdb].unit = unit
        diaSources[apdb + "Err"] = err
        diaSources[apdb + "Err"].unit = unit
        diaSources[f"{flag_prefix}_flag"] = result.flag
        diaSources[f"{flag_prefix}_flag_edge"] = result.flag_edge
        diaSources[f"{flag_prefix}_flag_noGoodPixels"] = result.flag_noGoodPixels
        n_flag = int(result.flag.sum())
        self.metadata["nForced" + ("Template" if isTemplate else "Science")] = len(x)
        self.metadata["nForcedFlagged" + ("Template" if isTemplate else "Science")] = n_flag
        self.log.info("Forced PSF photometry of %d DIA sources on the %s (%d flagged)", len(x),
                      "template" if isTemplate else "science", n_flag)
        return Struct(diaSources=diaSources, measurement=result)
