"""ImageDifferenceTask: subtract a template from a science exposure and detect and measure what changed.

The configuration is the contract of LSST's ``lsst.pipe.tasks.imageDifference.ImageDifferenceTask`` (the seed
page, ``../shared/seed/ImageDifferenceTask.txt``): every field and retargetable subtask has the same name,
type, default and doc string. The task only orchestrates: the pixels are computed by the subtasks and by the
algorithm modules beneath them (``diffim.psfmatch``, ``diffim.zogy``, ``diffim.decorrelation``,
``diffim.detection``, ``diffim.measure``).

Deliberate deviations from the 2023 LSST task (its documented quirks) are listed in ``docs/deviations.md``.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager

import lsst.pex.config as pexConfig
import numpy as np

from ..errors import (BadInputError, ConfigError, InsufficientTemplateCoverageError, MissingPsfError,
                      NoOverlapError)
from .apply_ap_corr import ApplyApCorrTask
from .astrometry import AstrometryTask
from .base import Struct, Task, timeMethod
from .connections import Connections
from .detection import SourceDetectionTask
from .dipole_fit import DipoleFitTask
from .forced_measurement import ForcedMeasurementTask
from .get_template import GetCoaddAsTemplateTask
from .image_decorrelation import DecorrelateALKernelSpatialTask
from .image_psf_match import subtractAlgorithmRegistry
from .ref_obj_loader import LoadReferenceObjectsConfig
from .register import RegisterTask
from .scale_variance import ScaleVarianceTask
from .sky_objects import SkyObjectsTask
from .star_selector import ObjectSizeStarSelectorTask
from ..warp.coverage import template_coverage
from . import zogy as _zogy  # noqa: F401  (registers "zogy" in subtractAlgorithmRegistry)

__all__ = ["ImageDifferenceConfig", "ImageDifferenceTask", "MIN_SELECTED_KERNEL_SOURCES"]

#: With ``doSelectSources``, fewer selected kernel stars than this fall back to the AL task's own candidates.
MIN_SELECTED_KERNEL_SOURCES = 25

#: The PSF-smoothed S/N of white noise scatters by 1; the measured scatter is taken as correlated noise only
#: when it exceeds 1 by this many of its own standard errors (see :func:`correlated_noise_factor`).
CORRELATED_NOISE_NSIGMA = 3.0


def correlated_noise_factor(exposure, *, smooth: bool = True, max_size: int = 1024,
                            return_tolerance: bool = False) -> float | tuple[float, float]:
    """Robust scatter of the (PSF-smoothed, if ``smooth``) S/N of ``exposure`` on unmasked pixels.

    1 for white noise whose variance plane is right; larger when the noise is correlated on the PSF scale.
    Evaluated on a central cut-out of at most ``max_size``² pixels (it is a global property), with sources
    rejected by a 5σ clip. With ``return_tolerance``, also the level ``1 + CORRELATED_NOISE_NSIGMA·ε`` above
    which the excess is significant, ε the estimate's relative standard error for the S/N map's own measured
    autocorrelation (:func:`diffim.statistics.mad_sigma_relative_error`).
    """
    from ..detection import smooth_for_detection
    from ..model.box import Box
    from ..statistics import mad_sigma_relative_error

    b = exposure.bbox
    w, h = min(max_size, b.width), min(max_size, b.height)
    box = Box(b.x0 + (b.width - w) // 2, b.y0 + (b.height - h) // 2, w, h)
    sub = exposure[box]
    bad = sub.mask.get(["BAD", "SAT", "NO_DATA", "EDGE", "CR", "DETECTED", "DETECTED_NEGATIVE", "SUSPECT"],
                       ignore_missing=True)
    img = np.where(bad | ~np.isfinite(sub.image), 0.0, sub.image).astype(np.float32)
    var = np.where(bad | ~np.isfinite(sub.variance), 0.0, sub.variance).astype(np.float32)
    if smooth:
        sigma = exposure.require_psf().sigma(*exposure.psf_position())
        sm = smooth_for_detection(img, var, None, sigma, smooth_mask=False)
        img, var = sm.image, sm.variance
        grow = int(np.ceil(3 * sigma))
        from scipy.ndimage import binary_dilation

        bad = binary_dilation(bad, iterations=grow) if bad.any() else bad
        edge = sm.border
        bad[:edge], bad[-edge:], bad[:, :edge], bad[:, -edge:] = True, True, True, True
    with np.errstate(divide="ignore", invalid="ignore"):
        z = img / np.sqrt(var)
    valid = ~bad & np.isfinite(z) & (var > 0)
    if valid.any():
        # Sources out by a 5σ clip about the median: a difference left with a sky offset (median S/N far
        # from 0) still has a noise scatter, and a clip about 0 could leave nothing to measure.
        valid &= np.abs(z - np.median(z[valid])) < 5.0
    if valid.sum() < 1000:
        return (1.0, np.inf) if return_tolerance else 1.0
    zv = z[valid]
    r = float(1.4826 * np.median(np.abs(zv - np.median(zv))))
    if not return_tolerance:
        return r
    # The error of a MAD of correlated values: a smoothed S/N map's neighbours are not independent.
    psf_sigma = float(exposure.require_psf().sigma(*exposure.psf_position()))
    max_lag = int(np.clip(np.ceil(4.0 * psf_sigma), 4, 32)) if np.isfinite(psf_sigma) else 16
    eps = mad_sigma_relative_error(z, valid, max_lag=max_lag)
    return r, 1.0 + CORRELATED_NOISE_NSIGMA * eps

#: g−r limits of LSST's ``DiaCatalogSourceSelector`` (grMin, grMax): reference stars outside are "extreme colour"
#: (doSelectDcrCatalog adds them to the control sample).
DCR_GR_LIMITS = (-0.1, 1.2)
#: Radius (arcsec) for matching science sources to reference objects (LSST matched kernel sources within 1″).
KERNEL_REF_MATCH_RADIUS = 1.0

log = logging.getLogger(__name__)


class ImageDifferenceConfig(pexConfig.Config):
    """Config for ImageDifferenceTask."""

    # ---- retargetable subtasks (seed page, in its order) ---------------------------------------------------
    applyApCorr = pexConfig.ConfigurableField(target=ApplyApCorrTask, doc="Subtask to apply aperture corrections")
    astrometer = pexConfig.ConfigurableField(
        target=AstrometryTask,
        doc="astrometry task; used to match sources to reference objects, but not to fit a WCS",
    )
    decorrelate = pexConfig.ConfigurableField(
        target=DecorrelateALKernelSpatialTask,
        doc="Decorrelate effects of A&L kernel convolution on image difference, only if doSubtract is True. "
        "If this option is enabled, then detection.thresholdValue should be set to 5.0 (rather than the "
        "default of 5.5).",
    )
    detection = pexConfig.ConfigurableField(target=SourceDetectionTask, doc="Low-threshold detection for final measurement")
    forcedMeasurement = pexConfig.ConfigurableField(
        target=ForcedMeasurementTask, doc="Subtask to force photometer PVI at diaSource location."
    )
    getTemplate = pexConfig.ConfigurableField(
        target=GetCoaddAsTemplateTask, doc="Subtask to retrieve template exposure and sources"
    )
    measurement = pexConfig.ConfigurableField(target=DipoleFitTask, doc="Enable updated dipole fitting method")
    register = pexConfig.ConfigurableField(
        target=RegisterTask, doc="Task to enable image-to-image image registration (warping)"
    )
    scaleVariance = pexConfig.ConfigurableField(
        target=ScaleVarianceTask,
        doc="Subtask to rescale the variance of the template to the statistically expected level",
    )
    skySources = pexConfig.ConfigurableField(target=SkyObjectsTask, doc="Generate sky sources")
    sourceSelector = pexConfig.ConfigurableField(target=ObjectSizeStarSelectorTask, doc="Source selection algorithm")
    subtract = pexConfig.RegistryField(registry=subtractAlgorithmRegistry, default="al", doc="Subtraction Algorithm")

    # ---- configuration fields (seed page, in its order) ----------------------------------------------------
    coaddName = pexConfig.Field(dtype=str, default="deep", doc="coadd name: typically one of deep, goodSeeing, or dcr")
    connections = pexConfig.ConfigField(
        dtype=Connections, doc="Configurations describing the connections of the PipelineTask to datatypes"
    )
    controlRandomSeed = pexConfig.Field(dtype=int, default=10, doc="Random seed for shuffing the control sample")
    controlStepSize = pexConfig.Field(
        dtype=int, default=5, doc="What step size (every Nth one) to select a control sample from the kernelSources"
    )
    convolveTemplate = pexConfig.Field(dtype=bool, default=True, doc="Which image gets convolved (default = template)")
    diaSourceMatchRadius = pexConfig.Field(
        dtype=float, default=0.5, doc="Match radius (in arcseconds) for DiaSource to Source association"
    )
    doAddCalexpBackground = pexConfig.Field(
        dtype=bool,
        default=False,
        doc="Add background to calexp before processing it. Useful as ipDiffim does background matching.",
    )
    doAddMetrics = pexConfig.Field(dtype=bool, default=False, doc="Add columns to the source table to hold analysis metrics?")
    doApCorr = pexConfig.Field(dtype=bool, default=True, doc="Run subtask to apply aperture corrections")
    doApplyFinalizedPsf = pexConfig.Field(
        dtype=bool, default=False, doc="Whether to apply finalized psf models and aperture correction map."
    )
    doDebugRegister = pexConfig.Field(dtype=bool, default=False, doc="Writing debugging data for doUseRegister")
    doDecorrelation = pexConfig.Field(
        dtype=bool,
        default=True,
        doc="Perform diffim decorrelation to undo pixel correlation due to A&L kernel convolution (AL only)? "
        "If True, also update the diffim PSF.",
    )
    doDetection = pexConfig.Field(dtype=bool, default=True, doc="Detect sources?")
    doDipoleFitting = pexConfig.Field(dtype=bool, default=True, doc="Measure dipoles using new algorithm?")
    doForcedMeasurement = pexConfig.Field(dtype=bool, default=True, doc="Force photometer diaSource locations on PVI?")
    doMatchSources = pexConfig.Field(
        dtype=bool, default=False, doc="Match diaSources with input calexp sources and ref catalog sources"
    )
    doMeasurement = pexConfig.Field(dtype=bool, default=True, doc="Measure diaSources?")
    doMerge = pexConfig.Field(
        dtype=bool, default=True, doc="Merge positive and negative diaSources with grow radius set by growFootprint"
    )
    doPreConvolve = pexConfig.Field(
        dtype=bool,
        default=False,
        doc="Not in use. Superseded by useScoreImageDetection.",
        deprecated="This option superseded by useScoreImageDetection. Will be removed after v22.",
    )
    doScaleDiffimVariance = pexConfig.Field(
        dtype=bool,
        default=True,
        doc="Scale variance of the diffim before PSF matching. You may do either this or template variance "
        "scaling, or neither. (Doing both is a waste of CPU.)",
    )
    doScaleTemplateVariance = pexConfig.Field(
        dtype=bool, default=False, doc="Scale variance of the template before PSF matching"
    )
    doSelectDcrCatalog = pexConfig.Field(
        dtype=bool, default=False, doc="Select stars of extreme color as part of the control sample (AL only)"
    )
    doSelectSources = pexConfig.Field(dtype=bool, default=False, doc="Select stars to use for kernel fitting (AL only)")
    doSelectVariableCatalog = pexConfig.Field(
        dtype=bool, default=False, doc="Select stars that are variable to be part of the control sample (AL only)"
    )
    doSkySources = pexConfig.Field(dtype=bool, default=False, doc="Generate sky sources?")
    doSpatiallyVarying = pexConfig.Field(
        dtype=bool,
        default=False,
        doc="Perform A&L decorrelation on a grid across the image in order to allow for spatial variations. "
        "Zogy does not use this option.",
    )
    doSubtract = pexConfig.Field(dtype=bool, default=True, doc="Compute subtracted exposure?")
    doUseRegister = pexConfig.Field(
        dtype=bool,
        default=False,
        doc="Re-compute astrometry on the template. Use image-to-image registration to align template with "
        "science image (AL only).",
    )
    doWriteMatchedExp = pexConfig.Field(
        dtype=bool, default=False, doc="Write warped and PSF-matched template coadd exposure?"
    )
    doWriteScoreExp = pexConfig.Field(dtype=bool, default=False, doc="Write AL likelihood or Zogy score exposure?")
    doWriteSources = pexConfig.Field(dtype=bool, default=True, doc="Write sources?")
    doWriteSubtractedExp = pexConfig.Field(
        dtype=bool, default=True, doc="Write difference exposure (AL and Zogy) ?"
    )
    doWriteWarpedExp = pexConfig.Field(
        dtype=bool, default=False, doc="Write WCS, warped template coadd exposure?"
    )
    growFootprint = pexConfig.Field(
        dtype=int, default=2, doc="Grow positive and negative footprints by this amount before merging"
    )
    kernelSourcesFromRef = pexConfig.Field(
        dtype=bool,
        default=False,
        doc="Select sources to measure kernel from reference catalog if True, template if false",
    )
    refObjLoader = pexConfig.ConfigField(dtype=LoadReferenceObjectsConfig, doc="reference object loader")
    requiredTemplateFraction = pexConfig.Field(
        dtype=float,
        default=0.1,
        doc="Do not attempt to run task if template covers less than this fraction of pixels.Setting to 0 "
        "will always attempt image subtraction",
    )
    saveLogOutput = pexConfig.Field(
        dtype=bool,
        default=True,
        doc="Flag to enable/disable saving of log output for a task, enabled by default.",
    )
    saveMetadata = pexConfig.Field(
        dtype=bool, default=True, doc="Flag to enable/disable metadata saving for a task, enabled by default."
    )
    templateSipOrder = pexConfig.Field(
        dtype=int, default=2, doc="Sip Order for fitting the Template Wcs (default is too high, overfitting)"
    )
    useGaussianForPreConvolution = pexConfig.Field(
        dtype=bool,
        default=False,
        doc="Use a simple gaussian PSF model for pre-convolution (oherwise use exposure PSF)? (AL and if "
        "useScoreImageDetection=True only)",
    )
    useScoreImageDetection = pexConfig.Field(
        dtype=bool,
        default=False,
        doc="Calculate the pre-convolved AL likelihood or the Zogy score image. Use it for source detection "
        "(if doDetection=True).",
    )

    # ---- diffim extensions (not on the seed page) -------------------------------------------------------------
    doStarResidualVariance = pexConfig.Field(
        dtype=bool,
        default=True,
        doc="Add to the detection variance what static stars' residuals add: fit each bright isolated star's "
        "residual shift, width mismatch (and, for the record, flux mismatch) in the difference against the "
        "template side, estimate their scatter (noise removed), and add sigma_shift^2 |grad M|^2 + "
        "sigma_width^2 (lap M)^2 of the smoothed static model M (the first is ZOGY's astrometric-noise term, "
        "Zackay et al. 2016). Zero for pairs registered and PSF-matched as well as their noise allows. "
        "diffim extension.",
    )
    doStarResidualProfile = pexConfig.Field(
        dtype=bool,
        default=True,
        doc="With doStarResidualVariance: also add what those terms leave, measured on the same stars as a "
        "radial profile Pi(r) of their mean squared residual per unit squared amplitude (PSF wings and "
        "asymmetries that differ between the exposures), A^2 Pi(r) around every static peak of amplitude A "
        "at S/N >= 50. Zero when the fitted terms explain the stars. diffim extension.",
    )

    doBrightStarHalos = pexConfig.Field(
        dtype=bool,
        default=True,
        doc="With doStarResidualVariance: also measure, on each saturated or very bright (smoothed S/N >= 1000) "
        "static star, the residual halo it leaves in the detection image (medians in cells of radius and angle, "
        "pooled over neighbouring angles, out to 12 FWHM; significant cells only); detection subtracts it and "
        "adds its uncertainty to the variance. Wing differences of such stars reach beyond the star-averaged "
        "profile of doStarResidualProfile. diffim extension.",
    )

    def setDefaults(self) -> None:
        super().setDefaults()
        # Difference-image detection: both polarities, 5σ per pixel after decorrelation, no background
        # re-estimation (the PSF matching already fitted the differential background).
        self.detection.thresholdPolarity = "both"
        self.detection.thresholdValue = 5.0
        self.detection.thresholdType = "pixel_stdev"
        self.detection.reEstimateBackground = False
        # The unconvolvable border (EDGE), uncovered pixels (NO_DATA) and bad pixels (BAD: a bad column) hold no
        # valid difference; left out of detection (they add nothing to the smoothed sums), they cannot form
        # border- or column-long footprints that swallow real sources beside them.
        self.detection.excludeMaskPlanes = ["EDGE", "NO_DATA", "BAD"]
        # ... and sky sources must not sample it either (modern LSST adds EDGE to avoidMask too).
        if "EDGE" not in self.skySources.avoidMask:
            self.skySources.avoidMask.append("EDGE")
        # The difference's border (kernel half-width) is copied, not convolved: EDGE there. Keep it out of the
        # variance statistics as well (LSST's templates carry a border that hides this).
        for planes in (self.scaleVariance.maskPlanes, self.scaleVariance.background.ignoredPixelMask):
            if "EDGE" not in planes:
                planes.append("EDGE")

    def validate(self) -> None:
        super().validate()
        if not (self.doSubtract or self.doDetection):
            raise ConfigError("Either doSubtract or doDetection must be True.")
        if (self.doMeasurement or self.doMerge or self.doSkySources) and not self.doDetection:
            raise ConfigError("doMeasurement, doMerge and doSkySources need doDetection=True.")
        if self.doUseRegister and not self.doSelectSources:
            raise ConfigError("doUseRegister=True needs doSelectSources=True (registration matches selected sources).")
        if self.doScaleDiffimVariance and self.doScaleTemplateVariance:
            raise ConfigError("Scale either the difference variance or the template variance, not both.")
        if self.subtract.name == "zogy":
            if self.doWriteMatchedExp:
                raise ConfigError("ZOGY does not make a PSF-matched template; set doWriteMatchedExp=False.")
            if self.doAddMetrics:
                raise ConfigError("doAddMetrics needs an AL kernel; it is not available with ZOGY.")
            if self.doSelectSources:
                raise ConfigError("doSelectSources selects AL kernel sources; it is not available with ZOGY.")
            if self.useGaussianForPreConvolution:
                raise ConfigError("useGaussianForPreConvolution applies to AL only.")
        else:
            if self.useScoreImageDetection and not self.convolveTemplate:
                raise ConfigError("useScoreImageDetection with AL needs convolveTemplate=True.")
        if self.doWriteScoreExp and not self.useScoreImageDetection:
            raise ConfigError("doWriteScoreExp needs useScoreImageDetection=True (no score image is made otherwise).")
        if self.useGaussianForPreConvolution and not self.useScoreImageDetection:
            raise ConfigError("useGaussianForPreConvolution needs useScoreImageDetection=True.")


def same_pixel_grid(science, template) -> bool:
    """True if the template is already on the science pixel grid (same WCS, bbox covering the science)."""
    from ..forced import wcs_equal

    # Without a WCS on either side there is nothing to compare: pre-registered inputs.
    return template.bbox.contains(science.bbox) and wcs_equal(science.wcs, template.wcs, science.bbox)


class ImageDifferenceTask(Task):
    """Subtract an image from a template and measure the result.

    Parameters
    ----------
    config
        :class:`ImageDifferenceConfig`; default config if None.
    progress
        Log one INFO line per stage with its wall time (the command line turns this on).
    """

    ConfigClass = ImageDifferenceConfig
    _DefaultName = "imageDifference"

    def __init__(self, config=None, *, progress: bool = False, **kwargs):
        if config is None:
            config = ImageDifferenceConfig()
        config.validate()
        super().__init__(config=config, **kwargs)
        self.progress = progress
        self._science_sources = None  # per-peak science sources of the current run (DETECTED marking, ap corr)
        self._conv_template = bool(self.config.convolveTemplate)
        self.makeSubtask("subtract")
        self.makeSubtask("decorrelate")
        self.makeSubtask("scaleVariance")
        self.makeSubtask("detection")
        self.makeSubtask("measurement")
        self.makeSubtask("forcedMeasurement")
        self.makeSubtask("applyApCorr")
        self.makeSubtask("skySources")
        self.makeSubtask("sourceSelector")
        self.makeSubtask("register")
        self.makeSubtask("getTemplate")
        self.makeSubtask("astrometer", refObjLoaderConfig=self.config.refObjLoader)
        self.metadata["stageWallTime"] = {}

    @contextmanager
    def _stage(self, name: str):
        t0 = time.perf_counter()
        if self.progress:
            self.log.info("%s ...", name)
        yield
        dt = time.perf_counter() - t0
        self.metadata["stageWallTime"][name] = dt
        if self.progress:
            self.log.info("%s done in %.2f s", name, dt)

    # ------------------------------------------------------------------------------------------------------
    @timeMethod
    def run(self, exposure=None, selectSources=None, templateExposure=None, templateSources=None, idFactory=None,
            calexpBackgroundExposure=None, subtractedExposure=None, *, coaddDir=None, finalizedPsf=None,
            finalizedApCorrMap=None):
        """PSF matches, subtract two images and perform detection on the difference image.

        Parameters
        ----------
        exposure
            Science exposure (with a PSF).
        selectSources
            Sources measured on the science (table with ``x``, ``y`` and a flux column), used for kernel
            candidates when ``doSelectSources`` and for ``doMatchSources``; detected here when None.
        templateExposure
            Template exposure; warped onto the science WCS if it is not on the science pixel grid. If None, it
            is built by ``getTemplate`` from the coadd patches in ``coaddDir``.
        templateSources
            Sources measured on the template (for registration / kernel selection), optional.
        idFactory
            Callable returning successive DIA source ids; default: exposure id in the high bits + counter.
        calexpBackgroundExposure
            Background image (Exposure or array) added back to the science when ``doAddCalexpBackground``.
        subtractedExposure
            A precomputed difference image, used when ``doSubtract=False``.
        coaddDir
            Directory (or list of files) of coadd patches for ``getTemplate`` when no template is given.
        finalizedPsf, finalizedApCorrMap
            Final PSF model and aperture-correction map of the science visit (LSST's visit summary), put on the
            science exposure when ``doApplyFinalizedPsf`` (the PSF is then required).

        Returns
        -------
        Struct
            ``subtractedExposure``, ``scoreExposure``, ``warpedExposure``, ``matchedExposure``, ``subtractRes``,
            ``diaSources``, ``selectSources``, ``kernelSources``, ``controlSources``.
        """
        if exposure is None:
            raise BadInputError("ImageDifferenceTask.run needs a science exposure.")
        cfg = self.config
        self.metadata["psfMatchingAlgorithm"] = cfg.subtract.name
        self._science_sources = None
        self._noise_factor = 1.0
        self._score_pair = None
        self._static_score = None
        science = exposure
        if cfg.doAddCalexpBackground and calexpBackgroundExposure is not None:
            bg = calexpBackgroundExposure
            bg_image = bg.image if hasattr(bg, "image") else np.asarray(bg)
            science.image += bg_image.astype(np.float32)
        if cfg.doApplyFinalizedPsf:
            if finalizedPsf is None:
                raise BadInputError("doApplyFinalizedPsf=True needs finalizedPsf (the visit's final PSF model); "
                                    "pass it to run() or set doApplyFinalizedPsf=False.")
            science.psf = finalizedPsf
            if finalizedApCorrMap is not None:
                science.ap_corr_map = finalizedApCorrMap
        if science.psf is None:
            raise MissingPsfError("The science exposure has no PSF; estimate one (diffim.psf.estimate_psf) first.")

        scoreExposure = matchedExposure = warpedExposure = subtractRes = None
        kernelSources = controlSources = None
        if cfg.doSubtract:
            if templateExposure is None:
                with self._stage("getTemplate"):
                    coaddExposures = None
                    if coaddDir is not None and os.path.isdir(str(coaddDir)):
                        # The patch files are named after this task's coaddName (<coaddName>Coadd_*.fits).
                        from .get_template import find_coadd_files

                        coaddExposures = find_coadd_files(str(coaddDir), cfg.coaddName)
                    templateExposure = self.getTemplate.run(science, coaddDir=coaddDir,
                                                            coaddExposures=coaddExposures).exposure
            with self._stage("warp"):
                warpedExposure = self._align_template(science, templateExposure, selectSources, templateSources)
            frac = template_coverage(science, warpedExposure)
            self.metadata["templateCoveragePercent"] = 100.0 * frac
            if frac < cfg.requiredTemplateFraction:
                raise InsufficientTemplateCoverageError(
                    f"Template covers {100 * frac:.1f} % of the science image; requiredTemplateFraction="
                    f"{cfg.requiredTemplateFraction}. Provide a larger template or lower requiredTemplateFraction."
                )
            if cfg.doScaleDiffimVariance and not science.mask.get("DETECTED", ignore_missing=True).any():
                # Calibrated LSST exposures carry DETECTED from their own source detection; variance scaling
                # of the difference ignores those pixels. Give plain inputs the same property.
                with self._stage("scienceDetection"):
                    from ..sources import mark_detections

                    n, self._science_sources = mark_detections(science, work=self._sky_subtracted(science),
                                                               return_sources=True)
                    self.metadata["nScienceDetections"] = n
            if cfg.doScaleTemplateVariance:
                with self._stage("scaleTemplateVariance"):
                    self.metadata["scaleTemplateVarianceFactor"] = self.scaleVariance.run(warpedExposure.masked_image)
            with self._stage("subtract"):
                if cfg.subtract.name == "zogy":
                    # S_R, the static sky in the score's domain, is the model for static stars' residuals in S.
                    want_static = cfg.useScoreImageDetection and cfg.doStarResidualVariance and cfg.doDetection
                    subtractRes = self.subtract.subtractExposures(warpedExposure, science, doWarping=False,
                                                                  **({"staticScore": True} if want_static else {}))
                    subtractedExposure = subtractRes.subtractedExposure
                    scoreExposure = subtractRes.scoreExposure if cfg.useScoreImageDetection else None
                    self._static_score = getattr(subtractRes, "staticScore", None) if want_static else None
                else:
                    if cfg.doSelectSources:
                        kernelSources, controlSources, selectSources = self._select_kernel_sources(
                            science, selectSources)
                        if len(kernelSources) < MIN_SELECTED_KERNEL_SOURCES:
                            # Too few selected stars constrain a spatially varying kernel poorly (a noise
                            # ratio of several); the AL task's own candidate detection is the documented fallback.
                            self.log.warning(
                                "Only %d kernel sources survived source selection (< %d): using the PSF-matching "
                                "task's own kernel candidates instead.", len(kernelSources),
                                MIN_SELECTED_KERNEL_SOURCES)
                            self.metadata["kernelSourceFallback"] = True
                            kernelSources = None
                    subtractRes = self.subtract.subtractExposures(
                        warpedExposure, science, candidateList=kernelSources,
                        convolveTemplate=self._convolve_template(science, warpedExposure))
                    subtractedExposure = subtractRes.subtractedExposure
                    matchedExposure = subtractRes.matchedExposure
            if cfg.subtract.name != "zogy" and cfg.doDecorrelation:
                with self._stage("decorrelate"):
                    base_psf = subtractedExposure.psf
                    dec = self.decorrelate.run(
                        science, warpedExposure, subtractedExposure, subtractRes.psfMatchingKernel,
                        spatiallyVarying=cfg.doSpatiallyVarying, templateMatched=self._conv_template,
                    )
                    subtractedExposure = dec.correctedExposure
                    subtractedExposure.psf = self._decorrelated_psf(
                        base_psf, subtractedExposure, subtractRes.psfMatchingKernel, self._conv_template,
                        nodes=getattr(dec, "decorrelationNodes", None))
            if cfg.subtract.name != "zogy" and cfg.useScoreImageDetection:
                with self._stage("scoreImage"):
                    scoreExposure = self._al_score_image(science, warpedExposure, kernelSources)
            if cfg.doAddMetrics:
                with self._stage("kernelMetrics"):
                    self._kernel_metrics(science, warpedExposure, subtractRes, kernelSources, controlSources)
        elif subtractedExposure is None:
            raise BadInputError("doSubtract=False needs a precomputed subtractedExposure.")

        diaSources = None
        if cfg.doDetection:
            detExp = scoreExposure if (cfg.useScoreImageDetection and scoreExposure is not None) else subtractedExposure
            diaSources = self._detect_and_measure(science, subtractedExposure, detExp, matchedExposure,
                                                  warpedExposure, idFactory, selectSources)
        self._quality_metadata(subtractedExposure)
        self._sky_cache = None
        self._science_sources = None
        self._score_pair = None
        self._static_score = None
        return Struct(
            subtractedExposure=subtractedExposure,
            scoreExposure=scoreExposure,
            warpedExposure=warpedExposure,
            matchedExposure=matchedExposure,
            subtractRes=subtractRes,
            diaSources=diaSources,
            selectSources=selectSources,
            kernelSources=kernelSources,
            controlSources=controlSources,
        )

    # ------------------------------------------------------------------------------------------------------
    # Steps of run()
    # ------------------------------------------------------------------------------------------------------
    def _align_template(self, science, template, selectSources, templateSources):
        """The template on the science pixel grid (with a border when available): warped if needed.

        With ``doUseRegister`` the template WCS is first re-fitted from sources matched between the two images
        (TAN-SIP of order ``templateSipOrder``).
        """
        cfg = self.config
        if cfg.doUseRegister:
            from ..sources import detect_and_measure_sources as detect_sources_for_registration

            if science.wcs is None or template.wcs is None:
                raise NoOverlapError("doUseRegister needs WCSs on both the science and the template exposures.")
            sci_src = selectSources if selectSources is not None else detect_sources_for_registration(science)
            tmpl_src = templateSources if templateSources is not None else detect_sources_for_registration(template)
            reg = self.register.run(tmpl_src, template.wcs, template.bbox, sci_src, sipOrder=cfg.templateSipOrder)
            # reg.matches is a dict of per-match arrays: count its rows, not its keys.
            self.metadata["registerMatches"] = int(reg.nGood + reg.nRejected)
            template = template.copy(deep=False)
            template.wcs = reg.wcs
            if cfg.doDebugRegister:
                m = reg.matches
                self.metadata["registerDebug"] = {
                    "sipRms": float(reg.sipRms), "offsetArcsec": [float(v) for v in reg.offset],
                    "nGood": int(reg.nGood), "nRejected": int(reg.nRejected),
                    "x": np.asarray(m["x"], float).tolist(), "y": np.asarray(m["y"], float).tolist(),
                    "dxFit": np.asarray(m["dx_fit"], float).tolist(), "dyFit": np.asarray(m["dy_fit"], float).tolist(),
                    "good": np.asarray(m["good"], bool).tolist(),
                }
        if (science.wcs is None or template.wcs is None) and template.shape != science.shape \
                and tuple(template.xy0) == tuple(science.xy0) == (0, 0):
            # Nothing says where the arrays lie on each other: taking their first pixels as the same one is
            # a guess, and a wrong guess subtracts unrelated pixels without any error.
            from ..errors import ShapeMismatchError

            missing = ("neither has a WCS" if science.wcs is None and template.wcs is None else
                       f"the {'science' if science.wcs is None else 'template'} has no WCS")
            raise ShapeMismatchError(
                f"The template ({template.shape[1]}×{template.shape[0]} px) and the science "
                f"({science.shape[1]}×{science.shape[0]} px) differ in shape, {missing}, and neither has a pixel "
                "origin (LTV1/LTV2 or CRVAL1A/CRVAL2A cards), so how they align is unknown. Give the template on "
                "the science's pixel grid (same shape), attach WCSs to both, or put the science's position on the "
                "template in the science header: LTV1 = -x0, LTV2 = -y0, (x0, y0) being the template pixel "
                "under the science's first pixel."
            )
        if same_pixel_grid(science, template):
            return template
        if science.wcs is None or template.wcs is None:
            if template.shape == science.shape and template.xy0 != science.xy0:
                # Pre-registered arrays of the same shape whose files carry different origins (afw cut-outs):
                # without a WCS the pixels, not the origins, are what is aligned.
                self.log.warning("Template origin %s differs from the science's %s and there is no WCS: taking "
                                 "the arrays as aligned pixel for pixel.", template.xy0, science.xy0)
                mi = template.masked_image
                template = template.copy(deep=False)
                template.masked_image = type(mi)(mi.image, mi.mask, mi.variance, science.xy0)
                return template
            if template.bbox.intersection(science.bbox).is_empty():
                raise NoOverlapError(
                    f"Template bbox {template.bbox} and science bbox {science.bbox} do not overlap and there is no "
                    "WCS to warp with; give pre-registered images on the same pixel grid or attach WCSs."
                )
            return template
        from ..warp import warp_exposure

        border = 0
        return warp_exposure(template, science.wcs, science.bbox.grown(border))

    def _convolve_template(self, science, template) -> bool:
        """``convolveTemplate``, or the automatic choice from the two PSFs with ``subtract.al.mode="auto"``."""
        mode = getattr(self.config.subtract.active, "mode", "convolveTemplate")
        self._conv_template = bool(self.config.convolveTemplate)
        from .image_psf_match import choose_convolve_template

        if mode != "auto":
            try:
                natural = choose_convolve_template(science.require_psf(), template.require_psf(),
                                                   science.psf_position())
            except Exception:  # a PSF without a usable shape: the plain fit reports it
                natural = self._conv_template
            if natural != self._conv_template:
                # Matching a sharper image to a broader one deconvolves: bright stars leave residual cores
                # (star χ² p95 1.35–1.95 on simulated pairs with the template 25 % broader, against 1.17–1.22
                # the other way round).
                where = ("template PSF is broader than the science's in both axes" if self._conv_template
                         else "science PSF is broader than the template's along at least one axis")
                self.log.warning(
                    "The %s, but convolveTemplate=%s convolves it (a deconvolution): expect residuals at bright "
                    "stars. -c subtract.al.mode=auto chooses the direction from the PSFs; "
                    "useScoreImageDetection=True (pre-convolution) or subtract.name=zogy need no choice.",
                    where, self._conv_template)
                self.metadata["convolutionDeconvolves"] = True
            return self._conv_template

        choice = choose_convolve_template(science.require_psf(), template.require_psf(), science.psf_position())
        self.log.info("Automatic convolution choice: convolving the %s.", "template" if choice else "science")
        self.metadata["convolveTemplateAuto"] = choice
        self._conv_template = choice
        return choice

    def _sky_subtracted(self, science):
        """The science with a mesh background removed, computed once per run (forced photometry, ap corr)."""
        cache = getattr(self, "_sky_cache", None)
        if cache is None or cache[0] is not science:
            from ..sources import background_subtracted

            cache = (science, background_subtracted(science))
            self._sky_cache = cache
        return cache[1]

    def _decorrelated_psf(self, base_psf, diff, kernel, template_matched, preconv_kernel=None, nodes=None):
        """PSF of the decorrelated difference, φ ⊗ (the un-convolved image's PSF), valid across the field (with
        ``nodes``, the grid of a spatially varying filter, φ blended between them as the image was)."""
        from ..decorrelated_psf import DecorrelatedPsf
        from ..decorrelation import kernel_image_at

        md = self.decorrelate.metadata
        inner = md.get("decorrelate", {})
        svar = md.get("svar", inner.get("svar"))
        tvar = md.get("tvar", inner.get("tvar"))
        if base_psf is None or svar is None or tvar is None:
            return diff.psf
        xc, yc = diff.bbox.center
        return DecorrelatedPsf(base_psf, kernel_image_at(kernel, xc, yc), svar, tvar,
                               template_matched=template_matched, preconv_kernel=preconv_kernel, nodes=nodes)

    def _select_kernel_sources(self, science, selectSources):
        """Kernel sources (and a control sample) from ``selectSources`` via ``sourceSelector`` (doSelectSources).

        With ``kernelSourcesFromRef`` only stars matched to a reference object are kernel candidates; with
        ``doSelectDcrCatalog`` / ``doSelectVariableCatalog`` the matched sources whose reference g−r colour is
        outside :data:`DCR_GR_LIMITS` / whose reference ``variable`` flag is set join the control sample (and
        are kept out of the kernel fit).
        """
        import random

        from ..sources import detect_and_measure_sources as detect_stars

        cfg = self.config
        if selectSources is None:
            selectSources = detect_stars(science)
        sel_rows = np.flatnonzero(self.sourceSelector.run(selectSources, exposure=science).selected)
        extra_control: set = set()
        if cfg.kernelSourcesFromRef or cfg.doSelectDcrCatalog or cfg.doSelectVariableCatalog:
            ref, ref_idx = self._match_reference(science, selectSources)
            if cfg.kernelSourcesFromRef:
                sel_rows = sel_rows[ref_idx[sel_rows] >= 0]
                self.metadata["nKernelSourcesFromRef"] = int(sel_rows.size)
            matched = np.flatnonzero(ref_idx >= 0)
            if cfg.doSelectDcrCatalog:
                gr = _reference_colour(ref, cfg.refObjLoader.filename)[ref_idx[matched]]
                dcr = matched[(gr < DCR_GR_LIMITS[0]) | (gr > DCR_GR_LIMITS[1])]
                self.metadata["nDcrControlSources"] = int(dcr.size)
                extra_control.update(dcr.tolist())
            if cfg.doSelectVariableCatalog:
                if "variable" not in ref.colnames:
                    raise BadInputError(f"doSelectVariableCatalog needs a 'variable' column in the reference "
                                        f"catalogue {cfg.refObjLoader.filename!r}.")
                var = matched[np.asarray(ref["variable"], bool)[ref_idx[matched]]]
                self.metadata["nVariableControlSources"] = int(var.size)
                extra_control.update(var.tolist())
        sel_rows = np.array([r for r in sel_rows if r not in extra_control], dtype=int)
        rows = list(range(len(sel_rows)))
        rng = random.Random(cfg.controlRandomSeed)
        rng.shuffle(rows)
        step = max(int(cfg.controlStepSize), 1)
        control_rows = rows[::step]
        kernel_rows = [r for i, r in enumerate(rows) if i % step != 0]
        kernel = sel_rows[sorted(kernel_rows)]
        control = np.array(sorted(set(sel_rows[control_rows].tolist()) | extra_control), dtype=int)
        self.metadata["nKernelSources"] = len(kernel)
        self.metadata["nControlSources"] = len(control)
        return selectSources[kernel], selectSources[control], selectSources

    def _match_reference(self, science, sources):
        """Reference catalogue (refObjLoader) and, per row of ``sources``, its matched reference row (or -1)."""
        from ..warp.matching import match_dia_sources
        from .ref_obj_loader import load_reference_catalog

        cfg = self.config
        if not cfg.refObjLoader.filename:
            raise ConfigError("kernelSourcesFromRef, doSelectDcrCatalog and doSelectVariableCatalog need a reference "
                              "catalogue: set refObjLoader.filename.")
        if science.wcs is None:
            raise BadInputError("Matching kernel sources to the reference catalogue needs a science WCS.")
        ref = load_reference_catalog(cfg.refObjLoader, science)
        idx, _ = match_dia_sources(
            np.column_stack([np.asarray(sources["x"], float), np.asarray(sources["y"], float)]),
            np.column_stack([np.asarray(ref["x"], float), np.asarray(ref["y"], float)]),
            KERNEL_REF_MATCH_RADIUS, pixel_scale=science.pixel_scale() or 1.0)
        return ref, np.asarray(idx, int)

    def _al_score_image(self, science, template, kernelSources):
        """Pre-convolved AL likelihood (score) image: (science ⊗ PSF) − matched template, decorrelated."""
        from ..convolve import convolve_exposure
        from ..model.psf import GaussianPsf

        cfg = self.config
        psf = science.require_psf()
        pos = science.psf_position()
        kimg = psf.compute_kernel_image(*pos)
        if cfg.useGaussianForPreConvolution:
            kimg = GaussianPsf(psf.sigma(*pos), size=kimg.shape[0]).compute_kernel_image()
        pre_kernel = kimg[::-1, ::-1] / kimg.sum()  # correlation with the flipped PSF = convolution with the PSF
        # Defects are filled along their rows from the nearest good pixels, not with the image median: the
        # pre-convolution sums them over the PSF, so a median fill of a bad column on a sky gradient (or a hole
        # for a saturated core) becomes a coherent 5σ blob in the score beyond the grown mask.
        fill = science.mask.get(["BAD", "SAT", "NO_DATA"], ignore_missing=True) | ~np.isfinite(science.image)
        if fill.any():
            science_in = science.copy()
            img, cols = science_in.image, np.arange(fill.shape[1])
            for r in np.flatnonzero(fill.any(axis=1)):
                good = ~fill[r] & np.isfinite(img[r])
                if good.sum() >= 2:
                    img[r, ~good] = np.interp(cols[~good], cols[good], img[r, good])
        else:
            science_in = science
        pre = convolve_exposure(science_in, pre_kernel, copy_edge=True, fill_mask_planes=())
        pre.psf = _preconvolved_psf(psf, pre_kernel, pos)
        if kernelSources is None:
            # Kernel stars are found on the science itself: the candidate finder assumes white noise, which
            # the pre-convolved image is not (its smoothed S/N comes out ~5× too high, and hundreds of noise
            # peaks become "stars" that the kernel is then fitted to).
            from ..psfmatch.candidates import detect_kernel_sources

            sel = self.subtract.config.selectDetection
            kernelSources = detect_kernel_sources(science.masked_image, psf.sigma(*pos), threshold=sel.detThreshold,
                                                  bad_mask_planes=tuple(sel.badMaskPlanes))
        # The pre-convolved science's noise is correlated over its PSF's noise-equivalent area 1/Σp²: the mean
        # residual of a kernel candidate's stamp scatters √(1/Σp²) times more than for white noise.
        mean_scale = float(1.0 / np.sqrt(np.sum(pre_kernel * pre_kernel)))
        res = self.subtract.subtractExposures(template, pre, candidateList=kernelSources, convolveTemplate=True,
                                              residualMeanScale=mean_scale)
        static = res.matchedExposure  # the score's static-sky model (doStarResidualVariance)
        score = res.subtractedExposure
        if cfg.doDecorrelation:
            def decorrelate(exp):
                return self.decorrelate.run(
                    science, template, exp, res.psfMatchingKernel, spatiallyVarying=cfg.doSpatiallyVarying,
                    preConvKernel=pre_kernel, templateMatched=True, preConvMode=True,
                ).correctedExposure

            score = decorrelate(score)
            if cfg.doStarResidualVariance and cfg.doDetection:
                # The model of static stars' residuals must be in the score's domain: the pre-convolution
                # filter has side lobes (real-space weights 0.67, 0.13, −0.07, 0.04, … measured) that spread a
                # core residual into a ring 2–3 FWHM wide, beyond a model that was not filtered alike.
                static = decorrelate(static.copy())
        self._score_pair = (pre, static)
        score.psf = psf
        return score

    def _kernel_metrics(self, science, template, subtractRes, kernelSources, controlSources):
        """Kernel-quality metrics on the kernel and control samples (doAddMetrics)."""
        from ..kernel_qa import kernel_candidate_metrics

        diff = subtractRes.subtractedExposure
        kern = subtractRes.psfMatchingKernel
        for label, src in (("kernel", kernelSources), ("control", controlSources)):
            if src is None and label == "kernel":  # no selected sources: the subtraction's own candidates
                src = getattr(subtractRes, "kernelCandidates", None)
            if src is None or len(src) == 0:
                continue
            stats = kernel_candidate_metrics(diff, kern, src)
            for key, value in stats.items():
                self.metadata[f"{label}_{key}"] = value

    def _detect_and_measure(self, science, diffExp, detExp, matchedExposure, warpedExposure, idFactory, selectSources):
        from ..catalog import build_dia_source_table
        from ..deblend import split_footprints
        from ..detection import merge_footprints
        from ..measure.single_frame import measure_dia_sources

        cfg = self.config
        with self._stage("scaleDiffimVariance"):
            if cfg.doScaleDiffimVariance:
                area = 1.0
                if detExp is not diffExp and detExp.psf is not None:
                    # A score image is its difference filtered with the PSF: its noise is correlated over
                    # 4πσ² pixels, which a 32-px mesh background would partly absorb (the factor came out
                    # 0.96 on white-noise simulations, where the score's variance plane was right).
                    sig = float(detExp.psf.sigma(*detExp.psf_position()))
                    area = 4.0 * np.pi * sig * sig if np.isfinite(sig) and sig > 0 else 1.0
                self.metadata["scaleDiffimVarianceFactor"] = self.scaleVariance.run(detExp.masked_image,
                                                                                   correlationArea=area)
                if detExp is not diffExp:
                    self.metadata["scaleDiffimVarianceFactorDifference"] = self.scaleVariance.run(diffExp.masked_image)
        with self._stage("detection"):
            useScore = detExp is not diffExp
            # Resampled or stacked inputs have spatially correlated noise that decorrelation (which only undoes
            # the matching kernel) leaves in place: the PSF-smoothed S/N then scatters more than 1 and a
            # per-pixel-variance threshold floods with noise detections. Measure that scatter and, where it
            # exceeds 1, detect (and quote PSF-flux errors) with the variance scaled by its square.
            r, tol = correlated_noise_factor(detExp, smooth=not useScore, return_tolerance=True)
            self.metadata["correlatedNoiseFactor"] = r
            self.metadata["correlatedNoiseTolerance"] = float(tol)
            self._noise_factor = r if r > tol else 1.0
            target = detExp
            if r > tol:
                self.log.warning("The PSF-smoothed difference scatters %.2f× its variance plane (correlated noise "
                                 "in the inputs): detection threshold and PSF-flux errors scaled by it.", r)
                mi = detExp.masked_image
                target = detExp.copy(deep=False)
                target.masked_image = type(mi)(mi.image, mi.mask, mi.variance * np.float32(r * r), mi.xy0)
            extra = offset = None
            score_pair = getattr(self, "_score_pair", None)
            static_score = getattr(self, "_static_score", None)
            if cfg.doStarResidualVariance and (not useScore or score_pair is not None or static_score is not None):
                # Fitted on the difference with its own variance plane: the per-star noise errors are per-pixel
                # ones, which the correlated-noise factor (a property of the smoothed image) would overstate.
                extra, offset = self._star_residual_variance(
                    science, detExp, diffExp, matchedExposure, warpedExposure,
                    score_pair=score_pair if useScore else None, static_score=static_score if useScore else None)
            det = self.detection.run(target, doSmooth=not useScore, extraVariance=extra, extraOffset=offset)
            del extra, offset
            if useScore:  # detection masks travel to the difference that is measured
                for plane in ("DETECTED", "DETECTED_NEGATIVE", "EDGE"):
                    if detExp.mask.has_plane(plane):
                        diffExp.mask.clear(plane)
                        diffExp.mask.set(plane, detExp.mask.get(plane))
            if cfg.doMerge:
                footprints = merge_footprints(det.positive, det.negative, grow=cfg.growFootprint,
                                              shape=detExp.shape, xy0=detExp.xy0)
            else:
                footprints = list(det.sources)
            smoothed = getattr(det, "smoothed", None)
            snr = None
            if smoothed is not None and getattr(smoothed, "image", None) is not None:
                with np.errstate(divide="ignore", invalid="ignore"):
                    snr = smoothed.image / np.sqrt(smoothed.variance)
            psf_pos = diffExp.psf_position()
            # A pair of opposite lobes farther apart than the dipole model may separate them (maxSeparation
            # PSF σ) is two changes (a fast mover), not a dipole.
            max_sep = self.measurement.config.dipoleFit.maxSeparation * diffExp.psf.sigma(*psf_pos)
            footprints, parents = split_footprints(footprints, snr, xy0=detExp.xy0,
                                                   min_separation=max(2.0, diffExp.psf.fwhm(*psf_pos)),
                                                   max_dipole_separation=max_sep if cfg.doMerge else None,
                                                   min_significance=self.detection.config.thresholdValue)
            n_real = len(footprints)
            del det, smoothed, snr  # ~200 MiB at 4096² that would otherwise live through ap corr
            self.metadata["nMergedFootprints"] = int(len(set(parents.tolist())))
            if cfg.doSkySources:
                seed = int(science.id) if science.id is not None else 0
                sky = self.skySources.run(diffExp.mask, seed, xy0=diffExp.xy0)
                footprints = footprints + list(sky)
            is_sky = np.zeros(len(footprints), bool)
            is_sky[n_real:] = True
        columns: dict = {"x": np.array([fp.peaks[0].x if fp.peaks else fp.centroid()[0] for fp in footprints], float),
                         "y": np.array([fp.peaks[0].y if fp.peaks else fp.centroid()[1] for fp in footprints], float),
                         "isNegative": np.array([fp.is_negative for fp in footprints], bool)}
        if cfg.doMeasurement:
            with self._stage("measurement"):
                columns = measure_dia_sources(diffExp, footprints)
                if cfg.doDipoleFitting:
                    negExp = matchedExposure if self._conv_template else warpedExposure
                    posExp = science if self._conv_template else matchedExposure
                    if cfg.subtract.name == "zogy":
                        negExp = None
                    dip = self.measurement.run(footprints, diffExp, posExp=posExp, negExp=negExp,
                                               centroids={k: columns[k] for k in ("x", "y", "xErr", "yErr")}
                                               | {"flag": columns["centroid_flag"]})
                    d = dip.dipoles
                    isdip = np.asarray(d["isDipole"], bool)
                    for key, arr in d.items():
                        if key in ("x", "y", "xErr", "yErr"):
                            continue
                        columns[key] = arr
                    # The centroid slot becomes the dipole-fit centroid for dipoles (LSST re-aliases it).
                    for key in ("x", "y", "xErr", "yErr"):
                        src = f"ip_diffim_DipoleFit_{key}"
                        if src in d:
                            columns[key] = np.where(isdip, np.asarray(d[src], float), columns[key])
        if cfg.doMeasurement and is_sky.any():
            self._force_sky_positions(columns, diffExp, footprints, is_sky)
        columns["sky_source"] = is_sky
        r = getattr(self, "_noise_factor", 1.0)
        if r > 1.0 and "psfFluxErr" in columns:
            columns["psfFluxErr"] = np.asarray(columns["psfFluxErr"], float) * r
        table = build_dia_source_table(
            columns, exposure=diffExp, science_photo_calib=science.photo_calib,
            template_photo_calib=warpedExposure.photo_calib if warpedExposure is not None else None,
        )
        if idFactory is not None:
            table["diaSourceId"] = np.array([idFactory() for _ in range(len(table))], dtype=np.int64)
        if cfg.doMeasurement and cfg.doApCorr:
            with self._stage("apCorr"):
                apcorr = diffExp.ap_corr_map if diffExp.ap_corr_map else self._measure_ap_corr(science)
                if apcorr:
                    diffExp.ap_corr_map = apcorr
                self.applyApCorr.run(table, apcorr)
        if cfg.doForcedMeasurement:
            with self._stage("forcedMeasurement"):
                # Forced PSF fluxes need the science without its sky (a calexp is background-subtracted).
                self.forcedMeasurement.run(table, self._sky_subtracted(science))
        if cfg.doMatchSources:
            with self._stage("matchSources"):
                self._match_sources(table, science, selectSources)
        self._count_metadata(table)
        return table

    #: Keys of the static-star residual scatters in the difference exposure's metadata (provenance; also
    #: what a later run with doSubtract=False on that difference re-uses).
    RESIDUAL_KEYS = ("DIFFIM STARRESID SHIFT", "DIFFIM STARRESID FLUX", "DIFFIM STARRESID WIDTH",
                     "DIFFIM STARRESID NSTARS")

    def _star_residual_variance(self, science, det, diffExp, matched, warped, score_pair=None, static_score=None):
        """``(variance, offset)``: the variance that static stars' registration and flux-matching residuals add
        to the detection image ``det`` (:mod:`diffim.star_residuals`), or None when no residual scatter is
        resolved, and the bright-star halos for detection to subtract (``doBrightStarHalos``), or None.

        The static model is the template side of the subtraction — the matched template (or, when the science
        was convolved, the template itself; ZOGY: the warped template) — never the science, whose transients
        would raise the variance on themselves. Its noise is also in the difference (with the opposite sign);
        the part that is, measured on empty sky, is taken out of the flux fit. With ``score_pair`` (the
        pre-convolved science and its matched template, whose difference the AL score ``det`` is) the fit and
        the variance are in the score's own (already matched-filtered) domain. With ``static_score`` (ZOGY's
        ``S_R``, the template's part of the score ``det``) the scatters are fitted on the difference ``diffExp``
        (white noise, whose per-star errors are right) and the variance is that of S: a shift δ or a width
        change b of a static star leaves ``δ·∇S_R + b·∇²S_R`` there. A given difference
        (``doSubtract=False``) re-uses the scatters stored in its metadata, or else falls back to the science.
        """
        from .. import star_residuals as sr
        from ..detection import correlate_separable, gaussian_kernel_1d, smoothing_kernel_width

        if not (science.shape == det.shape and science.xy0 == det.xy0):
            return None, None
        fitted = det if score_pair is not None else diffExp  # the image the scatters are fitted on
        where = fitted.psf_position()
        sigma = float(fitted.require_psf().determinant_radius(*where))
        fwhm = float(fitted.psf.fwhm(*where))
        if not (np.isfinite(sigma) and sigma > 0):
            return None, None
        fits = peaks = None
        if score_pair is not None:
            shift, flux, width, n, model, fits, peaks = self._fit_star_residuals(score_pair[1], det, None,
                                                                                 fwhm * np.sqrt(2.0))
            prefix, label = "score", "in the score "
            resid, kernel = det, None
        else:  # fitted on D (also for ZOGY's score), smoothed as for detection on D
            k = gaussian_kernel_1d(sigma, smoothing_kernel_width(sigma, self.detection.config.nSigmaForKernel))
            k_shift, k_flux, k_width, k_n = self.RESIDUAL_KEYS
            stored = diffExp.metadata if isinstance(diffExp.metadata, dict) else {}
            static = matched if (matched is not None and self._conv_template) else warped
            if static is None and k_shift in stored and k_flux in stored:
                shift, flux = float(stored[k_shift]), float(stored[k_flux])
                width, n = float(stored.get(k_width, 0.0)), int(stored.get(k_n, 0))
                smodel, svar, _, sbad = self._static_model(science, det)
                model = correlate_separable(smodel, k, threads=2)
                # No fit here: the profile's stars are the model's isolated bright peaks.
                v_s = self._typical_variance(svar) * float(np.sum(k * k)) ** 2
                peaks = sr.bright_star_positions(model, np.float32(v_s), bad=sbad, isolation=0, max_stars=1_000_000)
                iso = sr.isolated_peaks(peaks, int(np.ceil(3 * fwhm)), max_stars=300)
                fits = sr.StarResiduals(x=iso[:, 1].astype(float), y=iso[:, 0].astype(float), shift_x=None,
                                        shift_y=None, shift_err=None, flux=None, flux_err=None)
            else:
                shift, flux, width, n, model, fits, peaks = self._fit_star_residuals(
                    static if static is not None else science, diffExp, k, fwhm)
            if isinstance(diffExp.metadata, dict):
                diffExp.metadata.update({k_shift: shift, k_flux: flux, k_width: width, k_n: n})
            prefix, label = "star", ""
            resid, kernel = diffExp, k
            if static_score is not None:
                model, label = static_score, "(fitted on D, applied to the ZOGY score) "
                resid, kernel = det, None
                if fits is not None:
                    peaks = sr.bright_star_positions(
                        model, np.float32(self._typical_variance(det.variance)), isolation=0, max_stars=1_000_000,
                        bad=det.mask.get(self._STAR_BAD_PLANES, ignore_missing=True))
        for key, value in (("ShiftSigma", shift), ("FluxSigma", flux), ("WidthSigma", width), ("NStars", n)):
            self.metadata[f"{prefix}Residual{key}"] = value
        # The shift term (as in ZOGY) and the width term enter the variance. The flux scatter is reported, not
        # added: σ_a·M would raise the threshold on every galaxy in proportion to its brightness, while a
        # PSF-matching error leaves residuals only at the PSF's scale — which the Laplacian term follows
        # (it vanishes on smooth extended light).
        extra = sr.residual_variance(model, shift, 0.0, width) if (shift > 0 or width > 0) else None
        if shift > 0 or width > 0:
            self.log.info("Static-star residuals %s(%d stars): shift scatter %.4f px, width scatter %.4f px² (added "
                          "to the detection variance), flux scatter %.4f.", label, n, shift, width, flux)
        if self.config.doStarResidualProfile and fits is not None:
            extra = self._add_mismatch_variance(extra, flux, resid, kernel, model, fits, peaks, sigma, fwhm, prefix)
        offset = None
        if self.config.doBrightStarHalos:
            extra, offset = self._add_halos(extra, resid, kernel, model, peaks, sigma, fwhm, prefix)
        return extra, offset

    @staticmethod
    def _profile_radius(fwhm: float) -> int:
        """Outer radius (px) of the static-star residual profile: 3 FWHM of what detection sees, the PSF
        convolved once more (the smoothing, or the score's matched filter)."""
        return int(np.ceil(3.0 * fwhm * np.sqrt(2.0)))

    #: Static peaks at least this bright (smoothed S/N of the static model) have their halo measured
    #: (doBrightStarHalos), besides every saturated core; at most this many of them.
    HALO_MIN_SNR = 1000.0
    HALO_MAX_STARS = 300

    def _add_halos(self, extra, resid, kernel, model, peaks, sigma, fwhm, prefix):
        """Measure the residual halos of saturated cores and of the brightest static peaks, each on the star
        itself (:func:`diffim.star_residuals.halo_model`, ``doBrightStarHalos``): returns ``extra`` plus the
        model's uncertainty and the model, for detection to subtract (None if no halo is significant).
        ``resid``: the detection image (smoothed here with ``kernel`` if given); ``model``: the static model in
        the detection domain; ``peaks``: its bright peaks."""
        from scipy import ndimage

        from .. import star_residuals as sr

        centres = []
        r_min = []
        profile_r = float(self._profile_radius(fwhm)) if self.config.doStarResidualProfile else 0.0
        sat = resid.mask.get(["SAT"], ignore_missing=True)
        if sat.any():
            lab, n = ndimage.label(sat)
            if n:
                # The largest saturated regions first (the brightest stars), at most HALO_MAX_STARS of them: a
                # frame peppered with saturated hot pixels must not cost a halo measurement each.
                ys, xs = np.nonzero(sat)
                labels = lab[ys, xs]
                sizes = np.bincount(labels, minlength=n + 1)
                keep = np.argsort(-sizes[1:], kind="stable")[: self.HALO_MAX_STARS] + 1
                cy = np.bincount(labels, weights=ys, minlength=n + 1)[keep] / sizes[keep]
                cx = np.bincount(labels, weights=xs, minlength=n + 1)[keep] / sizes[keep]
                centres += [(int(round(a)), int(round(b))) for a, b in zip(cy, cx)]
                # A saturated region wider than the PSF hides the star's peak, so the residual profile's
                # amplitude for it is unknown: its halo is modelled from the region's edge. A star saturated in
                # a few pixels only is the profile's, like an unsaturated one.
                big = sizes[keep] >= np.pi * fwhm * fwhm
                r_min += [0.0 if b else profile_r for b in big]
        if peaks is not None and len(peaks):
            amp = self._peak_amplitudes(model, peaks[:, 0], peaks[:, 1])
            v_s = self._typical_variance(resid.variance)
            if kernel is not None:
                v_s *= float(np.sum(np.asarray(kernel) ** 2)) ** 2
            bright = np.flatnonzero(amp >= self.HALO_MIN_SNR * np.sqrt(v_s))[: self.HALO_MAX_STARS]
            centres += [tuple(int(v) for v in peaks[i]) for i in bright]
            r_min += [profile_r] * len(bright)
        self.metadata[f"{prefix}HaloNStars"] = len(centres)
        if not centres:
            return extra, None
        r_max = int(min(150, np.ceil(12.0 * fwhm)))
        halos = sr.halo_model(resid.image, resid.variance, np.array(centres, int), r_max, kernel=kernel,
                              bad=resid.mask.get(self._STAR_BAD_PLANES, ignore_missing=True),
                              excluded=resid.mask.get(list(self.detection.config.excludeMaskPlanes),
                                                      ignore_missing=True) if kernel is not None else None,
                              corr_area=4.0 * np.pi * sigma * sigma, ring_width=max(2, int(round(fwhm))),
                              n_sectors=12, r_min=np.array(r_min))
        if halos is None:
            return extra, None
        self.log.info("Bright-star halos %s: measured around %d saturated or very bright stars (up to %d px), "
                      "subtracted for detection.", "in the score" if prefix == "score" else "in the difference",
                      len(centres), r_max)
        return (halos.variance if extra is None else extra + halos.variance), halos.offset

    def _add_mismatch_variance(self, extra, flux, resid, kernel, model, fits, peaks, sigma, fwhm, prefix):
        """``extra`` plus the variance of what the fitted terms leave around static stars
        (:func:`diffim.star_residuals.mismatch_profile`, ``doStarResidualProfile``), in the detection domain:
        ``resid`` (smoothed with ``kernel`` if given) and ``model``, the static model there. ``fits``: the
        per-star fits (their isolated, non-outlier stars make the profile); ``peaks``: every bright static
        peak (each gets the variance). The profile is what none of the three fitted terms describes: the flux
        term (scatter ``flux``), which is not added, is still taken out of the stars' residuals."""
        from scipy.spatial import cKDTree

        from .. import star_residuals as sr

        r_max = self._profile_radius(fwhm)
        ys = np.rint(fits.y).astype(int)
        xs = np.rint(fits.x).astype(int)
        use = np.ones(ys.size, bool) if fits.kept is None else fits.kept.copy()
        if peaks.size and ys.size:
            # Only stars alone within the profile's radius: a neighbour's own residual is not this star's.
            near = cKDTree(peaks[:, ::-1].astype(float)).query_ball_point(np.column_stack([xs, ys]), r_max)
            crowd = np.array([sum(1 for j in nb if abs(peaks[j, 0] - y) + abs(peaks[j, 1] - x) > 2)
                              for nb, y, x in zip(near, ys, xs)], int)
            use &= crowd == 0
        ys, xs = ys[use], xs[use]
        amp = self._peak_amplitudes(model, ys, xs)
        prof = sr.mismatch_profile(resid.image, resid.variance, np.column_stack([ys, xs]), amp, r_max,
                                   extra_variance=extra, model=model, sigma_flux=flux, kernel=kernel,
                                   corr_area=2.0 * np.pi * sigma * sigma,
                                   bad=resid.mask.get(self._STAR_BAD_PLANES, ignore_missing=True),
                                   exclude_points=self._unrelated_peaks(resid, peaks),
                                   exclude_radius=1.2 * fwhm)
        self.metadata[f"{prefix}ResidualProfileNStars"] = int(ys.size)
        self.metadata[f"{prefix}ResidualProfilePeak"] = float(np.sqrt(prof.max())) if prof.size else 0.0
        if not np.any(prof > 0):
            return extra
        # A PSF mismatch leaves (mismatch ⊗ source): as much as a star of the same peak on a point source,
        # less on an extended one. Each peak counts with its point-like amplitude, the part of its peak that its
        # curvature accounts for, relative to the stars' (a galaxy's nucleus is flatter than a star).
        peak_amp = self._peak_amplitudes(model, peaks[:, 0], peaks[:, 1])
        curv = self._peak_curvature(model, peaks[:, 0], peaks[:, 1]) / np.where(peak_amp > 0, peak_amp, np.inf)
        star_curv = self._peak_curvature(model, ys, xs) / np.where(amp > 0, amp, np.inf)
        star_curv = float(np.median(star_curv[star_curv > 0])) if np.any(star_curv > 0) else 0.0
        if star_curv > 0:
            peak_amp = peak_amp * np.clip(curv / star_curv, 0.0, 1.0)
        more = sr.mismatch_variance(model.shape, peaks, peak_amp, prof)
        if more is None:
            return extra
        self.log.info("Static-star residual profile %s(%d stars): rms up to %.2g of the star's peak within %d px, "
                      "added around %d bright static sources.", "in the score " if prefix == "score" else "",
                      ys.size, float(np.sqrt(prof.max())), r_max, len(peaks))
        return more if extra is None else extra + more

    def _unrelated_peaks(self, image, static_peaks):
        """``(y, x)`` (pixel indices of ``image``) of the science detections' significant peaks that are not
        bright static peaks — transients, variables, faint stars and galaxies — or None when the science was
        not detected here (an LSST exposure arrives with its own DETECTED plane). Their light in a star's rings
        is not the star's residual; with a broad PSF (FWHM 10 px) one star's stamp in three holds some."""
        sources = getattr(self, "_science_sources", None)
        if not sources:
            return None
        from scipy.spatial import cKDTree

        from ..sources import significant_peaks

        pts = np.array(sorted((y - image.xy0[1], x - image.xy0[0]) for x, y in significant_peaks(sources)),
                       float).reshape(-1, 2)
        if static_peaks is not None and len(static_peaks) and len(pts):
            d, _ = cKDTree(np.asarray(static_peaks, float)).query(pts)
            pts = pts[d > 2.0]
        return pts

    @staticmethod
    def _peak_curvature(model, ys, xs):
        """Minus the 5-point Laplacian of ``model`` at each (y, x) (clipped to the image): large and positive at
        a sharp peak."""
        m = np.asarray(model, np.float64)
        ny, nx = m.shape
        ys, xs = np.clip(np.asarray(ys, int), 1, ny - 2), np.clip(np.asarray(xs, int), 1, nx - 2)
        return 4.0 * m[ys, xs] - m[ys - 1, xs] - m[ys + 1, xs] - m[ys, xs - 1] - m[ys, xs + 1]

    @staticmethod
    def _peak_amplitudes(model, ys, xs):
        """Largest value of ``model`` in the 3 × 3 box around each (y, x) (clipped to the image)."""
        m = np.asarray(model)
        ny, nx = m.shape
        ys, xs = np.asarray(ys, int), np.asarray(xs, int)
        out = np.full(ys.size, -np.inf)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                out = np.maximum(out, m[np.clip(ys + dy, 0, ny - 1), np.clip(xs + dx, 0, nx - 1)])
        return out

    #: Pixels of the detection image where static stars are neither fitted nor looked for.
    _STAR_BAD_PLANES = ("BAD", "SAT", "NO_DATA", "EDGE", "SUSPECT")

    @staticmethod
    def _typical_variance(variance) -> float:
        """Median of the finite, positive values of ``variance`` on every 8th pixel (1 if there are none): the
        noise against which static stars' S/N is judged (they are bright; an exact per-pixel noise would only
        move the S/N-50 cut a little)."""
        sample = np.asarray(variance)[::8, ::8]
        sample = sample[np.isfinite(sample) & (sample > 0)]
        return float(np.median(sample)) if sample.size else 1.0

    @staticmethod
    def _static_model(static, det):
        """(background-subtracted image with unusable pixels zeroed, its variance, unusable pixels, ``det``'s
        bad pixels) of the static-sky exposure (the variance plane is shared, not copied)."""
        from ..background import estimate_background

        bad = det.mask.get(ImageDifferenceTask._STAR_BAD_PLANES, ignore_missing=True)
        unusable = bad | ~np.isfinite(static.image) | ~(static.variance > 0)
        try:
            bg = estimate_background(static.image, unusable, bin_size=128)
        except Exception:  # tiny images: a median is enough
            bg = np.float32(np.median(static.image[~unusable])) if (~unusable).any() else np.float32(0.0)
        model = np.subtract(static.image, bg, dtype=np.float32)
        model[unusable] = 0.0
        return model, static.variance, unusable, bad

    def _fit_star_residuals(self, static, det, k, fwhm):
        """(σ_shift, σ_flux, σ_width, number of stars, smoothed static model, per-star fits, bright peaks) fitted
        on ``det`` with ``static`` as the static-sky model (see :meth:`_star_residual_variance`). ``k``: the
        detection smoothing kernel (None: ``det`` is not smoothed for detection, e.g. a score, and stars are
        found on the model itself). The last two are for the mismatch profile: the fits' stars (with their
        outlier flags) and the ``(y, x)`` of every peak of the smoothed model at S/N ≥ 50, isolated or not."""
        from .. import star_residuals as sr
        from ..detection import correlate_separable

        model, model_var, unusable, bad = self._static_model(static, det)
        # Stars: S/N of the smoothed model against the typical (median) noise.
        v_typ = self._typical_variance(model_var)
        if k is not None:
            model_s = correlate_separable(model, k, threads=2)
            v_s = v_typ * float(np.sum(k * k)) ** 2
        else:
            model_s, v_s = model, v_typ
        peaks = sr.bright_star_positions(model_s, np.float32(v_s), bad=bad, isolation=0, max_stars=1_000_000)
        stars = sr.isolated_peaks(peaks, int(np.ceil(3 * fwhm)), max_stars=300)
        sky = ~(unusable | det.mask.get(["DETECTED", "DETECTED_NEGATIVE", "CR", "INTRP"], ignore_missing=True))
        sky &= ~static.mask.get(["DETECTED"], ignore_missing=True)
        beta, beta_lap, lam_lap = sr.shared_noise_slope(det.image, model, model_var, sky)
        del sky
        self.metadata["starResidualSharedNoise"] = beta
        res = sr.fit_star_residuals(det.image, det.variance, model, stars, radius=max(3, int(round(1.5 * fwhm))),
                                    bad=bad, max_bad_fraction=0.0, model_variance=model_var,
                                    shared=(beta, beta_lap, lam_lap))
        res = sr.residual_scatter(res)
        return (float(res.sigma_shift), float(res.sigma_flux), float(res.sigma_width), int(res.x.size), model_s,
                res, peaks)

    @staticmethod
    def _force_sky_positions(columns, diffExp, footprints, is_sky):
        """Sky sources are measured at their chosen positions: a centroid would wander to the nearest positive
        noise fluctuation and bias their fluxes high (their purpose is an unbiased noise sample)."""
        from ..measure.aperture import aperture_flux
        from ..measure.psf_flux import psf_flux

        idx = np.nonzero(is_sky)[0]
        x = np.array([footprints[i].peaks[0].x for i in idx], float)
        y = np.array([footprints[i].peaks[0].y for i in idx], float)
        mi = diffExp.masked_image
        pf = psf_flux(mi.image, mi.variance, mi.mask.array, diffExp.require_psf(), x, y, 0, xy0=mi.xy0)
        ap = aperture_flux(mi.image, mi.variance, x, y, 12.0, xy0=mi.xy0)
        updates = {"x": x, "y": y, "xErr": np.zeros_like(x), "yErr": np.zeros_like(x),
                   "psfFlux": pf.flux, "psfFluxErr": pf.flux_err, "psfChi2": pf.chi2, "psfNdata": pf.npix,
                   "psfFlux_flag": pf.flag, "psfFlux_flag_edge": pf.flag_edge,
                   "psfFlux_flag_noGoodPixels": pf.flag_noGoodPixels,
                   "apFlux": ap.flux, "apFluxErr": ap.flux_err, "apFlux_flag": ap.flag}
        for key, val in updates.items():
            if key in columns:
                col = np.array(columns[key], copy=True)
                col[idx] = val
                columns[key] = col

    def _measure_ap_corr(self, science):
        """Aperture corrections of PSF fluxes measured on the science stars (when none are supplied).

        They bring PSF fluxes to totals (the 12-px aperture fluxes divided by the PSF model's encircled energy):
        the science's photometric calibration here is not tied to a 12-px aperture, as an LSST calibration and
        the apCorrMap that comes with it are."""
        from ..measure.apcorr import isolated_from_peaks, measure_ap_corr
        from ..sources import detect_and_measure_sources

        try:
            work = self._sky_subtracted(science)
            # Only stars with S/N ≥ 50 enter the fit, so only bright detections are measured.
            sources = detect_and_measure_sources(science, work=work, min_significance=30.0,
                                                 footprints=getattr(self, "_science_sources", None))
            stars = self.sourceSelector.run(sources, exposure=science).sourceCat
            # Isolation from every detected source, not only from other stars: a neighbour inside the 12-px
            # aperture biases the ratio high.
            if len(stars) and len(sources.meta["all_x"]) > 1:
                stars = stars[isolated_from_peaks(
                    work.image, work.variance, work.mask.array, science.require_psf(),
                    np.asarray(stars["x"], float), np.asarray(stars["y"], float),
                    np.asarray(stars["base_PsfFlux_instFlux"], float), sources.meta["all_x"], sources.meta["all_y"],
                    xy0=work.xy0)]
            res = measure_ap_corr(work.image, work.variance, work.mask.array, science.require_psf(),
                                  np.asarray(stars["x"], float), np.asarray(stars["y"], float), bbox=science.bbox,
                                  xy0=science.xy0, bad_mask=science.mask.bitmask(
                                      ["BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP"], ignore_missing=True),
                                  to_total=True)
        except Exception as exc:  # too few stars: no correction, each source gets flag_apCorr
            self.log.warning("Aperture corrections not measured: %s", exc)
            return None
        self.metadata["apCorrNStars"] = int(np.sum(res.used))
        self.metadata["apCorrValue"] = float(res.value)
        return res.ap_corr_map

    def _match_sources(self, table, science, selectSources):
        """Match DIA sources to the science sources (srcMatchId) and the reference catalogue (refMatchId)."""
        from ..sources import detect_and_measure_sources as detect_stars
        from ..warp.matching import match_dia_sources
        from .ref_obj_loader import load_reference_catalog

        cfg = self.config
        scale = science.pixel_scale() or 1.0
        src = selectSources if selectSources is not None else detect_stars(science)
        ids = np.asarray(src["id"]) if "id" in src.colnames else np.arange(len(src))
        idx, _ = match_dia_sources(np.column_stack([table["x"], table["y"]]),
                                   np.column_stack([np.asarray(src["x"], float), np.asarray(src["y"], float)]),
                                   cfg.diaSourceMatchRadius, pixel_scale=scale)
        table["srcMatchId"] = np.where(idx >= 0, ids[np.clip(idx, 0, None)], -1)
        if cfg.refObjLoader.filename and science.wcs is not None:
            ref = load_reference_catalog(cfg.refObjLoader, science)
            rx, ry = science.sky_to_pixel(np.asarray(ref[cfg.refObjLoader.raColumn], float),
                                          np.asarray(ref[cfg.refObjLoader.decColumn], float))
            rids = np.asarray(ref["id"]) if "id" in ref.colnames else np.arange(len(ref))
            idx, _ = match_dia_sources(np.column_stack([table["x"], table["y"]]), np.column_stack([rx, ry]),
                                       cfg.diaSourceMatchRadius, pixel_scale=scale)
            table["refMatchId"] = np.where(idx >= 0, rids[np.clip(idx, 0, None)], -1)
        self.metadata["nSrcMatches"] = int((np.asarray(table["srcMatchId"]) >= 0).sum())

    def _count_metadata(self, table) -> None:
        sky = np.asarray(table["sky_source"], bool) if "sky_source" in table.colnames else np.zeros(len(table), bool)
        neg = np.asarray(table["isNegative"], bool) if "isNegative" in table.colnames else np.zeros(len(table), bool)
        dip = np.asarray(table["isDipole"], bool) if "isDipole" in table.colnames else np.zeros(len(table), bool)
        real = ~sky
        self.metadata["counts"] = {
            "nDiaSources": int(real.sum()), "nPositive": int((real & ~neg & ~dip).sum()),
            "nNegative": int((real & neg & ~dip).sum()), "nDipoles": int((real & dip).sum()),
            "nSkySources": int(sky.sum()),
        }

    def _quality_metadata(self, diff) -> None:
        """Noise ratio of the difference on unmasked, undetected pixels (robust std of D/σ)."""
        if diff is None:
            return
        bad = diff.mask.get(["NO_DATA", "BAD", "SAT", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "CR", "SUSPECT"],
                            ignore_missing=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = diff.image[~bad] / np.sqrt(diff.variance[~bad])
        z = z[np.isfinite(z)]
        if z.size > 100:
            med = float(np.median(z))
            self.metadata["quality"] = {"noiseRatio": float(1.4826 * np.median(np.abs(z - med))), "medianSnr": med,
                                        "nPixels": int(z.size)}


def _reference_colour(ref, name):
    """g−r colour of reference objects: ``g_mag``/``r_mag`` (or ``g``/``r``) magnitudes, or ``g_flux``/``r_flux``."""
    for g, r in (("g_mag", "r_mag"), ("gmag", "rmag"), ("g", "r")):
        if g in ref.colnames and r in ref.colnames:
            return np.asarray(ref[g], float) - np.asarray(ref[r], float)
    if "g_flux" in ref.colnames and "r_flux" in ref.colnames:
        with np.errstate(divide="ignore", invalid="ignore"):
            return -2.5 * np.log10(np.asarray(ref["g_flux"], float) / np.asarray(ref["r_flux"], float))
    raise BadInputError(f"doSelectDcrCatalog needs g and r magnitudes (g_mag, r_mag) or fluxes (g_flux, r_flux) in "
                        f"the reference catalogue {name!r}.")


def _preconvolved_psf(psf, pre_kernel, pos):
    """PSF of an image convolved with ``pre_kernel`` (a correlation kernel: the convolution is with its flip),
    varying across the field as ``psf`` does."""
    from ..model.psf import ConvolvedPsf

    return ConvolvedPsf(psf, pre_kernel[::-1, ::-1], average_position=pos)
