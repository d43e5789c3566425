"""The AL kernel's spatial order predicted from the PSF models (``maxSpatialKernelOrder``, diffim extension).

The end-to-end figure (star χ² on a strongly varying PSF) is ``test_psfmatch.py::test_strongly_varying_psf_star_residuals``.
"""

from __future__ import annotations

import pytest

from diffim.model.box import Box
from diffim.model.psf import GaussianPsf
from diffim.psfmatch.spatial_order import choose_spatial_kernel_order, predicted_kernel_residuals
from diffim.tasks.image_psf_match import ImagePsfMatchTask
from diffim.testing.psfs import VaryingGaussianPsf

BBOX = Box(0, 0, 1024, 1024)


def _basis(target_fwhm: float, reference_fwhm: float):
    return ImagePsfMatchTask().makeKernelBasisList(target_fwhm, reference_fwhm)


def test_constant_psfs_need_no_spatial_variation():
    """Two constant Gaussians (FWHM 3.2 → 4.0): the basis builds their kernel exactly, so every order leaves
    the same small residual and the configured order is kept."""
    res = predicted_kernel_residuals(GaussianPsf(3.2 / 2.3548), GaussianPsf(4.0 / 2.3548), _basis(3.2, 4.0), BBOX,
                                     (0, 1, 2))
    assert set(res) == {0, 1, 2}
    assert max(res.values()) < 0.005
    assert res[0] == pytest.approx(res[2], abs=1e-4)
    assert choose_spatial_kernel_order(res, 1, 2) == 1


@pytest.mark.parametrize("coeffs, low, high", [((0.1, 0.05), 0.02, 0.06), ((0.2, 0.15), 0.2, 0.4)])
def test_residual_of_a_linear_kernel_grows_with_the_psf_variation(coeffs, low, high):
    """A science FWHM of 4 px varying by ±15 % (the simulator's default) or ±35 % from the centre to the corners,
    against a template of 3.2 px: a kernel linear in position leaves 3.8 % or 28 % of a star's peak in the worst
    cell (its width goes from 0.5 px to 1.4 px, or from a delta function to 1.7 px, not linearly), a quadratic
    one 0.35 % or 6.5 %. Only the strong variation raises the order."""
    science = VaryingGaussianPsf(4.0, coeffs, bbox=BBOX)
    template = VaryingGaussianPsf(3.2, (0.03, -0.02), bbox=BBOX)
    res = predicted_kernel_residuals(template, science, _basis(3.2, 4.0), BBOX, (1, 2))
    assert low < res[1] < high
    assert res[2] < res[1] / 4
    expected = 2 if coeffs[0] >= 0.2 else 1
    assert choose_spatial_kernel_order(res, 1, 2) == expected


def test_choice_rules():
    """Raised one step at a time while above the tolerance and at least halved by the next order; never beyond
    the maximum; a residual no order removes (a deconvolution) keeps the configured order."""
    assert choose_spatial_kernel_order({1: 0.3, 2: 0.06, 3: 0.01}, 1, 3) == 3
    assert choose_spatial_kernel_order({1: 0.3, 2: 0.06, 3: 0.01}, 1, 2) == 2
    assert choose_spatial_kernel_order({1: 0.3, 2: 0.04, 3: 0.01}, 1, 3) == 2
    assert choose_spatial_kernel_order({1: 0.3, 2: 0.2}, 1, 2) == 1
    assert choose_spatial_kernel_order({1: 0.04, 2: 0.001}, 1, 2) == 1
    assert choose_spatial_kernel_order({1: 0.3, 2: 0.06}, 1, 2, tolerance=0.5) == 1
    assert choose_spatial_kernel_order({}, 1, 2) == 1
    assert choose_spatial_kernel_order({2: 0.3, 3: 0.01}, 2, 2) == 2


def test_task_raises_the_order_only_when_the_psfs_ask_for_it():
    """The subtraction's metadata: order 2 on the ±35 % scene, 1 on the default one; maxSpatialKernelOrder=None
    or a delta-function basis keep spatialKernelOrder without evaluating anything."""
    from diffim.sim import simulate_pair

    task = ImagePsfMatchTask()
    for coeffs, expected in (((0.2, 0.15), 2), ((0.1, 0.05), 1)):
        pair = simulate_pair(size=256, seed=5, science_fwhm_coeffs=coeffs, n_transients=0)
        basis = task.makeKernelBasisList(3.2, 4.0)
        assert task._spatial_kernel_order(pair.template, pair.science, basis, pair.science.bbox) == expected
        assert task.metadata["spatialKernelOrderUsed"] == expected
    task = ImagePsfMatchTask()
    task.config.maxSpatialKernelOrder = None
    assert task._spatial_kernel_order(pair.template, pair.science, basis, pair.science.bbox) == 1
    assert "spatialKernelOrderUsed" not in task.metadata
