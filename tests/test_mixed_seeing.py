"""Mixed seeing (issue 7): the science PSF is sharper than the template's on one side of the field, broader on
the other (``simulate_pair(..., template_psf="mixed")``: science FWHM 3.3 → 4.9 px left to right, template 4.06
px everywhere), so plain Alard–Lupton must deconvolve somewhere whichever image it convolves.

Figures (``diffim.metrics``, definitions in metrics.md) for the four ways of subtracting:

* ZOGY (``subtract.name=zogy``): D's star χ² p95, noise ratio, false detections, completeness when S_corr is
  thresholded at 5σ, transient fluxes against AL's;
* AL preconvolution (``useScoreImageDetection=True``): detection runs on the score image, so its star χ² is the
  one that matters — but the score is matched-filtered (its noise is correlated over the PSF), and the box χ²
  of metrics.md is then wider even for pure noise: its noise-only value (the science's own noise, pre-convolved
  alike) is computed here and the score is judged against it; the measured (decorrelated) difference is judged
  against the plain 1.5;
* plain AL, ``convolveTemplate`` True and False: reported beside them (slow test).

Also: score-image detection against plain (PSF-smoothed) detection of S/N 5–7 transients at one false-positive
rate.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffim import metrics

SEED = 41


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def _pair(size, **options):
    from diffim.sim import simulate_pair

    return simulate_pair(size=size, seed=SEED, template_psf="mixed", **options)


def _run(pair, overrides):
    from diffim.pipeline import make_config
    from diffim.tasks.image_difference import ImageDifferenceTask

    cfg = make_config(list(overrides))
    res = ImageDifferenceTask(config=cfg).run(exposure=pair.science.copy(), templateExposure=pair.template.copy())
    return cfg, res


def _figures(pair, res) -> dict:
    fwhm = pair.science.psf.fwhm()
    diff = res.subtractedExposure
    out = metrics.evaluate(diff, res.diaSources, pair.truth, fwhm, flux_unit_scale=diff.photo_calib)
    if res.scoreExposure is not None:
        out["score_chi2_p95"] = metrics.star_chi2_p95(res.scoreExposure, pair.truth, fwhm)
    return out


def _score_noise_floor(pair, score, n: int = 600, seed: int = 1) -> float:
    """Noise-only value of the score's star χ² p95: the same statistic (mean (score/σ)² in the ⌈1.5 fwhm⌉ box)
    at ``n`` random blank-sky positions of the score itself — ≥ 4 FWHM from every truth source, no masked
    pixel in the box. It carries the score's own noise correlation (pre-convolution, template noise and the
    decorrelation filter), which a model with the science noise alone pre-convolved with the PSF lacks
    (1.61 against 1.81 measured on the 1024² scene)."""
    import math

    from scipy.spatial import cKDTree

    fwhm = float(pair.science.psf.fwhm())
    h = int(math.ceil(1.5 * fwhm))
    z = metrics._normalised(score)
    ny, nx = z.shape
    tree = cKDTree(np.column_stack([np.asarray(pair.truth["x"], float), np.asarray(pair.truth["y"], float)]))
    bad = score.mask.get(["BAD", "SAT", "NO_DATA", "EDGE", "CR"], ignore_missing=True)
    rng = np.random.default_rng(seed)
    margin = int(6 * fwhm)
    chi2 = []
    for _ in range(100 * n):
        if len(chi2) == n:
            break
        x, y = rng.uniform(margin, nx - margin), rng.uniform(margin, ny - margin)
        ix, iy = int(x), int(y)
        if tree.query_ball_point((x, y), 4 * fwhm) or bad[iy - h : iy + h + 1, ix - h : ix + h + 1].any():
            continue
        box = z[iy - h : iy + h + 1, ix - h : ix + h + 1]
        chi2.append(float(np.mean(box * box)))
    assert len(chi2) == n, "too little blank sky for the score's noise-only χ²"
    return float(np.percentile(chi2, 95))


def _score_corr_detections(score, fwhm):
    """Peaks of S_corr = S/√V_S above 5σ (both signs), as the old ImageDifferenceTask detected on ZOGY's S."""
    from diffim.detection import detect_footprints

    pos, neg, _, _ = detect_footprints(score.image, score.variance, score.mask.array, fwhm / 2.35482, 5.0, "both",
                                       do_smooth=False, xy0=score.xy0)
    xy = np.array([(p.x, p.y) for fp in pos + neg for p in fp.peaks], float).reshape(-1, 2)
    return {"x": xy[:, 0], "y": xy[:, 1]}


