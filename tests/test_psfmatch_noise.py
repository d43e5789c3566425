"""Template-noise (errors-in-variables) correction of the AL kernel fit and the noise autocorrelation it uses.

The least-squares kernel of ``S ≈ corr(K, T)`` is biased when ``T`` is noisy: ``E[CᵀC]`` carries the noise
term ``Σ_u B_i(u) B_j(u) V_T`` (a ridge on ``‖K‖²``), which pulls the kernel towards a smoothing one. Scenes
are rendered with ``tests/test_psfmatch._render`` so the noiseless fit ``K0`` is the reference: the bias is a
systematic difference from ``K0``, the same sign for every seed.
"""

import math

import numpy as np
import pytest
from scipy import ndimage

from diffim.model import MaskedImage
from diffim.psfmatch import make_kernel_basis_list, make_kernel_candidates, solve_psf_matching
from diffim.psfmatch.basis import alard_lupton_basis
from diffim.psfmatch.noise import noise_correlation
from diffim.psfmatch.solve import template_noise_matrix
from diffim.tasks.image_psf_match import ImagePsfMatchConfig, ImagePsfMatchTask

from test_psfmatch import FWHM, _exposure, _render, _stars

#: 3×3 smoothing that correlates white noise like a resampling would: ρ(1, 0) = 2a/(1 + 4a²), ρ(1, 1) = 2a²/(1 + 4a²).
A = 0.3
K3 = np.array([[0, A, 0], [A, 1, A], [0, A, 0]]) / math.sqrt(1 + 4 * A * A)


def _correlated_noise(rng, shape, sigma):
    return ndimage.convolve(rng.normal(size=shape), K3, mode="wrap") * sigma


def test_noise_correlation_white_and_correlated():
    """White noise gives ρ = δ; noise smoothed by K3 gives its analytic autocorrelation.

    512² pixels (≳150 000 usable after the source cut): the estimate's scatter is ~1/√N ≈ 0.003, and the 17-px
    running-mean background removes ~Σρ/289 ≲ 0.01; 0.03 tolerates both while a shift or normalisation error
    (e.g. ρ(1,0) read at lag 2, or at 0.44 for white noise) fails by ≥ 0.1.
    """
    rng = np.random.default_rng(5)
    xs, ys, fs = _stars(60, 512, 1, fmin=2e3, fmax=2e4)
    stars = _render((512, 512), xs, ys, fs, 1.5)
    var = np.full((512, 512), 4.0)
    white = noise_correlation(stars + rng.normal(size=var.shape) * 2.0, var)
    delta = np.zeros((5, 5))
    delta[2, 2] = 1
    assert white.shape == (5, 5)
    assert np.abs(white - delta).max() < 0.03
    corr = noise_correlation(stars + _correlated_noise(rng, var.shape, 2.0), var)
    truth = ndimage.correlate(np.pad(K3, 2), K3, mode="constant")[1:-1, 1:-1]
    truth /= truth[2, 2]
    assert corr[2, 3] == pytest.approx(2 * A / (1 + 4 * A * A), abs=0.03)
    assert np.abs(corr - truth).max() < 0.03
    assert np.allclose(corr, corr[::-1, ::-1])  # symmetric by construction
    # A noiseless image has no noise to correct for, whatever its variance plane claims.
    assert noise_correlation(stars, var, return_scale=True)[1] == 0.0


