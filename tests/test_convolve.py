"""afw-convention correlation, variance propagation, mask growth and spatially varying kernels (diffim.convolve)."""

import numpy as np
import pytest
from scipy import ndimage

from diffim.convolve import convolve_exposure, convolve_masked_image, correlate_image, correlate_terms, dilate_mask
from diffim.model import Box, Exposure, MaskedImage
from diffim.psfmatch.basis import alard_lupton_basis
from diffim.psfmatch.kernel import SpatialFunction, SpatialKernel


def _gauss(size, sigma, sx=None):
    h = size // 2
    u = np.arange(-h, h + 1)
    sx = sigma if sx is None else sx
    k = np.exp(-(u[None, :] ** 2) / (2 * sx**2) - (u[:, None] ** 2) / (2 * sigma**2))
    return k / k.sum()


def test_afw_orientation_is_correlation():
    """A kernel whose only non-zero pixel is at offset u = (+1, 0) gives out(x, y) = in(x + 1, y)."""
    img = np.arange(100.0).reshape(10, 10)
    k = np.zeros((3, 3))
    k[1, 2] = 1.0
    for method in ("direct", "fft"):
        out = correlate_image(img, k, method=method)
        np.testing.assert_allclose(out[:, :-1], img[:, 1:], atol=1e-4)


def test_fft_tiles_match_direct():
    """The tiled float32 FFT path equals a float64 direct correlation to float32 precision (relative 1e-5)."""
    rng = np.random.default_rng(1)
    img = rng.normal(size=(700, 650)).astype(np.float32)
    k = rng.normal(size=(21, 21))
    out = correlate_image(img, k, method="fft")
    ref = ndimage.correlate(img.astype(float), k, mode="constant")
    assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max()
    # separable path (rank-1 kernel) too
    g = _gauss(15, 2.0, 1.3)
    np.testing.assert_allclose(correlate_image(img, g), ndimage.correlate(img.astype(float), g, mode="constant"),
                               atol=1e-5)


def test_variance_of_convolved_white_noise():
    """Variance plane → σ²Σk² exactly; Monte-Carlo: the pixel variance of convolved white noise is σ²Σk².

    With 400² pixels smoothed over ~4πσ_k² ≈ 50 px the sample variance has ~3000 effective samples, so its
    relative error is ≈ √(2/3000) ≈ 2.6 %; we allow 8 %.
    """
    rng = np.random.default_rng(2)
    sigma = 3.0
    k = _gauss(21, 2.0) * 1.7 + 0.002 * rng.normal(size=(21, 21))  # not separable, sum ≠ 1
    mi = MaskedImage(rng.normal(0, sigma, (400, 400)), variance=np.full((400, 400), sigma**2))
    out = convolve_masked_image(mi, k, copy_edge=True)
    inner = (slice(10, -10), slice(10, -10))
    expected = sigma**2 * (k**2).sum()
    np.testing.assert_allclose(out.variance[inner], expected, rtol=2e-5)
    assert np.var(out.image[inner]) == pytest.approx(expected, rel=0.08)


def test_mask_growth_limited_to_kernel_footprint():
    """A set bit spreads to exactly the w×w box around it; preserved planes are not dilated."""
    m = np.zeros((60, 60), np.int32)
    mi = MaskedImage(np.zeros((60, 60)), m, np.ones((60, 60)))
    mi.mask.set("CR", np.pad(np.ones((1, 1), bool), ((30, 29), (30, 29))))
    mi.mask.add_plane("INJECTED")
    mi.mask.set("INJECTED", np.pad(np.ones((1, 1), bool), ((20, 39), (40, 19))))
    exp = Exposure(mi)
    out = convolve_exposure(exp, _gauss(7, 1.0), preserve_mask_planes=("INJECTED",))
    cr = out.mask.get("CR")
    assert cr.sum() == 49 and cr[27:34, 27:34].all()
    assert out.mask.get("INJECTED").sum() == 1
    # OR-dilation helper with an asymmetric window
    d = dilate_mask(np.pad(np.array([[1]], np.int32), 5), 1, 2)  # out[X] = OR in[X + u], u ∈ [−1, 2]
    assert d.sum() == 16 and d[3:7, 3:7].all()


@pytest.mark.parametrize("lo, hi", [(1, 2), (0, 4), (4, 0), (3, 3), (0, 0)])
def test_dilate_mask_matches_brute_force(lo, hi):
    """OR over the window u ∈ [−lo, hi]² for every plane (incl. bit 31), other planes untouched when restricted."""
    rng = np.random.default_rng(lo * 10 + hi)
    m = np.zeros((40, 50), np.int32)
    m[rng.integers(0, 40, 6), rng.integers(0, 50, 6)] = rng.integers(1, 16, 6)
    m[0, 0] |= 1 << 20
    m[39, 49] |= np.int32(-(1 << 31))
    ref = np.zeros_like(m)
    for u in range(-lo, hi + 1):
        for v in range(-lo, hi + 1):
            ys, xs = slice(max(0, -v), min(40, 40 - v)), slice(max(0, -u), min(50, 50 - u))
            ys2, xs2 = slice(max(0, v), min(40, 40 + v)), slice(max(0, u), min(50, 50 + u))
            ref[ys, xs] |= m[ys2, xs2]
    assert np.array_equal(dilate_mask(m, lo, hi), ref)
    assert np.array_equal(dilate_mask(m, lo, hi, bits=1), (m & ~1) | (ref & 1))