def _flux_agreement(pair, cat_a, cat_b, snr_min=15.0) -> tuple[float, int]:
    """Median psfFlux ratio a/b − 1 over isolated transients (S/N ≥ snr_min) matched in both catalogues."""
    fwhm = pair.science.psf.fwhm()
    truth = pair.truth
    sel = metrics.isolated_transients(truth, fwhm) & (np.asarray(truth["snr"], float) >= snr_min)
    ratios = []
    ma, _ = metrics.match_sources(np.column_stack([cat_a["x"], cat_a["y"]]), truth, fwhm, rows=sel)
    mb, _ = metrics.match_sources(np.column_stack([cat_b["x"], cat_b["y"]]), truth, fwhm, rows=sel)
    fa, fb = np.asarray(cat_a["psfFlux"], float), np.asarray(cat_b["psfFlux"], float)
    for i in np.nonzero((ma >= 0) & (mb >= 0))[0]:
        if fb[mb[i]] > 0:
            ratios.append(fa[ma[i]] / fb[mb[i]])
    return (float(np.median(ratios)) - 1.0 if ratios else float("nan")), len(ratios)


def _faint_field_transients(pair, res):
    """(FWHM, PSF σ, union of the difference's and the score's masks, indices of the isolated S/N 5–7 field
    transients under that mask): what both comparisons of score and plain detection count over."""
    truth = pair.truth
    fwhm = pair.science.psf.fwhm()
    sigma = pair.science.psf.determinant_radius(*pair.science.psf_position())
    union = res.subtractedExposure.mask.copy()
    union.array |= res.scoreExposure.mask.array
    snr = np.asarray(truth["snr"], float)
    host = np.asarray(truth["host"], int)
    faint = np.nonzero(metrics.isolated_transients(truth, fwhm, union) & (host < 0) & (snr >= 5) & (snr < 7))[0]
    return fwhm, sigma, union, faint


def _faint_detection_curves(pair, cfg, res, thresholds):
    """Per threshold: (false/Mpix, completeness of isolated S/N 5–7 transients) for score and plain detection.

    Both detection images come from the same run: the score (detected unsmoothed, as the pipeline does) and the
    decorrelated difference (smoothed with the PSF Gaussian, as plain detection does). Sources are the footprint
    peaks with significance above the threshold; the false-detection and isolation masks are the union of the
    two images' masks, so both are counted over the same pixels.
    """
    import copy

    from diffim.tasks.detection import SourceDetectionTask

    truth = pair.truth
    fwhm, sigma, union, faint = _faint_field_transients(pair, res)
    ny, nx = union.array.shape
    edge = 6.0 * fwhm
    area = (nx - 2 * edge) * (ny - 2 * edge) / 1e6
    curves = {}
    for name, exp, smooth in (("score", res.scoreExposure, False), ("plain", res.subtractedExposure, True)):
        dcfg = copy.deepcopy(cfg.detection.value)
        dcfg.thresholdValue = float(min(thresholds))
        det = SourceDetectionTask(config=dcfg).run(exp.copy(), doSmooth=smooth, sigma=sigma)
        pk = [(p.x, p.y, abs(p.significance)) for fp in det.sources for p in fp.peaks]
        x, y, s = (np.array(c, float) for c in zip(*pk)) if pk else (np.zeros(0),) * 3
        rows = []
        for t in thresholds:
            k = s >= t
            cat = {"x": x[k], "y": y[k]}
            _, false = metrics.false_detection_flags(cat, truth, fwhm, union)
            found = metrics._has_source_within(cat, truth, fwhm, faint)
            rows.append((float(t), false.sum() / area, float(found.mean()) if faint.size else float("nan")))
        curves[name] = rows
    return curves, faint.size


