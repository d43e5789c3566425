"""How much spatial variation a matching kernel needs, predicted from the two exposures' PSF models.

LSST's AL subtraction fits the kernel's basis coefficients with a polynomial of fixed total order in position
(``spatialKernelOrder``, 1 for the subtract tasks). That is enough while the PSFs change by ±15 % across the
field, but a kernel whose width goes from nearly a delta function in one corner to a few pixels in the other
(science FWHM ±35 % or more) is not linear in position, and stars in the corners keep residuals of 20–60 % of
their peak. The PSF models already say how the kernel must vary: at a grid of positions the kernel that maps
the convolved image's PSF onto the other's is fitted with the basis, for each spatial order, and the worst
residual over the grid tells whether a higher order is worth its parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import PsfError
from ..measure._stamps import kernel_image_stack
from ..model.box import Box
from ..model.psf import Psf
from .basis import KernelBasis
from .kernel import SpatialFunction

__all__ = ["predicted_kernel_residuals", "choose_spatial_kernel_order"]

#: Side of the PSF stamps compared (px): the core and the first wings, where a mismatch leaves residuals
#: that detection sees.
_STAMP = 31


def _centred(stack: np.ndarray, n: int) -> np.ndarray:
    """A stack of centred images, ``(k, h, w)``, cropped or zero-padded to ``(k, n, n)`` about the centre pixel."""
    _, h, w = stack.shape
    out = np.zeros((stack.shape[0], n, n))
    cy, cx, c = h // 2, w // 2, n // 2
    y0, y1 = max(0, cy - c), min(h, cy - c + n)
    x0, x1 = max(0, cx - c), min(w, cx - c + n)
    out[:, y0 - (cy - c):y1 - (cy - c), x0 - (cx - c):x1 - (cx - c)] = stack[:, y0:y1, x0:x1]
    return out


def predicted_kernel_residuals(
    target_psf: Psf,
    reference_psf: Psf,
    basis: KernelBasis,
    bbox: Box,
    orders: Sequence[int] = (1, 2),
    *,
    grid: int = 7,
    spatial_model_type: str = "chebyshev1",
    constant_first_term: bool = True,
) -> dict[int, float]:
    """Worst residual, over the field, of the best kernel of each spatial order that maps one PSF onto the other.

    At the centres of a ``grid × grid`` mesh of cells on ``bbox`` the two PSF models are evaluated; for each
    order the spatially varying kernel ``K(x, y) = Σ_i a_i(x, y) B_i`` (``a_i`` polynomials of that total order,
    the first coefficient constant with ``constant_first_term`` as the AL solve has it) is fitted by least
    squares to all the nodes at once, ``reference ≈ corr(K, target)``, and the largest ``|residual|`` at a node
    is divided by that node's reference peak.

    Parameters
    ----------
    target_psf, reference_psf
        PSF models of the image that is convolved and of the image it is matched to.
    basis
        The kernel basis the subtraction uses.
    bbox
        The region the spatial functions are scaled on (the overlap).
    orders
        Spatial orders to evaluate.
    grid
        Nodes per side.

    Returns
    -------
    dict
        ``{order: residual / peak}``; empty if either PSF cannot be evaluated on the grid.
    """
    ks = basis.size
    xs = bbox.x0 + (np.arange(grid) + 0.5) * bbox.width / grid
    ys = bbox.y0 + (np.arange(grid) + 0.5) * bbox.height / grid
    X, Y = (a.ravel() for a in np.meshgrid(xs, ys))
    try:
        targets = _centred(kernel_image_stack(target_psf, X, Y), _STAMP + ks - 1)
        refs = _centred(kernel_image_stack(reference_psf, X, Y), _STAMP)
    except (PsfError, ValueError):
        return {}
    if not (np.isfinite(targets).all() and np.isfinite(refs).all()):
        return {}
    cols = basis.correlate_stamps(targets)  # (nodes, STAMP², N)
    r = refs.reshape(len(X), -1)
    peaks = r.max(axis=1)
    # Normal equations per node, then summed over nodes with the spatial terms: the design of one node is
    # C_i ⊗ f_iᵀ, so its normal matrix is (C_iᵀC_i) ⊗ (f_i f_iᵀ) — a few ms instead of a 50 000-row solve.
    gram = np.einsum("npa,npb->nab", cols, cols)
    proj = np.einsum("npa,np->na", cols, r)
    n_basis = len(basis)
    out: dict[int, float] = {}
    for order in orders:
        f = SpatialFunction(order, bbox, spatial_model_type)(X, Y)  # (nodes, terms)
        nt = f.shape[1]
        normal = np.einsum("nab,ns,nt->asbt", gram, f, f).reshape(n_basis * nt, n_basis * nt)
        rhs = np.einsum("na,ns->as", proj, f).reshape(-1)
        keep = np.ones((n_basis, nt), bool)
        if constant_first_term:
            keep[0, 1:] = False
        keep = keep.ravel()
        theta = np.zeros(n_basis * nt)
        theta[keep] = np.linalg.lstsq(normal[np.ix_(keep, keep)], rhs[keep], rcond=1e-12)[0]
        coeffs = f @ theta.reshape(n_basis, nt).T  # (nodes, N): the kernel at each node
        res = np.abs(np.einsum("npa,na->np", cols, coeffs) - r).max(axis=1) / peaks
        out[int(order)] = float(res.max())
    return out


def choose_spatial_kernel_order(residuals: dict[int, float], min_order: int, max_order: int,
                                tolerance: float = 0.05, min_gain: float = 2.0) -> int:
    """Lowest order from ``min_order`` up whose predicted residual is within ``tolerance``.

    The order is raised one step at a time while the current order's residual exceeds ``tolerance`` and the
    next one at least divides it by ``min_gain`` (a residual that no order removes, such as a deconvolution the
    basis cannot make, is not a reason for more parameters); never beyond ``max_order``.
    """
    order = int(min_order)
    while order < max_order and order in residuals and order + 1 in residuals:
        r, r_next = residuals[order], residuals[order + 1]
        if r <= tolerance or r_next * min_gain > r:
            break
        order += 1
    return order
