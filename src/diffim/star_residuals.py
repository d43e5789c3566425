"""Residuals that static stars leave in a difference image, and the variance they add to detection.

A difference image of an unchanged star is zero only if the two images are registered and flux-matched
exactly. Two frames taken minutes apart are not: atmospheric tip-tilt moves every star independently by a few
hundredths of a pixel, and the matching kernel (smooth across the field) cannot follow. A star at S/N ≈ 1000
shifted by δ leaves a dipole ``−δ·∇M`` whose amplitude is ≈ 1000·δ/σ_PSF in units of the noise: 0.02 px is a
10 σ "source". Zackay, Ofek & Gal-Yam (2016, §3.5) add this astrometric noise to the variance of their score
image (``S_corr``); this module does the same for the PSF-smoothed difference that plain detection thresholds.

Model (per static star ``i``, in the difference ``D`` and a static-sky model ``M`` on the same grid — the
template side of the subtraction, which holds no science transient; its noise is also in ``D``, with the
opposite sign, and the part that is, measured on empty sky, is taken out of the flux fit):

    D ≈ a_i·M − δx_i·∂M/∂x − δy_i·∂M/∂y + b_i·∇²M + c_i

``δ`` is the star's residual shift, ``a`` its residual flux-matching error (relative) and ``b`` its residual
width mismatch (a Gaussian PSF broader by ``dσ`` differs from it by ``σ·dσ·∇²P``: the core-and-ring a seeing
or PSF-matching error leaves). Fitted by weighted least squares on a stamp around each bright isolated star,
the scatters

    σ_δ² = E[δ²] − noise,   σ_a² = E[a²] − noise,   σ_w² = E[b²] − noise

are estimated from each star's value and its own noise error with a median (so that real dipoles and variable
stars, up to half the sample, do not count). Because the smoothing that detection applies is linear, the smoothed difference of a
static star is ``a·M_s − δ·∇M_s + b·∇²M_s`` with ``M_s`` the smoothed model, so the variance the residuals add to every
smoothed pixel is exactly

    V_extra = σ_δ² (|∂M_s/∂x|² + |∂M_s/∂y|²) + σ_w² (∇²M_s)²   [+ σ_a² M_s², not used by the task].

The flux term would raise the threshold on every galaxy in proportion to its brightness; the Laplacian term
follows what a PSF mismatch really leaves — large on stars, small on smooth extended light.

It is large only on bright static sources; on empty sky (and for images registered as well as their noise
allows, σ_δ = σ_a = 0) it vanishes and detection is unchanged.

What none of these terms describes — the two exposures' PSFs differing in their wings or asymmetries (seeing
minutes apart; PSF models that miss it) — still scales with each star's brightness. :func:`mismatch_profile`
measures it on the same stars as a radial profile ``Π(r)`` of their mean squared residual beyond the noise and
the fitted terms, per unit squared amplitude, and :func:`mismatch_variance` adds ``A_i²·Π(|p − x_i|)`` around
every bright static source ``i``.

The brightest stars' halos reach beyond that profile, where fainter stars show nothing to learn from:
:func:`halo_model` measures each of them on the star itself.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from .detection import local_maxima

__all__ = ["StarResiduals", "bright_star_positions", "fit_star_residuals", "residual_scatter",
           "residual_variance", "shared_noise_slope", "laplacian", "mismatch_profile", "mismatch_variance",
           "isolated_peaks", "halo_model", "Halos"]


@dataclass
class StarResiduals:
    """Per-star residual fits and the scatters derived from them.

    Attributes
    ----------
    x, y
        Star positions (array indices of the arrays given, float).
    shift_x, shift_y, shift_err
        Fitted residual shifts δ (pixels) and their 1σ noise error (per axis).
    flux, flux_err
        Fitted relative flux residual ``a`` and its error.
    sigma_shift, sigma_flux
        Intrinsic scatters σ_δ (pixels, per axis) and σ_a (relative), noise removed; 0 when unresolved.
    n_used
        Stars kept after outlier clipping.
    kept
        Per star: within 4σ of the fitted scatters in both shifts and the flux (not a dipole, mover or
        variable); set by :func:`residual_scatter`.
    """

    x: np.ndarray
    y: np.ndarray
    shift_x: np.ndarray
    shift_y: np.ndarray
    shift_err: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    width: np.ndarray | None = None
    width_err: np.ndarray | None = None
    sigma_shift: float = 0.0
    sigma_flux: float = 0.0
    sigma_width: float = 0.0
    n_used: int = 0
    kept: np.ndarray | None = None


def bright_star_positions(smoothed: np.ndarray, smoothed_variance: np.ndarray, *, min_snr: float = 50.0,
                          isolation: int = 8, bad: np.ndarray | None = None, max_stars: int = 300) -> np.ndarray:
    """Integer (y, x) of local maxima of a smoothed image with S/N ≥ ``min_snr``, brightest first.

    Two peaks within ``isolation`` pixels of each other are both dropped (blends bias the shift fit; see
    :func:`isolated_peaks`); peaks on ``bad`` pixels are ignored. ``smoothed_variance`` may be an array or a
    scalar. At most ``max_stars`` (the brightest) are returned.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        cand = smoothed >= np.float32(min_snr) * np.sqrt(smoothed_variance)
    cand &= np.isfinite(smoothed)
    if bad is not None:
        cand &= ~bad
    ny, nx = smoothed.shape
    cand[0], cand[-1], cand[:, 0], cand[:, -1] = False, False, False, False  # no stamp fits there anyway
    ys, xs = np.nonzero(cand)
    if ys.size == 0:
        return np.zeros((0, 2), int)
    # 3×3 local maxima among the candidates only (no full-image filter or padded copy).
    is_max = local_maxima(smoothed, ys, xs)
    ys, xs = ys[is_max], xs[is_max]
    vals = smoothed[ys, xs]
    order = np.argsort(-vals, kind="stable")
    return isolated_peaks(np.column_stack([ys[order], xs[order]]), isolation, max_stars)


