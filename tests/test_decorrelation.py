"""Tests of the Alard–Lupton decorrelation (constant, spatially varying, pre-convolution) and its tasks.

Scenes are built in Fourier space so that truth is analytic: Gaussian PSFs and matching kernels, white noise,
periodic convolutions (no edge effects). The LSST cases are those of ``test_imageDecorrelation.py``
(lsst_tests.md §5) with their tolerances.
"""

import numpy as np
import pytest

from diffim.decorrelation import (
    _grid_nodes,
    _tent_matrix,
    decorrelate,
    decorrelate_spatial,
    decorrelation_kernel_fourier,
    pad_center_origin,
    unpad_center_origin,
)
from diffim.model import Exposure, GaussianPsf, ImagePsf
from diffim.statistics import clipped_mean, clipped_mean_std
from diffim.tasks.image_decorrelation import (
    DecorrelateALKernelSpatialTask,
    DecorrelateALKernelTask,
)

PSF_SCI, PSF_TMPL = 3.3, 2.2
SIG_K = float(np.sqrt(PSF_SCI**2 - PSF_TMPL**2))  # 2.4597


# ----------------------------------------------------------------------------------------------------------
# Scene helpers
# ----------------------------------------------------------------------------------------------------------
def gaussian_kernel(sigma: float, size: int, centre: float | None = None) -> np.ndarray:
    """Unit-sum Gaussian sampled at pixel centres; ``centre`` defaults to the middle of the stamp."""
    c = (size - 1) / 2.0 if centre is None else centre
    y, x = np.mgrid[:size, :size]
    g = np.exp(-((x - c) ** 2 + (y - c) ** 2) / (2 * sigma**2))
    return g / g.sum()


def lsst_matching_kernel() -> np.ndarray:
    """LSST's test kernel: σ = 2.4597 on ``arange(-16, 16)`` (32×32) centred at −1, i.e. at index 15 (afw ctr)."""
    return gaussian_kernel(SIG_K, 32, centre=15.0)


