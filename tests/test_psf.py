"""Tests of diffim.psf: PSFEx files, the pixel-basis PSF, star selection and PSF estimation."""

from __future__ import annotations

import numpy as np
import pytest

from diffim.model import GaussianPsf
from diffim.psf import PixelBasisPsf, PsfexPsf, read_psfex
from diffim.psf.psfex import write_psfex
from diffim.psf.varying import polynomial_terms


def _gauss_grid(n: int, sigma: float) -> np.ndarray:
    h = n // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    return np.exp(-0.5 * (x * x + y * y) / sigma**2)


def test_polynomial_terms_psfex_order():
    """Degree 2 terms are 1, u, u², v, uv, v² (u fastest), as PSFEx orders its basis."""
    t = polynomial_terms(np.array([2.0]), np.array([3.0]), 2)[0]
    assert np.allclose(t, [1, 2, 4, 3, 6, 9])


@pytest.mark.parametrize("samp", [1.0, 0.5])
def test_read_psfex_synthetic(tmp_path, samp):
    """A synthetic PSFEx file interpolating between Gaussians σ=1.6 (u=−1) and σ=2.4 (u=+1) along x.

    Sampled every ``samp`` image pixels (σ/samp on the PSFEx grid); after resampling to image pixels, the kernel
    at u=±1 must match the pixel-sampled Gaussian to 2e-3 of its peak (cubic-spline interpolation error of a
    well-sampled Gaussian). The xy0 and 1-based X_IMAGE conventions are checked exactly on the polynomial
    terms (an off-by-one would give u = -0.99 instead of -1).
    """
    n = 41
    ga = _gauss_grid(n, 1.6 / samp)
    gb = _gauss_grid(n, 2.4 / samp)
    ga /= ga.sum()
    gb /= gb.sum()
    basis = np.stack([(ga + gb) / 2, (gb - ga) / 2, np.zeros_like(ga)])
    path = tmp_path / "model.psf"
    write_psfex(path, basis, degree=1, polzero=(501.0, 301.0), polscal=(100.0, 100.0), psf_samp=samp, psf_fwhm=4.7)
    psf = read_psfex(path, xy0=(10, 20))
    assert isinstance(psf, PsfexPsf) and psf.psf_fwhm == pytest.approx(4.7)
    # X_IMAGE = x - x0 + 1 → u = -1 at X_IMAGE = 401 → x = 410; v = 0 at Y_IMAGE = 301 → y = 320.
    assert np.allclose(psf.coefficients(410.0, 320.0)[0], [1.0, -1.0, 0.0], atol=1e-12)
    for x, sigma in ((410.0, 1.6), (610.0, 2.4)):
        k = psf.compute_kernel_image(x, 320.0)
        h = k.shape[0] // 2
        ref = GaussianPsf(sigma, size=2 * h + 1).compute_kernel_image()
        assert np.max(np.abs(k - ref)) < 2e-3 * ref.max()
        assert psf.fwhm(x, 320.0) == pytest.approx(2.35482 * sigma, rel=0.01)
    assert psf.fwhm(410.0, 320.0) < psf.fwhm(510.0, 320.0) < psf.fwhm(610.0, 320.0)


def test_psfex_constant_model(tmp_path):
    """POLNAXIS = 0: a single basis image, constant over the field."""
    g = _gauss_grid(25, 2.0)
    write_psfex(tmp_path / "c.psf", g[None], degree=0)
    psf = read_psfex(tmp_path / "c.psf")
    assert np.allclose(psf.compute_kernel_image(0, 0), psf.compute_kernel_image(1000, 2000))
    assert psf.fwhm() == pytest.approx(2.35482 * 2.0, rel=1e-3)


def test_psfex_round_trip_through_exposure_file(tmp_path):
    """A PsfexPsf attached to an exposure survives write_exposure/read_exposure."""
    from diffim.io import read_exposure, write_exposure
    from diffim.model import Exposure

    g = _gauss_grid(25, 2.0)
    write_psfex(tmp_path / "c.psf", np.stack([g, 0.1 * g, -0.05 * g]), degree=1, polzero=(50, 50), polscal=(50, 50))
    psf = read_psfex(tmp_path / "c.psf")
    exp = Exposure(image=np.zeros((100, 100), np.float32), psf=psf)
    write_exposure(exp, tmp_path / "e.fits")
    back = read_exposure(tmp_path / "e.fits")
    assert isinstance(back.psf, PsfexPsf) and back.psf.psf_samp == 1.0
    for pos in ((0, 0), (50, 50), (99, 20)):
        assert np.max(np.abs(back.psf.compute_kernel_image(*pos) - psf.compute_kernel_image(*pos))) < 1e-12
