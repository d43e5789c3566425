"""PSF models: the abstract :class:`Psf` and the two constant models, :class:`GaussianPsf` and :class:`ImagePsf`.

Conventions follow afw's ``Psf``:

* :meth:`Psf.compute_kernel_image` is the PSF at a position, centred on the central pixel of an odd-sized
  square stamp and normalised to unit sum;
* :meth:`Psf.compute_image` is the same image shifted to the sub-pixel position, with the :class:`Box` that
  places it in parent coordinates;
* :meth:`Psf.compute_shape` gives second moments ``(ixx, iyy, ixy)``; determinant radius
  ``(ixx iyy - ixy²)^(1/4)`` and trace radius ``√((ixx + iyy)/2)`` both equal σ for a round Gaussian.

Spatially varying models (pixel basis × polynomial, PSFEx files) live in :mod:`diffim.psf`; they subclass
:class:`Psf` and register for FITS persistence with :func:`register_psf_type`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import lru_cache

import numpy as np

from ..errors import PsfError
from .box import Box

__all__ = [
    "Psf",
    "GaussianPsf",
    "ImagePsf",
    "ConvolvedPsf",
    "FWHM_PER_SIGMA",
    "register_psf_type",
    "psf_type_registry",
    "shift_image",
    "lanczos_weights",
    "kernel_moments",
]

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.35482

_PSF_TYPES: dict[str, type["Psf"]] = {}


def register_psf_type(cls: type["Psf"]) -> type["Psf"]:
    """Class decorator: make a :class:`Psf` subclass readable from FITS by its ``psf_type`` name."""
    _PSF_TYPES[cls.psf_type] = cls
    return cls


def psf_type_registry() -> dict[str, type["Psf"]]:
    """Name → class of every PSF type that can be persisted."""
    return dict(_PSF_TYPES)


# ----------------------------------------------------------------------------------------------------------
# Helpers shared by the PSF classes
# ----------------------------------------------------------------------------------------------------------
def lanczos_weights(offset: float, order: int = 5) -> tuple[np.ndarray, int]:
    """1-D Lanczos interpolation weights for resampling at ``j + offset``.

    Returns ``(w, start)`` such that ``f(j0 + offset) ≈ Σ_k w[k] f(j0 + start + k)``; weights sum to 1.
    """
    base = math.floor(offset)
    frac = offset - base
    ks = np.arange(-order + 1, order + 1)  # taps relative to floor(offset)
    t = ks - frac
    w = np.sinc(t) * np.sinc(t / order)
    w[np.abs(t) >= order] = 0.0
    w /= w.sum()
    return w, base - order + 1


def shift_image(image: np.ndarray, dx: float, dy: float, order: int = 5) -> np.ndarray:
    """Shift an image by ``(dx, dy)`` pixels with separable Lanczos resampling (zero outside the array).

    ``out[i, j] ≈ image(i - dy, j - dx)``: a source at the stamp centre moves to ``centre + (dx, dy)``.
    """
    if dx == 0 and dy == 0:
        return np.array(image, dtype=float, copy=True)
    out = np.asarray(image, dtype=float)
    for axis, d in ((1, dx), (0, dy)):
        if d == 0:
            continue
        w, start = lanczos_weights(-d, order)
        n = out.shape[axis]
        res = np.zeros_like(out)
        for k, wk in enumerate(w):
            s = start + k  # out[j] += w[k] * in[j + s]
            lo, hi = max(0, -s), min(n, n - s)
            if lo >= hi:
                continue
            if axis == 1:
                res[:, lo:hi] += wk * out[:, lo + s : hi + s]
            else:
                res[lo:hi, :] += wk * out[lo + s : hi + s, :]
        out = res
    return out


def kernel_moments(image: np.ndarray, max_iter: int = 100, tol: float = 1e-6) -> tuple[float, float, float]:
    """Adaptive (Gaussian-weighted, SdssShape-like) second moments ``(ixx, iyy, ixy)`` about the stamp centre.

    The weight's covariance is iterated to twice the weighted moments, which is exact for Gaussians.
    Falls back to unweighted moments of the positive part if the iteration does not converge.
    """
    img = np.asarray(image, dtype=float)
    ny, nx = img.shape
    y, x = np.mgrid[:ny, :nx]
    x = x - (nx - 1) / 2.0
    y = y - (ny - 1) / 2.0
    pos = np.clip(img, 0, None)
    tot = pos.sum()
    if tot <= 0:
        raise PsfError("Cannot measure the moments of a PSF image with no positive pixels.")
    cxx, cyy, cxy = (pos * x * x).sum() / tot, (pos * y * y).sum() / tot, (pos * x * y).sum() / tot
    cxx, cyy = max(cxx, 0.25), max(cyy, 0.25)
    for _ in range(max_iter):
        det = cxx * cyy - cxy * cxy
        if det <= 0:
            break
        ixx_, iyy_, ixy_ = cyy / det, cxx / det, -cxy / det
        w = np.exp(-0.5 * (ixx_ * x * x + iyy_ * y * y + 2 * ixy_ * x * y)) * img
        s = w.sum()
        if s <= 0:
            break
        qxx, qyy, qxy = (w * x * x).sum() / s, (w * y * y).sum() / s, (w * x * y).sum() / s
        # For a Gaussian source of covariance C and weight covariance M: Q = (C^-1 + M^-1)^-1.
        # Solve for C given Q and M: C = (Q^-1 - M^-1)^-1.
        dq = qxx * qyy - qxy * qxy
        if dq <= 0:
            break
        a = qyy / dq - ixx_
        b = qxx / dq - iyy_
        c = -qxy / dq - ixy_
        dc = a * b - c * c
        if dc <= 0 or a <= 0:
            break
        nxx, nyy, nxy = b / dc, a / dc, -c / dc
        done = abs(nxx - cxx) < tol * cxx and abs(nyy - cyy) < tol * cyy and abs(nxy - cxy) < tol * (cxx + cyy)
        cxx, cyy, cxy = nxx, nyy, nxy
        if done:
            return float(cxx), float(cyy), float(cxy)
    return float(cxx), float(cyy), float(cxy)


# ----------------------------------------------------------------------------------------------------------
# The abstract PSF
# ----------------------------------------------------------------------------------------------------------
class Psf(ABC):
    """Abstract PSF model evaluated at parent pixel positions ``(x, y)``.

    Subclasses implement :meth:`_kernel_image` and, for persistence, ``psf_type``, :meth:`to_fits_hdus` and
    :meth:`from_fits_hdus`. Everything else has a generic implementation that subclasses may override with an
    exact one.
    """

    #: Name written to FITS (``PSFTYPE`` card) and used by :func:`register_psf_type`.
    psf_type: str = ""

    def __init__(self, average_position: tuple[float, float] | None = None) -> None:
        self._average_position = None if average_position is None else (float(average_position[0]), float(average_position[1]))

    # -- to implement -------------------------------------------------------------------------------------
    @abstractmethod
    def _kernel_image(self, x: float, y: float) -> np.ndarray:
        """Centred, odd-sized PSF stamp at ``(x, y)``, any normalisation."""

    # -- generic API --------------------------------------------------------------------------------------
    @property
    def average_position(self) -> tuple[float, float]:
        """Position where the model is best constrained; ``(0, 0)`` if unknown (as afw)."""
        return self._average_position if self._average_position is not None else (0.0, 0.0)

    @average_position.setter
    def average_position(self, value: tuple[float, float]) -> None:
        self._average_position = (float(value[0]), float(value[1]))

    def _position(self, x: float | None, y: float | None) -> tuple[float, float]:
        if x is None or y is None:
            return self.average_position
        return float(x), float(y)

    def compute_kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """PSF at ``(x, y)`` (default: average position), centred on the middle pixel, sum 1 (float64)."""
        x, y = self._position(x, y)
        img = np.asarray(self._kernel_image(x, y), dtype=float)
        if img.ndim != 2 or img.shape[0] % 2 == 0 or img.shape[1] % 2 == 0:
            raise PsfError(f"{type(self).__name__} returned a kernel image of shape {img.shape}; it must be odd-sized.")
        s = img.sum()
        if not np.isfinite(s) or s == 0:
            raise PsfError(f"{type(self).__name__} kernel image at ({x:.1f}, {y:.1f}) has sum {s}; cannot normalise.")
        return img / s

    def compute_image(self, x: float, y: float) -> tuple[np.ndarray, Box]:
        """PSF shifted to the sub-pixel position ``(x, y)`` and the parent-coordinate :class:`Box` it covers."""
        k = self.compute_kernel_image(x, y)
        ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
        img = shift_image(k, x - ix, y - iy)
        s = img.sum()
        if s != 0:
            img /= s
        hy, hx = k.shape[0] // 2, k.shape[1] // 2
        return img, Box(ix - hx, iy - hy, k.shape[1], k.shape[0])

    def compute_shape(self, x: float | None = None, y: float | None = None) -> tuple[float, float, float]:
        """Second moments ``(ixx, iyy, ixy)`` in pixels² at ``(x, y)``."""
        return kernel_moments(self.compute_kernel_image(x, y))

    def determinant_radius(self, x: float | None = None, y: float | None = None) -> float:
        ixx, iyy, ixy = self.compute_shape(x, y)
        return float((ixx * iyy - ixy * ixy) ** 0.25)

    def trace_radius(self, x: float | None = None, y: float | None = None) -> float:
        ixx, iyy, _ = self.compute_shape(x, y)
        return float(math.sqrt(0.5 * (ixx + iyy)))

    def sigma(self, x: float | None = None, y: float | None = None) -> float:
        """Gaussian-equivalent σ (determinant radius) in pixels."""
        return self.determinant_radius(x, y)

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """Gaussian-equivalent FWHM (2.35482 × determinant radius) in pixels."""
        return FWHM_PER_SIGMA * self.determinant_radius(x, y)

    def kernel_size(self, x: float | None = None, y: float | None = None) -> tuple[int, int]:
        """``(ny, nx)`` of the kernel image."""
        return self.compute_kernel_image(x, y).shape

    def compute_aperture_flux(self, radius: float, x: float | None = None, y: float | None = None) -> float:
        """Fraction of the (unit-sum) PSF inside a circular aperture of ``radius`` pixels (sub-sampled 5×5)."""
        k = self.compute_kernel_image(x, y)
        ny, nx = k.shape
        sub = (np.arange(5) - 2) / 5.0
        yy, xx = np.mgrid[:ny, :nx]
        xx = xx - (nx - 1) / 2.0
        yy = yy - (ny - 1) / 2.0
        frac = np.zeros_like(k)
        for sy in sub:
            for sx in sub:
                frac += ((xx + sx) ** 2 + (yy + sy) ** 2 <= radius * radius)
        return float((k * frac / 25.0).sum())

    def compute_peak(self, x: float | None = None, y: float | None = None) -> float:
        return float(self.compute_kernel_image(x, y).max())

    # -- persistence --------------------------------------------------------------------------------------
    def to_fits_hdus(self) -> list:
        """HDUs (astropy) that persist this PSF; the first carries ``PSFTYPE``. See :mod:`diffim.io.fits`."""
        raise PsfError(f"{type(self).__name__} cannot be written to FITS.")

    @classmethod
    def from_fits_hdus(cls, hdus: list) -> "Psf":
        raise PsfError(f"{cls.__name__} cannot be read from FITS.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ----------------------------------------------------------------------------------------------------------
# Constant models
# ----------------------------------------------------------------------------------------------------------
@register_psf_type
class GaussianPsf(Psf):
    """A constant (elliptical) Gaussian PSF.

    Parameters
    ----------
    sigma
        σ along the major axis, in pixels (for a round PSF, the only σ).
    size
        Width of the kernel image (odd). Default ``2·ceil(4σ_max) + 1``.
    sigma_minor
        σ along the minor axis (default: round).
    theta
        Position angle of the ``sigma`` axis, radians counter-clockwise from +x.
    """

    psf_type = "GAUSSIAN"

    def __init__(
        self,
        sigma: float,
        size: int | None = None,
        sigma_minor: float | None = None,
        theta: float = 0.0,
        average_position: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(average_position)
        if not (np.isfinite(sigma) and sigma > 0):
            raise PsfError(f"GaussianPsf sigma must be finite and > 0, got {sigma}")
        self.sigma_major = float(sigma)
        self.sigma_minor = float(sigma if sigma_minor is None else sigma_minor)
        if not (np.isfinite(self.sigma_minor) and self.sigma_minor > 0):
            raise PsfError(f"GaussianPsf sigma_minor must be finite and > 0, got {sigma_minor}")
        self.theta = float(theta)
        if size is None:
            size = 2 * int(math.ceil(4.0 * max(self.sigma_major, self.sigma_minor))) + 1
        size = int(size)
        if size % 2 == 0 or size < 3:
            raise PsfError(f"GaussianPsf size must be odd and >= 3, got {size}")
        self.size = size

    @property
    def covariance(self) -> tuple[float, float, float]:
        """``(ixx, iyy, ixy)`` of the continuous Gaussian."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        a2, b2 = self.sigma_major**2, self.sigma_minor**2
        return (a2 * c * c + b2 * s * s, a2 * s * s + b2 * c * c, (a2 - b2) * s * c)

    def _evaluate(self, dx: float, dy: float) -> np.ndarray:
        h = self.size // 2
        u = np.arange(-h, h + 1) - dx
        v = np.arange(-h, h + 1) - dy
        ixx, iyy, ixy = self.covariance
        det = ixx * iyy - ixy * ixy
        uu, vv = np.meshgrid(u, v)
        q = (iyy * uu * uu + ixx * vv * vv - 2 * ixy * uu * vv) / det
        return np.exp(-0.5 * q)

    def _kernel_image(self, x: float, y: float) -> np.ndarray:
        return self._evaluate(0.0, 0.0)

    def compute_image(self, x: float, y: float) -> tuple[np.ndarray, Box]:
        ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
        img = self._evaluate(x - ix, y - iy)
        img /= img.sum()
        h = self.size // 2
        return img, Box(ix - h, iy - h, self.size, self.size)

    def compute_shape(self, x=None, y=None) -> tuple[float, float, float]:
        return self.covariance

    def to_fits_hdus(self) -> list:
        from astropy.io import fits

        hdu = fits.ImageHDU(name="PSF")
        hdu.header["PSFTYPE"] = self.psf_type
        hdu.header["SIGMA"] = self.sigma_major
        hdu.header["SIGMAMIN"] = self.sigma_minor
        hdu.header["THETA"] = self.theta
        hdu.header["KSIZE"] = self.size
        if self._average_position is not None:
            hdu.header["AVGPOSX"], hdu.header["AVGPOSY"] = self._average_position
        return [hdu]

    @classmethod
    def from_fits_hdus(cls, hdus: list) -> "GaussianPsf":
        h = hdus[0].header
        avg = (h["AVGPOSX"], h["AVGPOSY"]) if "AVGPOSX" in h else None
        return cls(h["SIGMA"], h["KSIZE"], h["SIGMAMIN"], h["THETA"], average_position=avg)

    def __repr__(self) -> str:
        if self.sigma_major == self.sigma_minor:
            return f"GaussianPsf(sigma={self.sigma_major:g}, size={self.size})"
        return (
            f"GaussianPsf(sigma={self.sigma_major:g}, sigma_minor={self.sigma_minor:g}, "
            f"theta={self.theta:g}, size={self.size})"
        )


