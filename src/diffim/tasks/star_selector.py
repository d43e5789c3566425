"""``ObjectSizeStarSelectorTask``: pick stars from a source catalog by size (LSST ``ObjectSizeStarSelectorTask``).

The algorithm is :func:`diffim.psf.star_selector.object_size_star_selector`; this module maps an LSST-style
source catalog (astropy ``Table``, dict of arrays, or anything indexable by column name) onto it.
"""

from __future__ import annotations

import lsst.pex.config as pexConfig
import numpy as np

from ..errors import BadInputError
from ..psf.star_selector import object_size_star_selector
from .base import Struct, Task, timeMethod

__all__ = ["ObjectSizeStarSelectorConfig", "ObjectSizeStarSelectorTask"]

#: Column-name candidates for the second moments, in order of preference.
_SHAPE_PREFIXES = ("slot_Shape", "base_SdssShape", "ext_shapeHSM_HsmSourceMoments", "")


class ObjectSizeStarSelectorConfig(pexConfig.Config):
    """Configuration of :class:`ObjectSizeStarSelectorTask` (modern LSST names and defaults)."""

    doFluxLimit = pexConfig.Field(dtype=bool, default=False, doc="Apply the flux limits fluxMin/fluxMax?")
    fluxMin = pexConfig.Field(
        dtype=float, default=12500.0,
        doc="Minimum flux of a star (sourceFluxField units); applied if doFluxLimit.",
    )
    fluxMax = pexConfig.Field(dtype=float, default=0.0, doc="Maximum flux of a star; ignored if 0.")
    doSignalToNoiseLimit = pexConfig.Field(
        dtype=bool, default=True, doc="Apply the S/N limits signalToNoiseMin/signalToNoiseMax?",
    )
    signalToNoiseMin = pexConfig.Field(dtype=float, default=50.0, doc="Minimum S/N (flux / fluxErr) of a star.")
    signalToNoiseMax = pexConfig.Field(dtype=float, default=0.0, doc="Maximum S/N of a star; ignored if 0.")
    widthMin = pexConfig.Field(dtype=float, default=0.9, doc="Minimum width √((Ixx+Iyy)/2) of a star, pixels.")
    widthMax = pexConfig.Field(dtype=float, default=10.0, doc="Maximum width of a star, pixels (0: no limit).")
    sourceFluxField = pexConfig.Field(
        dtype=str, default="base_PsfFlux_instFlux", doc="Flux column (its error is this name + 'Err').",
    )
    widthStdAllowed = pexConfig.Field(
        dtype=float, default=0.15,
        doc="Allowed relative spread of star widths: cluster spacing factor and the clipping stop criterion.",
    )
    nSigmaClip = pexConfig.Field(dtype=float, default=2.0, doc="Clip cluster-0 members this many sd away.")
    badFlags = pexConfig.ListField(
        dtype=str,
        default=[
            "base_PixelFlags_flag_edge",
            "base_PixelFlags_flag_nodata",
            "base_PixelFlags_flag_interpolatedCenter",
            "base_PixelFlags_flag_saturatedCenter",
            "base_PixelFlags_flag_crCenter",
            "base_PixelFlags_flag_bad",
            "base_PixelFlags_flag_interpolated",
            "slot_Centroid_flag",
        ],
        doc="Sources with any of these flags set are not stars (flags missing from the catalog are ignored).",
    )

    def validate(self) -> None:
        super().validate()
        if self.widthMin > self.widthMax > 0:
            raise pexConfig.FieldValidationError(
                ObjectSizeStarSelectorConfig.widthMin, self, "widthMin must be <= widthMax"
            )


def _has(cat, name: str) -> bool:
    try:
        return name in cat.colnames if hasattr(cat, "colnames") else name in cat
    except TypeError:
        return False


def _col(cat, name: str) -> np.ndarray:
    return np.asarray(cat[name])


