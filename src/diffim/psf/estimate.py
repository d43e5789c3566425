"""Estimate a spatially varying PSF from the stars of an exposure.

:func:`estimate_psf` works in five vectorised steps:

1. **Background**: medians of ``bkg_cell``-pixel cells (masked pixels ignored), interpolated bilinearly.
2. **Detection**: the background-subtracted image is smoothed with a Gaussian of the guessed PSF width; peaks
   are local maxima of the smoothed image above ``threshold`` times its noise (a small private detector; the
   detection area owns the full one).
3. **Measurement**: adaptive (Gaussian-weighted, SdssShape-like) centroids and second moments of every
   candidate, iterated on a stack of stamps at once; matched-filter S/N; flags for masked pixels (``SAT``,
   ``BAD``, ``NO_DATA``, ``CR``, ``EDGE``, ``INTRP``, ``SUSPECT``) in the stamp and for neighbours.
4. **Selection**: the widths are divided by a robust low-order polynomial fit of width over the field, so a PSF
   whose size varies across the image still forms one tight cluster, then LSST's ObjectSizeStarSelector
   (:func:`~diffim.psf.star_selector.object_size_star_selector`) picks the stars.
5. **Fit**: each star stamp is moved onto its central pixel by a sub-pixel Lanczos-5 shift (as a pair of
   interpolation matrices, for all stamps at once), normalised to unit sum, and the model
   ``P(x, y) = Σ_k B_k T_k(u, v)`` is solved by weighted linear least squares for all pixels together;
   stars whose χ² is an outlier are clipped and the fit repeated.

The result is a :class:`~diffim.psf.varying.PixelBasisPsf` on the image pixel grid.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage

from ..errors import PsfEstimationError
from ..model.psf import FWHM_PER_SIGMA
from .star_selector import object_size_star_selector
from .varying import PixelBasisPsf, polynomial_powers, polynomial_terms

__all__ = [
    "estimate_psf",
    "find_peaks",
    "measure_moments",
    "background_map",
    "DEFAULT_BAD_MASK_PLANES",
]

log = logging.getLogger("diffim.psf.estimate")

DEFAULT_BAD_MASK_PLANES = ("BAD", "SAT", "NO_DATA", "CR", "EDGE", "INTRP", "SUSPECT")
_LANCZOS_ORDER = 5
#: An image less than this many PSF stamps across is called "too small" in the error messages: it cannot
#: hold enough isolated stars away from its edges.
_MIN_STAMPS_ACROSS = 4


def _small_image_hint(ny: int, nx: int, stamp: int) -> str:
    """``"; the image (nx×ny px) is too small ..."`` if it is less than a few PSF stamps across, else ``""``."""
    if min(ny, nx) >= _MIN_STAMPS_ACROSS * stamp:
        return ""
    return (f"; the image ({nx}×{ny} px) is too small for that: it is less than {_MIN_STAMPS_ACROSS} PSF stamps "
            f"({stamp} px) across")


# ----------------------------------------------------------------------------------------------------------
# Background and detection
# ----------------------------------------------------------------------------------------------------------
def background_map(image: np.ndarray, bad: np.ndarray | None = None, cell: int = 128) -> np.ndarray:
    """Smooth background: medians of ``cell × cell`` cells (``bad`` pixels ignored), bilinearly interpolated."""
    ny, nx = image.shape
    cy, cx = max(1, min(cell, ny)), max(1, min(cell, nx))
    my, mx = -(-ny // cy), -(-nx // cx)
    pad = np.full((my * cy, mx * cx), np.nan, dtype=np.float32)
    pad[:ny, :nx] = image
    if bad is not None:
        pad[:ny, :nx][bad] = np.nan
    blocks = pad.reshape(my, cy, mx, cx).transpose(0, 2, 1, 3).reshape(my, mx, cy * cx)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(blocks, axis=2)
    if np.all(~np.isfinite(med)):
        return np.zeros_like(image, dtype=np.float32)
    med = np.where(np.isfinite(med), med, np.nanmedian(med))
    if med.size == 1:
        return np.full(image.shape, med[0, 0], dtype=np.float32)
    yy = (np.arange(ny) - (cy - 1) / 2.0) / cy
    xx = (np.arange(nx) - (cx - 1) / 2.0) / cx
    gy, gx = np.meshgrid(np.clip(yy, 0, my - 1), np.clip(xx, 0, mx - 1), indexing="ij")
    return ndimage.map_coordinates(med, [gy, gx], order=1, mode="nearest").astype(np.float32)


def find_peaks(image: np.ndarray, noise: float, sigma: float, threshold: float = 5.0,
               bad: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peaks of a background-subtracted image: local maxima of the PSF-smoothed image above threshold.

    Returns integer ``(row, col)`` arrays and the peak significance (smoothed value / smoothed noise).
    The noise of white noise of σ ``noise`` smoothed by a unit-sum Gaussian of width ``sigma`` is
    ``noise / (2√π σ)``.
    """
    img = np.where(bad, 0.0, image).astype(np.float32) if bad is not None else image.astype(np.float32)
    sm = ndimage.gaussian_filter(img, sigma, mode="constant", truncate=3.0)
    sm_noise = noise / (2.0 * math.sqrt(math.pi) * sigma)
    size = max(3, 2 * int(round(sigma)) + 1)
    peak = (sm == ndimage.maximum_filter(sm, size=size, mode="constant")) & (sm > threshold * sm_noise)
    rows, cols = np.nonzero(peak)
    return rows, cols, sm[rows, cols] / sm_noise


