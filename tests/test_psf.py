"""Tests of diffim.psf: PSFEx files, the pixel-basis PSF, star selection and PSF estimation."""

from __future__ import annotations

import numpy as np
import pytest

from diffim.model import GaussianPsf
from diffim.psf import PsfexPsf, read_psfex
from diffim.psf.psfex import write_psfex
from diffim.psf.varying import polynomial_terms


def _gauss_grid(n: int, sigma: float) -> np.ndarray:
    h = n // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    return np.exp(-0.5 * (x * x + y * y) / sigma**2)


def test_convolved_psf_varies_as_its_base():
    """ConvolvedPsf of a Gaussian whose FWHM varies ±30 % across the field with a Gaussian of σ 1.5: σ² adds at
    every position (the pre-convolved science of score detection), and it is odd-sized with unit sum."""
    from diffim.model import Box
    from diffim.model.psf import ConvolvedPsf
    from diffim.testing.psfs import VaryingGaussianPsf

    base = VaryingGaussianPsf(4.0, (0.3, 0.0), bbox=Box(0, 0, 1000, 1000))
    psf = ConvolvedPsf(base, _gauss_grid(15, 1.5))
    for x in (0.0, 500.0, 999.0):
        k = psf.compute_kernel_image(x, 500.0)
        assert k.shape[0] % 2 == 1 and k.sum() == pytest.approx(1.0)
        assert psf.sigma(x, 500.0) == pytest.approx(np.hypot(base.sigma(x, 500.0), 1.5), rel=0.01)
    assert psf.sigma(999.0, 500.0) > 1.2 * psf.sigma(0.0, 500.0)
    assert psf.average_position == base.average_position


def test_polynomial_terms_psfex_order():
    """Degree 2 terms are 1, u, u², v, uv, v² (u fastest), as PSFEx orders its basis."""
    t = polynomial_terms(np.array([2.0]), np.array([3.0]), 2)[0]
    assert np.allclose(t, [1, 2, 4, 3, 6, 9])


@pytest.mark.parametrize("samp", [1.0, 0.5])
def test_read_psfex_synthetic(tmp_path, samp):
    """A synthetic PSFEx file interpolating between Gaussians σ=1.6 (u=−1) and σ=2.4 (u=+1) along x.

    Sampled every ``samp`` image pixels (σ/samp on the PSFEx grid); after resampling to image pixels, the kernel
    at u=±1 must match the pixel-sampled Gaussian to 2e-3 of its peak (cubic-spline interpolation error of a
    well-sampled Gaussian). The xy0 and 1-based X_IMAGE conventions are checked exactly on the polynomial
    terms (an off-by-one would give u = -0.99 instead of -1).
    """
    n = 41
    ga = _gauss_grid(n, 1.6 / samp)
    gb = _gauss_grid(n, 2.4 / samp)
    ga /= ga.sum()
    gb /= gb.sum()
    basis = np.stack([(ga + gb) / 2, (gb - ga) / 2, np.zeros_like(ga)])
    path = tmp_path / "model.psf"
    write_psfex(path, basis, degree=1, polzero=(501.0, 301.0), polscal=(100.0, 100.0), psf_samp=samp, psf_fwhm=4.7)
    psf = read_psfex(path, xy0=(10, 20))
    assert isinstance(psf, PsfexPsf) and psf.psf_fwhm == pytest.approx(4.7)
    # X_IMAGE = x - x0 + 1 → u = -1 at X_IMAGE = 401 → x = 410; v = 0 at Y_IMAGE = 301 → y = 320.
    assert np.allclose(psf.coefficients(410.0, 320.0)[0], [1.0, -1.0, 0.0], atol=1e-12)
    for x, sigma in ((410.0, 1.6), (610.0, 2.4)):
        k = psf.compute_kernel_image(x, 320.0)
        h = k.shape[0] // 2
        ref = GaussianPsf(sigma, size=2 * h + 1).compute_kernel_image()
        assert np.max(np.abs(k - ref)) < 2e-3 * ref.max()
        assert psf.fwhm(x, 320.0) == pytest.approx(2.35482 * sigma, rel=0.01)
    assert psf.fwhm(410.0, 320.0) < psf.fwhm(510.0, 320.0) < psf.fwhm(610.0, 320.0)


