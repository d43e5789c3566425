"""Aperture corrections: measure them from bright isolated stars and apply them (cf. meas_algorithms
``MeasureApCorrTask`` and meas_base ``ApplyApCorrTask``).

The correction of an algorithm's flux is the ratio of a large-aperture flux (the calibration flux,
``base_CircularApertureFlux_12_0``) to that algorithm's flux for stars, fitted as a constant or a low-order
Chebyshev polynomial in ``(x, y)`` over the image. With ``to_total`` each aperture flux is first divided by the
PSF model's encircled energy within the aperture, so that the corrected fluxes are totals, not 12-px aperture
fluxes (which lose a broad PSF's wings: 16 % of a Moffat β = 3 of FWHM 10 px). An ``ApCorrMap`` is a plain
``dict`` mapping ``"<algorithm>_instFlux"`` and ``"<algorithm>_instFluxErr"`` to callables ``f(x, y)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial import chebyshev

from ..errors import DiffimValueError
from ..model.box import Box
from ..model.psf import Psf
from ._stamps import kernel_image_stack
from .aperture import aperture_flux, circle_pixel_weights
from .psf_flux import psf_flux

__all__ = ["ApCorrModel", "ApCorrResult", "encircled_energy", "isolated_from_peaks", "measure_ap_corr",
           "apply_ap_corr"]


def encircled_energy(psf: Psf, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Fraction of the PSF model's light inside a circle of ``radius`` px centred on the star, at each ``(x, y)``.

    The model is its unit-sum kernel image there (a model stamp smaller than the circle gives 1: all of the
    model's light is inside). Pixels count by their exact overlap with the circle, as in
    :func:`~diffim.measure.aperture.aperture_flux`.
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    if x.size == 0:
        return np.zeros(0)
    k = kernel_image_stack(psf, x, y)
    half = int(np.ceil(radius)) + 1
    w = circle_pixel_weights(np.zeros(1), np.zeros(1), radius, half)[0]
    ky, kx = k.shape[1] // 2, k.shape[2] // 2
    hy, hx = min(ky, half), min(kx, half)
    ks = k[:, ky - hy : ky + hy + 1, kx - hx : kx + hx + 1]
    ws = w[half - hy : half + hy + 1, half - hx : half + hx + 1]
    return np.einsum("nij,ij->n", ks, ws) / k.sum(axis=(1, 2))


class ApCorrModel:
    """A Chebyshev polynomial of total degree ``order`` over a bounding box: ``f(x, y) -> correction``.

    Parameters
    ----------
    coefficients
        ``(order+1, order+1)`` Chebyshev coefficients ``c[i, j]`` of ``T_i(u) T_j(v)`` (zero for ``i+j > order``).
    bbox
        Parent-coordinate box mapped onto ``[-1, 1]²``.
    """

    def __init__(self, coefficients: np.ndarray, bbox: Box) -> None:
        self.coefficients = np.atleast_2d(np.asarray(coefficients, float))
        self.bbox = bbox

    @classmethod
    def constant(cls, value: float, bbox: Box) -> "ApCorrModel":
        return cls(np.array([[float(value)]]), bbox)

    def _uv(self, x, y):
        b = self.bbox
        u = 2.0 * (np.asarray(x, float) - b.x0) / max(b.width - 1, 1) - 1.0
        v = 2.0 * (np.asarray(y, float) - b.y0) / max(b.height - 1, 1) - 1.0
        return u, v

    def __call__(self, x, y) -> np.ndarray:
        u, v = self._uv(x, y)
        return chebyshev.chebval2d(u, v, self.coefficients)

    @property
    def order(self) -> int:
        return self.coefficients.shape[0] - 1

    def __repr__(self) -> str:
        return f"ApCorrModel(order={self.order}, bbox={self.bbox}, c00={self.coefficients[0, 0]:.5g})"


def _fit_chebyshev(x, y, z, w, bbox: Box, order: int,
                   extra: np.ndarray | None = None) -> tuple[ApCorrModel, float]:
    """Weighted least-squares Chebyshev polynomial of total degree ``order``, and the coefficient of ``extra``
    (one more column fitted alongside, a nuisance term left out of the model; 0 without it)."""
    tmp = ApCorrModel(np.zeros((order + 1, order + 1)), bbox)
    u, v = tmp._uv(x, y)
    vander = chebyshev.chebvander2d(u, v, [order, order])  # columns: i*(order+1) + j
    ii, jj = np.divmod(np.arange((order + 1) ** 2), order + 1)
    keep = ii + jj <= order
    design = vander[:, keep]
    if extra is not None:
        design = np.column_stack([design, extra])
    sw = np.sqrt(w)
    sol, *_ = np.linalg.lstsq(design * sw[:, None], z * sw, rcond=None)
    coeffs = np.zeros((order + 1) ** 2)
    coeffs[keep] = sol[: int(keep.sum())]
    return ApCorrModel(coeffs.reshape(order + 1, order + 1), bbox), (float(sol[-1]) if extra is not None else 0.0)


#: A detected peak within the isolation radius of an aperture-correction star disqualifies the star when the
#: peak's PSF flux is at least this fraction of the star's (see :func:`isolated_from_peaks`).
NEIGHBOUR_FLUX_FRACTION = 0.005


def isolated_from_peaks(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, psf: Psf,
                        x: np.ndarray, y: np.ndarray, flux: np.ndarray, peak_x, peak_y, *,
                        xy0: tuple[int, int] = (0, 0), radius: float = 24.0,
                        fraction: float = NEIGHBOUR_FLUX_FRACTION) -> np.ndarray:
    """True for the stars at ``(x, y)`` (PSF fluxes ``flux``) with no detected peak within ``radius`` px whose
    PSF flux, fitted on ``image``, is ≥ ``fraction`` of theirs; a peak whose flux cannot be measured counts.

    Any peak at all used to disqualify a star: with a sharp PSF (FWHM 2.5 px) stars of a few hundred counts are
    5σ peaks, one lies within 24 px of nearly every bright star, and the correction was left to the faintest
    (seed 402: 10 stars of ≤ 2.4·10⁴ counts, 0.943, flux bias −5.6 %), though a 600-count star 13 px away
    moves a 2.9·10⁵-count star's ratio by 0.2 % at most.
    """
    from scipy.spatial import cKDTree

    px, py = np.asarray(peak_x, float), np.asarray(peak_y, float)
    sx, sy = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    sflux = np.atleast_1d(np.asarray(flux, float))
    keep = np.ones(len(sx), bool)
    if px.size == 0 or sx.size == 0:
        return keep
    pflux = psf_flux(image, variance, mask, psf, px, py, xy0=xy0).flux
    for i, near in enumerate(cKDTree(np.column_stack([px, py])).query_ball_point(np.column_stack([sx, sy]), radius)):
        for j in near:
            if np.hypot(px[j] - sx[i], py[j] - sy[i]) <= 1.5:  # the star's own peak
                continue
            if not (pflux[j] < fraction * sflux[i]):  # NaN (unmeasurable) counts as a neighbour
                keep[i] = False
                break
    return keep


#: A star's PSF fit counts as contaminated when its χ² exceeds the pixel count by this many standard deviations
#: and by more than _MISFIT_FLOOR of its own S/N² (see :func:`_contaminated`).
_MISFIT_SIGNIFICANCE = 5.0
_MISFIT_FLOOR = 0.03


def _contaminated(pf, snr: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Stars whose PSF fit leaves a significant misfit larger than the usual one: something else in the stamp.

    The misfit is √(χ² − N)/(S/N), the rms residual of the fit as a fraction of the star (N its pixels): ≈ 0 for
    a star the model describes, ε for all bright stars if the model is ε off, and the neighbour's share of the
    flux when a source without a peak of its own sits on the star's wing — whose flux the 12-px aperture takes
    and the PSF fit does not (simulated Moffat β = 3.5, seed 201: a 9·10³-count transient 8.7 px from a
    1.3·10⁵-count star, misfit 0.19, ratio 1.078 ± 0.006, correction 1.086). A star is dropped when its excess
    χ² is significant (> 5σ of χ²) and its misfit exceeds both 3 % and twice the median of the significant
    ones (≥ 5 of them: the level the PSF model's own errors leave).
    """
    excess = pf.chi2 - pf.npix
    with np.errstate(divide="ignore", invalid="ignore"):
        signif = excess / np.sqrt(2.0 * pf.npix)
        misfit = np.sqrt(np.maximum(excess, 0.0)) / snr
    sig = use & np.isfinite(signif) & (signif > _MISFIT_SIGNIFICANCE) & np.isfinite(misfit)
    level = float(np.median(misfit[sig])) if sig.sum() >= 5 else 0.0
    return sig & (misfit > max(_MISFIT_FLOOR, 2.0 * level))