def _stamps(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, half: int) -> np.ndarray:
    """Stack of ``(2 half + 1)²`` stamps centred on ``(rows, cols)`` (which must be ``half`` from the edges)."""
    off = np.arange(-half, half + 1)
    return image[(rows[:, None, None] + off[None, :, None]), (cols[:, None, None] + off[None, None, :])]


def measure_moments(stamps: np.ndarray, variance: np.ndarray | None = None, sigma0: float = 2.0,
                    max_iter: int = 30) -> dict[str, np.ndarray]:
    """Adaptive moments of a stack of background-subtracted stamps ``(n, s, s)``.

    The elliptical Gaussian weight is iterated to the object's own covariance (for a Gaussian object the fixed
    point is the object's covariance, ``M = 2 Q``), and its centre to the object's centroid (twice the weighted
    offset, exact for a Gaussian weighted by itself).

    Returns
    -------
    dict
        ``x, y`` (centroid offsets from the stamp centre), ``ixx, iyy, ixy``, ``flux`` (Gaussian-weighted flux ×
        2, the total flux of a Gaussian), ``snr`` (matched-filter S/N, if ``variance`` is given: Σ W I / √Σ W²V)
        and ``ok``.
    """
    st = np.asarray(stamps, dtype=np.float64)
    n, s, _ = st.shape
    c = (s - 1) / 2.0
    grid = np.arange(s) - c
    xg = grid[None, None, :]
    yg = grid[None, :, None]
    cx = np.zeros(n)
    cy = np.zeros(n)
    mxx = np.full(n, sigma0**2)
    myy = np.full(n, sigma0**2)
    mxy = np.zeros(n)
    ok = np.ones(n, dtype=bool)
    lim_c = c / 2.0
    lim_m = (c / 2.0) ** 2
    for _ in range(max_iter):
        det = mxx * myy - mxy**2
        ok &= det > 0
        det = np.where(ok, det, 1.0)
        a, b, d = myy / det, mxx / det, -mxy / det  # inverse covariance
        dx = xg - cx[:, None, None]
        dy = yg - cy[:, None, None]
        w = np.exp(-0.5 * (a[:, None, None] * dx * dx + b[:, None, None] * dy * dy + 2 * d[:, None, None] * dx * dy))
        wi = w * st
        s0 = wi.sum(axis=(1, 2))
        ok &= s0 > 0
        s0 = np.where(ok, s0, 1.0)
        ux = (wi * dx).sum(axis=(1, 2)) / s0
        uy = (wi * dy).sum(axis=(1, 2)) / s0
        qxx = (wi * dx * dx).sum(axis=(1, 2)) / s0 - ux * ux
        qyy = (wi * dy * dy).sum(axis=(1, 2)) / s0 - uy * uy
        qxy = (wi * dx * dy).sum(axis=(1, 2)) / s0 - ux * uy
        ncx = np.clip(cx + 2.0 * ux, -lim_c, lim_c)
        ncy = np.clip(cy + 2.0 * uy, -lim_c, lim_c)
        nxx = np.clip(2.0 * qxx, 0.1, lim_m)
        nyy = np.clip(2.0 * qyy, 0.1, lim_m)
        nxy = np.clip(2.0 * qxy, -0.9 * np.sqrt(nxx * nyy), 0.9 * np.sqrt(nxx * nyy))
        change = np.abs(nxx - mxx) + np.abs(nyy - myy) + np.abs(ncx - cx) + np.abs(ncy - cy)
        cx, cy, mxx, myy, mxy = ncx, ncy, nxx, nyy, nxy
        if np.all(change[ok] < 1e-5):
            break
    ok &= (np.abs(cx) < lim_c) & (np.abs(cy) < lim_c) & (mxx < lim_m) & (myy < lim_m) & (mxx > 0.1) & (myy > 0.1)
    # Final weight for flux and S/N.
    det = np.where(ok, mxx * myy - mxy**2, 1.0)
    a, b, d = myy / det, mxx / det, -mxy / det
    dx = xg - cx[:, None, None]
    dy = yg - cy[:, None, None]
    w = np.exp(-0.5 * (a[:, None, None] * dx * dx + b[:, None, None] * dy * dy + 2 * d[:, None, None] * dx * dy))
    s0 = (w * st).sum(axis=(1, 2))
    out = {"x": cx, "y": cy, "ixx": mxx, "iyy": myy, "ixy": mxy, "flux": 2.0 * s0, "ok": ok & (s0 > 0)}
    if variance is not None:
        v = np.asarray(variance, dtype=np.float64)
        noise = np.sqrt((w * w * v).sum(axis=(1, 2)))
        with np.errstate(divide="ignore", invalid="ignore"):
            out["snr"] = np.where(noise > 0, s0 / noise, 0.0)
        out["flux_err"] = 2.0 * noise
    return out