def periodic_correlate(image: np.ndarray, kernel: np.ndarray, ctr: tuple[int, int] | None = None) -> np.ndarray:
    """afw-style correlation ``out(X) = Σ_u K(u) in(X + u)`` with periodic boundaries; ``ctr`` = afw centre."""
    ky, kx = kernel.shape
    cy, cx = ((ky - 1) // 2, (kx - 1) // 2) if ctr is None else ctr
    full = np.zeros(image.shape)
    full[:ky, :kx] = kernel
    full = np.roll(full, (-cy, -cx), axis=(0, 1))
    return np.fft.irfft2(np.fft.rfft2(image) * np.conj(np.fft.rfft2(full)), s=image.shape)


def render_sources(shape, xs, ys, fluxes, sigma) -> np.ndarray:
    """Band-limited Gaussian sources (σ in pixels) at sub-pixel positions, periodic, exact flux."""
    ny, nx = shape
    u = np.fft.rfftfreq(nx)[None, :]
    v = np.fft.fftfreq(ny)[:, None]
    spec = np.zeros((ny, nx // 2 + 1), complex)
    for x, y, f in zip(xs, ys, fluxes):
        spec += f * np.exp(-2j * np.pi * (u * x + v * y))
    spec *= np.exp(-2 * np.pi**2 * sigma**2 * (u**2 + v**2))
    return np.fft.irfft2(spec, s=shape)


def make_pair(svar, tvar, n=256, n_sources=50, seed=66, var_change=1 / 50.0):
    """Science (PSF σ 3.3) and template (σ 2.2) with white noise of variance svar / tvar (lsst_tests §5)."""
    rng = np.random.RandomState(seed)
    sci = rng.normal(scale=np.sqrt(svar), size=(n, n))
    tmpl = rng.normal(scale=np.sqrt(tvar), size=(n, n))
    if n_sources:
        fluxes = rng.uniform(50, 30000, n_sources)
        xs = rng.uniform(16, n - 5, n_sources)
        ys = rng.uniform(16, n - 5, n_sources)
        ind = np.argmin((xs - n / 2) ** 2 + (ys - n / 2) ** 2)
        sflux = fluxes.copy()
        sflux[ind] *= 1 + var_change
        tmpl += render_sources((n, n), xs, ys, fluxes, PSF_TMPL)
        sci += render_sources((n, n), xs, ys, sflux, PSF_SCI)

    def expo(img, var, sigma):
        return Exposure(image=img, variance=np.full((n, n), var), psf=GaussianPsf(sigma, 25))

    return expo(sci, svar, PSF_SCI), expo(tmpl, tvar, PSF_TMPL)


def make_diff(science: Exposure, template: Exposure, kernel: np.ndarray) -> Exposure:
    """``science − κ ⊗ template`` with afw variance ``V_S + Σκ² V_T`` and the science PSF."""
    matched = periodic_correlate(template.image.astype(float), kernel, ctr=(15, 15) if kernel.shape[0] == 32 else None)
    var = science.variance + (kernel**2).sum() * template.variance
    return Exposure(image=science.image - matched, variance=var, psf=science.psf)


def autocorr(img: np.ndarray, dx: int, dy: int) -> float:
    a = img - img.mean()
    ny, nx = a.shape
    p = a[: ny - dy, : nx - dx] * a[dy:, dx:]
    return float(p.mean() / a.var())


def pixel_variance(img: np.ndarray) -> float:
    """afw VARIANCECLIP (3σ, 3 iterations) of an image, as in the LSST test."""
    return clipped_mean_std(img)[1] ** 2


# ----------------------------------------------------------------------------------------------------------
# Basics
# ----------------------------------------------------------------------------------------------------------
def test_pad_center_origin_roundtrip_and_centre():
    for shape in ((5, 7), (4, 6)):
        a = np.arange(np.prod(shape), dtype=float).reshape(shape)
        b = pad_center_origin(a, (16, 20))
        assert b[0, 0] == a[shape[0] // 2, shape[1] // 2]
        assert b.sum() == a.sum()
        assert np.array_equal(unpad_center_origin(b, shape), a)


def test_filter_limits():
    """φ̂(0) = 1 (flux preserved) and φ̂ → √((σ²_u + σ²_c κ_sum²)/σ²_u) where |K̂| → 0 (DMTN-021)."""
    k = gaussian_kernel(2.5, 31) * 1.2
    phi = decorrelation_kernel_fourier(k, 1.0, 3.0, (128, 128))
    assert phi.shape == (128, 65)
    assert phi[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert phi[64, 64] == pytest.approx(np.sqrt(1 + 3 * 1.44), rel=1e-6)
    assert np.all(np.diff(phi[0]) >= -1e-12)  # monotonic for a Gaussian kernel
    p = gaussian_kernel(2.0, 17)
    phi_p = decorrelation_kernel_fourier(k, 1.0, 3.0, (128, 128), preconv_kernel=p)
    assert phi_p[0, 0] == pytest.approx(1.0, abs=1e-12)
    # a noiseless science image: φ̂ would be 1/|K̂| (a deconvolution); it stays finite, capped at 10⁵
    phi0 = decorrelation_kernel_fourier(k, 0.0, 3.0, (128, 128))
    assert np.all(np.isfinite(phi0)) and phi0.max() <= 1e5 * 1.0001 and phi0[0, 0] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------
# Constant decorrelation: LSST test_imageDecorrelation cases
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("complete", [False, True])
@pytest.mark.parametrize("svar,tvar", [(0.04, 0.04), (0.08, 0.04), (0.04, 0.08)])
def test_diffim_correction_lsst(svar, tvar, complete):
    """lsst_tests §5 testDiffimCorrection: after decorrelation the pixel variance (VARIANCECLIP) and the
    variance-plane mean (MEANCLIP) both equal svar + tvar (rtol 0.05 / 0.02) and each other (rtol 0.05);
    before it both are below svar + tvar (the convolution hid template noise in correlations)."""
    science, template = make_pair(svar, tvar)
    kernel = lsst_matching_kernel()
    diff = make_diff(science, template, kernel)
    assert clipped_mean(diff.variance) < svar + tvar
    assert pixel_variance(diff.image) < svar + tvar
    task = DecorrelateALKernelTask()
    task.config.completeVarPlanePropagation = complete
    res = task.run(science, template, diff, kernel)
    out = res.correctedExposure
    assert out is diff
    pix, vmean = pixel_variance(out.image), clipped_mean(out.variance)
    assert pix == pytest.approx(svar + tvar, rel=0.05)
    assert vmean == pytest.approx(svar + tvar, rel=0.02)
    assert pix == pytest.approx(vmean, rel=0.05)


def test_noise_diffim_correction_whitens():
    """lsst_tests §5 testNoiseDiffimCorrection (svar 1, tvar 100, no sources): the raw difference is strongly
    correlated (lags 1–3 > 0.2); the decorrelated one is white: |ρ| < 0.05 at lags 1–5 along x, y and the
    diagonal (standard error 1/256 ≈ 0.004). The variance plane matches the pixel variance to 3 %."""
    science, template = make_pair(1.0, 100.0, n_sources=0, seed=22)
    diff = make_diff(science, template, lsst_matching_kernel())
    for r in (1, 2, 3):
        assert autocorr(diff.image, r, 0) > 0.2 and autocorr(diff.image, 0, r) > 0.2
    img, var, _ = decorrelate(diff.image, diff.variance, lsst_matching_kernel(), 1.0, 100.0)
    for r in range(1, 6):
        for dx, dy in ((r, 0), (0, r), (r, r)):
            assert abs(autocorr(img, dx, dy)) < 0.05
    assert np.var(img) == pytest.approx(float(var.mean()), rel=0.03)
    assert float(var.mean()) == pytest.approx(101.0, rel=1e-3)  # σ²_S + σ²_T κ_sum²


def test_point_source_flux_preserved_and_psf_decorrelated():
    """φ̂(0) = 1: the flux of a transient is unchanged; its decorrelated profile is the returned PSF
    (φ ⊗ PSF, computed on a small grid) to 5e-4 of the peak (the sampled vs band-limited Gaussian differ at 1e-4)."""
    n = 128
    sci_psf = gaussian_kernel(PSF_SCI, 25)
    diff = render_sources((n, n), [64.0], [64.0], [1000.0], PSF_SCI)
    kernel = gaussian_kernel(SIG_K, 31)
    img, _, psf = decorrelate(diff, np.ones((n, n)), kernel, 1.0, 4.0, psf_image=sci_psf)
    assert img.sum() == pytest.approx(1000.0, rel=1e-4)
    stamp = img[52:77, 52:77] / 1000.0
    assert np.abs(stamp / stamp.sum() - psf).max() < 5e-4 * psf.max()
    assert psf.sum() == pytest.approx(1.0)
    assert psf.max() > sci_psf.max()  # decorrelation sharpens (φ̂ > 1 at high frequency)


def test_template_matched_false_branch():
    """Science convolved: D = κ⊗S − T is whitened with σ²_u = tvar, σ²_c = svar. With κ_sum = 1.25 and the
    difference divided by κ_sum (as the subtraction does) the LSST variance rule V/κ_sum² is consistent
    with the measured scatter (3 %)."""
    n, svar, tvar = 256, 30.0, 1.0
    rng = np.random.RandomState(9)
    S = rng.normal(scale=np.sqrt(svar), size=(n, n))
    T = rng.normal(scale=np.sqrt(tvar), size=(n, n))
    for ksum in (1.0, 1.25):
        kernel = gaussian_kernel(2.0, 21) * ksum
        d = (periodic_correlate(S, kernel) - T) / ksum
        v = np.full((n, n), (svar * (kernel**2).sum() + tvar) / ksum**2)
        assert autocorr(d, 1, 0) > 0.3
        img, var, _ = decorrelate(d, v, kernel, svar, tvar, template_matched=False,
                                  science_variance=np.full((n, n), svar), template_variance=np.full((n, n), tvar))
        assert abs(autocorr(img, 1, 0)) < 0.05 and abs(autocorr(img, 0, 1)) < 0.05
        assert np.var(img) == pytest.approx(float(var.mean()), rel=0.03)
        assert float(var.mean()) == pytest.approx((tvar + svar * ksum**2) / ksum**2, rel=1e-3)
        # without input planes the difference variance is rescaled: same answer for uniform planes
        _, var2, _ = decorrelate(d, v, kernel, svar, tvar, template_matched=False)
        assert np.allclose(var2, var, rtol=1e-4)


def test_preconvolution_mode_score_variance():
    """Score image P⊗S − κ⊗T decorrelated with preConvMode (§3.4): the variance plane equals the measured
    scatter and, with a nearly noiseless template, ≈ V_S·Σp² = V_S / NEA (5 %); flux is preserved. The score
    is smooth (≈ 50 pixels per independent sample), hence 1024² pixels for a 1.2 % standard error and a 4 %
    tolerance."""
    n, svar, tvar = 1024, 1.0, 0.01
    rng = np.random.RandomState(12)
    S = rng.normal(size=(n, n))
    T = rng.normal(scale=np.sqrt(tvar), size=(n, n))
    p = gaussian_kernel(2.0, 17)
    kernel = gaussian_kernel(1.5, 21)  # narrower than P: φ̂ < 1 at high frequencies
    score = periodic_correlate(S, p) - periodic_correlate(T, kernel)
    v = np.full((n, n), svar * (p**2).sum() + tvar * (kernel**2).sum())
    img, var, _ = decorrelate(score, v, kernel, svar, tvar, preconv_kernel=p,
                              science_variance=np.full((n, n), svar), template_variance=np.full((n, n), tvar))
    assert np.var(img) == pytest.approx(float(var.mean()), rel=0.04)
    assert float(var.mean()) == pytest.approx(svar * (p**2).sum(), rel=0.05)
    point = np.zeros((128, 128))
    point[64, 64] = 100.0
    out, _, _ = decorrelate(point, np.ones((128, 128)), kernel, svar, tvar, preconv_kernel=p)
    assert out.sum() == pytest.approx(100.0, rel=2e-3)  # φ's faint ringing tails reach beyond the stamp


def test_non_finite_pixels_are_restored_and_contained():
    science, template = make_pair(1.0, 10.0, n=128, n_sources=0, seed=3)
    kernel = gaussian_kernel(SIG_K, 31)
    diff = make_diff(science, template, kernel)
    img = diff.image.copy()
    img[40, 50] = np.nan
    img[80:83, 20:23] = np.nan
    img[100, 100] = np.inf
    out, var, _ = decorrelate(img, diff.variance, kernel, 1.0, 10.0)
    assert np.isnan(out[40, 50]) and np.isnan(out[81, 21]) and out[100, 100] == np.inf
    finite = np.isfinite(img)
    assert np.all(np.isfinite(out[finite]))
    assert np.abs(out[finite]).max() < 8 * np.sqrt(var.mean())
    # an afw "unconvolvable" border (image NaN, variance inf) survives, also with input variance planes
    img[:, :15] = np.nan
    v = diff.variance.copy()
    v[:, :15] = np.inf
    for planes in ({}, {"science_variance": science.variance, "template_variance": template.variance}):
        out, var, _ = decorrelate(img, v, kernel, 1.0, 10.0, **planes)
        assert np.all(np.isnan(out[:, :15])) and np.all(np.isinf(var[:, :15]))
        assert np.all(np.isfinite(out[:, 15:][finite[:, 15:]])) and np.all(np.isfinite(var[:, 15:]))


# ----------------------------------------------------------------------------------------------------------
# Spatially varying decorrelation
# ----------------------------------------------------------------------------------------------------------
class BlendKernel:
    """Kernel varying linearly in x between two Gaussians (σ 1.2 at x = x0, σ 3.0 at the right edge)."""

    def __init__(self, width: int, x0: int = 0):
        self.ka, self.kb = gaussian_kernel(1.2, 25), gaussian_kernel(3.0, 25)
        self.width, self.x0 = width, x0

    def t(self, x):
        return (np.asarray(x, float) - self.x0) / (self.width - 1)

    def kernel_image(self, x, y):
        t = float(self.t(x))
        return (1 - t) * self.ka + t * self.kb


def _varying_scene(n=768, svar=1.0, tvar=30.0, seed=31):
    """D = S − K(x)⊗T with K(x) the BlendKernel: exact, since correlation is linear in the kernel."""
    rng = np.random.RandomState(seed)
    S = rng.normal(scale=np.sqrt(svar), size=(n, n))
    T = rng.normal(scale=np.sqrt(tvar), size=(n, n))
    k = BlendKernel(n)
    t = k.t(np.arange(n))[None, :]
    D = S - ((1 - t) * periodic_correlate(T, k.ka) + t * periodic_correlate(T, k.kb))
    ksq = np.array([(k.kernel_image(x, 0) ** 2).sum() for x in range(n)])[None, :]
    V = np.broadcast_to(svar + tvar * ksq, (n, n)).copy()
    return D, V, k


@pytest.mark.parametrize("mode", ["plain", "science_convolved", "preconvolved"])
def test_spatial_with_constant_kernel_equals_constant_decorrelation(mode):
    """With a constant kernel and uniform variances every node filter is the same, so the blended, tiled
    filter must reproduce the whole-image one (1e-4 σ), in every mode, variance planes included."""
    science, template = make_pair(1.0, 20.0, n=256, n_sources=0, seed=5)
    kernel = gaussian_kernel(SIG_K, 31) * (1.25 if mode == "science_convolved" else 1.0)
    diff = make_diff(science, template, kernel)
    if mode == "preconvolved":  # a real score image: science pre-convolved with P
        diff.image[...] = periodic_correlate(science.image, gaussian_kernel(2.0, 17)) - periodic_correlate(
            template.image, kernel)
    kw = {"template_matched": mode != "science_convolved",
          "preconv_kernel": gaussian_kernel(2.0, 17) if mode == "preconvolved" else None}
    a, va, _ = decorrelate(diff.image, diff.variance, kernel, 1.0, 20.0, science_variance=science.variance,
                           template_variance=template.variance, **kw)
    b, vb, _ = decorrelate_spatial(diff.image, diff.variance, kernel, science.variance, template.variance,
                                   cell_step=100, **kw)
    sigma = np.sqrt(va.mean())
    # pre-convolution filters amplify high frequencies 21×, so their real-space tails reach further than the
    # tile borders and than the FFT padding of the whole-image filter: agreement to 0.2 % of σ there.
    assert np.abs(a - b).max() < (2e-3 if mode == "preconvolved" else 1e-4) * sigma
    assert np.allclose(va, vb, rtol=1e-4)


def test_spatially_varying_decorrelation_whitens_everywhere_and_is_seamless():
    """Kernel width doubles across the field. Local lag-1 autocorrelations (x and y, 6×6 patches of 128²,
    standard error 0.008) are < 0.05 everywhere after spatial decorrelation, while a constant decorrelation
    with the central kernel leaves clearly correlated (or anti-correlated) noise at the edges. The tiled result
    equals the bilinear blend of node filters applied to the whole image (1e-3 σ): a continuous function of
    position, hence no seams at tile boundaries; column-to-column jumps at tile edges are not larger than
    elsewhere. Local variance planes match the local scatter to 5 %."""
    n, svar, tvar = 768, 1.0, 30.0
    D, V, k = _varying_scene(n, svar, tvar)
    step = 160
    out, var, _ = decorrelate_spatial(D, V, k, svar, tvar, cell_step=step)
    const, _, _ = decorrelate(D, V, k.kernel_image(n / 2, n / 2), svar, tvar)
    p = 128
    worst_const = 0.0
    for i in range(0, n, p):
        for j in range(0, n, p):
            patch = out[i : i + p, j : j + p]
            assert abs(autocorr(patch, 1, 0)) < 0.05 and abs(autocorr(patch, 0, 1)) < 0.05
            assert np.var(patch) == pytest.approx(float(var[i : i + p, j : j + p].mean()), rel=0.05)
            worst_const = max(worst_const, abs(autocorr(const[i : i + p, j : j + p], 1, 0)))
    assert worst_const > 0.1
    # reference: every node's filter applied to the whole image, blended with the same hat weights
    ny_nodes, nx_nodes = _grid_nodes(n, step), _grid_nodes(n, step)
    wy, wx = _tent_matrix(n, ny_nodes), _tent_matrix(n, nx_nodes)
    ref = np.zeros((n, n))
    for j, xn in enumerate(nx_nodes):
        filt, _, _ = decorrelate(D, V, k.kernel_image(xn, 0), svar, tvar)  # kernel independent of y
        ref += wx[:, j][None, :] * filt * wy.sum(axis=1)[:, None]
    assert np.abs(out - ref).max() < 1e-3 * np.sqrt(var.mean())
    jumps = np.abs(np.diff(out, axis=1)).mean(axis=0)
    edges = nx_nodes[1:-1] - 1
    assert jumps[edges].max() < 1.1 * np.median(jumps)


@pytest.mark.parametrize("template_matched", [True, False])
def test_decorrelated_psf_follows_the_spatially_varying_filter(template_matched):
    """Point sources (Gaussian PSF σ = 2) on an otherwise empty difference, decorrelated with the BlendKernel
    filter grid: the stamp each source becomes is :class:`DecorrelatedPsf` with the grid's ``nodes`` at its
    position (max residual < 0.5 % of the peak, 0.1–0.3 % measured: the blend weights change across a stamp),
    whereas the one centre filter misses by 32–39 % of the peak near the edges of the field. With the variances
    swapped, a convolved science (``template_matched=False``) has the same filters: both paths agree."""
    from diffim.decorrelated_psf import DecorrelatedPsf
    from diffim.decorrelation import spatial_decorrelation_nodes

    n, svar, tvar, step, half = 512, 1.0, 30.0, 128, 12
    k = BlendKernel(n)
    if not template_matched:  # a convolved science: its variance is the one multiplied by |K̂|²
        svar, tvar = tvar, svar
    base = GaussianPsf(2.0, 2 * half + 1)
    stamp = base.compute_kernel_image()
    D = np.zeros((n, n))
    xs = [40, 200, 256, 330, 470]
    for x in xs:
        D[256 - half : 256 + half + 1, x - half : x + half + 1] += stamp
    out, _, _ = decorrelate_spatial(D, np.ones_like(D), k, svar, tvar, cell_step=step,
                                    template_matched=template_matched)
    nodes = spatial_decorrelation_nodes(k, svar, tvar, D.shape, cell_step=step)
    kc = k.kernel_image(n / 2, n / 2)
    grid = DecorrelatedPsf(base, kc, svar, tvar, template_matched=template_matched, nodes=nodes, cache_step=0)
    centre = DecorrelatedPsf(base, kc, svar, tvar, template_matched=template_matched, cache_step=0)
    worst_centre = 0.0
    for x in xs:
        got = out[256 - half : 256 + half + 1, x - half : x + half + 1]
        got = got / got.sum()
        peak = got.max()
        assert np.abs(got - grid.compute_kernel_image(x, 256)).max() < 5e-3 * peak, x
        worst_centre = max(worst_centre, np.abs(got - centre.compute_kernel_image(x, 256)).max() / peak)
    assert worst_centre > 0.2


def test_decorrelated_psf_with_nodes_survives_a_fits_round_trip(tmp_path):
    """A difference written with a grid DecorrelatedPsf reads back with the same grid and the same PSF at the
    field's edges and centre (a reader that dropped the nodes would return the centre filter everywhere)."""
    from diffim import read_exposure, write_exposure
    from diffim.decorrelated_psf import DecorrelatedPsf
    from diffim.decorrelation import spatial_decorrelation_nodes

    n = 300
    k = BlendKernel(n, x0=1000)
    nodes = spatial_decorrelation_nodes(k, 1.0, 30.0, (n, n), xy0=(1000, 50), cell_step=100)
    psf = DecorrelatedPsf(GaussianPsf(2.0, 21), k.kernel_image(1150, 200), 1.0, 30.0, nodes=nodes)
    exp = Exposure(image=np.zeros((n, n), np.float32), variance=np.ones((n, n), np.float32), xy0=(1000, 50),
                   psf=psf)
    write_exposure(exp, tmp_path / "d.fits")
    back = read_exposure(tmp_path / "d.fits").psf
    assert isinstance(back, DecorrelatedPsf) and back.nodes.shape == nodes.shape == (4, 4)
    assert np.array_equal(back.nodes.x, nodes.x) and np.array_equal(back.nodes.y, nodes.y)
    for x, y in ((1000, 50), (1299, 349), (1150, 200)):
        assert np.allclose(back.compute_kernel_image(x, y), psf.compute_kernel_image(x, y), atol=1e-12)
    assert not np.allclose(back.compute_kernel_image(1000, 50), back.compute_kernel_image(1299, 50), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("svar,tvar", [(0.04, 0.04), (0.04, 0.08), (0.08, 0.04)])
def test_spatial_task_both_modes_agree(svar, tvar):
    """lsst_tests §5 testDiffimCorrection_spatialTask: spatiallyVarying False and True each pass the LSST checks
    and their pixel variances agree to 3 %."""
    pix = []
    for spatial in (False, True):
        science, template = make_pair(svar, tvar)
        diff = make_diff(science, template, lsst_matching_kernel())
        out = DecorrelateALKernelSpatialTask().run(science, template, diff, lsst_matching_kernel(),
                                                   spatiallyVarying=spatial).correctedExposure
        p, vm = pixel_variance(out.image), clipped_mean(out.variance)
        assert p == pytest.approx(svar + tvar, rel=0.05)
        assert vm == pytest.approx(svar + tvar, rel=0.02)
        assert p == pytest.approx(vm, rel=0.05)
        assert isinstance(out.psf, ImagePsf)
        assert out.psf.fwhm() < GaussianPsf(PSF_SCI).fwhm()
        pix.append(p)
    assert pix[0] == pytest.approx(pix[1], rel=0.03)


def test_task_psf_update_masks_and_nan_template():
    science, template = make_pair(0.04, 0.04, n=128, n_sources=0)
    science.mask.set("DETECTED", np.eye(128, dtype=bool))
    diff = make_diff(science, template, lsst_matching_kernel())
    diff.mask.array[3, 3] = 1
    mask_before = diff.mask.array.copy()
    task = DecorrelateALKernelTask()
    task.run(science, template, diff, lsst_matching_kernel())
    assert np.array_equal(diff.mask.array, mask_before)  # mask unchanged
    assert isinstance(diff.psf, ImagePsf) and diff.psf.kernel.shape == (25, 25)
    assert task.metadata["svar"] == pytest.approx(0.04, rel=1e-6)
    # an all-NaN template: the difference is returned unchanged
    nan_tmpl = Exposure(image=np.full((128, 128), np.nan), variance=np.full((128, 128), np.nan),
                        psf=GaussianPsf(PSF_TMPL, 25))
    diff2 = make_diff(science, template, lsst_matching_kernel())
    before = diff2.image.copy()
    res = DecorrelateALKernelTask().run(science, nan_tmpl, diff2, lsst_matching_kernel())
    assert np.array_equal(res.correctedExposure.image, before)


def test_spatial_task_with_varying_kernel_object_and_offset_origin():
    """A kernel object with ``kernel_image(x, y)`` in parent coordinates and an exposure whose xy0 ≠ 0."""
    n = 512
    D, V, k = _varying_scene(n, 1.0, 30.0, seed=8)
    k.x0 = 1000
    xy0 = (1000, 2000)
    diff = Exposure(image=D, variance=V, xy0=xy0, psf=GaussianPsf(1.5, 15))
    sci = Exposure(image=np.zeros((n, n)), variance=np.full((n, n), 1.0), xy0=xy0, psf=GaussianPsf(1.5, 15))
    tmpl = Exposure(image=np.zeros((n, n)), variance=np.full((n, n), 30.0), xy0=xy0, psf=GaussianPsf(1.0, 15))
    out = DecorrelateALKernelSpatialTask().run(sci, tmpl, diff, k, spatiallyVarying=True).correctedExposure
    for sl in (np.s_[:128, :128], np.s_[:128, -128:], np.s_[-128:, 200:328]):
        assert abs(autocorr(out.image[sl], 1, 0)) < 0.05
        assert np.var(out.image[sl]) == pytest.approx(float(out.variance[sl].mean()), rel=0.06)


def test_accepts_the_al_spatial_kernel_object():
    """The AL ``SpatialKernel`` (basis × spatial polynomial) is used through ``kernel_image(x, y)``: built to
    equal the BlendKernel, it gives the same spatially varying decorrelation."""
    from diffim.psfmatch.basis import KernelBasis
    from diffim.psfmatch.kernel import SpatialFunction, SpatialKernel

    n = 256
    D, V, blend = _varying_scene(n, 1.0, 30.0, seed=4)
    basis = KernelBasis(images=np.stack([blend.ka, blend.kb]))
    coeffs = np.array([[1.0, -1.0 / (n - 1), 0.0], [0.0, 1.0 / (n - 1), 0.0]])  # terms 1, x, y
    spatial = SpatialKernel(basis, coeffs, SpatialFunction(1, kind="polynomial"))
    assert np.allclose(spatial.kernel_image(100.0, 7.0), blend.kernel_image(100.0, 7.0))
    a, va, _ = decorrelate_spatial(D, V, spatial, 1.0, 30.0, cell_step=128)
    b, vb, _ = decorrelate_spatial(D, V, blend, 1.0, 30.0, cell_step=128)
    assert np.allclose(a, b, atol=1e-5) and np.allclose(va, vb, rtol=1e-5)


def test_constant_filter_variance_plane_follows_the_local_kernel():
    """A kernel whose noise gain differs across the field (sharp on the left: Σκ² = 0.16; broad on the right,
    where the centre is: 0.011), decorrelated with the centre filter: the variance plane uses the local
    kernel's factor, so D/√V has unit std on both halves (to 4 %, ≈ 20 000 pixels each), while the centre
    factor alone understates the left half's noise by > 30 %."""
    n = 256
    rng = np.random.default_rng(3)
    svar, tvar = 1.0, 9.0
    sci = rng.normal(0, np.sqrt(svar), (n, n))
    tmpl = rng.normal(0, np.sqrt(tvar), (n, n))
    k_left, k_right = gaussian_kernel(0.7, 21), gaussian_kernel(2.5, 21)
    matched = np.where(np.arange(n)[None, :] < n // 2, periodic_correlate(tmpl, k_left),
                       periodic_correlate(tmpl, k_right))
    diff = Exposure(image=(sci - matched).astype(np.float32), variance=np.full((n, n), 1.0, np.float32),
                    psf=GaussianPsf(2.0, 25))
    science = Exposure(image=sci.astype(np.float32), variance=np.full((n, n), svar, np.float32), psf=GaussianPsf(2.0, 25))
    template = Exposure(image=tmpl.astype(np.float32), variance=np.full((n, n), tvar, np.float32),
                        psf=GaussianPsf(1.0, 25))

    class HalfKernel:
        def kernel_image(self, x, y):
            return k_left if x < n // 2 else k_right

    ratios = {}
    for name, kernel in (("local", HalfKernel()), ("centre", k_right)):
        out = DecorrelateALKernelTask().run(science, template, diff.copy(), kernel, xcen=n / 2 + 10, ycen=n / 2)
        d = out.correctedExposure
        z = d.image / np.sqrt(d.variance)
        ratios[name] = (float(np.std(z[32:-32, 24:n // 2 - 24])), float(np.std(z[32:-32, n // 2 + 24:-24])))
    assert abs(ratios["local"][0] - 1) < 0.04 and abs(ratios["local"][1] - 1) < 0.04, ratios
    assert ratios["centre"][0] > 1.3, ratios


def test_invalid_border_does_not_leak_into_the_score():
    """Garbage in the EDGE border (a bad edge column under a convolution's border) must not reach the valid
    pixels through the pre-convolution filter: ``invalid`` pixels are not used (a border of them is mirrored).
    Without it, coherent ±1000-count columns there striped the score 20 px inwards (±2σ column medians)."""
    rng = np.random.default_rng(5)
    n = 256
    kappa = gaussian_kernel(SIG_K, 21)
    pre = gaussian_kernel(PSF_SCI, 21)
    clean = rng.normal(0.0, 10.0, (n, n)).astype(np.float32)
    var = np.full((n, n), 100.0, np.float32)
    dirty = clean.copy()
    dirty[:, 1:5] += np.array([-660.0, 1500.0, -900.0, 400.0], np.float32)  # coherent garbage columns
    border = np.zeros((n, n), bool)
    border[:, :10] = border[:, -10:] = border[:10] = border[-10:] = True
    kw = dict(template_matched=True, preconv_kernel=pre)
    ref, _, _ = decorrelate(clean, var, kappa, 100.0, 100.0, invalid=border, **kw)
    out, _, _ = decorrelate(dirty, var, kappa, 100.0, 100.0, invalid=border, **kw)
    leak, _, _ = decorrelate(dirty, var, kappa, 100.0, 100.0, **kw)
    inner = (slice(10, n - 10), slice(10, n - 10))
    noise = float(np.std(ref[inner]))
    assert np.max(np.abs(out[inner] - ref[inner])) == 0.0  # the border's values are not used at all
    # (the check has teeth: filtering the garbage itself moves the valid pixels next to it by many σ)
    assert np.max(np.abs(leak[inner] - ref[inner])) > 1.0 * noise


@pytest.mark.slow
def test_spatially_varying_decorrelation_of_a_convolved_science_gives_unit_pulls():
    """doSpatiallyVarying with convolveTemplate=False on a simulated 1024² pair (template broader, PSFs varying
    across the field): the difference's PSF is blended from the filter grid, so PSF fluxes of the transients
    scatter as their errors say. With the centre filter everywhere the pull std was 1.57 (1.30, 1.69 on
    seeds 1, 2); now 0.97 (1.00, 1.14)."""
    from diffim.metrics import evaluate
    from diffim.sim import simulate_pair
    from diffim.tasks.image_difference import ImageDifferenceConfig, ImageDifferenceTask

    pair = simulate_pair(size=1024, seed=0, template_psf="broader")
    config = ImageDifferenceConfig()
    config.doSpatiallyVarying = True
    config.convolveTemplate = False
    res = ImageDifferenceTask(config=config).run(exposure=pair.science.copy(), templateExposure=pair.template.copy())
    assert res.subtractedExposure.psf.nodes is not None
    e = evaluate(res.subtractedExposure, res.diaSources, pair.truth, flux_unit_scale=res.subtractedExposure.photo_calib)
    assert e["n_pull"] >= 40
    assert 0.8 < e["pull_std"] < 1.25, e["pull_std"]
    assert abs(e["flux_bias"]) < 0.01


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("template_matched", [True, False])
def test_bad_column_of_the_unconvolved_image_is_not_filtered(spatial, template_matched):
    """A bad column keeps its garbage in the image that enters the difference unconvolved (the convolution fills
    the other image's BAD pixels). The filter spread it over the neighbouring pixels (here +28σ on average within
    4 px; on a sky-50 simulation its negative side lobes left a −0.8σ trough and 85 DIA sources along the
    column); its pixels are now left out. The convolved image's BAD plane, grown over the kernel box, holds sane values:
    those pixels are still filtered."""
    n, col = 256, 128
    science, template = make_pair(0.04, 0.04, n=n, n_sources=0, seed=7)
    unconv = science if template_matched else template
    unconv.mask.set("BAD", np.zeros((n, n), bool))
    unconv.image[:, col] += 1000.0 * np.sqrt(0.04)
    unconv.mask.array[:, col] |= unconv.mask.bitmask(["BAD"])
    kernel = lsst_matching_kernel()
    if template_matched:
        diff = make_diff(science, template, kernel)
    else:  # template − κ ⊗ science, the template's PSF
        d = make_diff(template, science, kernel)
        diff = Exposure(image=-d.image, variance=d.variance, psf=template.psf)
    diff.mask.array[:, col] |= diff.mask.bitmask(["BAD"])
    # The convolved image's bad pixels: flagged over a kernel box in the difference, values sane.
    diff.mask.array[40:60, 20:40] |= diff.mask.bitmask(["BAD"])
    clean = diff.image.copy()
    clean[:, col] -= (1.0 if template_matched else -1.0) * 1000.0 * np.sqrt(0.04)
    out = DecorrelateALKernelSpatialTask().run(science, template, diff, kernel, spatiallyVarying=spatial,
                                               templateMatched=template_matched).correctedExposure
    z = out.image / np.sqrt(out.variance)
    beside = np.concatenate([z[20:-20, col + o] for o in (-4, -3, -2, -1, 1, 2, 3, 4)])
    assert abs(float(np.mean(beside))) < 0.05, np.mean(beside)  # 27.6 when the column is filtered
    # The column itself holds the filtered replacement (≈ 0), not +1000σ.
    assert np.max(np.abs(z[20:-20, col])) < 6.0
    # Pixels flagged BAD in the difference only (the convolved image's grown mask) are filtered as before:
    # the same output as decorrelating the garbage-free difference there.
    ref = clean.copy()
    diff2 = Exposure(image=ref, variance=diff.variance.copy(), psf=diff.psf)
    diff2.mask.array[...] = diff.mask.array
    out2 = DecorrelateALKernelSpatialTask().run(science, template, diff2, kernel, spatiallyVarying=spatial,
                                                templateMatched=template_matched).correctedExposure
    far = (slice(45, 55), slice(25, 35))
    assert np.allclose(out.image[far], out2.image[far], atol=1e-3 * float(np.std(out2.image)))
    assert np.std(out.image[far] - clean[far]) > 0.05 * np.std(clean)  # filtered, not passed through