def isolated_peaks(peaks: np.ndarray, isolation: int, max_stars: int | None = None) -> np.ndarray:
    """The ``(y, x)`` rows of ``peaks`` with no other peak within ``isolation`` pixels (both of a close pair
    are dropped), in their order, at most ``max_stars`` of them; ``isolation`` ≤ 0 keeps all."""
    peaks = np.asarray(peaks, int).reshape(-1, 2)
    keep = np.ones(len(peaks), bool)
    if len(peaks) > 1 and isolation > 0:
        from scipy.spatial import cKDTree

        pairs = cKDTree(peaks[:, ::-1]).query_pairs(float(isolation), output_type="ndarray")
        if pairs.size:
            keep[pairs.ravel()] = False
    return peaks[keep][:max_stars]


def _stamps(array: np.ndarray, ys: np.ndarray, xs: np.ndarray, r: int) -> np.ndarray:
    off = np.arange(-r, r + 1)
    return array[(ys[:, None, None] + off[None, :, None]), (xs[:, None, None] + off[None, None, :])]


def laplacian(image: np.ndarray) -> np.ndarray:
    """5-point Laplacian over the last two axes (a stack of stamps works too); 0 on the outer frame.
    Floating input keeps its precision, anything else becomes float32."""
    a = np.asarray(image)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    out = np.zeros(a.shape, a.dtype)
    out[..., 1:-1, 1:-1] = (a[..., 1:-1, 2:] + a[..., 1:-1, :-2] + a[..., 2:, 1:-1] + a[..., :-2, 1:-1]
                            - 4.0 * a[..., 1:-1, 1:-1])
    return out


def shared_noise_slope(difference: np.ndarray, model: np.ndarray, model_variance: np.ndarray,
                       sky: np.ndarray, step: int = 3) -> tuple[float, float, float]:
    """How much of the model's own noise is in the difference, measured on empty-sky pixels ``sky``:
    ``(β, β_L, λ_L)`` with ``E[D·M] = β·V_M``, ``E[D·∇²M] = β_L·V_M`` and ``Var(∇²ε_M) = λ_L·V_M`` per pixel
    (β ≈ −1 for a template-side model of ``science − template``, whose noise enters ``D`` with the opposite
    sign). ``β_L`` is not ``−4β`` nor ``λ_L`` 20: a convolved model's noise is correlated with its
    neighbours', which the Laplacian also reads.
    These expectations bias a regression of ``D`` on ``M`` and ``∇²M`` (see :func:`fit_star_residuals`).
    Every ``step``-th pixel along each axis is used (a few 10⁵ samples are plenty; no image-sized copies)."""
    ny, nx = np.shape(model)
    yy, xx = np.mgrid[1 : ny - 1 : step, 1 : nx - 1 : step]
    yy, xx = yy.ravel(), xx.ravel()
    keep = np.asarray(sky)[yy, xx]
    yy, xx = yy[keep], xx[keep]
    if yy.size < 100:
        return 0.0, 0.0, 0.0
    m = np.asarray(model)
    mc = m[yy, xx].astype(np.float64)
    lp = (m[yy, xx + 1].astype(np.float64) + m[yy, xx - 1] + m[yy + 1, xx] + m[yy - 1, xx]) - 4.0 * mc
    d = np.asarray(difference)[yy, xx].astype(np.float64)
    v = np.asarray(model_variance)[yy, xx].astype(np.float64)
    ok = np.isfinite(d) & np.isfinite(mc) & np.isfinite(lp) & (v > 0)
    if ok.sum() < 100:
        return 0.0, 0.0, 0.0
    mc = mc - np.median(mc[ok])  # the model may carry its sky level
    ok &= np.abs(mc) < 5 * np.sqrt(np.where(v > 0, v, 0.0))  # residual sources out
    if ok.sum() < 100:
        return 0.0, 0.0, 0.0
    vs = float(np.sum(v[ok]))
    return (float(np.sum(d[ok] * mc[ok]) / vs), float(np.sum(d[ok] * lp[ok]) / vs),
            float(np.sum(lp[ok] ** 2) / vs))