# ----------------------------------------------------------------------------------------------------------
# Sub-pixel recentring
# ----------------------------------------------------------------------------------------------------------
def _lanczos_matrices(shift: np.ndarray, n_in: int, n_out: int, margin: int) -> np.ndarray:
    """Matrices ``(n, n_out, n_in)`` sampling ``in`` at ``margin + j + shift`` with Lanczos-5 weights."""
    a = _LANCZOS_ORDER
    j = np.arange(n_out)[None, :, None] + margin
    k = np.arange(n_in)[None, None, :]
    t = k - (j + shift[:, None, None])
    w = np.sinc(t) * np.sinc(t / a)
    w[np.abs(t) >= a] = 0.0
    return w / w.sum(axis=2, keepdims=True)


def _recentre(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray, margin: int) -> np.ndarray:
    """Shift each stamp so that its centroid (offset ``dx, dy`` from the centre) lands on the central pixel.

    The input stamps are ``2·margin`` larger than the output; the margin absorbs the interpolation taps.
    """
    n_in = stamps.shape[1]
    n_out = n_in - 2 * margin
    wy = _lanczos_matrices(dy, n_in, n_out, margin)
    wx = _lanczos_matrices(dx, n_in, n_out, margin)
    return np.matmul(np.matmul(wy, stamps), wx.transpose(0, 2, 1))