def test_psfex_constant_model(tmp_path):
    """POLNAXIS = 0: a single basis image, constant over the field."""
    g = _gauss_grid(25, 2.0)
    write_psfex(tmp_path / "c.psf", g[None], degree=0)
    psf = read_psfex(tmp_path / "c.psf")
    assert np.allclose(psf.compute_kernel_image(0, 0), psf.compute_kernel_image(1000, 2000))
    assert psf.fwhm() == pytest.approx(2.35482 * 2.0, rel=1e-3)


def test_psfex_round_trip_through_exposure_file(tmp_path):
    """A PsfexPsf attached to an exposure survives write_exposure/read_exposure."""
    from diffim.io import read_exposure, write_exposure
    from diffim.model import Exposure

    g = _gauss_grid(25, 2.0)
    write_psfex(tmp_path / "c.psf", np.stack([g, 0.1 * g, -0.05 * g]), degree=1, polzero=(50, 50), polscal=(50, 50))
    psf = read_psfex(tmp_path / "c.psf")
    exp = Exposure(image=np.zeros((100, 100), np.float32), psf=psf)
    write_exposure(exp, tmp_path / "e.fits")
    back = read_exposure(tmp_path / "e.fits")
    assert isinstance(back.psf, PsfexPsf) and back.psf.psf_samp == 1.0
    for pos in ((0, 0), (50, 50), (99, 20)):
        assert np.max(np.abs(back.psf.compute_kernel_image(*pos) - psf.compute_kernel_image(*pos))) < 1e-12


# ----------------------------------------------------------------------------------------------------------
# Star selection
# ----------------------------------------------------------------------------------------------------------
from diffim.errors import PsfEstimationError  # noqa: E402
from diffim.psf.star_selector import improve_cluster, kmeans_widths, object_size_star_selector  # noqa: E402


def test_kmeans_initial_centres_and_median_update():
    """mean0 = sorted(w)[n//10] = 2.0; centres 2.0·(1 + 0.3 k) = 2.0, 2.6, 3.2, 3.8 catch each group exactly."""
    w = np.array([2.0] * 10 + [2.6] * 5 + [3.2] * 3 + [3.8] * 2)
    cluster, centres = kmeans_widths(w)
    assert np.array_equal(cluster, [0] * 10 + [1] * 5 + [2] * 3 + [3] * 2)
    assert np.allclose(centres, [2.0, 2.6, 3.2, 3.8])
    # Ties go to the lowest index: 2.3 is equidistant from 2.0 and 2.6.
    cluster, _ = kmeans_widths(np.array([2.0] * 10 + [2.3]))
    assert cluster[-1] == 0


def test_improve_cluster_clips_outliers():
    """Members ≥ 2 sd from the median leave cluster 0; sd = min(std, 0.741 IQR) resists the outlier itself."""
    rng = np.random.default_rng(3)
    w = np.concatenate([2.0 + 0.02 * rng.standard_normal(50), [2.2]])
    cluster = improve_cluster(w, np.zeros(w.size, int))
    assert cluster[-1] == -1
    assert np.count_nonzero(cluster[:-1] == 0) >= 44  # a 2-sd clip removes ~5 % of a Gaussian


def test_object_size_selector_picks_the_star_locus():
    """Stars (w ≈ 2.0 ± 1 %), galaxies (3–6 px) and CR-like spikes (0.6 px): only stars are chosen.

    Faint stars (S/N < 50) and flagged ones are refused even at the stellar width.
    """
    rng = np.random.default_rng(4)
    n_star, n_gal, n_cr = 200, 60, 30
    w = np.concatenate([2.0 * (1 + 0.01 * rng.standard_normal(n_star)), rng.uniform(3, 6, n_gal), np.full(n_cr, 0.6)])
    flux = np.full(w.size, 1e5)
    err = np.full(w.size, 100.0)
    err[:10] = 1e4  # S/N 10
    bad = np.zeros(w.size, bool)
    bad[10:15] = True
    stars = object_size_star_selector(w, flux, err, bad)
    assert not stars[:15].any()
    assert not stars[n_star:].any()
    assert stars[15:n_star].sum() >= 0.9 * (n_star - 15)


def test_object_size_selector_no_good_sources():
    with pytest.raises(PsfEstimationError, match="No good star candidates"):
        object_size_star_selector(np.array([0.5, 0.6]), np.ones(2), np.ones(2))


