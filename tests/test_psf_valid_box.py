"""A fitted spatial PSF model is clamped to the region its stars cover (``PixelBasisPsf.valid_box``)."""

from __future__ import annotations

import numpy as np
import pytest

from diffim.errors import PsfError
from diffim.psf.varying import PixelBasisPsf


def _gaussian(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size) - size // 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma * sigma))
    return g / g.sum()


def _linear_model(valid_box=None) -> PixelBasisPsf:
    """Degree-1 model whose width grows with x: B0 = narrow, B1 = (wide − narrow) per unit u."""
    narrow, wide = _gaussian(15, 1.2), _gaussian(15, 1.8)
    basis = np.stack([narrow, wide - narrow, np.zeros_like(narrow)])  # terms 1, u, v
    return PixelBasisPsf(basis, 1, x_offset=0.0, y_offset=0.0, x_scale=100.0, y_scale=100.0,
                         valid_box=valid_box)


def test_positions_outside_the_fitted_region_take_its_edge_value():
    free, clamped = _linear_model(), _linear_model(valid_box=(0.0, 0.0, 100.0, 100.0))
    inside = (40.0, 60.0)
    assert np.allclose(free.compute_kernel_image(*inside), clamped.compute_kernel_image(*inside))
    # At x = 400 the free polynomial extrapolates to 4× the fitted change (a negative-ringed blob); the clamped
    # model holds the x = 100 PSF.
    assert np.allclose(clamped.compute_kernel_image(400.0, 60.0), clamped.compute_kernel_image(100.0, 60.0))
    assert not np.allclose(free.compute_kernel_image(400.0, 60.0), free.compute_kernel_image(100.0, 60.0))
    assert clamped.compute_kernel_image(400.0, 60.0).min() > -1e-12


def test_valid_box_survives_fits_round_trip():
    psf = _linear_model(valid_box=(5.0, 6.0, 95.0, 96.0))
    back = PixelBasisPsf.from_fits_hdus(psf.to_fits_hdus())
    assert back.valid_box == (5.0, 6.0, 95.0, 96.0)
    assert np.allclose(back.compute_kernel_image(300.0, -50.0), psf.compute_kernel_image(95.0, 6.0))
    assert PixelBasisPsf.from_fits_hdus(_linear_model().to_fits_hdus()).valid_box is None


def test_bad_valid_box():
    with pytest.raises(PsfError, match="valid_box"):
        _linear_model(valid_box=(10.0, 0.0, 5.0, 100.0))


def test_estimated_psf_is_held_beyond_its_stars():
    """Stars on the left half only (the right half NO_DATA, as a template partly off the field): the fitted
    model is clamped to the stars' extent, so on the blank half its FWHM stays that of the nearest stars.
    Extrapolated, the degree-2 polynomial gave a 3-px PSF 5–10 px wide there, and the AL basis sized from it
    left 130 DIA sources where a real pair's valid half has ≈ 10."""
    from diffim.psf import estimate_psf
    from diffim.sim import simulate_pair

    sci = simulate_pair(512, seed=1).science
    half = np.zeros(sci.shape, bool)
    half[:, 256:] = True
    sci.image[half] = np.nan
    sci.mask.set("NO_DATA", half)
    psf = estimate_psf(sci)
    assert psf.valid_box is not None and psf.valid_box[2] < 256 + 2 * psf.compute_kernel_image(100, 100).shape[1]
    edge = psf.fwhm(psf.valid_box[2], 256.0)
    for x in (400.0, 511.0):
        assert psf.fwhm(x, 256.0) == pytest.approx(edge, rel=1e-6)
    # Inside, the estimate still follows the true PSF (FWHM 3.5–4.7 px across the simulated field).
    truth = simulate_pair(512, seed=1).science_psf
    for x, y in ((60.0, 60.0), (200.0, 450.0)):
        assert psf.fwhm(x, y) == pytest.approx(truth.fwhm(x, y), rel=0.04)
