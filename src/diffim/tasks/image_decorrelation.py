"""Decorrelation tasks: ``DecorrelateALKernelTask`` and ``DecorrelateALKernelSpatialTask`` (LSST ip_diffim).

Thin wrappers around :mod:`diffim.decorrelation`: they pick the kernel at the difference's centre, measure the
clipped-mean variances of science and template (ignoring ``ignoreMaskPlanes``), decorrelate the difference
**in place** (LSST writes into the subtracted exposure) and replace its PSF by the decorrelated PSF as a
constant :class:`~diffim.model.ImagePsf` (old ``ImageDifferenceTask``: "If True, also update the diffim PSF").
``run`` returns ``Struct(correctedExposure=<the same exposure>)``.
"""

from __future__ import annotations

from typing import Any

import lsst.pex.config as pexConfig
import numpy as np

from ..decorrelation import decorrelate, decorrelate_spatial, kernel_image_at, spatial_decorrelation_nodes
from ..model import Exposure, ImagePsf
from ..model.psf import FWHM_PER_SIGMA
from ..statistics import clipped_mean
from .base import Struct, Task, timeMethod

__all__ = [
    "DecorrelateALKernelConfig",
    "DecorrelateALKernelTask",
    "DecorrelateALKernelMapReduceConfig",
    "DecorrelateALKernelSpatialConfig",
    "DecorrelateALKernelSpatialTask",
]

_IGNORE = ["INTRP", "EDGE", "DETECTED", "SAT", "CR", "BAD", "NO_DATA", "DETECTED_NEGATIVE"]


class DecorrelateALKernelConfig(pexConfig.Config):
    """Configuration of :class:`DecorrelateALKernelTask` (LSST names and defaults)."""

    ignoreMaskPlanes = pexConfig.ListField(
        dtype=str, default=list(_IGNORE), doc="Mask planes to ignore for sigma-clipped statistics"
    )
    completeVarPlanePropagation = pexConfig.Field(
        dtype=bool, default=False,
        doc="Compute the full effect of the decorrelated matching kernel on the variance plane. "
        "Otherwise use a model weighed sum of the input variances.",
    )


#: Variance planes larger than this many pixels are sampled on a regular grid for the clipped mean (below).
_MAX_STAT_PIXELS = 8_000_000


def _variance_mean(exposure: Exposure, planes: list[str]) -> float:
    """MEANCLIP of the variance plane ignoring ``planes``; on a regular every-k-th-pixel grid for large planes.

    The decorrelation filter only needs the mean variances to ~1e-3; a 4096² plane sampled every 3rd pixel
    along both axes still has ~1.9·10⁶ values, whose clipped mean differs from the full one by ~1e-5
    (relative) for a smooth sky variance, at a ninth of the cost.
    """
    var = exposure.variance
    stride = 1
    if var.size > _MAX_STAT_PIXELS:
        stride = int(np.ceil(np.sqrt(var.size / (_MAX_STAT_PIXELS / 4))))
    bad = exposure.mask.get(list(planes), ignore_missing=True)
    if stride > 1:
        return clipped_mean(var[::stride, ::stride], bad[::stride, ::stride])
    return clipped_mean(var, bad)


def _kernel_array(kernel: Any, x: float, y: float) -> np.ndarray | None:
    if kernel is None:
        return None
    if hasattr(kernel, "compute_kernel_image"):  # a Psf: use it at its average position, as LSST does
        return np.asarray(kernel.compute_kernel_image(), dtype=np.float64)
    return kernel_image_at(kernel, x, y)


def _variance_on(exposure: Exposure, bbox) -> np.ndarray | None:
    """The exposure's variance plane on ``bbox`` (None if it does not cover it)."""
    if exposure.bbox.contains(bbox):
        return exposure[bbox].variance
    return None


#: Mask planes of pixels that hold no valid difference; their values are not filtered (see ``decorrelate``'s
#: ``invalid``: a border of them is mirrored from the interior, others are set to the background level).
FILTER_EXCLUDED_PLANES = ("EDGE", "NO_DATA")

#: Planes of the *unconvolved* image whose pixels are also left out. The matching convolution replaces such
#: pixels of the image it convolves by the background level (:data:`diffim.convolve.DEFAULT_FILL_PLANES`), but the
#: other image enters the difference as it is: a bad column keeps its garbage (+1000 counts in the simulator),
#: and the filter's negative side lobes turned it into a trough of −2σ pixels a few pixels either side, detected
#: as a negative source beside the column (measured on a sky-50 scene). Only the flagged pixels themselves are
#: excluded: the image's BAD plane is not grown, unlike the convolved image's (OR-ed over the kernel box), whose
#: values are sane and must stay.
UNCONVOLVED_EXCLUDED_PLANES = ("BAD",)