@pytest.mark.parametrize("correlated", [False, True])
def test_template_noise_matrix_matches_monte_carlo(correlated):
    """For pure-noise stamps the mean of ``CᵀC / w`` equals :func:`template_noise_matrix`.

    300 stamps × 529 valid pixels: each element's Monte-Carlo error is ≲ 1 % of the diagonal scale (≈ 2 % for
    correlated noise); tolerance 5 %. Ignoring the correlation would be off by up to ~(1 + 2ρ₁)² ≈ 3× on the
    wide Gaussians.
    """
    rng = np.random.default_rng(2)
    basis = alard_lupton_basis(21, (0.7, 1.5, 3.0), (4, 2, 2))
    nc, H, sigma = 300, 43, 3.0
    if correlated:
        T = np.stack([_correlated_noise(rng, (H + 8, H + 8), sigma)[4:-4, 4:-4] for _ in range(nc)])
        rho = ndimage.correlate(np.pad(K3, 2), K3, mode="constant")[1:-1, 1:-1]
        rho /= rho[2, 2]
    else:
        T = rng.normal(size=(nc, H, H)) * sigma
        rho = None
    VT = np.full((nc, H, H), sigma**2)
    w = np.full(nc, 2 * sigma**2)
    cols = basis.correlate_stamps(T)
    emp = np.einsum("cpi,cpj->ij", cols, cols) / nc / w[0]
    model = template_noise_matrix(basis, VT, w, rho).mean(axis=0)
    scale = np.sqrt(np.outer(np.diag(model), np.diag(model)))
    assert np.abs(emp - model).max() < 0.05 * scale.max()
    assert np.abs((emp - model) / scale).max() < 0.1
    # The delta-function fast path equals the generic basis-product formula.
    from diffim.psfmatch.basis import KernelBasis, delta_function_basis

    df = delta_function_basis(7)
    generic = KernelBasis(df.images.copy())
    vt = rng.uniform(1.0, 2.0, (3, 19, 19))
    assert np.allclose(template_noise_matrix(df, vt, w[:3], rho), template_noise_matrix(generic, vt, w[:3], rho))
    # Per-pixel weights give the same matrix when they are constant.
    per_pix = template_noise_matrix(basis, VT[:3], np.full((3, 23, 23), 1 / w[0]), rho)
    assert np.allclose(per_pix, template_noise_matrix(basis, VT[:3], w[:3], rho))


def _scene(seed, correlated=False, size=256, sigma_psf=0.9, noise=10.0):
    """Identical, nearly undersampled PSFs (σ = 0.9 px) and equally noisy images: the true kernel is a delta."""
    rng = np.random.default_rng(seed)
    xs, ys, fs = _stars(150, size, seed, fmin=1e3, fmax=3e4)
    img = _render((size, size), xs, ys, fs, sigma_psf)
    var = np.full(img.shape, noise**2)
    tn = _correlated_noise(rng, img.shape, noise) if correlated else rng.normal(size=img.shape) * noise
    T = MaskedImage(img + tn, variance=var)
    S = MaskedImage(img + rng.normal(size=img.shape) * noise, variance=var.copy())
    return T, S, MaskedImage(img, variance=var.copy()), np.c_[xs, ys, fs]


def _kernel(T, S, sources, **kw):
    basis, _ = make_kernel_basis_list(0.9 * FWHM, 0.9 * FWHM)
    cands, _ = make_kernel_candidates(sources, S, T, basis.size)
    sol = solve_psf_matching(T, S, cands, basis, spatial_kernel_order=1, n_star_per_cell=-1, **kw)
    return sol.kernel.kernel_image(128, 128), sol


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_correction_removes_kernel_shrinkage(seed):
    """Template as noisy as the science, sharp PSFs: plain least squares shrinks the kernel by 8–9 % (‖K − K0‖
    / ‖K0‖, same sign for every seed: the ridge ``σ_T² ‖K‖²``); the corrected fit is within 2 % of the
    noiseless one (measured 0.2–0.4 %)."""
    T, S, clean, src = _scene(seed)
    k0, _ = _kernel(clean, clean, src)
    plain, _ = _kernel(T, S, src)
    fixed, sol = _kernel(T, S, src, template_noise_correction=True)
    err = lambda k: np.linalg.norm(k - k0) / np.linalg.norm(k0)  # noqa: E731
    h = k0.shape[0] // 2
    assert err(plain) > 0.04 and plain[h, h] < k0[h, h] - 0.03  # the bias exists: a smoother kernel
    assert err(fixed) < 0.02
    assert sol.metadata["nTemplateNoiseCorrectedModes"] > 0