@register_psf_type
class ImagePsf(Psf):
    """A constant PSF given as a kernel image (afw ``KernelPsf`` of a ``FixedKernel``).

    Parameters
    ----------
    kernel
        2-D array with odd dimensions, centred on its middle pixel; it is normalised to unit sum.
    """

    psf_type = "IMAGE"

    def __init__(self, kernel: np.ndarray, average_position: tuple[float, float] | None = None) -> None:
        super().__init__(average_position)
        k = np.array(kernel, dtype=float)
        if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
            raise PsfError(f"ImagePsf needs an odd-sized 2-D kernel, got shape {k.shape}.")
        if not np.all(np.isfinite(k)):
            raise PsfError("ImagePsf kernel contains non-finite values.")
        s = k.sum()
        if s == 0:
            raise PsfError("ImagePsf kernel sums to zero.")
        self.kernel = k / s
        self._shape: tuple[float, float, float] | None = None

    def _kernel_image(self, x: float, y: float) -> np.ndarray:
        return self.kernel

    def compute_shape(self, x=None, y=None) -> tuple[float, float, float]:
        if self._shape is None:
            self._shape = kernel_moments(self.kernel)
        return self._shape

    def to_fits_hdus(self) -> list:
        from astropy.io import fits

        hdu = fits.ImageHDU(self.kernel, name="PSF")
        hdu.header["PSFTYPE"] = self.psf_type
        if self._average_position is not None:
            hdu.header["AVGPOSX"], hdu.header["AVGPOSY"] = self._average_position
        return [hdu]

    @classmethod
    def from_fits_hdus(cls, hdus: list) -> "ImagePsf":
        h = hdus[0].header
        avg = (h["AVGPOSX"], h["AVGPOSY"]) if "AVGPOSX" in h else None
        return cls(np.asarray(hdus[0].data, dtype=float), average_position=avg)

    def __repr__(self) -> str:
        return f"ImagePsf(shape={self.kernel.shape})"