def _invalid_pixels(exposure: Exposure, unconvolved: Exposure | None = None) -> np.ndarray | None:
    """Pixels left out of the decorrelation filter, or None if there are none: those of ``exposure`` with a
    :data:`FILTER_EXCLUDED_PLANES` bit and, given the image that entered the difference unconvolved, those with a
    :data:`UNCONVOLVED_EXCLUDED_PLANES` bit there."""
    bad = exposure.mask.get(list(FILTER_EXCLUDED_PLANES), ignore_missing=True)
    if unconvolved is not None and unconvolved.bbox.contains(exposure.bbox):
        bad = bad | unconvolved[exposure.bbox].mask.get(list(UNCONVOLVED_EXCLUDED_PLANES), ignore_missing=True)
    return bad if bad.any() else None


def _unconvolved(science: Exposure, template: Exposure, template_matched: bool, pre_conv_mode: bool):
    """The image that entered the difference as it is (None for a pre-convolution score: both were convolved)."""
    if pre_conv_mode:
        return None
    return science if template_matched else template


def _diff_psf(subtracted: Exposure, science: Exposure, template: Exposure, template_matched: bool):
    if subtracted.psf is not None:
        return subtracted.psf
    return science.psf if template_matched else template.psf


class DecorrelateALKernelTask(Task):
    """Decorrelate a difference image with the PSF-matching kernel at its centre (DMTN-021)."""

    ConfigClass = DecorrelateALKernelConfig
    _DefaultName = "ip_diffim_decorrelateALKernel"

    def computeVarianceMean(self, exposure: Exposure) -> float:
        """MEANCLIP (3σ, 3 iterations) of the variance plane, ignoring ``ignoreMaskPlanes``."""
        return _variance_mean(exposure, list(self.config.ignoreMaskPlanes))

    @timeMethod
    def run(
        self,
        scienceExposure: Exposure,
        templateExposure: Exposure,
        subtractedExposure: Exposure,
        psfMatchingKernel: Any,
        preConvKernel: Any = None,
        xcen: float | None = None,
        ycen: float | None = None,
        svar: float | None = None,
        tvar: float | None = None,
        templateMatched: bool = True,
        preConvMode: bool = False,
        **kwargs: Any,
    ) -> Struct:
        """Decorrelate ``subtractedExposure`` in place; returns ``Struct(correctedExposure=subtractedExposure)``.

        ``psfMatchingKernel`` is a kernel array or an object with ``kernel_image(x, y)``; ``preConvKernel`` an
        array or a PSF (used at its average position); it is only applied when ``preConvMode`` is True.
        """
        bbox = subtractedExposure.bbox
        if xcen is None:
            xcen = (bbox.x0 + bbox.x1) / 2.0
        if ycen is None:
            ycen = (bbox.y0 + bbox.y1) / 2.0
        kappa = kernel_image_at(psfMatchingKernel, xcen, ycen)
        preconv = _kernel_array(preConvKernel, xcen, ycen) if preConvMode else None
        if preConvMode and preconv is None:
            self.log.warning("preConvMode=True without a preConvKernel: decorrelating as a plain difference.")
        if svar is None:
            svar = self.computeVarianceMean(scienceExposure)
        if tvar is None:
            tvar = self.computeVarianceMean(templateExposure)
        self.log.info("Original variance plane means: %f, %f", svar, tvar)
        self.metadata["svar"], self.metadata["tvar"] = float(svar), float(tvar)
        if not (np.isfinite(svar) and np.isfinite(tvar)):
            if np.all(np.isnan(scienceExposure.image)) or np.all(np.isnan(templateExposure.image)):
                self.log.warning("Template or science image is entirely NaN: skipping decorrelation.")
                return Struct(correctedExposure=subtractedExposure)
            # Every pixel masked: fall back to the plain median of the finite variance.
            svar = svar if np.isfinite(svar) else float(np.nanmedian(scienceExposure.variance))
            tvar = tvar if np.isfinite(tvar) else float(np.nanmedian(templateExposure.variance))
            self.log.warning("Variance clipped mean undefined (all pixels masked); using medians %f, %f.", svar, tvar)

        psf = _diff_psf(subtractedExposure, scienceExposure, templateExposure, templateMatched)
        psf_img = psf.compute_kernel_image(xcen, ycen) if psf is not None else None
        image, variance, psf_dec = decorrelate(
            subtractedExposure.image,
            subtractedExposure.variance,
            kappa,
            svar,
            tvar,
            template_matched=templateMatched,
            preconv_kernel=preconv,
            psf_image=psf_img,
            science_variance=_variance_on(scienceExposure, bbox),
            template_variance=_variance_on(templateExposure, bbox),
            complete_variance=self.config.completeVarPlanePropagation,
            kernel_at=psfMatchingKernel if hasattr(psfMatchingKernel, "kernel_image") else None,
            origin=(bbox.x0, bbox.y0),
            invalid=_invalid_pixels(subtractedExposure, _unconvolved(scienceExposure, templateExposure,
                                                                     templateMatched, preConvMode)),
        )
        subtractedExposure.image[...] = image
        subtractedExposure.variance[...] = variance
        if psf_dec is not None:
            avg = psf._average_position if psf is not None else None
            subtractedExposure.psf = ImagePsf(psf_dec, average_position=avg if avg is not None else (xcen, ycen))
        return Struct(correctedExposure=subtractedExposure)


