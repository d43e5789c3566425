"""Alard–Lupton least-squares machinery: per-stamp normal equations, candidate clipping and the spatial fit.

Model (spec §2): ``S ≈ corr(K, T) + bg`` with ``K = Σ_i a_i B_i``. For every candidate stamp the columns
``C_i = corr(B_i, T_stamp)`` over the stamp's valid region (plus a column of ones for the background) are built
for all candidates and all bases at once (:meth:`KernelBasis.correlate_stamps` uses the separability of the
basis), giving ``M_c = CᵀWC`` and ``b_c = CᵀWS`` with constant-variance weighting. The spatial fit stacks the
candidates' normal equations through the map from spatial parameters to local coefficients (§2.8); that is
the exact χ² over all candidate pixels with the coefficients frozen at each candidate centre.

The columns ``C_i`` carry the convolved image's noise, so ``E[M_c]`` exceeds its noiseless value by a term
``∝ Σ_u B_i(u) B_j(u) V_T`` that acts as a ridge penalty on ``‖K‖²`` and biases the kernel towards a wide,
smoothing one unless the convolved image is much deeper than the other; ``template_noise_correction``
subtracts that expectation (:func:`template_noise_matrix`).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import scipy.fft as sfft
from numpy.lib.stride_tricks import sliding_window_view

from .._threads import blas_threads, fft_workers
from ..errors import InsufficientKernelCandidatesError, NoKernelCandidatesError
from ..model.box import Box
from ..model.exposure import MaskedImage
from .basis import KernelBasis
from .candidates import BAD, GOOD, KernelCandidate, SpatialCellSet
from .kernel import KernelSolution, SpatialBackground, SpatialFunction, SpatialKernel
from .pca import pca_kernel_basis

__all__ = [
    "clipped_mean_std",
    "StampSystem",
    "build_stamp_system",
    "solve_normal_equations",
    "solve_single",
    "residual_statistics",
    "SpatialDesign",
    "spatial_design",
    "fit_spatial",
    "project_system",
    "solve_psf_matching",
]

_log = logging.getLogger("diffim.psfmatch")


def _single_threaded_blas():
    """Context limiting BLAS to one thread (``threadpoolctl`` if installed, else a no-op).

    The AL solve is thousands of small GEMMs (≤ 28 × 5000): a multi-threaded BLAS spends more time starting
    and spinning its threads than computing, and on a loaded machine the spinning threads compete with
    everything else. On the 2048² bench pair (1000 stamps) build_stamp_system takes 0.4–0.5 s of CPU with
    one BLAS thread against 1.9–4.1 s with two.
    """
    return blas_threads(1)


#: Normal matrices at least this large (delta-function bases: ~1100 × spatial terms) are decomposed with every
#: BLAS thread the process may use: one O(n³) LAPACK call, not thousands of small products.
_LARGE_SYSTEM = 1000


def _all_blas_threads(n: int):
    """Context lifting the single-thread BLAS limit to the process's thread budget
    (:func:`diffim._threads.fft_workers`: 1 in a batch worker) for an ``n × n`` decomposition (no-op below
    :data:`_LARGE_SYSTEM`)."""
    import contextlib

    return contextlib.nullcontext() if n < _LARGE_SYSTEM else blas_threads(fft_workers())


def _with_single_threaded_blas(func):
    """Decorator: run ``func`` under :func:`_single_threaded_blas` (signature and docstring kept)."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with _single_threaded_blas():
            return func(*args, **kwargs)

    return wrapper


