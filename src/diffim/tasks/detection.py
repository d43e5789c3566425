"""``SourceDetectionTask``: PSF-smoothed threshold detection of positive and negative sources.

Mirrors ``lsst.meas.algorithms.SourceDetectionTask`` (config names and defaults of the modern stack); the work
is done by :mod:`diffim.detection`. The image-differencing task configures it with ``thresholdPolarity="both"``
and ``reEstimateBackground=False``.
"""

from __future__ import annotations

import numpy as np
import lsst.pex.config as pexConfig

from .. import detection as det
from ..errors import PsfError
from ..model.exposure import Exposure
from .base import Struct, Task, timeMethod

__all__ = ["SourceDetectionConfig", "SourceDetectionTask"]


class SourceDetectionConfig(pexConfig.Config):
    """Configuration of :class:`SourceDetectionTask` (LSST field names and defaults)."""

    minPixels = pexConfig.RangeField(
        dtype=int, default=1, min=0,
        doc="Detected footprints with fewer than this many pixels (before growth) are dropped.",
    )
    isotropicGrow = pexConfig.Field(
        dtype=bool, default=True,
        doc="Grow footprints with a circular (isotropic) stencil; False: Manhattan (|dx| + |dy| ≤ r).",
    )
    combinedGrow = pexConfig.Field(
        dtype=bool, default=True,
        doc="Grow all footprints together and merge those that then overlap or touch.",
    )
    nSigmaToGrow = pexConfig.Field(
        dtype=float, default=2.4,
        doc="Grow footprints by nSigmaToGrow × PSF σ (rounded); 0 disables growth.",
    )
    returnOriginalFootprints = pexConfig.Field(
        dtype=bool, default=False,
        doc="Return the footprints before growth (the DETECTED planes are still set from the grown ones).",
    )
    thresholdValue = pexConfig.RangeField(
        dtype=float, default=5.0, min=0.0,
        doc="Detection threshold, in units of thresholdType.",
    )
    includeThresholdMultiplier = pexConfig.RangeField(
        dtype=float, default=1.0, min=0.0,
        doc="A footprint is kept only if one pixel exceeds thresholdValue × includeThresholdMultiplier.",
    )
    thresholdType = pexConfig.ChoiceField(
        dtype=str, default="pixel_stdev",
        doc="How thresholdValue is interpreted.",
        allowed={
            "variance": "threshold applied to the (smoothed) variance",
            "stdev": "threshold in units of the clipped standard deviation of the smoothed image",
            "value": "threshold in image units",
            "pixel_stdev": "threshold in units of each pixel's own σ (√ of the smoothed variance)",
        },
    )
    thresholdPolarity = pexConfig.ChoiceField(
        dtype=str, default="positive",
        doc="Detect positive sources, negative sources or both.",
        allowed={
            "positive": "detect only positive sources",
            "negative": "detect only negative sources",
            "both": "detect positive and negative sources",
        },
    )
    adjustBackground = pexConfig.Field(
        dtype=float, default=0.0,
        doc="Constant subtracted from the image before detection (a debugging fiddle factor, as LSST).",
    )
    reEstimateBackground = pexConfig.Field(
        dtype=bool, default=True,
        doc="Estimate the background after detection (ignoring detected pixels) and subtract it in place.",
    )
    backgroundBinSize = pexConfig.RangeField(
        dtype=int, default=128, min=8,
        doc="Super-pixel size of the re-estimated background (LSST: background.binSize).",
    )
    doTempLocalBackground = pexConfig.Field(
        dtype=bool, default=True,
        doc="LSST re-detects peaks of multi-peak footprints on a locally background-subtracted image. Accepted "
            "for compatibility; here peaks are always found on the smoothed image itself (on a difference image "
            "the local background is ≈ 0 and the peaks are the same).",
    )
    nPeaksMaxSimple = pexConfig.Field(
        dtype=int, default=1,
        doc="Footprints with more peaks than this would have their peaks re-detected (doTempLocalBackground).",
    )
    doTempWideBackground = pexConfig.Field(
        dtype=bool, default=False,
        doc="Accepted for compatibility; a temporary wide background is not subtracted.",
    )
    nSigmaForKernel = pexConfig.Field(
        dtype=float, default=7.0,
        doc="Width of the smoothing kernel in units of the PSF σ: kw = (int(nSigmaForKernel·σ + 0.5)//2)·2 + 1.",
    )
    statsMask = pexConfig.ListField(
        dtype=str, default=["BAD", "SAT", "EDGE", "NO_DATA"],
        doc="Mask planes ignored when computing the image statistics (thresholdType='stdev').",
    )
    excludeMaskPlanes = pexConfig.ListField(
        dtype=str, default=[],
        doc="Mask planes whose pixels are left out of detection: they add nothing to the smoothed image and "
        "variance (their values are taken as 0) and no detection is made on them.",
    )

    def validate(self) -> None:
        super().validate()
        if self.thresholdType == "variance" and self.thresholdPolarity != "positive":
            raise pexConfig.FieldValidationError(
                SourceDetectionConfig.thresholdPolarity, self,
                "thresholdType='variance' only supports thresholdPolarity='positive'.",
            )