class DecorrelateALKernelMapReduceConfig(pexConfig.Config):
    """Grid of the spatially varying decorrelation (names of LSST's ``ImageMapReduceConfig``).

    Here ``gridStepX/Y`` is the spacing of the nodes where the filter is evaluated (the filter is interpolated
    bilinearly in between), ``cellSize`` the window of the local variance statistics and ``borderSize`` the
    minimum margin of real pixels around each filtered rectangle; all in units of the PSF FWHM if
    ``scaleByFwhm``.
    """

    cellSize = pexConfig.Field(dtype=float, default=41.0, doc="Local-statistics window (FWHM units if scaled)")
    gridStepX = pexConfig.Field(dtype=float, default=40.0, doc="Node spacing in x (FWHM units if scaled)")
    gridStepY = pexConfig.Field(dtype=float, default=40.0, doc="Node spacing in y (FWHM units if scaled)")
    borderSize = pexConfig.Field(dtype=float, default=8.0, doc="Minimum filter border (FWHM units if scaled)")
    scaleByFwhm = pexConfig.Field(dtype=bool, default=True, doc="Scale the sizes above by the PSF FWHM")
    minGridStep = pexConfig.Field(
        dtype=int, default=512,
        doc="Smallest node spacing in pixels (not an LSST field). The filter is interpolated bilinearly between "
        "nodes, which follows the low-order polynomial variation of AL kernels far more closely than LSST's "
        "piecewise-constant cells, so nodes can be sparser; the cost is ~(1 + 2·border/spacing)² × 5 FFTs "
        "of the image.",
    )


class DecorrelateALKernelSpatialConfig(pexConfig.Config):
    """Configuration of :class:`DecorrelateALKernelSpatialTask`."""

    decorrelateConfig = pexConfig.ConfigField(
        dtype=DecorrelateALKernelConfig, doc="DecorrelateALKernel config to use when running on complete exposure"
    )
    decorrelateMapReduceConfig = pexConfig.ConfigField(
        dtype=DecorrelateALKernelMapReduceConfig, doc="Grid config for the spatially varying decorrelation"
    )
    ignoreMaskPlanes = pexConfig.ListField(
        dtype=str, default=list(_IGNORE), doc="Mask planes to ignore for sigma-clipped statistics"
    )