class ObjectSizeStarSelectorTask(Task):
    """Select stars as the tightest cluster of source widths."""

    ConfigClass = ObjectSizeStarSelectorConfig
    _DefaultName = "objectSizeStarSelector"

    def _moments(self, cat) -> tuple[np.ndarray, np.ndarray]:
        for prefix in _SHAPE_PREFIXES:
            sep = "_" if prefix else ""
            xx, yy = f"{prefix}{sep}xx", f"{prefix}{sep}yy"
            if _has(cat, xx) and _has(cat, yy):
                return _col(cat, xx).astype(float), _col(cat, yy).astype(float)
        if _has(cat, "ixx") and _has(cat, "iyy"):
            return _col(cat, "ixx").astype(float), _col(cat, "iyy").astype(float)
        raise BadInputError(
            "The source catalog has no second-moment columns (slot_Shape_xx/yy, base_SdssShape_xx/yy or ixx/iyy)."
        )

    def _width_min(self, exposure) -> float:
        """``widthMin``, or 0.75 × the exposure PSF's width where the PSF itself is narrower than 1.05 × it.

        ``widthMin`` (0.9 px) keeps out sources narrower than stars, cosmic rays and hot pixels (≈ 0.3 px); an
        undersampled PSF (FWHM < 2.2 px) is that narrow itself, and the stars, whose measured widths scatter by a
        few per cent at S/N 50, fell below it: no aperture correction and no selected kernel sources at a science
        FWHM of 1.8 px (width 0.81 px).
        """
        width_min = float(self.config.widthMin)
        psf = getattr(exposure, "psf", None)
        if psf is None or width_min <= 0:
            return width_min
        try:
            width = float(psf.trace_radius(*exposure.psf_position()))
        except Exception:  # no usable PSF: the configured limit
            return width_min
        if np.isfinite(width) and 0 < 0.95 * width < width_min:
            self.log.info("PSF width %.2f px is below 1.05 x widthMin (%.2f px): stars down to %.2f px accepted.",
                          width, width_min, 0.75 * width)
            return 0.75 * width
        return width_min

    def selectSources(self, sourceCat, matches=None, exposure=None) -> Struct:
        """Boolean ``selected`` array over ``sourceCat`` (LSST ``selectSources``)."""
        cfg = self.config
        ixx, iyy = self._moments(sourceCat)
        with np.errstate(invalid="ignore"):
            widths = np.sqrt(0.5 * (ixx + iyy))
        n = widths.size
        flux = _col(sourceCat, cfg.sourceFluxField).astype(float) if _has(sourceCat, cfg.sourceFluxField) else None
        err_name = cfg.sourceFluxField + "Err"
        flux_err = _col(sourceCat, err_name).astype(float) if _has(sourceCat, err_name) else None
        if flux is None and (cfg.doFluxLimit or cfg.doSignalToNoiseLimit):
            raise BadInputError(f"The source catalog has no {cfg.sourceFluxField!r} column for the flux/S/N limits.")
        if flux_err is None and cfg.doSignalToNoiseLimit:
            raise BadInputError(f"The source catalog has no {err_name!r} column for the S/N limit.")
        bad = np.zeros(n, dtype=bool)
        for flag in cfg.badFlags:
            if _has(sourceCat, flag):
                bad |= _col(sourceCat, flag).astype(bool)
            else:
                self.log.debug("Flag column %s not in the catalog; ignored.", flag)
        selected = object_size_star_selector(
            widths, flux, flux_err, bad,
            do_flux_limit=cfg.doFluxLimit, flux_min=cfg.fluxMin, flux_max=cfg.fluxMax,
            do_signal_to_noise_limit=cfg.doSignalToNoiseLimit, signal_to_noise_min=cfg.signalToNoiseMin,
            signal_to_noise_max=cfg.signalToNoiseMax, width_min=self._width_min(exposure), width_max=cfg.widthMax,
            width_std_allowed=cfg.widthStdAllowed, n_sigma_clip=cfg.nSigmaClip,
        )
        self.metadata["nSelected"] = int(selected.sum())
        self.log.info("Selected %d stars of %d sources.", int(selected.sum()), n)
        return Struct(selected=selected)

    @timeMethod
    def run(self, sourceCat, matches=None, exposure=None) -> Struct:
        """Select stars; returns ``Struct(sourceCat=<selected rows>, selected=<bool array>)``."""
        selected = self.selectSources(sourceCat, matches, exposure).selected
        if isinstance(sourceCat, dict):
            subset = {k: np.asarray(v)[selected] for k, v in sourceCat.items()}
        else:
            subset = sourceCat[selected]
        return Struct(sourceCat=subset, selected=selected)
