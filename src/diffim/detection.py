"""Source detection on (difference) images: smoothing, thresholding, footprints, peaks, growth and merging.

This is the array layer behind :class:`diffim.tasks.detection.SourceDetectionTask`, a re-implementation of
LSST's ``SourceDetectionTask.detectFootprints`` (meas_algorithms) and of afw's ``FootprintSet`` growth and
``merge``:

1. **Smoothing** with the PSF-σ Gaussian (the matched filter for a Gaussian PSF): a separable, normalised
   Gaussian of width ``kw = (int(nSigma·σ + 0.5)//2)·2 + 1``, image ``Σ k·I``, variance ``Σ k²·V`` (the exact
   variance of the filtered image for uncorrelated pixels), mask OR over the ``kw × kw`` box. Only the interior
   ("middle", border ``kw//2``) is valid; the border is NaN in the smoothed planes.
2. **Threshold** ``pixel_stdev`` (``±I_s ≥ t·√V_s``), ``stdev`` (``±I_s ≥ t·σ_clip``), ``value``
   (``±I_s ≥ t``) or ``variance`` (``V_s ≥ t``), for positive and/or negative polarity.
3. **Footprints**: 8-connected components (``scipy.ndimage.label`` with a 3×3 structure), at least
   ``min_pixels`` pixels, and at least one pixel above ``t × include_threshold_multiplier``.
4. **Peaks**: every footprint pixel (not on the 1-px frame of the middle) with no strictly higher (lower, for
   negative polarity) 8-neighbour, sorted by decreasing value; significance ``polarity·value/√V_s``.
5. **Growth** by ``nGrow = int(nSigmaToGrow·σ + 0.5)`` with a circular (isotropic) or Manhattan stencil; with
   ``combined_grow`` overlapping or touching grown footprints of one polarity are merged.

:func:`merge_footprints` is afw's old ``FootprintSet.merge(rhs, 2, 2, isotropic=False)`` used by the old
ImageDifferenceTask to make one footprint of each dipole.

Everything is vectorised over the whole image (one ``label`` per polarity, peaks found by gathering the 8
neighbours of the above-threshold pixels only); the remaining Python work is per footprint, on its bounding box.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import DiffimValueError, PsfError
from .footprint import Footprint, Peak
from .model.box import Box

__all__ = [
    "THRESHOLD_TYPES",
    "POLARITIES",
    "smoothing_kernel_width",
    "gaussian_kernel_1d",
    "correlate_separable",
    "smear_mask",
    "box_any",
    "Smoothed",
    "smooth_for_detection",
    "clipped_stdev",
    "circle_stencil",
    "manhattan_stencil",
    "grow_footprint",
    "find_footprints",
    "detect_footprints",
    "merge_footprints",
    "footprints_to_mask",
    "n_grow_pixels",
    "detection_level",
    "detect_footprints_smoothed",
    "local_maxima",
]

THRESHOLD_TYPES = ("pixel_stdev", "stdev", "value", "variance")
POLARITIES = ("positive", "negative", "both")

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def local_maxima(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Which of the pixels ``(ys, xs)`` are 3×3 local maxima of ``image``: no neighbour inside the image is
    larger (ties and NaN neighbours do not disqualify). Tested at the given pixels only, so thresholding
    first and testing the survivors costs nothing image-sized."""
    ny, nx = image.shape
    vals = image[ys, xs]
    keep = np.ones(np.shape(ys), dtype=bool)
    for dy, dx in _NEIGHBOURS:
        # Clipping maps an outside neighbour onto the pixel itself or onto one of its real neighbours.
        keep &= ~(image[np.clip(ys + dy, 0, ny - 1), np.clip(xs + dx, 0, nx - 1)] > vals)
    return keep


