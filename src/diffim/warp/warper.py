"""Warp an exposure onto another WCS and pixel grid (afw ``Warper`` semantics, numpy implementation).

Geometry
    Every destination pixel centre is mapped destination pixel → sky → source pixel through the two astropy
    WCSs (0-based *parent* pixel coordinates, as :meth:`Exposure.pixel_to_sky`). The mapping is evaluated
    exactly on a coarse grid of nodes every ``interp_length`` pixels and bilinearly interpolated in between
    (afw ``interpLength``); for TAN-SIP WCSs a 10-px grid is accurate to ~1e-8 px (≤ 1e-4 px for a SIP with
    ~10 px of distortion, see ``tests/test_warp.py``). The Jacobian (pixel-area ratio) comes from
    second-order finite differences of the same nodes (within 4e-7 of ±0.5-px differences under strong SIP).

Resampling
    Lanczos-``a`` (default ``a = 3``), applied as two 1-D passes (Catmull & Smith's two-pass scheme): pass 1
    resamples every source row at the source x where each *destination column* crosses that row; pass 2
    resamples those intermediate columns at the source y of every destination pixel. Each output pixel costs
    ``2·2a`` taps instead of ``(2a)²``. Each pass reads its taps as shifted *slices* of the source over tiles
    where the integer tap offset is (nearly) constant, with per-pixel weights from the phase table
    (:mod:`diffim.warp.banded`): the same taps and weights as per-pixel gathers (bit-identical results,
    ``method="two-pass-gather"`` keeps the gather formulation as reference and for pixel-scale changes beyond
    ``BANDED_MAX_DRIFT``), ≈4× faster (4096²: ≈1.3 s CPU instead of 6.2 s). For a pure
    shift the result is identical to afw's 2-D separable kernel; under rotation the taps follow the
    destination column (the exact sampling line) instead of the source axes; both are interpolants of the same
    band-limited image and agree to ≲1e-3 of the peak for Nyquist-sampled data (see ``tests/test_warp.py``).
    Before resampling the source is transposed when its axes are closer to the *swapped* destination axes,
    so the residual rotation handled by the two passes is at most 45°; beyond ~20° of residual rotation
    undersampled images (FWHM < 2 px) alias slightly, as every two-pass scheme does.

Photometry
    The image is multiplied by the relative pixel area (destination pixel area in source pixels, the
    Jacobian determinant), so total flux is conserved (afw multiplies by ``relativeArea`` too).

Variance
    ``V_out = area² · Σ w² V_in`` (each 1-D pass uses squared weights), exactly afw's propagation. This is the
    variance of each output pixel *on its own* given independent input pixels. Resampling correlates
    neighbouring output pixels, so the measured pixel-to-pixel variance of a warped pure-noise image is
    that prediction, not the input variance: for a sub-pixel Lanczos-3 shift the per-pixel variance drops by
    up to ~30 % (at half-pixel offsets) and the lost variance reappears as covariance between neighbours.
    The variance plane therefore predicts the variance of each warped pixel (verified to 3 % on noise
    images in the tests); the noise of *sums* over many pixels (apertures, PSF fits) is approximately the
    input variance × area, i.e. larger than the per-pixel plane implies. LSST carries the same per-pixel
    variance and leaves the covariance to decorrelation / variance rescaling. The mean per-pixel reduction
    (:func:`variance_reduction_factor`) is recorded in the warped exposure's metadata as ``WARPVARF``.

Masks
    OR of all bits over the bilinear footprint (the nearest two samples per axis; afw
    ``maskWarpingKernelName="bilinear"``), plus EDGE and NO_DATA OR-ed over the full Lanczos footprint
    (afw ``growFullMask``). Destination pixels whose Lanczos footprint leaves the source image get image NaN,
    variance +inf and mask ``NO_DATA`` only, as afw. Non-finite source pixels are treated as NO_DATA (their
    value is replaced by 0 before resampling, so NaN does not spread over 6×6 blocks; the pixels that saw
    them are flagged NO_DATA through the full footprint).

PSF
    :class:`~diffim.warp.psf.WarpedPsf`: the source PSF resampled through the local affine Jacobian of the
    transform at each position.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Callable

import numpy as np

from ..errors import BadInputError, NoOverlapError, WcsError
from ..model.box import Box
from ..model.exposure import Exposure, MaskedImage
from ..model.mask import Mask
from .lanczos import N_PHASE, kernel_order, resample_axis

__all__ = [
    "warp_exposure",
    "warp_masked_image",
    "pixel_transform",
    "TransformGrid",
    "WARP_STRIP_WIDTH",
    "TWO_PASS_MAX_SHEAR",
    "variance_reduction_factor",
]

#: Largest residual shear (tan of the residual rotation after the 90° re-orientation) handled by the two-pass
#: scheme under ``method="auto"``; beyond it (≈ 11°) the 2-D kernel is used, because the two-pass
#: interpolation error grows with the shear (1.3 % → 3 % of the peak of a σ = 1.2 px star from 0° to 45°).
TWO_PASS_MAX_SHEAR = 0.2

#: Largest |pixel scale ratio − 1| along the working axes for the slice-based passes (diffim.warp.banded):
#: beyond it the tap offsets drift so fast along a line that tiles become tiny, and per-pixel gathers win.
BANDED_MAX_DRIFT = 0.03

#: Destination columns processed per strip (bounds the temporaries to ~40 bytes × source height × width).
WARP_STRIP_WIDTH = 64

Transform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def pixel_transform(wcs_in, wcs_out) -> Transform:
    """Exact map from destination (``wcs_out``) parent pixels to source (``wcs_in``) parent pixels via the sky."""
    if wcs_in is None or wcs_out is None:
        raise WcsError("Warping needs a WCS on both the source exposure and the destination; one is missing.")

    def transform(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ra, dec = wcs_out.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        try:
            xs, ys = wcs_in.all_world2pix(ra, dec, 0, quiet=True)
        except TypeError:  # pragma: no cover - WCS-like objects without 'quiet'
            xs, ys = wcs_in.all_world2pix(ra, dec, 0)
        return np.asarray(xs, float), np.asarray(ys, float)

    return transform


class TransformGrid:
    """The destination → source pixel map sampled on nodes every ``step`` pixels, interpolated bilinearly.

    Parameters
    ----------
    transform
        Exact map of destination parent ``(x, y)`` arrays to source parent ``(x, y)``.
    bbox
        Destination box to cover.
    step
        Node spacing in pixels (afw ``interpLength``).
    margin
        Extra destination pixels covered beyond ``bbox`` on each side (the grid always ends on nodes beyond it).
    """

    def __init__(self, transform: Transform, bbox: Box, step: int = 10, margin: int = 0) -> None:
        if step < 1:
            raise BadInputError(f"interp_length must be ≥ 1, got {step}.")
        self.step = int(step)
        x0, y0 = bbox.x0 - margin, bbox.y0 - margin
        nx = int(math.ceil((bbox.width + 2 * margin - 1) / step)) + 1
        ny = int(math.ceil((bbox.height + 2 * margin - 1) / step)) + 1
        self.gx = x0 + step * np.arange(max(nx, 2), dtype=float)
        self.gy = y0 + step * np.arange(max(ny, 2), dtype=float)
        gxx, gyy = np.meshgrid(self.gx, self.gy)
        u, v = transform(gxx, gyy)
        # Jacobian (the destination pixel's area in source pixels) by second-order finite differences of the
        # node grid itself: error ≈ step²/6·|∂³u| (area within 4e-7 of ±0.5-px differences for a cubic SIP
        # with ~10 px of distortion), at no extra WCS evaluations (±0.5-px differences cost four more per node,
        # ~0.2 s for 4096²).
        fin = np.isfinite(u) & np.isfinite(v)
        un, vn = np.where(fin, u, np.nan), np.where(fin, v, np.nan)
        edge = 2 if min(un.shape) >= 3 else 1
        du_dy, du_dx = np.gradient(un, self.step, edge_order=edge)
        dv_dy, dv_dx = np.gradient(vn, self.step, edge_order=edge)
        jac = np.stack([du_dx, du_dy, dv_dx, dv_dy])
        ok = fin & np.all(np.isfinite(jac), axis=0)
        if not ok.any():
            raise WcsError(
                "The WCS transform between the two exposures is not finite anywhere over the destination box; "
                "check that both WCSs are valid there."
            )
        if not ok.all():
            # Nodes where a WCS cannot be inverted (far outside a SIP/TPV solution's domain) are sent far
            # outside every source image, so the pixels around them come out NO_DATA instead of failing.
            u = np.where(ok, u, -1e7)
            v = np.where(ok, v, -1e7)
            jac = np.where(ok, jac, np.median(jac[:, ok], axis=1)[:, None, None])
        self.u, self.v = u, v
        self.jac = jac
        self.area = np.abs(jac[0] * jac[3] - jac[1] * jac[2])

    def _weights(self, nodes: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = (np.asarray(pos, float) - nodes[0]) / self.step
        i = np.clip(np.floor(t).astype(np.intp), 0, nodes.size - 2)
        return i, t - i

    def interpolate(self, plane: np.ndarray, xs: np.ndarray, ys: np.ndarray, dtype=float) -> np.ndarray:
        """Bilinear interpolation of a node ``plane`` at the outer product of ``ys`` (rows) and ``xs``
        (computed in ``dtype``: float32 is enough for slowly varying planes such as the pixel area)."""
        ix, fx = self._weights(self.gx, xs)
        iy, fy = self._weights(self.gy, ys)
        fx, fy = fx.astype(dtype, copy=False), fy.astype(dtype, copy=False)
        # First along x for the node rows needed, then along y.
        rows = plane[:, ix] * (1.0 - fx) + plane[:, ix + 1] * fx
        return rows[iy] * (1.0 - fy)[:, None] + rows[iy + 1] * fy[:, None]

    def _lerp_range(self, plane: np.ndarray, nodes: np.ndarray, start: int, n: int, axis: int, dtype) -> np.ndarray:
        """Linear interpolation of the 2-D ``plane`` along ``axis`` (node coordinates ``nodes``) at the
        consecutive integers ``start … start + n − 1``: one broadcast ``a + t·(b − a)`` per node cell, no
        gathers. Returns a view with a contiguous last axis."""
        step = self.step
        g0 = int(nodes[0])
        k0 = min(max((start - g0) // step, 0), nodes.size - 2)
        k1 = min(max((start + n - 1 - g0) // step, k0), nodes.size - 2)
        off = start - g0 - k0 * step  # position of `start` within cell k0
        nc = k1 - k0 + 1
        if off < 0 or off + n > nc * step + 1:  # pragma: no cover - outside the grid: clamped extrapolation
            pos = np.arange(start, start + n, dtype=float)
            i, f = self._weights(nodes, pos)
            pl = np.moveaxis(plane, axis, 0).astype(dtype, copy=False)
            f = f.astype(dtype)[:, None]
            return np.ascontiguousarray(np.moveaxis(pl[i] + f * (pl[i + 1] - pl[i]), 0, axis))
        plane = plane.astype(dtype, copy=False)
        t = (np.arange(step) / step).astype(dtype)
        if axis == 1:
            a = plane[:, k0 : k1 + 1]
            d = plane[:, k0 + 1 : k1 + 2] - a
            buf = np.empty((plane.shape[0], nc * step + 1), dtype)
            v3 = buf[:, : nc * step].reshape(plane.shape[0], nc, step)
            np.multiply(d[:, :, None], t, out=v3)
            v3 += a[:, :, None]
            buf[:, -1] = plane[:, k1 + 1]
            return buf[:, off : off + n]
        a = plane[k0 : k1 + 1]
        d = plane[k0 + 1 : k1 + 2] - a
        buf = np.empty((nc * step + 1, plane.shape[1]), dtype)
        v3 = buf[: nc * step].reshape(nc, step, plane.shape[1])
        np.multiply(d[:, None, :], t[None, :, None], out=v3)
        v3 += a[:, None, :]
        buf[-1] = plane[k1 + 1]
        return buf[off : off + n]

    def interpolate_range(self, plane: np.ndarray, x0: int, nx: int, y0: int, ny: int, dtype=float) -> np.ndarray:
        """:meth:`interpolate` of ``plane`` at the integer pixels ``x0 … x0+nx−1`` × ``y0 … y0+ny−1`` (faster)."""
        rows = self._lerp_range(plane, self.gx, x0, nx, 1, dtype)
        return self._lerp_range(rows, self.gy, y0, ny, 0, dtype)

    def __call__(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source ``(x, y)`` at the grid ``ys × xs`` (arrays of shape ``(len(ys), len(xs))``)."""
        return self.interpolate(self.u, xs, ys), self.interpolate(self.v, xs, ys)