def test_star_selector_task_with_lsst_columns():
    """The Task reads LSST column names, honours badFlags and returns the selected rows."""
    from astropy.table import Table

    from diffim.tasks.star_selector import ObjectSizeStarSelectorConfig, ObjectSizeStarSelectorTask

    rng = np.random.default_rng(5)
    w = np.concatenate([1.8 * (1 + 0.01 * rng.standard_normal(40)), rng.uniform(3, 5, 10)])
    cat = Table({
        "base_SdssShape_xx": w**2, "base_SdssShape_yy": w**2,
        "base_PsfFlux_instFlux": np.full(50, 1e5), "base_PsfFlux_instFluxErr": np.full(50, 100.0),
        "base_PixelFlags_flag_saturatedCenter": np.arange(50) == 0,
    })
    config = ObjectSizeStarSelectorConfig()
    assert config.signalToNoiseMin == 50 and config.widthMin == 0.9 and config.widthStdAllowed == 0.15
    res = ObjectSizeStarSelectorTask(config=config).run(cat)
    assert not res.selected[0] and not res.selected[40:].any() and res.selected[1:40].sum() >= 35
    assert len(res.sourceCat) == res.selected.sum()


def test_star_selector_accepts_stars_of_an_undersampled_psf():
    """A PSF of FWHM 1.8 px (width √((Ixx+Iyy)/2) ≈ 0.8 px) is narrower than widthMin (0.9): given the exposure,
    the limit drops to 0.75 × the PSF's width, so the stars are selected and the 0.3-px hot pixels still are not;
    without it (or with a PSF of FWHM 4 px) widthMin stands and no star passes."""
    from astropy.table import Table

    from diffim.errors import DiffimError
    from diffim.model import Exposure
    from diffim.tasks.star_selector import ObjectSizeStarSelectorTask

    rng = np.random.default_rng(6)
    w = np.concatenate([0.8 * (1 + 0.02 * rng.standard_normal(40)), rng.uniform(0.28, 0.32, 10)])
    cat = Table({"base_SdssShape_xx": w**2, "base_SdssShape_yy": w**2,
                 "base_PsfFlux_instFlux": np.full(50, 1e5), "base_PsfFlux_instFluxErr": np.full(50, 100.0)})
    sharp = Exposure(image=np.zeros((64, 64)), variance=np.ones((64, 64)), psf=GaussianPsf(1.8 / 2.3548, size=15))
    res = ObjectSizeStarSelectorTask().run(cat, exposure=sharp)
    assert res.selected[:40].sum() >= 36 and not res.selected[40:].any()
    broad = Exposure(image=np.zeros((64, 64)), variance=np.ones((64, 64)), psf=GaussianPsf(4.0 / 2.3548, size=25))
    for exposure in (None, broad):
        try:
            sel = ObjectSizeStarSelectorTask().run(cat, exposure=exposure).selected
        except DiffimError:  # nothing passes the limits
            sel = np.zeros(50, bool)
        assert not sel[:40].any()


# ----------------------------------------------------------------------------------------------------------
# PSF estimation
# ----------------------------------------------------------------------------------------------------------
from diffim.psf import estimate_psf  # noqa: E402


def _fwhm_errors(psf, true_psf, bbox, margin=0.1):
    errs = []
    for fx in (margin, 0.5, 1 - margin):
        for fy in (margin, 0.5, 1 - margin):
            x = bbox.x0 + fx * (bbox.width - 1)
            y = bbox.y0 + fy * (bbox.height - 1)
            errs.append(psf.fwhm(x, y) / true_psf.fwhm(x, y) - 1)
    return np.array(errs)