def _clip(fit, ratio, ratio_err, x, y, inv_f, use, n_sigma_clip: float, n_iter: int, min_keep: int):
    """Fit and clip, iterated: ``fit(use)`` returns ``(model, b)`` and a star stays while
    ``|ratio − model(x, y) − b·inv_f|`` is within ``n_sigma_clip`` times the larger of the residuals' robust
    scatter (0.741·IQR) and its own error. Stops when nothing changes or fewer than ``min_keep`` would remain;
    returns ``(use, model, b)``, the last two from the last fit."""
    model, b = None, 0.0
    for _ in range(max(1, n_iter)):
        model, b = fit(use)
        resid = ratio - model(x, y) - b * inv_f
        q25, q75 = np.percentile(resid[use], [25, 75])
        sd = 0.741 * (q75 - q25)
        if not (sd > 0):
            break
        new_use = use & (np.abs(resid) <= n_sigma_clip * np.maximum(sd, ratio_err))
        if new_use.sum() < min_keep or np.array_equal(new_use, use):
            break
        use = new_use
    return use, model, b


@dataclass
class ApCorrResult:
    """Measured aperture correction: the map, and per-star ratios and which stars were used."""

    ap_corr_map: dict
    ratio: np.ndarray
    ratio_err: np.ndarray
    used: np.ndarray
    value: float
    value_err: float

    @property
    def n_used(self) -> int:
        """Number of stars the final fit used."""
        return int(np.count_nonzero(self.used))