def _invert_columns(v_nodes: np.ndarray, u_nodes: np.ndarray, j: np.ndarray) -> np.ndarray:
    """For each node column, the source x where that destination column crosses source row ``j``.

    Along a node column the bilinear map is piecewise linear in y, so ``u`` as a function of ``v`` is piecewise
    linear with the same breakpoints and ``np.interp`` inverts it exactly (linear extrapolation at the ends).
    """
    out = np.empty((j.size, v_nodes.shape[1]))
    for k in range(v_nodes.shape[1]):
        vc, uc = v_nodes[:, k], u_nodes[:, k]
        if vc[-1] < vc[0]:
            vc, uc = vc[::-1], uc[::-1]
        res = np.interp(j, vc, uc)
        # Linear extrapolation beyond the ends (np.interp clamps).
        lo, hi = j < vc[0], j > vc[-1]
        if lo.any():
            s = (uc[1] - uc[0]) / (vc[1] - vc[0])
            res[lo] = uc[0] + (j[lo] - vc[0]) * s
        if hi.any():
            s = (uc[-1] - uc[-2]) / (vc[-1] - vc[-2])
            res[hi] = uc[-1] + (j[hi] - vc[-1]) * s
        out[:, k] = res
    return out


def warp_masked_image(
    masked_image: MaskedImage,
    transform: Transform,
    bbox_out: Box,
    *,
    kernel: str = "lanczos3",
    interp_length: int = 10,
    strip_width: int = WARP_STRIP_WIDTH,
    n_threads: int | None = None,
    method: str = "auto",
) -> MaskedImage:
    """Resample a :class:`MaskedImage` onto the destination box through a destination → source pixel map.

    See the module docstring for the image, variance and mask conventions. Returns a new MaskedImage on
    ``bbox_out`` whose mask shares the plane names of the input (NO_DATA added if missing). Strips of
    ``strip_width`` destination columns are processed by ``n_threads`` threads (default: up to 2, the
    ``DIFFIM_WARP_THREADS`` environment variable overrides). ``method``: ``"two-pass"`` (fast), ``"direct"``
    (afw's 2-D separable kernel, ≈4× slower), ``"two-pass-gather"`` (the two-pass result by per-pixel
    gathers, the reference for the slice-based passes) or ``"auto"`` (two-pass unless the residual rotation exceeds
    ``TWO_PASS_MAX_SHEAR``).
    """
    if n_threads is None:
        n_threads = int(os.environ.get("DIFFIM_WARP_THREADS", min(2, os.cpu_count() or 1)))
    order = kernel_order(kernel)
    src = masked_image
    sx0, sy0 = src.xy0
    ny_s, nx_s = src.shape
    mask_in = src.mask
    planes = dict(mask_in.planes)
    out_mask = Mask.zeros(bbox_out.shape, planes)
    no_data = np.int32(1 << out_mask.add_plane("NO_DATA"))
    full_bits = np.int32(out_mask.bitmask(["NO_DATA", "EDGE"], ignore_missing=True))
    # Every pixel is written by exactly one strip below; the early exits fill the planes themselves.
    out_img = np.empty(bbox_out.shape, dtype=np.float32)
    out_var = np.empty(bbox_out.shape, dtype=np.float32)

    def nothing() -> MaskedImage:
        out_img[...] = np.nan
        out_var[...] = np.inf
        out_mask.array[...] = no_data
        return MaskedImage(out_img, out_mask, out_var, bbox_out.xy0)

    if bbox_out.is_empty() or src.bbox.is_empty():
        return nothing()

    # Enough grid margin that the column inversion covers every source row a pass-2 tap can reach.
    grid = TransformGrid(transform, bbox_out, interp_length, margin=2 * order + 2)
    # Work on the part of the source the destination can reach (a big coadd patch under a small science
    # exposure): a view, so nothing is copied unless non-finite pixels must be cleaned.
    pad = order + 2
    reach = Box.from_corners(
        int(math.floor(grid.u.min())) - pad, int(math.floor(grid.v.min())) - pad,
        int(math.ceil(grid.u.max())) + pad + 1, int(math.ceil(grid.v.max())) + pad + 1,
    ).intersection(src.bbox)
    if reach.is_empty():
        return nothing()
    if reach != src.bbox:
        src = src[reach]
        sx0, sy0 = src.xy0
        ny_s, nx_s = src.shape
    u_nodes = grid.u - sx0
    v_nodes = grid.v - sy0

    img = src.image
    var = src.variance
    msk = src.mask.array
    # A finite sum proves every pixel finite (NaN and ±inf propagate); only otherwise (or on float32
    # overflow of a legitimately huge sum) is the per-pixel test needed.
    with np.errstate(over="ignore", invalid="ignore"):
        all_finite = bool(np.isfinite(img.sum()) and np.isfinite(var.sum()))
    bad = None if all_finite else ~(np.isfinite(img) & np.isfinite(var))
    if bad is not None and bad.any():
        img = np.where(bad, np.float32(0), img)
        var = np.where(bad, np.float32(0), var)
        msk = msk | np.where(bad, no_data, np.int32(0))
    # Orient the source so that its rows run along the destination rows (residual rotation ≤ 45°).
    jc = np.median(grid.jac.reshape(4, -1), axis=1)
    transposed = abs(jc[0]) + abs(jc[3]) < abs(jc[1]) + abs(jc[2])
    if transposed:
        img, var, msk = (np.ascontiguousarray(a.T) for a in (img, var, msk))
        u_nodes, v_nodes = v_nodes, u_nodes
        ny_s, nx_s = nx_s, ny_s
    else:
        img, var, msk = (np.ascontiguousarray(a) for a in (img, var, msk))
    img = img.astype(np.float32, copy=False)
    var = var.astype(np.float32, copy=False)
    full = msk & full_bits
    use_full = bool(full.any())
    ys = np.arange(bbox_out.y0, bbox_out.y1, dtype=float)
    starts = list(range(bbox_out.x0, bbox_out.x1, strip_width))
    n_threads = max(1, min(int(n_threads or 1), len(starts)))

    def run_strips(func) -> MaskedImage:
        if n_threads == 1:
            for xa in starts:
                func(xa)
        else:
            # numpy's take and ufuncs release the GIL, so strips run concurrently; each writes its own columns.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(n_threads) as pool:
                list(pool.map(func, starts))
        return MaskedImage(out_img, out_mask, out_var, bbox_out.xy0)

    # Residual shear after orientation: how far the destination columns lean in source pixels per row.
    jm = np.median(grid.jac.reshape(4, -1), axis=1)
    if transposed:
        jm = jm[[2, 3, 0, 1]]  # the working axes are swapped
    shear = max(abs(jm[1]) / max(abs(jm[3]), 1e-12), abs(jm[2]) / max(abs(jm[0]), 1e-12))
    if method not in ("auto", "two-pass", "direct", "two-pass-gather"):
        raise BadInputError(
            f"Unknown warp method {method!r}; use 'auto', 'two-pass', 'direct' or 'two-pass-gather'."
        )
    if method == "direct" or (method == "auto" and shear > TWO_PASS_MAX_SHEAR):
        flats = (img.reshape(-1), var.reshape(-1), msk.reshape(-1), full.reshape(-1) if use_full else None)

        def direct_strip(xa: int) -> None:
            xb = min(xa + strip_width, bbox_out.x1)
            xs = np.arange(xa, xb, dtype=float)
            cs = slice(xa - bbox_out.x0, xb - bbox_out.x0)
            us = grid.interpolate(u_nodes, xs, ys).reshape(-1)
            vs = grid.interpolate(v_nodes, xs, ys).reshape(-1)
            area = grid.interpolate(grid.area, xs, ys).reshape(-1)
            o_img, o_var, m_out, good = _resample_2d(flats, nx_s, ny_s, us, vs, order)
            o_img *= area.astype(np.float32)
            o_var *= (area * area).astype(np.float32)
            bad_px = ~good
            o_img[bad_px] = np.nan
            o_var[bad_px] = np.inf
            m_out[bad_px] = no_data
            shape = (ys.size, xs.size)
            out_img[:, cs] = o_img.reshape(shape)
            out_var[:, cs] = o_var.reshape(shape)
            out_mask.array[:, cs] = m_out.reshape(shape)

        return run_strips(direct_strip)

    # Source rows reachable from the destination box; the inversion is done once for all node columns.
    vmin, vmax = float(v_nodes.min()), float(v_nodes.max())
    j_all_lo = max(0, int(math.floor(vmin)) - order)
    j_all_hi = min(ny_s - 1, int(math.floor(vmax)) + order + 1)
    if j_all_lo > j_all_hi or max(0, math.floor(u_nodes.min())) > min(nx_s - 1, math.ceil(u_nodes.max())):
        return nothing()
    j_all = np.arange(j_all_lo, j_all_hi + 1, dtype=float)

    area32 = grid.area.astype(np.float32)
    img_f, var_f, msk_f = img.reshape(-1), var.reshape(-1), msk.reshape(-1)
    full_f = full.reshape(-1) if use_full else None

    def crossings(xa: int, w: int, jlo: int, jhi: int) -> tuple[np.ndarray, np.ndarray]:
        """Source x where the destination node columns around ``xa … xa+w−1`` cross source rows
        ``jlo … jhi``, and those node columns' x (computed per strip, so in the worker threads)."""
        k0 = min(max(int((xa - grid.gx[0]) // grid.step), 0), grid.gx.size - 2)
        k1 = min(max(int((xa + w - 1 - grid.gx[0]) // grid.step), k0), grid.gx.size - 2)
        cols = slice(k0, k1 + 2)
        rows = j_all[jlo - j_all_lo : jhi - j_all_lo + 1]
        return _invert_columns(v_nodes[:, cols], u_nodes[:, cols], rows), grid.gx[cols]

    def do_strip(xa: int) -> None:
        xb = min(xa + strip_width, bbox_out.x1)
        xs = np.arange(xa, xb, dtype=float)
        w = xs.size
        cs = slice(xa - bbox_out.x0, xb - bbox_out.x0)
        vs = grid.interpolate_range(v_nodes, xa, w, bbox_out.y0, ys.size)  # (ny_d, w): source row of each pixel
        jlo = max(j_all_lo, int(math.floor(vs.min())) - order + 1)
        jhi = min(j_all_hi, int(math.floor(vs.max())) + order)
        if jlo > jhi:
            out_img[:, cs] = np.nan
            out_var[:, cs] = np.inf
            out_mask.array[:, cs] = no_data
            return
        j = np.arange(jlo, jhi + 1)
        nj = j.size
        # Pass 1: source x where each destination column crosses source row j (linear between node columns).
        uj, gx = crossings(xa, w, jlo, jhi)
        us = grid._lerp_range(uj, gx, xa, w, 1, float).reshape(-1)  # (nj, w) flattened
        line = np.repeat(j * nx_s, w)
        (h_img, h_var), h_masks, valid1 = resample_axis(
            [img_f, var_f], line, 1, nx_s, us, order, [False, True], [msk_f], [full_f] if use_full else None
        )
        # Pixels whose pass-1 value is incomplete poison every pass-2 tap that reads them (NaN), which marks
        # exactly the destination pixels that depend on them.
        h_img[~valid1] = np.nan
        # Pass 2: down the intermediate columns (flat index row * w + column, stride w).
        vt = (vs - jlo).reshape(-1)
        line2 = np.tile(np.arange(w), ys.size)
        (o_img, o_var), o_masks, valid2 = resample_axis(
            [h_img, h_var], line2, w, nj, vt, order, [False, True], [h_masks[0]], h_masks[1:] or None
        )
        good = valid2 & np.isfinite(o_img)
        m_out = o_masks[0]
        if len(o_masks) > 1:
            m_out = m_out | o_masks[1]
        area = grid.interpolate_range(area32, xa, w, bbox_out.y0, ys.size, np.float32).reshape(-1)
        o_img *= area
        o_var *= area * area
        bad_px = ~good
        o_img[bad_px] = np.nan
        o_var[bad_px] = np.inf
        m_out[bad_px] = no_data
        out_img[:, cs] = o_img.reshape(ys.size, w)
        out_var[:, cs] = o_var.reshape(ys.size, w)
        out_mask.array[:, cs] = m_out.reshape(ys.size, w)

    # Slice-based passes (diffim.warp.banded) unless the pixel scales differ so much that the tap offsets
    # drift by more than ~1 px over a 32-px chunk; then (and on request) the per-pixel gathers above.
    drift = max(abs(abs(jm[0]) - 1.0), abs(abs(jm[3]) - 1.0))
    if method == "two-pass-gather" or drift > BANDED_MAX_DRIFT:
        return run_strips(do_strip)

    from .banded import resample_pass

    msk_b = msk if msk.any() else None
    full_b = full if use_full else None
    # Pass-1 pixels whose footprint leaves the source carry this bit (never a NO_DATA/EDGE bit) in the
    # intermediate full-footprint mask; pass 2 ORs it over its footprint, flagging exactly the dependants.
    flag = np.int32(np.iinfo(np.int32).min)
    local = threading.local()

    def buffer(name: str, shape: tuple[int, int], dtype) -> np.ndarray:
        """A per-thread scratch array of at least ``shape`` (reused across strips: no page faults)."""
        buf = getattr(local, name, None)
        size = shape[0] * shape[1]
        if buf is None or buf.size < size:
            buf = np.zeros(max(size, 1), dtype)  # zeros: stale contents are always finite
            setattr(local, name, buf)
        return buf[:size].reshape(shape)

    def zeroed(name: str, shape: tuple[int, int]) -> np.ndarray:
        """A cleared int32 scratch plane (mask bits are OR-ed into it)."""
        out = buffer(name, shape, np.int32)
        out[...] = 0
        return out

    def planes(tag: str, shape: tuple[int, int], with_mask: bool, with_full: bool):
        """Image, variance and (cleared, optional) mask and full-footprint planes of one pass's output."""
        return (buffer(f"{tag}_img", shape, np.float32), buffer(f"{tag}_var", shape, np.float32),
                zeroed(f"{tag}_msk", shape) if with_mask else None, zeroed(f"{tag}_full", shape) if with_full else None)

    def listed(plane) -> list:
        return [] if plane is None else [plane]

    def banded_strip(xa: int) -> None:
        xb = min(xa + strip_width, bbox_out.x1)
        w = xb - xa
        ny = ys.size
        cs = slice(xa - bbox_out.x0, xb - bbox_out.x0)
        vs = grid.interpolate_range(v_nodes, xa, w, bbox_out.y0, ny)
        jlo = max(j_all_lo, int(math.floor(vs.min())) - order + 1)
        jhi = min(j_all_hi, int(math.floor(vs.max())) + order)
        if jlo > jhi:
            out_img[:, cs] = np.nan
            out_var[:, cs] = np.inf
            out_mask.array[:, cs] = no_data
            return
        nj = jhi - jlo + 1
        # Interpolated along the destination columns in transposed layout (long contiguous inner loops),
        # then transposed into (source row, column) order while converting to integer phase units.
        uj, gx = crossings(xa, w, jlo, jhi)
        us_t = grid._lerp_range(uj.T, gx, xa, w, 0, float)
        us_t *= N_PHASE
        np.rint(us_t, out=us_t)
        p1 = np.empty((nj, w), np.int64)
        np.copyto(p1, us_t.T, casting="unsafe")
        # Intermediate planes (valid pass-1 pixels are all written; the rest keeps finite stale values, which
        # only invalid pass-2 pixels read).
        hshape = (nj, w)
        h_img, h_var, h_msk, h_full = planes("h", hshape, msk_b is not None, full_b is not None)
        valid1 = resample_pass(
            [img, var], [False, True], listed(msk_b), listed(full_b),
            p1, 1, order, [h_img, h_var], listed(h_msk), listed(h_full), perp_offset=jlo,
        )
        if valid1 is not None:
            if h_full is None:
                h_full = zeroed("h_full", hshape)
            h_full[~valid1] |= flag
        vs *= N_PHASE
        p2 = np.rint(vs, out=vs).astype(np.int64)
        p2 -= jlo * N_PHASE
        # Pass 2 accumulates into contiguous buffers: the output columns are strided by the full image width
        # (often a power of two, whose cache aliasing makes in-place accumulation several times slower).
        oshape = (ny, w)
        o_img, o_var, o_msk, f_out = planes("o", oshape, h_msk is not None, h_full is not None)
        valid2 = resample_pass(
            [h_img, h_var], [False, True], listed(h_msk), listed(h_full),
            p2, 0, order, [o_img, o_var], listed(o_msk), listed(f_out),
        )
        bad_px = None if valid2 is None else ~valid2
        if f_out is not None:
            flagged = (f_out & flag) != 0
            bad_px = flagged if bad_px is None else (bad_px | flagged)
            f_out &= full_bits
            o_msk = f_out if o_msk is None else (o_msk | f_out)
        area = grid.interpolate_range(area32, xa, w, bbox_out.y0, ny, np.float32)
        with np.errstate(invalid="ignore", over="ignore"):  # unwritten (invalid) pixels hold stale values
            np.multiply(o_img, area, out=out_img[:, cs])
            area *= area
            np.multiply(o_var, area, out=out_var[:, cs])
        m_dst = out_mask.array[:, cs]
        if o_msk is not None:
            m_dst[...] = o_msk
        if bad_px is not None and bad_px.any():
            out_img[:, cs][bad_px] = np.nan
            out_var[:, cs][bad_px] = np.inf
            m_dst[bad_px] = no_data

    return run_strips(banded_strip)


def _axis_taps(pos: np.ndarray, length: int, order: int):
    """Per-axis tap data for :func:`_resample_2d`: clamped first tap, weights (list of ``2a`` arrays), the two
    bilinear-footprint samples and validity (taps of zero weight at exact integer positions do not count)."""
    from .lanczos import lanczos_table

    ntap = 2 * order
    fl = np.floor(pos)
    q = np.rint((pos - fl) * N_PHASE).astype(np.intp)
    fl = fl.astype(np.intp)
    first = fl - (order - 1)
    valid = (first >= 0) & (first <= length - ntap)
    first_c = np.minimum(np.maximum(first, 0), max(length - ntap, 0))
    table = lanczos_table(order)
    weights = [table[k].take(q) for k in range(ntap)]
    b0 = np.minimum(np.maximum(fl + (q == N_PHASE), 0), length - 1)
    b1 = np.minimum(np.maximum(fl + (q > 0), 0), length - 1)
    inval = np.nonzero(~valid)[0]
    if inval.size:
        near = fl[inval] + (q[inval] == N_PHASE)
        ok = ((q[inval] == 0) | (q[inval] == N_PHASE)) & (near >= 0) & (near < length)
        sel, k0 = inval[ok], near[ok] - first_c[inval[ok]]
        valid[sel] = True
        for k in range(ntap):
            weights[k][sel] = (k0 == k).astype(np.float32)
    return first_c, weights, b0, b1, valid


def _resample_2d(flats, nx: int, ny: int, us: np.ndarray, vs: np.ndarray, order: int):
    """afw's 2-D separable Lanczos at source positions ``(us, vs)``: ``(2a)²`` gathers per pixel.

    Used when the residual rotation is too large for the two-pass scheme to be as accurate (see
    ``TWO_PASS_MAX_SHEAR``). ``flats`` = (image, variance, mask, full-footprint mask or None), flattened.
    """
    img, var, msk, full = flats
    ntap = 2 * order
    fx, wx, bx0, bx1, vx = _axis_taps(us, nx, order)
    fy, wy, by0, by1, vy = _axis_taps(vs, ny, order)
    n = us.size
    base = fy * nx + fx
    o_img = np.zeros(n, np.float32)
    o_var = np.zeros(n, np.float32)
    r_img = np.empty(n, np.float32)
    r_var = np.empty(n, np.float32)
    tmp = np.empty(n, np.float32)
    idx = np.empty_like(base)
    wx2 = [w * w for w in wx]
    for j in range(min(ntap, ny)):
        r_img[...] = 0
        r_var[...] = 0
        for i in range(min(ntap, nx)):
            np.add(base, j * nx + i, out=idx)
            img.take(idx, out=tmp)
            tmp *= wx[i]
            r_img += tmp
            var.take(idx, out=tmp)
            tmp *= wx2[i]
            r_var += tmp
        r_img *= wy[j]
        o_img += r_img
        r_var *= wy[j] * wy[j]
        o_var += r_var
    m_out = msk.take(by0 * nx + bx0) | msk.take(by0 * nx + bx1) | msk.take(by1 * nx + bx0) | msk.take(by1 * nx + bx1)
    if full is not None:
        for j in range(min(ntap, ny)):
            for i in range(min(ntap, nx)):
                m_out |= full.take(base + (j * nx + i))
    return o_img, o_var, m_out, vx & vy


def warp_exposure(
    exposure: Exposure,
    wcs_out,
    bbox_out: Box,
    *,
    kernel: str = "lanczos3",
    interp_length: int = 10,
    wcs_in=None,
    strip_width: int = WARP_STRIP_WIDTH,
    method: str = "auto",
) -> Exposure:
    """Warp ``exposure`` onto ``wcs_out`` over the parent box ``bbox_out``.

    Parameters
    ----------
    exposure
        Source exposure; needs a WCS (or pass ``wcs_in``).
    wcs_out
        Destination astropy WCS (0-based parent pixels).
    bbox_out
        Destination parent-coordinate box.
    kernel
        ``"lanczosN"`` (default ``"lanczos3"``) or ``"bilinear"``.
    interp_length
        Spacing in pixels of the nodes where the WCS transform is evaluated exactly (afw ``interpLength``).
    wcs_in
        Source WCS to use instead of ``exposure.wcs`` (e.g. a re-fitted WCS from :class:`RegisterTask`).
    method
        ``"auto"`` (default: the fast two-pass scheme unless the residual rotation exceeds ~11°, then afw's
        2-D kernel), ``"two-pass"``, ``"direct"`` or ``"two-pass-gather"`` (reference formulation of the
        two-pass result, see :func:`warp_masked_image`).

    Returns
    -------
    Exposure
        New exposure on ``bbox_out`` with ``wcs_out``, a :class:`~diffim.warp.psf.WarpedPsf` (if the source had
        a PSF), and the source's photometric calibration, band, visit info and metadata (copied). Pixels the
        source does not cover are NaN, variance +inf, mask NO_DATA; callers find them with
        ``exposure.mask.get("NO_DATA")``.

    Raises
    ------
    WcsError
        A WCS is missing or the transform is not finite over the destination box.
    """
    from .psf import WarpedPsf

    wcs_in = exposure.wcs if wcs_in is None else wcs_in
    transform = pixel_transform(wcs_in, wcs_out)
    mi = warp_masked_image(
        exposure.masked_image, transform, bbox_out, kernel=kernel, interp_length=interp_length,
        strip_width=strip_width, method=method,
    )
    out = Exposure(
        mi,
        psf=None,
        wcs=wcs_out,
        photo_calib=exposure.photo_calib,
        band=exposure.band,
        visit_info=exposure.visit_info,
        metadata=dict(exposure.metadata) if isinstance(exposure.metadata, dict) else exposure.metadata.copy(),
        ap_corr_map=None,
        id=exposure.id,
    )
    if exposure.psf is not None:
        out.psf = WarpedPsf(exposure.psf, transform, average_position=bbox_out.center)
    try:
        out.metadata["WARPVARF"] = variance_reduction_factor(transform, bbox_out, kernel)
    except (TypeError, ValueError):  # pragma: no cover - read-only metadata containers
        pass
    return out


def variance_reduction_factor(transform: Transform, bbox_out: Box, kernel: str = "lanczos3", n: int = 64) -> float:
    """Mean over the destination of ``Σw_x² · Σw_y²``: how much the warp lowered the per-pixel variance of white
    noise (1 for integer shifts, ≈ 0.6–0.8 for random sub-pixel offsets with Lanczos-3).

    Its inverse is the factor by which the variance plane underestimates the noise of sums over many
    pixels (the noise that a later convolution with a broad kernel sees). Written to the warped exposure's
    metadata as ``WARPVARF``. Evaluated on an ``n × n`` sample of destination pixels.
    """
    from .lanczos import lanczos_table

    order = kernel_order(kernel)
    if bbox_out.is_empty():
        return 1.0
    xs = np.linspace(bbox_out.x0, bbox_out.x1 - 1, min(n, bbox_out.width)).round()
    ys = np.linspace(bbox_out.y0, bbox_out.y1 - 1, min(n, bbox_out.height)).round()
    xx, yy = np.meshgrid(xs, ys)
    u, v = transform(xx, yy)
    ok = np.isfinite(u) & np.isfinite(v)
    if not ok.any():
        return 1.0
    w2 = (lanczos_table(order).astype(float) ** 2).sum(axis=0)  # Σw² per phase
    qu = np.rint((u[ok] - np.floor(u[ok])) * N_PHASE).astype(int)
    qv = np.rint((v[ok] - np.floor(v[ok])) * N_PHASE).astype(int)
    return float(np.mean(w2[qu] * w2[qv]))


def _sample_box(box: Box, n: int = 21) -> tuple[np.ndarray, np.ndarray]:
    xx, yy = np.meshgrid(np.linspace(box.x0, box.x1 - 1, n), np.linspace(box.y0, box.y1 - 1, n))
    return xx.ravel(), yy.ravel()


def _inside(u: np.ndarray, v: np.ndarray, box: Box) -> np.ndarray:
    return (u >= box.x0 - 0.5) & (u <= box.x1 - 0.5) & (v >= box.y0 - 0.5) & (v <= box.y1 - 0.5)


def check_overlap(exposure: Exposure, wcs_out, bbox_out: Box) -> float:
    """Rough fraction of ``bbox_out`` covered by ``exposure`` (21×21 samples of ``bbox_out`` mapped into the
    exposure). A source smaller than the sample spacing is still detected: if no sample lands in it but one
    of its own samples lands in ``bbox_out``, a small positive fraction (1e-6) is returned."""
    if exposure.bbox.is_empty() or bbox_out.is_empty():
        return 0.0
    u, v = pixel_transform(exposure.wcs, wcs_out)(*_sample_box(bbox_out))
    frac = float(_inside(u, v, exposure.bbox).mean())
    if frac == 0.0:
        ra, dec = exposure.wcs.all_pix2world(*_sample_box(exposure.bbox), 0)
        x, y = wcs_out.all_world2pix(ra, dec, 0, quiet=True)
        if _inside(x, y, bbox_out).any():
            frac = 1e-6
    return frac


def require_overlap(exposure: Exposure, wcs_out, bbox_out: Box) -> None:
    """:class:`NoOverlapError` if ``exposure`` covers none of ``bbox_out``."""
    if check_overlap(exposure, wcs_out, bbox_out) == 0.0:
        raise NoOverlapError(
            f"The exposure {exposure.bbox} does not overlap the destination {bbox_out} on the sky; check the WCSs."
        )
