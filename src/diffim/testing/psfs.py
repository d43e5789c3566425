"""Analytic, spatially varying PSF models for simulations and tests.

Every model here is a continuous profile (Gaussian or Moffat, optionally elliptical) whose FWHM and axis ratio
vary smoothly over a bounding box. Images are the profile *integrated over pixels*, approximated by averaging
``oversample × oversample`` sub-pixel samples, and are evaluated exactly at any sub-pixel position (no
resampling), so a star rendered with :meth:`compute_image` has its centroid exactly where it was asked to be.

Spatial variation
-----------------
With ``u = (x - xc) / (w/2)`` and ``v = (y - yc) / (h/2)`` the position normalised to ``[-1, 1]`` over ``bbox``
(``(xc, yc)`` its centre)::

    fwhm(x, y)       = fwhm · (1 + c1 u + c2 v + c3 u² + c4 u v + c5 v²)
    axis_ratio(x, y) = clip(axis_ratio + a1 u + a2 v, 0.2, 1)

``fwhm`` is the FWHM of the *continuous, circularised* profile: for a Gaussian the determinant radius is
``fwhm / 2.35482``; for a Moffat the FWHM is that of the round profile of the same area. ``theta`` is the
position angle of the major axis, radians counter-clockwise from +x.

Persistence
-----------
All classes register with :func:`~diffim.model.psf.register_psf_type` and store their parameters as header
cards of a single ``PSF`` image HDU (types ``SIM_VARYING_GAUSSIAN``, ``SIM_VARYING_MOFFAT``, ``SIM_MOFFAT``).
A reader must import :mod:`diffim.testing.psfs` for the types to be known.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import PsfError
from ..model.box import Box
from ..model.psf import FWHM_PER_SIGMA, Psf, register_psf_type

__all__ = ["AnalyticVaryingPsf", "VaryingGaussianPsf", "VaryingMoffatPsf", "MoffatPsf", "moffat_alpha"]


def moffat_alpha(fwhm: float | np.ndarray, beta: float) -> float | np.ndarray:
    """Moffat core width α of a profile ``(1 + r²/α²)^-β`` with the given FWHM."""
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


class AnalyticVaryingPsf(Psf):
    """Base class of the analytic varying PSFs (see the module docstring for the parametrisation).

    Parameters
    ----------
    fwhm
        FWHM in pixels at the centre of ``bbox``.
    fwhm_coeffs
        Relative variation coefficients ``(c1, c2, c3, c4, c5)`` of ``u, v, u², uv, v²`` (shorter tuples are
        padded with zeros).
    axis_ratio
        Minor/major axis ratio at the centre (1 = round).
    axis_ratio_coeffs
        ``(a1, a2)``: linear variation of the axis ratio with ``u, v``.
    theta
        Position angle of the major axis, radians counter-clockwise from +x.
    beta
        Moffat index (ignored by Gaussian profiles).
    bbox
        Box over which ``u, v`` run from -1 to 1 (default: a 1×1 box at the origin, i.e. no variation unless
        coefficients are given).
    size
        Odd kernel width; default from the broadest profile in ``bbox`` (Gaussian: ±4σ of the major axis;
        Moffat: the radius enclosing 99.5 % of the light).
    oversample
        Sub-pixel samples per pixel side used to integrate the profile over pixels (odd or even, ≥ 1).
    """

    profile: str = "gaussian"

    def __init__(
        self,
        fwhm: float,
        fwhm_coeffs: tuple[float, ...] = (),
        axis_ratio: float = 1.0,
        axis_ratio_coeffs: tuple[float, ...] = (),
        theta: float = 0.0,
        beta: float = 3.0,
        bbox: Box | None = None,
        size: int | None = None,
        oversample: int = 5,
        average_position: tuple[float, float] | None = None,
    ) -> None:
        if bbox is None:
            bbox = Box(0, 0, 1, 1)
        if average_position is None:
            average_position = bbox.center
        super().__init__(average_position)
        if not (np.isfinite(fwhm) and fwhm > 0):
            raise PsfError(f"{type(self).__name__} fwhm must be finite and > 0, got {fwhm}.")
        self.fwhm0 = float(fwhm)
        c = [float(v) for v in fwhm_coeffs] + [0.0] * (5 - len(fwhm_coeffs))
        if len(c) != 5:
            raise PsfError(f"fwhm_coeffs takes at most 5 coefficients (u, v, u², uv, v²), got {len(fwhm_coeffs)}.")
        self.fwhm_coeffs = tuple(c)
        self.axis_ratio0 = float(axis_ratio)
        a = [float(v) for v in axis_ratio_coeffs] + [0.0] * (2 - len(axis_ratio_coeffs))
        if len(a) != 2:
            raise PsfError(f"axis_ratio_coeffs takes at most 2 coefficients (u, v), got {len(axis_ratio_coeffs)}.")
        self.axis_ratio_coeffs = tuple(a)
        if not 0 < self.axis_ratio0 <= 1:
            raise PsfError(f"axis_ratio must be in (0, 1], got {axis_ratio}.")
        self.theta = float(theta)
        self.beta = float(beta)
        if self.profile == "moffat" and not self.beta > 1:
            raise PsfError(f"Moffat beta must be > 1 (finite flux), got {beta}.")
        self.bbox = bbox
        self.oversample = int(oversample)
        if self.oversample < 1:
            raise PsfError(f"oversample must be >= 1, got {oversample}.")
        # Check the FWHM stays positive over the box (a bad gradient would give a negative width somewhere).
        gx = np.linspace(bbox.x0, bbox.x1 - 1, 9)
        gy = np.linspace(bbox.y0, bbox.y1 - 1, 9)
        gxx, gyy = np.meshgrid(gx, gy)
        fw = self.fwhm_at(gxx, gyy)
        if not np.all(fw > 0):
            raise PsfError(f"{type(self).__name__}: the FWHM model goes non-positive inside {bbox}; reduce the gradient.")
        if size is None:
            q = self.axis_ratio_at(gxx, gyy)
            sig_major = (fw / FWHM_PER_SIGMA / np.sqrt(q)).max()
            if self.profile == "gaussian":
                radius = 4.0 * sig_major
            else:
                alpha = moffat_alpha(fw.max(), self.beta) / math.sqrt(q.min())
                # (1 + r²/α²)^(1-β) = 0.005 of the light outside r
                radius = alpha * math.sqrt(0.005 ** (1.0 / (1.0 - self.beta)) - 1.0)
            size = 2 * int(math.ceil(radius)) + 1
        size = int(size)
        if size < 3 or size % 2 == 0:
            raise PsfError(f"Kernel size must be odd and >= 3, got {size}.")
        self.size = size
        # Non-separable profiles are integrated with oversample² sub-samples only within this many pixels of the
        # centre; outside (≥ 1.5 FWHM) the profile is smooth on pixel scales and pixel centres suffice (the
        # relative error there is f''/(24 f), a few 1e-5 of the unit-sum kernel per pixel).
        self.core_radius = min(size // 2, int(math.ceil(1.5 * float(fw.max()))))

    # -- the spatial model --------------------------------------------------------------------------------
    def _uv(self, x, y):
        b = self.bbox
        xc, yc = b.center
        hx, hy = max(b.width / 2.0, 0.5), max(b.height / 2.0, 0.5)
        return (np.asarray(x, float) - xc) / hx, (np.asarray(y, float) - yc) / hy

    def fwhm_at(self, x, y):
        """Continuous-profile FWHM (pixels) at parent positions (vectorised)."""
        u, v = self._uv(x, y)
        c1, c2, c3, c4, c5 = self.fwhm_coeffs
        return self.fwhm0 * (1.0 + c1 * u + c2 * v + c3 * u * u + c4 * u * v + c5 * v * v)

    def axis_ratio_at(self, x, y):
        """Minor/major axis ratio at parent positions (vectorised)."""
        u, v = self._uv(x, y)
        a1, a2 = self.axis_ratio_coeffs
        return np.clip(self.axis_ratio0 + a1 * u + a2 * v, 0.2, 1.0)

    def _inverse_shape(self, x, y):
        """Coefficients ``(A, B, C)`` of the quadratic form ``A dx² + 2B dx dy + C dy²`` = (r/scale)²."""
        fw = np.atleast_1d(self.fwhm_at(x, y))
        q = np.atleast_1d(self.axis_ratio_at(x, y))
        if self.profile == "gaussian":
            scale = fw / FWHM_PER_SIGMA
        else:
            scale = moffat_alpha(fw, self.beta)
        # Covariance-like matrix: scale² R diag(1/q, q) Rᵀ (unit determinant shape, area preserved).
        a2 = scale**2 / q
        b2 = scale**2 * q
        c, s = math.cos(self.theta), math.sin(self.theta)
        sxx = a2 * c * c + b2 * s * s
        syy = a2 * s * s + b2 * c * c
        sxy = (a2 - b2) * s * c
        det = sxx * syy - sxy * sxy
        return syy / det, -sxy / det, sxx / det

    def _profile(self, r2):
        if self.profile == "gaussian":
            return np.exp(-0.5 * r2)
        return (1.0 + r2) ** (-self.beta)

    # -- vectorised evaluation ----------------------------------------------------------------------------
    def stamps(self, x, y, dx=None, dy=None) -> np.ndarray:
        """Unit-sum PSF stamps, shape ``(N, size, size)``, for positions ``x, y``.

        The profile parameters are those at ``(x, y)``; the profile centre is offset by ``(dx, dy)`` from the
        stamp's central pixel (default: the sub-pixel part of ``x, y`` relative to the nearest pixel, as used by
        :meth:`compute_image`).
        """
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        if dx is None:
            dx = x - np.floor(x + 0.5)
            dy = y - np.floor(y + 0.5)
        dx = np.broadcast_to(np.asarray(dx, float), x.shape)
        dy = np.broadcast_to(np.asarray(dy, float), x.shape)
        A, B, C = self._inverse_shape(x, y)
        A, B, C = (np.broadcast_to(t, x.shape) for t in (A, B, C))
        h = self.size // 2
        o = self.oversample
        sub = (np.arange(o) + 0.5) / o - 0.5
        g = (np.arange(-h, h + 1)[:, None] + sub[None, :]).ravel()  # sample coordinates, length size*o
        c = self.core_radius
        gc = (np.arange(-c, c + 1)[:, None] + sub[None, :]).ravel()
        gp = np.arange(-h, h + 1, dtype=float)
        n = x.size
        out = np.empty((n, self.size, self.size))
        chunk = max(1, int(4e6 // max(gc.size * gc.size, gp.size * gp.size)))
        for i0 in range(0, n, chunk):
            sl = slice(i0, min(n, i0 + chunk))
            if np.all(B[sl] == 0) and self.profile == "gaussian":
                # Separable (axis-aligned Gaussian): two fully oversampled 1-D factors.
                u = g[None, :] - dx[sl, None]  # (m, S*o) along x
                v = g[None, :] - dy[sl, None]  # along y
                fx = np.exp(-0.5 * A[sl, None] * u * u).reshape(-1, self.size, o).mean(axis=2)
                fy = np.exp(-0.5 * C[sl, None] * v * v).reshape(-1, self.size, o).mean(axis=2)
                img = fy[:, :, None] * fx[:, None, :]
            else:
                img = self._profile(self._r2(A[sl], B[sl], C[sl], gp[None, :] - dx[sl, None], gp[None, :] - dy[sl, None]))
                core = self._profile(self._r2(A[sl], B[sl], C[sl], gc[None, :] - dx[sl, None], gc[None, :] - dy[sl, None]))
                k = 2 * c + 1
                img[:, h - c : h + c + 1, h - c : h + c + 1] = core.reshape(-1, k, o, k, o).mean(axis=(2, 4))
            out[sl] = img / img.sum(axis=(1, 2), keepdims=True)
        return out

    @staticmethod
    def _r2(A, B, C, u, v):
        """Quadratic form on the grid: u (m, nx) along x, v (m, ny) along y → (m, ny, nx)."""
        return (
            A[:, None, None] * u[:, None, :] ** 2
            + 2.0 * B[:, None, None] * u[:, None, :] * v[:, :, None]
            + C[:, None, None] * v[:, :, None] ** 2
        )

    def _kernel_image(self, x: float, y: float) -> np.ndarray:
        return self.stamps([x], [y], 0.0, 0.0)[0]

    def compute_image(self, x: float, y: float) -> tuple[np.ndarray, Box]:
        """The profile integrated over pixels, centred exactly at ``(x, y)`` (no resampling)."""
        ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
        img = self.stamps([x], [y])[0]
        h = self.size // 2
        return img, Box(ix - h, iy - h, self.size, self.size)

    def compute_shape(self, x=None, y=None) -> tuple[float, float, float]:
        """Second moments; analytic for Gaussians (covariance + 1/12 px² of pixel integration)."""
        if self.profile != "gaussian":
            return super().compute_shape(x, y)
        x, y = self._position(x, y)
        A, B, C = (float(t[0]) for t in self._inverse_shape(x, y))
        det = A * C - B * B
        return (C / det + 1.0 / 12.0, A / det + 1.0 / 12.0, -B / det)

    # -- persistence --------------------------------------------------------------------------------------
    def to_fits_hdus(self) -> list:
        from astropy.io import fits

        hdu = fits.ImageHDU(name="PSF")
        h = hdu.header
        h["PSFTYPE"] = self.psf_type
        h["FWHM"] = (self.fwhm0, "FWHM at bbox centre [pix]")
        for i, cval in enumerate(self.fwhm_coeffs, 1):
            h[f"FWHMC{i}"] = (cval, "relative FWHM coeff of u, v, u2, uv, v2")
        h["AXRATIO"] = self.axis_ratio0
        h["AXRC1"], h["AXRC2"] = self.axis_ratio_coeffs
        h["THETA"] = (self.theta, "major-axis angle [rad]")
        h["BETA"] = self.beta
        h["BBX0"], h["BBY0"], h["BBW"], h["BBH"] = self.bbox.x0, self.bbox.y0, self.bbox.width, self.bbox.height
        h["KSIZE"] = self.size
        h["OVERSAMP"] = self.oversample
        if self._average_position is not None:
            h["AVGPOSX"], h["AVGPOSY"] = self._average_position
        return [hdu]

    @classmethod
    def from_fits_hdus(cls, hdus: list) -> "AnalyticVaryingPsf":
        h = hdus[0].header
        try:
            return cls(
                fwhm=h["FWHM"],
                fwhm_coeffs=tuple(h[f"FWHMC{i}"] for i in range(1, 6)),
                axis_ratio=h["AXRATIO"],
                axis_ratio_coeffs=(h["AXRC1"], h["AXRC2"]),
                theta=h["THETA"],
                beta=h["BETA"],
                bbox=Box(h["BBX0"], h["BBY0"], h["BBW"], h["BBH"]),
                size=h["KSIZE"],
                oversample=h["OVERSAMP"],
                average_position=(h["AVGPOSX"], h["AVGPOSY"]) if "AVGPOSX" in h else None,
            )
        except KeyError as err:
            raise PsfError(f"{cls.__name__}: PSF HDU lacks the header card {err}; the file is not a diffim PSF.") from None

    def resized(self, size: int) -> "AnalyticVaryingPsf":
        """The same profile and spatial model with ``size``-pixel (odd) stamps.

        The stamps stay unit-sum over their own extent: a wider one puts the light the default stamp leaves out
        (0.5 % for a Moffat) in the wings, where a bright star has it, instead of in the core.
        """
        return type(self)(
            self.fwhm0, self.fwhm_coeffs, axis_ratio=self.axis_ratio0, axis_ratio_coeffs=self.axis_ratio_coeffs,
            theta=self.theta, beta=self.beta, bbox=self.bbox, size=size, oversample=self.oversample,
            average_position=self._average_position,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(fwhm={self.fwhm0:g}, fwhm_coeffs={self.fwhm_coeffs}, axis_ratio={self.axis_ratio0:g}, "
            f"theta={self.theta:g}, size={self.size})"
        )


@register_psf_type
class VaryingGaussianPsf(AnalyticVaryingPsf):
    """Elliptical Gaussian whose FWHM and axis ratio vary over ``bbox`` (see :class:`AnalyticVaryingPsf`)."""

    psf_type = "SIM_VARYING_GAUSSIAN"
    profile = "gaussian"


@register_psf_type
class VaryingMoffatPsf(AnalyticVaryingPsf):
    """Elliptical Moffat ``(1 + r²/α²)^-β`` whose FWHM and axis ratio vary over ``bbox``."""

    psf_type = "SIM_VARYING_MOFFAT"
    profile = "moffat"


@register_psf_type
class MoffatPsf(AnalyticVaryingPsf):
    """A constant (optionally elliptical) Moffat PSF; same arguments as :class:`AnalyticVaryingPsf`."""

    psf_type = "SIM_MOFFAT"
    profile = "moffat"
