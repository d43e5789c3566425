"""Alard–Lupton PSF matching: kernel bases, candidates, the least-squares solve, PCA bases, spatial kernels and
the spatial order the PSF models call for."""

from .basis import (
    KernelBasis,
    alard_lupton_basis,
    delta_function_basis,
    make_kernel_basis_list,
    regularization_matrix,
)
from .candidates import KernelCandidate, SpatialCellSet, detect_kernel_sources, make_kernel_candidates
from .kernel import KernelSolution, SpatialBackground, SpatialFunction, SpatialKernel
from .pca import PcaBasis, pca_kernel_basis
from .solve import SpatialDesign, build_stamp_system, clipped_mean_std, fit_spatial, solve_psf_matching
from .spatial_order import choose_spatial_kernel_order, predicted_kernel_residuals

__all__ = [
    "KernelBasis",
    "alard_lupton_basis",
    "delta_function_basis",
    "make_kernel_basis_list",
    "regularization_matrix",
    "KernelCandidate",
    "SpatialCellSet",
    "detect_kernel_sources",
    "make_kernel_candidates",
    "KernelSolution",
    "SpatialBackground",
    "SpatialFunction",
    "SpatialKernel",
    "PcaBasis",
    "pca_kernel_basis",
    "SpatialDesign",
    "build_stamp_system",
    "clipped_mean_std",
    "fit_spatial",
    "solve_psf_matching",
    "choose_spatial_kernel_order",
    "predicted_kernel_residuals",
]
