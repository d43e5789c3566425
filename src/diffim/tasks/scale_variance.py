"""``ScaleVarianceTask``: rescale a variance plane to the measured pixel scatter (LSST meas_algorithms)."""

from __future__ import annotations

import lsst.pex.config as pexConfig

from ..model import Exposure, MaskedImage
from ..scale_variance import scale_variance_factor
from .base import Struct, Task, timeMethod

__all__ = ["ScaleVarianceBackgroundConfig", "ScaleVarianceConfig", "ScaleVarianceTask"]

_DEFAULT_PLANES = ["DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA", "INTRP"]

_STATISTICS = {"MEANCLIP": "meanclip", "MEDIAN": "median", "MEAN": "mean"}
_ALGORITHMS = {"AKIMA_SPLINE": "akima", "NATURAL_SPLINE": "cubic", "CUBIC_SPLINE": "cubic", "LINEAR": "linear"}


class ScaleVarianceBackgroundConfig(pexConfig.Config):
    """The subset of LSST ``SubtractBackgroundConfig`` used by :class:`ScaleVarianceTask`."""

    binSize = pexConfig.RangeField(dtype=int, default=32, min=1, doc="Super-pixel size (pixels).")
    statisticsProperty = pexConfig.ChoiceField(
        dtype=str, default="MEANCLIP", doc="Super-pixel statistic.",
        allowed={"MEANCLIP": "clipped mean", "MEDIAN": "median", "MEAN": "mean"},
    )
    algorithm = pexConfig.ChoiceField(
        dtype=str, default="AKIMA_SPLINE", doc="Interpolation between super-pixels.",
        allowed={k: k.lower() for k in _ALGORITHMS},
    )
    useApprox = pexConfig.Field(dtype=bool, default=False, doc="Chebyshev approximation instead of interpolation "
                                "(not used by ScaleVariance; kept for LSST config compatibility).")
    undersampleStyle = pexConfig.Field(dtype=str, default="REDUCE_INTERP_ORDER",
                                       doc="Behaviour with too few super-pixels (only REDUCE_INTERP_ORDER).")
    ignoredPixelMask = pexConfig.ListField(dtype=str, default=list(_DEFAULT_PLANES),
                                           doc="Mask planes ignored when fitting the background.")


class ScaleVarianceConfig(pexConfig.Config):
    """Configuration of :class:`ScaleVarianceTask` (LSST names and defaults)."""

    background = pexConfig.ConfigField(dtype=ScaleVarianceBackgroundConfig, doc="Background subtraction")
    maskPlanes = pexConfig.ListField(dtype=str, default=list(_DEFAULT_PLANES),
                                     doc="Mask planes for pixels to ignore when scaling variance")
    limit = pexConfig.Field(dtype=float, default=10.0, doc="Maximum variance scaling value to permit")


class ScaleVarianceTask(Task):
    """Scale the variance plane of a masked image in place so that it matches the pixel scatter.

    ``run(maskedImage)`` accepts a :class:`~diffim.model.MaskedImage` or an :class:`~diffim.model.Exposure`
    and returns the factor (a float, as LSST does). Mask planes unknown to the image are skipped.
    """

    ConfigClass = ScaleVarianceConfig
    _DefaultName = "scaleVariance"

    @timeMethod
    def run(self, maskedImage: MaskedImage | Exposure, correlationArea: float = 1.0) -> float:
        """Scale the variance in place and return the factor. ``correlationArea`` (diffim extension): the
        image's noise-correlation area in pixels, e.g. ``4πσ²`` for a score image (see
        :func:`diffim.scale_variance.scale_variance_factor`); 1 for white noise, as LSST assumes."""
        mi = maskedImage.masked_image if isinstance(maskedImage, Exposure) else maskedImage
        bad = mi.mask.get(list(self.config.maskPlanes), ignore_missing=True)
        bg = self.config.background
        factor = scale_variance_factor(
            mi.image, mi.variance, bad,
            limit=self.config.limit,
            bin_size=bg.binSize,
            statistic=_STATISTICS[bg.statisticsProperty],
            interp=_ALGORITHMS[bg.algorithm],
            background_bad=mi.mask.get(list(bg.ignoredPixelMask), ignore_missing=True),
            correlation_area=correlationArea,
        )
        self.log.info("Renormalizing variance by %f", factor)
        mi.variance *= factor
        self.metadata["factor"] = factor
        return factor

    def computeScaleFactors(self, maskedImage: MaskedImage | Exposure) -> Struct:
        """Both factors without modifying the image (LSST ``computeScaleFactors``)."""
        from ..scale_variance import _good, image_based_factor, pixel_based_factor

        mi = maskedImage.masked_image if isinstance(maskedImage, Exposure) else maskedImage
        good = _good(mi.image, mi.variance, mi.mask.get(list(self.config.maskPlanes), ignore_missing=True))
        return Struct(pixelFactor=pixel_based_factor(mi.image, mi.variance, good),
                      imageFactor=image_based_factor(mi.image, mi.variance, good))
