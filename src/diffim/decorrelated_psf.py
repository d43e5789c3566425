"""The PSF of a decorrelated difference image, evaluated wherever it is asked for.

Decorrelation filters the difference with φ (DMTN-021), so its PSF is ``φ ⊗ P(x, y)`` where ``P`` is the
PSF of the image that was not convolved (the science PSF when the template was matched). ``P`` may vary across
the field; a single PSF image at the centre (what LSST's 2023 task stored) is wrong elsewhere by as much as the
PSF varies. :class:`DecorrelatedPsf` keeps the underlying model and applies φ on demand, caching kernel images
on a coarse grid of positions.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .decorrelation import decorrelate_psf
from .errors import PsfError
from .model.psf import Psf, psf_type_registry, register_psf_type

__all__ = ["DecorrelatedPsf"]


@register_psf_type
class DecorrelatedPsf(Psf):
    """``φ ⊗ base`` with φ the AL decorrelation filter of a matching kernel and two variances.

    Parameters
    ----------
    base
        PSF of the un-convolved image (spatially varying or not).
    kernel_image
        PSF-matching kernel image κ used to build φ (at the image centre).
    svar, tvar
        Mean variances of the science and the (un-convolved) template.
    template_matched
        True if the template was convolved.
    preconv_kernel
        Pre-convolution kernel (score-image mode), or None.
    cache_step
        Kernel images are computed at positions rounded to this many pixels (the PSF varies slowly).
    """

    psf_type = "DECORRELATED"

    def __init__(self, base: Psf, kernel_image: np.ndarray, svar: float, tvar: float, *,
                 template_matched: bool = True, preconv_kernel: np.ndarray | None = None,
                 cache_step: float = 32.0) -> None:
        super().__init__(base._average_position)
        self.base = base
        self.kernel = np.asarray(kernel_image, dtype=float)
        self.svar = float(svar)
        self.tvar = float(tvar)
        self.template_matched = bool(template_matched)
        self.preconv_kernel = None if preconv_kernel is None else np.asarray(preconv_kernel, dtype=float)
        self.cache_step = float(cache_step)
        self._cached = lru_cache(maxsize=4096)(self._compute)

    def _compute(self, x: float, y: float) -> np.ndarray:
        img = decorrelate_psf(self.base.compute_kernel_image(x, y), self.kernel, self.svar, self.tvar,
                              template_matched=self.template_matched, preconv_kernel=self.preconv_kernel)
        img.setflags(write=False)
        return img

    def _kernel_image(self, x: float, y: float) -> np.ndarray:
        s = self.cache_step
        if s > 0:
            x, y = s * math.floor(x / s + 0.5), s * math.floor(y / s + 0.5)
        return self._cached(float(x), float(y))

    def to_fits_hdus(self) -> list:
        from astropy.io import fits

        base_hdus = self.base.to_fits_hdus()
        head = fits.ImageHDU(self.kernel, name="PSF")
        head.header["PSFTYPE"] = self.psf_type
        head.header["SVAR"] = self.svar
        head.header["TVAR"] = self.tvar
        head.header["TMATCHED"] = self.template_matched
        head.header["CACHESTP"] = self.cache_step
        head.header["NBASEHDU"] = len(base_hdus)
        hdus = [head]
        if self.preconv_kernel is not None:
            head.header["HASPRECV"] = True
            hdus.append(fits.ImageHDU(self.preconv_kernel, name="PSF_PRECONV"))
        base_hdus[0].header["NPSFHDU"] = len(base_hdus)
        for h in base_hdus:
            h.name = "PSF_BASE"
        return hdus + base_hdus

    @classmethod
    def from_fits_hdus(cls, hdus: list) -> "DecorrelatedPsf":
        h = hdus[0].header
        i = 1
        pre = None
        if h.get("HASPRECV", False):
            pre = np.asarray(hdus[1].data, float)
            i = 2
        base_hdus = hdus[i : i + int(h["NBASEHDU"])]
        ptype = base_hdus[0].header.get("PSFTYPE")
        registry = psf_type_registry()
        if ptype not in registry:
            raise PsfError(f"unknown base PSFTYPE {ptype!r} in a DECORRELATED PSF")
        base = registry[ptype].from_fits_hdus(base_hdus)
        return cls(base, np.asarray(hdus[0].data, float), h["SVAR"], h["TVAR"], template_matched=bool(h["TMATCHED"]),
                    preconv_kernel=pre, cache_step=float(h.get("CACHESTP", 32.0)))

    def __repr__(self) -> str:
        return f"DecorrelatedPsf(base={self.base!r})"