def fit_star_residuals(difference: np.ndarray, variance: np.ndarray, model: np.ndarray, positions: np.ndarray,
                       radius: int, bad: np.ndarray | None = None, max_bad_fraction: float = 0.1,
                       model_variance: np.ndarray | None = None,
                       shared: tuple[float, ...] | None = None) -> StarResiduals:
    """Fit ``D ≈ a·M − δx·∂xM − δy·∂yM + c`` on a ``(2·radius+1)²`` stamp around each position.

    Parameters
    ----------
    difference, variance
        Difference image and its variance.
    model
        Static-sky model with (about) the difference's PSF, background removed (e.g. the sky-subtracted
        science). Its gradient is taken by central differences.
    positions
        Integer (y, x) star centres (array indices).
    radius
        Stamp half-width in pixels (≈ 2 FWHM).
    bad
        Pixels given zero weight; stars with more than ``max_bad_fraction`` of their stamp bad are skipped.
    model_variance, shared
        The model's variance ``V_M`` and ``(β, β_L[, λ_L])`` of :func:`shared_noise_slope`: the expected
        products ``E[D·ε_M] = β·V_M`` and ``E[D·∇²ε_M] = β_L·V_M`` of the difference's noise with the
        model's. A model whose noise is also in the difference biases the flux and width coefficients by
        these (≈ 1/S/N² per stamp pixel): the expectations are subtracted. The shift coefficients are not
        biased (central differences of a symmetric noise correlation cancel). With ``λ_L``, the scatter of
        that product about its expectation (``λ_L·V_M·V_D + β_L²·V_M²`` per pixel; independent of the star's
        brightness) is added to the width error. None: independent noise.

    Returns
    -------
    StarResiduals
        Per-star fits (scatters not yet estimated: see :func:`residual_scatter`).
    """
    pos = np.asarray(positions, int).reshape(-1, 2)
    ny, nx = difference.shape
    r = int(radius)
    inside = (pos[:, 0] >= r + 1) & (pos[:, 0] < ny - r - 1) & (pos[:, 1] >= r + 1) & (pos[:, 1] < nx - r - 1)
    pos = pos[inside]
    empty = np.zeros(0)
    if pos.shape[0] == 0:
        return StarResiduals(empty, empty, empty, empty, empty, empty, empty)
    ys, xs = pos[:, 0], pos[:, 1]
    big = _stamps(np.asarray(model), ys, xs, r + 1).astype(np.float64)  # stamps first: no image-sized copies
    m = big[:, 1:-1, 1:-1]
    gx = 0.5 * (big[:, 1:-1, 2:] - big[:, 1:-1, :-2])
    gy = 0.5 * (big[:, 2:, 1:-1] - big[:, :-2, 1:-1])
    lap = laplacian(big)[:, 1:-1, 1:-1]
    d = _stamps(np.asarray(difference), ys, xs, r).astype(np.float64)
    v = _stamps(np.asarray(variance), ys, xs, r).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where((v > 0) & np.isfinite(v) & np.isfinite(d) & np.isfinite(m), 1.0 / v, 0.0)
    if bad is not None:
        w[_stamps(bad, ys, xs, r)] = 0.0
    good_frac = (w > 0).mean(axis=(1, 2))
    d, m, gx, gy, lap = (np.nan_to_num(a) for a in (d, m, gx, gy, lap))
    design = np.stack([m, -gx, -gy, lap, np.ones_like(m)], axis=-1).reshape(len(ys), -1, 5)
    wf = w.reshape(len(ys), -1)
    ata = np.einsum("npi,np,npj->nij", design, wf, design)
    atb = np.einsum("npi,np,np->ni", design, wf, d.reshape(len(ys), -1))
    ok = good_frac >= 1.0 - max_bad_fraction
    ok &= np.linalg.cond(ata) < 1e12
    coef = np.full((len(ys), 5), np.nan)
    cov_diag = np.full((len(ys), 5), np.nan)
    if shared is not None and model_variance is not None:
        vm = np.nan_to_num(_stamps(np.asarray(model_variance), ys, xs, r).astype(np.float64)).reshape(len(ys), -1)
        wv = np.sum(wf * vm, axis=1)
        atb[:, 0] -= shared[0] * wv  # E[Σ w·ε·η] of the model column: the shared noise
        atb[:, 3] -= shared[1] * wv  # ... and of the Laplacian column
    if ok.any():
        inv = np.linalg.inv(ata[ok])
        coef[ok] = np.einsum("nij,nj->ni", inv, atb[ok])
        cov_diag[ok] = np.diagonal(inv, axis1=1, axis2=2)
        if shared is not None and model_variance is not None and len(shared) > 2:
            # The Laplacian column's noise times the difference's: its scatter about the expectation removed
            # above enters the width coefficient like extra data noise (Var(XY) = Var X·Var Y + Cov²).
            vd = v.reshape(len(ys), -1)
            s_prod = np.sum(wf * wf * (shared[2] * vm * vd + shared[1] ** 2 * vm * vm), axis=1)
            cov_diag[ok, 3] += inv[:, 3, 3] ** 2 * s_prod[ok]
    err = np.sqrt(cov_diag)
    keep = ok & np.all(np.isfinite(coef), axis=1)
    return StarResiduals(
        x=xs[keep].astype(float), y=ys[keep].astype(float),
        shift_x=coef[keep, 1], shift_y=coef[keep, 2], shift_err=np.sqrt(0.5 * (err[keep, 1] ** 2 + err[keep, 2] ** 2)),
        flux=coef[keep, 0], flux_err=err[keep, 0], width=coef[keep, 3], width_err=err[keep, 3],
    )