def _completeness_at_rate(rows, rate):
    """Completeness at the lowest threshold whose false-detection rate is ≤ ``rate``."""
    ok = [c for _, f, c in rows if f <= rate]
    return max(ok) if ok else 0.0


# ----------------------------------------------------------------------------------------------------------
# The score image's normalisation (analytic; no pipeline)
# ----------------------------------------------------------------------------------------------------------
SIG_S, SIG_T, T_SCALE, VAR_S, VAR_T = 1.7, 1.4, 0.7, 100.0, 100.0 * 0.7**2


def _gauss(sigma, size=31):
    from diffim.model.psf import GaussianPsf

    return GaussianPsf(sigma, size=size).compute_kernel_image()


def _optimal_snr(flux, p_s, p_t, n=256):
    """Best S/N of a point source of ``flux`` present in the science only, from both images (ZOGY's S/N):
    ``flux · √(mean_k |P̂_s|² / (σ²_s + σ²_t |P̂_s|² / (scale² |P̂_t|²)))`` over an n×n DFT grid (Parseval)."""
    def power(a):
        pad = np.zeros((n, n))
        pad[: a.shape[0], : a.shape[1]] = a
        h = a.shape[0] // 2
        return np.abs(np.fft.fft2(np.roll(pad, (-h, -h), (0, 1)))) ** 2

    s2, t2 = power(p_s), power(p_t)
    return flux * np.sqrt(np.mean(s2 / (VAR_S + VAR_T * s2 / (T_SCALE**2 * np.maximum(t2, 1e-300)))))


def _score(sci, tmpl, p_s, k_pre):
    """LSST preconvolution score (lsst_algorithms.md §3.4): φ ⊗ (science ⊗ P − template ⊗ K), V_S·Σ|P̂φ̂|² + …"""
    from scipy.signal import fftconvolve

    from diffim.decorrelation import decorrelate

    raw = fftconvolve(sci, p_s, mode="same") - fftconvolve(tmpl, k_pre[::-1, ::-1], mode="same")
    one = np.ones_like(raw)
    img, var, _ = decorrelate(raw, one, k_pre, VAR_S, VAR_T, template_matched=True, preconv_kernel=p_s[::-1, ::-1],
                              science_variance=VAR_S * one, template_variance=VAR_T * one)
    return img, var


