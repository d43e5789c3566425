"""afw-style robust statistics: sigma-clipped mean and standard deviation.

The convention is afw's ``MEANCLIP`` / ``STDEVCLIP`` / ``VARIANCECLIP`` with ``numSigmaClip=3`` and
``numIter=3``:

* pixels flagged in the ignore mask, or non-finite, never take part;
* pass 0 keeps values within ``median ± nsigma · 0.741301109 · IQR`` (0.7413 IQR is the Gaussian σ);
* passes 1 … ``niter − 1`` keep values within ``mean ± nsigma · std`` of the previous pass, each pass
  re-clipping the *full* sample (not the survivors of the previous pass);
* the result is the mean and the unbiased (``n − 1``) standard deviation of the last pass.

Two entry points share this definition: :func:`clipped_mean_std` for one sample (quantiles by partition,
O(n)) and :func:`clipped_mean_std_rows` for many small samples at once (rows of a 2-D array, used for the
super-pixels of a mesh background).
"""

from __future__ import annotations

import numpy as np

__all__ = ["IQR_TO_SIGMA", "clipped_mean_std", "clipped_mean_std_rows", "clipped_mean", "nan_quantiles_rows",
           "mad_sigma_relative_error"]

#: Ratio σ/IQR of a Gaussian, as afw uses it for the first clipping pass.
IQR_TO_SIGMA = 0.741301109


