"""Kernel bases: LSST renormalisation, separable representation, sigma ladder and kernel-size rule (spec §2.2–2.3)."""

import numpy as np
import pytest
from scipy import ndimage

from diffim.model.psf import FWHM_PER_SIGMA
from diffim.psfmatch.basis import (
    alard_lupton_basis,
    delta_function_basis,
    make_kernel_basis_list,
    polynomial_terms,
    regularization_matrix,
)


def test_alard_lupton_normalisation():
    """ΣB_0 = 1, ΣB_i ≈ 0 and ‖B_i‖₂ = 1 for i ≥ 1; 15 + 6 + 6 = 27 bases for the defaults."""
    b = alard_lupton_basis(21, (0.7, 1.5, 3.0), (4, 2, 2))
    assert len(b) == 27 and b.size == 21
    assert b.sums[0] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(b.sums[1:], 0.0, atol=1e-12)
    np.testing.assert_allclose(np.sqrt((b.images[1:] ** 2).sum(axis=(1, 2))), 1.0, rtol=1e-12)
    # B_0 is the unit-sum sampled Gaussian of σ = 0.7 (second moment 0.49 per axis up to pixel sampling).
    u = np.arange(-10, 11)
    assert (b.images[0] * u[None, :] ** 2).sum() == pytest.approx(0.49, rel=5e-3)


def test_polynomial_term_order():
    """afw PolynomialFunction2 order: 1, x, y, x², xy, y², x³, x²y, xy², y³."""
    assert polynomial_terms(3) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3)]


def test_separable_representation_and_stamp_correlation():
    """The 1-D-factor representation reproduces the images and corr(B_i, stamp) equals a direct 2-D correlation."""
    b = alard_lupton_basis(15, (1.0, 2.0), (2, 1))
    raw = b.fy[:, :, None] * b.fx[:, None, :]
    np.testing.assert_allclose(np.einsum("ij,jyx->iyx", b.mix, raw), b.images, atol=1e-15)
    rng = np.random.default_rng(3)
    stamps = rng.normal(size=(2, 31, 31))
    cols = b.correlate_stamps(stamps)
    assert cols.shape == (2, 17 * 17, len(b))
    for i in (0, 4, len(b) - 1):
        direct = ndimage.correlate(stamps[1], b.images[i], mode="constant")[7:24, 7:24].ravel()
        np.testing.assert_allclose(cols[1, :, i], direct, atol=1e-12)


def test_delta_function_basis():
    """Basis k is a single 1 at (col, row) = (k % size, k // size); correlating with it shifts the stamp."""
    d = delta_function_basis(5)
    assert len(d) == 25 and d.images.sum() == 25
    assert d.images[7][1, 2] == 1.0  # k = 7 → col 2, row 1
    stamp = np.arange(81.0).reshape(1, 9, 9)
    cols = d.correlate_stamps(stamp)  # valid region 5×5, offset u = (col − 2, row − 2)
    np.testing.assert_array_equal(cols[0, :, 7].reshape(5, 5), stamp[0, 1:6, 2:7])


@pytest.mark.parametrize(
    "sig_t, sig_s, mode, sigmas, size",
    [
        (2.0, 2.4, "convolution", (0.700, 1.400, 2.800), 21),
        (2.0, 2.8, "convolution", (0.980, 1.960, 3.919), 23),
        (2.4, 2.0, "deconvolution", (0.663, 1.327, 2.653), 21),
        (2.2, 2.2, "config", (0.7, 1.5, 3.0), 21),
    ],
)
def test_worked_example_table(sig_t, sig_s, mode, sigmas, size):
    """The worked examples of spec §2.2 (modern ladder, defaults)."""
    basis, meta = make_kernel_basis_list(sig_t * FWHM_PER_SIGMA, sig_s * FWHM_PER_SIGMA)
    assert meta["ALBasisMode"] == mode
    np.testing.assert_allclose(meta["ALBasisSigGauss"], sigmas, atol=1e-3)
    assert meta["ALKernelSize"] == size == basis.size


def test_config_branch_and_size_clamp():
    """No FWHMs → config sigmas/kernelSize; a very wide kernel is clamped at kernelSizeMax = 35."""
    basis, meta = make_kernel_basis_list(None, 3.0, kernel_size=19)
    assert meta["ALBasisMode"] == "config" and basis.size == 19
    _, meta = make_kernel_basis_list(2.0 * FWHM_PER_SIGMA, 6.0 * FWHM_PER_SIGMA)
    assert meta["ALKernelSize"] == 35


def test_regularization_matrix_annihilates_planes():
    """The Laplacian stencil gives zero penalty to a linear ramp away from the border (H is BᵀB of the stencil)."""
    size = 7
    H = regularization_matrix(size, 5, border_penalty=0.0)
    y, x = np.mgrid[:size, :size]
    ramp = (2.0 * x + 3.0 * y).ravel()
    assert ramp @ H @ ramp == pytest.approx(0.0, abs=1e-9)
    bump = np.zeros(size * size)
    bump[3 * size + 3] = 1.0
    assert bump @ H @ bump > 1.0


def test_forward_difference_operator_follows_the_spec():
    """Forward differences (spec §2.3): on a 5×5 kernel, order 1 maps a constant to zero except on the right
    and top edges (the border penalty there), order 2 also a ramp; B is the sum of the x and y operators."""
    from diffim.errors import ConfigError
    from diffim.psfmatch.basis import forward_difference_operator

    size = 5
    y, x = np.mgrid[:size, :size]
    const = np.ones(size * size)
    B1 = forward_difference_operator(size, (1,), border_penalty=3.0)
    out = (B1 @ const).reshape(size, size)
    # interior: x and y first differences of a constant are 0; right column: x term is the penalty 3, y is 0;
    # top row: y term 3; the top-right corner gets both.
    expected = 3.0 * (x == size - 1) + 3.0 * (y == size - 1)
    assert np.allclose(out, expected)
    # row of pixel (1, 1): x part −1 at (1,1), +1 at (2,1); y part −1 at (1,1), +1 at (1,2)
    row = B1[1 * size + 1].reshape(size, size)
    assert row[1, 1] == -2.0 and row[1, 2] == 1.0 and row[2, 1] == 1.0 and np.count_nonzero(row) == 3
    B2 = forward_difference_operator(size, (2,), border_penalty=0.0)
    ramp = (2.0 * x + 3.0 * y).ravel().astype(float)
    r2 = (B2 @ ramp).reshape(size, size)
    # second differences of a ramp vanish where the full order fits (x ≤ 2, y ≤ 2); nearer the edge the order is
    # tapered to 1, whose difference of the ramp is the slope (negated by the [−1, 1] sign convention: +slope).
    assert np.allclose(r2[:3, :3], 0.0)
    assert np.allclose(r2[0, 3], 2.0)  # x order tapered to 1: −f(x)+f(x+1) = 2; y order 2: 0
    with pytest.raises(ConfigError):
        forward_difference_operator(size, (4,))
    H = regularization_matrix(size, kind="forwardDifference", orders=(1, 2), border_penalty=3.0)
    B = forward_difference_operator(size, (1, 2), 3.0)
    assert np.allclose(H, B.T @ B)
    with pytest.raises(ConfigError):
        regularization_matrix(size, kind="secondDifference")
