"""One pass of the two-pass warper with contiguous slices instead of per-pixel gathers.

A pass resamples every line (row or column) of a 2-D array at a per-pixel continuous position ``pos`` along
the line: ``out = Σ_k w_k(pos) · src[floor(pos) − a + 1 + k]`` (``a`` the Lanczos order, weights from
:func:`~diffim.warp.lanczos.lanczos_table`). Gathering ``2a`` samples per output pixel through index arrays is
what made the numpy warper slow. For the smooth, near-isometric maps the warper sees (template → science:
similar pixel scales, small residual rotation) the integer offset ``D = floor(pos) − i`` between an output
pixel ``i`` and its source sample changes only every ~1/shear lines across the pass and every ~1/|scale − 1|
pixels along it. The output is therefore cut into tiles over which ``D`` spans at most a few values
(``D0 … D0 + s``); within a tile tap ``m`` (``0 ≤ m < 2a + s``) of *every* pixel reads the same shifted slice
of the source, and only the weights differ per pixel. They come from a table indexed by the position
relative to ``D0`` in units of ``1 / N_PHASE`` px (:func:`band_tables`): the ordinary Lanczos row, placed at
the pixel's own offset ``D − D0`` and zero on the ``s`` spare taps. So the result is the same sum over the
same samples with the same (quantised) weights, in the same order, as the gather formulation: bit for bit
(the spare taps add exact zeros). The mask footprints are the same too, up to which zero-weight taps count
in the full footprint of a position within ``1 / (2·N_PHASE)`` px of an integer.

Tiles: the axis is cut into chunks (≈ ``TILE_PIXELS`` per tile, halved where one line alone drifts by more
than ``SPREAD_MAX`` offsets), and consecutive lines into bands by :func:`_bands`.

Tiles whose taps reach beyond the source (zero-weight taps of exact-integer positions at the very edge,
spare taps) read a small zero-padded copy of their region instead.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .lanczos import N_PHASE, lanczos_table

__all__ = ["band_tables", "resample_pass", "SPREAD_MAX"]

#: Largest offset spread ``s`` of a tile (taps per pixel ``2a + s``). Lines whose own spread is larger are
#: split along the axis (see ``chunk`` in :func:`resample_pass`).
SPREAD_MAX = 2

#: Target number of output pixels per tile: big enough that numpy's per-call overhead is negligible, small
#: enough that a tile's operands stay in the L2 cache.
TILE_PIXELS = 1 << 15

#: Fixed cost of one tile (numpy call overheads) in pixel-taps; see :func:`_bands`.
MERGE_TAPS = 32768

_INVALID_HI = np.iinfo(np.int64).max // 4
_INVALID_LO = -_INVALID_HI


@lru_cache(maxsize=32)
def band_tables(order: int, spread: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights and footprint selectors of a tile with offset spread ``spread``.

    Column ``p`` (``0 ≤ p ≤ (spread + 1)·N_PHASE``) describes a pixel at ``p / N_PHASE`` px beyond the tile's
    first tap origin ``D0``: its own floor offset is ``f = p // N_PHASE`` and its phase ``q = p % N_PHASE``.

    Returns
    -------
    weights
        float32 ``(2a + spread, P)``: row ``m`` = Lanczos weight of tap ``m − f`` at phase ``q`` (0 outside the
        pixel's own ``2a`` taps).
    bilinear
        int32 ``(2a + spread, P)``: −1 (all bits) where tap ``m`` is one of the pixel's bilinear-footprint
        samples (``f`` and, unless the position is an exact integer, ``f + 1``), else 0.
    full
        int32 ``(2a + spread, P)``: −1 over the pixel's full ``2a``-tap footprint, else 0.
    """
    base = lanczos_table(order)
    ntap = 2 * order
    n_m = ntap + spread
    p = np.arange((spread + 1) * N_PHASE + 1)
    f, q = np.divmod(p, N_PHASE)
    w = np.zeros((n_m, p.size), np.float32)
    bil = np.zeros((n_m, p.size), np.int32)
    full = np.zeros((n_m, p.size), np.int32)
    i0 = f + order - 1
    i1 = i0 + (q > 0)
    # A position exactly on the last grid point belongs to the footprint that starts at ``spread``.
    f_full = np.minimum(f, spread)
    for m in range(n_m):
        k = m - f
        ok = (k >= 0) & (k < ntap)
        w[m, ok] = base[k[ok], q[ok]]
        bil[m] = np.where((m == i0) | (m == i1), -1, 0)
        kf = m - f_full
        full[m] = np.where((kf >= 0) & (kf < ntap), -1, 0)
    for a in (w, bil, full):
        a.setflags(write=False)
    return w, bil, full