def test_nan_and_masked_pixels_do_not_poison_neighbours():
    """A NaN/NO_DATA pixel is filled before the FFT: the output is finite everywhere, and NO_DATA only covers
    the kernel footprint of the bad pixel."""
    rng = np.random.default_rng(4)
    img = rng.normal(100, 1, (128, 128)).astype(np.float32)
    img[60, 70] = np.nan
    mi = MaskedImage(img, variance=np.ones_like(img))
    mi.mask.set("NO_DATA", ~np.isfinite(img))
    out = convolve_masked_image(mi, rng.normal(size=(11, 11)))
    assert np.isfinite(out.image).all() and np.isfinite(out.variance).all()
    nd = out.mask.get("NO_DATA")
    assert nd.sum() == 121 and nd[55:66, 65:76].all()


def test_border_rules():
    """copy_edge: border copied with EDGE; otherwise NaN image, +inf variance, NO_DATA (widths ctr each side)."""
    rng = np.random.default_rng(5)
    mi = MaskedImage(rng.normal(size=(40, 50)), variance=np.ones((40, 50)))
    k = _gauss(9, 1.5)
    a = convolve_masked_image(mi, k, copy_edge=True)
    assert np.array_equal(a.image[:4], mi.image[:4]) and a.mask.get("EDGE")[:, :4].all()
    assert not a.mask.get("EDGE")[4:-4, 4:-4].any()
    b = convolve_masked_image(mi, k, copy_edge=False)
    assert np.isnan(b.image[-4:]).all() and np.isinf(b.variance[:, -4:]).all() and b.mask.get("NO_DATA")[:, :4].all()
    assert np.isfinite(b.image[4:-4, 4:-4]).all()


def _spatial_kernel(bbox):
    basis = alard_lupton_basis(11, (1.0, 2.0), (2, 1))
    rng = np.random.default_rng(6)
    coeffs = rng.normal(0, 0.1, (len(basis), 3))
    coeffs[0] = [1.0, 0.3, -0.2]
    return SpatialKernel(basis, coeffs, SpatialFunction(1, bbox))


def test_spatially_varying_kernel_exact():
    """Σ_k f_k · corr(K_k, in) equals brute force: the kernel evaluated at every output pixel; the exact K²
    variance too; the 'scaled' variance approximation has a small, measured error on a non-flat variance."""
    bbox = Box(5, 7, 48, 40)
    rng = np.random.default_rng(7)
    img = rng.normal(size=bbox.shape)
    var = rng.uniform(1.0, 2.0, bbox.shape)
    mi = MaskedImage(img, variance=var, xy0=bbox.xy0)
    sk = _spatial_kernel(bbox)
    out = convolve_masked_image(mi, sk, copy_edge=False, variance_mode="exact")
    h = 5
    ref_i = np.full(bbox.shape, np.nan)
    ref_v = np.full(bbox.shape, np.nan)
    for iy in range(h, bbox.height - h):
        for ix in range(h, bbox.width - h):
            k = sk.kernel_image(bbox.x0 + ix, bbox.y0 + iy)
            ref_i[iy, ix] = (k * img[iy - h : iy + h + 1, ix - h : ix + h + 1]).sum()
            ref_v[iy, ix] = (k * k * var[iy - h : iy + h + 1, ix - h : ix + h + 1]).sum()
    inner = (slice(h, -h), slice(h, -h))
    np.testing.assert_allclose(out.image[inner], ref_i[inner], atol=2e-5)
    np.testing.assert_allclose(out.variance[inner], ref_v[inner], rtol=2e-5)
    assert np.array_equal(convolve_masked_image(mi, sk, copy_edge=False).variance, out.variance)  # auto = exact
    fo = convolve_masked_image(mi, sk, copy_edge=False, variance_mode="first_order")
    assert np.median(np.abs(fo.variance[inner] / ref_v[inner] - 1)) < 0.03
    scaled = convolve_masked_image(mi, sk, copy_edge=False, variance_mode="scaled")
    # The approximation is exact for a flat variance; on this deliberately hostile case (kernel shape changing
    # strongly across 48 px, white-noise variance structure of ±33 %) we measure a median error of ~1 % and a
    # worst pixel of ~16 %.
    err = np.abs(scaled.variance[inner] / ref_v[inner] - 1)
    assert np.median(err) < 0.03 and err.max() < 0.25
    flat = convolve_masked_image(MaskedImage(img, variance=np.full(bbox.shape, 1.5), xy0=bbox.xy0), sk,
                                 copy_edge=False, variance_mode="scaled")
    exact_flat = convolve_masked_image(MaskedImage(img, variance=np.full(bbox.shape, 1.5), xy0=bbox.xy0), sk,
                                       copy_edge=False, variance_mode="exact")
    np.testing.assert_allclose(flat.variance[inner], exact_flat.variance[inner], rtol=1e-5)


def test_correlate_terms_weights():
    """Per-term x/y weights multiply each term's correlation."""
    rng = np.random.default_rng(8)
    img = rng.normal(size=(30, 40))
    ks = rng.normal(size=(2, 5, 5))
    fy, fx = rng.normal(size=(2, 30)), rng.normal(size=(2, 40))
    out = correlate_terms(img, ks, fy, fx)
    ref = sum(fy[k][:, None] * fx[k][None, :] * ndimage.correlate(img, ks[k], mode="constant") for k in range(2))
    np.testing.assert_allclose(out, ref, atol=1e-4)
