"""PSF-matching kernel bases: Alard–Lupton (Gaussian × polynomial) and delta-function.

An Alard–Lupton basis function is, before renormalisation, ``G_σ(u) G_σ(v) (u/h)^a (v/h)^b``: a product of a
function of the column offset ``u`` and a function of the row offset ``v``. After LSST's renormalisation every
basis is ``B_i = α_i R_i + β_i B_0`` – a combination of at most two separable "raw" terms. :class:`KernelBasis`
keeps that structure (1-D factors + a mixing matrix) so that correlating an image with all bases costs 1-D
passes only (see :meth:`KernelBasis.correlate_stamps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ConfigError
from ..model.psf import FWHM_PER_SIGMA

__all__ = [
    "KernelBasis",
    "alard_lupton_basis",
    "delta_function_basis",
    "basis_sigmas",
    "make_kernel_basis_list",
    "regularization_matrix",
    "forward_difference_operator",
    "polynomial_terms",
    "FLOAT32_EPS",
]

#: Threshold below which a raw basis sum is treated as zero (afw uses float32 epsilon).
FLOAT32_EPS = 1.1920929e-7


def polynomial_terms(degree: int) -> list[tuple[int, int]]:
    """Exponents ``(a, b)`` of ``x^a y^b`` in afw ``PolynomialFunction2`` order: 1, x, y, x², xy, y², x³, …"""
    return [(t - k, k) for t in range(degree + 1) for k in range(t + 1)]


@dataclass
class KernelBasis:
    """A list of ``size × size`` kernel basis images, optionally with a separable representation.

    Attributes
    ----------
    images
        ``(N, size, size)`` float64 basis images ``B_i[v, u]`` (row = y offset, column = x offset).
    fx, fy
        ``(R, size)`` 1-D factors of the raw separable terms (``R_j[v, u] = fy[j, v] · fx[j, u]``), or None.
    mix
        ``(N, R)`` matrix with ``B_i = Σ_j mix[i, j] R_j``; None means the identity (bases = raw terms).
    kind
        ``"alard-lupton"``, ``"delta-function"`` or ``"custom"``.
    sigmas, degrees
        Gaussian widths and polynomial degrees (Alard–Lupton only).
    """

    images: np.ndarray
    fx: np.ndarray | None = None
    fy: np.ndarray | None = None
    mix: np.ndarray | None = None
    kind: str = "custom"
    sigmas: tuple[float, ...] = ()
    degrees: tuple[int, ...] = ()
    _sums: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def ctr(self) -> int:
        """Index of the kernel centre pixel, ``(size − 1) // 2``."""
        return (self.size - 1) // 2

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def sums(self) -> np.ndarray:
        """``Σ B_i`` of every basis image (kernel sum = ``coefficients @ sums``)."""
        if self._sums is None:
            self._sums = self.images.sum(axis=(1, 2))
        return self._sums

    @property
    def separable(self) -> bool:
        return self.fx is not None

    def reordered(self, order, scaling=None) -> "KernelBasis":
        """New basis ``B'_k = B[order[k]] / scaling[k]`` (used to reproduce HOTPANTS' conventions)."""
        order = np.asarray(order, dtype=int)
        s = np.ones(len(order)) if scaling is None else np.asarray(scaling, dtype=float)
        images = self.images[order] / s[:, None, None]
        mix = (np.eye(len(self.images)) if self.mix is None else self.mix)[order] / s[:, None]
        return KernelBasis(images, self.fx, self.fy, mix, self.kind, self.sigmas, self.degrees)

    def correlate_stamps(self, stamps: np.ndarray, *, basis_first: bool = False) -> np.ndarray:
        """``corr(B_i, stamp)`` on the valid region of each stamp, for all bases at once.

        Parameters
        ----------
        stamps
            ``(nc, H, W)`` array of image stamps.

        Returns
        -------
        columns
            ``(nc, (H − size + 1)·(W − size + 1), N)`` float64: column ``i`` holds
            ``out(X) = Σ_u B_i(u) stamp(X + u)`` over the pixels whose kernel footprint is inside the stamp,
            flattened row-major. With ``basis_first`` the layout is ``(N, nc, npix)`` instead (cheaper to build).
        """
        stamps, nc, hv, wv = self._valid_stamps(stamps)
        w = self.size
        if self.separable:
            out = self.correlate_stamps_rows(stamps).reshape(len(self), hv, nc, wv).transpose(0, 2, 1, 3)
            out = out.reshape(len(self), nc, hv * wv)
            return np.ascontiguousarray(out) if basis_first else np.ascontiguousarray(out.transpose(1, 2, 0))
        win = sliding_window_view(stamps, (w, w), axis=(1, 2))  # (nc, hv, wv, w, w)
        out = np.einsum("chwyx,nyx->chwn", win, self.images, optimize=True).reshape(nc, hv * wv, len(self))
        return np.ascontiguousarray(out.transpose(2, 0, 1)) if basis_first else out

    def _valid_stamps(self, stamps: np.ndarray) -> tuple[np.ndarray, int, int, int]:
        """``(stamps as float64, count, valid rows, valid columns)`` for correlating with this basis."""
        stamps = np.asarray(stamps, dtype=np.float64)
        nc, H, W = stamps.shape
        hv, wv = H - self.size + 1, W - self.size + 1
        if hv <= 0 or wv <= 0:
            raise ValueError(f"Stamps of shape {H}×{W} are smaller than the {self.size}×{self.size} kernel.")
        return stamps, nc, hv, wv

    def correlate_stamps_rows(self, stamps: np.ndarray) -> np.ndarray:
        """Separable bases only: :meth:`correlate_stamps` in the layout ``(N, hv, nc·wv)`` (valid row, then
        stamp, then valid column), which the two 1-D passes produce without any transposition.

        Per distinct x factor one GEMM with its banded (Toeplitz) matrix does the x pass for all stamps at
        once; per raw term one GEMM with its banded y matrix writes the term's rows straight into place.
        """
        stamps, nc, hv, wv = self._valid_stamps(stamps)
        H, W = stamps.shape[1:]
        w = self.size
        xkeys, groups = _x_factors(self)
        jj = np.arange(wv)
        ii = np.arange(hv)
        rows = np.ascontiguousarray(stamps.transpose(1, 0, 2)).reshape(H * nc, W)  # (H·nc, W)
        raw = np.empty((len(self.fx), hv, nc * wv))
        for p, (js, fys) in enumerate(groups):
            tx = np.zeros((W, wv))
            for u in range(w):
                tx[jj + u, jj] = xkeys[p, u]
            xp = (rows @ tx).reshape(H, nc * wv)  # x pass of every stamp row
            for j, fy in zip(js, fys):
                ty = np.zeros((hv, H))
                for v in range(w):
                    ty[ii, ii + v] = fy[v]
                np.matmul(ty, xp, out=raw[j])
        if self.mix is None:
            return raw
        return (self.mix @ raw.reshape(len(self.fx), -1)).reshape(len(self), hv, nc * wv)


