"""PSF photometry (meas_base PsfFlux): bias, error honesty, flags and the batched PSF paths."""

from __future__ import annotations

import time

import numpy as np
import pytest

from diffim.model import Box, GaussianPsf, ImagePsf, Psf
from diffim.measure._stamps import psf_image_stack
from diffim.measure.psf_flux import psf_flux


def _grid_scene(psf, n_side=23, spacing=26, sky_var=100.0, snr=(15.0, 60.0), seed=0):
    """Point sources on a jittered grid, fluxes drawn to S/N in ``snr`` (sky-limited PSF S/N), Poisson noise."""
    rng = np.random.RandomState(seed)
    size = n_side * spacing + 2 * spacing
    g = spacing * (1.5 + np.arange(n_side))
    x, y = np.meshgrid(g, g)
    x = x.ravel() + rng.uniform(-0.5, 0.5, x.size)
    y = y.ravel() + rng.uniform(-0.5, 0.5, y.size)
    neff = 1.0 / (psf.compute_kernel_image() ** 2).sum()  # noise-equivalent area
    flux = rng.uniform(*snr, x.size) * np.sqrt(sky_var * neff)
    model = np.zeros((size, size))
    for xi, yi, fi in zip(x, y, flux):
        im, box = psf.compute_image(xi, yi)
        model[box.slices()] += fi * im
    var = sky_var + model
    image = model + rng.normal(size=model.shape) * np.sqrt(var)
    return image.astype(np.float32), var.astype(np.float32), x, y, flux


def test_psf_flux_unbiased_with_honest_errors():
    """529 sources at S/N 15–60 with sky + Poisson noise.

    Each flux has a 1.7–6.7 % error, so the mean relative bias over 529 sources has σ ≈ 0.15 %: a 1 % bound
    is > 6σ for a correct estimator, while a wrong normalisation (e.g. PSF not unit-sum) or a half-pixel
    position error fails it. The robust std of the pulls has σ ≈ 0.04 for N = 529: 1 ± 0.1 catches errors
    that ignore the source Poisson term or mis-weight by ΣP² (factor ≥ 1.2).
    """
    psf = GaussianPsf(2.0)
    image, var, x, y, flux = _grid_scene(psf)
    res = psf_flux(image, var, None, psf, x, y)
    assert len(x) >= 200
    assert not res.flag.any()
    rel = (res.flux - flux) / flux
    assert abs(np.mean(rel)) < 0.01
    pull = (res.flux - flux) / res.flux_err
    q25, q75 = np.percentile(pull, [25, 75])
    assert abs(0.7413 * (q75 - q25) - 1.0) < 0.1
    assert abs(np.median(pull)) < 0.15
    # Area of a σ=2 Gaussian is 4πσ² ≈ 50.3 px; all 17×17 pixels fitted.
    np.testing.assert_allclose(res.area, 4 * np.pi * 4.0, rtol=0.02)
    assert np.all(res.npix == 17 * 17)
    # chi2 per pixel of a correct model with correct variance ≈ 1.
    assert abs(np.median(res.chi2 / res.npix) - 1.0) < 0.05


def test_psf_flux_exact_without_noise_and_positions_matter():
    """Noise-free sources are recovered to 1e-6; a 1 px position error biases the flux by ~9 % (test can fail)."""
    psf = GaussianPsf(1.7, sigma_minor=1.3, theta=0.3)
    image, var, x, y, flux = _grid_scene(psf, n_side=5, seed=3)
    var = np.ones_like(var)
    model = np.zeros_like(image, dtype=float)
    for xi, yi, fi in zip(x, y, flux):
        im, box = psf.compute_image(xi, yi)
        model[box.slices()] += fi * im
    res = psf_flux(model, var, None, psf, x, y)
    np.testing.assert_allclose(res.flux, flux, rtol=1e-6)
    off = psf_flux(model, var, None, psf, x + 1.0, y)
    assert np.all(off.flux < 0.95 * flux)


