"""Kernel-quality metrics on kernel and control stars (LSST ``KernelCandidateQa``, ``doAddMetrics``).

For each star, the normalised residual ``z = D/σ`` of the difference image in a box around it is summarised
by its mean, standard deviation and χ² per pixel; the per-sample aggregates (mean, median, standard deviation)
go to the task metadata. Control stars were not used to fit the kernel, so their metrics are an honest test
of the kernel's quality.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kernel_candidate_metrics"]


def _position(s) -> tuple[float, float]:
    """(x, y) of one source: a footprint (its first peak), an object with ``x``/``y`` (a kernel candidate) or
    a sequence."""
    if hasattr(s, "peaks"):
        return s.peaks[0].x, s.peaks[0].y
    if hasattr(s, "x") and hasattr(s, "y"):
        return s.x, s.y
    return s[0], s[1]


def _positions(sources) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(sources, "colnames"):
        return np.asarray(sources["x"], float), np.asarray(sources["y"], float)
    arr = np.asarray([_position(s) for s in sources], float).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def kernel_candidate_metrics(difference, kernel, sources, *, half_width: int | None = None) -> dict:
    """Residual statistics of ``difference`` around ``sources`` (table with x, y; footprints; kernel candidates).

    Returns a dict with ``n``, ``residualMean_MEAN/MEDIAN/STDEV``, ``residualStd_MEAN/MEDIAN/STDEV``,
    ``chi2_MEAN/MEDIAN/STDEV`` and ``nBad`` (stars whose |mean| > 0.25 or std > 1.5, LSST's rejection rule).
    """
    x, y = _positions(sources)
    if half_width is None:
        half_width = int(getattr(kernel, "size", 21)) // 2
    img, var, msk = difference.image, difference.variance, difference.mask
    badbits = msk.bitmask(["NO_DATA", "EDGE", "SAT", "BAD"], ignore_missing=True)
    x0, y0 = difference.xy0
    means, stds, chi2 = [], [], []
    for xc, yc in zip(x, y):
        ix, iy = int(round(xc)) - x0, int(round(yc)) - y0
        sl = (slice(max(iy - half_width, 0), iy + half_width + 1), slice(max(ix - half_width, 0), ix + half_width + 1))
        d, v, m = img[sl], var[sl], msk.array[sl]
        good = ((m & badbits) == 0) & np.isfinite(d) & (v > 0)
        if good.sum() < 10:
            continue
        z = d[good] / np.sqrt(v[good])
        means.append(z.mean())
        stds.append(z.std(ddof=1))
        chi2.append(np.mean(z * z))
    out: dict = {"n": len(means)}
    for name, arr in (("residualMean", means), ("residualStd", stds), ("chi2", chi2)):
        a = np.asarray(arr, float)
        out[f"{name}_MEAN"] = float(a.mean()) if a.size else float("nan")
        out[f"{name}_MEDIAN"] = float(np.median(a)) if a.size else float("nan")
        out[f"{name}_STDEV"] = float(a.std(ddof=1)) if a.size > 1 else float("nan")
    out["nBad"] = int(sum(1 for m, s in zip(means, stds) if abs(m) > 0.25 or s > 1.5))
    return out
