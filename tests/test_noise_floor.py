"""The pure-noise detection rate of :func:`diffim.metrics.noise_detection_rate` and :func:`counted_area`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffim.metrics import counted_area, noise_detection_rate
from diffim.model import Mask


def _euler_rate(sigma: float, t: float) -> float:
    """Continuous Gaussian-field Euler-characteristic density, both polarities, per 10⁶ px."""
    lam = 1.0 / (2.0 * sigma * sigma)
    return 2e6 * lam / (2.0 * math.pi) ** 1.5 * t * math.exp(-t * t / 2.0)


def test_rate_matches_the_continuous_field_for_a_wide_psf():
    """With σ = 4 px the pixels sample the field finely: the count is the Euler-characteristic one (within
    15 %, the formula's own accuracy at 3.5σ plus the Monte Carlo error)."""
    rate, err = noise_detection_rate(4.0, 3.5, n_mpix=16)
    assert err < 0.05 * rate
    assert rate == pytest.approx(_euler_rate(4.0, 3.5), rel=0.15)


def test_rate_below_the_continuous_field_for_a_pixel_scale_psf():
    """σ = 1.26 px at 4σ: the continuous formula says 54 / Mpix, the sampled field has ≈ 36 (60-Mpix run)."""
    rate, _ = noise_detection_rate(1.256, 4.0, n_mpix=8)
    assert 31.0 < rate < 41.0
    assert rate < 0.8 * _euler_rate(1.256, 4.0)


def test_polarities_add_and_are_reproducible():
    pos, _ = noise_detection_rate(2.0, 3.5, polarity="positive", n_mpix=4, seed=3)
    neg, _ = noise_detection_rate(2.0, 3.5, polarity="negative", n_mpix=4, seed=3)
    both, _ = noise_detection_rate(2.0, 3.5, n_mpix=4, seed=3)
    assert both == pytest.approx(pos + neg)
    assert pos == pytest.approx(neg, rel=0.2)
    assert noise_detection_rate(2.0, 3.5, n_mpix=1, seed=5) == noise_detection_rate(2.0, 3.5, n_mpix=1, seed=5)


def test_rate_bad_arguments():
    with pytest.raises(ValueError, match="psf_sigma"):
        noise_detection_rate(0.0)
    with pytest.raises(ValueError, match="polarity"):
        noise_detection_rate(2.0, polarity="up")


def test_counted_area_excludes_border_and_defect_boxes():
    mask = Mask(np.zeros((100, 120), np.int32))
    bad = np.zeros(mask.shape, bool)
    bad[50, 60] = True
    mask.set("SAT", bad)
    # 6 fwhm = 12 px border: (100 − 24) × (120 − 24) interior, minus the SAT pixel's 5 × 5 box.
    assert counted_area(mask, 2.0) == 76 * 96 - 25