def measure_ap_corr(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    psf: Psf,
    x: np.ndarray,
    y: np.ndarray,
    *,
    bbox: Box | None = None,
    xy0: tuple[int, int] = (0, 0),
    radius: float = 12.0,
    order: int = 0,
    min_snr: float = 50.0,
    bad_mask: int = 0,
    isolation_radius: float | None = None,
    n_sigma_clip: float = 3.0,
    n_iter: int = 3,
    min_stars: int = 3,
    algorithm: str = "base_PsfFlux",
    to_total: bool = False,
) -> ApCorrResult:
    """Fit the aperture correction of PSF fluxes from stars at ``(x, y)``.

    Parameters
    ----------
    image, variance, mask, psf
        The science exposure's planes and PSF model.
    x, y
        Star positions (parent coordinates), e.g. from the star selector.
    bbox
        Box over which the polynomial is defined (default: the image's).
    radius
        Radius of the reference aperture (12 px = ``base_CircularApertureFlux_12_0``).
    order
        Total degree of the Chebyshev polynomial in ``(x, y)``; 0 = constant.
    min_snr
        Stars whose PSF-flux S/N is below this are not used.
    isolation_radius
        Stars with another input star closer than this are not used (default ``2·radius``).
    n_sigma_clip, n_iter
        Iterative clipping of outlying ratios (robust σ = 0.741·IQR).
    min_stars
        Raise if fewer stars survive.
    algorithm
        Prefix of the map keys (``<algorithm>_instFlux``, ``<algorithm>_instFluxErr``).
    to_total
        Divide each star's aperture flux by the PSF model's :func:`encircled_energy` within ``radius``: the
        correction then brings PSF fluxes to total fluxes (it only corrects the model's shape within the
        aperture), instead of to the aperture's flux, which is what LSST calibrations expect (their
        photometric calibration is tied to the same aperture).

    Returns
    -------
    ApCorrResult
        ``ap_corr_map[algorithm + "_instFlux"]`` is the correction model (multiply fluxes by it);
        ``[algorithm + "_instFluxErr"]`` is the model's uncertainty (a constant), as LSST stores it.

    Raises
    ------
    DiffimValueError
        If fewer than ``min_stars`` stars are usable.
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    if bbox is None:
        bbox = Box.from_shape(image.shape, xy0)
    if isolation_radius is None:
        isolation_radius = 2.0 * radius
    pf = psf_flux(image, variance, mask, psf, x, y, bad_mask, xy0=xy0)
    ap = aperture_flux(image, variance, x, y, radius, xy0=xy0, mask=mask, bad_mask=bad_mask)
    if to_total:
        ee = encircled_energy(psf, x, y, radius)
        ap.flux, ap.flux_err = ap.flux / ee, ap.flux_err / ee
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = ap.flux / pf.flux
        ratio_err = np.abs(ratio) * np.hypot(ap.flux_err / ap.flux, pf.flux_err / pf.flux)
        snr = pf.flux / pf.flux_err
    use = ~pf.flag & ~ap.flag & np.isfinite(ratio) & np.isfinite(ratio_err) & (snr >= min_snr)
    use &= ~_contaminated(pf, snr, use)
    if len(x) > 1 and isolation_radius > 0:
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([x, y]))
        pairs = tree.query_pairs(isolation_radius, output_type="ndarray")
        crowded = np.zeros(len(x), bool)
        crowded[pairs.ravel()] = True
        use &= ~crowded
    if use.sum() < min_stars:
        raise DiffimValueError(
            f"Only {int(use.sum())} of {len(x)} stars are usable for aperture corrections (need {min_stars}); "
            f"lower min_snr ({min_snr}) or the isolation radius ({isolation_radius} px), or disable doApCorr."
        )
    # Ratios scatter far more than their formal errors: neighbours, faint confusion and background errors
    # inside the 12-px aperture. Those are additive (counts, whatever the star's flux): the ratio is modelled as
    # c(x, y) + b/F — b the mean additive error (a sky level a little off takes ≈ 450·δ from every aperture),
    # fitted alongside when the stars span a factor ≥ 3 in flux — and each star's ratio error gains σ_add/F,
    # σ_add the robust scatter of the deviations in counts. (A constant intrinsic scatter gave every star the
    # same weight, and the many faint stars of a Moffat field, whose apertures lose a few counts per pixel to
    # the background around them, pulled its correction 2–3 % low.)
    inv_f = 1.0 / np.where(use, pf.flux, 1.0)
    span = float(np.max(pf.flux[use]) / np.min(pf.flux[use]))  # use holds ≥ min_stars stars here
    n_terms = (order + 1) * (order + 2) // 2
    intercept = span >= 3.0 and use.sum() >= n_terms + 3

    def fit(w, u):
        return _fit_chebyshev(x[u], y[u], ratio[u], w[u], bbox, order, inv_f[u] if intercept else None)

    # First with equal weights: the weighted fit cannot find an outlier itself when it is very bright. A star
    # whose aperture holds a neighbour with no peak of its own (a galaxy on its wing) has the smallest formal
    # error of all, sets the weighted model by itself, and the clipping centred on that model then rejects the
    # good stars instead (simulated pair, seed 303: 1.112 ± 0.002 against 0.96–1.00 for the 32 others,
    # correction 1.077). With equal weights one star moves the model by 1/N of its deviation.
    equal = np.ones_like(ratio)
    use, _, _ = _clip(lambda u: fit(equal, u), ratio, ratio_err, x, y, inv_f, use, n_sigma_clip, n_iter,
                      max(min_stars, n_terms + int(intercept) + 1))
    first, b = fit(1.0 / np.where(use, ratio_err, 1.0) ** 2, use)
    dev_counts = (ratio[use] - first(x[use], y[use])) * pf.flux[use] - b
    q25, q75 = np.percentile(dev_counts, [25, 75])
    formal_counts2 = float(np.median((ratio_err[use] * pf.flux[use]) ** 2))
    add2 = max((0.741 * (q75 - q25)) ** 2 - formal_counts2, 0.0)
    weights = 1.0 / (np.where(use, ratio_err, 1.0) ** 2 + add2 * inv_f**2)
    use, model, b = _clip(lambda u: fit(weights, u), ratio, ratio_err, x, y, inv_f, use, n_sigma_clip, n_iter,
                          min_stars)
    resid = ratio[use] - model(x[use], y[use]) - b * inv_f[use]
    n_used = int(use.sum())
    dof = max(n_used - n_terms - int(intercept), 1)
    value_err = float(np.sqrt(np.sum(resid**2) / dof / n_used)) if n_used > 1 else float(ratio_err[use][0])
    cx, cy = bbox.center
    value = float(model(cx, cy))
    ap_corr_map = {
        f"{algorithm}_instFlux": model,
        f"{algorithm}_instFluxErr": ApCorrModel.constant(value_err, bbox),
    }
    return ApCorrResult(ap_corr_map, ratio, ratio_err, use, value, value_err)


def apply_ap_corr(
    flux: np.ndarray,
    flux_err: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    ap_corr_map: dict | None,
    algorithm: str = "base_PsfFlux",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Apply the aperture correction of ``algorithm`` at ``(x, y)``: ``flux·c``, ``err·c`` (naive errors).

    Returns
    -------
    flux, flux_err, flag_apCorr, ap_corr
        Corrected arrays, the per-source failure flag (no model, or ``c`` not finite and > 0: values left
        unchanged) and the correction ``c`` (NaN where unavailable).
    """
    flux = np.array(flux, dtype=float, copy=True)
    flux_err = np.array(flux_err, dtype=float, copy=True)
    n = len(flux)
    model = None if ap_corr_map is None else ap_corr_map.get(f"{algorithm}_instFlux")
    if model is None:
        return flux, flux_err, np.ones(n, bool), np.full(n, np.nan)
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    c = np.broadcast_to(np.asarray(model(x, y), float), (n,)).copy()
    ok = np.isfinite(c) & (c > 0)
    flux[ok] *= c[ok]
    flux_err[ok] *= c[ok]
    c[~ok] = np.nan
    return flux, flux_err, ~ok, c
