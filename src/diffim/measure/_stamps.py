"""Batched stamp extraction and batched PSF images, shared by the measurement algorithms.

Every function works on many sources at once: stamps are gathered with one fancy-indexing call into arrays of
shape ``(n_sources, ny, nx)`` and PSF images are built as one stack, so that measuring thousands of sources
costs a few numpy operations instead of thousands of Python calls.
"""

from __future__ import annotations

import math

import numpy as np

from ..model.psf import GaussianPsf, ImagePsf, Psf

__all__ = ["gather_stamps", "psf_image_stack", "kernel_image_stack", "is_constant_psf", "chunks"]


def chunks(n: int, per_source: int, budget: int = 4_000_000):
    """Yield slices over ``n`` sources so that one chunk holds at most ``budget`` stamp pixels."""
    step = max(1, budget // max(1, per_source))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def gather_stamps(
    array: np.ndarray, x0: np.ndarray, y0: np.ndarray, ny: int, nx: int, fill: float | int | None = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``(ny, nx)`` stamps whose first pixel is at array index ``(y0, x0)`` (per source).

    Parameters
    ----------
    array
        2-D array indexed ``[y, x]`` (local, not parent, indices).
    x0, y0
        Integer arrays of shape ``(n,)``: array indices of each stamp's first pixel.
    fill
        Value given to stamp pixels outside the array (None: leave the clipped edge values).

    Returns
    -------
    stamps, inside
        ``(n, ny, nx)`` stamps and a boolean array telling which stamp pixels lie inside ``array``.
    """
    h, w = array.shape
    rows = np.asarray(y0, dtype=np.int64)[:, None] + np.arange(ny)
    cols = np.asarray(x0, dtype=np.int64)[:, None] + np.arange(nx)
    rin = (rows >= 0) & (rows < h)
    cin = (cols >= 0) & (cols < w)
    inside = rin[:, :, None] & cin[:, None, :]
    r = np.clip(rows, 0, max(h - 1, 0))
    c = np.clip(cols, 0, max(w - 1, 0))
    stamps = array[r[:, :, None], c[:, None, :]]
    if fill is not None and not inside.all():
        stamps = np.where(inside, stamps, np.asarray(fill, dtype=stamps.dtype))
    return stamps, inside


def is_constant_psf(psf: Psf) -> bool:
    """True if the PSF model does not vary over the image (one kernel image serves every position)."""
    return isinstance(psf, (GaussianPsf, ImagePsf)) or bool(getattr(psf, "is_constant", False))


def _lanczos_matrices(d: np.ndarray, n: int, order: int = 5) -> np.ndarray:
    """Stack of ``(n, n)`` matrices applying :func:`diffim.model.psf.shift_image`'s 1-D shift by ``d``.

    ``out = W @ v`` reproduces ``out[j] = Σ_k w_k v[j + start + k]`` with the Lanczos-``order`` weights of an
    offset ``-d`` (zero outside the stamp), so ``W_y @ K @ W_xᵀ`` equals ``shift_image(K, d_x, d_y)``.
    """
    off = -np.asarray(d, dtype=float)
    base = np.floor(off)
    frac = off - base
    ks = np.arange(-order + 1, order + 1)
    t = ks[None, :] - frac[:, None]
    w = np.sinc(t) * np.sinc(t / order)
    w[np.abs(t) >= order] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    start = base.astype(np.int64) - order + 1
    m = len(d)
    mats = np.zeros((m, n, n))
    j = np.arange(n)
    sidx = np.arange(m)[:, None]
    for k in range(len(ks)):
        col = j[None, :] + start[:, None] + k
        valid = (col >= 0) & (col < n)
        colc = np.clip(col, 0, n - 1)
        mats[sidx, j[None, :], colc] += np.where(valid, w[:, k : k + 1], 0.0)
    return mats


def psf_image_stack(psf: Psf, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF images at sub-pixel positions, as :meth:`Psf.compute_image` gives them, for many positions.

    Returns
    -------
    images, bx0, by0
        ``(n, ny, nx)`` unit-sum images, and the parent coordinates of each image's first pixel.

    Notes
    -----
    A :class:`GaussianPsf` is evaluated analytically for all positions at once; another constant PSF is one
    kernel image shifted per source by a batched separable Lanczos-5 resampling (identical to
    ``compute_image``); a spatially varying PSF is evaluated per source.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    dx, dy = x - ix, y - iy
    if isinstance(psf, GaussianPsf):
        h = psf.size // 2
        grid = np.arange(-h, h + 1, dtype=float)
        u = grid[None, :] - dx[:, None]
        v = grid[None, :] - dy[:, None]
        ixx, iyy, ixy = psf.covariance
        det = ixx * iyy - ixy * ixy
        q = (iyy * u[:, None, :] ** 2 + ixx * v[:, :, None] ** 2 - 2 * ixy * u[:, None, :] * v[:, :, None]) / det
        img = np.exp(-0.5 * q)
        img /= img.sum(axis=(1, 2), keepdims=True)
        return img, ix - h, iy - h
    if is_constant_psf(psf):
        k = psf.compute_kernel_image()
        ny, nx = k.shape
        wy = _lanczos_matrices(dy, ny)
        wx = _lanczos_matrices(dx, nx)
        img = np.einsum("sij,jk,slk->sil", wy, k, wx, optimize=True)
        s = img.sum(axis=(1, 2), keepdims=True)
        img /= np.where(s != 0, s, 1.0)
        return img, ix - nx // 2, iy - ny // 2
    if hasattr(psf, "kernel_images"):
        # Spatially varying model with a batched evaluator (e.g. PixelBasisPsf): normalise, then shift each.
        k = np.asarray(psf.kernel_images(x, y), dtype=float)
        ks = k.sum(axis=(1, 2), keepdims=True)
        k = k / np.where(ks != 0, ks, 1.0)
        ny, nx = k.shape[1:]
        wy = _lanczos_matrices(dy, ny)
        wx = _lanczos_matrices(dx, nx)
        img = np.einsum("sij,sjk,slk->sil", wy, k, wx, optimize=True)
        s = img.sum(axis=(1, 2), keepdims=True)
        img /= np.where(s != 0, s, 1.0)
        return img, ix - nx // 2, iy - ny // 2
    if _has_batched_stamps(psf):
        # Analytic models (diffim.testing) evaluate compute_image for many positions in one call.
        img = _batched_stamps(psf, x, y, None)
        h = img.shape[1] // 2
        return img, ix - h, iy - h
    # Spatially varying model: one evaluation per source, embedded in the largest stamp size.
    ims = []
    boxes = []
    for xi, yi in zip(x, y):
        im, box = psf.compute_image(float(xi), float(yi))
        ims.append(im)
        boxes.append(box)
    ny = max(im.shape[0] for im in ims)
    nx = max(im.shape[1] for im in ims)
    out = np.zeros((len(ims), ny, nx))
    bx0 = np.empty(len(ims), dtype=np.int64)
    by0 = np.empty(len(ims), dtype=np.int64)
    for i, (im, box) in enumerate(zip(ims, boxes)):
        oy, ox = (ny - im.shape[0]) // 2, (nx - im.shape[1]) // 2
        out[i, oy : oy + im.shape[0], ox : ox + im.shape[1]] = im
        bx0[i], by0[i] = box.x0 - ox, box.y0 - oy
    return out, bx0, by0


def kernel_image_stack(psf: Psf, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Centred unit-sum PSF kernel images at ``(x, y)``: shape ``(n, ny, nx)`` (a broadcast view if constant)."""
    x = np.asarray(x, dtype=float)
    if is_constant_psf(psf):
        k = psf.compute_kernel_image()
        return np.broadcast_to(k, (len(x),) + k.shape)
    if hasattr(psf, "kernel_images"):
        k = np.asarray(psf.kernel_images(x, np.asarray(y, float)), dtype=float)
        ks = k.sum(axis=(1, 2), keepdims=True)
        return k / np.where(ks != 0, ks, 1.0)
    if _has_batched_stamps(psf):
        return _batched_stamps(psf, x, np.asarray(y, float), 0.0)
    ks = [psf.compute_kernel_image(float(a), float(b)) for a, b in zip(x, np.asarray(y, float))]
    ny = max(k.shape[0] for k in ks)
    nx = max(k.shape[1] for k in ks)
    out = np.zeros((len(ks), ny, nx))
    for i, k in enumerate(ks):
        oy, ox = (ny - k.shape[0]) // 2, (nx - k.shape[1]) // 2
        out[i, oy : oy + k.shape[0], ox : ox + k.shape[1]] = k
    return out


def _has_batched_stamps(psf: Psf) -> bool:
    """True for models with a vectorised ``stamps(x, y, dx=None, dy=None)`` (the analytic varying PSFs of
    :mod:`diffim.testing`): ``stamps(x, y)`` is their ``compute_image`` and ``stamps(x, y, 0, 0)`` their kernel
    image, for many positions in one call."""
    return callable(getattr(psf, "stamps", None)) and isinstance(getattr(psf, "size", None), (int, np.integer))


def _batched_stamps(psf: Psf, x: np.ndarray, y: np.ndarray, offset: float | None,
                    batch: int = 1024) -> np.ndarray:
    """Unit-sum ``psf.stamps`` for all positions, in batches (``offset=None``: the sub-pixel part of x, y)."""
    n = len(x)
    out = np.empty((n, psf.size, psf.size))
    for lo in range(0, n, batch):
        sl = slice(lo, min(n, lo + batch))
        st = psf.stamps(x[sl], y[sl]) if offset is None else psf.stamps(x[sl], y[sl], offset, offset)
        s = st.sum(axis=(1, 2), keepdims=True)
        out[sl] = st / np.where(s != 0, s, 1.0)
    return out


def odd_half(value: float) -> int:
    """Integer half-width ``ceil(value)`` (at least 1)."""
    return max(1, int(math.ceil(value)))
