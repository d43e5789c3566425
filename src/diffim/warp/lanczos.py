"""Lanczos resampling kernels, tabulated, and vectorised 1-D resampling along array rows.

The Lanczos kernel of order ``a`` is ``L(t) = sinc(t)·sinc(t/a)`` for ``|t| < a`` and 0 elsewhere. Resampling at
a non-integer position ``c`` uses the ``2a`` samples ``floor(c) − a + 1 … floor(c) + a`` with weights
``L(c − k)`` divided by their sum (so a constant image stays constant), as afw's ``LanczosWarpingKernel``.

The weights are read from a table of ``n_phase + 1`` rows (one per fractional offset ``q / n_phase``), the way
afw caches its warping kernel (``WarperConfig.cacheSize``): with the default 8192 phases the position is
quantised to 6e-5 px, far below anything measurable, and a table row costs one gather instead of ``2a`` sines.
Rows 0 and ``n_phase`` are exact delta functions, so integer offsets reproduce the input bit for bit.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["lanczos_kernel", "lanczos_table", "kernel_order", "resample_axis", "N_PHASE"]

#: Number of tabulated fractional offsets per pixel.
N_PHASE = 8192


def kernel_order(name: str) -> int:
    """Order ``a`` of a warping-kernel name (``"lanczos3"`` → 3; ``"bilinear"`` → 1)."""
    name = str(name).lower()
    if name == "bilinear":
        return 1
    if name.startswith("lanczos"):
        try:
            order = int(name[len("lanczos"):])
        except ValueError:
            order = 0
        if order >= 1:
            return order
    raise ValueError(f"Unknown warping kernel {name!r}; use 'lanczosN' (N ≥ 1, e.g. 'lanczos3') or 'bilinear'.")


def lanczos_kernel(t: np.ndarray, order: int = 3) -> np.ndarray:
    """The continuous Lanczos kernel ``sinc(t)·sinc(t/order)``, zero for ``|t| ≥ order``."""
    t = np.asarray(t, dtype=float)
    out = np.sinc(t) * np.sinc(t / order)
    out[np.abs(t) >= order] = 0.0
    return out


@lru_cache(maxsize=8)
def lanczos_table(order: int = 3, n_phase: int = N_PHASE) -> np.ndarray:
    """Normalised weights, shape ``(2·order, n_phase + 1)`` float32: column ``q`` holds the taps for offset
    ``q / n_phase``; tap ``k`` multiplies sample ``floor(c) − order + 1 + k``.

    ``order == 1`` gives bilinear weights (the Lanczos-1 kernel is not the tent, so bilinear is tabulated
    explicitly, as afw's ``BilinearWarpingKernel``).
    """
    frac = np.arange(n_phase + 1) / n_phase
    taps = np.arange(-order + 1, order + 1)
    t = frac[None, :] - taps[:, None]
    if order == 1:
        w = np.clip(1.0 - np.abs(t), 0.0, None)
    else:
        w = lanczos_kernel(t, order)
    w /= w.sum(axis=0, keepdims=True)
    # Exact deltas at integer offsets: an identity warp must return its input unchanged.
    w[:, 0] = 0.0
    w[order - 1, 0] = 1.0
    w[:, -1] = 0.0
    w[order, -1] = 1.0
    out = np.ascontiguousarray(w.astype(np.float32))
    out.setflags(write=False)
    return out


def resample_axis(
    flats: list[np.ndarray],
    line_start: np.ndarray,
    stride: int,
    length: int,
    pos: np.ndarray,
    order: int = 3,
    squared: list[bool] | None = None,
    masks: list[np.ndarray] | None = None,
    full_masks: list[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """The 1-D resampling kernel of the warper, on flattened arrays.

    Output sample ``m`` reads the line of ``length`` samples starting at flat index ``line_start[m]`` with
    ``stride`` (1: along a row; the row length: down a column) at the continuous position ``pos[m]``
    (0-based along the line); the value is ``Σ_k w_k · line[floor(pos) − a + 1 + k]``.

    Parameters
    ----------
    flats
        Flattened float32 planes.
    squared
        Per plane: use the squared weights (variance propagation, ``Σ w² V``).
    masks
        Flattened integer planes OR-ed over the bilinear footprint (the nearest two samples; only one when
        the position is an exact integer), afw's ``maskWarpingKernelName="bilinear"``.
    full_masks
        Flattened integer planes OR-ed over the full ``2a``-tap footprint (afw's ``growFullMask``).

    Returns
    -------
    values
        One float32 array per plane.
    mask_values
        One integer array per mask, then one per full mask.
    valid
        True where every tap of non-zero weight lies inside the line; elsewhere the values are meaningless.
    """
    squared = squared or [False] * len(flats)
    masks = masks or []
    full_masks = full_masks or []
    n = pos.size
    ntap = 2 * order
    fl = np.floor(pos)
    q = np.rint((pos - fl) * N_PHASE).astype(np.intp)
    fl = fl.astype(np.intp)
    table = lanczos_table(order)
    first = fl - (order - 1)
    valid = (first >= 0) & (first <= length - ntap)
    # Taps of zero weight do not count: an exact integer position needs only the sample it lands on, so an
    # identity or integer-shift warp reproduces its input up to the very edge (fixed up below).
    edge_exact = None
    if not valid.all():
        inval = ~valid
        hi = q[inval] == N_PHASE
        exact = (q[inval] == 0) | hi
        if exact.any():
            near = fl[inval] + hi
            ok = exact & (near >= 0) & (near < length)
            if ok.any():
                edge_exact = np.nonzero(inval)[0][ok]
                edge_near = near[ok]
                valid[edge_exact] = True
    # Clamp the whole footprint inside the line once (clamped values are only used where invalid).
    short = length < ntap
    first_c = np.minimum(np.maximum(first, 0), max(length - ntap, 0))
    start = first_c
    start *= stride
    start += line_start
    outs = [np.zeros(n, dtype=np.float32) for _ in flats]
    idx = start.copy()
    tmp = np.empty(n, dtype=np.float32)
    w = np.empty(n, dtype=np.float32)
    w2 = np.empty(n, dtype=np.float32) if any(squared) else None
    for k in range(min(ntap, length)):
        if k:
            idx += stride
        table[k].take(q, out=w)
        if w2 is not None:
            np.multiply(w, w, out=w2)
        for flat, sq, out in zip(flats, squared, outs):
            flat.take(idx, out=tmp)
            tmp *= w2 if sq else w
            out += tmp
    if edge_exact is not None:
        src = line_start[edge_exact] + edge_near * stride
        for flat, out in zip(flats, outs):
            out[edge_exact] = flat[src]
    mask_outs = []
    if masks:
        # Bilinear footprint: the two nearest samples, or the one sample an integer position lands on.
        if short:
            last = length - 1
            i0 = line_start + np.clip(fl + (q == N_PHASE), 0, last) * stride
            i1 = line_start + np.clip(fl + (q > 0), 0, last) * stride
        else:
            i0 = start + (order - 1) * stride
            i1 = i0 + (q > 0) * stride
            i0 += (q == N_PHASE) * stride
        for mf in masks:
            m = mf.take(i0)
            m |= mf.take(i1)
            if edge_exact is not None:
                m[edge_exact] = mf[line_start[edge_exact] + edge_near * stride]
            mask_outs.append(m)
    for mf in full_masks:
        acc = mf.take(start)
        idx = start.copy()
        for k in range(1, min(ntap, length)):
            idx += stride
            acc |= mf.take(idx)
        if edge_exact is not None:
            acc[edge_exact] = mf[line_start[edge_exact] + edge_near * stride]
        mask_outs.append(acc)
    return outs, mask_outs, valid