# Rows per strip in the blocked separable filters: a strip of a 4k-wide float32 image (~0.5 MB) stays in cache
# while every tap is applied, which is ~4× faster than scipy.ndimage.correlate1d along axis 0.
_STRIP_ROWS = 32
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """Shared 2-thread pool: numpy releases the GIL on large array operations, so image and variance smooth in
    parallel."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)), thread_name_prefix="diffim-det")
    return _POOL


# ----------------------------------------------------------------------------------------------------------
# Smoothing
# ----------------------------------------------------------------------------------------------------------
def smoothing_kernel_width(sigma: float, n_sigma: float = 7.0) -> int:
    """Width of the detection smoothing kernel, ``(int(n_sigma·σ + 0.5)//2)·2 + 1`` (always odd), as LSST."""
    return (int(n_sigma * sigma + 0.5) // 2) * 2 + 1


def n_grow_pixels(sigma: float, n_sigma_to_grow: float = 2.4) -> int:
    """Footprint growth radius ``int(nSigmaToGrow·σ + 0.5)`` in pixels."""
    return int(n_sigma_to_grow * sigma + 0.5)


def gaussian_kernel_1d(sigma: float, width: int) -> np.ndarray:
    """Gaussian of ``sigma`` evaluated at the integer offsets ``-width//2 … width//2``, normalised to unit sum."""
    h = width // 2
    x = np.arange(-h, h + 1, dtype=float)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _correlate_rows(a: np.ndarray, k: np.ndarray, out: np.ndarray, r_start: int, r_end: int) -> None:
    """Interior of the separable correlation ``Σ_ij k_i k_j a[y+i, x+j]`` for output rows ``[r_start, r_end)``.

    Works on strips of rows so that every tap is applied while the strip is in cache; uses the symmetry of
    ``k`` (pairs ``a[y-i] + a[y+i]``) to halve the multiplications.
    """
    h = len(k) // 2
    nx = a.shape[1]
    wx = nx - 2 * h
    acc = np.empty((_STRIP_ROWS, nx), dtype=np.float32)
    pair = np.empty((_STRIP_ROWS, nx), dtype=np.float32)
    pair2 = np.empty((_STRIP_ROWS, wx), dtype=np.float32)
    kf = k.astype(np.float32)
    for r0 in range(r_start, r_end, _STRIP_ROWS):
        r1 = min(r0 + _STRIP_ROWS, r_end)
        n = r1 - r0
        t, p = acc[:n], pair[:n]
        np.multiply(a[r0:r1], kf[h], out=t)
        for i in range(1, h + 1):
            np.add(a[r0 - i : r1 - i], a[r0 + i : r1 + i], out=p)
            p *= kf[h + i]
            t += p
        o, p2 = out[r0:r1, h : nx - h], pair2[:n]
        np.multiply(t[:, h : nx - h], kf[h], out=o)
        for i in range(1, h + 1):
            np.add(t[:, h - i : nx - h - i], t[:, h + i : nx - h + i], out=p2)
            p2 *= kf[h + i]
            o += p2


def correlate_separable(
    array: np.ndarray, kernel_1d: np.ndarray, out: np.ndarray | None = None, fill: float = np.nan, threads: int = 1
) -> np.ndarray:
    """Correlate a 2-D array with the separable symmetric kernel ``k ⊗ k`` (float32), valid interior only.

    Parameters
    ----------
    array
        2-D image; converted to float32.
    kernel_1d
        Odd-length symmetric 1-D kernel.
    out
        Optional float32 output array of the same shape.
    fill
        Value of the border of width ``len(k)//2`` where the kernel does not fit (afw's copy-edge-off
        convolution leaves it undefined; NaN keeps it out of any threshold).
    threads
        Split the rows over this many threads of the shared pool.
    """
    a = np.ascontiguousarray(array, dtype=np.float32)
    k = np.asarray(kernel_1d, dtype=float)
    if k.ndim != 1 or len(k) % 2 == 0:
        raise DiffimValueError(f"The smoothing kernel must be 1-D with odd length, got shape {k.shape}.")
    if out is None:
        out = np.empty(a.shape, dtype=np.float32)
    h = len(k) // 2
    ny, nx = a.shape
    if ny <= 2 * h or nx <= 2 * h:
        out[...] = fill
        return out
    out[:h] = fill
    out[ny - h :] = fill
    out[:, :h] = fill
    out[:, nx - h :] = fill
    if threads <= 1 or ny - 2 * h < 4 * _STRIP_ROWS:
        _correlate_rows(a, k, out, h, ny - h)
    else:
        edges = np.linspace(h, ny - h, threads + 1).astype(int)
        futures = [_pool().submit(_correlate_rows, a, k, out, int(e0), int(e1))
                   for e0, e1 in zip(edges[:-1], edges[1:])]
        for f in futures:
            f.result()
    return out


def smear_mask(mask: np.ndarray, width: int) -> np.ndarray:
    """OR of the mask bits over the ``width × width`` box around every pixel (afw convolution mask rule).

    The box is clipped at the array edges. Returns a new int32 array.
    """
    m = np.asarray(mask, dtype=np.int32)
    h = width // 2
    if h == 0 or not m.any():
        return m.copy()
    out = m.copy()
    for axis in (0, 1):
        src = out.copy()
        n = m.shape[axis]
        for i in range(1, min(h, n - 1) + 1):
            if axis == 0:
                out[i:] |= src[:-i]
                out[:-i] |= src[i:]
            else:
                out[:, i:] |= src[:, :-i]
                out[:, :-i] |= src[:, i:]
    return out


def box_any(flags: np.ndarray, width: int) -> np.ndarray:
    """Boolean dilation of ``flags`` by a ``width × width`` box (separable running maximum)."""
    u = flags.view(np.uint8) if flags.dtype == bool else flags.astype(np.uint8)
    out = ndimage.maximum_filter1d(u, width, axis=0, mode="constant", cval=0)
    out = ndimage.maximum_filter1d(out, width, axis=1, mode="constant", cval=0)
    return out.view(bool)


@dataclass
class Smoothed:
    """The PSF-smoothed detection image.

    Attributes
    ----------
    image, variance
        Smoothed planes (float32; NaN on the border of width ``border``).
    mask
        Smeared mask (OR over the kernel box), or None if not computed.
    kernel_width
        Width ``kw`` of the smoothing kernel (1 if not smoothed).
    border
        ``kw // 2``: the part of the image where the kernel does not fit.
    sigma
        Gaussian σ of the smoothing kernel (NaN if not smoothed).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray | None
    kernel_width: int
    border: int
    sigma: float

    @property
    def middle(self) -> tuple[slice, slice]:
        """Slices of the valid interior."""
        b = self.border
        ny, nx = self.image.shape
        return slice(b, max(b, ny - b)), slice(b, max(b, nx - b))


def smooth_for_detection(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    sigma: float,
    n_sigma_for_kernel: float = 7.0,
    smooth_mask: bool = True,
) -> Smoothed:
    """Smooth image (``Σk·I``), variance (``Σk²·V``) and mask (OR) with the PSF-σ Gaussian.

    The kernel is the normalised 1-D Gaussian of ``sigma`` at integer offsets, applied along both axes, of width
    :func:`smoothing_kernel_width`. Image and variance are filtered concurrently on two threads.
    """
    if not (np.isfinite(sigma) and sigma > 0):
        raise PsfError(f"Detection smoothing needs a finite PSF sigma > 0, got {sigma}; check the exposure's PSF.")
    kw = smoothing_kernel_width(sigma, n_sigma_for_kernel)
    k = gaussian_kernel_1d(sigma, kw)
    pool = _pool()
    f_img = pool.submit(correlate_separable, image, k)
    f_var = pool.submit(correlate_separable, variance, k * k)
    smask = smear_mask(mask, kw) if (mask is not None and smooth_mask) else None
    return Smoothed(f_img.result(), f_var.result(), smask, kw, kw // 2, float(sigma))


def _unsmoothed(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, copy_image: bool) -> Smoothed:
    """The unsmoothed planes as a :class:`Smoothed` (``doSmooth=False``: e.g. a score image). The image is
    copied only if it will be modified (excluded planes zeroed); variance and mask are shared, read-only."""
    img = np.array(image, dtype=np.float32, copy=True) if copy_image else np.asarray(image, dtype=np.float32)
    var = np.asarray(variance, dtype=np.float32)
    return Smoothed(img, var, None if mask is None else np.asarray(mask), 1, 0, float("nan"))


def clipped_stdev(values: np.ndarray, n_sigma: float = 3.0, n_iter: int = 3) -> float:
    """σ-clipped standard deviation (afw ``STDEVCLIP``: start from median and IQR, clip at ``n_sigma``).

    Non-finite values are ignored. Returns NaN for fewer than two usable values.
    """
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size < 2:
        return float("nan")
    q25, centre, q75 = np.percentile(v, [25.0, 50.0, 75.0])
    sd = 0.741 * (q75 - q25)
    if not sd > 0:  # more than half the values identical (e.g. zeroed excluded pixels): start from the plain σ
        sd = float(v.std())
    for _ in range(n_iter):
        if not sd > 0:
            break
        keep = np.abs(v - centre) < n_sigma * sd
        if keep.sum() < 2:
            break
        centre = float(v[keep].mean())
        sd = float(v[keep].std(ddof=1))
    return float(sd)


# ----------------------------------------------------------------------------------------------------------
# Growth stencils
# ----------------------------------------------------------------------------------------------------------
def circle_stencil(radius: int) -> np.ndarray:
    """afw CIRCLE stencil: row ``dy`` spans ``|dx| ≤ int(√(r² − dy²))`` (i.e. ``dx² + dy² ≤ r²``)."""
    r = int(radius)
    d = np.arange(-r, r + 1)
    return d[None, :] ** 2 + d[:, None] ** 2 <= r * r


def manhattan_stencil(radius: int) -> np.ndarray:
    """afw MANHATTAN stencil: ``|dx| + |dy| ≤ r``."""
    r = int(radius)
    d = np.abs(np.arange(-r, r + 1))
    return d[None, :] + d[:, None] <= r


def _stencil_half_widths(radius: int, isotropic: bool) -> list[tuple[int, int]]:
    """``(dy, half-width)`` rows of the CIRCLE or MANHATTAN stencil of ``radius``."""
    r = int(radius)
    if isotropic:
        return [(dy, int(math.isqrt(r * r - dy * dy))) for dy in range(-r, r + 1)]
    return [(dy, r - abs(dy)) for dy in range(-r, r + 1)]


def _dilate(spans: np.ndarray, radius: int, isotropic: bool) -> np.ndarray:
    """Dilate boolean arrays (last two axes) by the stencil; the result is padded by ``radius`` on every side.

    The stencil is a stack of rows of half-width ``q(dy)``: each distinct ``q`` is one horizontal running-OR
    (a difference of cumulative sums), OR-ed in shifted by ``dy``. Leading axes batch many footprints into one
    set of numpy operations.
    """
    r = int(radius)
    h, w = spans.shape[-2:]
    lead = spans.shape[:-2]
    W = w + 2 * r
    # Columns padded by 2r so that every window of half-width ≤ r around an output column is inside.
    csum = np.zeros(lead + (h, W + 2 * r + 1), dtype=np.int32)
    np.cumsum(spans, axis=-1, dtype=np.int32, out=csum[..., 2 * r + 1 : 2 * r + 1 + w])
    csum[..., 2 * r + 1 + w :] = csum[..., 2 * r + w : 2 * r + w + 1]
    out = np.zeros(lead + (h + 2 * r, W), dtype=bool)
    rows: dict[int, np.ndarray] = {}
    for dy, q in _stencil_half_widths(r, isotropic):
        dil = rows.get(q)
        if dil is None:
            # Output column X (original X − r) covers padded columns [X + r − q, X + r + q].
            dil = rows[q] = (csum[..., r + q + 1 : r + q + 1 + W] - csum[..., r - q : r - q + W]) > 0
        out[..., r + dy : r + dy + h, :] |= dil
    return out


def _grow_many(spans_list: list[np.ndarray], radius: int, isotropic: bool) -> list[np.ndarray]:
    """Dilate many small footprints at once: footprints are bucketed by size (rounded up to 8 px), stacked and
    dilated with one :func:`_dilate` per bucket, so the cost is a few numpy calls per bucket, not per footprint."""
    r = int(radius)
    out: list[np.ndarray | None] = [None] * len(spans_list)
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(spans_list):
        key = (-(-s.shape[0] // 8) * 8, -(-s.shape[1] // 8) * 8)
        buckets.setdefault(key, []).append(i)
    for (hb, wb), idx in buckets.items():
        stack = np.zeros((len(idx), hb, wb), dtype=bool)
        for k, i in enumerate(idx):
            s = spans_list[i]
            stack[k, : s.shape[0], : s.shape[1]] = s
        grown = _dilate(stack, r, isotropic)
        for k, i in enumerate(idx):
            h, w = spans_list[i].shape
            out[i] = grown[k, : h + 2 * r, : w + 2 * r].copy()
    return out  # type: ignore[return-value]


def _grow_spans(spans: np.ndarray, bbox: Box, radius: int, isotropic: bool, clip: Box | None) -> tuple[np.ndarray, Box]:
    """Dilate a footprint's spans by the stencil; return the grown spans and their (clipped) bbox."""
    if radius <= 0:
        return spans, bbox
    return _clip(_dilate(spans, radius, isotropic), bbox.grown(int(radius)), clip)


def _clip(spans: np.ndarray, box: Box, clip: Box | None) -> tuple[np.ndarray, Box]:
    if clip is None or clip.contains(box):
        return spans, box
    cbox = box.intersection(clip)
    return spans[cbox.slices(box)], cbox


def _touching_groups(fps: list[Footprint]) -> list[list[int]]:
    """Groups (connected components) of footprints whose pixels overlap or are 8-adjacent.

    Candidate pairs come from a sweep over bounding boxes grown by 1 px (sorted by x0, ``searchsorted`` window),
    so the cost is linear in the number of footprints for isolated sources; only pairs whose boxes touch are
    checked pixel by pixel.
    """
    n = len(fps)
    if n <= 1:
        return [[i] for i in range(n)]
    x0 = np.array([f.bbox.x0 for f in fps]) - 1
    x1 = np.array([f.bbox.x1 for f in fps]) + 1
    y0 = np.array([f.bbox.y0 for f in fps]) - 1
    y1 = np.array([f.bbox.y1 for f in fps]) + 1
    order = np.argsort(x0, kind="stable")
    xs0 = x0[order]
    hi = np.searchsorted(xs0, x1[order] - 1, side="right")  # boxes j with x0_j < x1_i
    counts = hi - np.arange(n) - 1
    counts = np.maximum(counts, 0)
    ii = np.repeat(np.arange(n), counts)
    jj = ii + 1 + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    a, b = order[ii], order[jj]
    ok = (y0[a] < y1[b]) & (y0[b] < y1[a]) & (x0[b] < x1[a]) & (x0[a] < x1[b])
    a, b = a[ok], b[ok]
    keep_a, keep_b = [], []
    grown: dict[int, np.ndarray] = {}  # a large footprint (bleed trail, border) meets many boxes: grow it once
    # Plain-integer box arithmetic: (x0, y0, x1, y1) above are the boxes grown by 1 px, so the original box of
    # B is (x0 + 1, y0 + 1, x1 − 1, y1 − 1).
    X0, Y0, X1, Y1 = x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist()
    for i, j in zip(a.tolist(), b.tolist()):
        fa, fb = fps[i], fps[j]
        # Grow A by one pixel (3×3) and test for common pixels with B on their joint box.
        ga = grown.get(i)
        if ga is None:
            h, w = fa.spans.shape
            ga = np.zeros((h + 2, w + 2), dtype=bool)
            for dy in range(3):
                for dx in range(3):
                    ga[dy : dy + h, dx : dx + w] |= fa.spans
            grown[i] = ga
        ax0, ay0 = X0[i], Y0[i]
        bx0, by0 = X0[j] + 1, Y0[j] + 1
        cx0, cy0 = max(ax0, bx0), max(ay0, by0)
        cx1, cy1 = min(X1[i], X1[j] - 1), min(Y1[i], Y1[j] - 1)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        if np.any(ga[cy0 - ay0 : cy1 - ay0, cx0 - ax0 : cx1 - ax0]
                  & fb.spans[cy0 - by0 : cy1 - by0, cx0 - bx0 : cx1 - bx0]):
            keep_a.append(i)
            keep_b.append(j)
    if not keep_a:
        return [[i] for i in range(n)]
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(keep_a), dtype=np.int8), (keep_a, keep_b)), shape=(n, n))
    ncomp, comp = connected_components(graph, directed=False)
    groups: list[list[int]] = [[] for _ in range(ncomp)]
    for i, c in enumerate(comp.tolist()):
        groups[c].append(i)
    return groups