def clipped_mean_std(values, nsigma: float = 3.0, niter: int = 3) -> tuple[float, float]:
    """afw ``MEANCLIP``/``STDEVCLIP``: iteration 0 clips at median ± nσ·0.741·IQR, later ones at mean ± nσ·std.

    Each iteration re-clips the full sample; the std is the unbiased (n − 1) one.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), 0.0
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    centre, width = med, 0.741301109 * (q3 - q1)
    sel = v
    for _ in range(niter):
        sel = v[np.abs(v - centre) <= nsigma * width] if width > 0 else v[v == centre]
        if sel.size < 2:
            sel = v if sel.size == 0 else sel
            break
        centre, width = float(sel.mean()), float(sel.std(ddof=1))
    mean = float(sel.mean())
    std = float(sel.std(ddof=1)) if sel.size > 1 else 0.0
    return mean, std


class StampSystem:
    """Per-candidate design matrices and normal equations for a set of equally sized stamps.

    Attributes
    ----------
    C
        ``(nc, n, npix)`` float32 design matrices, transposed (``n = N + 1`` with a background column).
    S, VS
        ``(nc, npix)`` science pixels and science variance over the valid region.
    VT
        ``(nc, H, W)`` template variance stamps (for the ``K²`` variance of the residuals).
    weight_var
        ``(nc,)`` constant variance used as weight.
    M, b
        ``(nc, n, n)`` and ``(nc, n)`` normal equations (float64).
    noise
        ``(nc, N, N)`` expected template-noise part of ``M[:, :N, :N]`` (a :class:`DeltaFunctionNoise` for
        delta-function bases), or None.
    """

    def __init__(self, C, S, VS, VT, weight_var, M, b, fit_background, valid_shape):
        self.noise = None  # (nc, N, N) expected template-noise part of M[:, :N, :N] (build_stamp_system), if any
        self.C, self.S, self.VS, self.VT = C, S, VS, VT
        self.weight_var, self.M, self.b = weight_var, M, b
        self.fit_background = fit_background
        self.valid_shape = valid_shape

    def __len__(self) -> int:
        return len(self.S)

    def vt_spectrum(self) -> tuple[tuple[int, int], np.ndarray]:
        """FFT grid and ``rfft2`` of the template variance stamps, computed once (every residual evaluation
        correlates them with a new ``K²``). A grid as large as the stamp suffices for the valid region: the
        circular wrap of the full convolution only reaches indices below ``size − 1``."""
        if getattr(self, "_vt_hat", None) is None:
            H, W = self.VT.shape[1:]
            grid = (sfft.next_fast_len(H, real=True), sfft.next_fast_len(W, real=True))
            self._vt_hat = (grid, sfft.rfft2(self.VT, s=grid, axes=(1, 2)))
        return self._vt_hat


def build_stamp_system(
    basis: KernelBasis,
    template: MaskedImage,
    science: MaskedImage,
    boxes: list[Box],
    *,
    fit_background: bool = True,
    constant_variance_weighting: bool = True,
    template_noise_correction: bool = False,
    noise_correlation: np.ndarray | None = None,
    regularization: np.ndarray | None = None,
    regularization_scaling: float | None = None,
    chunk: int = 128,
) -> StampSystem:
    """Design matrices and normal equations for the stamps ``boxes`` (all the same size).

    With ``constant_variance_weighting`` the weight of every pixel of a stamp is ``1/median(V_S + V_T)``
    (1 if that median is ≤ 0); otherwise ``1/(V_S + V_T)`` per pixel.

    With ``template_noise_correction`` the expected contribution of the convolved image's own noise to each
    normal matrix (:func:`template_noise_matrix`, with the noise autocorrelation ``noise_correlation``) is
    stored as ``system.noise``; ``M`` itself stays the ordinary one (single-candidate fits use it) and the
    spatial fit removes the noise part (:func:`fit_spatial`). ``regularization``
    (``λH``, basis-sized) is added to every candidate's normal matrix (delta-function bases); with
    ``regularization_scaling`` it is ``H`` and each candidate gets its own ``λ_c = tr(M_c)/tr(H) · scaling``
    (LSST ``lambdaType="relative"``), so the penalty follows the star's brightness.
    """
    if not boxes:
        raise NoKernelCandidatesError("No kernel candidate stamps to fit; supply more stars or relax the mask cuts.")
    H, W = boxes[0].shape
    w = basis.size
    ctr = basis.ctr
    hv, wv = H - w + 1, W - w + 1
    inner = (slice(ctr, ctr + hv), slice(ctr, ctr + wv))
    T = np.stack([template.image[b.slices(template.xy0)] for b in boxes]).astype(np.float64)
    Sst = np.stack([science.image[b.slices(science.xy0)] for b in boxes]).astype(np.float64)
    VSst = np.stack([science.variance[b.slices(science.xy0)] for b in boxes]).astype(np.float64)
    VT = np.stack([template.variance[b.slices(template.xy0)] for b in boxes]).astype(np.float64)
    nc = len(boxes)
    S = Sst[:, inner[0], inner[1]].reshape(nc, -1)
    VS = VSst[:, inner[0], inner[1]].reshape(nc, -1)
    if constant_variance_weighting:
        wv_ = np.median((VSst + VT).reshape(nc, -1), axis=1)
        wv_ = np.where(wv_ > 0, wv_, 1.0)
        wpix = None
    else:
        full = (VSst + VT)[:, inner[0], inner[1]].reshape(nc, -1)
        wv_ = np.median(full, axis=1)
        wpix = np.where(full > 0, 1.0 / np.where(full > 0, full, 1.0), 0.0)
    n = len(basis) + (1 if fit_background else 0)
    C = np.empty((nc, n, hv * wv), dtype=np.float32)  # basis-major per candidate: rows are the columns C_i
    M = np.empty((nc, n, n))
    b = np.empty((nc, n))
    N = len(basis)
    cc = np.ones((n, hv * wv))  # one candidate's columns (the background row stays 1)
    for lo in range(0, nc, chunk):
        hi = min(nc, lo + chunk)
        if basis.separable:
            # (N, hv, nch, wv): the layout the separable passes produce; each candidate's block is gathered below
            cols = basis.correlate_stamps_rows(T[lo:hi]).reshape(N, hv, hi - lo, wv)
        else:
            cols = basis.correlate_stamps(T[lo:hi], basis_first=True)  # (N, nch, npix)
        for c in range(lo, hi):  # 2-D BLAS products beat numpy's stacked matmul/einsum here
            if basis.separable:
                cc[:N].reshape(N, hv, wv)[...] = cols[:, :, c - lo, :]
            else:
                cc[:N] = cols[:, c - lo, :]
            C[c] = cc
            if wpix is None:
                M[c] = (cc @ cc.T) / wv_[c]
                b[c] = (cc @ S[c]) / wv_[c]
            else:
                cw = cc * wpix[c]
                M[c] = cw @ cc.T
                b[c] = cw @ S[c]
    yy = (S * S).sum(axis=1) / wv_ if wpix is None else (wpix * S * S).sum(axis=1)
    if regularization is not None:
        H = np.asarray(regularization, dtype=np.float64)
        if regularization_scaling is None:
            M[:, :N, :N] += H
        else:
            lam = np.trace(M[:, :N, :N], axis1=1, axis2=2) / np.trace(H) * float(regularization_scaling)
            M[:, :N, :N] += lam[:, None, None] * H
    system = StampSystem(C, S, VS, VT, wv_, M, b, fit_background, (hv, wv))
    system.yy = yy  # weighted Σ S² per candidate: with M and b it gives any fit's residual sum of squares
    if template_noise_correction:
        system.noise = template_noise_matrix(basis, VT, wv_ if wpix is None else wpix.reshape(nc, hv, wv),
                                             noise_correlation, compact=True)
    return system


def template_noise_matrix(basis: KernelBasis, VT: np.ndarray, weight, noise_correlation=None,
                          *, compact: bool = False):
    """Expected noise part of ``CᵀWC`` for stamps of the convolved image with variance ``VT``.

    ``C_i(X) = Σ_u B_i(u) T(X + u)``; with independent pixel noise of variance ``V_T``,
    ``E[Σ_X w(X) C_i(X) C_j(X)]`` exceeds its noiseless value by ``Σ_u B_i(u) B_j(u) W(u)`` where
    ``W(u) = Σ_X w(X) V_T(X + u)`` (X over the valid region). That excess acts as a ridge penalty
    ``∝ ‖K‖²`` and pulls the fitted kernel towards a wide, smoothing one whenever the convolved image's noise is
    not negligible against the candidates' signal.

    Parameters
    ----------
    VT
        ``(nc, H, W)`` variance stamps of the convolved image.
    weight
        ``(nc,)`` constant variances (weight ``1/weight``) or ``(nc, hv, wv)`` per-pixel weights.
    noise_correlation
        Normalised noise autocorrelation ``ρ`` (odd square, centre 1; :func:`diffim.psfmatch.noise.noise_correlation`)
        for correlated noise, ``Cov(T(p), T(p + d)) ≈ V_T(p) ρ(d)``: the second basis factor becomes
        ``Σ_d ρ(d) B_j(u + d)``; a centre value other than 1 rescales the variance plane (measured noise
        covariance in its units). None: independent pixels with exactly the variance plane.

    compact
        Delta-function bases only: return a :class:`DeltaFunctionNoise` (the ``(nc, N)`` window sums and one
        ``(N, N)`` correlation matrix) instead of ``nc`` dense ``N × N`` matrices.

    Returns
    -------
    noise
        ``(nc, N, N)`` matrices (or a :class:`DeltaFunctionNoise`).
    """
    Wf = _noise_window_sums(VT, weight, basis.size)
    nc, w = len(Wf), basis.size
    if basis.kind == "delta-function" and basis.mix is None:
        # B_i = δ at pixel i: N_ij = ½(W_i + W_j) ρ(pixel j − pixel i), no basis products needed.
        compact_noise = DeltaFunctionNoise(Wf, _lag_matrix(w, noise_correlation))
        return compact_noise if compact else compact_noise.dense()
    Bf = basis.images.reshape(len(basis), -1)
    if noise_correlation is None:
        return np.einsum("iu,cu,ju->cij", Bf, Wf, Bf, optimize=True)
    from scipy.signal import correlate

    rho = np.asarray(noise_correlation, dtype=np.float64)
    Br = np.stack([correlate(b, rho, mode="same") for b in basis.images]).reshape(len(basis), -1)
    out = np.einsum("iu,cu,ju->cij", Bf, Wf, Br, optimize=True)
    return 0.5 * (out + out.transpose(0, 2, 1))


def _noise_window_sums(VT: np.ndarray, weight, w: int) -> np.ndarray:
    """``(nc, w²)``: ``W(u) = Σ_X w(X) V_T(X + u)`` over the valid region X, for every kernel offset u."""
    VT = np.asarray(VT, dtype=np.float64)
    nc, H, W = VT.shape
    hv, wv = H - w + 1, W - w + 1
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim == 1:
        # Box sums of V_T over the valid window at every kernel offset, from a summed-area table.
        cs = np.zeros((nc, H + 1, W + 1))
        cs[:, 1:, 1:] = VT.cumsum(axis=1).cumsum(axis=2)
        Wu = cs[:, hv:, wv:] - cs[:, :w, wv:] - cs[:, hv:, :w] + cs[:, :w, :w]
        Wu = Wu / weight[:, None, None]
    else:
        win = sliding_window_view(VT, (hv, wv), axis=(1, 2))  # (nc, w, w, hv, wv)
        Wu = np.einsum("cuvyx,cyx->cuv", win, weight, optimize=True)
    return Wu.reshape(nc, -1)


def _lag_matrix(w: int, noise_correlation) -> np.ndarray:
    """``(w², w²)``: ``ρ(pixel j − pixel i)`` for the kernel pixels (identity for None)."""
    if noise_correlation is None:
        return np.eye(w * w)
    rho = np.asarray(noise_correlation, dtype=np.float64)
    r = rho.shape[0] // 2
    yy, xx = np.divmod(np.arange(w * w), w)
    dy, dx = yy[None, :] - yy[:, None], xx[None, :] - xx[:, None]
    inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    return np.where(inside, rho[np.clip(dy + r, 0, 2 * r), np.clip(dx + r, 0, 2 * r)], 0.0)


class DeltaFunctionNoise:
    """Template-noise matrices of a delta-function basis, ``N_c[i, j] = ½(W_c[i] + W_c[j]) R[i, j]``, kept as the
    ``(nc, N)`` window sums ``W`` and one ``(N, N)`` lag-correlation matrix ``R`` (the dense stack would be
    as large as the normal matrices themselves)."""

    def __init__(self, W: np.ndarray, R: np.ndarray) -> None:
        self.W, self.R = np.asarray(W, float), np.asarray(R, float)

    def __len__(self) -> int:
        return len(self.W)

    def __getitem__(self, idx) -> "DeltaFunctionNoise":
        return DeltaFunctionNoise(self.W[idx], self.R)

    def any(self) -> bool:
        return bool(np.any(self.W))

    def dense(self) -> np.ndarray:
        return 0.5 * (self.W[:, :, None] + self.W[:, None, :]) * self.R[None]

    def spatial_matrix(self, design: "SpatialDesign", n_basis: int) -> np.ndarray:
        """``Σ_c P_cᵀ N_c P_c`` without forming ``N_c``: with features ``F`` of the bases' group,
        ``Q[(i,k), (j,l)] = R_ij · ½(G_kl(i) + G_kl(j))``, ``G_kl(i) = Σ_c F_k(c) F_l(c) W_c(i)``."""
        Q = np.zeros((design.n_theta, design.n_theta))
        groups = [np.nonzero(design.group[:n_basis] == g)[0] for g in np.unique(design.group[:n_basis])]
        for ia in groups:
            ga = design.group[ia[0]]
            for ib in groups:
                gb = design.group[ib[0]]
                Fa, Fb = design.features[ga], design.features[gb]
                G = np.einsum("ck,cl,ci->kli", Fa, Fb, self.W, optimize=True)  # over all basis pixels i
                R = self.R[np.ix_(ia, ib)]
                for k in range(Fa.shape[1]):
                    rows = design.index[ia, k]
                    okr = rows >= 0
                    if not okr.any():
                        continue
                    for l in range(Fb.shape[1]):
                        cols = design.index[ib, l]
                        okc = cols >= 0
                        if not okc.any():
                            continue
                        block = R * 0.5 * (G[k, l][ia][:, None] + G[k, l][ib][None, :])
                        Q[np.ix_(rows[okr], cols[okc])] += block[np.ix_(okr, okc)]
        return Q


def solve_normal_equations(M: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``M x = b`` (batched over leading axes); singular systems fall back to an eigen pseudo-inverse."""
    M = np.asarray(M, float)
    b = np.asarray(b, float)
    try:
        x = np.linalg.solve(M, b[..., None])[..., 0]
        if np.all(np.isfinite(x)):
            return x
    except np.linalg.LinAlgError:
        pass
    if M.ndim == 2:
        return _eigen_solve(M, b)
    return np.stack([_eigen_solve(Mi, bi) for Mi, bi in zip(M.reshape(-1, *M.shape[-2:]), b.reshape(-1, b.shape[-1]))]
                    ).reshape(b.shape)


