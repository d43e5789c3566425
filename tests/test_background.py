"""Tests of the afw-style clipped statistics and of the mesh / polynomial background estimators."""

import numpy as np
import pytest

from diffim.background import bin_statistics, estimate_background, fit_polynomial_background
from diffim.errors import BadInputError
from diffim.statistics import clipped_mean_std, clipped_mean_std_rows


def _smooth_field(n: int) -> np.ndarray:
    y, x = np.mgrid[:n, :n] / n
    return 100.0 + 3.0 * x - 2.0 * y + 1.5 * x * y + 0.4 * np.sin(2.0 * x + 1.0) * np.cos(1.5 * y)


def test_clipped_mean_rejects_outliers_and_masked_values():
    """10 % outliers at +50σ move the plain mean by 5σ; the 3σ/3-iteration clip must remove them.

    The clipped σ of a Gaussian clipped at 3σ is 0.9866σ (truncated-normal variance), which afw does not
    correct; with 10⁵ samples its standard error is 0.003, so 0.9866 ± 0.01 distinguishes it from 1.
    """
    rng = np.random.RandomState(3)
    v = rng.randn(100_000)
    v[:10_000] += 50.0
    mean, std = clipped_mean_std(v)
    assert abs(mean) < 0.02
    assert std == pytest.approx(0.9866, abs=0.01)
    # masked and non-finite values never count
    w = v.copy()
    w[10_000:20_000] = np.nan
    w[20_000:30_000] = np.inf
    mask = np.zeros(w.size, bool)
    mask[30_000:] = True
    m2, _ = clipped_mean_std(w, mask)
    assert np.isnan(clipped_mean_std(np.full(5, np.nan))[0])
    assert m2 == pytest.approx(50.0, abs=0.2)  # only the outlier block was left unmasked


def test_clipped_rows_match_single_sample_version():
    rng = np.random.RandomState(4)
    vals = rng.standard_cauchy((6, 400)).astype(np.float32)
    valid = rng.rand(6, 400) > 0.2
    mean, std, _ = clipped_mean_std_rows(vals, valid)
    for i in range(6):
        m1, s1 = clipped_mean_std(vals[i], ~valid[i])
        assert mean[i] == pytest.approx(m1, rel=1e-5, abs=1e-6)
        assert std[i] == pytest.approx(s1, rel=1e-4)


def test_mesh_background_recovers_smooth_gradient_to_a_tenth_sigma():
    """Noise σ = 1; 64-px super-pixels average 4096 pixels (σ_mean ≈ 0.016), so a correct estimator is
    within 0.1σ of the analytic field everywhere; a wrong interpolation or bin-centre offset is not (the
    field changes by ~0.1 per 10 px)."""
    n = 512
    truth = _smooth_field(n)
    rng = np.random.RandomState(5)
    img = (truth + rng.randn(n, n)).astype(np.float32)
    bg = estimate_background(img, None, bin_size=64)
    assert bg.shape == img.shape and bg.dtype == np.float32
    err = np.abs(bg - truth)
    assert err.max() < 0.1
    assert err.mean() < 0.03


def test_mesh_background_ignores_masked_sources_and_empty_bins():
    """Bright blobs bias the super-pixel means unless masked; a fully masked 128×128 hole (4 empty bins) is
    bridged by the spline through the surrounding bins."""
    n = 512
    truth = _smooth_field(n)
    rng = np.random.RandomState(6)
    img = truth + rng.randn(n, n)
    yy, xx = np.mgrid[:n, :n]
    src = np.zeros((n, n), bool)
    for cx, cy in rng.uniform(20, n - 20, (40, 2)):
        r2 = (xx - cx) ** 2 + (yy - cy) ** 2
        img += 30.0 * np.exp(-r2 / (2 * 4.0**2))
        src |= r2 < (4 * 4.0) ** 2
    hole = np.zeros((n, n), bool)
    hole[192:320, 192:320] = True
    img[hole] = np.nan
    mask = src | hole
    bg = estimate_background(img.astype(np.float32), mask, bin_size=64)
    err = np.abs(bg - truth)
    assert err[~hole].max() < 0.15
    assert err[hole].max() < 0.3
    biased = estimate_background(np.nan_to_num(img, nan=100.0).astype(np.float32), None, bin_size=64)
    assert np.abs(biased - truth)[~hole].max() > 0.5  # the mask is what makes the difference


def test_median_statistic_filter_and_polynomial_fit():
    n = 256
    y, x = np.mgrid[:n, :n]
    plane = 5.0 + 0.01 * x - 0.02 * y
    rng = np.random.RandomState(7)
    img = (plane + rng.randn(n, n)).astype(np.float32)
    med = estimate_background(img, None, bin_size=32, statistic="median")
    assert np.abs(med - plane).max() < 0.15
    # a 3×3 median filter preserves a plane away from the grid edges
    filt = estimate_background(img, None, bin_size=32, statistic="median", filter_super_pixels=True)
    assert np.abs(filt - plane)[64:-64, 64:-64].max() < 0.15
    poly, coeffs = fit_polynomial_background(img, None, order=1, bin_size=16, return_coefficients=True)
    assert np.abs(poly - plane).max() < 0.03
    assert coeffs.shape == (2, 2) and coeffs[1, 1] == 0.0
    vals, counts, xc, yc = bin_statistics(img, None, 100)
    assert vals.shape == (3, 3) and counts.sum() == n * n
    assert xc[0] == pytest.approx((85 - 1) / 2.0)  # edges round(linspace(0, 256, 4)) = 0, 85, 171, 256


def test_background_errors():
    with pytest.raises(BadInputError, match="every super-pixel is masked"):
        estimate_background(np.ones((64, 64)), np.ones((64, 64), bool))
    with pytest.raises(BadInputError, match="Unknown background statistic"):
        estimate_background(np.ones((64, 64)), None, statistic="mode")


def test_fast_row_interpolation_equals_general_akima_path():
    """The float32 Horner evaluation used for full-resolution rows reproduces scipy's Akima spline (with the
    secant extension beyond the end nodes) to float32 precision."""
    from diffim.background import _akima_rows_float32, _interp_columns

    rng = np.random.RandomState(0)
    xc = np.array([15.0, 47.0, 80.0, 112.0, 145.0, 177.0, 210.0, 242.0, 275.0, 307.0])
    cols = rng.randn(37, xc.size) * 10
    fast = _akima_rows_float32(xc, cols, 330)
    ref = _interp_columns(xc, cols.T, np.arange(330, dtype=float), "akima").T
    assert np.abs(fast - ref).max() < 1e-5
