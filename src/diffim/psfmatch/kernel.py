"""Spatially varying PSF-matching kernels and differential-background models.

A kernel is ``K(x, y) = Σ_i a_i(x, y) B_i`` with ``a_i(x, y) = Σ_k c_{ik} f_k(x, y)``; the spatial functions
``f_k`` are products ``T_i(x') T_j(y')`` (Chebyshev, on the bbox scaled to [−1, 1]) or ``x^i y^j`` (plain
polynomials). Because every ``f_k`` factorises into a function of x times a function of y, the whole-image
application ``Σ_k f_k · corr(K_k, T)`` with ``K_k = Σ_i c_{ik} B_i`` needs one 2-D correlation per spatial
term (see :func:`diffim.convolve.convolve_exposure`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from ..model.box import Box
from .basis import KernelBasis, polynomial_terms

__all__ = ["SpatialFunction", "SpatialKernel", "SpatialBackground", "KernelSolution"]


class SpatialFunction:
    """Products of 1-D Chebyshev (first kind) or power functions of x and y up to a total ``order``.

    Parameters
    ----------
    order
        Maximum total degree; terms in afw order ``1, x, y, x², xy, y², …``.
    bbox
        Parent box the Chebyshev variables are scaled on: ``x' = (x − xc)·2/(xmax − xmin)`` with the range
        ``[x0 − 0.5, x1 − 0.5]`` (afw ``Box2D``). Ignored for ``"polynomial"``.
    kind
        ``"chebyshev1"`` or ``"polynomial"`` (raw coordinates).
    """

    def __init__(self, order: int, bbox: Box | None = None, kind: str = "chebyshev1") -> None:
        if order < 0:
            raise ConfigError(f"Spatial order must be >= 0, got {order}.")
        if kind not in ("chebyshev1", "polynomial"):
            raise ConfigError(f"Unknown spatialModelType {kind!r}; use 'chebyshev1' or 'polynomial'.")
        if kind == "chebyshev1" and bbox is None:
            raise ConfigError("A Chebyshev spatial function needs a bounding box.")
        self.order = int(order)
        self.kind = kind
        self.bbox = bbox
        self.terms = polynomial_terms(self.order)
        if bbox is not None:
            xmin, xmax = bbox.x0 - 0.5, bbox.x1 - 0.5
            ymin, ymax = bbox.y0 - 0.5, bbox.y1 - 0.5
            self._xs = ((xmin + xmax) / 2.0, 2.0 / (xmax - xmin))
            self._ys = ((ymin + ymax) / 2.0, 2.0 / (ymax - ymin))

    @property
    def n_terms(self) -> int:
        return len(self.terms)

    def _powers(self, t: np.ndarray, scale) -> np.ndarray:
        """``(…, order + 1)`` array of T_n(t') or t^n."""
        t = np.asarray(t, dtype=float)
        out = np.empty(t.shape + (self.order + 1,))
        if self.kind == "chebyshev1":
            t = (t - scale[0]) * scale[1]
            out[..., 0] = 1.0
            if self.order >= 1:
                out[..., 1] = t
            for n in range(2, self.order + 1):
                out[..., n] = 2.0 * t * out[..., n - 1] - out[..., n - 2]
        else:
            out[..., 0] = 1.0
            for n in range(1, self.order + 1):
                out[..., n] = out[..., n - 1] * t
        return out

    def factors(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Per-term 1-D factors: ``fx (…, n_terms)`` of x and ``fy (…, n_terms)`` of y; ``f_k = fx_k · fy_k``."""
        px = self._powers(x, getattr(self, "_xs", None))
        py = self._powers(y, getattr(self, "_ys", None))
        ia = [a for a, _ in self.terms]
        ib = [b for _, b in self.terms]
        return px[..., ia], py[..., ib]

    def __call__(self, x, y) -> np.ndarray:
        """``(…, n_terms)`` values of every term at ``(x, y)``."""
        fx, fy = self.factors(x, y)
        return fx * fy


@dataclass
class SpatialKernel:
    """A linear-combination kernel with spatially varying coefficients.

    Attributes
    ----------
    basis
        The :class:`~diffim.psfmatch.basis.KernelBasis`.
    coefficients
        ``(N, n_terms)``: ``a_i(x, y) = coefficients[i] @ spatial(x, y)``.
    spatial
        The :class:`SpatialFunction` (order 0 → spatially invariant kernel).
    """

    basis: KernelBasis
    coefficients: np.ndarray
    spatial: SpatialFunction
    _terms: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return self.basis.size

    @property
    def ctr(self) -> int:
        return self.basis.ctr

    @property
    def n_spatial_terms(self) -> int:
        return self.coefficients.shape[1]

    @property
    def is_spatially_invariant(self) -> bool:
        return self.n_spatial_terms == 1 or not np.any(self.coefficients[:, 1:])

    def coefficients_at(self, x: float, y: float) -> np.ndarray:
        """Basis coefficients ``a_i`` at parent position ``(x, y)``."""
        return self.coefficients @ self.spatial(x, y)

    def kernel_image(self, x: float, y: float) -> np.ndarray:
        """Un-normalised ``size × size`` kernel image at parent position ``(x, y)`` (afw correlation sense)."""
        return np.tensordot(self.coefficients_at(x, y), self.basis.images, axes=1)

    def kernel_sum(self, x: float, y: float) -> float:
        """Sum of the kernel image at ``(x, y)``."""
        return float(self.coefficients_at(x, y) @ self.basis.sums)

    def term_kernels(self) -> np.ndarray:
        """``(n_terms, size, size)`` images ``K_k = Σ_i c_{ik} B_i``; ``K(x, y) = Σ_k f_k(x, y) K_k``."""
        if self._terms is None:
            self._terms = np.tensordot(self.coefficients.T, self.basis.images, axes=1)
        return self._terms

    def kernel_sum_image(self, bbox: Box) -> np.ndarray:
        """Kernel sum at every pixel of ``bbox`` (float32)."""
        sums = self.term_kernels().sum(axis=(1, 2))
        return _evaluate_on_grid(self.spatial, sums, bbox)


@dataclass
class SpatialBackground:
    """Differential background ``bg(x, y) = Σ_k params_k g_k(x, y)`` (zero if ``params`` is empty)."""

    params: np.ndarray
    spatial: SpatialFunction | None

    def __call__(self, x, y):
        if self.spatial is None or len(self.params) == 0:
            return np.zeros(np.broadcast(np.asarray(x), np.asarray(y)).shape)[()]
        return self.spatial(x, y) @ self.params

    def image(self, bbox: Box) -> np.ndarray:
        """Background evaluated at every pixel of ``bbox`` (float32 ``(ny, nx)``)."""
        if self.spatial is None or len(self.params) == 0:
            return np.zeros(bbox.shape, dtype=np.float32)
        return _evaluate_on_grid(self.spatial, np.asarray(self.params, float), bbox)

    def negated(self) -> "SpatialBackground":
        return SpatialBackground(-np.asarray(self.params), self.spatial)

    def getParameters(self) -> list[float]:  # LSST Function2D spelling
        return [float(p) for p in self.params]


def _evaluate_on_grid(spatial: SpatialFunction, weights: np.ndarray, bbox: Box) -> np.ndarray:
    """``Σ_k w_k f_k`` on every pixel of ``bbox`` via the separable factors (one small matmul)."""
    return evaluate_on_axes(spatial, weights, np.arange(bbox.x0, bbox.x1, dtype=float),
                            np.arange(bbox.y0, bbox.y1, dtype=float))


def evaluate_on_axes(spatial: SpatialFunction, weights: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``Σ_k w_k f_k`` on the grid ``ys × xs`` (parent coordinates; float32 ``(len(ys), len(xs))``)."""
    fx, _ = spatial.factors(xs, np.zeros_like(xs))
    _, fy = spatial.factors(np.zeros_like(ys), ys)
    return (fy * weights).astype(np.float32) @ fx.T.astype(np.float32)


@dataclass
class KernelSolution:
    """Result of a PSF-matching fit: the spatial kernel, the background model and diagnostics."""

    kernel: SpatialKernel
    background_model: SpatialBackground
    candidates: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def background(self, x, y):
        """Differential background at parent ``(x, y)``."""
        return self.background_model(x, y)
