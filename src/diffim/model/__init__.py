"""The diffim data model: boxes, mask planes, masked images, exposures, PSFs and photometric calibrations."""

from .box import Box
from .mask import Mask, DEFAULT_MASK_PLANES
from .calib import PhotoCalib, VisitInfo
from .psf import Psf, GaussianPsf, ImagePsf
from .exposure import MaskedImage, Exposure

__all__ = [
    "Box",
    "Mask",
    "DEFAULT_MASK_PLANES",
    "PhotoCalib",
    "VisitInfo",
    "Psf",
    "GaussianPsf",
    "ImagePsf",
    "MaskedImage",
    "Exposure",
]
