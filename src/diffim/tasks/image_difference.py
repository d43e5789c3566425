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
import time
from contextlib import contextmanager

import lsst.pex.config as pexConfig
import numpy as np

from ..errors import ConfigError, InsufficientTemplateCoverageError, MissingPsfError, NoOverlapError
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
from . import zogy as _zogy  # noqa: F401  (registers "zogy" in subtractAlgorithmRegistry)

__all__ = ["ImageDifferenceConfig", "ImageDifferenceTask"]

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

    def setDefaults(self) -> None:
        super().setDefaults()
        # Difference-image detection: both polarities, 5σ per pixel after decorrelation, no background
        # re-estimation (the PSF matching already fitted the differential background).
        self.detection.thresholdPolarity = "both"
        self.detection.thresholdValue = 5.0
        self.detection.thresholdType = "pixel_stdev"
        self.detection.reEstimateBackground = False

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


def template_coverage(science, template) -> float:
    """Fraction of science pixels with usable template data (neither image NO_DATA, template finite)."""
    box = science.bbox.intersection(template.bbox)
    if box.is_empty():
        return 0.0
    t = template[box]
    s = science[box]
    good = ~(t.mask.get("NO_DATA", ignore_missing=True) | s.mask.get("NO_DATA", ignore_missing=True))
    good &= np.isfinite(t.image)
    return float(good.sum()) / float(science.bbox.area)


def same_pixel_grid(science, template) -> bool:
    """True if the template is already on the science pixel grid (same WCS, bbox covering the science)."""
    if not template.bbox.contains(science.bbox):
        return False
    if science.wcs is None or template.wcs is None:
        return True  # nothing to say otherwise: pre-registered inputs without WCS
    x0, y0 = science.bbox.x0, science.bbox.y0
    xs = np.array([x0, x0 + science.width - 1, x0, x0 + science.width - 1, science.bbox.center[0]])
    ys = np.array([y0, y0, y0 + science.height - 1, y0 + science.height - 1, science.bbox.center[1]])
    ra, dec = science.pixel_to_sky(xs, ys)
    tx, ty = template.sky_to_pixel(ra, dec)
    return bool(np.all(np.hypot(tx - xs, ty - ys) < 1e-3))


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
            calexpBackgroundExposure=None, subtractedExposure=None, *, coaddDir=None):
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

        Returns
        -------
        Struct
            ``subtractedExposure``, ``scoreExposure``, ``warpedExposure``, ``matchedExposure``, ``subtractRes``,
            ``diaSources``, ``selectSources``, ``kernelSources``, ``controlSources``.
        """
        if exposure is None:
            from ..errors import BadInputError

            raise BadInputError("ImageDifferenceTask.run needs a science exposure.")
        cfg = self.config
        self.metadata["psfMatchingAlgorithm"] = cfg.subtract.name
        science = exposure
        if cfg.doAddCalexpBackground and calexpBackgroundExposure is not None:
            bg = calexpBackgroundExposure
            bg_image = bg.image if hasattr(bg, "image") else np.asarray(bg)
            science.image += bg_image.astype(np.float32)
        if science.psf is None:
            raise MissingPsfError("The science exposure has no PSF; estimate one (diffim.psf.estimate_psf) first.")

        scoreExposure = matchedExposure = warpedExposure = subtractRes = None
        kernelSources = controlSources = None
        if cfg.doSubtract:
            if templateExposure is None:
                with self._stage("getTemplate"):
                    templateExposure = self.getTemplate.run(science, coaddDir=coaddDir).exposure
            with self._stage("warp"):
                warpedExposure = self._align_template(science, templateExposure, selectSources, templateSources)
            frac = template_coverage(science, warpedExposure)
            self.metadata["templateCoveragePercent"] = 100.0 * frac
            if frac < cfg.requiredTemplateFraction:
                raise InsufficientTemplateCoverageError(
                    f"Template covers {100 * frac:.1f} % of the science image; requiredTemplateFraction="
                    f"{cfg.requiredTemplateFraction}. Provide a larger template or lower requiredTemplateFraction."
                )
            if cfg.doScaleTemplateVariance:
                with self._stage("scaleTemplateVariance"):
                    self.metadata["scaleTemplateVarianceFactor"] = self.scaleVariance.run(warpedExposure.masked_image)
            with self._stage("subtract"):
                if cfg.subtract.name == "zogy":
                    subtractRes = self.subtract.subtractExposures(warpedExposure, science, doWarping=False)
                    subtractedExposure = subtractRes.subtractedExposure
                    scoreExposure = subtractRes.scoreExposure if cfg.useScoreImageDetection else None
                else:
                    if cfg.doSelectSources:
                        kernelSources, controlSources, selectSources = self._select_kernel_sources(
                            science, selectSources)
                    subtractRes = self.subtract.subtractExposures(
                        warpedExposure, science, candidateList=kernelSources, convolveTemplate=cfg.convolveTemplate)
                    subtractedExposure = subtractRes.subtractedExposure
                    matchedExposure = subtractRes.matchedExposure
            if cfg.subtract.name != "zogy" and cfg.doDecorrelation:
                with self._stage("decorrelate"):
                    subtractedExposure = self.decorrelate.run(
                        science, warpedExposure, subtractedExposure, subtractRes.psfMatchingKernel,
                        spatiallyVarying=cfg.doSpatiallyVarying, templateMatched=cfg.convolveTemplate,
                    ).correctedExposure
            if cfg.subtract.name != "zogy" and cfg.useScoreImageDetection:
                with self._stage("scoreImage"):
                    scoreExposure = self._al_score_image(science, warpedExposure, kernelSources)
            if cfg.doAddMetrics:
                with self._stage("kernelMetrics"):
                    self._kernel_metrics(science, warpedExposure, subtractRes, kernelSources, controlSources)
        elif subtractedExposure is None:
            from ..errors import BadInputError

            raise BadInputError("doSubtract=False needs a precomputed subtractedExposure.")

        diaSources = None
        if cfg.doDetection:
            detExp = scoreExposure if (cfg.useScoreImageDetection and scoreExposure is not None) else subtractedExposure
            diaSources = self._detect_and_measure(science, subtractedExposure, detExp, matchedExposure,
                                                  warpedExposure, idFactory, selectSources)
        self._quality_metadata(subtractedExposure)
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