def _x_factors(basis: "KernelBasis"):
    """Distinct x factors of a separable basis and, per factor, the raw terms using it with their y factors."""
    xkeys, xinv = np.unique(basis.fx, axis=0, return_inverse=True)
    xinv = np.asarray(xinv).reshape(-1)
    return xkeys, [(np.nonzero(xinv == p)[0], basis.fy[xinv == p]) for p in range(len(xkeys))]


def alard_lupton_basis(size: int, sigmas, degrees) -> KernelBasis:
    """Alard–Lupton basis with LSST's renormalisation (spec §2.3).

    For each Gaussian ``g`` (σ_g, unit sum on the ``size × size`` grid) and each term ``x^a y^b`` of total
    degree ≤ ``degrees[g]`` (afw order), the raw basis is ``G_g(u, v) (u/h)^a (v/h)^b`` with ``h = size // 2``.
    Then ``B_0`` = first raw basis (sum 1); for i ≥ 1 the raw basis is divided by its sum when that is non-zero
    (beyond float32 epsilon) and ``B_0`` subtracted, and finally scaled to unit L2 norm. Hence ``ΣB_0 = 1`` and
    ``ΣB_i ≈ 0`` for i ≥ 1, so the kernel sum equals the coefficient of ``B_0``.
    """
    size = int(size)
    if size % 2 == 0 or size < 3:
        raise ConfigError(f"Kernel size must be odd and >= 3, got {size}.")
    sigmas = tuple(float(s) for s in sigmas)
    degrees = tuple(int(d) for d in degrees)
    if len(sigmas) != len(degrees):
        raise ConfigError(f"Need one polynomial degree per Gaussian: sigmas {sigmas}, degrees {degrees}.")
    h = size // 2
    u = np.arange(-h, h + 1, dtype=float)
    fx, fy = [], []
    for s, d in zip(sigmas, degrees):
        g = np.exp(-(u * u) / (2.0 * s * s))
        g /= g.sum()  # the 2-D Gaussian's unit sum factorises into two unit-sum 1-D factors
        for a, b in polynomial_terms(d):
            fx.append(g * (u / h) ** a)
            fy.append(g * (u / h) ** b)
    fx, fy = np.array(fx), np.array(fy)
    raw = fy[:, :, None] * fx[:, None, :]
    n = len(raw)
    mix = np.zeros((n, n))
    images = np.empty_like(raw)
    s0 = raw[0].sum()
    images[0] = raw[0] / s0
    mix[0, 0] = 1.0 / s0
    for i in range(1, n):
        r = raw[i]
        s = r.sum()
        alpha, beta = 1.0, 0.0
        if abs(s) > FLOAT32_EPS:
            alpha, beta = 1.0 / s, -1.0
        r = alpha * r + beta * images[0]
        norm = math.sqrt((r * r).sum())
        images[i] = r / norm
        mix[i, i] = alpha / norm
        mix[i, 0] += beta / norm * mix[0, 0]
    return KernelBasis(images, fx, fy, mix, "alard-lupton", sigmas, degrees)


