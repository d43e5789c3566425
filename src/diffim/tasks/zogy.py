"""``ZogyImagePsfMatchTask``: ZOGY proper image subtraction of two exposures (LSST's historical ``ZogyTask``).

Reads the exposures, calls :func:`diffim.zogy.zogy_subtract` and packs D (science flux scale, PSF P_D) and the
score S (variance V_S, PSF P_S) as exposures; registered as ``"zogy"`` in ``subtractAlgorithmRegistry``.
"""

from __future__ import annotations

import lsst.pex.config as pexConfig
import numpy as np

from ..errors import MissingPsfError, NoOverlapError, PsfError, WcsError
from ..model.calib import PhotoCalib
from ..model.exposure import Exposure
from ..model.psf import ImagePsf
from ..zogy import CellPsf, grow_mask_bits, psf_centroid_offset, zogy_subtract
from .base import Struct, Task, timeMethod

__all__ = ["ZogyConfig", "ZogyImagePsfMatchConfig", "ZogyImagePsfMatchTask", "ZogyTask"]


class ZogyConfig(pexConfig.Config):
    """Configuration of ZOGY (LSST ``ZogyConfig`` names and defaults)."""

    templateFluxScaling = pexConfig.Field(
        dtype=float, default=1.0,
        doc="Template flux scaling factor F_r (used only if scaleByCalibration is False).",
    )
    scienceFluxScaling = pexConfig.Field(
        dtype=float, default=1.0,
        doc="Science flux scaling factor F_n (used only if scaleByCalibration is False).",
    )
    scaleByCalibration = pexConfig.Field(
        dtype=bool, default=True,
        doc="Compute the flux normalization from the exposures' photoCalibs; overrides the two scalings above.",
    )
    correctBackground = pexConfig.Field(
        dtype=bool, default=False, doc="Subtract the clipped-mean background of each image before differencing.",
    )
    ignoreMaskPlanes = pexConfig.ListField(
        dtype=str,
        default=("INTRP", "EDGE", "DETECTED", "SAT", "CR", "BAD", "NO_DATA", "DETECTED_NEGATIVE"),
        doc="Mask planes to ignore in the variance and background statistics.",
    )
    maxPsfCentroidDist = pexConfig.Field(
        dtype=float, default=0.2,
        doc="Maximum distance (pixels) between the centroids of the two PSF images at any cell centre.",
    )
    doSpatialGrid = pexConfig.Field(
        dtype=bool, default=False, doc="Split the exposure into cells, each with the PSFs at its centre.",
    )
    gridInnerSize = pexConfig.Field(
        dtype=float, default=8.0,
        doc="Inner cell size in units of 1.5·10 PSF σ (LSST: of the border size, which also grows with the PSF "
        "stamp; the same for Gaussian stamps) (only with doSpatialGrid).",
    )
    growMaskPlanes = pexConfig.ListField(
        dtype=str, default=("SAT", "BAD", "CR", "NO_DATA", "EDGE", "INTRP", "SUSPECT"),
        doc="Input mask planes grown by the PSF-stamp radius when OR-ed into D and S (the filters spread a "
            "defect over that reach, as afw convolution does for AL). LSST's ZOGY did not grow masks.",
    )
    replaceMaskPlanes = pexConfig.ListField(
        dtype=str, default=("SAT", "BAD", "NO_DATA"),
        doc="Pixels flagged with any of these planes in either image are replaced by the background level in both "
            "images before the FFTs (not an LSST field). A saturated core, its bleed trail or a bad column is not "
            "sky ⊗ PSF; ZOGY's filters, which partly deconvolve the template, spread it tens of pixels beyond the "
            "grown mask.",
    )
    replaceMaskGrow = pexConfig.RangeField(
        dtype=int, default=3, min=0,
        doc="Grow the replaced pixels (replaceMaskPlanes) by this many pixels (not an LSST field): the pixels next "
            "to a saturated core sit on the steepest part of the star and, in a warped template, carry the "
            "interpolation's ringing of the flat top (a Lanczos-3 warp spreads a pixel over ±3).",
    )
    doSubtractBackground = pexConfig.Field(
        dtype=bool, default=True,
        doc="Fit and remove a smooth differential background from D (and, matched-filtered, from S); the "
            "counterpart of AL's fitted background. LSST had no such step (its inputs were sky-subtracted).",
    )
    backgroundBinSize = pexConfig.Field(
        dtype=int, default=128, doc="Super-pixel size (pixels) of the differential background mesh.",
    )
    astrometricNoiseX = pexConfig.Field(
        dtype=float, default=0.0,
        doc="Registration noise σ_x (pixels) for the astrometric term of S_corr (ZOGY eq. 30-33); 0: not added.",
    )
    astrometricNoiseY = pexConfig.Field(
        dtype=float, default=0.0,
        doc="Registration noise σ_y (pixels) for the astrometric term of S_corr (ZOGY eq. 30-33); 0: not added.",
    )
    autoSpatialGrid = pexConfig.Field(
        dtype=float, default=0.02,
        doc="Use the spatial grid (as doSpatialGrid=True) when either PSF's FWHM varies across the image by more "
            "than this fraction (max−min over median on a 3×3 grid): one PSF for the whole image leaves "
            "bright-star residuals that S_corr detects. 0 disables the automatic choice.",
    )