def _union(fps: list[Footprint]) -> Footprint:
    """One footprint made of the pixels and peaks of ``fps`` (peaks: positive by decreasing value, then
    negative by decreasing value, so the most negative is last). A single footprint is returned as is."""
    if len(fps) == 1:
        return fps[0]
    box = Box.from_corners(
        min(f.bbox.x0 for f in fps), min(f.bbox.y0 for f in fps),
        max(f.bbox.x1 for f in fps), max(f.bbox.y1 for f in fps),
    )
    spans = np.zeros(box.shape, dtype=bool)
    for f in fps:
        spans[f.bbox.slices(box)] |= f.spans
    peaks = sorted((p for f in fps for p in f.peaks), key=lambda p: (p.is_negative, -p.value, p.x, p.y))
    from_pos = any(f.from_positive for f in fps)
    from_neg = any(f.from_negative for f in fps)
    return Footprint(box, spans, peaks, from_neg and not from_pos, from_pos, from_neg)


def grow_footprint(fp: Footprint, radius: int, isotropic: bool = True, clip: Box | None = None) -> Footprint:
    """A copy of ``fp`` dilated by ``radius`` with the CIRCLE (isotropic) or MANHATTAN stencil, clipped to ``clip``."""
    spans, box = _grow_spans(fp.spans, fp.bbox, radius, isotropic, clip)
    return Footprint(box, spans, list(fp.peaks), fp.is_negative, fp.from_positive, fp.from_negative)


