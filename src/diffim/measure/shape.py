"""Adaptive (Gaussian-weighted) second moments, iterated for all sources at once (cf. meas_base ``SdssShape``).

The weight is a Gaussian of covariance ``M`` centred on the (fixed) centroid; the weighted moments ``Q`` of a
Gaussian source of covariance ``C`` obey ``Q⁻¹ = C⁻¹ + M⁻¹``, so each iteration sets ``M ← (Q⁻¹ − M⁻¹)⁻¹``
(exact in one step for Gaussians; ``M ← 2Q`` where that inverse is not positive definite). The fixed point
``M = 2Q`` is SdssShape's. Reported moments are ``M`` in pixels².
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ._stamps import chunks, gather_stamps

__all__ = ["ShapeResult", "adaptive_moments"]


@dataclass
class ShapeResult:
    """Per-source adaptive moments (pixels²), 1σ errors and flags (arrays of shape ``(n,)``).

    ``flag`` general failure; ``flag_maxIter`` not converged; ``flag_unweighted`` the weighted iteration
    failed and unweighted moments of the positive pixels are reported; ``flag_no_pixels`` no usable pixel.
    """

    ixx: np.ndarray
    iyy: np.ndarray
    ixy: np.ndarray
    ixx_err: np.ndarray
    iyy_err: np.ndarray
    ixy_err: np.ndarray
    flag: np.ndarray
    flag_maxIter: np.ndarray
    flag_unweighted: np.ndarray
    flag_no_pixels: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return getattr(self, name)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]


def _inv2(xx, yy, xy):
    det = xx * yy - xy * xy
    with np.errstate(divide="ignore", invalid="ignore"):
        return yy / det, xx / det, -xy / det, det


def adaptive_moments(
    image: np.ndarray,
    variance: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    initial: tuple[float, float, float] = (4.0, 4.0, 0.0),
    half_size: int | None = None,
    negative: np.ndarray | bool = False,
    xy0: tuple[int, int] = (0, 0),
    mask: np.ndarray | None = None,
    bad_mask: int = 0,
    max_iter: int = 100,
    tol1: float = 1e-5,
    tol2: float = 1e-4,
) -> ShapeResult:
    """Adaptive second moments about fixed centres ``(x, y)`` (parent pixels).

    Parameters
    ----------
    image, variance
        2-D arrays ``[y, x]``.
    x, y
        Centroids (parent coordinates).
    initial
        Starting weight covariance ``(ixx, iyy, ixy)`` in pixels² (typically the PSF's moments).
    half_size
        Stamp half-width; default ``ceil(5·√max(ixx, iyy))`` of ``initial`` (at least 6).
    negative
        Measure ``-image`` for these sources (negative DIA sources).
    mask, bad_mask
        Pixels with ``mask & bad_mask`` or non-finite values are ignored.
    max_iter, tol1, tol2
        Iteration limit; convergence when the relative change of ``ixx``/``iyy`` is below ``tol1`` and of
        ``ixy`` (relative to ``ixx + iyy``) below ``tol2``.

    Returns
    -------
    ShapeResult

    Notes
    -----
    Errors: at the fixed point ``M = 2Q(M)`` a perturbation of the data moves ``Q`` by ``δQ`` and
    ``∂Q/∂M = 1/4`` for a Gaussian, so ``δM = 4 δQ``; ``Var Q`` follows from linear propagation of the
    variance plane through ``Q = Σ w I x² / Σ w I`` with the final weights.
    """
    mask = getattr(mask, "array", mask)  # a diffim Mask or a plain integer array
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    n = len(x)
    sign = np.where(np.broadcast_to(np.asarray(negative, dtype=bool), (n,)), -1.0, 1.0)
    if half_size is None:
        half_size = max(6, int(np.ceil(5.0 * np.sqrt(max(initial[0], initial[1], 0.25)))))
    m = 2 * half_size + 1
    nan = np.full(n, np.nan)
    res = ShapeResult(nan.copy(), nan.copy(), nan.copy(), nan.copy(), nan.copy(), nan.copy(),
                      np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool))
    finite = np.isfinite(x) & np.isfinite(y)
    res.flag[~finite] = True
    res.flag_no_pixels[~finite] = True
    idx_all = np.nonzero(finite)[0]
    for sl in chunks(len(idx_all), m * m * 6):
        idx = idx_all[sl]
        k = len(idx)
        ix = np.floor(x[idx] + 0.5).astype(np.int64)
        iy = np.floor(y[idx] + 0.5).astype(np.int64)
        lx0, ly0 = ix - half_size - xy0[0], iy - half_size - xy0[1]
        d, inside = gather_stamps(image, lx0, ly0, m, m, fill=0)
        v, _ = gather_stamps(variance, lx0, ly0, m, m, fill=0)
        d = d.astype(float) * sign[idx, None, None]
        v = v.astype(float)
        good = inside & np.isfinite(d) & np.isfinite(v)
        if mask is not None and bad_mask:
            mm, _ = gather_stamps(mask, lx0, ly0, m, m, fill=0)
            good &= (mm & bad_mask) == 0
        d = np.where(good, d, 0.0)
        v = np.where(good, v, 0.0)
        grid = np.arange(-half_size, half_size + 1, dtype=float)
        u = grid[None, None, :] - (x[idx] - ix)[:, None, None]  # (k, 1, m)
        w_ = grid[None, :, None] - (y[idx] - iy)[:, None, None]  # (k, m, 1)
        uu, ww, uw = u * u, w_ * w_, u * w_
        mxx = np.full(k, float(initial[0]))
        myy = np.full(k, float(initial[1]))
        mxy = np.full(k, float(initial[2]))
        active = good.any(axis=(1, 2))
        converged = np.zeros(k, bool)
        failed = ~active
        cap = (half_size / 2.0) ** 2  # bound the weight to the stamp: beyond it the moments are meaningless
        for _ in range(max_iter):
            r = np.nonzero(active & ~converged & ~failed)[0]  # iterate only the sources still running
            if len(r) == 0:
                break
            uu_r, ww_r, uw_r = uu[r], ww[r], uw[r]
            pxx, pyy, pxy = mxx[r], myy[r], mxy[r]
            a_, b_, c_, _ = _inv2(pxx, pyy, pxy)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                wi = np.exp(-0.5 * (a_[:, None, None] * uu_r + b_[:, None, None] * ww_r
                                    + 2 * c_[:, None, None] * uw_r)) * d[r]
                s0 = wi.sum(axis=(1, 2))
                qxx = (wi * uu_r).sum(axis=(1, 2)) / s0
                qyy = (wi * ww_r).sum(axis=(1, 2)) / s0
                qxy = (wi * uw_r).sum(axis=(1, 2)) / s0
                bad_q = ~(s0 > 0) | ~(qxx > 0) | ~(qyy > 0) | ~(qxx * qyy - qxy * qxy > 0)
                iqxx, iqyy, iqxy, _ = _inv2(qxx, qyy, qxy)
                cxx_i, cyy_i, cxy_i = iqxx - a_, iqyy - b_, iqxy - c_
                pd = (cxx_i > 0) & (cyy_i > 0) & (cxx_i * cyy_i - cxy_i * cxy_i > 0)
                nxx, nyy, nxy, _ = _inv2(cxx_i, cyy_i, cxy_i)
                nxx = np.where(pd, nxx, 2 * qxx)
                nyy = np.where(pd, nyy, 2 * qyy)
                nxy = np.where(pd, nxy, 2 * qxy)
                huge = (nxx > cap) | (nyy > cap)
            bad = bad_q | huge | ~np.isfinite(nxx) | ~np.isfinite(nyy) | ~np.isfinite(nxy)
            failed[r[bad]] = True
            ok = ~bad
            done = ok & (np.abs(nxx - pxx) <= tol1 * pxx) & (np.abs(nyy - pyy) <= tol1 * pyy) & (
                np.abs(nxy - pxy) <= tol2 * (pxx + pyy))
            mxx[r[ok]], myy[r[ok]], mxy[r[ok]] = nxx[ok], nyy[ok], nxy[ok]
            converged[r[done]] = True
        maxiter = active & ~converged & ~failed
        # Errors with the final weights: Var Q_ab = Σ (w (x_a x_b − Q_ab))² V / (Σ w I)², δM = 4 δQ.
        a_, b_, c_, _ = _inv2(mxx, myy, mxy)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            wgt = np.exp(-0.5 * (a_[:, None, None] * uu + b_[:, None, None] * ww + 2 * c_[:, None, None] * uw))
            s0 = (wgt * d).sum(axis=(1, 2))
            qxx, qyy, qxy = mxx / 2, myy / 2, mxy / 2
            exx = 4 * np.sqrt((wgt * wgt * (uu - qxx[:, None, None]) ** 2 * v).sum(axis=(1, 2))) / np.abs(s0)
            eyy = 4 * np.sqrt((wgt * wgt * (ww - qyy[:, None, None]) ** 2 * v).sum(axis=(1, 2))) / np.abs(s0)
            exy = 4 * np.sqrt((wgt * wgt * (uw - qxy[:, None, None]) ** 2 * v).sum(axis=(1, 2))) / np.abs(s0)
        # Failed iterations: fall back to unweighted moments of the positive pixels (flag_unweighted).
        fb = failed & active
        if fb.any():
            pos = np.clip(d[fb], 0, None)
            tot = pos.sum(axis=(1, 2))
            with np.errstate(divide="ignore", invalid="ignore"):
                mxx[fb] = (pos * uu[fb]).sum(axis=(1, 2)) / tot
                myy[fb] = (pos * ww[fb]).sum(axis=(1, 2)) / tot
                mxy[fb] = (pos * uw[fb]).sum(axis=(1, 2)) / tot
            exx[fb] = eyy[fb] = exy[fb] = np.nan
        res.ixx[idx], res.iyy[idx], res.ixy[idx] = mxx, myy, mxy
        res.ixx_err[idx], res.iyy_err[idx], res.ixy_err[idx] = exx, eyy, exy
        res.flag_maxIter[idx] = maxiter
        res.flag_unweighted[idx] = fb
        res.flag_no_pixels[idx] = ~active
        res.flag[idx] = maxiter | failed
        res.ixx[idx[~active]] = res.iyy[idx[~active]] = res.ixy[idx[~active]] = np.nan
    return res
