"""Select stars by size: LSST's ``ObjectSizeStarSelector`` as a pure function on arrays.

Stars are the tightest cluster of source widths ``w = √((Ixx + Iyy)/2)``: galaxies are wider, cosmic rays and
noise spikes narrower or rejected by the S/N cut. The algorithm (lsst_algorithms.md §8.4):

1. *good* sources: no bad flag, finite width and flux, optional flux and S/N limits, ``widthMin <= w <=
   widthMax`` (``widthMax`` ignored if 0);
2. 1-D k-means on the good widths with 4 clusters whose centres start at ``mean0·(1 + 2·widthStdAllowed·k)``,
   ``mean0`` the width at the 10th percentile (``sorted(w)[n//10]``); each width goes to the nearest centre
   (ties to the lowest index), centres become the **median** of their members, until no assignment changes;
3. cluster 0 is cleaned (if it has at least 5 members, at most 10 times): centre = median,
   ``sd = min(std, 0.741·IQR)``, members with ``|w − centre| >= nSigmaClip·sd`` leave the cluster; stop when
   nothing changes or ``sd < widthStdAllowed·median``;
4. stars = good sources left in cluster 0.
"""

from __future__ import annotations

import numpy as np

from ..errors import PsfEstimationError

__all__ = ["object_size_star_selector", "kmeans_widths", "improve_cluster"]


def kmeans_widths(widths: np.ndarray, width_std_allowed: float = 0.15, n_cluster: int = 4,
                  max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means with median centres; returns ``(cluster_id, centres)`` (see the module docstring)."""
    w = np.asarray(widths, dtype=float)
    n = w.size
    if n == 0:
        return np.zeros(0, dtype=int), np.full(n_cluster, np.nan)
    mean0 = np.sort(w)[n // 10]
    centres = mean0 + 2.0 * width_std_allowed * mean0 * np.arange(n_cluster)
    cluster = np.full(n, -2, dtype=int)
    for _ in range(max_iter):
        dist = np.abs(w[:, None] - centres[None, :])
        dist[:, ~np.isfinite(centres)] = np.inf  # empty clusters (NaN centre) attract nobody
        new = np.argmin(dist, axis=1)  # argmin returns the lowest index on ties
        if np.array_equal(new, cluster):
            break
        cluster = new
        for k in range(n_cluster):
            members = w[cluster == k]
            centres[k] = np.median(members) if members.size else np.nan
    return cluster, centres


def improve_cluster(widths: np.ndarray, cluster: np.ndarray, *, n_sigma_clip: float = 2.0,
                    width_std_allowed: float = 0.15, cluster_num: int = 0, n_iter: int = 10) -> np.ndarray:
    """Clip outliers from cluster ``cluster_num`` (members that leave get id −1); returns a new id array."""
    w = np.asarray(widths, dtype=float)
    cluster = np.array(cluster, copy=True)
    if np.count_nonzero(cluster == cluster_num) < 5:
        return cluster
    for _ in range(n_iter):
        inside = cluster == cluster_num
        vals = np.sort(w[inside])
        n = vals.size
        if n < 5:
            break
        centre = float(np.median(vals))
        iqr = vals[int(0.75 * n)] - vals[int(0.25 * n)]
        sd = min(float(np.std(vals)), 0.741 * iqr)
        if sd <= 0:  # identical widths (noiseless images): nothing to clip, and |w − c| >= 0 would drop all
            break
        leave = inside & (np.abs(w - centre) >= n_sigma_clip * sd)
        cluster[leave] = -1
        if not leave.any() or sd < width_std_allowed * centre:
            break
    return cluster


def object_size_star_selector(
    widths: np.ndarray,
    flux: np.ndarray | None = None,
    flux_err: np.ndarray | None = None,
    bad: np.ndarray | None = None,
    *,
    do_flux_limit: bool = False,
    flux_min: float = 12500.0,
    flux_max: float = 0.0,
    do_signal_to_noise_limit: bool = True,
    signal_to_noise_min: float = 50.0,
    signal_to_noise_max: float = 0.0,
    width_min: float = 0.9,
    width_max: float = 10.0,
    width_std_allowed: float = 0.15,
    n_sigma_clip: float = 2.0,
) -> np.ndarray:
    """Boolean array: which sources are stars (see the module docstring for the algorithm).

    Parameters
    ----------
    widths
        ``√((Ixx + Iyy)/2)`` in pixels.
    flux, flux_err
        Source flux and its error (needed for the flux and S/N limits).
    bad
        Boolean array of sources flagged bad (edge, saturated, ...).

    Raises
    ------
    PsfEstimationError
        No source passes the cuts.
    """
    w = np.asarray(widths, dtype=float)
    good = np.isfinite(w) & (w >= width_min)
    if width_max > 0:
        good &= w <= width_max
    if bad is not None:
        good &= ~np.asarray(bad, dtype=bool)
    if flux is not None:
        f = np.asarray(flux, dtype=float)
        good &= np.isfinite(f)
        if do_flux_limit:
            good &= f > flux_min
            if flux_max > 0:
                good &= f < flux_max
        if do_signal_to_noise_limit and flux_err is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                snr = f / np.asarray(flux_err, dtype=float)
            good &= np.isfinite(snr) & (snr > signal_to_noise_min)
            if signal_to_noise_max > 0:
                good &= snr < signal_to_noise_max
    if not good.any():
        raise PsfEstimationError(
            f"No good star candidates among {w.size} sources (width in [{width_min}, {width_max}], "
            f"S/N > {signal_to_noise_min}); lower the limits or check the image."
        )
    idx = np.flatnonzero(good)
    cluster, _ = kmeans_widths(w[idx], width_std_allowed)
    cluster = improve_cluster(w[idx], cluster, n_sigma_clip=n_sigma_clip, width_std_allowed=width_std_allowed)
    stars = np.zeros(w.size, dtype=bool)
    stars[idx[cluster == 0]] = True
    return stars
