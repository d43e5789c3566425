"""Principal-component kernel basis for the spatial fit (``usePcaForSpatialKernel``).

A delta-function basis has one coefficient per kernel pixel (1089 for a 33 × 33 kernel): its spatial model has
thousands of parameters, a normal matrix with condition number ~10¹², and spatial noise that every candidate's
pixels feed into the kernel. LSST's remedy, which this module implements, is to fit the spatial variation in a
small basis learnt from the candidates themselves: the single-candidate kernels are normalised to unit sum,
their (weighted) mean is the first basis kernel, and the leading principal components of what is left are the
others. Every PCA kernel is a fixed combination of the original basis kernels, so the candidates' normal
equations carry over by projection (``Tᵀ M T``, ``Tᵀ b``): nothing is recomputed from the pixels.

The mean kernel is scaled to unit sum and the components are made to sum to zero (by adding a multiple of the
mean, which keeps the span), so with the first coefficient held spatially constant (as for Alard–Lupton bases)
the kernel sum is constant across the image. The single kernels are not normalised one by one: a single
delta-function kernel's sum is poorly determined, and dividing by it blows the noisiest ones up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .basis import KernelBasis

__all__ = ["PcaBasis", "pca_kernel_basis"]

#: Components whose singular value is below this fraction of the largest are dropped (they are rounding noise).
_MIN_SINGULAR_FRACTION = 1e-6
#: No candidate weighs more than this many times the median candidate in the PCA (one very bright star would
#: otherwise define the mean kernel alone).
_MAX_WEIGHT_RATIO = 10.0


@dataclass
class PcaBasis:
    """A kernel basis made of combinations of another one.

    Attributes
    ----------
    transform
        ``(N, m)``: column ``k`` holds the original-basis coefficients of PCA kernel ``k``.
    basis
        The PCA kernels as a :class:`~diffim.psfmatch.basis.KernelBasis` (``kind="pca"``).
    mean_first
        True if kernel 0 is the unit-sum mean and the others sum to zero (``subtract_mean``).
    explained
        Fraction of the weighted scatter of the normalised kernels about the mean (or about zero without
        ``subtract_mean``) that the kept components carry.
    """

    transform: np.ndarray
    basis: KernelBasis
    mean_first: bool
    explained: float

    def __len__(self) -> int:
        return int(self.transform.shape[1])

    def expand(self, local: np.ndarray) -> np.ndarray:
        """Local coefficients ``(nc, m [+ bg])`` in the PCA basis → ``(nc, N [+ bg])`` in the original one."""
        local = np.asarray(local, dtype=float)
        m = len(self)
        out = local[:, :m] @ self.transform.T
        return np.concatenate([out, local[:, m:]], axis=1) if local.shape[1] > m else out


def pca_kernel_basis(coeffs: np.ndarray, basis: KernelBasis, n_components: int, *, subtract_mean: bool = True,
                     weights: np.ndarray | None = None, mean: np.ndarray | None = None) -> PcaBasis:
    """The PCA basis of single-candidate kernels.

    Parameters
    ----------
    coeffs
        ``(n, N)`` kernel coefficients of ``n`` candidates in ``basis`` (background excluded).
    basis
        The basis they are expressed in.
    n_components
        Kernels in the result, the mean included when ``subtract_mean`` (LSST ``numPrincipalComponents``).
        Components with a negligible singular value (fewer kernels than components, or identical kernels) are
        dropped.
    subtract_mean
        Kernel 0 is the weighted mean kernel (scaled to unit sum) and the components describe the scatter about
        it (LSST ``subtractMeanForPca``); otherwise the components of the kernels themselves.
    weights
        Per-candidate weights (e.g. the S/N² of each fit): a kernel's noise scales as 1/S/N, so weighting by
        S/N² gives every candidate's noise the same weight. Capped at 10× their median.
    mean
        Coefficients of the kernel to use as kernel 0 and to take the scatter about (``subtract_mean``), e.g.
        one fitted to all candidates at once, which is far less noisy than an average of single kernels when
        these are poorly determined (delta-function bases); default the weighted average.

    Returns
    -------
    PcaBasis
    """
    coeffs = np.asarray(coeffs, dtype=np.float64)
    n, N = coeffs.shape
    if n < 1:
        raise ValueError("pca_kernel_basis needs at least one kernel.")
    if n_components < 1:
        raise ValueError(f"n_components must be ≥ 1, got {n_components}.")
    flat = basis.images.reshape(len(basis), -1)  # (N, P)
    ok = np.all(np.isfinite(coeffs), axis=1)
    if not ok.any():
        raise ValueError("pca_kernel_basis: no kernel with finite coefficients.")
    # The kernels are not normalised one by one: a single delta-function kernel's sum is poorly determined
    # (its 1089 pixels are fitted to ~1200 stamp pixels) and dividing by it would blow some of them up.
    A = coeffs[ok]
    w = np.ones(len(A)) if weights is None else np.asarray(weights, dtype=np.float64)[ok]
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    if not w.any():
        w = np.ones(len(A))
    w = np.minimum(w, _MAX_WEIGHT_RATIO * np.median(w[w > 0]))
    w = w / w.sum()
    mean = w @ A if mean is None else np.asarray(mean, dtype=np.float64)
    if subtract_mean:
        A = A - mean
    X = (np.sqrt(w)[:, None] * A) @ flat  # weighted kernel images (n, P)
    n_pc = min(n_components - (1 if subtract_mean else 0), len(A))
    mean_sum = float(mean @ basis.sums)
    scale = mean_sum if subtract_mean and abs(mean_sum) > 1e-12 else 1.0
    cols = [mean / scale] if subtract_mean else []
    explained = 1.0
    if n_pc > 0:
        U, s, _ = np.linalg.svd(X, full_matrices=False)
        keep = int(np.count_nonzero(s[:n_pc] > _MIN_SINGULAR_FRACTION * max(s[0], 1e-300))) if s.size else 0
        total = float(np.sum(s * s))
        explained = float(np.sum(s[:keep] ** 2) / total) if total > 0 else 1.0
        # Component k in image space is Vᵀ_k = U_kᵀ X / s_k; the same combination of the candidates' coefficient
        # rows gives its coefficients in the original basis.
        for k in range(keep):
            e = (U[:, k] * np.sqrt(w)) @ A / s[k]
            if subtract_mean:
                # Make it sum to zero (adding a multiple of the mean keeps the span): the kernel sum is then
                # the mean kernel's coefficient, constant when that coefficient is.
                e = e - (e @ basis.sums) * cols[0]
            cols.append(e)
    if not cols:  # without the mean, all-zero kernels leave no component: keep their (zero) average
        cols.append(mean)
    T = np.stack(cols, axis=1)  # (N, m)
    images = np.tensordot(T.T, basis.images, axes=1)
    pca = KernelBasis(images, kind="pca")
    return PcaBasis(transform=T, basis=pca, mean_first=bool(subtract_mean), explained=explained)