#: Median of the χ² distribution with one degree of freedom.
_CHI2_1_MEDIAN = 0.45493642311957283


def _median_scatter(values: np.ndarray, errors: np.ndarray) -> tuple[float, np.ndarray]:
    """Intrinsic scatter ``s`` of zero-mean ``values`` with Gaussian noise ``errors``: the root of
    ``median(v²/(s² + e²)) = 0.455`` (the median of χ²₁), 0 if the noise alone explains the values.

    A median, so up to half the values may be outliers (real dipoles and variable stars are not registration
    residuals). Returns ``(s, kept)`` with ``kept`` the values within 4σ of the result.
    """
    v = np.asarray(values, float)
    e2 = np.asarray(errors, float) ** 2
    ok = np.isfinite(v) & np.isfinite(e2) & (e2 > 0)
    if ok.sum() < 3:
        return 0.0, ok
    v2, e2 = v[ok] ** 2, e2[ok]

    def excess(s2: float) -> float:
        return float(np.median(v2 / (s2 + e2))) - _CHI2_1_MEDIAN

    s2 = 0.0
    if excess(0.0) > 0:
        hi = float(np.max(v2)) + 1e-30
        lo = 0.0
        for _ in range(100):  # bisection: excess decreases monotonically with s²
            mid = 0.5 * (lo + hi)
            if excess(mid) > 0:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-6 * hi:
                break
        s2 = 0.5 * (lo + hi)
    kept = np.zeros(v.shape, bool)
    kept[np.nonzero(ok)[0]] = v2 <= 16.0 * (s2 + e2)
    return float(np.sqrt(s2)), kept


def residual_scatter(res: StarResiduals, *, min_stars: int = 5) -> StarResiduals:
    """Estimate σ_δ, σ_a and σ_w (noise removed; median-based, so robust to real dipoles and variable stars)
    in place; 0 when fewer than ``min_stars`` fits. ``n_used``: stars within 4σ of σ_δ and σ_a.

    All are taken about zero (a common residual offset, flux-scale or width error is as much a mismatch as
    the scatter); the two axes enter as independent samples of one σ_δ.
    """
    n = res.x.size
    if n < min_stars:
        res.sigma_shift = res.sigma_flux = 0.0
        res.n_used = int(n)
        res.kept = np.ones(n, bool)
        return res
    shifts = np.concatenate([res.shift_x, res.shift_y])
    errs = np.concatenate([res.shift_err, res.shift_err])
    s_shift, keep_s = _median_scatter(shifts, errs)
    s_flux, keep_f = _median_scatter(res.flux, res.flux_err)
    if res.width is not None:
        res.sigma_width = _median_scatter(res.width, res.width_err)[0]
    res.sigma_shift, res.sigma_flux = s_shift, s_flux
    res.n_used = int(min(keep_s[:n].sum(), keep_s[n:].sum(), keep_f.sum()))
    res.kept = keep_s[:n] & keep_s[n:] & keep_f
    return res


def residual_variance(model_smoothed: np.ndarray, sigma_shift: float, sigma_flux: float,
                      sigma_width: float = 0.0) -> np.ndarray:
    """``σ_δ²·|∇M_s|² + σ_a²·M_s² + σ_w²·(∇²M_s)²`` (float32): the variance static stars' residuals add to the
    smoothed difference (``M_s``: the static model smoothed with the detection kernel)."""
    ms = np.nan_to_num(np.asarray(model_smoothed, np.float32))
    out = np.zeros(ms.shape, np.float32)
    if sigma_shift > 0:
        gy, gx = np.gradient(ms)
        out += np.float32(sigma_shift ** 2) * (gx * gx + gy * gy)
        del gx, gy
    if sigma_flux > 0:
        out += np.float32(sigma_flux ** 2) * ms * ms
    if sigma_width > 0:
        lap = laplacian(ms)
        out += np.float32(sigma_width ** 2) * lap * lap
    return out


def _radial_bins(r_max: int) -> np.ndarray:
    """``(2·r_max+1)²`` integer radius (rounded) of each stamp pixel from the centre."""
    off = np.arange(-r_max, r_max + 1)
    return np.rint(np.hypot(off[:, None], off[None, :])).astype(int)


#: A star's excess ``e_i`` is a square: for a single residual mode with a Gaussian amplitude, ``e_i/Π`` is χ²₁,
#: which exceeds this factor with probability 8·10⁻⁶. Larger values are not the stars' own residuals.
_MAX_EXCESS_RATIO = 20.0


