"""Circular apertures: exact pixel overlaps, fluxes of known sources, errors and truncation."""

from __future__ import annotations

import numpy as np
import pytest

from diffim.model import GaussianPsf
from diffim.measure.aperture import aperture_flux, circle_pixel_weights


@pytest.mark.parametrize("radius", [0.6, 3.3, 12.0])
def test_overlap_weights_are_exact(radius):
    """Weights sum to πr² (to 1e-10) and match a 400×400-supersampled overlap to 2e-4 per pixel (the
    supersampling error), at arbitrary sub-pixel centres."""
    dx, dy = np.array([0.31, -0.5, 0.0]), np.array([0.12, 0.2, -0.37])
    half = int(np.ceil(radius)) + 1
    w = circle_pixel_weights(dx, dy, radius, half)
    np.testing.assert_allclose(w.sum(axis=(1, 2)), np.pi * radius**2, rtol=1e-10)
    s = 400
    sub = (np.arange(s) + 0.5) / s - 0.5
    grid = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
    inside = ((grid[None, :] - dx[0]) ** 2 + (grid[:, None] - dy[0]) ** 2 <= radius**2)
    brute = inside.reshape(2 * half + 1, s, 2 * half + 1, s).mean(axis=(1, 3))
    assert np.abs(brute - w[0]).max() < 2e-4


def test_aperture_flux_of_known_sources():
    """A σ=2 Gaussian of flux 1e4 has 1 − exp(−r²/2σ²) of its flux inside r: 1 − e⁻¹⁸ ≈ 1 at 12 px,
    1 − e⁻² = 86.5 % at 2σ (to 1 %: pixel values are point samples of the Gaussian, worth 0.6 % here). A uniform image of 1 gives πr²;
    the error is √(Σw²V)."""
    psf = GaussianPsf(2.0, size=61)
    img = np.zeros((100, 100))
    im, box = psf.compute_image(40.3, 50.6)
    img[box.slices()] += 1e4 * im
    var = np.full(img.shape, 4.0)
    res = aperture_flux(img, var, [40.3, 40.3], [50.6, 50.6], 12.0)
    np.testing.assert_allclose(res.flux, 1e4, rtol=1e-6)
    r2 = aperture_flux(img, var, [40.3], [50.6], 4.0)
    np.testing.assert_allclose(r2.flux, 1e4 * (1 - np.exp(-2.0)), rtol=1e-2)
    flat = aperture_flux(np.ones_like(img), var, [50.2], [49.9], 12.0)
    np.testing.assert_allclose(flat.flux, np.pi * 144, rtol=1e-9)
    w = circle_pixel_weights(np.array([0.2]), np.array([-0.1]), 12.0, 13)
    np.testing.assert_allclose(flat.flux_err, np.sqrt(4.0 * (w**2).sum()), rtol=1e-9)
    assert not res.flag.any()


def test_aperture_truncated_and_bad_pixels():
    """An aperture crossing the edge is flagged apertureTruncated (NaN flux); a NaN pixel inside sets flag."""
    img = np.ones((60, 60))
    img[30, 30] = np.nan
    var = np.ones_like(img)
    res = aperture_flux(img, var, [5.0, 30.0, 45.0], [30.0, 30.0, 45.0], 12.0)
    assert res.flag_apertureTruncated[0] and res.flag[0] and np.isnan(res.flux[0])
    assert res.flag[1] and not res.flag_apertureTruncated[1]
    np.testing.assert_allclose(res.flux[1], np.pi * 144 - 1, rtol=1e-9)
    assert not res.flag[2] and not res.flag_apertureTruncated[2]
