"""Static-star residuals (diffim.star_residuals) and the doStarResidualVariance switch.

Scenes: Gaussian stars (σ = 1.5 px) on a noisy sky. The "science" has every star moved by its own random
shift (tip-tilt jitter, σ_δ per axis) and scaled by its own flux error (σ_a); the "template" has them in place.
The fit must recover σ_δ and σ_a from the difference (the noise being removed in quadrature), stay at ≈ 0 when
nothing moved, and ignore a minority of real dipoles and variable stars.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffim import star_residuals as sr
from diffim.detection import correlate_separable, gaussian_kernel_1d, smoothing_kernel_width

SIGMA = 1.5
NOISE = 10.0


def _stars(shape, xs, ys, fluxes, sigma=SIGMA):
    """Sum of pixel-centred Gaussians (sampled; 8σ cut-outs); ``sigma`` may be one value per star."""
    img = np.zeros(shape)
    sig = np.broadcast_to(np.asarray(sigma, float), np.shape(xs))
    r = int(8 * float(np.max(sig)))
    for x, y, f, sg in zip(xs, ys, fluxes, sig):
        x0, y0 = int(round(x)), int(round(y))
        yy, xx = np.mgrid[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
        img[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1] += (
            f / (2 * math.pi * sg**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sg**2))
        )
    return img


def _scene(seed, sigma_shift, sigma_flux, n=120, size=600, n_dipoles=0, n_variables=0, sigma_width=0.0):
    rng = np.random.default_rng(seed)
    g = np.linspace(30, size - 30, int(math.ceil(math.sqrt(n))))
    gx, gy = np.meshgrid(g, g)
    xs = gx.ravel()[:n] + rng.uniform(-3, 3, n)
    ys = gy.ravel()[:n] + rng.uniform(-3, 3, n)
    flux = 10 ** rng.uniform(4.5, 5.5, n)  # S/N ≈ 600–6000
    dx, dy = rng.normal(0, sigma_shift, n), rng.normal(0, sigma_shift, n)
    fa = 1 + rng.normal(0, sigma_flux, n)
    dx[:n_dipoles] = 1.0  # real movers: a whole pixel
    fa[n_dipoles : n_dipoles + n_variables] = 1.3  # real variables: +30 %
    shape = (size, size)
    sci_true = _stars(shape, xs + dx, ys + dy, flux * fa, SIGMA + rng.normal(0, sigma_width, n))
    tmp_true = _stars(shape, xs, ys, flux)
    sci = sci_true + rng.normal(0, NOISE, shape)
    tmp = tmp_true + rng.normal(0, NOISE, shape)
    var = np.full(shape, NOISE**2)
    return sci, tmp, var, xs, ys


def _fit(seed, sigma_shift, sigma_flux, **kw):
    sci, tmp, var, xs, ys = _scene(seed, sigma_shift, sigma_flux, **kw)
    diff = sci - tmp
    model = 0.5 * (sci + tmp)  # equal variances: the inverse-variance-weighted mean
    k = gaussian_kernel_1d(SIGMA, smoothing_kernel_width(SIGMA))
    ms = correlate_separable(model, k)
    vs = correlate_separable(np.full(model.shape, NOISE**2 / 2), k * k)
    stars = sr.bright_star_positions(ms, vs, isolation=10)
    res = sr.fit_star_residuals(diff, 2 * var, model, stars, radius=4)
    return sr.residual_scatter(res)


@pytest.mark.parametrize("sigma_shift, sigma_flux", [(0.03, 0.0), (0.0, 0.02), (0.05, 0.03)])
def test_scatters_are_recovered(sigma_shift, sigma_flux):
    """σ_δ and σ_a within 20 % of the injected values (≈ 100 stars, two axes: a median-based σ scatters by
    ≈ 1.17/√200 ≈ 8 %), and < 0.003 when not injected (the stars' own noise errors are ≈ 0.003)."""
    res = _fit(3, sigma_shift, sigma_flux)
    assert res.x.size >= 80
    assert res.sigma_shift == pytest.approx(sigma_shift, rel=0.2, abs=0.003)
    assert res.sigma_flux == pytest.approx(sigma_flux, rel=0.2, abs=0.003)


def test_width_scatter_is_recovered():
    """Each science star's σ off by dσ ~ N(0, 0.03 px): G(σ + dσ) − G(σ) ≈ σ·dσ·∇²G, so the Laplacian
    coefficient scatters by ≈ σ·0.03 px² — by c·0.03 with c the discrete fit's noise-free response (≈ σ),
    recovered within 30 % (≈ 100 stars; the Laplacian amplifies the template noise in the regressor); the
    shift scatter stays ≈ 0."""
    sci, tmp, var, xs, ys = _scene(6, 0.0, 0.0, sigma_width=0.03)
    k = gaussian_kernel_1d(SIGMA, smoothing_kernel_width(SIGMA))
    ms = correlate_separable(tmp, k)
    vs = correlate_separable(np.full(tmp.shape, NOISE**2), k * k)
    stars = sr.bright_star_positions(ms, vs, isolation=10)
    res = sr.residual_scatter(sr.fit_star_residuals(sci - tmp, 2 * var, tmp, stars, radius=4, model_variance=var,
                                                    shared=(-1.0, 4.0, 20.0)))
    # Noise-free calibration of the discrete fit (5-point Laplacian, 4-px stamp): b per unit dσ.
    one = _stars((41, 41), [20.0], [20.0], [1e5])
    cal = sr.fit_star_residuals(_stars((41, 41), [20.0], [20.0], [1e5], sigma=SIGMA + 0.03) - one, np.ones((41, 41)),
                                one, np.array([[20, 20]]), radius=4).width[0] / 0.03
    assert SIGMA * 0.9 < cal < SIGMA * 1.3  # ≈ σ, the continuous value
    assert res.sigma_width == pytest.approx(cal * 0.03, rel=0.3)
    assert res.sigma_shift < 0.004


def test_width_term_spares_smooth_extended_light():
    """The Laplacian term is what a PSF-width mismatch leaves: large on a star, small on a galaxy 6× wider
    with the same peak (the flux term σ_a²·M² would weigh both alike)."""
    shape = (201, 201)
    star = _stars(shape, [100.0], [100.0], [1e5])
    galaxy = _stars(shape, [100.0], [100.0], [1e5 * 36], sigma=6 * SIGMA)
    k = gaussian_kernel_1d(SIGMA, smoothing_kernel_width(SIGMA))
    v_star = sr.residual_variance(correlate_separable(star, k), 0.0, 0.0, 0.05)
    v_gal = sr.residual_variance(correlate_separable(galaxy, k), 0.0, 0.0, 0.05)
    assert np.nanmax(v_gal) < 0.02 * np.nanmax(v_star)


def test_nothing_moved_gives_zero():
    """A pair registered to its noise: σ_δ < 0.003 px, σ_a < 0.003 and σ_w < 0.01 px² (the per-star errors
    are ≈ 0.003 px)."""
    res = _fit(4, 0.0, 0.0)
    assert res.sigma_shift < 0.003 and res.sigma_flux < 0.003 and res.sigma_width < 0.01


def test_real_dipoles_and_variables_do_not_count():
    """15 % of the stars really moved by 1 px and 15 % really brightened by 30 %: the median-based scatter
    ignores them (a mean-square estimate would give σ_δ ≈ 0.27 px and σ_a ≈ 0.1)."""
    res = _fit(5, 0.02, 0.0, n_dipoles=18, n_variables=18)
    assert res.sigma_shift == pytest.approx(0.02, abs=0.008)
    assert res.sigma_flux < 0.01


def test_residual_variance_matches_the_smoothed_residuals():
    """On a star shifted by δ and scaled by 1+a, the smoothed difference is a·M_s − δ·∂M_s/∂x: over an
    ensemble of δ ~ N(0, σ_δ²), a ~ N(0, σ_a²) its variance at each pixel equals residual_variance (to 5 %)."""
    shape = (41, 41)
    k = gaussian_kernel_1d(SIGMA, smoothing_kernel_width(SIGMA))
    m = _stars(shape, [20.0], [20.0], [1e5])
    ms = correlate_separable(m, k)
    s_d, s_a = 0.05, 0.03
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(400):
        d, a = rng.normal(0, s_d), rng.normal(0, s_a)
        samples.append(correlate_separable(_stars(shape, [20.0 + d], [20.0], [1e5 * (1 + a)]) - m, k))
    measured = np.var(np.array(samples), axis=0)
    pred = sr.residual_variance(ms, s_d, s_a)
    inner = np.s_[14:27, 14:27]  # where the star is (the rest is the smoothing border or ~0)
    # The shift here is along x only: the prediction's y-gradient part is absent in the samples.
    gy, gx = np.gradient(ms)
    pred_x = s_d**2 * gx**2 + s_a**2 * ms**2
    np.testing.assert_allclose(measured[inner], pred_x[inner], rtol=0.2, atol=1e-3 * pred_x[inner].max())
    assert np.all(pred[inner] >= pred_x[inner] - 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The switch, end to end
# ---------------------------------------------------------------------------------------------------------------
def _exposures(sigma_shift, seed=8):
    """A 600² pair with jittered bright stars (S/N 600–6000) and 12 transients of S/N ≈ 12 on empty sky."""
    from diffim.model import Exposure, GaussianPsf

    rng = np.random.default_rng(seed)
    sci, tmp, var, xs, ys = _scene(seed, sigma_shift, 0.0, n=100)
    tx = rng.uniform(40, 560, 60)
    ty = rng.uniform(40, 560, 60)
    far = np.array([np.hypot(xs - x, ys - y).min() > 15 for x, y in zip(tx, ty)])
    tx, ty = tx[far][:12], ty[far][:12]
    snr_unit = NOISE * math.sqrt(4 * math.pi) * SIGMA
    sci += _stars(sci.shape, tx, ty, np.full(tx.size, 12 * snr_unit))
    science = Exposure(image=sci.astype(np.float32), variance=var.astype(np.float32), psf=GaussianPsf(SIGMA))
    template = Exposure(image=tmp.astype(np.float32), variance=var.astype(np.float32), psf=GaussianPsf(SIGMA))
    return science, template, tx, ty, xs, ys


def _run(science, template, flag, score=False):
    from diffim.tasks.image_difference import ImageDifferenceConfig, ImageDifferenceTask

    config = ImageDifferenceConfig()
    config.doStarResidualVariance = flag
    config.doSkySources = False
    config.useScoreImageDetection = score
    task = ImageDifferenceTask(config=config)
    res = task.run(exposure=science.copy(), templateExposure=template.copy())
    return task, res.diaSources


def test_doStarResidualVariance_removes_jitter_dipoles_and_keeps_transients():
    """Stars jittered by 0.04 px (S/N up to 6000: 10–100 σ dipoles): without the term most bright stars are
    detected; with it none is, the fitted σ_δ is within 25 % of 0.04 and all 12 transients are still found."""
    science, template, tx, ty, xs, ys = _exposures(0.04)
    results = {}
    for flag in (False, True):
        task, cat = _run(science, template, flag)
        x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
        on_star = np.array([np.hypot(xs - a, ys - b).min() < 4 for a, b in zip(x, y)], bool)
        found = sum(bool((np.hypot(x - a, y - b) < 2).any()) for a, b in zip(tx, ty))
        results[flag] = (int(on_star.sum()), found, task.metadata.get("starResidualShiftSigma"))
    off, on = results[False], results[True]
    assert off[0] >= 30  # the problem is real
    assert on[0] == 0
    assert on[1] == 12  # (without the term one of them merges into a neighbouring star's dipole footprint)
    assert on[2] == pytest.approx(0.04, rel=0.25)


def test_doStarResidualVariance_changes_nothing_on_a_registered_pair():
    """No jitter: σ_δ ≈ 0 and the catalogue is the same with and without the term."""
    science, template, tx, ty, *_ = _exposures(0.0, seed=9)
    (t_off, c_off), (t_on, c_on) = _run(science, template, False), _run(science, template, True)
    assert t_on.metadata["starResidualShiftSigma"] < 0.004
    assert abs(len(c_on) - len(c_off)) <= 1


def test_doStarResidualVariance_on_the_al_score_image():
    """AL pre-convolution (detection on the score): the term is fitted in the score's own domain (the template
    matched to the pre-convolved science); jitter dipoles on the 100 stars go from ≥ 30 to ≤ 3 (2 measured: tail
    jitters) and the 12 transients are still found."""
    science, template, tx, ty, xs, ys = _exposures(0.04)
    results = {}
    for flag in (False, True):
        task, cat = _run(science, template, flag, score=True)
        x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
        on_star = np.array([np.hypot(xs - a, ys - b).min() < 4 for a, b in zip(x, y)], bool)
        found = sum(bool((np.hypot(x - a, y - b) < 2).any()) for a, b in zip(tx, ty))
        results[flag] = (int(on_star.sum()), found, task.metadata.get("scoreResidualShiftSigma"))
    off, on = results[False], results[True]
    assert off[0] >= 30
    # The term is the jitter's 1σ: a star in the distribution's far tail (|δ| ≳ 3σ_δ) can still stand out.
    assert on[0] <= 3
    assert on[1] == 12
    assert on[2] > 0.02


def test_shared_noise_slope_of_a_template_side_model():
    """D = S − T with T the model: β = −1 exactly in expectation; for a smoothed T (noise correlated with its
    neighbours) β_L = −(Σ neighbours' correlation − 4·1)·V, i.e. far from the white-noise value 4."""
    rng = np.random.default_rng(9)
    shape = (400, 400)
    t = rng.normal(0, 1, shape)
    s = rng.normal(0, 1, shape)
    sky = np.ones(shape, bool)
    beta, beta_l, lam = sr.shared_noise_slope(s - t, t, np.ones(shape), sky, step=1)
    assert beta == pytest.approx(-1.0, abs=0.02) and beta_l == pytest.approx(4.0, abs=0.1)
    assert lam == pytest.approx(20.0, rel=0.03)  # Var of the 5-point Laplacian of white noise: 16 + 4
    k = gaussian_kernel_1d(1.5, smoothing_kernel_width(1.5))
    ts = correlate_separable(t, k)
    var_ts = float(np.nanvar(ts))
    ok = np.isfinite(ts)
    d = np.where(ok, s - ts, 0.0)
    beta, beta_l, lam = sr.shared_noise_slope(d, np.where(ok, ts, 0.0), np.full(shape, var_ts), ok, step=1)
    assert beta == pytest.approx(-1.0, abs=0.03)
    assert 0.2 < beta_l < 1.5  # white noise would give 4


# ---------------------------------------------------------------------------------------------------------------
# What the fitted terms leave: the mismatch profile (doStarResidualProfile)
# ---------------------------------------------------------------------------------------------------------------
WING = 3.0  # px: the scale of the wing pattern below


def _wing_pattern(shape, x, y, phase):
    """A quadrupole in the PSF's wings, ``(r/WING)²·exp(−r²/2WING²)·cos(2θ + phase)``: what two exposures' PSFs
    differing in their wings' asymmetry leave (zero flux, zero centroid, zero Laplacian-weighted width)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    dx, dy = xx - x, yy - y
    r2 = dx * dx + dy * dy
    return r2 / WING**2 * np.exp(-r2 / (2 * WING**2)) * np.cos(2 * np.arctan2(dy, dx) + phase)


def _wing_scene(seed, sigma_c, n=100, size=700, contaminate=0):
    """Residual = noise + Σ_i A_i·c_i·Q_i with c_i ~ N(0, σ_c) and Q_i a randomly oriented wing quadrupole;
    ``contaminate`` stars get a bright unrelated source (3× the star's amplitude) 6 px away. Returns the residual,
    its variance, the star positions, amplitudes and the expected profile Π(r) = σ_c²·⟨Q²⟩ over each 1-px
    ring."""
    rng = np.random.default_rng(seed)
    g = np.linspace(40, size - 40, int(math.ceil(math.sqrt(n))))
    gx, gy = np.meshgrid(g, g)
    ys, xs = np.rint(gy.ravel()[:n]).astype(int), np.rint(gx.ravel()[:n]).astype(int)
    amp = 10 ** rng.uniform(2.0, 3.5, n) * NOISE  # peak S/N 100–3000
    resid = rng.normal(0, NOISE, (size, size))
    r_max = 12
    rb = sr._radial_bins(r_max)
    truth = np.zeros(r_max + 1)
    for i, (x, y, a) in enumerate(zip(xs, ys, amp)):
        q = _wing_pattern((2 * r_max + 1, 2 * r_max + 1), r_max, r_max, rng.uniform(0, 2 * math.pi))
        resid[y - r_max : y + r_max + 1, x - r_max : x + r_max + 1] += a * rng.normal(0, sigma_c) * q
        truth += np.array([np.mean(q[rb == r] ** 2) for r in range(r_max + 1)]) * sigma_c**2 / n
    if contaminate:
        yy, xx = np.mgrid[-6:7, -6:7]
        blob = np.exp(-(xx * xx + yy * yy) / (2 * SIGMA**2))
        for x, y, a in zip(xs[:contaminate], ys[:contaminate], amp[:contaminate]):
            resid[y - 6 : y + 7, x : x + 13] += 3 * a * blob
    return resid, np.full(resid.shape, NOISE**2), np.column_stack([ys, xs]), amp, truth, r_max


def test_mismatch_profile_is_recovered():
    """100 stars with a wing quadrupole of relative amplitude σ_c = 0.01 (S/N up to 3000, i.e. up to 30σ
    residuals): Π(r) within 30 % of the injected one where it matters (≥ 20 % of its peak; ⟨c²⟩ over 100
    stars scatters by √(2/100) = 14 %), and ≈ 0 at the centre, where the pattern vanishes."""
    resid, var, pos, amp, truth, r_max = _wing_scene(1, 0.01)
    prof = sr.mismatch_profile(resid, var, pos, amp, r_max)
    big = truth >= 0.2 * truth.max()
    np.testing.assert_allclose(prof[big], truth[big], rtol=0.3)
    assert prof[0] < 0.05 * truth.max()


def test_mismatch_profile_ignores_contaminated_stars():
    """Eight of the 100 stars have an unrelated source 3× brighter than themselves in their ring at 6 px (a
    transient or a neighbour): a plain average of the stars' excess would be many times the truth there; the
    robust estimate stays within 30 % of it."""
    resid, var, pos, amp, truth, r_max = _wing_scene(2, 0.01, contaminate=8)
    prof = sr.mismatch_profile(resid, var, pos, amp, r_max)
    big = truth >= 0.2 * truth.max()
    np.testing.assert_allclose(prof[big], truth[big], rtol=0.3)
    # The contamination is real: the plain mean of the per-star excess at 6 px is far above the truth.
    rb = sr._radial_bins(r_max)
    e6 = [np.mean(resid[y - r_max : y + r_max + 1, x - r_max : x + r_max + 1][rb == 6] ** 2 - NOISE**2) / a**2
          for (y, x), a in zip(pos, amp)]
    assert np.mean(e6) > 3 * truth[6]


def test_mismatch_profile_leaves_out_unrelated_sources():
    """A third of the 100 stars have an unrelated source (0.3× the star's amplitude) somewhere 3–11 px out in
    their rings, as with a broad PSF among many transients: the estimate is then several times the truth in
    some rings. Given the sources' positions (as detected in the science image), the pixels within 3σ of them
    are left out and the profile is within 30 % of the truth again."""
    resid, var, pos, amp, truth, r_max = _wing_scene(2, 0.01)
    rng = np.random.default_rng(102)
    yy, xx = np.mgrid[-6:7, -6:7]
    blob = np.exp(-(xx * xx + yy * yy) / (2 * SIGMA**2))
    points = []
    for i in rng.choice(len(amp), 35, replace=False):
        r, th = rng.uniform(3, 11), rng.uniform(0, 2 * math.pi)
        cy, cx = int(round(pos[i, 0] + r * math.sin(th))), int(round(pos[i, 1] + r * math.cos(th)))
        resid[cy - 6 : cy + 7, cx - 6 : cx + 7] += 0.3 * amp[i] * blob
        points.append((cy, cx))
    big = truth >= 0.2 * truth.max()
    plain = sr.mismatch_profile(resid, var, pos, amp, r_max)
    clean = sr.mismatch_profile(resid, var, pos, amp, r_max, exclude_points=np.array(points),
                                exclude_radius=3 * SIGMA)
    assert np.max(plain[big] / truth[big]) > 2.0  # the contamination is real
    np.testing.assert_allclose(clean[big], truth[big], rtol=0.3)


def test_mismatch_profile_is_zero_without_mismatch():
    """Noise only: the variance the profile would add at the brightest star stays below 5 % of the noise's."""
    resid, var, pos, amp, truth, r_max = _wing_scene(3, 0.0)
    prof = sr.mismatch_profile(resid, var, pos, amp, r_max)
    assert np.all(amp.max() ** 2 * prof < 0.3 * NOISE**2)
    assert sr.mismatch_variance(resid.shape, pos, amp, np.zeros(r_max + 1)) is None


def test_mismatch_profile_on_smoothed_stamps_matches_a_smoothed_image():
    """With ``kernel`` the stamps are smoothed as detection smooths the image: same profile as on the
    smoothed image itself (smoothed variance from k²)."""
    resid, var, pos, amp, truth, r_max = _wing_scene(4, 0.01)
    k = gaussian_kernel_1d(SIGMA, smoothing_kernel_width(SIGMA))
    on_stamps = sr.mismatch_profile(resid, var, pos, amp, 8, kernel=k, corr_area=2 * math.pi * SIGMA**2)
    rs, vs = correlate_separable(resid, k), correlate_separable(var, k * k)
    on_image = sr.mismatch_profile(rs, vs, pos, amp, 8, corr_area=2 * math.pi * SIGMA**2)
    np.testing.assert_allclose(on_stamps, on_image, rtol=1e-6, atol=1e-12)
    assert on_stamps.max() > 0


def test_mismatch_variance_adds_each_star():
    """Σ_i A_i²·Π(|p − x_i|): A²·Π(0) at a lone star, the two stars' sum where they overlap, 0 beyond r_max."""
    prof = np.array([4.0, 2.0, 1.0, 0.5])
    out = sr.mismatch_variance((30, 30), np.array([[10, 10], [10, 14]]), np.array([1.0, 2.0]), prof)
    assert out[10, 10] == pytest.approx(4.0 + 4.0 * 0.5 * 0)  # star 2 is 4 px away: beyond r_max = 3
    assert out[10, 14] == pytest.approx(4.0 * 4.0)
    assert out[10, 12] == pytest.approx(1.0 * 1.0 + 4.0 * 1.0)
    assert out[20, 20] == 0.0


def _wing_exposures(sigma_c, seed=10):
    """:func:`_exposures` without jitter, the science stars given a randomly oriented wing quadrupole of
    relative amplitude c ~ N(0, σ_c) (:func:`_wing_pattern`): up to ±50 σ per pixel on the brightest stars."""
    from diffim.model import Exposure

    science, template, tx, ty, xs, ys = _exposures(0.0, seed=seed)
    rng = np.random.default_rng(seed + 100)
    img = science.image.astype(np.float64)
    peak = template.image[np.rint(ys).astype(int), np.rint(xs).astype(int)].astype(float)
    r = 15
    for x, y, a in zip(xs, ys, peak):
        x0, y0 = int(round(x)), int(round(y))
        q = _wing_pattern((2 * r + 1, 2 * r + 1), r + (x - x0), r + (y - y0), rng.uniform(0, 2 * math.pi))
        img[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1] += a * rng.normal(0, sigma_c) * q
    science = Exposure(image=img.astype(np.float32), variance=science.variance, psf=science.psf)
    return science, template, tx, ty, xs, ys


@pytest.mark.parametrize("score, algorithm", [(False, "al"), (True, "al"), (True, "zogy")])
def test_doStarResidualProfile_removes_wing_residuals_and_keeps_transients(score, algorithm):
    """Stars whose wings differ between the exposures (a quadrupole no shift, flux or width term describes):
    without the profile many bright stars leave detections 3–6 px from their centres; with it none does, the
    fitted profile's peak is near the injected rms (σ_c·max Q/√2 ≈ 0.005 of the peak, smoothed: less) and all
    12 transients on empty sky are still found. For ZOGY's S_corr the profile is measured on S itself around
    S_R's stars (the shift/width scatters being fitted on D)."""
    science, template, tx, ty, xs, ys = _wing_exposures(0.01)
    results = {}
    for flag in (False, True):
        from diffim.tasks.image_difference import ImageDifferenceConfig, ImageDifferenceTask

        config = ImageDifferenceConfig()
        config.doStarResidualProfile = flag
        config.doSkySources = False
        config.doMeasurement = False  # detection is what is tested (dipole fits of ~80 residuals take ~25 s)
        config.useScoreImageDetection = score
        config.subtract.name = algorithm
        task = ImageDifferenceTask(config=config)
        cat = task.run(exposure=science.copy(), templateExposure=template.copy()).diaSources
        x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
        near_star = np.array([np.hypot(xs - a, ys - b).min() < 10 for a, b in zip(x, y)], bool)
        found = sum(bool((np.hypot(x - a, y - b) < 2).any()) for a, b in zip(tx, ty))
        key = ("score" if score and algorithm == "al" else "star") + "ResidualProfilePeak"
        results[flag] = (int(near_star.sum()), found, task.metadata.get(key))
    off, on = results[False], results[True]
    assert off[0] >= 10  # the problem is real (78 plain, 112 AL score, 89 ZOGY S_corr measured)
    assert on[0] == 0
    assert on[1] == 12
    assert 0.0005 < on[2] < 0.01


def test_doStarResidualProfile_spares_transients_on_bright_galaxies():
    """The profile counts each static peak with its point-like amplitude (its curvature relative to the
    stars'): a transient of S/N 12 at 3 px from the nucleus of a bright extended galaxy (σ = 6 px, peak 400σ per
    pixel) is still found (the profile adds ~0.8× the smoothed noise variance there); counted with the galaxy's
    full peak it would add ~60× and lose it (checked by hand with the curvature ratio forced to 1)."""
    from diffim.model import Exposure
    from diffim.tasks.image_difference import ImageDifferenceConfig, ImageDifferenceTask

    science, template, tx, ty, xs, ys = _wing_exposures(0.01)
    # The emptiest grid-cell centre (the stars sit on a 60-px grid).
    cells = [(x0, y0) for x0 in np.arange(120.0, 480.0, 60.0) for y0 in np.arange(120.0, 480.0, 60.0)]
    gx, gy = max(cells, key=lambda c: min(np.hypot(xs - c[0], ys - c[1]).min(),
                                          np.hypot(tx - c[0], ty - c[1]).min()))
    assert np.hypot(xs - gx, ys - gy).min() > 35, "the galaxy needs empty sky around it"
    galaxy = _stars(science.shape, [gx], [gy], [4000 * 2 * math.pi * 36], sigma=6.0)  # peak 4000 = 400σ
    snr_unit = NOISE * math.sqrt(4 * math.pi) * SIGMA
    sn = _stars(science.shape, [gx + 3.0], [gy], [12 * snr_unit])
    sci = Exposure(image=(science.image + galaxy + sn).astype(np.float32), variance=science.variance,
                   psf=science.psf)
    tpl = Exposure(image=(template.image + galaxy).astype(np.float32), variance=template.variance,
                   psf=template.psf)
    config = ImageDifferenceConfig()
    config.doSkySources = False
    config.doMeasurement = False
    task = ImageDifferenceTask(config=config)
    cat = task.run(exposure=sci, templateExposure=tpl).diaSources
    x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
    assert task.metadata["starResidualProfilePeak"] > 0.0005  # the profile is on
    assert (np.hypot(x - gx - 3.0, y - gy) < 2).any()


def _halo_scene(amplitude, seed=4, n=241, transient=None):
    """Unit-variance noise smoothed by a σ = 2 Gaussian (a detection image), plus a smooth halo
    ``amplitude·(1 + r²/8²)^-2.5`` (stronger on the left) around a saturated core of radius 8 at the centre
    (flagged bad, garbage inside), plus an optional point ``(x, y, S/N)``. Returns image, variance, bad, the
    smoothing kernel and the centre."""
    rng = np.random.default_rng(seed)
    c = n // 2
    yy, xx = np.mgrid[:n, :n] - c
    r = np.hypot(xx, yy)
    halo = amplitude * (1.0 + (r / 8.0) ** 2) ** -2.5 * (1.0 + 0.5 * (xx < 0))
    img = rng.normal(0.0, 1.0, (n, n)) + halo
    bad = r < 8
    img[bad] = 1e4
    if transient is not None:
        x, y, snr = transient
        # A point of PSF σ 2 whose PSF-smoothed S/N is snr (smoothed noise σ = 1/(2√π·2)).
        img += snr * 4.0 * math.sqrt(math.pi) * np.exp(-((xx + c - x) ** 2 + (yy + c - y) ** 2) / 8.0) / (2 * math.pi * 4)
    var = np.ones((n, n))
    k = gaussian_kernel_1d(2.0, smoothing_kernel_width(2.0, 4.0))
    return img, var, bad, k, (c, c)


def _smoothed_snr(img, var, bad, k, halos=None):
    im = np.where(bad, 0.0, img)
    v = np.where(bad, 0.0, var)
    s = correlate_separable(im.astype(np.float32), k, threads=1)
    sv = correlate_separable(v.astype(np.float32), k * k, threads=1)
    if halos is not None:
        s = s - halos.offset
        sv = sv + halos.variance
    with np.errstate(invalid="ignore", divide="ignore"):
        return s / np.sqrt(sv)


def test_halo_model_removes_a_bright_star_halo_and_keeps_transients():
    """The halo of a saturated star (up to ≈ 30σ smoothed just outside its core, ≥ 5σ out to 18 px, lopsided)
    leaves smoothed-S/N pixels above 5σ outside the core; with the measured halo subtracted (and its
    uncertainty added) none is left beyond the bad core's smoothing reach, while an S/N 15 point 20 px out in
    the halo stays above 5σ and one on empty sky keeps all of its S/N."""
    cy = cx = 120
    img, var, bad, k, _ = _halo_scene(60.0, transient=(cx - 20, cy, 15.0))
    img2, _, _, _, _ = _halo_scene(60.0, transient=(cx + 70, cy + 70, 15.0))
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    outside = np.hypot(yy - cy, xx - cx) > 8 + 9  # beyond what the core's smoothing touches
    far_from_point = np.hypot(yy - cy, xx - (cx - 20)) > 6
    before = _smoothed_snr(img, var, bad, k)
    assert (before[outside & far_from_point] > 5).sum() > 100  # the problem is real
    kw = dict(kernel=k, bad=bad, corr_area=4 * math.pi * 4, ring_width=4, n_sectors=12)
    halos = sr.halo_model(img, var, np.array([[cy, cx]]), 60, **kw)
    assert halos is not None
    after = _smoothed_snr(img, var, bad, k, halos)
    assert (np.abs(after[outside & far_from_point]) > 5).sum() == 0
    # The transient in the halo: S/N 15 on a 4.3σ halo, 7.9σ after (the halo's 25 % model error is its
    # noise there); with the halo's whole square as variance it was 3.3σ, lost.
    assert after[cy, cx - 20] > 7.0
    halos2 = sr.halo_model(img2, var, np.array([[cy, cx]]), 60, **kw)
    point = _smoothed_snr(img2, var, bad, k, halos2)[cy + 70, cx + 70]
    assert point == pytest.approx(_smoothed_snr(img2, var, bad, k)[cy + 70, cx + 70], rel=1e-6)  # untouched


def test_halo_model_is_nothing_without_a_halo():
    """Pure noise around a 'star' (a bad core, no halo): cells are significant only by chance; the subtracted
    model's rms and the added variance stay small against the smoothed noise (or nothing is returned)."""
    cy = cx = 120
    img, var, bad, k, _ = _halo_scene(0.0)
    halos = sr.halo_model(img, var, np.array([[cy, cx]]), 60, kernel=k, bad=bad, corr_area=4 * math.pi * 4,
                          ring_width=4, n_sectors=12)
    smooth_sigma = float(np.sum(k * k))
    if halos is not None:
        yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
        within = np.hypot(yy - cy, xx - cx) <= 60
        assert float(np.sqrt(np.mean(halos.offset[within] ** 2))) < 0.15 * smooth_sigma
        assert float(halos.variance[within].mean()) < 0.05 * smooth_sigma**2


def test_halo_model_leaves_the_stars_own_neighbourhood_alone():
    """Within ``r_min`` (the task passes the residual profile's radius, whose variance covers it) nothing is
    modelled; beyond it the halo is as without the limit."""
    cy = cx = 120
    img, var, bad, k, _ = _halo_scene(60.0)
    kw = dict(kernel=k, bad=bad, corr_area=4 * math.pi * 4, ring_width=4, n_sectors=12)
    full = sr.halo_model(img, var, np.array([[cy, cx]]), 60, **kw)
    cut = sr.halo_model(img, var, np.array([[cy, cx]]), 60, r_min=16.0, **kw)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    r = np.hypot(yy - cy, xx - cx)
    assert np.all(cut.offset[r < 16] == 0) and np.all(cut.variance[r < 16] == 0)
    assert np.abs(full.offset[(r > 9) & (r < 16)]).max() > 0  # the limit removed something
    far = r >= 22  # beyond the ring that straddles r_min
    np.testing.assert_allclose(cut.offset[far], full.offset[far], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_doBrightStarHalos_on_a_moffat_scene():
    """A simulated 1024² pair with Moffat (β = 2.5) PSFs, template 20 % sharper: the wings of its 10⁶–10⁷-count
    stars differ beyond the kernel's reach. Without the halo model, detections 19–31 px from them (2 measured);
    with it none, and the same transients found."""
    from diffim import metrics
    from diffim.sim import simulate_pair
    from diffim.tasks.image_difference import ImageDifferenceConfig, ImageDifferenceTask

    pair = simulate_pair(size=1024, seed=101, psf_profile="moffat", moffat_beta=2.5)
    truth = pair.truth
    kind = np.asarray(truth["kind"]).astype(str)
    bright = (kind == "star") & (np.asarray(truth["flux_science"]) > 1e6)
    bx, by = np.asarray(truth["x"])[bright], np.asarray(truth["y"])[bright]
    fwhm = float(truth.meta["SCIFWHM"])
    out = {}
    for flag in (False, True):
        config = ImageDifferenceConfig()
        config.doBrightStarHalos = flag
        res = ImageDifferenceTask(config=config).run(exposure=pair.science.copy(), templateExposure=pair.template.copy())
        cat = res.diaSources
        _, false = metrics.false_detection_flags(cat, truth, fwhm, res.subtractedExposure)
        c = cat[~np.asarray(cat["sky_source"], bool)]
        x, y = np.asarray(c["x"], float)[false], np.asarray(c["y"], float)[false]
        d = np.hypot(x[:, None] - bx[None, :], y[:, None] - by[None, :]).min(axis=1) if x.size else np.zeros(0)
        comp = metrics.completeness(cat, truth, fwhm, res.subtractedExposure)
        out[flag] = (int((d < 35).sum()), comp["completeness_snr7"], comp["n_snr7"])
    assert out[False][0] >= 2  # the problem is real
    assert out[True][0] == 0
    assert out[True][1:] == out[False][1:]


@pytest.mark.slow
def test_residual_profile_of_a_broad_psf_scene_leaves_out_transients():
    """A simulated 1024² pair with a science PSF of FWHM 10 px: one stamp of the profile's radius (43 px) in
    three holds a transient, a variable or their wings. The same scene without any changes measures a profile
    peaking at 0.0019 of the star's peak; with them, and the science detections' peaks that are not static
    stars left out of the rings, 0.0046 (0.039 when they counted: the detection variance around every bright
    static source rose 10–30× and cut transients' footprints into fragments whose peaks lay 6–10 px from
    them, 4 false detections). At most 1 false detection is left (0 measured)."""
    from diffim import metrics
    from diffim.sim import simulate_pair
    from diffim.tasks.image_difference import ImageDifferenceTask

    pair = simulate_pair(size=1024, seed=202, science_fwhm=10.0)
    task = ImageDifferenceTask()
    res = task.run(exposure=pair.science.copy(), templateExposure=pair.template.copy())
    fwhm = float(pair.truth.meta["SCIFWHM"])
    _, false = metrics.false_detection_flags(res.diaSources, pair.truth, fwhm, res.subtractedExposure)
    assert 0.0005 < task.metadata["starResidualProfilePeak"] < 0.008
    assert int(false.sum()) <= 1