def _random_effects_mean(e: np.ndarray, s2: np.ndarray, iterations: int = 4) -> float:
    """Mean ``Π`` of per-star excesses ``e`` with noise variances ``s2`` and an unknown intrinsic scatter τ²
    between the stars (DerSimonian & Laird 1986: τ² by the method of moments, weights ``1/(s2 + τ²)``, so that
    faint, noise-dominated stars weigh by their noise and bright ones equally).

    A mean, not a median: the excess is a square, skewed (χ²-like), and its mean is the variance wanted.
    Values that neither the noise nor that skew can explain, ``e > 20·Π + 5·√s2`` (an unrelated source — a
    transient or a neighbour — in a star's rings), are dropped, starting from ``Π`` = weighted median / 0.455
    (the χ²₁ median; an upper bound) and iterating."""
    ok = np.isfinite(e) & np.isfinite(s2) & (s2 > 0)
    e, s2 = np.asarray(e, float)[ok], np.asarray(s2, float)[ok]
    if e.size == 0:
        return 0.0
    w = 1.0 / s2
    order = np.argsort(e)
    cw = np.cumsum(w[order])
    mean = max(float(e[order][np.searchsorted(cw, 0.5 * cw[-1])]), 0.0) / _CHI2_1_MEDIAN
    for _ in range(iterations):
        kept = e <= _MAX_EXCESS_RATIO * mean + 5.0 * np.sqrt(s2)
        if not kept.any():
            return 0.0
        ek, sk = e[kept], s2[kept]
        wk = 1.0 / sk
        mean = float(np.sum(wk * ek) / np.sum(wk))
        if ek.size > 1:
            q = float(np.sum(wk * (ek - mean) ** 2))
            denom = float(np.sum(wk) - np.sum(wk * wk) / np.sum(wk))
            tau2 = max(0.0, (q - (ek.size - 1)) / denom) if denom > 0 else 0.0
            wk = 1.0 / (sk + tau2)
            mean = float(np.sum(wk * ek) / np.sum(wk))
        mean = max(mean, 0.0)
    return mean


def mismatch_profile(residual: np.ndarray, variance: np.ndarray, positions: np.ndarray, amplitudes: np.ndarray,
                     r_max: int, *, extra_variance: np.ndarray | None = None, model: np.ndarray | None = None,
                     sigma_flux: float = 0.0, kernel: np.ndarray | None = None, corr_area: float = 1.0,
                     bad: np.ndarray | None = None, min_stars: int = 5,
                     exclude_points: np.ndarray | None = None, exclude_radius: float = 0.0) -> np.ndarray:
    """Radial profile ``Π(r)``, r = 0 … ``r_max`` px, of the mean squared residual static stars leave beyond
    the noise and the fitted terms, per unit squared amplitude of the star in the static model.

    What the shift, flux and width terms do not describe — differences of the PSFs' wings and asymmetries
    between two exposures (seeing changes minutes apart; PSF models that miss them) — still scales with the
    star's brightness. Its expected square, ``A_i²·Π(r)`` at distance r from a star of amplitude ``A_i``, is
    estimated here from the stars themselves: per star and 1-px radial bin,
    ``e_i(r) = ⟨R² − V − V_fit⟩ / A_i²`` (``R``: the residual as detection sees it, ``V`` its noise variance,
    ``V_fit``: ``extra_variance``, what the fitted terms already add), and over stars a random-effects mean
    (:func:`_random_effects_mean`): faint stars, whose ``e_i`` is mostly noise, weigh by their noise; bright
    ones, whose ``e_i`` differ by the stars' own mismatch, equally. A mean, not a median: the variance of a
    heavy-tailed residual is its mean square. Negative bins (noise alone explains them) are 0.

    Parameters
    ----------
    residual, variance
        Detection image (difference or score) and its per-pixel variance; with ``kernel`` they are smoothed
        on stamps here (separable ``kernel`` for the residual, ``kernel²`` for the variance), as detection
        will smooth them.
    positions, amplitudes
        Integer (y, x) of isolated static stars (dipoles, movers and variables already dropped) and their
        amplitude (peak of the static model in the detection domain).
    r_max
        Outer radius of the profile.
    extra_variance
        Variance the fitted terms already add, in the detection domain (image-shaped), or None.
    model, sigma_flux
        The static model in the detection domain and a flux-mismatch scatter σ_a: ``σ_a²·model²`` is taken out
        too (a fitted term that the caller does not add to the detection variance).
    corr_area
        Noise-correlation area of the detection image in pixels (``2π σ²`` for white noise smoothed by a
        Gaussian of σ), for the noise variance of a bin mean: ``2·V²·corr_area / n``.
    bad
        Stars whose stamp touches one of these pixels are not used.
    min_stars
        Fewer usable stars: the profile is 0.
    exclude_points, exclude_radius
        ``(k, 2)`` integer (y, x) of unrelated sources — transients, variables, faint neighbours, detected in the
        science image — whose light may lie in a star's rings: pixels within ``exclude_radius`` of them are left
        out of the rings' means. None: none.

    Returns
    -------
    numpy.ndarray
        ``(r_max + 1,)`` float64, ≥ 0.
    """
    from scipy.ndimage import correlate1d

    pos = np.asarray(positions, int).reshape(-1, 2)
    amp = np.asarray(amplitudes, float)
    out = np.zeros(r_max + 1)
    h = 0 if kernel is None else len(kernel) // 2
    m = r_max + h
    ny, nx = np.shape(residual)
    ys, xs = pos[:, 0], pos[:, 1]
    use = (ys >= m) & (xs >= m) & (ys < ny - m) & (xs < nx - m) & np.isfinite(amp) & (amp > 0)
    ys, xs, amp = ys[use], xs[use], amp[use]
    if ys.size < min_stars:
        return out
    R = _stamps(np.asarray(residual), ys, xs, m).astype(np.float64)
    V = _stamps(np.asarray(variance), ys, xs, m).astype(np.float64)
    ok = np.isfinite(R).all(axis=(1, 2)) & np.isfinite(V).all(axis=(1, 2))
    if bad is not None:
        ok &= ~_stamps(np.asarray(bad), ys, xs, m).any(axis=(1, 2))
    if ok.sum() < min_stars:
        return out
    R, V, ys, xs, amp = R[ok], V[ok], ys[ok], xs[ok], amp[ok]
    if kernel is not None:
        k = np.asarray(kernel, np.float64)
        for axis in (1, 2):
            R = correlate1d(R, k, axis=axis, mode="constant")
            V = correlate1d(V, k * k, axis=axis, mode="constant")
        R, V = R[:, h : h + 2 * r_max + 1, h : h + 2 * r_max + 1], V[:, h : h + 2 * r_max + 1, h : h + 2 * r_max + 1]
    excess = R * R - V
    if extra_variance is not None:
        excess -= _stamps(np.asarray(extra_variance), ys, xs, r_max)
    if model is not None and sigma_flux > 0:
        excess -= sigma_flux**2 * _stamps(np.asarray(model), ys, xs, r_max).astype(np.float64) ** 2
    use = np.ones(excess.shape, bool)
    if exclude_points is not None and len(exclude_points) and exclude_radius > 0:
        from scipy.spatial import cKDTree

        pts = np.asarray(exclude_points, float).reshape(-1, 2)
        off = np.arange(-r_max, r_max + 1, dtype=float)
        near = cKDTree(pts).query_ball_point(np.column_stack([ys, xs]).astype(float), r_max + exclude_radius)
        for i, idx in enumerate(near):
            for j in idx:
                dy, dx = pts[j, 0] - ys[i], pts[j, 1] - xs[i]
                if dy * dy + dx * dx < 9.0:
                    continue  # the star's own detection, never unrelated
                use[i] &= (off[:, None] - dy) ** 2 + (off[None, :] - dx) ** 2 > exclude_radius**2
    rb = _radial_bins(r_max)
    a2 = amp * amp
    for r in range(r_max + 1):
        sel = rb == r
        u = use[:, sel]
        n = u.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            e = np.where(u, excess[:, sel], 0.0).sum(axis=1) / n / a2
            v_mean = np.where(u, V[:, sel], 0.0).sum(axis=1) / n
        s2 = 2.0 * v_mean**2 / (a2 * a2) / np.maximum(n / max(corr_area, 1.0), 1.0)
        out[r] = max(_random_effects_mean(e, s2), 0.0)  # a ring with no pixel left: NaN, not used
    return out