class _VaryingGaussian(Psf):
    """Stand-in spatially varying PSF: σ grows linearly with x (no persistence)."""

    def _kernel_image(self, x, y):
        s = 1.5 + x / 1000.0
        g = np.arange(-10, 11)
        return np.exp(-0.5 * (g[None, :] ** 2 + g[:, None] ** 2) / s**2)


def _pixel_basis_psf():
    """A degree-1 PixelBasisPsf (io's varying model, batched kernel_images) if it is available."""
    varying = pytest.importorskip("diffim.psf.varying")
    g1, g2 = GaussianPsf(1.8, size=21).compute_kernel_image(), GaussianPsf(2.6, size=21).compute_kernel_image()
    basis = np.stack([0.5 * (g1 + g2), 0.5 * (g2 - g1), 0.1 * (g2 - g1)])
    return varying.PixelBasisPsf(basis, 1, x_offset=256.0, y_offset=256.0, x_scale=256.0, y_scale=256.0)


@pytest.mark.parametrize("psf", [ImagePsf(GaussianPsf(2.0, sigma_minor=1.6, theta=0.5).compute_kernel_image() ** 1.2),
                                 _VaryingGaussian(), "pixel_basis"])
def test_psf_image_stack_matches_compute_image(psf):
    """The batched PSF images (Lanczos-shift for constant kernels and batched varying models, per-source
    otherwise) equal compute_image to 1e-12."""
    if psf == "pixel_basis":
        psf = _pixel_basis_psf()
    rng = np.random.RandomState(1)
    x, y = rng.uniform(20, 500, 7), rng.uniform(20, 500, 7)
    stack, bx0, by0 = psf_image_stack(psf, x, y)
    for i in range(7):
        im, box = psf.compute_image(x[i], y[i])
        assert (box.x0, box.y0) == (bx0[i], by0[i])
        np.testing.assert_allclose(stack[i], im, atol=1e-12)


def test_psf_flux_flags_edge_nogood_and_bad_mask():
    """Clipped PSF box → flag_edge (still measured); off image → noGoodPixels; bad_mask pixels are excluded."""
    psf = GaussianPsf(2.0)
    image = np.zeros((64, 64), np.float32)
    var = np.ones_like(image)
    mask = np.zeros(image.shape, np.int32)
    for xi, yi in ((2.0, 30.0), (30.0, 30.0)):
        im, box = psf.compute_image(xi, yi)
        cl = box.intersection(Box(0, 0, 64, 64))
        image[cl.slices()] += 1000 * im[cl.slices(box)]
    mask[30, 30] = 1  # a "BAD" pixel at the centre of the second source
    image[30, 30] = 1e6
    res = psf_flux(image, var, mask, psf, [2.0, 30.0, -50.0, np.nan], [30.0, 30.0, 30.0, 1.0], bad_mask=1)
    assert res.flag_edge[0] and res.flag[0] and not res.flag_noGoodPixels[0]
    np.testing.assert_allclose(res.flux[0], 1000, rtol=1e-6)  # clipped but unbiased (noise-free)
    assert not res.flag[1]
    np.testing.assert_allclose(res.flux[1], 1000, rtol=1e-6)  # the corrupted centre pixel is ignored
    assert res.npix[1] == 17 * 17 - 1
    assert res.flag_noGoodPixels[2] and res.flag[2] and np.isnan(res.flux[2])
    assert res.flag[3] and np.isnan(res.flux[3])
    unmasked = psf_flux(image, var, mask, psf, [30.0], [30.0], bad_mask=0)
    assert unmasked.flux[0] > 2000


def test_psf_flux_is_fast_for_thousands_of_sources():
    """2,000 positions on a 2048² image take well under a second (batched stamps, one kernel)."""
    rng = np.random.RandomState(2)
    image = rng.normal(size=(2048, 2048)).astype(np.float32)
    var = np.ones_like(image)
    x, y = rng.uniform(0, 2048, 2000), rng.uniform(0, 2048, 2000)
    psf = GaussianPsf(2.0)
    t0 = time.perf_counter()
    res = psf_flux(image, var, None, psf, x, y)
    assert time.perf_counter() - t0 < 1.0
    good = ~res.flag
    assert abs(np.std(res.flux[good] / res.flux_err[good]) - 1) < 0.05