def _good_values(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """1-D array of the finite, unmasked values (no copy when nothing has to be dropped)."""
    v = np.asarray(values)
    good = np.isfinite(v)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != v.shape:
            raise ValueError(f"Mask shape {m.shape} does not match the values' shape {v.shape}.")
        good &= ~m
    if good.all():
        return v.ravel()
    return v[good]


def clipped_mean_std(
    values: np.ndarray, mask: np.ndarray | None = None, nsigma: float = 3.0, niter: int = 3
) -> tuple[float, float]:
    """Sigma-clipped mean and standard deviation, afw ``MEANCLIP`` / ``STDEVCLIP`` convention.

    Parameters
    ----------
    values
        Array of any shape.
    mask
        Boolean array of the same shape, True where a value must be ignored (e.g. ``mask.get(planes)``).
    nsigma
        Clipping half-width in σ (afw ``numSigmaClip``).
    niter
        Number of clipping passes, the first one based on median and IQR (afw ``numIter``).

    Returns
    -------
    mean, std
        Floats; ``(nan, nan)`` if no finite unmasked value exists, std is ``nan`` for a single value.
    """
    v = _good_values(values, mask)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.dtype not in (np.float32, np.float64):
        v = v.astype(np.float64)
    # The quartiles only set the first clipping window; for very large samples a regular subsample of
    # ≥ 2·10⁶ values fixes them to ~1e-3 σ, far below any effect on the iterated result, at a fraction of the cost.
    qv = v[:: max(1, v.size // 2_000_000)] if v.size > 4_000_000 else v
    q25, med, q75 = (float(q) for q in np.quantile(qv, [0.25, 0.5, 0.75]))
    # Work on values relative to the median: float32 differences are exact enough and the float64
    # accumulations of Σd and Σd² then suffer no cancellation.
    d = v - v.dtype.type(med)
    center, half = 0.0, nsigma * IQR_TO_SIGMA * (q75 - q25)
    mean, std = med, float("nan")
    for _ in range(max(int(niter), 1)):
        keep = np.abs(d - d.dtype.type(center)) <= half
        k = int(np.count_nonzero(keep))
        if k == 0:
            break
        kept = d[keep]
        s1 = float(kept.sum(dtype=np.float64))
        # float64 accumulation without a float64 copy (einsum buffers the cast); not np.dot, whose BLAS
        # thread start-up costs more than the sum itself on small samples
        s2 = float(np.einsum("i,i->", kept, kept, dtype=np.float64))
        m = s1 / k
        std = float(np.sqrt(max(s2 - s1 * m, 0.0) / (k - 1))) if k > 1 else float("nan")
        center, mean = m, med + m
        half = nsigma * std if np.isfinite(std) else 0.0
    return mean, std


def clipped_mean(values: np.ndarray, mask: np.ndarray | None = None, nsigma: float = 3.0, niter: int = 3) -> float:
    """The clipped mean of :func:`clipped_mean_std` (afw ``MEANCLIP``)."""
    return clipped_mean_std(values, mask, nsigma, niter)[0]


def nan_quantiles_rows(
    values: np.ndarray, valid: np.ndarray, qs: tuple[float, ...]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-row quantiles (numpy "linear" definition) of the ``valid`` entries of a 2-D array.

    Returns ``(n_valid, [quantile arrays])``; rows without valid entries get NaN. Rows are sorted once, with
    invalid entries pushed to the end as +inf, so all quantiles cost one sort.
    """
    v = np.where(valid, values, np.inf)
    v.sort(axis=1)
    n = valid.sum(axis=1)
    out = []
    rows = np.arange(v.shape[0])
    for q in qs:
        pos = q * np.maximum(n - 1, 0)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
        frac = pos - lo
        a = v[rows, lo].astype(np.float64)
        b = v[rows, hi].astype(np.float64)
        with np.errstate(invalid="ignore"):  # rows without valid entries: inf - inf, set to NaN below
            res = a + (b - a) * frac
        res[n == 0] = np.nan
        out.append(res)
    return n, out


def clipped_mean_std_rows(
    values: np.ndarray, valid: np.ndarray, nsigma: float = 3.0, niter: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`clipped_mean_std` applied to every row of a 2-D array at once.

    Parameters
    ----------
    values
        ``(m, n)`` array: ``m`` independent samples of up to ``n`` values.
    valid
        ``(m, n)`` boolean array, True for values that take part (finite and unmasked).

    Returns
    -------
    mean, std, median
        Arrays of length ``m`` (NaN for rows without valid values).
    """
    values = np.asarray(values)
    valid = np.asarray(valid, dtype=bool) & np.isfinite(values)
    n, (q25, med, q75) = nan_quantiles_rows(values, valid, (0.25, 0.5, 0.75))
    # Values relative to the row median, invalid entries NaN (every comparison with NaN is False).
    dt = values.dtype if values.dtype in (np.float32, np.float64) else np.float64
    d = np.subtract(values, med[:, None].astype(dt), dtype=dt)
    d[~valid] = np.nan
    center = np.zeros(values.shape[0], dtype=dt)
    half = (nsigma * IQR_TO_SIGMA * (q75 - q25)).astype(dt)
    mean = med.copy()
    std = np.full(values.shape[0], np.nan)
    d2 = d * d  # reused by every pass; reductions with ``where=`` avoid masked copies
    tmp = np.empty_like(d)
    for _ in range(max(int(niter), 1)):
        np.subtract(d, center[:, None], out=tmp)
        np.abs(tmp, out=tmp)
        with np.errstate(invalid="ignore"):
            keep = tmp <= half[:, None]
        k = np.count_nonzero(keep, axis=1)
        s1 = np.add.reduce(d, axis=1, dtype=np.float64, where=keep, initial=0.0)
        s2 = np.add.reduce(d2, axis=1, dtype=np.float64, where=keep, initial=0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            m = s1 / k
            var = np.maximum(s2 - s1 * m, 0.0) / (k - 1)
        ok = k > 0
        mean = np.where(ok, med + np.where(ok, m, 0.0), mean)
        std = np.where(k > 1, np.sqrt(np.where(k > 1, var, 0.0)), np.where(ok, np.nan, std))
        center = np.where(ok, m, center).astype(dt)
        half = np.where(np.isfinite(std), nsigma * std, 0.0).astype(dt)
    return mean, std, med


#: Gaussian quartile Φ⁻¹(3/4): the MAD of N(0, σ²) is ``_MAD_C · σ``.
_MAD_C = 0.6744897501960817


def _mad_hermite_weights(k_max: int = 400) -> np.ndarray:
    """Weights ``w_k`` (k = 0 … k_max, zero for odd k) of ``cov(1{|X|<c}, 1{|Y|<c}) = Σ w_k ρ^k`` for standard
    Gaussians X, Y of correlation ρ (Mehler's expansion of the MAD's influence function), normalised to sum 1.

    ``w_k = 4 φ(c)² He_{k−1}(c)² / k!`` for even k ≥ 2; the terms fall off slowly (∝ k^-3/2), so the tail beyond
    ``k_max`` is left to the lag-0 term, the only one where ρ^k does not vanish. Computed with normalised Hermite
    functions ``h_n = He_n/√n!`` (no factorial overflow): ``w_k = 4 φ(c)² h_{k−1}² / k``.
    """
    c = _MAD_C
    phi = np.exp(-0.5 * c * c) / np.sqrt(2.0 * np.pi)
    h = np.empty(k_max)
    h[0], h[1] = 1.0, c
    for n in range(1, k_max - 1):
        h[n + 1] = (c * h[n] - np.sqrt(n) * h[n - 1]) / np.sqrt(n + 1)
    w = np.zeros(k_max + 1)
    k = np.arange(2, k_max + 1, 2)
    w[k] = 4.0 * phi * phi * h[k - 1] ** 2 / k
    return w / 0.25  # Var 1{|X|<c} = 1/4: the weights then sum to 1 less the truncated tail


def mad_sigma_relative_error(z: np.ndarray, valid: np.ndarray, max_lag: int = 16) -> float:
    """Relative standard error of the MAD-based σ (``1.4826 · MAD``) of a correlated Gaussian field.

    For n independent values it is ``1.166/√n`` (the MAD's 37 % efficiency). Neighbouring values of a smoothed
    or filtered noise image are not independent: the error grows by ``√A``, ``A = Σ_lags g(ρ(lag))`` with ρ the
    field's autocorrelation and ``g(ρ) = Σ w_k ρ^k`` (:func:`_mad_hermite_weights`). ``g`` is not ρ²: a MAD
    responds to a neighbour's correlation more weakly than a variance, and for white noise smoothed by a
    Gaussian of width σ ``A ≈ 1.2πσ²``, not the noise-equivalent area 4πσ² (0.29 of it; simulated scatter in
    ``tests/test_statistics.py``).

    Parameters
    ----------
    z : `numpy.ndarray`
        2-D field (e.g. S/N); values where ``valid`` is False are ignored.
    valid : `numpy.ndarray`
        Boolean map of the values that enter the MAD.
    max_lag : `int`
        Largest lag (pixels, per axis) of the measured autocorrelation; it should cover the correlation length.

    Returns
    -------
    float
        The relative standard error, ``inf`` for fewer than two valid values.
    """
    import scipy.fft as sfft

    from ._threads import fft_workers

    workers = fft_workers()
    valid = np.asarray(valid, dtype=bool)
    n = int(valid.sum())
    if n < 2:
        return float("inf")
    f = np.where(valid, np.asarray(z, dtype=np.float64), 0.0)
    f[valid] -= np.median(f[valid])
    m = valid.astype(np.float64)
    ny, nx = f.shape
    L = int(max(0, min(max_lag, ny - 1, nx - 1)))
    shape = (sfft.next_fast_len(ny + L, real=True), sfft.next_fast_len(nx + L, real=True))

    def autocorrelation(a):
        fa = sfft.rfft2(a, s=shape, workers=workers)
        full = sfft.irfft2(fa * np.conj(fa), s=shape, workers=workers)
        return np.roll(np.roll(full, L, 0), L, 1)[: 2 * L + 1, : 2 * L + 1]

    pairs = autocorrelation(m)
    cov = autocorrelation(f) / np.maximum(pairs, 1.0)
    rho = np.clip(cov / cov[L, L], -1.0, 1.0)
    w = _mad_hermite_weights()
    g = np.polynomial.polynomial.polyval(rho, w)
    g[L, L] = 1.0  # the lag-0 term carries the whole variance, tail included
    area = float(max(1.0, g.sum()))
    # Relative error of σ from the MAD: √(Var 1{|z|<c} · A / n) / (2 c φ(c)), 1.166 √(A/n).
    phi = np.exp(-0.5 * _MAD_C ** 2) / np.sqrt(2.0 * np.pi)
    return float(np.sqrt(0.25 * area / n) / (2.0 * _MAD_C * phi))