def mismatch_variance(shape: tuple[int, int], positions: np.ndarray, amplitudes: np.ndarray,
                      profile: np.ndarray) -> np.ndarray | None:
    """``Σ_i A_i²·Π(|p − x_i|)``: the variance :func:`mismatch_profile`'s residuals add around every static star
    ``i`` (integer (y, x) ``positions``, ``amplitudes`` A_i), float32 of ``shape``; None if ``Π`` is 0."""
    prof = np.asarray(profile, float)
    if not np.any(prof > 0):
        return None
    r_max = prof.size - 1
    off = np.arange(-r_max, r_max + 1)
    rr = np.hypot(off[:, None], off[None, :])
    stamp = np.interp(rr, np.arange(r_max + 1), prof, right=0.0).astype(np.float32)
    out = np.zeros(shape, np.float32)
    ny, nx = shape
    for (y, x), a in zip(np.asarray(positions, int).reshape(-1, 2), np.asarray(amplitudes, float)):
        if not (np.isfinite(a) and a > 0):
            continue
        y0, y1, x0, x1 = max(y - r_max, 0), min(y + r_max + 1, ny), max(x - r_max, 0), min(x + r_max + 1, nx)
        if y0 >= y1 or x0 >= x1:
            continue
        out[y0:y1, x0:x1] += np.float32(a * a) * stamp[y0 - y + r_max : y1 - y + r_max, x0 - x + r_max : x1 - x + r_max]
    return out


@dataclass
class Halos:
    """Residual halos of bright stars in the detection domain (:func:`halo_model`): ``offset``, the measured
    halo (to subtract from the smoothed detection image), and ``variance``, its uncertainty (to add)."""

    offset: np.ndarray
    variance: np.ndarray


#: Relative error of a measured halo where it is subtracted: the cells' bilinear model misses its structure on
#: scales below a cell by about this fraction of its level.
HALO_MODEL_ERROR = 0.25