def test_noise_correction_uses_the_noise_correlation():
    """Correlated template noise (ρ₁ ≈ 0.44, as resampled frames): the white-noise correction over-corrects
    the high-frequency kernel directions (‖K − K0‖/‖K0‖ ≈ 10 %), the correction with the measured ρ is within
    2 % (measured 0.7 %)."""
    T, S, clean, src = _scene(0, correlated=True)
    k0, _ = _kernel(clean, clean, src)
    rho = noise_correlation(T.image, T.variance)
    white, _ = _kernel(T, S, src, template_noise_correction=True)
    fixed, _ = _kernel(T, S, src, template_noise_correction=True, noise_correlation=rho)
    err = lambda k: np.linalg.norm(k - k0) / np.linalg.norm(k0)  # noqa: E731
    assert err(white) > 0.05
    assert err(fixed) < 0.02


def test_task_measures_noise_correlation_and_corrects():
    """ImagePsfMatchTask (default ``templateNoiseCorrection=True``) measures ρ on the convolved image and its
    difference has smaller residuals on the bright stars than without the correction (sharp PSFs, equal
    noise): the mean χ²/pixel in 7×7 boxes on the 20 brightest stars drops and stays near 1."""
    T, S, _, src = _scene(3)
    tmpl = _exposure(np.asarray(T.image), 100.0, 0.9)
    sci = _exposure(np.asarray(S.image), 100.0, 0.9)
    assert ImagePsfMatchConfig().templateNoiseCorrection
    out = {}
    for on in (False, True):
        cfg = ImagePsfMatchConfig()
        cfg.templateNoiseCorrection = on
        task = ImagePsfMatchTask(config=cfg)
        diff = task.subtractExposures(tmpl, sci).subtractedExposure
        bright = np.argsort(-src[:, 2])[:20]
        chi = []
        for x, y in src[bright, :2]:
            ix, iy = int(round(x)), int(round(y))
            s = (slice(iy - 3, iy + 4), slice(ix - 3, ix + 4))
            chi.append(float((diff.image[s] ** 2 / diff.variance[s]).mean()))
        out[on] = (float(np.mean(chi)), task.metadata)
    assert "templateNoiseCorrelation1" in out[True][1] and abs(out[True][1]["templateNoiseCorrelation1"]) < 0.03
    assert out[True][0] < out[False][0]
    assert out[True][0] < 1.5


def test_correction_uses_the_measured_noise_level():
    """A template variance plane 2.5× too large: trusting it over-corrects (‖K − K0‖/‖K0‖ > 10 %, worse than no
    correction), while the measured covariance (``noise_correlation(..., return_scale=True)``: scale ≈ 0.4)
    keeps the corrected kernel within 2 % of the noiseless one. The scale is measured to ~3 % (robust
    variance of the background pixels; the source cut and running-mean background bias it slightly low)."""
    T, S, clean, src = _scene(1)
    k0, _ = _kernel(clean, clean, src)
    T2 = MaskedImage(T.image, variance=T.variance * 2.5)
    rho, scale = noise_correlation(T2.image, T2.variance, return_scale=True)
    assert scale == pytest.approx(0.4, rel=0.04)
    err = lambda k: np.linalg.norm(k - k0) / np.linalg.norm(k0)  # noqa: E731
    trusted, _ = _kernel(T2, S, src, template_noise_correction=True)
    measured, _ = _kernel(T2, S, src, template_noise_correction=True, noise_correlation=rho * scale)
    assert err(trusted) > 0.1
    assert err(measured) < 0.02