class DecorrelateALKernelSpatialTask(Task):
    """Decorrelate a difference image, optionally with a filter that varies across the image.

    ``spatiallyVarying=False`` runs :class:`DecorrelateALKernelTask` on the whole image. ``True`` evaluates the
    filter on a grid of nodes (local kernel, local clipped-mean variances) and blends bilinearly in between
    (:func:`diffim.decorrelation.decorrelate_spatial`); the variance plane then always uses the Parseval
    factors (``completeVarPlanePropagation`` applies to the whole-image mode only) and the PSF set on the
    exposure is the decorrelated PSF at the image centre. ``run`` returns
    ``Struct(correctedExposure, decorrelationNodes)``, the latter the filter grid
    (:class:`~diffim.decorrelation.DecorrelationNodes`, None for a whole-image filter) from which
    :class:`~diffim.decorrelated_psf.DecorrelatedPsf` gives the PSF at any position.
    """

    ConfigClass = DecorrelateALKernelSpatialConfig
    _DefaultName = "ip_diffim_decorrelateALKernelSpatial"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decorrelate = DecorrelateALKernelTask(self.config.decorrelateConfig, name="decorrelate",
                                                   parentTask=self)

    def computeVarianceMean(self, exposure: Exposure) -> float:
        return _variance_mean(exposure, list(self.config.ignoreMaskPlanes))

    @timeMethod
    def run(
        self,
        scienceExposure: Exposure,
        templateExposure: Exposure,
        subtractedExposure: Exposure,
        psfMatchingKernel: Any,
        spatiallyVarying: bool = False,
        preConvKernel: Any = None,
        templateMatched: bool = True,
        preConvMode: bool = False,
        **kwargs: Any,
    ) -> Struct:
        """Decorrelate ``subtractedExposure`` in place; returns ``Struct(correctedExposure=subtractedExposure)``."""
        svar = self.computeVarianceMean(scienceExposure)
        tvar = self.computeVarianceMean(templateExposure)
        if not spatiallyVarying or not (np.isfinite(svar) and np.isfinite(tvar)):
            res = self.decorrelate.run(
                scienceExposure, templateExposure, subtractedExposure, psfMatchingKernel,
                preConvKernel=preConvKernel, svar=svar, tvar=tvar,
                templateMatched=templateMatched, preConvMode=preConvMode,
            )
            return Struct(correctedExposure=res.correctedExposure, decorrelationNodes=None)
        bbox = subtractedExposure.bbox
        xcen, ycen = (bbox.x0 + bbox.x1) / 2.0, (bbox.y0 + bbox.y1) / 2.0
        psf = _diff_psf(subtractedExposure, scienceExposure, templateExposure, templateMatched)
        mr = self.config.decorrelateMapReduceConfig
        scale = 1.0
        if mr.scaleByFwhm and psf is not None:
            scale = FWHM_PER_SIGMA * psf.determinant_radius(xcen, ycen)
        step = max(int(mr.minGridStep), int(round(max(mr.gridStepX, mr.gridStepY) * scale)))
        cell = int(round(mr.cellSize * scale))
        kappa = kernel_image_at(psfMatchingKernel, xcen, ycen)
        border = max(int(round(mr.borderSize * scale)), 2 * max(kappa.shape))
        planes = list(self.config.ignoreMaskPlanes)

        def plane(exp: Exposure):
            if exp.bbox.contains(bbox):
                sub = exp[bbox]
                return sub.variance, sub.mask.get(planes, ignore_missing=True)
            return None, None

        sv_plane, s_ign = plane(scienceExposure)
        tv_plane, t_ign = plane(templateExposure)
        if sv_plane is None or tv_plane is None:  # inputs do not cover the difference: global statistics
            sv_plane, s_ign, tv_plane, t_ign = svar, None, tvar, None
        preconv = _kernel_array(preConvKernel, xcen, ycen) if preConvMode else None
        self.log.info("Spatially varying decorrelation: node spacing %d px, statistics window %d px, border %d px",
                      step, cell, border)
        nodes = spatial_decorrelation_nodes(psfMatchingKernel, sv_plane, tv_plane, subtractedExposure.image.shape,
                                            xy0=subtractedExposure.xy0, cell_step=step, cell_size=cell,
                                            science_ignore=s_ign, template_ignore=t_ign)
        image, variance, psf_dec = decorrelate_spatial(
            subtractedExposure.image,
            subtractedExposure.variance,
            psfMatchingKernel,
            sv_plane,
            tv_plane,
            science_ignore=s_ign,
            template_ignore=t_ign,
            template_matched=templateMatched,
            preconv_kernel=preconv,
            psf_image=(lambda x, y: psf.compute_kernel_image(x, y)) if psf is not None else None,
            xy0=subtractedExposure.xy0,
            cell_step=step,
            cell_size=cell,
            border=border,
            invalid=_invalid_pixels(subtractedExposure, _unconvolved(scienceExposure, templateExposure,
                                                                     templateMatched, preConvMode)),
            nodes=nodes,
        )
        subtractedExposure.image[...] = image
        subtractedExposure.variance[...] = variance
        if psf_dec is not None:
            avg = psf._average_position
            subtractedExposure.psf = ImagePsf(psf_dec, average_position=avg if avg is not None else (xcen, ycen))
        self.metadata["svar"], self.metadata["tvar"] = float(svar), float(tvar)
        return Struct(correctedExposure=subtractedExposure, decorrelationNodes=nodes)