# ----------------------------------------------------------------------------------------------------------
# Footprints and peaks of one polarity
# ----------------------------------------------------------------------------------------------------------
def detection_level(variance: np.ndarray, threshold: float) -> np.ndarray:
    """Per-pixel ``pixel_stdev`` threshold ``t·√V`` of the detection image, +inf where ``V ≤ 0`` or NaN.

    Zero-variance pixels (e.g. NO_DATA filled with 0) carry no information; with a level of 0 every such pixel
    would pass ``I ≥ t·√V``, so they are made undetectable instead. Computed in place in one float32 array.
    """
    with np.errstate(invalid="ignore"):
        level = np.sqrt(variance, dtype=np.float32)
        level *= np.float32(threshold)
        level[~(variance > 0)] = np.inf
    return level


def _peak_sort(labels: np.ndarray, values: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Order grouping peaks by label, then decreasing value, ties by x then y."""
    return np.lexsort((ys, xs, -values, labels))


def _pixel_snr(values: np.ndarray, variance: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return values / np.sqrt(variance)


def find_footprints(
    smoothed: Smoothed,
    threshold: float,
    *,
    negative: bool = False,
    threshold_type: str = "pixel_stdev",
    threshold_scale: float = 1.0,
    min_pixels: int = 1,
    include_threshold_multiplier: float = 1.0,
    n_grow: int = 0,
    isotropic_grow: bool = True,
    combined_grow: bool = True,
    return_original: bool = False,
    xy0: tuple[int, int] = (0, 0),
    level: np.ndarray | None = None,
) -> tuple[list[Footprint], np.ndarray]:
    """Footprints and peaks of one polarity on a smoothed image.

    Parameters
    ----------
    smoothed
        Output of :func:`smooth_for_detection`.
    threshold
        Threshold ``t`` in the units of ``threshold_type``.
    negative
        Detect ``-I_s`` (negative polarity); peaks keep the signed (negative) values.
    threshold_type
        ``pixel_stdev``: ``±I_s ≥ t·√V_s`` (only where ``V_s > 0``); ``stdev`` or ``value``: ``±I_s ≥
        t·threshold_scale`` (``threshold_scale`` = clipped σ for stdev, 1 for value); ``variance``: ``V_s ≥ t``.
    min_pixels
        Minimum footprint area before growth.
    include_threshold_multiplier
        A footprint is kept only if one of its pixels passes ``t × multiplier``.
    n_grow
        Growth radius in pixels (0: none).
    isotropic_grow, combined_grow
        CIRCLE vs MANHATTAN stencil; merge grown footprints that overlap or touch.
    return_original
        Return the footprints before growth (``n_grow`` is then only used for the returned mask).
    xy0
        Parent coordinates of pixel ``[0, 0]``.
    level
        Precomputed :func:`detection_level` of the middle (``pixel_stdev``; shared by both polarities), or None.

    Returns
    -------
    footprints, detected
        The footprints (peaks sorted by decreasing value) and the boolean map of their grown pixels (for the
        DETECTED / DETECTED_NEGATIVE plane).
    """
    if threshold_type not in THRESHOLD_TYPES:
        raise DiffimValueError(f"Unknown threshold type {threshold_type!r}; use one of {THRESHOLD_TYPES}.")
    img, var = smoothed.image, smoothed.variance
    ny, nx = img.shape
    sign = -1.0 if negative else 1.0
    b = smoothed.border
    detected = np.zeros((ny, nx), dtype=bool)
    if ny <= 2 * b or nx <= 2 * b:
        return [], detected
    mid = smoothed.middle
    im, vm = img[mid], var[mid]

    # Above-threshold pixels of the middle.  Comparisons with NaN are False, so NaN pixels never qualify.
    with np.errstate(invalid="ignore"):
        if threshold_type == "pixel_stdev":
            # ±I ≥ level in row blocks: neither the negated image nor (unless given) the level map is ever a
            # full-size temporary (64 MiB each at 4096²).
            sel = np.empty(im.shape, dtype=bool)
            for r0 in range(0, im.shape[0], 256):
                r1 = r0 + 256
                lv = detection_level(vm[r0:r1], threshold) if level is None else level[r0:r1]
                np.greater_equal(np.negative(im[r0:r1]) if negative else im[r0:r1], lv, out=sel[r0:r1])
        elif threshold_type == "variance":
            sel = vm >= np.float32(threshold)
        else:
            level = np.float32(threshold * threshold_scale)
            sel = (im >= level) if not negative else (im <= -level)

    labels_mid, n = ndimage.label(sel, structure=_EIGHT_CONNECTED)
    if n == 0:
        return [], detected
    ys, xs = np.nonzero(sel)
    lab = labels_mid[ys, xs]
    vals = im[ys, xs]
    area = np.bincount(lab, minlength=n + 1)
    keep = area >= max(1, int(min_pixels))
    keep[0] = False
    if include_threshold_multiplier != 1.0 and threshold_type != "variance":
        pixel = threshold_type == "pixel_stdev"
        snr = sign * (_pixel_snr(vals, vm[ys, xs]) if pixel else vals)
        need = threshold * include_threshold_multiplier * (1.0 if pixel else threshold_scale)
        with np.errstate(invalid="ignore"):
            strong = np.bincount(lab[snr >= need], minlength=n + 1) > 0
        keep &= strong
    if not keep[1:].any():
        return [], detected

    # Peaks: candidate pixels off the 1-px frame of the middle whose 8 neighbours are all ≤ (≥) them.
    my, mx = sel.shape
    inner = keep[lab] & (ys > 0) & (ys < my - 1) & (xs > 0) & (xs < mx - 1)
    cy, cx, cv, cl = ys[inner], xs[inner], vals[inner], lab[inner]
    # Candidates are dropped as soon as one neighbour beats them, so later neighbours test far fewer pixels
    # (the first comparison already removes about half of a footprint's pixels).
    for dy, dx in _NEIGHBOURS:
        nb = im[cy + dy, cx + dx]
        ok = ~(nb < cv) if negative else ~(nb > cv)
        cy, cx, cv, cl = cy[ok], cx[ok], cv[ok], cl[ok]
    py, px, pv, pl = cy, cx, cv, cl
    # Footprints with no proper peak (all candidates on the frame): use their extreme pixel.
    has_peak = np.zeros(n + 1, dtype=bool)
    has_peak[pl] = True
    lacking = keep & ~has_peak
    if lacking.any():
        sub = np.nonzero(lacking[lab])[0]
        order = np.lexsort((sign * -vals[sub], lab[sub]))
        first = sub[order][np.r_[True, np.diff(lab[sub][order]) != 0]]
        py = np.concatenate([py, ys[first]])
        px = np.concatenate([px, xs[first]])
        pv = np.concatenate([pv, vals[first]])
        pl = np.concatenate([pl, lab[first]])
    order = _peak_sort(pl, pv, px, py)
    py, px, pv, pl = py[order], px[order], pv[order], pl[order]
    if threshold_type == "pixel_stdev":
        sig = sign * _pixel_snr(pv, vm[py, px])
    elif threshold_type == "stdev":
        sig = sign * pv / threshold_scale
    else:
        sig = np.zeros_like(pv)
    # Parent coordinates of middle pixel (0, 0).
    ox, oy = xy0[0] + b, xy0[1] + b
    starts = np.searchsorted(pl, np.arange(n + 2)).tolist()
    pxl, pyl, pvl, sgl = (px + ox).tolist(), (py + oy).tolist(), pv.tolist(), sig.tolist()
    # Bounding boxes from the pixel list by unbuffered per-label min/max (O(n), no sort of the pixels; cheaper
    # than find_objects, which scans the whole image). Index 0 (background) is unused.
    ymin = np.full(n + 1, ny, dtype=np.int64)
    ymax = np.full(n + 1, -1, dtype=np.int64)
    xmin = np.full(n + 1, nx, dtype=np.int64)
    xmax = np.full(n + 1, -1, dtype=np.int64)
    np.minimum.at(ymin, lab, ys)
    np.maximum.at(ymax, lab, ys)
    np.minimum.at(xmin, lab, xs)
    np.maximum.at(xmax, lab, xs)
    ymin, ymax, xmin, xmax = ymin[1:], ymax[1:], xmin[1:], xmax[1:]
    # (x0, y0, width, height, spans, peaks) per footprint; Footprint/Box objects are only built for what is
    # returned (thousands of footprints on a crowded image: object construction was a visible cost).
    raw = []
    for label in np.nonzero(keep)[0].tolist():
        s0, s1 = starts[label], starts[label + 1]
        peaks = [Peak(pxl[i], pyl[i], pvl[i], sgl[i], negative) for i in range(s0, s1)]
        y0, y1, x0, x1 = int(ymin[label - 1]), int(ymax[label - 1]) + 1, int(xmin[label - 1]), int(xmax[label - 1]) + 1
        spans = labels_mid[y0:y1, x0:x1] == label
        raw.append((x0 + ox, y0 + oy, x1 - x0, y1 - y0, spans, peaks))

    def _originals() -> list[Footprint]:
        return [Footprint(Box(bx, by, bw, bh), sp, pk, negative, not negative, negative)
                for bx, by, bw, bh, sp, pk in raw]

    if n_grow <= 0:
        X0, Y0 = xy0
        for bx, by, bw, bh, sp, _ in raw:
            detected[by - Y0 : by - Y0 + bh, bx - X0 : bx - X0 + bw] |= sp
        return _originals(), detected

    # Grown boxes clipped to the image with plain integers (thousands of footprints: Box arithmetic per
    # footprint was a large part of the detection time on crowded images).
    X0, Y0 = xy0
    X1, Y1 = X0 + nx, Y0 + ny
    grown: list[Footprint] = []
    for (bx, by, bw, bh, _, pk), gspans in zip(raw, _grow_many([r[4] for r in raw], n_grow, isotropic_grow)):
        gx0, gy0 = bx - n_grow, by - n_grow
        gx1, gy1 = bx + bw + n_grow, by + bh + n_grow
        cx0, cy0, cx1, cy1 = max(gx0, X0), max(gy0, Y0), min(gx1, X1), min(gy1, Y1)
        if cx0 != gx0 or cy0 != gy0 or cx1 != gx1 or cy1 != gy1:
            gspans = gspans[cy0 - gy0 : cy1 - gy0, cx0 - gx0 : cx1 - gx0]
        detected[cy0 - Y0 : cy1 - Y0, cx0 - X0 : cx1 - X0] |= gspans
        grown.append(Footprint(Box(cx0, cy0, cx1 - cx0, cy1 - cy0), gspans, pk, negative, not negative, negative))
    if return_original:
        return _originals(), detected
    if not combined_grow:
        return grown, detected
    return [_union([grown[i] for i in g]) for g in _touching_groups(grown)], detected


# ----------------------------------------------------------------------------------------------------------
# Whole detection
# ----------------------------------------------------------------------------------------------------------
def detect_footprints(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    psf_sigma: float,
    threshold: float = 5.0,
    polarity: str = "both",
    *,
    threshold_type: str = "pixel_stdev",
    do_smooth: bool = True,
    n_sigma_for_kernel: float = 7.0,
    min_pixels: int = 1,
    include_threshold_multiplier: float = 1.0,
    n_sigma_to_grow: float = 2.4,
    isotropic_grow: bool = True,
    combined_grow: bool = True,
    return_original: bool = False,
    stats_bits: int = 0,
    exclude_bits: int = 0,
    smooth_mask: bool = False,
    xy0: tuple[int, int] = (0, 0),
) -> tuple[list[Footprint], list[Footprint], np.ndarray, np.ndarray]:
    """Detect positive and/or negative sources (LSST ``detectFootprints`` on arrays).

    Parameters
    ----------
    image, variance
        Pixel planes (any float dtype; computed in float32).
    mask
        Integer mask plane (needed for ``stats_bits``/``exclude_bits``), or None.
    psf_sigma
        Gaussian σ (pixels) of the PSF: sets the smoothing kernel and the growth radius.
    threshold
        Detection threshold (``thresholdValue``).
    polarity
        ``"positive"``, ``"negative"`` or ``"both"``.
    threshold_type
        One of :data:`THRESHOLD_TYPES`.
    do_smooth
        Smooth with the PSF Gaussian first (False: the image is already a likelihood / score image).
    stats_bits
        Mask bits ignored by the clipped σ of the ``stdev`` threshold (``statsMask``).
    exclude_bits
        Mask bits of pixels left out of detection (``excludeMaskPlanes``): their image and variance count as 0
        in the smoothed sums, and the smoothed image is 0 on them.
    smooth_mask
        Also compute the full smeared mask (returned on the :class:`Smoothed` by
        :func:`detect_footprints_smoothed`); not needed for detection itself.
    xy0
        Parent coordinates of pixel ``[0, 0]``.

    Returns
    -------
    positive, negative, smoothed_image, smoothed_variance
        Footprint lists (grown, see :func:`find_footprints`) and the smoothed planes.
    """
    pos, neg, sm, _, _ = detect_footprints_smoothed(
        image, variance, mask, psf_sigma, threshold, polarity, threshold_type=threshold_type, do_smooth=do_smooth,
        n_sigma_for_kernel=n_sigma_for_kernel, min_pixels=min_pixels,
        include_threshold_multiplier=include_threshold_multiplier, n_sigma_to_grow=n_sigma_to_grow,
        isotropic_grow=isotropic_grow, combined_grow=combined_grow, return_original=return_original,
        stats_bits=stats_bits, exclude_bits=exclude_bits, smooth_mask=smooth_mask, xy0=xy0,
    )
    return pos, neg, sm.image, sm.variance


def detect_footprints_smoothed(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    psf_sigma: float,
    threshold: float = 5.0,
    polarity: str = "both",
    *,
    threshold_type: str = "pixel_stdev",
    do_smooth: bool = True,
    n_sigma_for_kernel: float = 7.0,
    min_pixels: int = 1,
    include_threshold_multiplier: float = 1.0,
    n_sigma_to_grow: float = 2.4,
    isotropic_grow: bool = True,
    combined_grow: bool = True,
    return_original: bool = False,
    stats_bits: int = 0,
    exclude_bits: int = 0,
    smooth_mask: bool = False,
    xy0: tuple[int, int] = (0, 0),
    extra_variance: np.ndarray | None = None,
    extra_offset: np.ndarray | None = None,
) -> tuple[list[Footprint], list[Footprint], Smoothed, np.ndarray, np.ndarray]:
    """:func:`detect_footprints` also returning the :class:`Smoothed` planes and the positive and negative
    detection maps (grown footprints, booleans of the image shape). Same parameters, and:

    extra_variance
        Variance to add to the *smoothed* image's (e.g. static-star residuals,
        :func:`diffim.star_residuals.residual_variance`), same shape. With ``thresholdType='stdev'`` the
        level becomes ``t·√(stdev² + extra)`` (the threshold is then applied as ``pixel_stdev`` on that
        variance).
    extra_offset
        Image subtracted from the *smoothed* image before thresholding, same shape: a model of a systematic
        residual (bright stars' halos, :func:`diffim.star_residuals.halo_model`). The returned ``Smoothed``
        image is the corrected one.
    """
    if polarity not in POLARITIES:
        raise DiffimValueError(f"Unknown threshold polarity {polarity!r}; use one of {POLARITIES}.")
    if threshold_type not in THRESHOLD_TYPES:
        raise DiffimValueError(f"Unknown threshold type {threshold_type!r}; use one of {THRESHOLD_TYPES}.")
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2 or variance.shape != image.shape or (mask is not None and np.shape(mask) != image.shape):
        from .errors import ShapeMismatchError

        raise ShapeMismatchError(
            f"Image {image.shape}, variance {variance.shape} and mask {np.shape(mask)} must be 2-D and equal."
        )
    excluded = None
    if mask is not None and exclude_bits:
        excluded = (np.asarray(mask) & int(exclude_bits)) != 0
        if not excluded.any():
            excluded = None
    if do_smooth:
        if excluded is not None:
            # Excluded pixels (EDGE, NO_DATA, BAD: garbage in a difference) contribute nothing to the smoothed
            # sums — image and variance 0 — so the S/N beside them is that of the good pixels. Smoothing their
            # values instead spread a bad column over the kernel box: a column-long footprint that swallowed
            # transients 7 px away; zeroing the smoothed image over the smeared mask instead lost every
            # source within the kernel's half-width of the border.
            img_in = np.where(excluded, np.float32(0.0), image).astype(np.float32, copy=False)
            var_in = np.where(excluded, np.float32(0.0), variance).astype(np.float32, copy=False)
            sm = smooth_for_detection(img_in, var_in, mask, psf_sigma, n_sigma_for_kernel, smooth_mask=smooth_mask)
            del img_in, var_in  # 2 image-sized planes that need not live through the thresholding
        else:
            sm = smooth_for_detection(image, variance, mask, psf_sigma, n_sigma_for_kernel, smooth_mask=smooth_mask)
    else:
        sm = _unsmoothed(image, variance, mask, copy_image=excluded is not None)
    kw = sm.kernel_width
    if excluded is not None:
        sm.image[excluded & np.isfinite(sm.image)] = 0.0
    del excluded
    if extra_offset is not None:
        off = np.asarray(extra_offset, dtype=np.float32)
        if off.shape != image.shape:
            from .errors import ShapeMismatchError

            raise ShapeMismatchError(f"extra_offset {off.shape} must have the image's shape {image.shape}.")
        sm.image = sm.image - off  # a new array: the unsmoothed path may share the caller's image
    scale = 1.0
    if threshold_type == "stdev":
        vals = sm.image[sm.middle]
        if mask is not None and stats_bits:
            bad = (np.asarray(mask) & int(stats_bits)) != 0
            if kw > 1:
                bad = box_any(bad, kw)
            vals = vals[~bad[sm.middle]]
        scale = clipped_stdev(vals)
        if not (np.isfinite(scale) and scale > 0):
            raise DiffimValueError(
                "Cannot compute the clipped standard deviation of the detection image (no good pixels); "
                "check statsMask or use thresholdType='pixel_stdev'."
            )
    if extra_variance is not None and threshold_type != "variance":
        extra = np.asarray(extra_variance, dtype=np.float32)
        if extra.shape != image.shape:
            from .errors import ShapeMismatchError

            raise ShapeMismatchError(f"extra_variance {extra.shape} must have the image's shape {image.shape}.")
        if threshold_type == "stdev":
            sm.variance = np.float32(scale * scale) + extra
            threshold_type, scale = "pixel_stdev", 1.0
        else:
            if not do_smooth:  # the unsmoothed variance is shared with the caller: do not add in place
                sm.variance = np.array(sm.variance, dtype=np.float32, copy=True)
            sm.variance += extra
    n_grow = n_grow_pixels(psf_sigma, n_sigma_to_grow) if np.isfinite(psf_sigma) else 0
    common = dict(
        threshold_type=threshold_type, threshold_scale=scale, min_pixels=min_pixels,
        include_threshold_multiplier=include_threshold_multiplier, n_grow=n_grow, isotropic_grow=isotropic_grow,
        combined_grow=combined_grow, return_original=return_original, xy0=xy0,
    )
    do_pos = polarity != "negative"
    do_neg = polarity != "positive" and threshold_type != "variance"
    # The two polarities are independent: run the negative one on the pool while this thread does the positive.
    fut = _pool().submit(find_footprints, sm, threshold, negative=True, **common) if (do_pos and do_neg) else None
    empty = np.zeros(image.shape, dtype=bool)
    pos, pos_map = find_footprints(sm, threshold, negative=False, **common) if do_pos else ([], empty)
    if fut is not None:
        neg, neg_map = fut.result()
    elif do_neg:
        neg, neg_map = find_footprints(sm, threshold, negative=True, **common)
    else:
        neg, neg_map = [], empty
    return pos, neg, sm, pos_map, neg_map


# ----------------------------------------------------------------------------------------------------------
# Merging polarities and painting masks
# ----------------------------------------------------------------------------------------------------------
def footprints_to_mask(
    footprints: list[Footprint], shape: tuple[int, int], xy0: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Boolean map (array ``shape`` at ``xy0``) of the pixels of ``footprints`` (parts outside are clipped)."""
    out = np.zeros(shape, dtype=bool)
    frame = Box(xy0[0], xy0[1], shape[1], shape[0])
    for fp in footprints:
        box = fp.bbox.intersection(frame)
        if box.is_empty():
            continue
        out[box.slices(frame)] |= fp.spans[box.slices(fp.bbox)]
    return out


def merge_footprints(
    pos: list[Footprint],
    neg: list[Footprint],
    grow: int = 2,
    shape: tuple[int, int] | None = None,
    *,
    xy0: tuple[int, int] = (0, 0),
    isotropic: bool = False,
) -> list[Footprint]:
    """Merge positive and negative footprints (afw ``FootprintSet.merge(rhs, grow, grow, isotropic)``).

    Every footprint is grown by ``grow`` (MANHATTAN unless ``isotropic``), overlapping or touching grown
    footprints are united, and each merged footprint carries the peaks of all its members: positive peaks first
    by decreasing value, then negative ones, the most negative last. A dipole becomes one footprint with
    ``from_positive`` and ``from_negative`` set; ``is_negative`` means "negative members only".

    Parameters
    ----------
    pos, neg
        Positive and negative footprints (parent coordinates).
    grow
        Growth radius in pixels for both lists.
    shape, xy0
        The image frame; grown footprints are clipped to it. Default: the union of the grown footprint boxes.
    isotropic
        CIRCLE instead of MANHATTAN stencil.
    """
    members = [(fp, False) for fp in pos] + [(fp, True) for fp in neg]
    if not members:
        return []
    clip = Box(xy0[0], xy0[1], shape[1], shape[0]) if shape is not None else None
    spans_list = [fp.spans for fp, _ in members]
    grown_spans = _grow_many(spans_list, grow, isotropic) if grow > 0 else spans_list
    grown = []
    for (fp, negative), gspans in zip(members, grown_spans):
        gspans, box = _clip(gspans, fp.bbox.grown(max(0, grow)), clip)
        if box.is_empty() or not gspans.any():
            continue
        peaks = [p if p.is_negative == negative else Peak(p.x, p.y, p.value, p.significance, negative)
                 for p in fp.peaks]
        grown.append(Footprint(box, gspans, peaks, negative, not negative, negative))
    return [_union([grown[i] for i in g]) for g in _touching_groups(grown)]