def delta_function_basis(size: int) -> KernelBasis:
    """``size²`` delta-function kernels: basis ``k`` is 1 at ``(col, row) = (k % size, k // size)``."""
    size = int(size)
    if size % 2 == 0 or size < 1:
        raise ConfigError(f"Kernel size must be odd, got {size}.")
    images = np.eye(size * size).reshape(size * size, size, size)
    # Each delta is separable: fy = e_row, fx = e_col.
    e = np.eye(size)
    fx = np.tile(e, (size, 1))
    fy = np.repeat(e, size, axis=0)
    return KernelBasis(images, fx, fy, None, "delta-function")


def basis_sigmas(sigma_k: float, n_gauss: int, beta: float, min_sig: float) -> list[float]:
    """Modern sigma ladder: ``s_0 = max(min_sig, σ_K/β)`` (or σ_K if one Gaussian), then ×β each step."""
    if n_gauss <= 0:
        raise ConfigError(f"alardNGauss must be >= 1, got {n_gauss}.")
    s = sigma_k if n_gauss == 1 else max(min_sig, sigma_k / beta)
    out = [s]
    for _ in range(n_gauss - 1):
        out.append(out[-1] * beta)
    return out


def make_kernel_basis_list(
    target_fwhm: float | None,
    reference_fwhm: float | None,
    *,
    basis_set: str = "alard-lupton",
    kernel_size: int = 21,
    scale_by_fwhm: bool = True,
    kernel_size_fwhm_scaling: float = 6.0,
    kernel_size_min: int = 21,
    kernel_size_max: int = 35,
    n_gauss: int = 3,
    deg_gauss=(4, 2, 2),
    sig_gauss=(0.7, 1.5, 3.0),
    gauss_beta: float = 2.0,
    min_sig: float = 0.7,
    min_sig_deconv: float = 0.4,
) -> tuple[KernelBasis, dict]:
    """Basis sized for matching a target PSF (image convolved) to a reference PSF (spec §2.2, modern).

    Returns the basis and a dict of metadata (``ALBasisNGauss``, ``ALBasisDegGauss``, ``ALBasisSigGauss``,
    ``ALKernelSize``, ``ALBasisMode``).
    """
    deg_gauss = tuple(int(d) for d in deg_gauss)
    if len(deg_gauss) != n_gauss:
        raise ConfigError(f"alardDegGauss has {len(deg_gauss)} entries but alardNGauss = {n_gauss}.")

    def _size_from(sigs):
        size = int(kernel_size_fwhm_scaling * sigs[-1])
        if size % 2 == 0:
            size += 1
        return int(min(max(size, kernel_size_min), kernel_size_max))

    if basis_set == "delta-function":
        size = kernel_size
        if scale_by_fwhm and target_fwhm is not None and reference_fwhm is not None:
            sig_t, sig_r = target_fwhm / FWHM_PER_SIGMA, reference_fwhm / FWHM_PER_SIGMA
            sk = math.sqrt(abs(sig_r**2 - sig_t**2)) if sig_r != sig_t else max(sig_gauss)
            size = _size_from([max(sk, min_sig) * gauss_beta ** (n_gauss - 1)])
        return delta_function_basis(size), {"ALKernelSize": size, "ALBasisMode": "delta-function"}
    if basis_set != "alard-lupton":
        raise ConfigError(f"Unknown kernelBasisSet {basis_set!r}; use 'alard-lupton' or 'delta-function'.")

    if target_fwhm is None or reference_fwhm is None or not scale_by_fwhm:
        sigmas = tuple(float(s) for s in sig_gauss)
        if len(sigmas) != n_gauss:
            raise ConfigError(f"alardSigGauss has {len(sigmas)} entries but alardNGauss = {n_gauss}.")
        size, mode = int(kernel_size), "config"
        if size % 2 == 0:
            raise ConfigError(f"kernelSize must be odd, got {size}.")
    else:
        sig_t, sig_r = target_fwhm / FWHM_PER_SIGMA, reference_fwhm / FWHM_PER_SIGMA
        if sig_t == sig_r:
            sigmas, mode = tuple(float(s) for s in sig_gauss), "config"
        elif sig_r > sig_t:
            sk = max(math.sqrt(sig_r**2 - sig_t**2), min_sig)
            sigmas, mode = tuple(basis_sigmas(sk, n_gauss, gauss_beta, min_sig)), "convolution"
        else:
            sk = max(math.sqrt(sig_t**2 - sig_r**2), min_sig_deconv)
            sigmas, mode = tuple(basis_sigmas(sk, n_gauss, gauss_beta, min_sig_deconv)), "deconvolution"
        size = _size_from(sigmas)
    basis = alard_lupton_basis(size, sigmas, deg_gauss)
    meta = {
        "ALBasisNGauss": n_gauss,
        "ALBasisDegGauss": list(deg_gauss),
        "ALBasisSigGauss": list(sigmas),
        "ALKernelSize": size,
        "ALBasisMode": mode,
    }
    return basis, meta


