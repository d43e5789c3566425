"""Tests of the variance-plane rescaling (LSST ``ScaleVarianceTask``)."""

import numpy as np
import pytest

from diffim.errors import ExceedsMaxVarianceScaleError
from diffim.model import MaskedImage
from diffim.scale_variance import scale_variance_factor
from diffim.tasks.scale_variance import ScaleVarianceConfig, ScaleVarianceTask


def _scene(n=512, seed=11, factor=1.3, sources=True, nsrc=150):
    """Sky gradient + white noise of variance ``factor·v`` + (optionally) bright extended sources, with the
    variance plane saying ``v``. Returns image, variance, source mask."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[:n, :n]
    v = 4.0
    img = 50.0 + 0.02 * x + 0.01 * y + rng.randn(n, n) * np.sqrt(factor * v)
    src = np.zeros((n, n), bool)
    if sources:
        for cx, cy in rng.uniform(0, n, (nsrc, 2)):
            r2 = (x - cx) ** 2 + (y - cy) ** 2
            img += 20.0 * np.exp(-r2 / (2 * 6.0**2))
            src |= r2 < 18.0**2
    return img.astype(np.float32), np.full((n, n), v, np.float32), src


def test_recovers_injected_factor_with_sources_masked():
    """The IQR of 2.6·10⁵ normalised residuals has a relative standard error of ~0.3 %, so the squared σ is
    recovered to within ±0.02 of 1.3 (the estimator runs ~1 % low: LSST's rounded 0.74 instead of 0.7413,
    and the 32-px background absorbs a little noise; over seeds 0-5 it gives 1.289 ± 0.008). Unmasked
    sources (~25 % of the pixels, several σ bright) widen the IQR by far more than that: this proves the
    mask is used."""
    img, var, src = _scene()
    assert src.mean() > 0.2
    assert scale_variance_factor(img, var, src) == pytest.approx(1.3, abs=0.02)
    assert scale_variance_factor(img, var, None) > 1.45


def test_background_is_removed_before_measuring():
    """A steep sky gradient spreads the raw pixel distribution; the background fit must take it out."""
    img, var, _ = _scene(factor=1.0, sources=False)
    n = img.shape[0]
    img = img + (np.arange(n) * 0.1)[None, :].astype(np.float32)  # 51 counts across = 25σ
    assert scale_variance_factor(img, var) == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ExceedsMaxVarianceScaleError):  # without it the "factor" would be ~100
        scale_variance_factor(img, var, subtract_background=False)


def test_correlated_noise_keeps_its_factor_with_correlation_area():
    """White noise filtered by a Gaussian PSF (σ = 1.7 px, as a score image is) with its exact variance plane:
    the 32-px mesh background absorbs ≈ 4πσ²/32² of its variance and the plain measurement comes out ~4 % low;
    with the correlation area the bins grow by √(4πσ²) and the factor is 1 within 1.5 % (five seeds), as it is
    for white noise. A sky gradient is still removed."""
    from scipy.ndimage import gaussian_filter

    sigma = 1.7
    area = 4 * np.pi * sigma**2
    plain, fixed = [], []
    for seed in range(5):
        rng = np.random.RandomState(seed)
        n = 768
        noise = gaussian_filter(rng.randn(n, n), sigma, mode="wrap")
        var = np.full((n, n), 1.0 / (4 * np.pi * sigma**2), np.float32)  # Σ g² of a unit Gaussian filter
        img = (noise + 0.002 * np.arange(n)[None, :]).astype(np.float32)  # + a gradient of ~10σ across
        plain.append(scale_variance_factor(img, var))
        fixed.append(scale_variance_factor(img, var, correlation_area=area))
    assert np.mean(plain) < 0.98
    assert np.mean(fixed) == pytest.approx(1.0, abs=0.015)
    assert np.std(fixed) < 0.02


def test_image_based_fallback_and_limit():
    """A variance plane 10⁴× too small on 45 % of the pixels inflates the pixel-based factor to ~6, above a
    limit of 3; the image-based one (median variance) still gives the right answer. A plane 20× too small
    everywhere fails the default limit of 10."""
    img, var, _ = _scene(factor=1.0, sources=False)
    rng = np.random.RandomState(2)
    low = var.copy()
    low[rng.rand(*var.shape) < 0.45] *= 1e-4
    assert scale_variance_factor(img, low, limit=3.0) == pytest.approx(1.0, abs=0.03)
    assert scale_variance_factor(img, low, limit=100.0) > 4.0  # the pixel-based value, kept below the limit
    with pytest.raises(ExceedsMaxVarianceScaleError, match="exceeds the limit 10"):
        scale_variance_factor(img, var / 20.0)


def test_task_scales_in_place_and_uses_mask_planes():
    img, var, src = _scene(n=512, seed=4)
    mi = MaskedImage(img, variance=var.copy())
    mi.mask.set("DETECTED", src)
    task = ScaleVarianceTask()
    factor = task.run(mi)
    assert factor == pytest.approx(1.3, abs=0.02)
    assert np.allclose(mi.variance, 4.0 * factor)
    assert task.metadata["factor"] == factor
    # nothing usable -> 1.0 and no change
    mi2 = MaskedImage(img, variance=var.copy())
    mi2.mask.set("BAD")
    assert ScaleVarianceTask().run(mi2) == 1.0 and np.allclose(mi2.variance, 4.0)
    cfg = ScaleVarianceConfig()
    assert cfg.limit == 10.0 and cfg.background.binSize == 32
    assert list(cfg.maskPlanes) == ["DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA", "INTRP"]


@pytest.mark.parametrize("algorithm", ["al", "zogy"])
def test_score_image_variance_is_not_scaled_low(algorithm):
    """doScaleDiffimVariance on a score image (useScoreImageDetection) passes the score's correlation area. On
    white-noise simulated pairs, whose score variance planes are right, the factor is then 1 (mean of two
    1024² pairs within 1.5 %; each measurement's own error is ≈ 1.4 %); it was 0.958 with AL and 0.972 with
    ZOGY, the score's S/N scattering 1.024 and 1.019: a "5σ" threshold at 4.9σ."""
    from diffim.sim import simulate_pair
    from diffim.tasks.image_difference import ImageDifferenceConfig, ImageDifferenceTask

    factors = []
    for seed in (5, 6):
        pair = simulate_pair(size=1024, seed=seed)
        config = ImageDifferenceConfig()
        config.subtract.name = algorithm
        config.useScoreImageDetection = True
        config.doMeasurement = False
        task = ImageDifferenceTask(config=config)
        task.run(exposure=pair.science.copy(), templateExposure=pair.template.copy())
        factors.append(task.metadata["scaleDiffimVarianceFactor"])
        assert task.metadata["correlatedNoiseFactor"] < 1.012
    assert np.mean(factors) == pytest.approx(1.0, abs=0.015)


def test_correlated_noise_factor_with_a_sky_offset_and_no_warnings():
    """The detection noise factor of a difference left with a sky offset (S/N median 9): the scatter about the
    median, 1 for white noise with a right variance, and no numpy warnings (the 5σ clip about 0 left nothing
    and divided by zero; the factor was then missing from the metadata)."""
    import warnings

    from diffim.model import Exposure, GaussianPsf
    from diffim.tasks.image_difference import correlated_noise_factor

    rng = np.random.default_rng(0)
    img = (rng.normal(0.0, 1.0, (300, 300)) + 9.0).astype(np.float32)
    exp = Exposure(image=img, variance=np.ones_like(img), psf=GaussianPsf(1.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r, tol = correlated_noise_factor(exp, smooth=False, return_tolerance=True)
    assert abs(r - 1.0) < 0.02 and 1.0 < tol < 1.1
    # Smoothed with the PSF, correlated noise (every 2×2 block one value) scatters ~2× its variance plane.
    blocky = np.repeat(np.repeat(rng.normal(0.0, 1.0, (150, 150)), 2, 0), 2, 1).astype(np.float32)
    r2 = correlated_noise_factor(Exposure(image=blocky, variance=np.ones_like(blocky), psf=GaussianPsf(1.5)))
    assert 1.6 < r2 < 2.2, r2