class SourceDetectionTask(Task):
    """Detect sources on an exposure by thresholding its PSF-smoothed image.

    ``run`` (and ``detectFootprints``) clear and set the ``DETECTED`` / ``DETECTED_NEGATIVE`` mask planes of the
    exposure on the grown footprints and set ``EDGE`` on the border of width ``kw//2`` where the smoothing
    kernel does not fit, as LSST does.
    """

    ConfigClass = SourceDetectionConfig
    _DefaultName = "sourceDetection"

    @timeMethod
    def run(self, exposure: Exposure, doSmooth: bool = True, sigma: float | None = None,
            clearMask: bool = True, extraVariance: np.ndarray | None = None,
            extraOffset: np.ndarray | None = None) -> Struct:
        """Detect sources and return them as footprints.

        ``extraVariance`` (diffim extension, not in LSST): variance added to that of the smoothed image before
        thresholding, e.g. what static stars' registration residuals add
        (:func:`diffim.star_residuals.residual_variance`). ``extraOffset`` (diffim extension): subtracted from
        the smoothed image before thresholding, e.g. bright stars' measured halos
        (:func:`diffim.star_residuals.halo_model`).

        Returns
        -------
        Struct
            ``sources`` (negative footprints first, flagged ``is_negative``, then positive), ``positive``,
            ``negative``, ``numPos``, ``numNeg``, ``numPosPeaks``, ``numNegPeaks``, ``smoothed``
            (:class:`diffim.detection.Smoothed`), ``background`` (subtracted array or None), ``sigma``.
        """
        result = self.detectFootprints(exposure, doSmooth=doSmooth, sigma=sigma, clearMask=clearMask,
                                       extraVariance=extraVariance, extraOffset=extraOffset)
        result.sources = list(result.negative) + list(result.positive)
        return result

    @timeMethod
    def detectFootprints(self, exposure: Exposure, doSmooth: bool = True, sigma: float | None = None,
                         clearMask: bool = True, extraVariance: np.ndarray | None = None,
                         extraOffset: np.ndarray | None = None) -> Struct:
        """LSST ``detectFootprints``: smooth, threshold, find peaks, grow, set the mask planes."""
        cfg = self.config
        mask = exposure.mask
        if clearMask:
            mask.clear(["DETECTED", "DETECTED_NEGATIVE"])
        if sigma is None:
            psf = exposure.require_psf()
            sigma = psf.determinant_radius(*exposure.psf_position())
        sigma = float(sigma)
        if not (np.isfinite(sigma) and sigma > 0):
            raise PsfError(
                f"The PSF width at {exposure.psf_position()} is {sigma}; detection needs a finite σ > 0. "
                "Check the exposure's PSF model."
            )
        image = exposure.image
        if cfg.adjustBackground:
            image = image - np.float32(cfg.adjustBackground)
        pos, neg, smoothed, pos_map, neg_map = det.detect_footprints_smoothed(
            image, exposure.variance, mask.array, sigma,
            threshold=cfg.thresholdValue,
            polarity=cfg.thresholdPolarity,
            threshold_type=cfg.thresholdType,
            do_smooth=doSmooth,
            n_sigma_for_kernel=cfg.nSigmaForKernel,
            min_pixels=cfg.minPixels,
            include_threshold_multiplier=cfg.includeThresholdMultiplier,
            n_sigma_to_grow=cfg.nSigmaToGrow,
            isotropic_grow=cfg.isotropicGrow,
            combined_grow=cfg.combinedGrow,
            return_original=cfg.returnOriginalFootprints,
            stats_bits=mask.bitmask(list(cfg.statsMask), ignore_missing=True),
            exclude_bits=mask.bitmask(list(cfg.excludeMaskPlanes), ignore_missing=True),
            xy0=exposure.xy0,
            extra_variance=extraVariance,
            extra_offset=extraOffset,
        )
        self.metadata["doSmooth"] = bool(doSmooth)
        self.metadata["sigma"] = sigma
        if doSmooth:
            self.metadata["smoothingKernelWidth"] = smoothed.kernel_width
            self._set_edge(mask, smoothed.border)
        n_grow = det.n_grow_pixels(sigma, cfg.nSigmaToGrow)
        if cfg.nSigmaToGrow > 0:
            self.metadata["nGrow"] = n_grow
        for plane, where in (("DETECTED", pos_map), ("DETECTED_NEGATIVE", neg_map)):
            np.bitwise_or(mask.array, np.int32(1 << mask.add_plane(plane)), out=mask.array, where=where)

        background = None
        if cfg.reEstimateBackground:
            background = self._reestimate_background(exposure)

        num_pos_peaks = sum(len(fp.peaks) for fp in pos)
        num_neg_peaks = sum(len(fp.peaks) for fp in neg)
        self.metadata["numPos"] = len(pos)
        self.metadata["numNeg"] = len(neg)
        self.metadata["numPosPeaks"] = num_pos_peaks
        self.metadata["numNegPeaks"] = num_neg_peaks
        self.log.info(
            "Detected %d positive peaks in %d footprints and %d negative peaks in %d footprints to %g sigma",
            num_pos_peaks, len(pos), num_neg_peaks, len(neg), cfg.thresholdValue,
        )
        return Struct(
            positive=pos, negative=neg, numPos=len(pos), numNeg=len(neg), numPosPeaks=num_pos_peaks,
            numNegPeaks=num_neg_peaks, smoothed=smoothed, background=background, sigma=sigma, factor=1.0,
        )

    @staticmethod
    def _set_edge(mask, border: int) -> None:
        """Set EDGE on the frame of width ``border`` where the smoothed image is undefined (afw leaves it so)."""
        if border <= 0:
            return
        bit = np.int32(1 << mask.add_plane("EDGE"))
        a = mask.array
        a[:border] |= bit
        a[-border:] |= bit
        a[:, :border] |= bit
        a[:, -border:] |= bit

    def _reestimate_background(self, exposure: Exposure) -> np.ndarray:
        """Mesh background (``backgroundBinSize`` super-pixels, clipped mean, Akima spline) of the exposure
        ignoring detected and bad pixels (LSST ``ignoredPixelMask``), subtracted in place and returned."""
        from ..background import estimate_background

        bad = exposure.mask.get(["BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA"], ignore_missing=True)
        bg = estimate_background(exposure.image, bad, bin_size=self.config.backgroundBinSize)
        exposure.image -= bg
        return bg