def regularization_matrix(size: int, stencil: int = 9, border_penalty: float = 3.0, *,
                          kind: str = "centralDifference", orders=(1, 2)) -> np.ndarray:
    """``H = BᵀB`` regularising a delta-function kernel (spec §2.3).

    ``kind="centralDifference"``: row ``i`` of ``B`` (pixel ``(i % size, i // size)``) holds the stencil over
    the pixel's 3×3 neighbourhood (5-point ``[[0,1,0],[1,−4,1],[0,1,0]]`` or 9-point
    ``[[1,4,1],[4,−20,4],[1,4,1]]/6``) for interior pixels, and ``border_penalty`` on the diagonal for pixels on
    the kernel border. ``kind="forwardDifference"``: :func:`forward_difference_operator` of ``orders``.
    """
    if kind == "forwardDifference":
        B = forward_difference_operator(size, orders, border_penalty)
        return B.T @ B
    if kind != "centralDifference":
        raise ConfigError(f"regularizationType must be 'centralDifference' or 'forwardDifference', got {kind!r}.")
    if stencil == 5:
        st = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], float)
    elif stencil == 9:
        st = np.array([[1, 4, 1], [4, -20, 4], [1, 4, 1]], float) / 6.0
    else:
        raise ConfigError(f"centralRegularizationStencil must be 5 or 9, got {stencil}.")
    n = size * size
    B = np.zeros((n, n))
    for i in range(n):
        x0, y0 = i % size, i // size
        if x0 in (0, size - 1) or y0 in (0, size - 1):
            B[i, i] = border_penalty
            continue
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                B[i, (y0 + dy) * size + (x0 + dx)] = st[dy + 1, dx + 1]
    return B.T @ B


def forward_difference_operator(size: int, orders=(1, 2), border_penalty: float = 3.0) -> np.ndarray:
    """``B = Σ_o (B_x,o + B_y,o)`` of LSST's forward-difference regularisation (spec §2.3), ``(size², size²)``.

    Row ``i`` (pixel ``(x, y) = (i % size, i // size)``) of ``B_x,o`` holds the order-``o`` forward difference
    ``c_j = (−1)^{j+1} C(o, j)`` (``[−1, 1]``, ``[−1, 2, −1]``, ``[−1, 3, −3, 1]``) on pixels ``x … x + o``; the
    order drops to the distance to the right edge, and a pixel on that edge (order 0) gets ``border_penalty`` on
    the diagonal. ``B_y,o`` does the same upwards (pixels ``i + j·size``). The terms are summed, not stacked.
    """
    orders = [int(o) for o in orders]
    if not orders or min(orders) < 1 or max(orders) > 3:
        raise ConfigError(f"forwardRegularizationOrders must be 1, 2 or 3, got {orders}.")
    n = size * size
    B = np.zeros((n, n))
    idx = np.arange(n)
    x, y = idx % size, idx // size
    for o in orders:
        for pos, step in ((x, 1), (y, size)):
            eff = np.minimum(o, size - 1 - pos)
            for e in range(o + 1):
                rows = idx[eff == e]
                if e == 0:
                    B[rows, rows] += border_penalty
                    continue
                for j in range(e + 1):
                    B[rows, rows + j * step] += (-1.0) ** (j + 1) * math.comb(e, j)
    return B