def _eigen_solve(M: np.ndarray, b: np.ndarray) -> np.ndarray:
    lam, R = np.linalg.eigh(0.5 * (M + M.T))
    keep = np.abs(lam) > np.abs(lam).max() * 1e-14 if lam.size else lam.astype(bool)
    inv = np.zeros_like(lam)
    inv[keep] = 1.0 / lam[keep]
    return R @ (inv * (R.T @ b))


def condition_number(M: np.ndarray) -> float:
    """Eigenvalue condition number ``max|λ| / min|λ|`` of a symmetric matrix."""
    with _all_blas_threads(len(M)):
        lam = np.abs(np.linalg.eigvalsh(0.5 * (M + M.T)))
    return float(lam.max() / lam.min()) if lam.min() > 0 else math.inf


def solve_single(system: StampSystem) -> np.ndarray:
    """Per-candidate solutions ``(nc, n)`` (NaN rows where the solve failed)."""
    x = solve_normal_equations(system.M, system.b)
    x[~np.all(np.isfinite(x), axis=1)] = np.nan
    return x


def residual_statistics(system: StampSystem, coeffs: np.ndarray, basis: KernelBasis,
                        rows: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Mean and unbiased rms of ``z = (S − corr(K, T) − bg) / √(V_S + corr(K², V_T))`` per candidate.

    Parameters
    ----------
    coeffs
        ``(nc, n)`` local coefficients (basis coefficients, then the background if fitted).
    rows
        Evaluate only these candidates of ``system`` (``coeffs`` then has one row per entry), without copying
        the system's design matrices.

    Returns
    -------
    mean, rms, chi2
        ``(nc,)`` arrays (chi2 = variance of z); NaN where no pixel is usable.
    """
    sel = np.arange(len(system)) if rows is None else np.asarray(rows)
    nc = len(sel)
    good_c = np.all(np.isfinite(coeffs), axis=1)
    c = np.where(good_c[:, None], coeffs, 0.0)
    cf = c.astype(np.float32)
    if rows is None:
        model = np.matmul(cf[:, None, :], system.C)[:, 0, :].astype(float)
    else:  # in chunks: gathering a few design matrices at a time stays in cache
        model = np.empty((nc, system.C.shape[-1]))
        for lo in range(0, nc, 64):
            part = sel[lo : lo + 64]
            model[lo : lo + 64] = np.matmul(cf[lo : lo + 64, None, :], system.C[part])[:, 0, :]
    D = system.S[sel] - model
    N = len(basis)
    K = np.tensordot(c[:, :N], basis.images, axes=1)  # (nc, w, w)
    K2 = (K * K)[:, ::-1, ::-1]
    # corr(K², V_T) on the valid region (as fftconvolve(VT, K2, "valid")), with the V_T spectra reused.
    grid, vt_hat = system.vt_spectrum()
    H, W = system.VT.shape[1:]
    w = K.shape[-1]
    vt = sfft.irfft2(vt_hat[sel] * sfft.rfft2(K2, s=grid, axes=(1, 2)), s=grid, axes=(1, 2))
    vt = vt[:, w - 1 : H, w - 1 : W].reshape(nc, -1)
    var = system.VS[sel] + vt
    ok = np.isfinite(D) & (var > 0)
    z = np.where(ok, D / np.sqrt(np.where(ok, var, 1.0)), 0.0)
    n = ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = z.sum(axis=1) / n
        var_z = ((z - mean[:, None]) ** 2 * ok).sum(axis=1) / (n - 1)
    rms = np.sqrt(var_z)
    bad = ~good_c | (n < 2)
    mean[bad] = rms[bad] = var_z[bad] = np.nan
    return mean, rms, var_z


class SpatialDesign:
    """The map from spatial parameters θ to each candidate's local coefficients, kept in factored form.

    Local coefficient ``i`` of candidate ``c`` is ``Σ_k θ[index[i, k]] · features[group[i]][c, k]`` where the
    groups are the constant first basis (one feature, 1), the spatially varying bases (the kernel spatial
    functions) and the background (its spatial functions). θ layout: with ``constant_first_term``
    ``[a_0, a_{1,1..nkt}, …, a_{N−1,1..nkt}, β_{1..nbt}]``, otherwise ``[a_{0,1..nkt}, …, β]``. Never forming the
    dense ``(nc, n, nt)`` matrix keeps delta-function bases (441 × nkt parameters) affordable.
    """

    def __init__(self, xs, ys, n_basis, kernel_spatial, bg_spatial, constant_first_term=True):
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        fk = kernel_spatial(xs, ys)
        nc, nkt = fk.shape
        nbt = 0 if bg_spatial is None else bg_spatial.n_terms
        first = 1 if constant_first_term else 0
        self.n_local = n_basis + (1 if bg_spatial is not None else 0)
        self.n_theta = first + (n_basis - first) * nkt + nbt
        L = max(nkt, nbt, 1)
        feats = [np.zeros((nc, L)), np.zeros((nc, L)), np.zeros((nc, L))]
        feats[0][:, 0] = 1.0
        feats[1][:, :nkt] = fk
        if nbt:
            feats[2][:, :nbt] = bg_spatial(xs, ys)
        self.features = feats
        self.group = np.ones(self.n_local, dtype=int)
        self.index = np.full((self.n_local, L), -1, dtype=int)
        if constant_first_term:
            self.group[0] = 0
            self.index[0, 0] = 0
        for m in range(first, n_basis):
            off = first + (m - first) * nkt
            self.index[m, :nkt] = np.arange(off, off + nkt)
        if bg_spatial is not None:
            self.group[n_basis] = 2
            self.index[n_basis, :nbt] = np.arange(self.n_theta - nbt, self.n_theta)
        self.n_candidates = nc

    def local(self, theta: np.ndarray) -> np.ndarray:
        """``(nc, n_local)`` local coefficients for parameters θ."""
        th = np.where(self.index >= 0, np.asarray(theta)[np.maximum(self.index, 0)], 0.0)  # (n_local, L)
        out = np.empty((self.n_candidates, self.n_local))
        for g in range(3):
            sel = self.group == g
            if sel.any():
                out[:, sel] = self.features[g] @ th[sel].T
        return out

    def dense(self) -> np.ndarray:
        """The dense ``(nc, n_local, n_theta)`` matrix (for small problems and tests)."""
        P = np.zeros((self.n_candidates, self.n_local, self.n_theta))
        for i in range(self.n_local):
            for k, t in enumerate(self.index[i]):
                if t >= 0:
                    P[:, i, t] = self.features[self.group[i]][:, k]
        return P

    def normal_equations(self, M: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``Q = Σ_c P_cᵀ M_c P_c`` and ``w = Σ_c P_cᵀ b_c`` by group-pair GEMMs over candidates."""
        nc, n, _ = M.shape
        L = self.index.shape[1]
        Q = np.zeros((self.n_theta, self.n_theta))
        groups = [np.nonzero(self.group == g)[0] for g in range(3)]
        for ga in range(3):
            ia = groups[ga]
            if not len(ia):
                continue
            for gb in range(3):
                ib = groups[gb]
                if not len(ib):
                    continue
                F2 = (self.features[ga][:, :, None] * self.features[gb][:, None, :]).reshape(nc, L * L)
                Msub = M[:, _as_slice(ia)][:, :, _as_slice(ib)].reshape(nc, len(ia) * len(ib))
                T = (Msub.T @ F2).reshape(len(ia), len(ib), L, L)  # [i, j, k, l]
                rows = self.index[ia]  # (na, L)
                cols = self.index[ib]
                T = T.transpose(0, 2, 1, 3).reshape(len(ia) * L, len(ib) * L)
                r, c = rows.reshape(-1), cols.reshape(-1)
                okr, okc = r >= 0, c >= 0
                Q[np.ix_(r[okr], c[okc])] += T[np.ix_(okr, okc)]
        w = np.zeros(self.n_theta)
        for g in range(3):
            ia = groups[g]
            if not len(ia):
                continue
            contrib = (b[:, ia].T @ self.features[g]).reshape(-1)  # (na·L)
            r = self.index[ia].reshape(-1)
            np.add.at(w, r[r >= 0], contrib[r >= 0])
        return Q, w


def _as_slice(index: np.ndarray):
    """``index`` as a slice when it is a contiguous run (a view instead of a fancy-indexing copy)."""
    if len(index) and np.all(np.diff(index) == 1):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def spatial_design(xs, ys, n_basis, kernel_spatial, bg_spatial, constant_first_term=True) -> np.ndarray:
    """Dense ``P (nc, n_basis [+1], nt)`` mapping spatial parameters θ to local coefficients (see
    :class:`SpatialDesign` for the layout)."""
    return SpatialDesign(xs, ys, n_basis, kernel_spatial, bg_spatial, constant_first_term).dense()


#: Template-noise correction of the spatial fit: only kernel directions in which at least this fraction of the
#: normal-matrix power is signal are corrected (the others keep ordinary least squares). The correction divides
#: a direction's solution by its signal fraction, so this bounds the noise amplification (≤ 1/0.1).
MIN_SIGNAL_FRACTION = 0.1


def _correction_gains(frac: np.ndarray, c: np.ndarray, s2: float | None) -> np.ndarray:
    """Gain applied to each generalised-eigen direction's least-squares coefficient (1 = plain least squares).

    In the basis ``V`` with ``VᵀQV = I`` and ``VᵀQ_nV = diag(α)`` the least-squares coefficients are
    ``c = Vᵀw = f·φ + ε`` (``f = 1 − α`` the signal fraction, ``φ`` the true coefficient, ``Var ε ≈ s²``).
    A gain ``g`` costs, in squared residual of the candidates' noiseless signal (``Vᵀ Q_s V = diag(f)``),
    ``f [(g f − 1)² φ² + g² s²]``: plain least squares (``g = 1``) pays the bias, the full correction
    (``g = 1/f``) pays ``s²/f`` of amplified noise. The minimum is at ``g = f φ² / (f² φ² + s²)``; with the
    unbiased estimate ``f² φ² ≈ c² − s²`` that is ``(1 − s²/c²)/f``, kept within ``[1, 1/f]`` (never less than
    plain least squares, never more than the full correction). So a direction is corrected to the extent that
    the bias it removes is measured above the noise it amplifies; ``s2=None`` gives the full correction.
    """
    fix = frac >= MIN_SIGNAL_FRACTION
    full = 1.0 / np.where(fix, frac, 1.0)
    if s2 is None or not np.isfinite(s2) or s2 <= 0:
        g = full
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            g = full * np.clip(1.0 - s2 / np.maximum(c * c, 1e-300), 0.0, 1.0)
    return np.where(fix, np.clip(g, 1.0, full), 1.0)


def fit_spatial(
    M: np.ndarray,
    b: np.ndarray,
    xs,
    ys,
    n_basis: int,
    kernel_spatial: SpatialFunction,
    bg_spatial: SpatialFunction | None,
    constant_first_term: bool = True,
    noise: np.ndarray | None = None,
    yy: np.ndarray | None = None,
    npix: int | None = None,
    condition: bool = True,
) -> tuple[np.ndarray, SpatialDesign, float]:
    """Solve ``Σ_c P_cᵀ M_c P_c θ = Σ_c P_cᵀ b_c``. Returns θ, the :class:`SpatialDesign` and the eigenvalue
    condition number of the normal matrix.

    ``noise`` (``(nc, N, N)``, :func:`template_noise_matrix`) is the expected template-noise part of each
    ``M_c``. With it, the spatial normal matrix ``Q`` and its noise part ``Q_n`` are diagonalised together
    (``Q_n v = α Q v``; ``α`` is the noise fraction of direction ``v``) and the least-squares solution is
    divided by the signal fraction ``f = 1 − α`` in the directions where ``f`` ≥ :data:`MIN_SIGNAL_FRACTION`
    and the bias this removes is measured above the noise it amplifies (:func:`_correction_gains`; the noise
    ``s²`` of the coefficients is the least-squares residual variance per unit weight, from ``yy`` — each
    candidate's weighted ``Σ S²`` — and ``npix`` pixels per candidate; without them the full correction).
    ``design.n_noise_corrected`` records how many directions were corrected. ``condition=False`` skips the
    condition number (NaN), an eigenvalue decomposition as costly as the solve for large bases.
    """
    design = SpatialDesign(xs, ys, n_basis, kernel_spatial, bg_spatial, constant_first_term)
    M = np.asarray(M, float)
    Q, w = design.normal_equations(M, np.asarray(b, float))
    design.n_noise_corrected = 0
    theta = None
    if noise is not None and (noise.any() if isinstance(noise, DeltaFunctionNoise) else np.any(noise)):
        import scipy.linalg as sla

        if isinstance(noise, DeltaFunctionNoise):
            Qn = noise.spatial_matrix(design, n_basis)
        else:
            full = np.zeros_like(M)
            full[:, :n_basis, :n_basis] = noise
            Qn = design.normal_equations(full, np.zeros(M.shape[:2]))[0]
        try:
            with _all_blas_threads(len(Q)):
                alpha, V = sla.eigh(0.5 * (Qn + Qn.T), 0.5 * (Q + Q.T))  # Vᵀ Q V = I, Vᵀ Q_n V = diag(α)
        except (np.linalg.LinAlgError, ValueError):
            alpha = None  # Q not numerically positive definite: no correction
        if alpha is not None:
            frac = 1.0 - alpha
            c = V.T @ w
            s2 = None
            if yy is not None and npix:
                dof = len(M) * int(npix) - len(w)
                # Least-squares residual sum of squares Σyy − θᵀw with θ = V c (so θᵀw = ‖c‖²).
                s2 = float(np.sum(yy) - c @ c) / dof if dof > 0 else None
            gain = _correction_gains(frac, c, s2)
            theta = V @ (gain * c)
            design.n_noise_corrected = int(np.count_nonzero((gain > 1.0) & (alpha > 1e-9)))
    if theta is None:
        with _all_blas_threads(len(Q)):
            theta = solve_normal_equations(Q, w)
    if not np.all(np.isfinite(theta)):
        raise NoKernelCandidatesError("The spatial kernel solution has NaN coefficients; too few usable stars.")
    design.normal_matrix = Q
    return theta, design, (condition_number(Q) if condition else math.nan)


def _theta_to_kernel(theta, n_basis, kernel_spatial, bg_spatial, constant_first_term, basis):
    nkt = kernel_spatial.n_terms
    coeffs = np.zeros((n_basis, nkt))
    first = 1 if constant_first_term else 0
    if constant_first_term:
        coeffs[0, 0] = theta[0]
    body = theta[first : first + (n_basis - first) * nkt].reshape(n_basis - first, nkt)
    coeffs[first:] = body
    nbt = 0 if bg_spatial is None else bg_spatial.n_terms
    params = theta[len(theta) - nbt :] if nbt else np.zeros(0)
    return SpatialKernel(basis, coeffs, kernel_spatial), SpatialBackground(np.array(params), bg_spatial)


#: Candidates needed per spatial term: of the kernel (a spatial variation needs more points than terms to be
#: stable) and of the background (each stamp measures its local background precisely).
CANDIDATES_PER_KERNEL_TERM = 2
CANDIDATES_PER_BACKGROUND_TERM = 1


def _affordable_spatial(n: int, kspatial, bspatial, bbox, kind: str, log):
    """Spatial functions of the highest orders ≤ the configured ones that ``n`` candidates can constrain.

    A spatial model with more terms than the stars support is singular (condition numbers ~1e20 and a garbage
    kernel on small images); lowering the order is LSST's "weakly constrained" warning turned into a remedy.
    """
    def terms(order: int) -> int:
        return (order + 1) * (order + 2) // 2

    ko = kspatial.order
    while ko > 0 and n < CANDIDATES_PER_KERNEL_TERM * terms(ko):
        ko -= 1
    bo = bspatial.order if bspatial is not None else 0
    while bspatial is not None and bo > 0 and n < CANDIDATES_PER_BACKGROUND_TERM * terms(bo):
        bo -= 1
    if ko == kspatial.order and (bspatial is None or bo == bspatial.order):
        return kspatial, bspatial
    log.warning("%d kernel candidates cannot constrain spatial orders %d (kernel) / %s (background): fitting "
                "%d / %s.", n, kspatial.order, None if bspatial is None else bspatial.order, ko,
                None if bspatial is None else bo)
    ks = SpatialFunction(ko, bbox, kind) if ko != kspatial.order else kspatial
    bs = None if bspatial is None else (SpatialFunction(bo, bbox, kind) if bo != bspatial.order else bspatial)
    return ks, bs


def project_system(M: np.ndarray, b: np.ndarray, noise, transform: np.ndarray):
    """Normal equations ``M`` ``(nc, n, n)``, ``b`` ``(nc, n)`` and template-noise part ``noise`` (a
    :class:`DeltaFunctionNoise`, ``(nc, N, N)`` matrices or None) in a basis of combinations ``transform``
    ``(N, m)`` of their basis: ``(M', b', noise')`` with ``M' = T̃ᵀ M T̃``, ``b' = T̃ᵀ b`` (``T̃`` = ``transform``
    plus the background column unchanged) and the noise part projected alike."""
    T = np.asarray(transform, dtype=np.float64)
    N, m = T.shape
    n = M.shape[1]
    Tt = np.zeros((n, m + (n - N)))
    Tt[:N, :m] = T
    if n > N:
        Tt[N:, m:] = np.eye(n - N)
    Mp = np.einsum("ia,cij,jb->cab", Tt, M, Tt, optimize=True)
    bp = b @ Tt
    if noise is None:
        return Mp, bp, None
    if isinstance(noise, DeltaFunctionNoise):
        # N_c = ½(diag(W_c) R + R diag(W_c)): Tᵀ N_c T = ½(X_c + X_cᵀ), X_c = (W_c ∘ T)ᵀ (R T).
        X = np.einsum("ci,ia,ib->cab", noise.W, T, noise.R @ T, optimize=True)
        return Mp, bp, 0.5 * (X + X.transpose(0, 2, 1))
    return Mp, bp, np.einsum("ia,cij,jb->cab", T, np.asarray(noise, dtype=np.float64), T, optimize=True)


def _fit_weights(M: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """S/N² of each candidate's fitted model, ``xᵀ M x`` (weighted model power over the noise)."""
    x = np.where(np.isfinite(coeffs), coeffs, 0.0)
    return np.einsum("ci,cij,cj->c", x, M, x, optimize=True)


@_with_single_threaded_blas
def solve_psf_matching(
    template: MaskedImage,
    science: MaskedImage,
    candidates: list[KernelCandidate],
    basis: KernelBasis,
    *,
    bbox: Box | None = None,
    spatial_kernel_order: int = 1,
    spatial_bg_order: int = 2,
    fit_for_background: bool = True,
    spatial_model_type: str = "chebyshev1",
    constant_first_term: bool | None = None,
    size_cell_x: int = 128,
    size_cell_y: int = 128,
    n_star_per_cell: int = 5,
    max_spatial_iterations: int = 3,
    single_kernel_clipping: bool = True,
    kernel_sum_clipping: bool = True,
    spatial_kernel_clipping: bool = True,
    candidate_residual_mean_max: float = 0.25,
    candidate_residual_std_max: float = 1.5,
    max_ksum_sigma: float = 3.0,
    constant_variance_weighting: bool = True,
    template_noise_correction: bool = False,
    noise_correlation: np.ndarray | None = None,
    regularization: np.ndarray | None = None,
    regularization_scaling: float | None = None,
    use_pca: bool = False,
    n_pca_components: int = 5,
    subtract_mean_for_pca: bool = True,
    log: logging.Logger | None = None,
) -> KernelSolution:
    """The full AL solve loop (spec §2.7): single kernels, kernel-sum clipping, spatial fit, spatial clipping.

    ``template`` is the image that gets convolved, ``science`` the one it is matched to. Candidates are
    modified in place (status, kernel_sum, residual statistics). ``regularization`` (``λH``, basis-sized) is
    added to every candidate's normal matrix (delta-function bases; ``regularization_scaling``: relative λ, see
    :func:`build_stamp_system`). ``template_noise_correction`` removes the
    template's own noise (autocorrelation ``noise_correlation``) from the spatial normal equations
    (:func:`build_stamp_system`, :func:`fit_spatial`). With ``use_pca`` the spatial fit is made in the basis
    of the mean and leading principal components of the accepted single kernels
    (:func:`diffim.psfmatch.pca.pca_kernel_basis`, ``n_pca_components`` kernels), rebuilt at every spatial
    iteration from the candidates still accepted; the returned kernel is expressed in that basis. Raises
    :class:`~diffim.errors.NoKernelCandidatesError` when every candidate is rejected.
    """
    log = log or _log
    bbox = science.bbox if bbox is None else bbox
    if not candidates:
        raise NoKernelCandidatesError(
            "No kernel candidates: no usable stars were found in both images (check masks, overlap and S/N)."
        )
    if constant_first_term is None:
        constant_first_term = basis.kind != "delta-function"
    n_basis = len(basis)
    kspatial = SpatialFunction(spatial_kernel_order, bbox, spatial_model_type)
    bspatial = SpatialFunction(spatial_bg_order, bbox, spatial_model_type) if fit_for_background else None

    cells = SpatialCellSet(bbox, size_cell_x, size_cell_y)
    for c in candidates:
        cells.insert(c)
    cands = cells.all_candidates()
    index = {id(c): i for i, c in enumerate(cands)}

    system = build_stamp_system(
        basis, template, science, [c.box for c in cands],
        fit_background=fit_for_background, constant_variance_weighting=constant_variance_weighting,
        template_noise_correction=template_noise_correction, noise_correlation=noise_correlation,
        regularization=regularization, regularization_scaling=regularization_scaling,
    )
    single = solve_single(system)
    smean, srms, schi2 = residual_statistics(system, single, basis)
    ksum = single[:, :n_basis] @ basis.sums
    for i, c in enumerate(cands):
        c.coefficients = single[i]
        c.kernel_sum = float(ksum[i])
        c.background = float(single[i, n_basis]) if fit_for_background else 0.0
        c.residual_mean, c.residual_std, c.chi2 = float(smean[i]), float(srms[i]), float(schi2[i])

    def _single_bad(i):
        if not np.isfinite(single[i]).all() or not np.isfinite(smean[i]):
            return "single solution failed"
        if single_kernel_clipping and (
            abs(smean[i]) > candidate_residual_mean_max or srms[i] > candidate_residual_std_max
        ):
            return f"single-kernel residuals mean {smean[i]:.2f} rms {srms[i]:.2f}"
        return ""

    xs_all = np.array([c.x for c in cands])
    ys_all = np.array([c.y for c in cands])
    n_rejected = {"single": 0, "ksum": 0, "spatial": 0}
    solution = None
    it = 0
    while True:
        # Single-kernel clipping: revisit until no visited candidate is rejected.
        while True:
            rej = 0
            for c in cells.visit(n_star_per_cell):
                reason = _single_bad(index[id(c)])
                if reason:
                    c.status, c.reason = BAD, reason
                    rej += 1
                else:
                    c.status = GOOD
            n_rejected["single"] += rej
            if rej == 0:
                break
        visited = cells.visit(n_star_per_cell)
        if not visited:
            raise NoKernelCandidatesError(
                f"All {len(cands)} kernel candidates were rejected ({n_rejected}); the images may not match "
                "(wrong PSFs, misregistration, bad masks) or have too few stars."
            )
        if kernel_sum_clipping and len(visited) > 1:
            ks = np.array([c.kernel_sum for c in visited])
            mean, std = clipped_mean_std(ks)
            bad = np.abs(ks - mean) > max_ksum_sigma * std
            if bad.any():
                for c, b in zip(visited, bad):
                    if b:
                        c.status, c.reason = BAD, f"kernel sum {c.kernel_sum:.4f} vs {mean:.4f}±{std:.4f}"
                n_rejected["ksum"] += int(bad.sum())
                continue
        idx = np.array([index[id(c)] for c in visited])
        ks_fit, bs_fit = _affordable_spatial(len(idx), kspatial, bspatial, bbox, spatial_model_type, log)
        pca = None
        # The visited candidates' normal equations, gathered once (a delta-function basis: ~10 MB each).
        M_fit, b_fit = system.M[idx], system.b[idx]
        noise_fit = None if system.noise is None else system.noise[idx]
        n_fit, first_fit = n_basis, constant_first_term
        if use_pca:
            mean_kernel = None
            if subtract_mean_for_pca:
                # Kernel 0 of the PCA basis: the spatially constant kernel fitted to all these candidates at
                # once (the average of single kernels is as noisy as they are, and a delta-function single
                # kernel fits ~1100 pixels to ~1200).
                k0 = SpatialFunction(0, bbox, spatial_model_type)
                th0, d0, _ = fit_spatial(M_fit, b_fit, xs_all[idx], ys_all[idx], n_basis, k0, bs_fit,
                                         constant_first_term, noise=noise_fit, yy=system.yy[idx],
                                         npix=system.S.shape[1], condition=False)
                mean_kernel = d0.local(th0)[0, :n_basis]
            pca = pca_kernel_basis(single[idx, :n_basis], basis, n_pca_components,
                                   subtract_mean=subtract_mean_for_pca,
                                   weights=_fit_weights(M_fit, single[idx]), mean=mean_kernel)
            M_fit, b_fit, noise_fit = project_system(M_fit, b_fit, noise_fit, pca.transform)
            n_fit, first_fit = len(pca), pca.mean_first
        theta, design, _ = fit_spatial(
            M_fit, b_fit, xs_all[idx], ys_all[idx], n_fit, ks_fit, bs_fit, first_fit,
            noise=noise_fit, yy=system.yy[idx], npix=system.S.shape[1], condition=False,
        )
        del M_fit, b_fit, noise_fit
        # The condition number (an eigendecomposition as costly as the solve) is computed for the final fit only.
        solution = (theta, idx, design.normal_matrix, ks_fit, bs_fit, design.n_noise_corrected, pca)
        if it >= max_spatial_iterations:
            break
        # Assess every visited candidate with the spatial kernel at its centre (in the original basis).
        loc = design.local(theta)
        if pca is not None:
            loc = pca.expand(loc)
        mean, rms, chi2 = residual_statistics(system, loc, basis, rows=idx)
        n_bad = 0
        for c, m, r, q in zip(visited, mean, rms, chi2):
            c.chi2 = float(q)
            if not np.isfinite(m) or (spatial_kernel_clipping and (abs(m) > candidate_residual_mean_max
                                                                   or r > candidate_residual_std_max)):
                c.status, c.reason = BAD, f"spatial-kernel residuals mean {m:.2f} rms {r:.2f}"
                n_bad += 1
            else:
                c.status = GOOD
        n_rejected["spatial"] += n_bad
        if n_bad == 0:
            break
        if n_bad == len(visited):
            pass  # let the next pass refill the cells or raise
        it += 1

    theta, idx, normal_matrix, kspatial, bspatial, n_corrected, pca = solution
    cond = condition_number(normal_matrix)
    if pca is None:
        kernel, background = _theta_to_kernel(theta, n_basis, kspatial, bspatial, constant_first_term, basis)
    else:
        kernel, background = _theta_to_kernel(theta, len(pca), kspatial, bspatial, pca.mean_first, pca.basis)
    n_used = len(idx)
    if n_used < 1:
        raise NoKernelCandidatesError("The final spatial kernel fit used no candidates.")
    xc, yc = bbox.center
    nkt = kspatial.n_terms
    if n_used <= 2 * nkt:
        log.warning("Spatial kernel model is weakly constrained: %d candidates for %d kernel terms.", n_used, nkt)
    if cond > 1e10:
        log.warning("Spatial kernel condition number %.3g exceeds 1e10.", cond)
    meta = {
        "spatialKernelSum": kernel.kernel_sum(xc, yc),
        "spatialConditionNum": cond,
        "nKernelCandidates": len(cands),
        "nKernelCandidatesUsed": n_used,
        "nRejectedSingle": n_rejected["single"],
        "nRejectedKernelSum": n_rejected["ksum"],
        "nRejectedSpatial": n_rejected["spatial"],
    }
    if system.noise is not None:
        meta["nTemplateNoiseCorrectedModes"] = n_corrected
    if pca is not None:
        meta["nPcaComponents"] = len(pca)
        meta["pcaExplainedFraction"] = pca.explained
    log.info(
        "Kernel solved with %d of %d candidates; kernel sum at centre %.5f; condition number %.3g.",
        n_used, len(cands), meta["spatialKernelSum"], cond,
    )
    return KernelSolution(kernel, background, cands, meta)