# ----------------------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------------------
def _robust_poly_fit(x: np.ndarray, y: np.ndarray, z: np.ndarray, degree: int, scale: tuple, n_iter: int = 5,
                     clip: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Polynomial fit of ``z(x, y)`` with iterative MAD clipping; returns ``(coefficients, kept mask)``."""
    x0, y0, sx, sy = scale
    t = polynomial_terms((x - x0) / sx, (y - y0) / sy, degree)
    keep = np.isfinite(z)
    coef = np.zeros(t.shape[1])
    coef[0] = np.nanmedian(z)
    for _ in range(n_iter):
        if keep.sum() <= t.shape[1]:
            break
        coef, *_ = np.linalg.lstsq(t[keep], z[keep], rcond=None)
        model = t @ coef
        r = z - model
        mad = 1.4826 * np.median(np.abs(r[keep] - np.median(r[keep])))
        if mad <= 0:
            break
        new = np.isfinite(z) & (np.abs(r) < clip * mad)
        if np.array_equal(new, keep):
            break
        keep = new
    return coef, keep


def estimate_psf(
    exposure,
    *,
    degree: int = 2,
    size: int | None = None,
    threshold: float = 10.0,
    sigma_guess: float | None = None,
    bad_mask_planes: tuple[str, ...] = DEFAULT_BAD_MASK_PLANES,
    signal_to_noise_min: float = 50.0,
    width_min: float = 0.9,
    width_max: float = 10.0,
    width_std_allowed: float = 0.15,
    n_sigma_clip: float = 2.0,
    max_stars: int = 2000,
    min_stars: int | None = None,
    clip_sigma: float = 4.0,
    n_clip_iter: int = 3,
    bkg_cell: int = 128,
) -> PixelBasisPsf:
    """Estimate a spatially varying pixel-basis PSF from the stars of ``exposure`` (see the module docstring).

    Parameters
    ----------
    exposure
        :class:`~diffim.model.Exposure` (image, mask and variance are used).
    degree
        Total degree of the polynomial in ``(x, y)``; lowered (with a log message) when there are fewer than
        ``3 × n_terms`` stars.
    size
        Width of the PSF images (odd). Default ``2·ceil(5 w₉₀) + 1`` from the 90th-percentile star width
        ``w₉₀``, at least 11.
    threshold
        Detection threshold in units of the smoothed-image noise.
    sigma_guess
        Initial PSF σ in pixels (default: the exposure's PSF if it has one, else 2).
    bad_mask_planes
        Stamps containing any of these planes are not used.
    signal_to_noise_min, width_min, width_max, width_std_allowed, n_sigma_clip
        ObjectSizeStarSelector parameters (``signalToNoiseMin``, ``widthMin``, ...).
    max_stars
        The brightest ``max_stars`` selected stars are fitted.
    min_stars
        Fewest stars accepted (default ``max(3, n_terms of degree 0)`` = 3).
    clip_sigma, n_clip_iter
        Stars whose reduced χ² exceeds the median by ``clip_sigma`` robust σ are dropped, up to
        ``n_clip_iter`` times.
    bkg_cell
        Background cell size in pixels.

    Raises
    ------
    PsfEstimationError
        Fewer than ``min_stars`` usable stars.
    """
    image = np.asarray(exposure.image, dtype=np.float32)
    variance = np.asarray(exposure.variance, dtype=np.float32)
    mask = exposure.mask
    ny, nx = image.shape
    x0, y0 = exposure.xy0
    bad_pix = mask.get(bad_mask_planes, ignore_missing=True) if bad_mask_planes else np.zeros(image.shape, bool)
    bad_pix |= ~np.isfinite(image)
    if sigma_guess is None:
        sigma_guess = 2.0
        if getattr(exposure, "psf", None) is not None:
            try:
                sigma_guess = float(exposure.psf.sigma(*exposure.psf_position()))
            except Exception:  # an unusable attached PSF only loses us the better initial guess
                sigma_guess = 2.0
    bkg = background_map(image, bad_pix, bkg_cell)
    sub = np.where(bad_pix, 0.0, image - bkg).astype(np.float32)
    good_var = variance[~bad_pix & np.isfinite(variance) & (variance > 0)]
    noise = float(np.sqrt(np.median(good_var))) if good_var.size else float(np.std(sub))
    if not noise > 0:
        # No positive variance and a background-subtracted image that is exactly 0: nothing to measure.
        if bad_pix.all():
            why = f"every pixel is non-finite or masked ({', '.join(bad_mask_planes)})"
        else:
            why = ("the image is flat (a single value, or a smooth background without noise or stars: a fill "
                   "value, a blank frame or a mask?) and its variance has no positive value; give the real image")
        raise PsfEstimationError(f"Cannot estimate a PSF: {why}.")

    rows, cols, signif = find_peaks(sub, noise, sigma_guess, threshold=min(5.0, threshold), bad=bad_pix)
    # Candidate stars: significant peaks; the fainter ones only serve as neighbours.
    half_m = int(max(6, math.ceil(4.0 * sigma_guess)))
    for _ in range(2):
        cand = np.flatnonzero(
            (signif > threshold)
            & (rows >= half_m) & (rows < ny - half_m) & (cols >= half_m) & (cols < nx - half_m)
        )
        if cand.size == 0:
            n_peaks = int(np.count_nonzero(signif > threshold))
            where = (f"{n_peaks} peaks above {threshold}σ in all, each closer than that to an edge" if n_peaks
                     else f"no peak above {threshold}σ anywhere")
            raise PsfEstimationError(
                f"No star candidates above {threshold}σ at least {half_m} px from the edges ({where}); cannot "
                f"estimate a PSF{_small_image_hint(ny, nx, 2 * half_m + 1)}."
            )
        r, c = rows[cand], cols[cand]
        mom = measure_moments(_stamps(sub, r, c, half_m), _stamps(variance, r, c, half_m), sigma_guess)
        width = np.sqrt(0.5 * (mom["ixx"] + mom["iyy"]))
        med_w = float(np.nanmedian(width[mom["ok"]])) if mom["ok"].any() else sigma_guess
        if half_m >= 4.0 * med_w:
            break
        half_m = int(math.ceil(4.5 * med_w))
        sigma_guess = med_w
    xs = c + mom["x"]
    ys = r + mom["y"]

    # Flags: masked pixels within the stamp, neighbours inside the stamp.
    flagged = ~mom["ok"]
    if bad_pix.any():
        bad_count = ndimage.uniform_filter(bad_pix.astype(np.float32), size=2 * half_m + 1, mode="constant")
        flagged |= bad_count[r, c] > 0
    if rows.size > 1:
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([cols, rows]))
        pairs = tree.query_ball_point(np.column_stack([c, r]), r=half_m * math.sqrt(2.0))
        amp = signif
        for i, neigh in enumerate(pairs):
            if len(neigh) > 1:
                me = cand[i]
                others = [j for j in neigh if j != me]
                # A neighbour brighter than 1 % of the candidate inside its stamp spoils its wings.
                if np.any(amp[others] > 0.01 * amp[me]):
                    flagged[i] = True

    # Selection: normalise the widths by their smooth variation over the field, then cluster.
    sx, sy = max(nx / 2.0, 1.0), max(ny / 2.0, 1.0)
    scale = ((nx - 1) / 2.0, (ny - 1) / 2.0, sx, sy)
    ok = ~flagged & np.isfinite(width) & (mom.get("snr", np.inf) > signal_to_noise_min)
    width_n = width.copy()
    if ok.sum() > 3 * len(polynomial_powers(min(degree, 2))):
        wdeg = min(degree, 2)
        coef_w, kept = _robust_poly_fit(xs[ok], ys[ok], width[ok], wdeg, scale)
        wfit = polynomial_terms((xs - scale[0]) / sx, (ys - scale[1]) / sy, wdeg) @ coef_w
        good_fit = np.isfinite(wfit) & (wfit > 0)
        ref = float(np.median(wfit[ok][kept])) if kept.any() else float(np.median(width[ok]))
        width_n = np.where(good_fit, width / np.where(good_fit, wfit, 1.0) * ref, np.nan)
    stars = object_size_star_selector(
        width_n,
        mom["flux"],
        mom.get("flux_err"),
        flagged,
        do_signal_to_noise_limit=True,
        signal_to_noise_min=signal_to_noise_min,
        width_min=width_min,
        width_max=width_max,
        width_std_allowed=width_std_allowed,
        n_sigma_clip=n_sigma_clip,
    )
    sel = np.flatnonzero(stars)
    if sel.size > max_stars:
        sel = sel[np.argsort(-mom["flux"][sel])[:max_stars]]
    n_terms = len(polynomial_powers(degree))
    min_stars = 3 if min_stars is None else int(min_stars)
    if sel.size < min_stars:
        # Say where the candidates went, so the user can tell a small/empty field from a noisy or masked one.
        snr = np.broadcast_to(mom.get("snr", np.inf), flagged.shape)
        n_flag = int(flagged.sum())
        n_faint = int(np.count_nonzero(~flagged & ~(snr > signal_to_noise_min)))
        n_width = max(int(cand.size) - n_flag - n_faint - int(sel.size), 0)
        raise PsfEstimationError(
            f"Only {sel.size} usable stars (need {min_stars}) among {cand.size} candidates above {threshold}σ: "
            f"{n_flag} masked or crowded, {n_faint} below S/N {signal_to_noise_min:g}, {n_width} not of the "
            f"stars' width{_small_image_hint(ny, nx, 2 * half_m + 1)}; provide a PSF model for this image."
        )
    while degree > 0 and sel.size < 3 * n_terms:
        degree -= 1
        n_terms = len(polynomial_powers(degree))
        log.info("Only %d stars: lowering the PSF polynomial degree to %d.", sel.size, degree)

    # Stamp size of the model.
    if size is None:
        w90 = float(np.percentile(width[sel], 90))
        size = max(11, 2 * int(math.ceil(5.0 * w90)) + 1)
    size = int(size) | 1
    half = size // 2
    margin = _LANCZOS_ORDER + 1
    big = half + margin
    r_s, c_s = r[sel], c[sel]
    inside = (r_s >= big) & (r_s < ny - big) & (c_s >= big) & (c_s < nx - big)
    sel, r_s, c_s = sel[inside], r_s[inside], c_s[inside]
    if sel.size < min_stars:
        # Only the image edges are tested here; stars near masked (NO_DATA, NaN) regions were flagged above, so
        # the message names both: a large NaN area is an "edge" to the user.
        raise PsfEstimationError(
            f"Only {sel.size} of {inside.size} usable stars are far enough from the image edges for {size}-pixel "
            f"PSF images (need {min_stars}; stars near masked (NO_DATA) regions were already left out)"
            f"{_small_image_hint(ny, nx, 2 * big + 1)}; provide a PSF model for this image."
        )
    raw = _stamps(sub, r_s, c_s, big).astype(np.float64)
    data = _recentre(raw, mom["x"][sel], mom["y"][sel], margin)
    var_st = _stamps(variance, r_s, c_s, half).astype(np.float64)
    # Residual local background from the frame of the raw stamps *outside* the model's area (the interpolation
    # margin). Taken on the model's own outer ring (5σ) it removed real wing flux — seeing-limited stars keep
    # several per cent there — and left the model too peaked, which a PSF-based subtraction (ZOGY) returns as
    # rings around bright stars (properimage: 6 % of the model's flux beyond 4 px, 13 % in the stars).
    ring = np.ones((2 * big + 1, 2 * big + 1), bool)
    ring[margin:-margin, margin:-margin] = False
    data -= np.median(raw[:, ring], axis=1)[:, None, None]
    flux = data.sum(axis=(1, 2))
    usable = flux > 0
    data, var_st, flux, sel = data[usable], var_st[usable], flux[usable], sel[usable]
    if sel.size < min_stars:
        raise PsfEstimationError(f"Only {sel.size} stars with positive flux; cannot estimate a PSF.")
    norm = data / flux[:, None, None]
    # Weight of each normalised stamp: inverse of its per-pixel noise², capped at S/N 1000 so the brightest
    # stars (whose small model mismatches dominate) do not take over the fit.
    pix_var = np.median(var_st, axis=(1, 2)) / flux**2
    peak = norm.max(axis=(1, 2))
    weight = 1.0 / np.maximum(pix_var, (peak / 1000.0) ** 2)
    px = xs[sel] + x0
    py = ys[sel] + y0
    pscale = (x0 + (nx - 1) / 2.0, y0 + (ny - 1) / 2.0, sx, sy)
    design = polynomial_terms((px - pscale[0]) / sx, (py - pscale[1]) / sy, degree)
    target = norm.reshape(norm.shape[0], -1)
    keep = np.ones(sel.size, bool)
    coef = None
    for it in range(n_clip_iter + 1):
        sw = np.sqrt(weight[keep])[:, None]
        coef, *_ = np.linalg.lstsq(design[keep] * sw, target[keep] * sw, rcond=None)
        resid = target - design @ coef
        chi2 = (resid**2).sum(axis=1) * weight / target.shape[1]
        med = np.median(chi2[keep])
        mad = 1.4826 * np.median(np.abs(chi2[keep] - med))
        new = chi2 < med + clip_sigma * max(mad, 1e-12)
        if it == n_clip_iter or np.array_equal(new, keep) or new.sum() < max(min_stars, n_terms):
            break
        keep = new
    basis = coef.reshape(n_terms, size, size)
    wsum = weight[keep].sum()
    avg = (float((px[keep] * weight[keep]).sum() / wsum), float((py[keep] * weight[keep]).sum() / wsum))
    # The polynomial is known where its stars are: beyond their extent (plus a stamp) it is held at its edge
    # value rather than extrapolated, e.g. over the blank half of a partly covered frame.
    box = (float(px[keep].min()) - size, float(py[keep].min()) - size,
           float(px[keep].max()) + size, float(py[keep].max()) + size)
    psf = PixelBasisPsf(basis, degree, pscale[0], pscale[1], sx, sy, average_position=avg,
                        valid_box=box if degree > 0 else None)
    psf.n_stars = int(keep.sum())  # diagnostics for callers and tests
    psf.star_positions = np.column_stack([px[keep], py[keep]])
    log.info(
        "PSF from %d stars (%d candidates), degree %d, %d×%d pixels, FWHM %.2f px at the average position.",
        keep.sum(), cand.size, degree, size, size, FWHM_PER_SIGMA * float(np.median(width[sel])),
    )
    return psf