@pytest.mark.parametrize("constant_first_term", [False, True])
def test_delta_function_noise_spatial_matrix_equals_dense(constant_first_term):
    """The compact delta-function noise gives the same spatial noise matrix ``Σ_c P_cᵀ N_c P_c`` as the dense
    ``(nc, N, N)`` stack through :meth:`SpatialDesign.normal_equations` (to rounding), with and without a
    constant first term and with a background."""
    from diffim.model import Box
    from diffim.psfmatch.basis import delta_function_basis
    from diffim.psfmatch.kernel import SpatialFunction
    from diffim.psfmatch.solve import DeltaFunctionNoise, SpatialDesign

    rng = np.random.default_rng(0)
    basis, nc, box = delta_function_basis(5), 12, Box(0, 0, 100, 100)
    vt, w = rng.uniform(1, 2, (nc, 15, 15)), rng.uniform(1, 2, nc)
    rho = np.array([[0.1, 0.3, 0.05], [0.35, 1, 0.35], [0.05, 0.3, 0.1]])
    rho = 0.5 * (rho + rho[::-1, ::-1])
    design = SpatialDesign(rng.uniform(0, 100, nc), rng.uniform(0, 100, nc), len(basis), SpatialFunction(1, box),
                           SpatialFunction(2, box), constant_first_term)
    compact = template_noise_matrix(basis, vt, w, rho, compact=True)
    assert isinstance(compact, DeltaFunctionNoise)
    full = np.zeros((nc, 26, 26))
    full[:, :25, :25] = template_noise_matrix(basis, vt, w, rho)
    dense = design.normal_equations(full, np.zeros((nc, 26)))[0]
    assert np.allclose(compact.spatial_matrix(design, 25), dense, rtol=1e-10, atol=1e-10 * np.abs(dense).max())


def test_correction_gain_follows_the_measured_bias():
    """The per-direction gain of the correction (:func:`diffim.psfmatch.solve._correction_gains`).

    Limits: an unmeasured component (``c² ≤ s²``) or a noise-dominated direction (``f`` below
    ``MIN_SIGNAL_FRACTION``) keeps plain least squares (gain 1); a component measured far above its noise gets the
    full ``1/f``; without a noise estimate the full correction applies. Monte Carlo of ``c = f φ + ε`` (ε ~ N(0, 1),
    10⁵ draws) with the loss ``f (g c − φ)²`` (squared residual of the candidates' noiseless signal): where the
    direction holds no true component (φ = 0) the shrunk gain costs ≈ 0.35× the full correction's noise
    amplification (which is what biased the mixed-seeing and pre-convolved fits), and where the component is
    measured at 10σ it is within 5 % of the full correction and ≪ plain least squares (bias (1 − f)φ).
    """
    from diffim.psfmatch.solve import MIN_SIGNAL_FRACTION, _correction_gains

    f = np.array([0.5, 0.5, 0.5, 0.5 * MIN_SIGNAL_FRACTION])
    c = np.array([0.0, 0.9, 1e6, 1e6])
    assert np.allclose(_correction_gains(f, c, 1.0), [1.0, 1.0, 2.0, 1.0])
    assert np.allclose(_correction_gains(f, c, None), [2.0, 2.0, 2.0, 1.0])
    g = _correction_gains(np.full(50, 0.5), np.linspace(0, 10, 50), 1.0)
    assert np.all(np.diff(g) >= 0) and g.min() >= 1.0 and g.max() <= 2.0

    rng = np.random.default_rng(0)
    eps = rng.normal(size=100_000)
    for frac in (0.15, 0.3):
        ff = np.full(eps.shape, frac)
        for snr in (0.0, 10.0):
            phi = snr / frac
            c = frac * phi + eps
            loss = lambda g: float(np.mean(frac * (g * c - phi) ** 2))  # noqa: E731
            shrunk, full, plain = loss(_correction_gains(ff, c, 1.0)), loss(1.0 / frac), loss(1.0)
            if snr == 0.0:
                assert shrunk < 0.45 * full
            else:
                assert shrunk < 1.05 * full and shrunk < 0.05 * plain