class ConvolvedPsf(Psf):
    """PSF of an image that was convolved with a fixed kernel: ``base`` at each position convolved with it.

    The pre-convolved science of score-image detection is such an image; its PSF varies across the field as
    the science's does (a constant model at the centre would tell the kernel fit that the variation is the
    template's alone). Not persisted: the image it describes is an intermediate product.

    Parameters
    ----------
    base
        PSF of the image before the convolution.
    kernel
        The convolution kernel (odd-sized; applied as a convolution, not a correlation).
    average_position
        Default: ``base``'s.
    """

    def __init__(self, base: Psf, kernel: np.ndarray, average_position: tuple[float, float] | None = None) -> None:
        super().__init__(base.average_position if average_position is None else average_position)
        k = np.asarray(kernel, dtype=float)
        if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
            raise PsfError(f"ConvolvedPsf needs an odd-sized 2-D kernel, got shape {k.shape}.")
        self.base = base
        self.kernel = k

    def _kernel_image(self, x: float, y: float) -> np.ndarray:
        from scipy.signal import fftconvolve

        return fftconvolve(self.base.compute_kernel_image(x, y), self.kernel, mode="full")

    def __repr__(self) -> str:
        return f"ConvolvedPsf({self.base!r}, kernel {self.kernel.shape})"