def halo_model(residual: np.ndarray, variance: np.ndarray, centres: np.ndarray, r_max: int, *,
               kernel: np.ndarray | None = None, bad: np.ndarray | None = None,
               excluded: np.ndarray | None = None, corr_area: float = 1.0,
               ring_width: int = 2, n_sectors: int = 12, nsigma: float = 2.0, n_empty: int = 3,
               model_error: float = HALO_MODEL_ERROR, r_min: float | np.ndarray = 0.0) -> Halos | None:
    """The residual halos of the brightest static stars, measured on each star itself.

    :func:`mismatch_profile` learns a PSF mismatch from many moderately bright stars, within a few FWHM. The
    wings of a star of 10⁶–10⁷ counts differ between two exposures far beyond that (a Moffat's r⁻²ᵝ wings
    scale as α²ᵝ⁻², 1.9× between FWHMs 24 % apart at β = 2.5; a matching kernel of finite support cannot make
    that up), and a saturated core adds its own garbage: smooth residual halos at 5–40σ 13–30 px out, where no
    fainter star shows anything.

    Each such star's halo is measured in its own neighbourhood. The residual as detection sees it is cut into
    cells of ``ring_width`` px in radius and ``n_sectors`` in angle. A cell's level is the median, over its ring's
    ``2·pool + 1`` neighbouring cells (``pool = n_sectors // 6``), of their pixel medians: a halo varies slowly
    with angle, while a transient in it fills most of one cell and must not set that cell's level. It counts
    where it exceeds ``nsigma`` times the pooled cells' noise, ``√(π/2 · V · corr_area / n)``. The significant
    levels, interpolated bilinearly in radius and angle, are the halo model: detection subtracts it (a local
    background around the star) and adds the variance of what it may miss, ``(model_error · level)² + noise²``.
    (Adding the halo's whole square as variance instead took an S/N 15 transient 20 px out in a 4σ halo down
    to 3.3σ.) Rings are measured outwards until ``n_empty`` in a row have no significant cell, at most to
    ``r_max``; sectors too masked to measure (a bleed trail) take their ring's mean.

    Parameters
    ----------
    residual, variance
        Detection image (difference or score) and its per-pixel variance; with ``kernel`` they are smoothed here
        (stamp by stamp: ``kernel`` for the residual, ``kernel²`` for the variance) as detection will.
    centres
        Integer ``(y, x)`` of the stars (saturated cores: their centroid).
    r_max
        Largest halo radius measured (pixels).
    r_min
        Smallest radius, one for all or one per centre: within it nothing is measured or modelled. For peaks
        and for stars saturated in only a few pixels the task passes the radius of :func:`mismatch_profile`,
        whose variance covers a star's own neighbourhood: there a residual's lobes (a quadrupole 8–12 px out,
        measured on a 2·10⁶-count Moffat star) are as compact as a transient, and a model pooled over angle
        had them with the wrong sign in places (6 false detections where it had 1; taking the cell's own median
        where it agreed in sign and was smaller did not help). For larger saturated regions 0: their peak is
        hidden, so the profile's amplitude is unknown, and their own pixels are ``bad`` anyway.
    bad
        Pixels left out of the cells (saturated cores, bad columns).
    excluded
        Pixels whose values detection does not smooth (its ``excludeMaskPlanes``): zeroed here too before
        smoothing, so that the cells see what detection will. Default: ``bad`` (then the cells also leave out
        what the zeroed pixels' smoothing reaches).
    corr_area
        Noise-correlation area of the (smoothed) detection image in pixels.

    Returns
    -------
    Halos or None
        float32 offset and variance maps of ``residual``'s shape; None when no halo is significant.
    """
    from scipy.ndimage import correlate1d

    res = np.asarray(residual)
    var = np.asarray(variance)
    ny, nx = res.shape
    pos = np.asarray(centres, int).reshape(-1, 2)
    h = 0 if kernel is None else len(kernel) // 2
    m = r_max + h
    n_rings = r_max // ring_width + 1
    off = np.arange(-r_max, r_max + 1, dtype=float)
    rr = np.hypot(off[:, None], off[None, :])
    theta = np.arctan2(off[:, None], off[None, :])  # (−π, π]
    ring = np.minimum((rr / ring_width).astype(int), n_rings - 1)
    sector = ((theta + np.pi) / (2.0 * np.pi) * n_sectors).astype(int) % n_sectors
    cell = ring * n_sectors + sector
    inside = rr <= r_max
    # Bilinear interpolation between cell centres, the same for every star: radial and angular indices and
    # weights of each stamp pixel (the innermost ring holds its value to the centre).
    fr = np.clip(rr / ring_width - 0.5, 0.0, n_rings - 1.0)
    ft = (theta + np.pi) / (2.0 * np.pi) * n_sectors - 0.5
    r0 = np.floor(fr).astype(int)
    r1 = np.minimum(r0 + 1, n_rings - 1)
    wr = fr - r0
    t0 = np.floor(ft).astype(int)
    wt = ft - t0
    t0 %= n_sectors
    t1 = (t0 + 1) % n_sectors
    r_mins = np.broadcast_to(np.asarray(r_min, float), (pos.shape[0],))
    out = out_var = None
    for (y, x), r_min in zip(pos, r_mins):
        # Stamp (clipped at the image edges: pixels outside count as bad).
        y0, y1, x0, x1 = y - m, y + m + 1, x - m, x + m + 1
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, ny), max(x0, 0), min(x1, nx)
        if cy0 >= cy1 or cx0 >= cx1:
            continue
        R = np.zeros((2 * m + 1, 2 * m + 1))
        V = np.zeros_like(R)
        B = np.ones(R.shape, bool)
        X = np.ones(R.shape, bool)
        sl = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        R[sl] = res[cy0:cy1, cx0:cx1]
        V[sl] = var[cy0:cy1, cx0:cx1]
        B[sl] = False if bad is None else np.asarray(bad[cy0:cy1, cx0:cx1], bool)
        if excluded is None:
            X = B.copy()
        else:
            X[sl] = np.asarray(excluded[cy0:cy1, cx0:cx1], bool)
        nonfinite = ~(np.isfinite(R) & np.isfinite(V))
        B |= nonfinite
        X |= nonfinite
        R[X], V[X] = 0.0, 0.0
        if kernel is not None:
            k = np.asarray(kernel, np.float64)
            for axis in (0, 1):
                R = correlate1d(R, k, axis=axis, mode="constant")
                V = correlate1d(V, k * k, axis=axis, mode="constant")
                if excluded is None:
                    B = correlate1d(B.astype(np.float64), np.abs(k), axis=axis, mode="constant") > 1e-3
            R, V, B = (a[h : h + 2 * r_max + 1, h : h + 2 * r_max + 1] for a in (R, V, B))
        ok = inside & ~B & (V > 0) & (rr >= r_min)
        # Per cell: median residual and pixel count; then, per ring, a running median over ``2·pool + 1``
        # neighbouring sectors: a halo varies slowly with angle, while a transient in it (a PSF-sized bump that
        # fills most of one cell) must not set its own cell's level. Significance against the pooled noise.
        n_cells = n_rings * n_sectors
        idx = cell[ok]
        counts = np.bincount(idx, minlength=n_cells)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        meds = np.full(n_cells, np.nan)
        vmed = np.full(n_cells, np.nan)
        has = counts >= 4
        lo = bounds[:-1][has] + (counts[has] - 1) // 2
        hi = bounds[:-1][has] + counts[has] // 2
        for arr, target in ((R[ok], meds), (V[ok], vmed)):
            v = arr[np.lexsort((arr, idx))]  # by cell, then by value: each cell's median from its middle
            target[has] = 0.5 * (v[lo] + v[hi])
        meds = meds.reshape(n_rings, n_sectors)
        vmed = vmed.reshape(n_rings, n_sectors)
        cnt = counts.reshape(n_rings, n_sectors)
        pool = max(1, n_sectors // 6)
        shifts = range(-pool, pool + 1)
        win_med = np.stack([np.roll(meds, -d, axis=1) for d in shifts], axis=-1)
        win_var = np.stack([np.roll(vmed, -d, axis=1) for d in shifts], axis=-1)
        win_cnt = np.stack([np.roll(np.where(has.reshape(n_rings, n_sectors), cnt, 0), -d, axis=1) for d in shifts],
                           axis=-1).sum(axis=-1)
        measured = np.isfinite(meds)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows (fully masked) stay NaN
            med = np.nanmedian(win_med, axis=-1)
            noise = np.sqrt(0.5 * math.pi * np.nanmedian(win_var, axis=-1) * max(corr_area, 1.0)
                            / np.maximum(win_cnt, 1))
            sig = measured & (np.abs(med) > nsigma * noise)
        # Outwards from the first measured ring until n_empty measured rings in a row have nothing significant.
        ring_measured = measured.any(axis=1)
        ring_sig = sig.any(axis=1)
        stop = n_rings
        run = 0
        for r in np.flatnonzero(ring_measured):
            run = 0 if ring_sig[r] else run + 1
            if run >= n_empty:
                stop = r + 1
                break
        sig[stop:] = False
        level = np.where(sig, med, 0.0).ravel()
        level_noise2 = np.where(sig, noise * noise, 0.0).ravel()
        if not level.any():
            continue
        # Sectors with too few pixels to measure (a bleed trail's column, an image edge) take their ring's mean
        # over the measured sectors: a halo does not stop at a bleed trail.
        maps = []
        for arr in (level, level_noise2):
            lv = arr.reshape(n_rings, n_sectors)
            ring_mean = (lv * measured).sum(axis=1) / np.maximum(measured.sum(axis=1), 1)
            maps.append(np.where(~measured & ring_measured[:, None], ring_mean[:, None], lv))

        def interp(lv):
            v = (1 - wr) * ((1 - wt) * lv[r0, t0] + wt * lv[r0, t1]) + wr * ((1 - wt) * lv[r1, t0] + wt * lv[r1, t1])
            v[~inside | (rr < r_min)] = 0.0
            return v

        off_map = interp(maps[0])
        var_map = (model_error * off_map) ** 2 + interp(maps[1])
        if out is None:
            out = np.zeros((ny, nx), np.float32)
            out_var = np.zeros((ny, nx), np.float32)
        sy0, sx0 = y - r_max, x - r_max
        qy0, qy1 = max(sy0, 0), min(sy0 + off_map.shape[0], ny)
        qx0, qx1 = max(sx0, 0), min(sx0 + off_map.shape[1], nx)
        if qy0 < qy1 and qx0 < qx1:
            src = (slice(qy0 - sy0, qy1 - sy0), slice(qx0 - sx0, qx1 - sx0))
            dst = (slice(qy0, qy1), slice(qx0, qx1))
            # Overlapping halos: the one of larger magnitude (each star's measurement already holds its
            # neighbour's halo).
            take = np.abs(off_map[src]) > np.abs(out[dst])
            out[dst] = np.where(take, off_map[src], out[dst])
            out_var[dst] = np.where(take, var_map[src], out_var[dst])
    if out is None:
        return None
    return Halos(offset=out, variance=out_var)
