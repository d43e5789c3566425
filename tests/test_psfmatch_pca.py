"""PCA kernel basis (usePcaForSpatialKernel), its projection of the normal equations, and relative λ."""

from __future__ import annotations

import numpy as np
import pytest

from diffim.model import MaskedImage
from diffim.model.box import Box
from diffim.psfmatch.basis import delta_function_basis, regularization_matrix
from diffim.psfmatch.pca import pca_kernel_basis
from diffim.psfmatch.solve import build_stamp_system, project_system


def _gauss(size, sigma):
    h = size // 2
    u = np.arange(-h, h + 1)
    g = np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * sigma * sigma))
    return g / g.sum()


def test_pca_basis_spans_a_linear_family_of_kernels():
    """Kernels (1 − t)·A + t·B with sums 1.3 (t random): the mean and one component span them all exactly;
    kernel 0 sums to 1 and the others to 0, so the kernel sum is the first coefficient."""
    size = 9
    basis = delta_function_basis(size)
    A, B = _gauss(size, 1.0).ravel(), _gauss(size, 2.0).ravel()
    t = np.random.default_rng(0).uniform(0, 1, 12)
    coeffs = 1.3 * ((1 - t)[:, None] * A + t[:, None] * B)
    pca = pca_kernel_basis(coeffs, basis, 3)
    assert len(pca) == 2  # the third component has a zero singular value and is dropped
    assert pca.basis.sums[0] == pytest.approx(1.0) and abs(pca.basis.sums[1]) < 1e-12
    assert pca.explained == pytest.approx(1.0)
    c, *_ = np.linalg.lstsq(pca.transform, coeffs.T, rcond=None)
    assert np.allclose(pca.transform @ c, coeffs.T, atol=1e-12)
    assert np.allclose(c[0], 1.3)
    # a given mean kernel (e.g. a pooled fit) is used as kernel 0
    pooled = 1.3 * (0.5 * A + 0.5 * B)
    p2 = pca_kernel_basis(coeffs, basis, 2, mean=pooled)
    assert np.allclose(p2.transform[:, 0], pooled / 1.3)
    # expand: local PCA coefficients (+ background) back to the original basis
    local = np.array([[1.3, 0.0, 7.0]])
    assert np.allclose(p2.expand(local)[0, :-1], pooled) and p2.expand(local)[0, -1] == 7.0


def test_pca_basis_without_mean_subtraction_and_guards():
    size = 5
    basis = delta_function_basis(size)
    coeffs = np.stack([_gauss(size, s).ravel() for s in (0.8, 1.0, 1.2)])
    pca = pca_kernel_basis(coeffs, basis, 2, subtract_mean=False)
    assert len(pca) == 2 and not pca.mean_first
    with pytest.raises(ValueError):
        pca_kernel_basis(coeffs, basis, 0)
    with pytest.raises(ValueError):
        pca_kernel_basis(np.full((2, size * size), np.nan), basis, 2)


def _system(regularization=None, scaling=None, noise=False):
    rng = np.random.default_rng(4)
    size, w = 64, 5
    img = rng.normal(size=(size, size))
    T = MaskedImage(img, variance=np.ones((size, size)))
    S = MaskedImage(img + rng.normal(size=(size, size)), variance=np.ones((size, size)))
    boxes = [Box(4, 4, 20, 20), Box(30, 30, 20, 20), Box(10, 36, 20, 20)]
    basis = delta_function_basis(w)
    return basis, build_stamp_system(basis, T, S, boxes, regularization=regularization,
                                      regularization_scaling=scaling, template_noise_correction=noise)


def test_relative_regularization_scales_with_each_candidate():
    """lambdaType = "relative": candidate c gets λ_c H with λ_c = tr(M_c)/tr(H) · lambdaScaling."""
    basis, plain = _system()
    H = regularization_matrix(basis.size, 9, 3.0)
    _, rel = _system(H, 1e-2)
    N = len(basis)
    for c in range(3):
        lam = np.trace(plain.M[c, :N, :N]) / np.trace(H) * 1e-2
        assert np.allclose(rel.M[c, :N, :N] - plain.M[c, :N, :N], lam * H)
    _, ab = _system(0.2 * H)
    assert np.allclose(ab.M[:, :N, :N] - plain.M[:, :N, :N], 0.2 * H)


def test_project_system_is_the_normal_equations_of_the_combined_basis():
    """Projecting M, b and the template-noise matrices onto T equals building them for the combined basis."""
    basis, system = _system(noise=True)
    rng = np.random.default_rng(1)
    N = len(basis)
    T = rng.normal(size=(N, 3))
    rows = np.array([0, 2])
    Mp, bp, noise = project_system(system.M[rows], system.b[rows], system.noise[rows], T)
    Tt = np.zeros((N + 1, 4))
    Tt[:N, :3] = T
    Tt[N, 3] = 1.0
    for k, c in enumerate(rows):
        assert np.allclose(Mp[k], Tt.T @ system.M[c] @ Tt)
        assert np.allclose(bp[k], system.b[c] @ Tt)
        dense = system.noise[[c]].dense()[0]
        assert np.allclose(noise[k], T.T @ dense @ T)


def test_delta_function_config_refuses_negative_penalties_and_unknown_orders():
    import lsst.pex.config as pexConfig

    from diffim.tasks.image_psf_match import PsfMatchConfigDF

    PsfMatchConfigDF().validate()
    for name, value in (("lambdaValue", -0.1), ("lambdaScaling", -1e-4), ("forwardRegularizationOrders", [4])):
        cfg = PsfMatchConfigDF()
        setattr(cfg, name, value)
        with pytest.raises(pexConfig.FieldValidationError, match=name):
            cfg.validate()