def _runs(lo: np.ndarray, hi: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Runs of equal ``(lo, hi)`` as ``(start, stop, lo, hi)``."""
    n = lo.size
    if n == 0:
        return []
    change = np.flatnonzero((lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])) + 1
    starts = np.concatenate(([0], change))
    stops = np.concatenate((change, [n]))
    return list(zip(starts.tolist(), stops.tolist(), lo[starts].tolist(), hi[starts].tolist()))


def _bands(lo: np.ndarray, hi: np.ndarray, smax: int, max_len: int, along: int) -> list[tuple[int, int, int, int]]:
    """Group consecutive lines into bands ``(start, stop, D_min, D_max)`` whose offsets span at most ``smax``
    (lines without a valid pixel, ``lo > hi``, join any band). Greedy: a run of lines joins the current band
    when the extra taps that costs (every pixel of the band pays ``2a + spread`` taps) are cheaper than the
    fixed cost of another tile, ``MERGE_TAPS`` pixel-taps (``along`` pixels per line)."""
    out: list[tuple[int, int, int, int]] = []
    cur = None
    for a, b, l, h in _runs(lo, hi):
        if cur is None:
            cur = [a, b, l, h]
            continue
        cl, ch = cur[2], cur[3]
        if l > h:  # no valid pixel: joins anything
            nl, nh = cl, ch
        elif cl > ch:
            nl, nh = l, h
        else:
            nl, nh = min(cl, l), max(ch, h)
        ns = nh - nl
        bs = max(ch - cl, 0)
        rs = max(h - l, 0)
        extra = ((ns - bs) * (cur[1] - cur[0]) + (ns - rs) * (b - a)) * along
        if b - cur[0] <= max_len and ns <= smax and extra <= MERGE_TAPS:
            cur[1], cur[2], cur[3] = b, nl, nh
        else:
            out.append(tuple(cur))
            cur = [a, b, l, h]
    if cur is not None:
        out.append(tuple(cur))
    return out


def resample_pass(
    planes: list[np.ndarray],
    squared: list[bool],
    masks: list[np.ndarray],
    full_masks: list[np.ndarray],
    pabs: np.ndarray,
    axis: int,
    order: int,
    out_planes: list[np.ndarray],
    out_masks: list[np.ndarray],
    out_full: list[np.ndarray],
    perp_offset: int = 0,
    chunk: int | None = None,
) -> np.ndarray | None:
    """Resample lines of the source ``planes`` at positions ``pabs / N_PHASE`` into ``out_planes``.

    Output pixel ``(r, c)`` (shape of ``pabs``) lies on source line ``r + perp_offset`` (``axis = 1``: lines are
    rows of the source, positions are column coordinates) or ``c + perp_offset`` (``axis = 0``: lines are
    columns).

    Parameters
    ----------
    planes, squared
        float32 source planes (all of the same shape); per plane, whether to use squared weights (variance).
    masks, full_masks
        int32 source masks OR-ed over the bilinear, respectively full, footprint.
    pabs
        int64 positions in units of ``1 / N_PHASE`` px (``rint(pos · N_PHASE)``).
    out_planes, out_masks, out_full
        Outputs (shape of ``pabs``). Valid pixels are always written; invalid ones may be left untouched.
        Masks must be zero-initialised (tiles whose source mask is all zero are skipped).
    chunk
        Tile length along the axis (default: enough for ~TILE_PIXELS per tile). A chunk over which one line
        drifts by more than ``SPREAD_MAX`` offsets (a pixel-scale change) is halved until it does not.

    Returns
    -------
    valid
        Bool array, True where every tap of non-zero weight lies inside the line; None if all are valid.
    """
    ntap = 2 * order
    length = planes[0].shape[axis]
    shape = pabs.shape
    n_along = shape[axis]
    idx = np.arange(n_along, dtype=np.int64) * N_PHASE
    prel = pabs - (idx[None, :] if axis == 1 else idx[:, None])
    lo_ok, hi_ok = (order - 1) * N_PHASE, (length - order) * N_PHASE
    valid = None
    if pabs.size == 0:
        return valid
    if not (int(pabs.min()) >= lo_ok and int(pabs.max()) < hi_ok):
        valid = (pabs >= lo_ok) & (pabs < hi_ok)
        # Exact integer positions need only the sample they land on.
        valid |= (pabs % N_PHASE == 0) & (pabs >= 0) & (pabs <= (length - 1) * N_PHASE)
        if valid.all():
            valid = None
        elif not valid.any():
            return valid
    if chunk is None:
        chunk = max(64, TILE_PIXELS // max(shape[1 - axis], 1))
    chunk = max(1, min(chunk, n_along))
    max_perp = max(1, TILE_PIXELS // chunk)
    pending = [(a0, min(a0 + chunk, n_along)) for a0 in range(0, n_along, chunk)]
    while pending:
        a0, a1 = pending.pop()
        sl_a = slice(a0, a1)
        # Floor offsets D of each line's extreme pixels (floor division rounds towards −∞; floor is monotonic,
        # so the extreme offsets are those of the extreme positions).
        pr = prel[:, sl_a] if axis == 1 else prel[sl_a, :]
        if valid is None:
            lo = pr.min(axis=axis) // N_PHASE
            hi = pr.max(axis=axis) // N_PHASE
        else:
            va = valid[:, sl_a] if axis == 1 else valid[sl_a, :]
            lo = np.where(va, pr, _INVALID_HI).min(axis=axis) // N_PHASE
            hi = np.where(va, pr, _INVALID_LO).max(axis=axis) // N_PHASE
        if a1 - a0 > 1 and int((hi - lo).max()) > SPREAD_MAX:
            # A line drifts by more than SPREAD_MAX pixels over the chunk (pixel-scale change): halve it.
            mid = (a0 + a1) // 2
            pending += [(a0, mid), (mid, a1)]
            continue
        for b0, b1, d0, d1 in _bands(lo, hi, SPREAD_MAX, max_perp, a1 - a0):
            if d0 > d1:
                continue  # no valid pixel in this tile
            _tile(planes, squared, masks, full_masks, prel, valid, axis, order, ntap,
                  out_planes, out_masks, out_full, perp_offset, a0, a1, b0, b1, d0, d1 - d0)
    return valid


def _tile(planes, squared, masks, full_masks, prel, valid, axis, order, ntap,
          out_planes, out_masks, out_full, perp_offset, a0, a1, b0, b1, d0, spread):
    """Resample one tile: along-axis pixels ``a0:a1`` of lines ``b0:b1``, first-tap origin ``d0``."""
    if axis == 1:
        key = (slice(b0, b1), slice(a0, a1))
    else:
        key = (slice(a0, a1), slice(b0, b1))
    if valid is not None:
        vt = valid[key]
        if not vt.all():
            # Restrict the along-axis extent to the valid pixels: their slices stay within a few pixels of
            # the source (zero-weight taps of exact positions at the very edge), so the padding stays small.
            anyv = np.flatnonzero(vt.any(axis=1 - axis))
            a0, a1 = a0 + int(anyv[0]), a0 + int(anyv[-1]) + 1
            key = (slice(b0, b1), slice(a0, a1)) if axis == 1 else (slice(a0, a1), slice(b0, b1))
    p = prel[key] - d0 * N_PHASE  # position relative to the tile's tap origin; invalid ones clip below
    weights, bil_sel, full_sel = band_tables(order, spread)
    n_m = ntap + spread
    # Tap m of output index i reads source index i + d0 − a + 1 + m along the line.
    s0 = a0 + d0 - order + 1
    s1 = a1 + d0 - order + 1
    lines = slice(b0 + perp_offset, b1 + perp_offset)
    length = planes[0].shape[axis]
    lo, hi = s0, s1 + n_m - 1  # source range read by the tile
    if lo < 0 or hi > length:
        # Near the edge: a zero-padded copy of the region (zero-weight taps read the padding).
        def padded(arr):
            region = np.zeros((b1 - b0, hi - lo) if axis == 1 else (hi - lo, b1 - b0), arr.dtype)
            c0, c1 = max(lo, 0), min(hi, length)
            if c1 > c0:
                if axis == 1:
                    region[:, c0 - lo : c1 - lo] = arr[lines, c0:c1]
                else:
                    region[c0 - lo : c1 - lo, :] = arr[c0:c1, lines]
            return region

        planes = [padded(a) for a in planes]
        masks = [padded(a) for a in masks]
        full_masks = [padded(a) for a in full_masks]
        s0, s1, lines = 0, s1 - s0, slice(0, b1 - b0)

    def src(arr, m):
        if axis == 1:
            return arr[lines, s0 + m : s1 + m]
        return arr[s0 + m : s1 + m, lines]

    tshape = p.shape
    w = np.empty(tshape, np.float32)
    w2 = np.empty(tshape, np.float32) if any(squared) else None
    tmp = np.empty(tshape, np.float32)
    outs = [o[key] for o in out_planes]
    for m in range(n_m):
        weights[m].take(p, out=w, mode="clip")
        if w2 is not None:
            np.multiply(w, w, out=w2)
        for arr, sq, o in zip(planes, squared, outs):
            ww = w2 if sq else w
            if m == 0:
                np.multiply(src(arr, m), ww, out=o)
            else:
                np.multiply(src(arr, m), ww, out=tmp)
                o += tmp
    if masks or full_masks:
        sel = np.empty(tshape, np.int32)
        mt = np.empty(tshape, np.int32)
        for mk, om in zip(masks, out_masks):
            # Only taps order−1 … order+spread can be in a bilinear footprint.
            m_lo, m_hi = order - 1, order + spread
            region = (mk[lines, s0 + m_lo : s1 + m_hi] if axis == 1 else mk[s0 + m_lo : s1 + m_hi, lines])
            if not region.any():
                continue
            o = om[key]
            for m in range(m_lo, m_hi + 1):
                bil_sel[m].take(p, out=sel, mode="clip")
                np.bitwise_and(src(mk, m), sel, out=mt)
                o |= mt
        for mk, om in zip(full_masks, out_full):
            region = (mk[lines, s0 : s1 + n_m - 1] if axis == 1 else mk[s0 : s1 + n_m - 1, lines])
            if not region.any():
                continue
            o = om[key]
            for m in range(n_m):
                if spread:
                    full_sel[m].take(p, out=sel, mode="clip")
                    np.bitwise_and(src(mk, m), sel, out=mt)
                    o |= mt
                else:
                    o |= src(mk, m)