class ZogyImagePsfMatchConfig(ZogyConfig):
    """Configuration of :class:`ZogyImagePsfMatchTask` (the ZOGY entry of ``subtractAlgorithmRegistry``)."""


def _stellar_flux_ratio(science: Exposure, template: Exposure) -> float:
    """Median template/science PSF-flux ratio of the science's bright stars (both images on one grid).

    Raises :class:`~diffim.errors.BadInputError` when fewer than 3 stars are usable.
    """
    from ..errors import BadInputError
    from ..measure.psf_flux import psf_flux
    from ..sources import background_subtracted, detect_and_measure_sources

    sci = background_subtracted(science)
    tmpl = background_subtracted(template[science.bbox] if template.bbox != science.bbox else template)
    src = detect_and_measure_sources(science, work=sci, min_significance=50.0, max_sources=300)
    x, y = np.asarray(src["x"], float), np.asarray(src["y"], float)
    bad = sci.mask.bitmask(["BAD", "SAT", "NO_DATA", "EDGE", "CR"], ignore_missing=True)
    fs = psf_flux(sci.image, sci.variance, sci.mask.array, science.psf, x, y, bad, xy0=sci.xy0)
    ft = psf_flux(tmpl.image, tmpl.variance, tmpl.mask.array, template.psf, x, y, bad, xy0=tmpl.xy0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = ft.flux / fs.flux
    ok = np.isfinite(r) & ~fs.flag & ~ft.flag & (fs.flux > 0) & (ft.flux > 0)
    if ok.sum() < 3:
        raise BadInputError(
            "ZOGY needs the template/science flux ratio: the exposures have no photoCalib and fewer than 3 bright "
            "stars were usable to measure it. Set subtract.active.scaleByCalibration=False and "
            "subtract.active.templateFluxScaling / scienceFluxScaling."
        )
    r = r[ok]
    med = np.median(r)
    mad = 1.4826 * np.median(np.abs(r - med))
    keep = np.abs(r - med) <= 3 * max(mad, 1e-6 * abs(med))
    return float(np.median(r[keep]))


def _fwhm_variation(psf, bbox) -> float:
    """(max − min)/median of the PSF FWHM on a 3×3 grid over ``bbox`` (0 if it cannot be evaluated)."""
    from .image_psf_match import psf_fwhm_grid

    f = psf_fwhm_grid(psf, bbox, 3)
    f = f[np.isfinite(f)]
    if f.size < 2:
        return 0.0
    return float((f.max() - f.min()) / np.median(f))


def _same_pixel_grid(science: Exposure, template: Exposure, tol: float = 0.01) -> bool:
    """True if both WCSs map the science corners and centre to the same sky points within ``tol`` pixels."""
    from ..forced import wcs_equal

    return wcs_equal(science.wcs, template.wcs, science.bbox, tol=tol)


class ZogyImagePsfMatchTask(Task):
    """ZOGY subtraction ``D = science − template`` with LSST's ``ImagePsfMatchTask``-like interface.

    * ``subtractedExposure``: the proper difference ``D`` on the **science flux scale** (science counts, the
      science photoCalib), i.e. ``F_science · D / F_D`` with the variance scaled alike, so PSF fluxes measured on
      it with its PSF ``P_D`` compare directly with AL differences and forced photometry on the science image.
      (LSST returned ``D / F_D`` in nJy with photoCalib 1: the same data in other units.)
    * ``scoreExposure``: image ``S``, variance ``V_S (+ V_ast)`` and PSF ``P_S``, so that detection with
      ``thresholdType="pixel_stdev"`` and ``doSmooth=False`` thresholds ``S_corr = S / √V_S``.

    Deliberate differences from LSST: ``F_science`` scales the science image and ``F_template`` the template
    (LSST applied the template factor to the science, a quirk); the filters' noise σ is the image-wide clipped
    mean of each variance plane for every cell (LSST: per cell) and grid cells are blended bilinearly, which
    keeps the grid seamless; defect mask planes are grown by the PSF-stamp radius (``growMaskPlanes``); a
    smooth differential background is removed (``doSubtractBackground``, as AL fits one).
    """

    ConfigClass = ZogyImagePsfMatchConfig
    _DefaultName = "zogy"

    # -- inputs -------------------------------------------------------------------------------------------
    def _register(self, templateExposure: Exposure, scienceExposure: Exposure, doWarping: bool) -> Exposure:
        """The template on the science pixel grid and bbox (cropped, or warped if allowed and possible)."""
        if not _same_pixel_grid(scienceExposure, templateExposure):
            if not doWarping:
                raise WcsError(
                    "The template WCS differs from the science WCS and doWarping=False; warp the template onto "
                    "the science grid first."
                )
            warp_fn = _find_warp_function()
            if warp_fn is None:
                raise WcsError(
                    "The template WCS differs from the science WCS and no warping function is available in "
                    "diffim.warp; warp the template onto the science grid first."
                )
            templateExposure = warp_fn(templateExposure, scienceExposure)
        if templateExposure.bbox != scienceExposure.bbox:
            if not templateExposure.bbox.contains(scienceExposure.bbox):
                raise NoOverlapError(
                    f"The template bbox {templateExposure.bbox} does not contain the science bbox "
                    f"{scienceExposure.bbox}; ZOGY needs the template on the whole science grid."
                )
            templateExposure = templateExposure[scienceExposure.bbox]
        return templateExposure

    def _flux_scalings(self, science: Exposure, template: Exposure) -> tuple[float, float]:
        """``(F_science, F_template)`` with the science image as the flux unit when calibrating."""
        cfg = self.config
        if cfg.scaleByCalibration:
            if science.photo_calib is None or template.photo_calib is None:
                # Plain FITS inputs rarely carry calibrations: measure the flux ratio on the stars instead.
                ratio = _stellar_flux_ratio(science, template)
                self.log.warning("No photoCalib on %s: template/science flux ratio %.4f measured from stars "
                                 "(set scaleByCalibration=False and the FluxScaling fields to impose one).",
                                 "the science" if science.photo_calib is None else "the template", ratio)
                self.metadata["measuredFluxRatio"] = ratio
                return 1.0, ratio
            # image = F · sky: with the sky in science counts, F_n = 1 and F_r = nJy-per-count ratio.
            return 1.0, science.photo_calib.calibration_mean / template.photo_calib.calibration_mean
        return float(cfg.scienceFluxScaling), float(cfg.templateFluxScaling)

    # -- the subtraction ----------------------------------------------------------------------------------
    @timeMethod
    def subtractExposures(self, templateExposure: Exposure, scienceExposure: Exposure, doWarping: bool = True,
                          spatiallyVarying: bool | None = None, inImageSpace: bool = False,
                          doPreConvolve: bool = False, staticScore: bool = False, **kwargs) -> Struct:
        """ZOGY-subtract ``templateExposure`` from ``scienceExposure``.

        Parameters
        ----------
        templateExposure, scienceExposure
            Exposures with PSFs; the template must cover the science bbox (on the same grid, or warpable).
        doWarping
            Warp the template if its WCS differs from the science WCS (needs ``diffim.warp``).
        spatiallyVarying
            Override ``doSpatialGrid`` (None: use the config).
        inImageSpace, doPreConvolve, kwargs
            Accepted for LSST call compatibility (ZOGY is always computed in Fourier space).
        staticScore
            Also return the template's part of the score, ``S_R`` (diffim extension: the static-sky model
            for residuals of static stars in the score, see ``ImageDifferenceConfig.doStarResidualVariance``).

        Returns
        -------
        Struct
            ``subtractedExposure`` (D on the science flux scale, PSF P_D), ``scoreExposure`` (S, V_S, PSF P_S),
            ``matchedExposure`` (None), ``warpedExposure`` (the template on the science grid), ``zogyResult``,
            ``staticScore`` (``S_R`` in the units of the score image, or None).
        """
        cfg = self.config
        science = scienceExposure
        template = self._register(templateExposure, scienceExposure, doWarping)
        if science.psf is None or template.psf is None:
            raise MissingPsfError("ZOGY needs a PSF model on both the science and the template exposure.")
        f_n, f_r = self._flux_scalings(science, template)
        grid = cfg.doSpatialGrid if spatiallyVarying is None else bool(spatiallyVarying)
        if not grid and spatiallyVarying is None and cfg.autoSpatialGrid > 0:
            variation = max(_fwhm_variation(science.psf, science.bbox), _fwhm_variation(template.psf, science.bbox))
            self.metadata["psfFwhmVariation"] = variation
            if variation > cfg.autoSpatialGrid:
                self.log.info("PSF FWHM varies by %.1f %% across the image: ZOGY on a spatial grid of cells.",
                              100 * variation)
                grid = True
        self.metadata["spatialGrid"] = bool(grid)

        mask_n, mask_r = science.mask, template.mask
        ignore_n = mask_n.get(list(cfg.ignoreMaskPlanes), ignore_missing=True)
        ignore_r = mask_r.get(list(cfg.ignoreMaskPlanes), ignore_missing=True)
        nodata_n = mask_n.get("NO_DATA", ignore_missing=True)
        nodata_r = mask_r.get("NO_DATA", ignore_missing=True)
        # One hole in both images: a saturated star cut out of one image only would leave its core.
        planes = list(cfg.replaceMaskPlanes)
        replace = mask_n.get(planes, ignore_missing=True) | mask_r.get(planes, ignore_missing=True)
        if cfg.replaceMaskGrow > 0 and replace.any():
            from scipy.ndimage import binary_dilation

            replace = binary_dilation(replace, iterations=int(cfg.replaceMaskGrow))
        replace_n, replace_r = replace | nodata_n, replace | nodata_r
        flagged_only = replace & ~(nodata_n | nodata_r)  # replaced, but keep their own planes (not NO_DATA)

        max_dist = cfg.maxPsfCentroidDist

        def science_psf(x: float, y: float) -> np.ndarray:
            # LSST: the two PSF images at every cell centre must be centred alike (else D shows dipoles).
            stamp = science.psf.compute_kernel_image(x, y)
            d = psf_centroid_offset(stamp, template.psf.compute_kernel_image(x, y))
            if d > max_dist:
                raise PsfError(
                    f"The science and template PSF centroids differ by {d:.3f} px at ({x:.1f}, {y:.1f}) "
                    f"(maxPsfCentroidDist={max_dist}); recentre the PSF models."
                )
            return stamp

        def template_psf(x: float, y: float) -> np.ndarray:
            return template.psf.compute_kernel_image(x, y)

        res = zogy_subtract(
            science.image, science.variance, template.image, template.variance,
            science_psf, template_psf,
            flux_science=f_n, flux_template=f_r,
            sigma_x=cfg.astrometricNoiseX, sigma_y=cfg.astrometricNoiseY,
            grid_inner_size=cfg.gridInnerSize if grid else None,
            replace_science=replace_n, replace_template=replace_r,
            stats_ignore_science=ignore_n, stats_ignore_template=ignore_r,
            subtract_background=cfg.correctBackground,
            difference_background_bin=cfg.backgroundBinSize if cfg.doSubtractBackground else None,
            xy0=science.xy0, static_score=staticScore,
        )

        # D on the science flux scale: a transient of f science counts has flux f with the PSF P_D.
        scale = np.float32(f_n / res.F_D)
        diff = science.copy(deep=True)
        diff.image = res.D * scale
        diff.variance = res.D_variance * (scale * scale)
        radius = max(res.P_D.shape) // 2
        grow_n = diff.mask.bitmask(list(cfg.growMaskPlanes), ignore_missing=True)
        diff.mask.array[...] = grow_mask_bits(diff.mask.array, grow_n, radius)
        tmask = diff.mask.conform(template.mask)
        diff.mask.array |= grow_mask_bits(tmask, diff.mask.bitmask(list(cfg.growMaskPlanes), ignore_missing=True),
                                          radius)
        if res.bad.any():
            finite = (np.isfinite(science.image) & np.isfinite(science.variance) & np.isfinite(template.image)
                      & np.isfinite(template.variance))
            diff.mask.set("NO_DATA", res.bad & ~(flagged_only & finite))
        diff.psf = self._cell_psf(res, science, "P_D")
        diff.photo_calib = science.photo_calib if science.photo_calib is not None else PhotoCalib(1.0)

        score = diff.copy(deep=False)
        score.masked_image = type(diff.masked_image)(res.S, diff.mask.copy(), res.S_variance, science.xy0)
        score.psf = self._cell_psf(res, science, "P_S")

        self.metadata["zogyFluxZeroPointD"] = float(res.F_D)
        self.metadata["zogySigmaScience"] = float(res.sigma_science)
        self.metadata["zogySigmaTemplate"] = float(res.sigma_template)
        self.metadata["zogyNumCells"] = len(res.cells)
        self.metadata["zogyBorderSize"] = int(res.border)
        self.metadata["zogyNumReplacedPixels"] = int(res.bad.sum())
        self.log.info("ZOGY: %d cell(s), border %d px, F_D = %.4g, sigma science/template = %.4g/%.4g",
                      len(res.cells), res.border, res.F_D, res.sigma_science, res.sigma_template)
        return Struct(
            subtractedExposure=diff,
            scoreExposure=score,
            matchedExposure=None,
            warpedExposure=template,
            zogyResult=res,
            staticScore=res.S_static,
        )

    @staticmethod
    def _cell_psf(res, science: Exposure, which: str):
        if len(res.cells) == 1:
            return ImagePsf(getattr(res.cells[0], which), average_position=science.psf_position())
        boxes = [c.box.shifted(*science.xy0) for c in res.cells]
        return CellPsf(boxes, [getattr(c, which) for c in res.cells], average_position=science.psf_position())

    def run(self, scienceExposure: Exposure, templateExposure: Exposure, doWarping: bool = True) -> Struct:
        """LSST's ``ZogyImagePsfMatchTask.run(science, template, doWarping)``: same as :meth:`subtractExposures`."""
        return self.subtractExposures(templateExposure, scienceExposure, doWarping=doWarping)


#: LSST also exposed the bare algorithm task as ``ZogyTask``; here it is the same class.
ZogyTask = ZogyImagePsfMatchTask


def _find_warp_function():
    """A function ``f(template, science) -> template warped onto the science grid``, if diffim.warp has one."""
    try:
        from ..warp.warper import warp_exposure
    except ImportError:  # the warp area is optional for ZOGY
        return None
    return lambda template, science: warp_exposure(template, science.wcs, science.bbox)


def _register_in_subtract_registry() -> None:
    from .image_psf_match import subtractAlgorithmRegistry

    if "zogy" not in subtractAlgorithmRegistry:
        subtractAlgorithmRegistry.register("zogy", ZogyImagePsfMatchTask)


_register_in_subtract_registry()
