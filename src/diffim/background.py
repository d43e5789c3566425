"""Mesh (super-pixel) background estimation, afw ``BackgroundMI`` style, and a low-order polynomial fit.

The image is divided into ``ceil(W / bin_size) × ceil(H / bin_size)`` super-pixels of (nearly) equal size. Each
super-pixel gets one robust value from its unmasked, finite pixels (afw ``MEANCLIP`` by default, or the median),
optionally smoothed by a 3×3 median filter over super-pixels (``doFilterSuperPixels``). The super-pixel grid is
interpolated to full resolution exactly as afw does it: first along y for every column of super-pixels, then
along x for every image row, each time with an Akima spline through the *finite* super-pixel values only (so
super-pixels without good pixels are skipped, not zero). Fewer points than Akima needs lower the order
(afw ``undersampleStyle="REDUCE_INTERP_ORDER"``): 3–4 points → natural cubic spline, 2 → linear, 1 → constant.
Beyond the outermost super-pixel centres the curve is extended linearly with the slope of the last interval.

:func:`fit_polynomial_background` is the "approximation" alternative (afw ``useApprox``): a 2-D Chebyshev
polynomial of total degree ``order`` fitted by least squares to the super-pixel values.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from numpy.polynomial import chebyshev as _cheb
from scipy.interpolate import Akima1DInterpolator, CubicSpline

from .errors import BadInputError
from .statistics import clipped_mean_std_rows, nan_quantiles_rows

__all__ = ["bin_statistics", "estimate_background", "fit_polynomial_background", "interpolate_grid"]

Statistic = Literal["meanclip", "median", "mean"]


def _bin_edges(n: int, bin_size: int) -> np.ndarray:
    nbins = max(1, math.ceil(n / bin_size))
    return np.round(np.linspace(0, n, nbins + 1)).astype(np.intp)


def _gather_index(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    widths = np.diff(edges)
    length = int(widths.max())
    idx = edges[:-1, None] + np.arange(length)[None, :]
    valid = np.arange(length)[None, :] < widths[:, None]
    return np.minimum(idx, edges[-1] - 1), valid


def bin_statistics(
    image: np.ndarray,
    mask_bool: np.ndarray | None = None,
    bin_size: int = 32,
    statistic: Statistic = "meanclip",
    *,
    nsigma: float = 3.0,
    niter: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Robust value of every super-pixel.

    Parameters
    ----------
    image
        2-D array.
    mask_bool
        True where a pixel must be ignored (masked sources, bad pixels); non-finite pixels are always ignored.
    bin_size
        Nominal super-pixel size; the image is split into ``ceil(n / bin_size)`` equal(ish) bins per axis.
    statistic
        ``"meanclip"`` (afw MEANCLIP, 3σ, 3 iterations), ``"median"`` or ``"mean"``.

    Returns
    -------
    values, counts, xc, yc
        ``values`` and ``counts`` (number of good pixels) of shape ``(nby, nbx)``, NaN where no pixel is good;
        ``xc``, ``yc`` the super-pixel centres in array pixel coordinates.
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.size == 0:
        raise BadInputError(f"Background estimation needs a non-empty 2-D image, got shape {img.shape}.")
    if bin_size < 1:
        raise BadInputError(f"Background bin_size must be >= 1, got {bin_size}.")
    ny, nx = img.shape
    ey, ex = _bin_edges(ny, bin_size), _bin_edges(nx, bin_size)
    iy, vy = _gather_index(ey)
    ix, vx = _gather_index(ex)
    nby, ly = iy.shape
    nbx, lx = ix.shape
    m = None
    if mask_bool is not None:
        m = np.asarray(mask_bool, dtype=bool)
        if m.shape != img.shape:
            raise BadInputError(f"Mask shape {m.shape} does not match the image shape {img.shape}.")
    if statistic not in ("meanclip", "median", "mean"):
        raise BadInputError(f"Unknown background statistic {statistic!r}; use 'meanclip', 'median' or 'mean'.")
    # Rows of super-pixels are processed a few at a time (about 2 Mpix per chunk): the statistics hold
    # several block-sized temporaries, which for a whole 4096² image would add ~0.4 GiB to the peak memory.
    # (Running the chunks on two threads halved the wall time but raised the peak RSS of a 4096² run by
    # ~25 MiB: glibc keeps each thread's freed sub-threshold blocks in that thread's arena.)
    step = max(1, (2 << 20) // max(1, ly * lx * nbx))
    values = np.empty(nby * nbx)
    counts = np.empty(nby * nbx, dtype=np.int64)
    for r0 in range(0, nby, step):
        r1 = min(nby, r0 + step)
        v_, c_ = _bin_rows(img, m, iy[r0:r1], vy[r0:r1], ix, vx, statistic, nsigma, niter)
        values[r0 * nbx : r1 * nbx] = v_
        counts[r0 * nbx : r1 * nbx] = c_
    values = np.where(counts > 0, values, np.nan).reshape(nby, nbx)
    xc = (ex[:-1] + ex[1:] - 1) / 2.0
    yc = (ey[:-1] + ey[1:] - 1) / 2.0
    return values, counts.reshape(nby, nbx), xc, yc


def _bin_rows(img, m, iy, vy, ix, vx, statistic, nsigma, niter):
    """Statistic and good-pixel count of the super-pixels of the bin rows ``iy`` (all bin columns)."""
    nby, ly = iy.shape
    nbx, lx = ix.shape
    if vy.all() and vx.all() and np.all(np.diff(iy[:, 0]) == ly) and np.all(np.diff(ix[:, 0]) == lx):
        # Equal bins tiling the rows exactly (e.g. 32-px bins of a 4096² image): a reshaped view replaces the
        # fancy-index gather (same values, several times cheaper).
        y0, x0 = int(iy[0, 0]), int(ix[0, 0])
        def tiles(a):
            sub = a[y0 : y0 + nby * ly, x0 : x0 + nbx * lx].reshape(nby, ly, nbx, lx)
            return sub.transpose(0, 2, 1, 3).reshape(nby * nbx, ly * lx)
        block = tiles(img)
        valid = ~tiles(m) if m is not None else np.ones(block.shape, dtype=bool)
    else:
        # (nby, ly, nbx, lx) -> one row per super-pixel
        block = img[iy[:, :, None, None], ix[None, None, :, :]].transpose(0, 2, 1, 3).reshape(nby * nbx, ly * lx)
        valid = (vy[:, :, None, None] & vx[None, None, :, :]).transpose(0, 2, 1, 3).reshape(nby * nbx, ly * lx)
        if m is not None:
            valid = valid & ~m[iy[:, :, None, None], ix[None, None, :, :]].transpose(0, 2, 1, 3).reshape(valid.shape)
    valid &= np.isfinite(block)
    if statistic == "meanclip":
        values, _, _ = clipped_mean_std_rows(block, valid, nsigma, niter)
        counts = valid.sum(axis=1)
    elif statistic == "median":
        counts, (values,) = nan_quantiles_rows(block, valid, (0.5,))
    else:
        counts = valid.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(valid, block, 0.0).sum(axis=1, dtype=np.float64) / counts
    return values, counts


def _median_filter_nan(grid: np.ndarray) -> np.ndarray:
    """3×3 median filter of a super-pixel grid, ignoring NaN (empty super-pixels); edges mirrored."""
    padded = np.pad(grid, 1, mode="symmetric")
    win = np.lib.stride_tricks.sliding_window_view(padded, (3, 3)).reshape(grid.shape + (9,))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows stay NaN
        return np.nanmedian(win, axis=-1)


def _interp_columns(xc: np.ndarray, vals: np.ndarray, xt: np.ndarray, interp: str) -> np.ndarray:
    """Interpolate every column of ``vals`` (``(len(xc), m)``) to positions ``xt`` -> ``(len(xt), m)``.

    Only finite entries of a column are used; all-NaN columns give NaN.
    """
    out = np.full((xt.size, vals.shape[1]), np.nan)
    finite = np.isfinite(vals)
    full = finite.all(axis=0)
    if full.any():
        out[:, full] = _interp_block(xc, vals[:, full], xt, interp)
    for j in np.flatnonzero(~full & finite.any(axis=0)):
        ok = finite[:, j]
        out[:, j] = _interp_block(xc[ok], vals[ok, j : j + 1], xt, interp)[:, 0]
    return out


def _interp_block(x: np.ndarray, y: np.ndarray, xt: np.ndarray, interp: str) -> np.ndarray:
    """Interpolate the columns of ``y`` (all finite, sampled at ``x``) with linear end extrapolation."""
    n = x.size
    if n == 1:
        return np.broadcast_to(y[0], (xt.size, y.shape[1])).astype(np.float64)
    if n == 2 or interp == "linear":
        f = None
    elif interp == "akima" and n >= 5:
        f = Akima1DInterpolator(x, y, axis=0, extrapolate=True)
    elif interp in ("akima", "cubic"):
        f = CubicSpline(x, y, axis=0, bc_type="natural" if n < 5 or interp == "akima" else "not-a-knot")
    else:
        raise BadInputError(f"Unknown background interpolation {interp!r}; use 'akima', 'cubic' or 'linear'.")
    if f is None:
        idx = np.clip(np.searchsorted(x, xt) - 1, 0, n - 2)
        t = (xt - x[idx]) / (x[idx + 1] - x[idx])
        return y[idx] * (1 - t)[:, None] + y[idx + 1] * t[:, None]
    out = f(xt)
    # Beyond the end nodes extend linearly with the slope of the last interval: an exact continuation of
    # linear fields that amplifies the nodes' noise far less than the spline's end derivative would.
    lo, hi = xt < x[0], xt > x[-1]
    if lo.any():
        s0 = (y[1] - y[0]) / (x[1] - x[0])
        out[lo] = y[0] + s0[None, :] * (xt[lo] - x[0])[:, None]
    if hi.any():
        s1 = (y[-1] - y[-2]) / (x[-1] - x[-2])
        out[hi] = y[-1] + s1[None, :] * (xt[hi] - x[-1])[:, None]
    return out


def interpolate_grid(
    grid: np.ndarray, xc: np.ndarray, yc: np.ndarray, shape: tuple[int, int], interp: str = "akima"
) -> np.ndarray:
    """Full-resolution image from super-pixel values (NaN = missing), afw order: y per column, then x per row.

    Returns a float32 array of ``shape``; :class:`~diffim.errors.BadInputError` if no value is finite.
    """
    grid = np.asarray(grid, dtype=np.float64)
    if not np.isfinite(grid).any():
        raise BadInputError(
            "Cannot estimate a background: every super-pixel is masked or non-finite. "
            "Check the mask planes ignored for the background, or use a larger bin size."
        )
    ny, nx = shape
    cols = _interp_columns(yc, grid, np.arange(ny, dtype=np.float64), interp)  # (ny, nbx)
    if interp == "akima" and xc.size >= 5 and np.isfinite(cols).all():
        return _akima_rows_float32(xc, cols, nx)
    rows = _interp_columns(xc, cols.T, np.arange(nx, dtype=np.float64), interp)  # (nx, ny)
    return np.ascontiguousarray(rows.T, dtype=np.float32)


def _akima_rows_float32(xc: np.ndarray, cols: np.ndarray, nx: int) -> np.ndarray:
    """Akima interpolation of every row of ``cols`` (``(ny, len(xc))``) to ``0 … nx−1``, as float32.

    Same result as :func:`_interp_block` but evaluated interval by interval with Horner's rule straight into
    the output, avoiding the transposed float64 copies of a 16-Mpixel image.
    """
    ny = cols.shape[0]
    pp = Akima1DInterpolator(xc, cols, axis=1)
    c = pp.c.astype(np.float32)  # (4, n_intervals, ny), highest power first
    out = np.empty((ny, nx), dtype=np.float32)
    x = np.arange(nx, dtype=np.float64)
    edges = np.searchsorted(x, xc)  # first pixel at or after each node
    for j in range(xc.size - 1):
        lo, hi = edges[j], edges[j + 1]
        if hi <= lo:
            continue
        t = (x[lo:hi] - xc[j]).astype(np.float32)[None, :]
        v = c[0, j][:, None] * t
        v += c[1, j][:, None]
        v *= t
        v += c[2, j][:, None]
        v *= t
        v += c[3, j][:, None]
        out[:, lo:hi] = v
    # the last node itself and linear extension beyond the end nodes (secant slope, as _interp_block)
    s0 = ((cols[:, 1] - cols[:, 0]) / (xc[1] - xc[0])).astype(np.float32)[:, None]
    s1 = ((cols[:, -1] - cols[:, -2]) / (xc[-1] - xc[-2])).astype(np.float32)[:, None]
    if edges[0] > 0:
        out[:, : edges[0]] = cols[:, :1] + s0 * (x[: edges[0]] - xc[0]).astype(np.float32)[None, :]
    last = edges[-1]
    if last < nx:
        out[:, last:] = cols[:, -1:] + s1 * (x[last:] - xc[-1]).astype(np.float32)[None, :]
    return out


def estimate_background(
    image: np.ndarray,
    mask_bool: np.ndarray | None = None,
    bin_size: int = 32,
    statistic: Statistic = "meanclip",
    interp: str = "akima",
    *,
    filter_super_pixels: bool = False,
    nsigma: float = 3.0,
    niter: int = 3,
) -> np.ndarray:
    """Smooth background model of ``image`` (afw ``BackgroundMI`` with an Akima spline).

    Parameters
    ----------
    image
        2-D array.
    mask_bool
        True where pixels must be ignored (sources, bad pixels); non-finite pixels are always ignored.
    bin_size
        Super-pixel size (afw ``binSize``).
    statistic
        Super-pixel statistic: ``"meanclip"`` (afw default ``MEANCLIP``), ``"median"`` or ``"mean"``.
    interp
        ``"akima"`` (afw ``AKIMA_SPLINE``), ``"cubic"`` (natural cubic spline) or ``"linear"``.
    filter_super_pixels
        Apply a 3×3 median filter to the super-pixel grid first (afw ``doFilterSuperPixels``).

    Returns
    -------
    numpy.ndarray
        float32 background image of the same shape.
    """
    grid, _, xc, yc = bin_statistics(image, mask_bool, bin_size, statistic, nsigma=nsigma, niter=niter)
    if filter_super_pixels:
        grid = _median_filter_nan(grid)
    return interpolate_grid(grid, xc, yc, np.shape(image), interp)


def fit_polynomial_background(
    image: np.ndarray,
    mask_bool: np.ndarray | None = None,
    order: int = 1,
    bin_size: int = 32,
    statistic: Statistic = "meanclip",
    *,
    return_coefficients: bool = False,
):
    """Least-squares 2-D Chebyshev polynomial of total degree ``order`` through the super-pixel values.

    Coordinates are mapped to ``[-1, 1]`` over the image; each super-pixel is weighted by the square root of its
    number of good pixels (its value's inverse standard error for uniform noise). This is the low-order
    "approximation" background (afw ``useApprox``) suitable for difference images.

    Returns the float32 model image, and with ``return_coefficients`` also the coefficient matrix ``C`` with
    ``model = Σ_ij C[j, i] T_i(x') T_j(y')`` (zero for ``i + j > order``).
    """
    if order < 0:
        raise BadInputError(f"Polynomial background order must be >= 0, got {order}.")
    ny, nx = np.shape(image)
    grid, counts, xc, yc = bin_statistics(image, mask_bool, bin_size, statistic)
    ok = np.isfinite(grid)
    terms = [(i, j) for j in range(order + 1) for i in range(order + 1 - j)]
    if ok.sum() < len(terms):
        raise BadInputError(
            f"Only {int(ok.sum())} usable super-pixels for a polynomial background of order {order} "
            f"({len(terms)} terms); lower the order or the bin size."
        )

    def scale(v, n):
        return 2.0 * v / max(n - 1, 1) - 1.0

    tx = _cheb.chebvander(scale(xc, nx), order)  # (nbx, order+1)
    ty = _cheb.chebvander(scale(yc, ny), order)
    jj, ii = np.nonzero(ok)
    design = np.stack([ty[jj, j] * tx[ii, i] for i, j in terms], axis=1)
    w = np.sqrt(counts[ok].astype(np.float64))
    coef, *_ = np.linalg.lstsq(design * w[:, None], grid[ok] * w, rcond=None)
    cmat = np.zeros((order + 1, order + 1))
    for c, (i, j) in zip(coef, terms):
        cmat[j, i] = c
    fx = _cheb.chebvander(scale(np.arange(nx, dtype=np.float64), nx), order)  # (nx, order+1)
    fy = _cheb.chebvander(scale(np.arange(ny, dtype=np.float64), ny), order)
    model = (fy @ cmat @ fx.T).astype(np.float32)
    return (model, cmat) if return_coefficients else model