def test_score_peak_is_the_optimal_snr_and_its_noise_is_unit():
    """The decorrelated preconvolution score is exactly ZOGY's optimal statistic, normalised by its variance plane.

    Gaussian PSFs (science σ 1.7 px, template 1.4 px on a 0.7 flux scale, template noise equal to the science's
    in science units, so that the template term matters): the matching kernel K = P_s ⊗ P_s ⊘ P_t / 0.7 is
    Gaussian. With φ̂ = (σ²_s + σ²_t k²)/(σ²_s + σ²_t |K̂|²/|P̂|²) the score's transfer function |P̂|² φ̂ is
    proportional to ZOGY's |P̂_s|²/(σ²_s + σ²_t |P̂_s|²/|P̂_t|²), so a pixel-centred point source's peak over
    √variance must equal the optimal S/N (measured: equal to 1e-6). Matched filters are flat near their optimum:
    the PSF-smoothed decorrelated difference reaches 0.9982 of it, and so would a score filtered with the plain
    √φ̂; 5e-4 separates them. A variance plane without Σ|P̂φ̂|², or an unnormalised P, is off by ≫ 1 %. On pure
    noise (1024², ~2·10⁴ independent PSF areas, σ of the std ≈ 0.5 %) score/√variance has std 1 ± 0.015.
    """
    from scipy.signal import fftconvolve

    from diffim.decorrelation import decorrelate
    from diffim.detection import smooth_for_detection

    p_s, p_t = _gauss(SIG_S), _gauss(SIG_T)
    k_pre = _gauss(np.sqrt(2 * SIG_S**2 - SIG_T**2)) / T_SCALE
    k_plain = _gauss(np.sqrt(SIG_S**2 - SIG_T**2)) / T_SCALE
    n, flux = 256, 2000.0
    sci = np.zeros((n, n))
    sci[n // 2 - 15 : n // 2 + 16, n // 2 - 15 : n // 2 + 16] = flux * p_s
    tmpl = np.zeros((n, n))
    opt = _optimal_snr(flux, p_s, p_t)
    img, var = _score(sci, tmpl, p_s, k_pre)
    score_snr = img.max() / np.sqrt(var[n // 2, n // 2])
    one = np.ones_like(sci)
    d, dv, _ = decorrelate(sci - fftconvolve(tmpl, k_plain[::-1, ::-1], mode="same"), one, k_plain, VAR_S, VAR_T,
                           template_matched=True, science_variance=VAR_S * one, template_variance=VAR_T * one)
    sm = smooth_for_detection(d.astype(np.float32), dv.astype(np.float32), None, SIG_S)
    plain_snr = float(np.nanmax(sm.image / np.sqrt(sm.variance)))
    print(f"optimal S/N {opt:.4f}: score {score_snr:.4f}, PSF-smoothed decorrelated difference {plain_snr:.4f}")
    assert abs(score_snr / opt - 1.0) < 5e-4
    assert 0.99 < plain_snr / opt <= 1.0 + 1e-6

    rng = np.random.default_rng(3)
    m = 1024
    img, var = _score(rng.normal(0.0, np.sqrt(VAR_S), (m, m)), rng.normal(0.0, np.sqrt(VAR_T), (m, m)), p_s, k_pre)
    z = (img / np.sqrt(var))[40:-40, 40:-40]
    print(f"score/√variance on pure noise: std {z.std():.4f}")
    assert abs(z.std() - 1.0) < 0.015


# ----------------------------------------------------------------------------------------------------------
# Default tests (1024² and 768², < 60 s together)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_1024():
    pair = _pair(1024)
    zogy = _run(pair, ["subtract.name=zogy"])[1]
    pre = _run(pair, ["useScoreImageDetection=True"])[1]
    return pair, zogy, pre


def test_zogy_mixed_seeing_1024(mixed_1024):
    """ZOGY on mixed seeing: star χ² p95 ≤ 1.5, noise ratio 1 ± 0.03, no false detection, fluxes as AL's.

    About 75 bright stars enter the χ² figure, so its p95 is set by the worst 4: a residual of a few σ around
    any of them (as the unregularised filters left along the rows and columns of saturated stars: 3.2) fails.
    ZOGY's per-cell PSFs (automatic spatial grid, FWHM varies 35 %) blended bilinearly follow the PSF. At 1 Mpix
    one false detection is ≈ 1/Mpix, so 0 is required here; the 2048² test checks the rate. The detection
    completeness at S/N ≥ 7 (≈ 45 transients) must be ≥ 95 % (one transient 17 px from a saturated star merges
    into its residual footprint).
    """
    pair, zogy, pre = mixed_1024
    fz = _figures(pair, zogy)
    print(f"ZOGY 1024²: {fz}")
    assert abs(fz["noise_ratio"] - 1.0) <= 0.03
    assert fz["star_chi2_p95"] <= 1.5
    assert fz["false_per_mpix"] <= 1.0
    assert fz["completeness_snr7"] >= 0.95
    bias, n = _flux_agreement(pair, zogy.diaSources, pre.diaSources)
    print(f"ZOGY/AL flux ratio − 1 = {bias:+.4f} over {n} transients")
    assert n >= 10
    assert abs(bias) <= 0.02


def test_zogy_mixed_seeing_moffat_768():
    """ZOGY on mixed seeing with Moffat (β = 3) PSFs: star χ² p95 ≤ 1.5 (measured 1.17).

    The automatic spatial grid must follow the PSF's variation, not the size of its (wing-dominated) stamps:
    with cells measured in units of the stamp-based border, 768² got a single cell and left PSF-shaped residuals
    of 5–7σ per pixel at 2·10⁴-count stars (χ² p95 9.1; 'sharper' template 3.96). About 30 bright stars enter
    the figure; pure noise gives ≈ 1.2.
    """
    from diffim.sim import simulate_pair

    pair = simulate_pair(size=768, seed=SEED, template_psf="mixed", psf_profile="moffat")
    f = _figures(pair, _run(pair, ["subtract.name=zogy"])[1])
    print(f"ZOGY Moffat 768²: {f}")
    assert f["n_stars_chi2"] >= 25
    assert f["star_chi2_p95"] <= 1.5
    assert abs(f["noise_ratio"] - 1.0) <= 0.03


def test_preconvolution_mixed_seeing_1024(mixed_1024):
    """AL preconvolution: the score is within 25 % of its noise-only χ² and ≤ 1 false detection on 1 Mpix.

    The pre-convolved science always has the broader PSF, so AL never deconvolves; the difference measured on
    (decorrelated) must reach star χ² p95 ≤ 1.5. The score's noise-only χ² p95 is ≈ 1.8 here (measured on its
    blank sky; a matched-filtered image has ~5 independent samples per χ² box, not 169): a kernel that fails to
    follow the PSF leaves rings of 5σ around bright stars (score χ² ≫ 2; measured 2.07, 1.15× the floor).
    One false detection on the 0.95 Mpix interior is ≈ 1.05/Mpix.
    """
    pair, _, pre = mixed_1024
    fp = _figures(pair, pre)
    floor = _score_noise_floor(pair, pre.scoreExposure)
    print(f"preconvolution 1024²: {fp}; score noise-only χ² p95 {floor:.3f}")
    assert fp["star_chi2_p95"] <= 1.5
    assert fp["score_chi2_p95"] <= 1.25 * floor
    assert fp["false_per_mpix"] <= 1.1
    assert fp["completeness_snr7"] >= 0.98
    assert abs(fp["noise_ratio"] - 1.0) <= 0.03


def test_score_detection_of_faint_transients_768():
    """S/N 5–7 transients: score-image against plain detection at one false-positive rate (both reported).

    A 768² mixed-seeing scene with ~170 transients of S/N 4–9 (≈ 85 isolated ones at 5–7). The false rate is
    that of plain detection at 4.5σ; each image's threshold is the lowest giving no more. On Gaussian PSFs both
    detectors are matched filters of (nearly) the same PSF: the score is exactly the optimal statistic
    (test_score_peak_is_the_optimal_snr_and_its_noise_is_unit) and the PSF-smoothed decorrelated difference
    reaches 0.998 of it, so at equal false rate they must agree within the binomial error. What separates them
    here is not the score's normalisation but its false detections: residuals of bright stars, which are larger
    in the score because its pre-convolved AL fit takes kernel candidates detected on the pre-convolved science
    (correlated noise read as white: faint stars enter at ~4× their S/N and the kernel is fitted on them), and a
    −0.1σ offset of the score from the AL differential-background fit (see test_score_against_plain_detection_
    several_seeds). The test guards that the score stays within 0.15 of plain and finds ≥ 60 %: a score image
    with a wrong variance, PSF or template match loses far more.
    """
    pair = _pair(768, n_transients=300, transient_snr_range=(4.0, 9.0), n_transient_pairs=0)
    cfg, res = _run(pair, ["useScoreImageDetection=True"])
    thresholds = np.arange(3.5, 6.01, 0.05)
    curves, n = _faint_detection_curves(pair, cfg, res, thresholds)
    rate = next(f for t, f, _ in curves["plain"] if t >= 4.5 - 1e-9)
    c_score = _completeness_at_rate(curves["score"], rate)
    c_plain = _completeness_at_rate(curves["plain"], rate)
    c5 = {k: next(c for t, _, c in v if t >= 5.0 - 1e-9) for k, v in curves.items()}
    print(f"S/N 5–7 (n={n}) at {rate:.1f} false/Mpix: score {c_score:.3f}, plain {c_plain:.3f}; "
          f"at 5σ: score {c5['score']:.3f}, plain {c5['plain']:.3f}")
    assert n >= 40
    assert c_score >= c_plain - 0.15
    assert c_score >= 0.6


def _faint_peak_statistics(pair, res):
    """Per detection image: significances of its false peaks and, per isolated S/N 5–7 field transient, the
    largest significance of a peak within the match radius (0 if none). Detection as in the pipeline (score
    unsmoothed, decorrelated difference smoothed with the PSF-σ Gaussian), at 3.5σ so that any higher threshold
    can be applied afterwards; the masks of the false-detection rule are the union of both images' masks."""
    from scipy.spatial import cKDTree

    from diffim.pipeline import make_config
    from diffim.tasks.detection import SourceDetectionTask

    truth = pair.truth
    fwhm, sigma, union, faint = _faint_field_transients(pair, res)
    txy = np.column_stack([np.asarray(truth["x"], float)[faint], np.asarray(truth["y"], float)[faint]])
    out = {"n": faint.size}
    dcfg = make_config([]).detection.value
    dcfg.thresholdValue = 3.5
    for name, exp, smooth in (("score", res.scoreExposure, False), ("plain", res.subtractedExposure, True)):
        det = SourceDetectionTask(config=dcfg).run(exp.copy(), doSmooth=smooth, sigma=sigma)
        pk = np.array([(p.x, p.y, abs(p.significance)) for fp in det.sources for p in fp.peaks], float).reshape(-1, 3)
        _, false = metrics.false_detection_flags({"x": pk[:, 0], "y": pk[:, 1]}, truth, fwhm, union)
        out[name + "_false"] = pk[false, 2]
        best = np.zeros(faint.size)
        if pk.size and faint.size:
            for k, nb in enumerate(cKDTree(pk[:, :2]).query_ball_point(txy, metrics.match_radius(fwhm))):
                best[k] = max((pk[j, 2] for j in nb), default=0.0)
        out[name + "_best"] = best
    return out


@pytest.mark.slow
def test_score_against_plain_detection_several_seeds():
    """Score against plain detection of S/N 5–7 transients at equal false-positive counts, pooled over 4 scenes.

    Four 768² mixed-seeing scenes (seeds 41–44, ~300 transients of S/N 4–9 each; ≈ 340 isolated field
    transients at S/N 5–7, 2.1 Mpix). Plain detection's false count at 4.5σ sets the rate; each method's
    threshold is the lowest with no more false peaks. For Gaussian PSFs the two are matched filters of nearly
    the same PSF (the score is the optimal statistic, the Gaussian-smoothed decorrelated difference 0.998 of it),
    so with a correct score their completeness agrees within the binomial error (σ ≈ 0.025 for the difference
    of two correlated completenesses at n ≈ 340 is generous) and the transients' best-peak significances agree
    on average to 1 %. Measured on 6 seeds (3.1 Mpix, n = 508) at 19 false detections (6.1/Mpix): score 0.228 ±
    0.019 (it needs 6.2σ: bright-star residuals), plain 0.780 ± 0.018; with the kernel candidates detected on the
    un-convolved science: score 0.778 ± 0.018, plain 0.795 ± 0.018, significance ratio 0.9999. On these 4
    seeds (n = 348, 16 false peaks): score 0.805 ± 0.021, plain 0.779 ± 0.022 — paired 13 against 4, but
    seeds 45–48 gave 4 against 9: a tie. The score's false peaks were bright-star residuals of a poor AL fit:
    the pre-convolved science's noise is correlated, its candidates' mean residual scatters √(1/Σp²) ≈ 7×
    more than the white-noise limit allows, and 48 of 67 candidates were rejected. With that limit scaled
    (``residualMeanScale``): score 0.856 ± 0.019, plain 0.779 ± 0.022, found by the score only 27, by plain
    only 0 (McNemar z = 5.2); replications, seeds 45–48: 6 against 5; seeds 49–52: 20 against 3 (z = 3.5).
    With the score's variance scaled without the mesh-background bias (its correlation area; the factor had
    been 0.96): score 0.853 ± 0.019, plain 0.779, 26 against 0 (z = 5.1), best-peak significance ratio 1.0003.
    Both are matched filters of nearly the same PSF; what the score gains is fewer false peaks per threshold.
    With the AL background refitted on the whole difference (``doRefitBackground``) plain detection lost its
    negative sky offset: its transients' significances rose 0.8 % and its false peaks at 4.5σ fell 16 → 13; at
    that rate score 0.830 ± 0.020, plain 0.799 ± 0.021, 12 against 1 (z = 3.05), ratio 0.990. At a fixed 5σ both
    gained (score 0.606 → 0.624, plain 0.595 → 0.615).
    """
    stats = []
    for seed in (41, 42, 43, 44):
        from diffim.sim import simulate_pair

        pair = simulate_pair(size=768, seed=seed, template_psf="mixed", n_transients=300,
                             transient_snr_range=(4.0, 9.0), n_transient_pairs=0)
        stats.append(_faint_peak_statistics(pair, _run(pair, ["useScoreImageDetection=True"])[1]))
    n = sum(s["n"] for s in stats)
    pooled = {k: np.concatenate([s[k] for s in stats]) for k in ("score_false", "score_best", "plain_false",
                                                                  "plain_best")}
    target = int((pooled["plain_false"] >= 4.5).sum())
    ts = np.arange(3.5, 8.0, 0.01)
    comp = {}
    for m in ("score", "plain"):
        ok = [t for t in ts if (pooled[m + "_false"] >= t).sum() <= target]
        t = ok[0] if ok else np.inf
        comp[m] = (t, float((pooled[m + "_best"] >= t).mean()))
    err = {m: np.sqrt(c * (1 - c) / n) for m, (_, c) in comp.items()}
    both = (pooled["score_best"] > 0) & (pooled["plain_best"] > 0)
    ratio = float(np.mean(pooled["score_best"][both] / pooled["plain_best"][both]))
    # Paired comparison (the same transients): found by the score only / by plain detection only.
    found = {m: pooled[m + "_best"] >= comp[m][0] for m in ("score", "plain")}
    only_s, only_p = int((found["score"] & ~found["plain"]).sum()), int((found["plain"] & ~found["score"]).sum())
    z = (only_s - only_p) / np.sqrt(only_s + only_p) if only_s + only_p else 0.0
    print(f"S/N 5–7, n={n}, {target} false peaks: score {comp['score'][1]:.3f}±{err['score']:.3f} "
          f"(threshold {comp['score'][0]:.2f}), plain {comp['plain'][1]:.3f}±{err['plain']:.3f} "
          f"(threshold {comp['plain'][0]:.2f}); best-peak significance score/plain {ratio:.4f}; "
          f"found by the score only {only_s}, by plain only {only_p} (McNemar z = {z:.2f})")
    assert n >= 250
    # Significances agree to the noise normalisation of the two images: the score's variance is scaled to its
    # measured pixel noise, the plain detection's smoothed S/N scatters 0.96–1.04 on blank sky from scene to
    # scene (measured on seeds 41, 42). Before the decorrelation ignored the EDGE border (whose ringing
    # inflated the score's scaled variance by 3 %) the ratio was 0.997; then 1.016; with the candidate
    # limit scaled for the pre-convolved noise 1.029 — the score's variance scaled 4 % low, because the
    # 32-px mesh background of the scaling absorbed part of its correlated noise; with the score's
    # correlation area passed to the scaling, 1.0003.
    assert 0.98 <= ratio <= 1.02
    assert comp["score"][1] >= comp["plain"][1]
    assert only_s > only_p  # the issue: the score finds more of them at the same false-positive rate


# ----------------------------------------------------------------------------------------------------------
# Slow: the figures at 2048²
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_2048():
    pair = _pair(2048)
    runs = {}
    for name, ov in (("AL convolveTemplate", []), ("AL convolveScience", ["convolveTemplate=False"]),
                     ("AL preconvolution", ["useScoreImageDetection=True"]), ("ZOGY", ["subtract.name=zogy"])):
        runs[name] = _run(pair, ov)[1]
    rows = {name: _figures(pair, res) for name, res in runs.items()}
    for name, f in rows.items():
        print(f"{name:22s} noise {f['noise_ratio']:.3f} chi2p95 {f['star_chi2_p95']:.3f} "
              f"score {f.get('score_chi2_p95', float('nan')):.3f} compl7 {f['completeness_snr7']:.3f} "
              f"false/Mpix {f['false_per_mpix']:.2f} bias {f['flux_bias']:+.4f} pull {f['pull_std']:.3f}")
    return pair, runs, rows


@pytest.mark.slow
def test_mixed_seeing_2048_zogy(mixed_2048):
    """Issue 7, ZOGY at 2048²: D star χ² p95 ≤ 1.5, noise ratio 1 ± 0.03, ≤ 1 false/Mpix; S_corr at 5σ finds
    ≥ 98 % of the isolated S/N ≥ 7 transients (≈ 180) with ≤ 1 false/Mpix; ZOGY and AL fluxes agree within 2 %.
    """
    pair, runs, rows = mixed_2048
    fwhm = pair.science.psf.fwhm()
    diff = runs["ZOGY"].subtractedExposure
    cat = _score_corr_detections(runs["ZOGY"].subtractRes.scoreExposure, fwhm)
    scorr = metrics.completeness(cat, pair.truth, fwhm, diff)
    scorr_false = metrics.false_detections_per_mpix(cat, pair.truth, fwhm, diff)
    bias, n = _flux_agreement(pair, runs["ZOGY"].diaSources, runs["AL convolveTemplate"].diaSources)
    print(f"ZOGY S_corr 5σ: completeness {scorr['completeness_snr7']:.3f} (n={scorr['n_snr7']}), "
          f"false/Mpix {scorr_false:.2f}; ZOGY/AL flux {bias:+.4f} (n={n})")
    z = rows["ZOGY"]
    assert abs(z["noise_ratio"] - 1.0) <= 0.03
    assert z["star_chi2_p95"] <= 1.5
    assert z["false_per_mpix"] <= 1.0
    assert scorr["n_snr7"] >= 100 and scorr["completeness_snr7"] >= 0.98
    assert scorr_false <= 1.0
    assert n >= 30 and abs(bias) <= 0.02


@pytest.mark.slow
def test_mixed_seeing_2048_preconvolution(mixed_2048):
    """Issue 7, preconvolution at 2048²: difference χ² p95 ≤ 1.5, score χ² p95 ≤ 1.25 × its noise-only value,
    completeness ≥ 98 %; plain AL in the direction that deconvolves most (convolveScience) is reported beside
    it and does worse on false detections (7.8 per Mpix against 0.75). Its star χ² used to be > 2; with the
    template-noise correction and the local-kernel decorrelation variance it is 1.38, so that is no longer
    the contrast.
    """
    pair, runs, rows = mixed_2048
    floor = _score_noise_floor(pair, runs["AL preconvolution"].scoreExposure)
    p = rows["AL preconvolution"]
    print(f"score noise-only χ² p95 {floor:.3f}")
    assert p["star_chi2_p95"] <= 1.5
    assert p["score_chi2_p95"] <= 1.25 * floor
    assert p["completeness_snr7"] >= 0.98
    assert rows["AL convolveScience"]["false_per_mpix"] > 2.0 > 1.0 >= p["false_per_mpix"]


@pytest.mark.slow
def test_mixed_seeing_2048_preconvolution_false_rate(mixed_2048):
    """Issue 7: preconvolution (detection on the score) with ≤ 1 false detection per Mpix at 2048² (0.75
    measured: 3 on the 4 Mpix interior, where pure noise through the score gives ≈ 0.5 per Mpix above 5σ; it
    was 4 before the score's kernel candidates came from the science and the score-domain static-star term)."""
    _, _, rows = mixed_2048
    assert rows["AL preconvolution"]["false_per_mpix"] <= 1.0
