"""The PSF of a warped exposure (afw ``WarpedPsf``).

At a destination position ``p`` the warp is locally affine: a destination offset ``d`` maps to the source offset
``J·d`` (``J`` = Jacobian of the destination → source pixel map at ``p``). The destination PSF is therefore
``K_dst(d) ∝ K_src(J·d)`` with ``K_src`` the source PSF at the source position; it is sampled by quintic-spline
interpolation of the source kernel image (``scipy.ndimage.map_coordinates``, ≈0.3 ms per stamp) and
renormalised to unit sum. A Jacobian within 1e-9 of the identity returns the source kernel unchanged.

Persistence: a WarpedPsf holds a callable transform, which FITS cannot store. :meth:`WarpedPsf.to_fits_hdus`
writes an ``IMAGE`` PSF (:class:`~diffim.model.psf.ImagePsf`) snapshot evaluated at the average position, so a
re-read exposure carries a constant PSF — exact for constant-PSF templates, the centre value otherwise.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.ndimage import map_coordinates

from ..errors import PsfError
from ..model.psf import ImagePsf, Psf

__all__ = ["WarpedPsf", "StitchedPsf", "resample_kernel"]


def resample_kernel(kernel: np.ndarray, jac: np.ndarray, size: int | None = None) -> np.ndarray:
    """Kernel image on the destination grid: ``K_dst(d) = K_src(J·d)``, centred, odd ``size``, unit sum."""
    k = np.asarray(kernel, float)
    ny, nx = k.shape
    jac = np.asarray(jac, float).reshape(2, 2)
    if size is None:
        # The destination stamp must hold the source stamp's extent: scale by the largest inverse stretch.
        inv = np.linalg.inv(jac)
        scale = float(np.max(np.abs(inv).sum(axis=1)))
        size = 2 * int(math.ceil(max(nx, ny) / 2.0 * scale)) + 1
    h = size // 2
    dy, dx = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    sx = jac[0, 0] * dx + jac[0, 1] * dy + (nx - 1) / 2.0
    sy = jac[1, 0] * dx + jac[1, 1] * dy + (ny - 1) / 2.0
    # Quintic-spline interpolation of the (smooth, well-sampled) kernel image; zero outside the stamp.
    out = map_coordinates(k, [sy.ravel(), sx.ravel()], order=5, mode="constant", cval=0.0).reshape(sx.shape)
    s = out.sum()
    if not np.isfinite(s) or s <= 0:
        raise PsfError("The warped PSF kernel has no positive flux; the warp Jacobian is degenerate.")
    return out / s


class WarpedPsf(Psf):
    """The PSF of an exposure warped through ``transform`` (destination → source parent pixels).

    Parameters
    ----------
    psf
        The source exposure's PSF.
    transform
        Callable ``(x, y) -> (xs, ys)`` on arrays (destination parent pixels → source parent pixels).
    average_position
        Destination position where the model is best defined (default: the warped source average position is
        not invertible cheaply, so callers pass the destination bbox centre).
    """

    psf_type = "WARPED"

    def __init__(self, psf: Psf, transform: Callable, average_position: tuple[float, float] | None = None) -> None:
        super().__init__(average_position)
        self.psf = psf
        self.transform = transform
        self._cache: dict[tuple[float, float], np.ndarray] = {}

    def jacobian(self, x: float, y: float) -> tuple[np.ndarray, tuple[float, float]]:
        """Jacobian ``J`` (source px per destination px, ``[[du/dx, du/dy], [dv/dx, dv/dy]]``) and source position."""
        xs = np.array([x, x + 0.5, x - 0.5, x, x])
        ys = np.array([y, y, y, y + 0.5, y - 0.5])
        u, v = self.transform(xs, ys)
        jac = np.array([[u[1] - u[2], u[3] - u[4]], [v[1] - v[2], v[3] - v[4]]])
        return jac, (float(u[0]), float(v[0]))

    def _kernel_image(self, x: float, y: float) -> np.ndarray:
        key = (round(float(x), 3), round(float(y), 3))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        jac, (xs, ys) = self.jacobian(x, y)
        k = self.psf.compute_kernel_image(xs, ys)
        if np.max(np.abs(jac - np.eye(2))) > 1e-9:
            k = resample_kernel(k, jac)
        if len(self._cache) > 256:
            self._cache.clear()
        self._cache[key] = k
        return k

    def to_fits_hdus(self) -> list:
        """An ``IMAGE`` PSF snapshot at the average position (the transform itself is not persistable)."""
        return ImagePsf(self.compute_kernel_image(), average_position=self.average_position).to_fits_hdus()

    def __repr__(self) -> str:
        return f"WarpedPsf({self.psf!r})"


class StitchedPsf(Psf):
    """PSF of a template stitched from several warped patches: at each position, the PSF of the first patch
    that has data there (LSST's modern template uses a CoaddPsf over all patches; for patches of one coadd the
    PSF at a position is the same in every patch covering it, so picking one is equivalent).

    Parameters
    ----------
    psfs
        One PSF per patch (already on the template grid, e.g. :class:`WarpedPsf`).
    coverage
        One boolean array per patch on the template's pixel grid: True where that patch has data.
    xy0
        Parent coordinates of ``coverage[i][0, 0]``.
    average_position
        Where the model is best defined (default: the centre of the covered region).
    """

    psf_type = "STITCHED"

    def __init__(self, psfs: list[Psf], coverage: list[np.ndarray], xy0: tuple[int, int],
                 average_position: tuple[float, float] | None = None) -> None:
        if not psfs or len(psfs) != len(coverage):
            raise PsfError("StitchedPsf needs one coverage array per PSF (and at least one PSF).")
        # Patch index per pixel (-1: none), so a lookup is one array read.
        owner = np.full(coverage[0].shape, -1, dtype=np.int16)
        for i in range(len(coverage) - 1, -1, -1):
            owner[np.asarray(coverage[i], bool)] = i
        if average_position is None:
            yy, xx = np.nonzero(owner >= 0)
            if xx.size:
                average_position = (float(xx.mean() + xy0[0]), float(yy.mean() + xy0[1]))
        super().__init__(average_position)
        self.psfs = list(psfs)
        self.owner = owner
        self.xy0 = (int(xy0[0]), int(xy0[1]))
        self._nearest: np.ndarray | None = None

    def _which(self, x: float, y: float) -> Psf:
        j = int(round(x)) - self.xy0[0]
        i = int(round(y)) - self.xy0[1]
        ny, nx = self.owner.shape
        k = -1
        if 0 <= i < ny and 0 <= j < nx:
            k = int(self.owner[i, j])
        if k < 0:
            # Outside every patch: the patch owning the nearest covered pixel (map computed once).
            if self._nearest is None:
                from scipy.ndimage import distance_transform_edt

                if not (self.owner >= 0).any():
                    return self.psfs[0]
                _, (ii, jj) = distance_transform_edt(self.owner < 0, return_indices=True)
                self._nearest = self.owner[ii, jj]
            k = int(self._nearest[min(max(i, 0), ny - 1), min(max(j, 0), nx - 1)])
        return self.psfs[k]

    def _kernel_image(self, x: float, y: float) -> np.ndarray:
        return self._which(x, y).compute_kernel_image(x, y)

    def to_fits_hdus(self) -> list:
        """An ``IMAGE`` PSF snapshot at the average position."""
        return ImagePsf(self.compute_kernel_image(), average_position=self.average_position).to_fits_hdus()

    def __repr__(self) -> str:
        return f"StitchedPsf({len(self.psfs)} patches)"