def _gaussian_scene(n, n_stars, seed, n_gal=20, n_cr=20):
    """Stars rendered with GaussianPsf whose σ grows linearly with x and y (1.5 → 2.25 px, +50 %), plus
    elongated galaxies (σ 3.5–6 px) and single-pixel cosmic rays the selector must reject; Poisson noise."""
    from diffim.model import Exposure

    rng = np.random.default_rng(seed)
    img = np.zeros((n, n))

    def sigma_at(x, y):
        return 1.5 + 0.5 * x / n + 0.25 * y / n

    def add(stamp, box, f):
        x0, y0, x1, y1 = max(box.x0, 0), max(box.y0, 0), min(box.x1, n), min(box.y1, n)
        img[y0:y1, x0:x1] += f * stamp[y0 - box.y0 : y1 - box.y0, x0 - box.x0 : x1 - box.x0]

    for x, y, f in zip(rng.uniform(10, n - 10, n_stars), rng.uniform(10, n - 10, n_stars), 10 ** rng.uniform(4, 6, n_stars)):
        s = sigma_at(x, y)
        add(*GaussianPsf(s, size=2 * int(np.ceil(5 * s)) + 1).compute_image(x, y), f)
    gal_xy = rng.uniform(20, n - 20, (n_gal, 2))
    for x, y in gal_xy:
        s = rng.uniform(3.5, 6)
        g = GaussianPsf(s, sigma_minor=0.6 * s, theta=rng.uniform(0, 3), size=2 * int(np.ceil(5 * s)) + 1)
        add(*g.compute_image(x, y), 10 ** rng.uniform(4.5, 5.5))
    for x, y in rng.integers(5, n - 5, (n_cr, 2)):
        img[y, x] += rng.uniform(2000, 20000)
    var = img + 100.0
    img += 100.0 + rng.standard_normal(img.shape) * np.sqrt(var)
    exp = Exposure(image=img.astype(np.float32), variance=var.astype(np.float32))

    class TruePsf:
        def fwhm(self, x, y):
            return 2.35482 * sigma_at(x, y)

    return exp, TruePsf(), gal_xy


def test_estimate_psf_own_scene_512():
    """512² Gaussian scene, FWHM varying by 50 % over the field: FWHM recovered within 2 % on a 3×3 grid,
    and no galaxy is used as a star (a galaxy in the fit would bias the FWHM up by several %)."""
    exp, truth, gal_xy = _gaussian_scene(512, 150, seed=0)
    psf = estimate_psf(exp)
    errs = _fwhm_errors(psf, truth, exp.bbox)
    assert np.max(np.abs(errs)) < 0.02, errs
    d = np.hypot(psf.star_positions[:, None, 0] - gal_xy[None, :, 0], psf.star_positions[:, None, 1] - gal_xy[None, :, 1])
    assert d.min() > 2.0
    assert psf.n_stars >= 30


def test_estimate_psf_sim_512():
    """diffim.sim 512² science image (oversampled-pixel Gaussian PSF, FWHM 3.5–4.7 px, saturated stars with
    bleed trails, CRs, galaxies): FWHM within 3 % at 9 positions (few stars at 512², so the degree drops)."""
    from diffim.sim import simulate_pair

    pair = simulate_pair(512, seed=1)
    psf = estimate_psf(pair.science)
    errs = _fwhm_errors(psf, pair.science_psf, pair.science.bbox)
    assert np.max(np.abs(errs)) < 0.03, errs


def test_estimate_psf_on_noise_fails():
    from diffim.model import Exposure

    rng = np.random.default_rng(0)
    exp = Exposure(image=rng.standard_normal((128, 128)).astype(np.float32), variance=np.ones((128, 128), np.float32))
    with pytest.raises(PsfEstimationError):
        estimate_psf(exp)


@pytest.mark.slow
def test_estimate_psf_sim_2048():
    """Done-when: 2048² diffim.sim scene whose FWHM varies by 34 % corner to corner; the estimated PSF matches
    the true FWHM within 2 % at 9 positions (3×3 grid) and the estimate takes a few seconds."""
    import time

    from diffim.sim import simulate_pair

    pair = simulate_pair(2048, seed=1)
    bbox = pair.science.bbox
    tp = pair.science_psf
    assert tp.fwhm(bbox.x1 - 1, bbox.y1 - 1) / tp.fwhm(bbox.x0, bbox.y0) > 1.2
    t0 = time.perf_counter()
    psf = estimate_psf(pair.science)
    elapsed = time.perf_counter() - t0
    errs = _fwhm_errors(psf, tp, bbox)
    assert np.max(np.abs(errs)) < 0.02, errs
    assert elapsed < 10.0


@pytest.mark.slow
def test_estimate_psf_own_scene_2048():
    """2048² Gaussian scene with a 50 % FWHM gradient: FWHM within 2 % at 9 positions."""
    exp, truth, _ = _gaussian_scene(2048, 1500, seed=2, n_gal=200, n_cr=200)
    psf = estimate_psf(exp)
    errs = _fwhm_errors(psf, truth, exp.bbox)
    assert np.max(np.abs(errs)) < 0.02, errs
