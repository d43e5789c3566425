"""Image correlation in afw's convention and exposure convolution with spatially varying kernels.

afw's "convolve" is a cross-correlation: ``out(X) = Σ_u K(u) · in(X + u)`` with ``u`` the offset of kernel
pixel ``j`` from the kernel centre ``ctr = (w − 1) // 2``. This module follows it everywhere, so a kernel
fitted with :mod:`diffim.psfmatch` is applied exactly as it was fitted.

Large kernels go through overlap-save FFTs on ~512² tiles (float32, ``scipy.fft`` with 2 workers): tiling
keeps the kernel transforms tiny and the temporaries a fraction of the image. Separable fixed kernels use two
1-D passes. A spatially varying :class:`~diffim.psfmatch.kernel.SpatialKernel` ``K(x) = Σ_k f_k(x) K_k`` is
applied *exactly* as ``Σ_k f_k · corr(K_k, in)`` (one correlation per spatial term; each ``f_k`` is a product
of a function of x and one of y, so weighting needs no full-size temporaries beyond the term image).

Variance is correlated with ``K²``. For a spatially varying kernel ``K² = Σ_{k,l} f_k f_l K_k K_l`` is also a
linear combination and can be used exactly (``variance_mode="exact"``, ``n(n+1)/2`` correlations for ``n``
spatial terms). The default ``"first_order"`` keeps the ``n`` products ``K_0 K_l`` that are linear in the
spatial variation (``K_0`` = the constant term) and rescales by the exact noise gain ``ΣK(x)²``; ``"scaled"``
(one correlation) correlates with ``K(centre)²`` and rescales by ``ΣK(x)²/ΣK(centre)²``. Both are exact for a
locally flat variance, but AL kernels have large mutually cancelling spatial terms, so on a simulated 1024² pair
(order-1 kernel, Poisson variance around stars) their errors reach ~3 % (first_order) and ~4.5 % (scaled) at the
99.9th percentile. ``"auto"`` therefore uses the exact form for ≤ 3 spatial terms (the default order-1 kernel).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft as sfft
from numpy.lib.stride_tricks import as_strided
from scipy import ndimage

from .errors import BadInputError
from .model.box import Box
from .model.exposure import Exposure, MaskedImage

__all__ = [
    "correlate_image",
    "correlate_terms",
    "dilate_mask",
    "convolve_masked_image",
    "convolve_exposure",
    "DEFAULT_FILL_PLANES",
]

#: Mask planes whose pixels are replaced by the background level before convolving (so that garbage values do
#: not leak into neighbours; the dilated mask marks every output pixel they touch).
DEFAULT_FILL_PLANES = ("NO_DATA", "BAD", "SAT")

_WORKERS = 2


def _tile_length(n: int, w: int) -> int:
    """FFT length for one axis: one tile for small images, ~512 (or larger for huge kernels) otherwise."""
    full = sfft.next_fast_len(n + w - 1, real=True)
    if full <= 640:
        return full
    base = 512 if w <= 96 else sfft.next_fast_len(4 * w, real=True)
    return base


def correlate_terms(
    image: np.ndarray,
    kernels: np.ndarray,
    fy: np.ndarray | None = None,
    fx: np.ndarray | None = None,
    *,
    workers: int | None = None,
) -> np.ndarray:
    """``Σ_k fy_k[y] fx_k[x] · corr(K_k, image)`` with zero padding outside the image (float32).

    Parameters
    ----------
    image
        ``(ny, nx)`` array (must be finite).
    kernels
        ``(nk, w, w)`` odd-sized kernels in afw orientation (row = y offset).
    fy, fx
        ``(nk, ny)`` and ``(nk, nx)`` per-term weights along y and x (None: all ones).
    workers
        FFT threads (default: the module's ``_WORKERS``).
    """
    workers = _WORKERS if workers is None else max(1, int(workers))
    img = np.ascontiguousarray(image, dtype=np.float32)
    kernels = np.asarray(kernels, dtype=np.float64)
    if kernels.ndim == 2:
        kernels = kernels[None]
    nk, w, w2 = kernels.shape
    if w != w2 or w % 2 == 0:
        raise BadInputError(f"Kernels must be odd-sized squares, got {w}×{w2}.")
    ny, nx = img.shape
    ctr = (w - 1) // 2
    Ly, Lx = _tile_length(ny, w), _tile_length(nx, w)
    Ty, Tx = Ly - w + 1, Lx - w + 1
    nty, ntx = -(-ny // Ty), -(-nx // Tx)
    padded = np.zeros((nty * Ty + w - 1, ntx * Tx + w - 1), dtype=np.float32)
    padded[ctr : ctr + ny, ctr : ctr + nx] = img
    s0, s1 = padded.strides
    # Circular convolution with the flipped kernel; output index n = i + w − 1 never wraps (see module doc).
    FK = sfft.rfft2(kernels[:, ::-1, ::-1].astype(np.float32), s=(Ly, Lx), axes=(-2, -1), workers=workers)
    fy32 = None if fy is None else np.asarray(fy, dtype=np.float32)
    fx32 = None if fx is None else np.asarray(fx, dtype=np.float32)
    out = np.zeros((ny, nx), dtype=np.float32)
    # One row of tiles at a time: temporaries stay ~ (w + Ty) × nx instead of several full images.
    for ty in range(nty):
        r0, r1 = ty * Ty, min(ny, (ty + 1) * Ty)
        tiles = as_strided(padded[ty * Ty :], (ntx, Ly, Lx), (Tx * s1, s0, s1), writeable=False)
        F = sfft.rfft2(tiles, axes=(-2, -1), workers=workers)
        prod = np.empty_like(F)
        rows = out[r0:r1]
        for k in range(nk):
            np.multiply(F, FK[k], out=prod)
            t = sfft.irfft2(prod, s=(Ly, Lx), axes=(-2, -1), workers=workers)[:, w - 1 : w - 1 + r1 - r0, w - 1 :]
            t = t.transpose(1, 0, 2).reshape(r1 - r0, ntx * Tx)[:, :nx]
            if fy32 is not None:
                t *= fy32[k, r0:r1, None]
            if fx32 is not None:
                t *= fx32[k][None, :]
            rows += t
    return out


def _separable_factors(kernel: np.ndarray, rtol: float = 1e-7) -> tuple[np.ndarray, np.ndarray] | None:
    """``(ky, kx)`` with ``kernel = outer(ky, kx)`` if the kernel has rank 1, else None."""
    u, s, vt = np.linalg.svd(kernel)
    if s[0] == 0 or s[1] > rtol * s[0]:
        return None
    return u[:, 0] * s[0], vt[0]


def correlate_image(image: np.ndarray, kernel: np.ndarray, *, method: str = "auto") -> np.ndarray:
    """``out(X) = Σ_u K(u) image(X + u)`` (afw "convolve"), zero outside the image, float32.

    ``method``: ``"auto"`` (separable → two 1-D passes, otherwise tiled FFT), ``"fft"``, ``"direct"``.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    if method in ("auto", "separable"):
        fac = _separable_factors(kernel)
        if fac is not None:
            ky, kx = fac
            tmp = ndimage.correlate1d(np.asarray(image, np.float32), kx, axis=1, mode="constant")
            return ndimage.correlate1d(tmp, ky, axis=0, mode="constant").astype(np.float32, copy=False)
    if method == "direct":
        return ndimage.correlate(np.asarray(image, np.float64), kernel, mode="constant").astype(np.float32)
    return correlate_terms(image, kernel[None])


def dilate_mask(mask: np.ndarray, lo: int, hi: int, bits: int = -1) -> np.ndarray:
    """OR-dilate the ``bits`` of an int32 mask over the box ``[−lo, hi]²`` (other bits are kept as they are).

    Every output pixel gets the OR of the input bits of all pixels ``X + u`` with ``u ∈ [−lo, hi]²`` – the
    afw rule for a kernel whose support is its whole box. All planes are dilated at once by two 1-D running
    ORs (:func:`_or_window`) restricted to the rows/columns around the set pixels.
    """
    mask = np.asarray(mask, dtype=np.int32)
    out = mask.copy()
    grow = mask & np.int32(bits)
    rows = np.flatnonzero(grow.any(axis=1))
    if rows.size == 0:
        return out
    cols = np.flatnonzero(grow.any(axis=0))
    ny, nx = mask.shape
    y0, y1 = max(rows[0] - hi, 0), min(rows[-1] + lo + 1, ny)
    x0, x1 = max(cols[0] - hi, 0), min(cols[-1] + lo + 1, nx)
    sub = grow[y0:y1, x0:x1]
    d = _or_window(_or_window(sub, lo, hi, axis=1), lo, hi, axis=0)
    out[y0:y1, x0:x1] |= d
    return out


def _or_window(a: np.ndarray, lo: int, hi: int, axis: int) -> np.ndarray:
    """``out[X] = OR of a[X + u]`` for ``u ∈ [−lo, hi]`` along ``axis`` (zero outside), for all bits at once.

    Windows of length 2^k are built by doubling (``P_{k+1}[i] = P_k[i] | P_k[i + 2^k]``) and the length
    ``lo + hi + 1`` is covered by the binary decomposition, so the cost is ~2·log2(length) integer ORs of the
    array whatever the number of mask planes (a max filter per plane cost far more on many-plane masks).
    """
    L = lo + hi + 1
    n = a.shape[axis]
    W = n + L - 1
    if axis == 1:
        P = np.zeros((a.shape[0], W), dtype=a.dtype)
        P[:, lo : lo + n] = a
    else:
        P = np.zeros((W, a.shape[1]), dtype=a.dtype)
        P[lo : lo + n] = a
    out = np.zeros(a.shape, dtype=a.dtype)
    off, step = 0, 1
    while step <= L:
        if L & step:
            if axis == 1:
                out |= P[:, off : off + n]
            else:
                out |= P[off : off + n]
            off += step
        if 2 * step <= L:
            if axis == 1:
                P[:, : W - step] |= P[:, step:]
            else:
                P[: W - step] |= P[step:]
        step *= 2
    return out


def _fill_value(values: np.ndarray, good: np.ndarray) -> float:
    """Median of the good values (of a regular subsample of ~10⁶ of them): a fill/reference level."""
    # Large images are sampled on a 2-D grid before gathering (gathering all good pixels of a 4096² image
    # first cost more than the median itself); if the grid misses every good pixel, all of them are used.
    k = int(np.sqrt(values.size / 1_000_000)) if values.ndim == 2 else 1
    v = values[::k, ::k][good[::k, ::k]] if k > 1 else np.empty(0, values.dtype)
    if v.size == 0:
        v = values[good]
    if v.size == 0:
        return 0.0
    if v.size > 1_000_000:
        v = v[:: v.size // 1_000_000 + 1]
    return float(np.median(v))


def _kernel_terms(kernel) -> tuple[np.ndarray, object | None]:
    """``(terms (nk, w, w), spatial function or None)`` for an array or a SpatialKernel."""
    if hasattr(kernel, "term_kernels"):
        if kernel.is_spatially_invariant:
            return kernel.term_kernels()[:1] * 1.0, kernel.spatial if kernel.n_spatial_terms > 1 else None
        return kernel.term_kernels(), kernel.spatial
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
        raise BadInputError(f"A convolution kernel must be an odd-sized square array, got shape {k.shape}.")
    return k[None], None


def convolve_masked_image(
    mi: MaskedImage,
    kernel,
    *,
    copy_edge: bool = True,
    normalize: bool = False,
    fill_masked: bool = True,
    fill_mask_planes=DEFAULT_FILL_PLANES,
    grow_mask_planes=None,
    variance_mode: str = "auto",
) -> MaskedImage:
    """Correlate a :class:`MaskedImage` with a kernel (array or spatial kernel), afw semantics.

    Parameters
    ----------
    mi
        Input masked image (not modified).
    kernel
        Odd square array, or a :class:`~diffim.psfmatch.kernel.SpatialKernel` (evaluated at parent positions).
    copy_edge
        True: the border (``ctr`` pixels each side) is copied from the input with EDGE OR-ed into its mask.
        False (afw default): border image NaN, variance +inf, mask NO_DATA.
    normalize
        Divide the kernel by its sum (at each position) before use (afw ``doNormalize``).
    fill_masked
        Replace non-finite pixels and pixels with a ``fill_mask_planes`` bit by the median of the good pixels
        before correlating (the dilated mask flags every output pixel they reach).
    grow_mask_planes
        Names of the planes to dilate by the kernel footprint (None: all planes); the others are copied.
    variance_mode
        ``"exact"``, ``"first_order"``, ``"scaled"`` or ``"auto"`` (exact for ≤ 3 spatial terms, i.e. the default
        order-1 kernel, first_order beyond); see the module docstring.
    """
    terms, spatial = _kernel_terms(kernel)
    nk, w, _ = terms.shape
    ctr = (w - 1) // 2
    ny, nx = mi.shape
    if ny < w or nx < w:
        raise BadInputError(f"Image of shape {mi.shape} is smaller than the {w}×{w} kernel.")
    mask = mi.mask
    img = mi.image
    var = mi.variance
    if fill_masked:
        bad = ~np.isfinite(img)
        fb = mask.bitmask([p for p in fill_mask_planes if mask.has_plane(p)])
        if fb:
            bad |= (mask.array & fb) != 0
        badv = bad | ~np.isfinite(var)
        if bad.any():
            img = img.copy()
            img[bad] = _fill_value(img, ~bad)
        if badv.any():
            var = var.copy()
            var[badv] = _fill_value(var, ~badv)

    fx = fy = None
    if spatial is not None:
        xs = np.arange(mi.xy0[0], mi.xy0[0] + nx, dtype=float)
        ys = np.arange(mi.xy0[1], mi.xy0[1] + ny, dtype=float)
        fx = spatial.factors(xs, np.zeros_like(xs))[0].T[:nk]  # (nk, nx)
        fy = spatial.factors(np.zeros_like(ys), ys)[1].T[:nk]  # (nk, ny)
    ksum_terms = terms.sum(axis=(1, 2))

    # Image: subtract a constant level first (float32 FFT precision), add its exact contribution back.
    level = _fill_value(img, np.isfinite(img))
    img_future = None
    if nk == 1 and spatial is None and not normalize:
        out_img = correlate_image(img - np.float32(level), terms[0]) + np.float32(level * ksum_terms[0])
    elif _WORKERS > 1 and spatial is not None:
        # Image and variance correlations are independent: the image one runs on a second thread (each with
        # half the FFT threads) so that the numpy work between the FFTs uses both cores too.
        img_future = _pool().submit(correlate_terms, img - np.float32(level), terms, fy, fx,
                                    workers=max(1, _WORKERS // 2))
    else:
        out_img = correlate_terms(img - np.float32(level), terms, fy, fx)
    if img_future is None and not (nk == 1 and spatial is None and not normalize):
        ksum_map = _term_map(ksum_terms, fy, fx, ny, nx)
        out_img += np.float32(level) * ksum_map
        if normalize:
            out_img /= ksum_map

    # Variance: K² as a linear combination (exact) or K(centre)² rescaled by ΣK(x)².
    vlevel = _fill_value(var, np.isfinite(var))
    if variance_mode == "auto":
        variance_mode = "exact" if nk <= 3 else "first_order"
    if spatial is None:
        k2 = terms[0] ** 2
        out_var = correlate_image(var - np.float32(vlevel), k2) + np.float32(vlevel * k2.sum())
        if normalize:
            out_var /= np.float32(ksum_terms[0] ** 2)
    else:
        pairs = [(k, l) for k in range(nk) for l in range(k, nk)]
        pk = np.array([terms[k] * terms[l] * (1.0 if k == l else 2.0) for k, l in pairs])
        pfy = np.array([fy[k] * fy[l] for k, l in pairs])
        pfx = np.array([fx[k] * fx[l] for k, l in pairs])
        k2sum_map = _term_map(pk.sum(axis=(1, 2)), pfy, pfx, ny, nx)
        if variance_mode == "exact":
            out_var = correlate_terms(var - np.float32(vlevel), pk, pfy, pfx,
                                      workers=max(1, _WORKERS // 2) if img_future is not None else None)
        elif variance_mode == "first_order":
            # K² = K_0² + 2 Σ_l f_l K_0 K_l + O(variation²): keep the terms linear in the variation, then rescale
            # so that the kernel's noise gain ΣK(x)² stays exact.
            sel = [i for i, (k, l) in enumerate(pairs) if k == 0]
            out_var = correlate_terms(var - np.float32(vlevel), pk[sel], pfy[sel], pfx[sel])
            fo_sum = _term_map(pk[sel].sum(axis=(1, 2)), pfy[sel], pfx[sel], ny, nx)
            out_var *= k2sum_map / fo_sum
        elif variance_mode == "scaled":
            xc, yc = mi.bbox.center
            kc = kernel.kernel_image(xc, yc) if hasattr(kernel, "kernel_image") else terms[0]
            kc2 = kc**2
            out_var = correlate_image(var - np.float32(vlevel), kc2)
            out_var *= k2sum_map / np.float32(kc2.sum())
        else:
            raise BadInputError(f"Unknown variance_mode {variance_mode!r}: use 'exact', 'first_order' or 'scaled'.")
        if img_future is not None:
            out_img = img_future.result()
            ksum_map = _term_map(ksum_terms, fy, fx, ny, nx)
            out_img += np.float32(level) * ksum_map
            if normalize:
                out_img /= ksum_map
        out_var += np.float32(vlevel) * k2sum_map
        if normalize:
            out_var /= ksum_map * ksum_map

    # Mask: OR over the kernel footprint (the AL kernel's support is its whole box).
    if grow_mask_planes is None:
        bits = -1
    else:
        bits = mask.bitmask([p for p in grow_mask_planes if mask.has_plane(p)])
    out_mask = dilate_mask(mask.array, ctr, w - 1 - ctr, bits) if bits else mask.array.copy()

    planes = dict(mask.planes)
    from .model.mask import Mask

    m = Mask(out_mask, planes)
    # The border as four slabs (top, bottom, left, right): slicing instead of image-sized boolean indexing.
    hi = w - 1 - ctr
    slabs = [(slice(0, ctr), slice(None)), (slice(ny - hi, ny), slice(None)),
             (slice(ctr, ny - hi), slice(0, ctr)), (slice(ctr, ny - hi), slice(nx - hi, nx))]
    if copy_edge:
        edge = np.int32(1 << m.add_plane("EDGE"))
        for sl in slabs:
            out_img[sl] = mi.image[sl]
            out_var[sl] = mi.variance[sl]
            m.array[sl] = mask.array[sl] | edge
    else:
        nodata = np.int32(1 << m.add_plane("NO_DATA"))
        for sl in slabs:
            out_img[sl] = np.nan
            out_var[sl] = np.inf
            m.array[sl] = nodata
    return MaskedImage(out_img, m, out_var, mi.xy0)


_POOL = None


def _pool():
    """A two-thread pool shared by the convolutions (created on first use)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="diffim-convolve")
    return _POOL


def _term_map(weights: np.ndarray, fy, fx, ny: int, nx: int) -> np.ndarray:
    """``Σ_k w_k fy_k[y] fx_k[x]`` as a float32 ``(ny, nx)`` image (one small matmul)."""
    if fy is None:
        return np.full((ny, nx), np.float32(weights[0]), dtype=np.float32)
    return (np.asarray(fy).T * weights).astype(np.float32) @ np.asarray(fx, dtype=np.float32)


def convolve_exposure(
    exposure: Exposure,
    kernel,
    *,
    copy_edge: bool = True,
    normalize: bool = False,
    fill_masked: bool = True,
    fill_mask_planes=DEFAULT_FILL_PLANES,
    grow_mask_planes=None,
    preserve_mask_planes=(),
    bbox: Box | None = None,
    variance_mode: str = "auto",
) -> Exposure:
    """Convolve (afw sense: correlate) an exposure with a kernel; a new :class:`Exposure` is returned.

    Image → ``corr(K, image)``, variance → ``corr(K², variance)``, mask planes OR-dilated by the kernel box,
    border per ``copy_edge`` (see :func:`convolve_masked_image`). Pixels of ``preserve_mask_planes`` are not
    dilated: those planes are restored to their input footprint (as the modern AL task does for INJECTED*).
    The output carries the input's PSF/WCS/calibration (callers replace the PSF as appropriate) and is trimmed
    to ``bbox`` if given.
    """
    mi = convolve_masked_image(
        exposure.masked_image,
        kernel,
        copy_edge=copy_edge,
        normalize=normalize,
        fill_masked=fill_masked,
        fill_mask_planes=fill_mask_planes,
        grow_mask_planes=grow_mask_planes,
        variance_mode=variance_mode,
    )
    present = [p for p in preserve_mask_planes if exposure.mask.has_plane(p)]
    if present:
        bits = exposure.mask.bitmask(present)
        mi.mask.array[...] = (mi.mask.array & ~np.int32(bits)) | (exposure.mask.array & np.int32(bits))
    out = exposure.copy(deep=False)
    out.masked_image = mi if bbox is None else mi[bbox].copy()
    return out
