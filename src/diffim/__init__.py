"""diffim: difference imaging for time-domain astronomy.

A pure-Python (numpy, scipy, astropy, lsst-pex-config) re-implementation of the LSST Science Pipelines'
``ImageDifferenceTask``: PSF matching (Alard–Lupton or ZOGY), subtraction, decorrelation, detection and
measurement of DIA sources. Heavy submodules are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .errors import DiffimError  # noqa: E402
from .model import Box, Exposure, GaussianPsf, ImagePsf, Mask, MaskedImage, PhotoCalib, Psf, VisitInfo  # noqa: E402

_LAZY = {
    "read_exposure": "diffim.io.fits",
    "write_exposure": "diffim.io.fits",
    "ImageDifferenceTask": "diffim.tasks.image_difference",
    "ImageDifferenceConfig": "diffim.tasks.image_difference",
    "run_image_difference": "diffim.tasks.image_difference",
    "sim": "diffim.sim",
    "errors": "diffim.errors",
}

__all__ = [
    "__version__",
    "DiffimError",
    "Box",
    "Exposure",
    "MaskedImage",
    "Mask",
    "Psf",
    "GaussianPsf",
    "ImagePsf",
    "PhotoCalib",
    "VisitInfo",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__ == f"diffim.{name}" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffim' has no attribute {name!r}")
