"""Tests of the simulator (diffim.sim) and its analytic PSFs (diffim.testing.psfs).

The simulator is the ground truth of every scene test, so these tests check its truth against independent
measurements on its own pixels: aperture photometry of injected sources, the noise actually added against
the VARIANCE plane, PSF shapes against the requested variation, and the bookkeeping (masks, calibrations, WCS).
"""

import math
import time

import numpy as np
import pytest

from diffim.model import Box
from diffim.model.psf import FWHM_PER_SIGMA, kernel_moments
from diffim.sim import simulate_pair
from diffim.testing.psfs import MoffatPsf, VaryingGaussianPsf, VaryingMoffatPsf, moffat_alpha

DEFECTS = ["BAD", "SAT", "CR", "EDGE", "NO_DATA"]


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(768, seed=11)


@pytest.fixture(scope="module")
def sparse_pair():
    """Few, bright stars and many transients: most sources have a clean 30-px neighbourhood."""
    return simulate_pair(
        1024, seed=5, n_stars=150, star_flux_min=3000.0, n_galaxies=15, n_transients=150, n_host_transients=0,
        n_cosmic_rays=5, n_saturated=0,
    )


# ----------------------------------------------------------------------------------------------------------
# PSF classes
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "psf",
    [
        VaryingGaussianPsf(4.0, (0.1, 0.05), bbox=Box(0, 0, 1000, 1000)),
        VaryingGaussianPsf(3.0, (0.1,), axis_ratio=0.6, theta=0.7, bbox=Box(0, 0, 1000, 1000)),
        VaryingMoffatPsf(4.0, (0.0, 0.12), axis_ratio=0.8, theta=-0.3, bbox=Box(0, 0, 1000, 1000)),
        MoffatPsf(3.5, beta=2.5),
    ],
    ids=["gauss", "elliptical-gauss", "moffat", "const-moffat"],
)
def test_psf_kernels_sum_to_one_and_images_are_centred(psf):
    """Kernel images are unit-sum and centred; compute_image puts the centroid at the sub-pixel position.

    The profile is evaluated at the sub-pixel offset directly (no resampling), so the first moment of a
    symmetric profile is exact up to the kernel truncation: ≤ 0.01 px for the 99.5 %-light Moffat stamp.
    """
    for x, y in [(0.0, 0.0), (999.0, 0.0), (500.0, 500.0), (999.0, 999.0)]:
        k = psf.compute_kernel_image(x, y)
        assert k.shape[0] % 2 == 1 and k.shape[0] == k.shape[1]
        assert k.sum() == pytest.approx(1.0, abs=1e-12)
        yy, xx = np.mgrid[: k.shape[0], : k.shape[1]] - k.shape[0] // 2
        assert abs((k * xx).sum()) < 1e-9 and abs((k * yy).sum()) < 1e-9
        for sx, sy in [(0.3, -0.45), (-0.49, 0.2)]:
            img, box = psf.compute_image(x + 100.0 + sx, y + 50.0 + sy)
            assert img.sum() == pytest.approx(1.0, abs=1e-12)
            gy, gx = np.mgrid[box.y0 : box.y1, box.x0 : box.x1]
            assert (img * gx).sum() == pytest.approx(x + 100.0 + sx, abs=0.01)
            assert (img * gy).sum() == pytest.approx(y + 50.0 + sy, abs=0.01)


def test_gaussian_fwhm_at_corners_matches_requested_variation():
    """Measured (adaptive-moment) widths follow fwhm·(1 + c1 u + c2 v) at the corners.

    Pixel integration adds 1/12 px² to the variance; with it the moments must match to 0.3 % — a wrong sign
    or scale of the gradient would be off by ≥ 5 %.
    """
    box = Box(0, 0, 2000, 1000)
    psf = VaryingGaussianPsf(4.0, (0.10, -0.05), bbox=box, oversample=9)
    for x, y, u, v in [(0, 0, -1, -1), (1999, 0, 1, -1), (0, 999, -1, 1), (1999, 999, 1, 1)]:
        # u, v are ±(1 - 1/size) at the corner pixels.
        u, v = (x - 999.5) / 1000.0, (y - 499.5) / 500.0
        want_fwhm = 4.0 * (1 + 0.10 * u - 0.05 * v)
        sigma = want_fwhm / FWHM_PER_SIGMA
        ixx, iyy, ixy = kernel_moments(psf.compute_kernel_image(x, y))
        assert math.sqrt(ixx) == pytest.approx(math.sqrt(sigma**2 + 1 / 12), rel=3e-3)
        assert math.sqrt(iyy) == pytest.approx(math.sqrt(sigma**2 + 1 / 12), rel=3e-3)
        assert abs(ixy) < 1e-3
        # compute_shape is analytic for Gaussians and must agree with the measured moments.
        assert psf.compute_shape(x, y)[0] == pytest.approx(ixx, rel=3e-3)
    assert psf.fwhm(1999, 0) / psf.fwhm(0, 999) > 1.2


def test_elliptical_gaussian_axes():
    """Axis ratio q and angle θ: major/minor σ² = σ_det²/q and σ_det² q, rotated by θ."""
    psf = VaryingGaussianPsf(4.0, axis_ratio=0.5, theta=math.pi / 2, oversample=9)
    ixx, iyy, ixy = kernel_moments(psf.compute_kernel_image(0, 0))
    s2 = (4.0 / FWHM_PER_SIGMA) ** 2
    assert iyy == pytest.approx(s2 / 0.5 + 1 / 12, rel=5e-3)  # major axis along y
    assert ixx == pytest.approx(s2 * 0.5 + 1 / 12, rel=5e-3)
    assert abs(ixy) < 1e-3


def test_moffat_profile_fwhm_and_variation():
    """The Moffat α gives half maximum at r = fwhm/2; the kernel widens with the requested gradient."""
    for beta in (2.5, 3.0, 4.5):
        a = moffat_alpha(4.0, beta)
        assert (1 + (2.0 / a) ** 2) ** (-beta) == pytest.approx(0.5, rel=1e-12)
    psf = VaryingMoffatPsf(4.0, (0.2,), bbox=Box(0, 0, 1000, 1000), size=61)
    r_left = psf.determinant_radius(0, 500)
    r_right = psf.determinant_radius(999, 500)
    # Moffat second moments scale linearly with α at fixed β (the 61-px stamp holds > 99.9 % of the light).
    assert r_right / r_left == pytest.approx(1.2 / 0.8, rel=0.02)


def test_psf_fits_round_trip():
    """to_fits_hdus/from_fits_hdus reproduce the model (registered type, all parameters in cards)."""
    from diffim.model.psf import psf_type_registry

    reg = psf_type_registry()
    for psf in [
        VaryingGaussianPsf(3.3, (0.1, 0.05, 0.01, -0.02, 0.03), axis_ratio=0.8, axis_ratio_coeffs=(0.05, 0.0), theta=0.4, bbox=Box(10, 20, 300, 200)),
        VaryingMoffatPsf(4.1, (0.0, 0.1), beta=3.2, bbox=Box(0, 0, 512, 512)),
        MoffatPsf(3.0),
    ]:
        hdus = psf.to_fits_hdus()
        back = reg[hdus[0].header["PSFTYPE"]].from_fits_hdus(hdus)
        assert type(back) is type(psf)
        for x, y in [(10, 20), (150.5, 99.2)]:
            np.testing.assert_allclose(back.compute_kernel_image(x, y), psf.compute_kernel_image(x, y), rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------
# The scene
# ----------------------------------------------------------------------------------------------------------
def test_deterministic_for_a_seed():
    a = simulate_pair(256, seed=7)
    b = simulate_pair(256, seed=7)
    c = simulate_pair(256, seed=8)
    np.testing.assert_array_equal(a.science.image, b.science.image)
    np.testing.assert_array_equal(a.template.image, b.template.image)
    np.testing.assert_array_equal(np.asarray(a.truth["x"]), np.asarray(b.truth["x"]))
    assert not np.array_equal(a.science.image, c.science.image)


def test_truth_table_columns_and_kinds(pair):
    t = pair.truth
    for col in ["id", "kind", "x", "y", "flux_science", "flux_template", "delta_flux", "snr", "host", "saturated", "isolated"]:
        assert col in t.colnames
    kinds = set(t["kind"])
    assert {"star", "galaxy", "transient", "variable", "mover", "cosmic_ray"} <= kinds
    np.testing.assert_array_equal(t["id"], np.arange(len(t)))
    scale = pair.options["template_scale"]
    np.testing.assert_allclose(t["delta_flux"], t["flux_science"] - t["flux_template"] / scale, rtol=1e-12, atol=1e-9)
    static = np.isin(t["kind"], ["star", "galaxy"])
    np.testing.assert_allclose(t["delta_flux"][static], 0.0, atol=1e-6)
    var = t[t["kind"] == "variable"]
    assert (var["delta_flux"] > 0).any() and (var["delta_flux"] < 0).any()
    tr = t[t["kind"] == "transient"]
    assert np.all(tr["flux_template"] == 0) and np.all(tr["delta_flux"] > 0)
    assert 3.0 <= tr["snr"].min() and tr["snr"].max() <= 100.0 + 1e-9
    hosted = tr[tr["host"] >= 0]
    assert len(hosted) > 0 and np.all(t["kind"][hosted["host"]] == "galaxy")
    movers = t[t["kind"] == "mover"]
    assert len(movers) % 2 == 0
    for m in movers:
        other = t[m["partner"]]
        assert other["kind"] == "mover" and other["partner"] == m["id"]
        assert (m["flux_science"] == 0) != (other["flux_science"] == 0)
    pairs = tr[tr["partner"] >= 0]
    assert len(pairs) == 2 * pair.options["n_transient_pairs"]


def test_snr_column_is_the_psf_optimal_snr(pair):
    """snr = |Δflux|·√ΣP²/σ_sky, recomputed here from the PSF and the sky level (no Poisson term)."""
    t = pair.truth
    o = pair.options
    size = pair.science.width
    for r in t[t["kind"] == "transient"][:10]:
        k = pair.science_psf.compute_image(r["x"], r["y"])[0]
        u = (r["x"] - (size - 1) / 2) / (size / 2)
        v = (r["y"] - (size - 1) / 2) / (size / 2)
        sky = o["science_sky"] + o["science_sky_gradient"][0] * u + o["science_sky_gradient"][1] * v
        assert r["snr"] == pytest.approx(r["delta_flux"] * np.sqrt((k**2).sum()) / np.sqrt(sky / o["gain"]), rel=1e-6)


def test_noise_matches_variance_plane(pair):
    """(image − noiseless model)/√variance has unit std in both images (1 ± 0.02 over ~10⁵–10⁶ pixels)."""
    for exp, model in [(pair.science, pair.science_model), (pair.template, pair.template_model)]:
        good = ~exp.mask.get(DEFECTS)
        z = ((exp.image - model) / np.sqrt(exp.variance))[good]
        assert np.std(z) == pytest.approx(1.0, abs=0.02)
        assert abs(np.mean(z)) < 0.01


def test_template_depth_scale_and_calibration(pair):
    """Template noise in science units is template_depth× lower; static sources agree in nJy."""
    sci, tmpl = pair.science, pair.template
    o = pair.options
    scale = o["template_scale"]
    sig_s = np.sqrt(np.median(sci.variance))
    sig_t = np.sqrt(np.median(tmpl.variance)) / scale
    assert sig_s / sig_t == pytest.approx(o["template_depth"], rel=0.03)
    t = pair.truth[pair.truth["kind"] == "star"]
    np.testing.assert_allclose(
        sci.photo_calib.inst_flux_to_nanojansky(t["flux_science"]),
        tmpl.photo_calib.inst_flux_to_nanojansky(t["flux_template"]),
        rtol=1e-12,
    )
    assert tmpl.photo_calib.calibration_mean == pytest.approx(sci.photo_calib.calibration_mean / scale)


def _aperture_pulls(exp, model_bg, rows, xcol, ycol, fcol, r_ap=12.0, r_in=14.0, r_out=22.0):
    """Aperture flux minus local sky (annulus mean), its error from the variance plane, and the pull."""
    img, var = exp.image.astype(float), exp.variance.astype(float)
    pulls = []
    for r in rows:
        x, y = r[xcol], r[ycol]
        ix, iy = int(round(x)), int(round(y))
        h = int(r_out) + 1
        sl = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
        yy, xx = np.mgrid[sl]
        d = np.hypot(xx - x, yy - y)
        ap = d <= r_ap
        ann = (d >= r_in) & (d <= r_out)
        sky = img[sl][ann].mean()
        flux = (img[sl][ap] - sky).sum()
        err = math.sqrt(var[sl][ap].sum() + ap.sum() ** 2 * var[sl][ann].mean() / ann.sum())
        pulls.append((flux - r[fcol]) / err)
    return np.array(pulls)


def _clean_rows(pair, kinds, fmin, radius=30.0):
    """Rows of the given kinds, brighter than fmin, with no other object within `radius` and no defect."""
    t = pair.truth
    x, y = np.asarray(t["x"]), np.asarray(t["y"])
    size = pair.science.width
    bad = pair.science.mask.get(DEFECTS)
    tbad = pair.template.mask.get(DEFECTS)
    sel = []
    for r in t[np.isin(t["kind"], kinds)]:
        if r["flux_science"] < fmin or r["saturated"]:
            continue
        if not (radius < r["x"] < size - 1 - radius and radius < r["y"] < size - 1 - radius):
            continue
        d = np.hypot(x - r["x"], y - r["y"])
        d[r["id"]] = np.inf
        if (d < radius + 4 * t["radius"]).any():
            continue
        ix, iy = int(round(r["x"])), int(round(r["y"]))
        if bad[iy - 23 : iy + 24, ix - 23 : ix + 24].any():
            continue
        jx, jy = int(round(r["x_template"])), int(round(r["y_template"]))
        if tbad[max(0, jy - 23) : jy + 24, max(0, jx - 23) : jx + 24].any():
            continue
        sel.append(r)
    return sel


def test_injected_fluxes_by_aperture_photometry(sparse_pair):
    """Aperture photometry (r = 3 fwhm ⊃ the whole PSF stamp) minus the annulus sky recovers the truth.

    The pulls (flux − truth)/σ of ≳ 40 clean stars and transients must have mean 0 ± 0.4 and std 1 ± 0.25:
    a flux-scale error of 1 % on the bright stars, a missing pixel-integration normalisation or a wrong variance
    plane would each move one of these by several σ.
    """
    p = sparse_pair
    stars = _clean_rows(p, ["star"], 5000.0)
    trans = _clean_rows(p, ["transient"], 0.0)
    assert len(stars) >= 15 and len(trans) >= 40
    ps = _aperture_pulls(p.science, None, stars, "x", "y", "flux_science")
    pt = _aperture_pulls(p.science, None, trans, "x", "y", "flux_science")
    allp = np.concatenate([ps, pt])
    assert abs(allp.mean()) < 0.4
    assert np.std(allp) == pytest.approx(1.0, abs=0.25)
    assert abs(ps.mean()) < 3.0 / math.sqrt(len(ps)) + 0.1
    # The template: the same stars in template counts.
    pt_t = _aperture_pulls(p.template, None, stars, "x_template", "y_template", "flux_template")
    assert abs(pt_t.mean()) < 3.0 / math.sqrt(len(pt_t)) + 0.1
    assert np.std(pt_t) == pytest.approx(1.0, abs=0.35)


def test_perfect_difference_holds_only_the_changes(pair):
    """science_model − science_static carries exactly the science-epoch changes' Δflux.

    Changes are placed ≥ 5 px (cosmic rays) or ≥ 10 px (PSF sources) from the edge, so their whole stamps land
    on the image and the total must match to float32 rounding (1e-4); a change rendered in the static scene, or a
    static source missing from it, would shift the total by ≥ 300 counts (≥ 1e-3).
    """
    p = pair
    t = p.truth
    diff = p.science_model.astype(float) - p.science_static.astype(float)
    kinds = np.isin(t["kind"], ["transient", "variable", "mover", "cosmic_ray"]) & (t["flux_science"] > 0)
    want = float(np.sum(t["delta_flux"][kinds]))
    assert diff.sum() == pytest.approx(want, rel=1e-4)
    # Away from the changes the two noiseless images agree to float32 precision.
    far = np.ones(diff.shape, bool)
    for r in t[np.isin(t["kind"], ["transient", "variable", "mover", "cosmic_ray"])]:
        ix, iy = int(round(r["x"])), int(round(r["y"]))
        far[max(0, iy - 12) : iy + 13, max(0, ix - 12) : ix + 13] = False
    assert np.abs(diff[far]).max() < 1e-2


def test_masks_saturation_bad_column_and_cosmic_rays(pair):
    p = pair
    m = p.science.mask
    t = p.truth
    # Bad column: a full column flagged BAD.
    bad_cols = np.nonzero(m.get("BAD").all(axis=0))[0]
    assert len(bad_cols) == p.options["n_bad_columns"]
    # Saturated stars: flagged, SAT pixels there, image clipped, bleed trails longer along columns.
    sat = t[t["saturated"] & (t["kind"] == "star")]
    assert len(sat) >= p.options["n_saturated"]
    assert p.science.image.max() <= p.options["saturation"]
    from scipy.ndimage import label

    lab, n = label(m.get("SAT"))
    assert n >= 1
    heights, widths = [], []
    for sl in __import__("scipy.ndimage", fromlist=["find_objects"]).find_objects(lab):
        heights.append(sl[0].stop - sl[0].start)
        widths.append(sl[1].stop - sl[1].start)
    assert max(heights) > max(widths)
    # Cosmic rays: every CR pixel is CR-masked when mask_cosmic_rays is on.
    for r in t[t["kind"] == "cosmic_ray"]:
        assert m.get("CR")[int(round(r["y"])), int(round(r["x"]))]
    q = simulate_pair(256, seed=3, mask_cosmic_rays=False, n_cosmic_rays=4)
    assert not q.science.mask.get("CR").any()
    assert (q.truth["kind"] == "cosmic_ray").sum() == 4


def test_isolated_flag_follows_the_definition(pair):
    """isolated ⇒ no other change and no brighter star within 3 fwhm, no defect within 2 px."""
    t = pair.truth
    x, y = np.asarray(t["x"]), np.asarray(t["y"])
    change = np.isin(t["kind"], ["transient", "variable", "mover", "dipole", "cosmic_ray"])
    bad = pair.science.mask.get(DEFECTS)
    n_iso = 0
    for r in t[(t["kind"] == "transient") & t["isolated"]]:
        n_iso += 1
        d = np.hypot(x - r["x"], y - r["y"])
        d[r["id"]] = np.inf
        near = d < 3 * r["fwhm"]
        assert not (near & change).any()
        brighter = near & np.isin(t["kind"], ["star"]) & (t["flux_science"] > r["delta_flux"])
        assert not brighter.any()
        ix, iy = int(round(r["x"])), int(round(r["y"]))
        assert not bad[iy - 2 : iy + 3, ix - 2 : ix + 3].any()
    assert n_iso > 0.5 * (t["kind"] == "transient").sum()
    # The transients placed next to cosmic rays are never isolated.
    assert (~t["isolated"][t["kind"] == "transient"]).sum() >= pair.options["n_cr_transients"]


def test_template_psf_modes():
    """'sharper'/'broader' templates; 'mixed': science sharper on the left, broader on the right."""
    for mode, cmp in [("sharper", lambda s, t: t < s), ("broader", lambda s, t: t > s)]:
        p = simulate_pair(128, seed=1, template_psf=mode, n_stars=5, n_galaxies=2)
        for x in (0, 64, 127):
            assert cmp(p.science_psf.fwhm(x, 64), p.template_psf.fwhm(x, 64))
    p = simulate_pair(128, seed=1, template_psf="mixed", n_stars=5, n_galaxies=2)
    assert p.science_psf.fwhm(0, 64) < p.template_psf.fwhm(0, 64)
    assert p.science_psf.fwhm(127, 64) > p.template_psf.fwhm(127, 64)
    # Science PSF variation across the field is at least 20 % by default.
    s = simulate_pair(128, seed=1, n_stars=5, n_galaxies=2).science_psf
    fw = [s.fwhm(x, y) for x in (0, 127) for y in (0, 127)]
    assert (max(fw) - min(fw)) / s.fwhm(64, 64) >= 0.2


def test_moffat_elliptical_scene_runs():
    p = simulate_pair(256, seed=2, psf_profile="moffat", science_axis_ratio=0.8, science_theta=0.5)
    assert type(p.science_psf).__name__ == "VaryingMoffatPsf"
    assert np.isfinite(p.science.image).all()


def test_rotated_template_keeps_the_science_star_density():
    """A template rotated by 90° or 30° (and offset) is rendered on a grid just large enough for the rotated
    science (a 90° turn of a square needs no more than the offset and 16 px), and stars and galaxies keep the
    science's density: the science holds as many as without a rotation (the margin once diluted them 3–10×)."""
    def counts(**kw):
        p = simulate_pair(1024, seed=301, **kw)
        kind = np.asarray(p.truth["kind"]).astype(str)
        x, y = np.asarray(p.truth["x"], float), np.asarray(p.truth["y"], float)
        inside = (x >= 0) & (x < 1024) & (y >= 0) & (y < 1024)
        return p.template.shape[0], int(((kind == "star") & inside).sum()), int(((kind == "galaxy") & inside).sum())

    _, stars0, gals0 = counts()
    size90, stars90, gals90 = counts(template_rotation=90.0)
    size30, stars30, gals30 = counts(template_rotation=30.0, template_offset=(40.5, -25.2))
    assert size90 == 1024 + 2 * 16
    assert size30 == 1024 + 2 * (int(np.ceil(512 * (np.cos(np.pi / 6) + 0.5 - 1) + np.hypot(40.5, 25.2))) + 16)
    for stars, gals in ((stars90, gals90), (stars30, gals30)):
        assert abs(stars - stars0) < 4 * np.sqrt(stars0)
        assert abs(gals - gals0) < 4 * np.sqrt(gals0)


def test_wcs_offset_template_rendered_on_its_own_grid():
    """With an offset/rotation the template has its own grid; truth template positions follow the WCSs,
    and aperture fluxes of clean stars at those positions match flux_template."""
    p = simulate_pair(
        512, seed=4, template_offset=(7.3, -4.6), template_rotation=0.8, n_stars=120, star_flux_min=4000.0,
        n_galaxies=5, n_saturated=0,
    )
    sci, tmpl, t = p.science, p.template, p.truth
    assert tmpl.shape[0] > sci.shape[0]
    ra, dec = sci.pixel_to_sky(t["x"], t["y"])
    xt, yt = tmpl.sky_to_pixel(ra, dec)
    np.testing.assert_allclose(xt, t["x_template"], atol=1e-6)
    np.testing.assert_allclose(yt, t["y_template"], atol=1e-6)
    assert np.abs(np.asarray(t["x_template"]) - np.asarray(t["x"])).max() > 5
    rows = [r for r in _clean_rows(p, ["star"], 4000.0, radius=24.0)]
    rows = [r for r in rows if 30 < r["x_template"] < tmpl.width - 31 and 30 < r["y_template"] < tmpl.height - 31]
    assert len(rows) >= 8
    pulls = _aperture_pulls(tmpl, None, rows, "x_template", "y_template", "flux_template")
    assert abs(pulls.mean()) < 3.0 / math.sqrt(len(pulls)) + 0.15


def test_options_no_data_dipoles_background_and_errors():
    from diffim.errors import DiffimValueError

    p = simulate_pair(256, seed=6, no_data_border=5, n_dipoles=4, background_subtracted=True)
    nd = p.science.mask.get("NO_DATA")
    assert nd[:5].all() and nd[:, -5:].all() and not nd[5:-5, 5:-5].any()
    assert np.isnan(p.science.image[0, 0])
    d = p.truth[p.truth["kind"] == "dipole"]
    assert len(d) == 4
    shift = np.hypot(d["x"] - d["x_template"], d["y"] - d["y_template"])
    assert np.all((shift >= 0.5 - 1e-9) & (shift <= 2.0 + 1e-9))
    # Background-subtracted: the sky pedestal is gone but the variance still carries it.
    good = ~p.science.mask.get(DEFECTS)
    assert abs(np.median(p.science.image[good])) < 20
    assert np.median(p.science.variance[good]) > 400
    with pytest.raises(DiffimValueError, match="Unknown simulate_pair option"):
        simulate_pair(128, nonsense=1)


def test_write_round_trip(tmp_path):
    from astropy.table import Table

    from diffim.io import read_exposure
    from diffim.sim import write_simulation

    p = write_simulation(tmp_path, size=128, seed=1)
    for name in ["science.fits", "template.fits", "truth.fits", "truth.csv"]:
        assert (tmp_path / name).exists()
    sci = read_exposure(tmp_path / "science.fits")
    np.testing.assert_array_equal(sci.image, p.science.image)
    np.testing.assert_array_equal(sci.mask.array, p.science.mask.array)
    assert type(sci.psf).__name__ == "VaryingGaussianPsf"
    np.testing.assert_allclose(sci.psf.compute_kernel_image(10, 100), p.science_psf.compute_kernel_image(10, 100), atol=1e-15)
    assert sci.photo_calib.calibration_mean == pytest.approx(p.science.photo_calib.calibration_mean)
    t = Table.read(tmp_path / "truth.csv", format="ascii.csv")
    assert len(t) == len(p.truth)
    try:
        import pyarrow  # noqa: F401

        tp = Table.read(tmp_path / "truth.parquet")
        assert list(tp["kind"]) == list(p.truth["kind"])
    except ImportError:
        pass
    np.testing.assert_allclose(t["x"], p.truth["x"])


def test_cli_main(tmp_path):
    from diffim.sim import main

    assert main([str(tmp_path / "out"), "--size", "96", "--seed", "2", "-o", "n_stars=10", "-o", "template_psf='broader'"]) == 0
    assert (tmp_path / "out" / "science.fits").exists()


@pytest.mark.slow
def test_2048_scene_is_fast():
    t0 = time.perf_counter()
    p = simulate_pair(2048, seed=0)
    assert time.perf_counter() - t0 < 10.0
    assert (p.truth["kind"] == "star").sum() > 2500


def test_render_point_sources_generic_psf_path():
    """A PSF without vectorised stamps is rendered through compute_image: flux and centroid preserved,
    clipped at the image edge; the vectorised path agrees with compute_image to rounding."""
    from diffim.model import GaussianPsf
    from diffim.sim import render_point_sources

    g = GaussianPsf(1.7)
    img = render_point_sources((64, 64), g, [20.3, 62.0], [30.6, 10.0], [1000.0, 500.0])
    yy, xx = np.mgrid[:64, :64]
    core = img[20:42, 9:32]
    assert core.sum() == pytest.approx(1000.0, rel=1e-9)
    assert (core * xx[20:42, 9:32]).sum() / core.sum() == pytest.approx(20.3, abs=0.01)
    assert 250 < img[:, 55:].sum() < 500  # half of the edge star falls off the image
    v = VaryingGaussianPsf(4.0, (0.1, 0.05), bbox=Box(0, 0, 64, 64))
    a = render_point_sources((64, 64), v, [20.3], [30.6], [1000.0])
    stamp, box = v.compute_image(20.3, 30.6)
    np.testing.assert_allclose(a[box.slices()], 1000.0 * stamp, atol=1e-9)


def test_bright_stars_keep_their_wings_beyond_the_model_stamp():
    """``wing_floor``: a bright Moffat star is rendered on a stamp wide enough that its wing at the border is below
    the floor, so the profile continues past the model's stamp (99.5 % of the light) instead of stopping with a
    step there; a faint one keeps the model's stamp. Total flux and the profile inside the stamp are the
    Moffat's (the wide stamp is normalised over its own extent)."""
    from diffim.sim import render_point_sources

    psf = VaryingMoffatPsf(4.0, beta=2.5, bbox=Box(0, 0, 301, 301))
    h = psf.size // 2
    n, c = 301, 150
    flux = np.array([7.0e6, 3.0e3])
    floor = 0.5
    bright = render_point_sources((n, n), psf, [c], [c], flux[:1], wing_floor=floor)
    cut = render_point_sources((n, n), psf, [c], [c], flux[:1])
    faint = render_point_sources((n, n), psf, [c], [c], flux[1:], wing_floor=floor)
    np.testing.assert_array_equal(faint, render_point_sources((n, n), psf, [c], [c], flux[1:]))
    assert bright.sum() == pytest.approx(flux[0], rel=1e-9)
    # Just outside the model stamp: nothing when cut, the Moffat's wing (≈ 40 counts) when not.
    alpha = moffat_alpha(4.0, 2.5)

    def moffat(r):
        return flux[0] * (2.5 - 1.0) / (math.pi * alpha**2) * (1.0 + (r / alpha) ** 2) ** -2.5

    assert cut[c, c + h + 1] == 0.0 and cut[c, c + h] > 10.0  # the step the cut left
    for r in (h - 2, h + 1, h + 8, h + 20):
        assert bright[c, c + r] == pytest.approx(moffat(r), rel=0.03), r
    row = bright[c, c:]
    reach = int(np.flatnonzero(row > 0)[-1])  # the wide stamp's half-width
    assert reach > h + 20 and moffat(reach) <= floor < moffat(reach / 1.5)  # as wide as the floor asks, no more


def test_galaxy_orientation_on_a_rotated_template():
    """Galaxies keep their sky orientation: position angle θ in science pixels is θ − rotation in the template's
    (unweighted second moments of the noiseless models, sky removed, isolated elongated galaxies, ±3°)."""
    from diffim.sim import _sky

    rot = 25.0
    p = simulate_pair(
        320, seed=3, template_offset=(2.0, -1.0), template_rotation=rot, n_stars=0, n_saturated=0, n_galaxies=25,
        galaxy_flux_range=(1e6, 1e6), galaxy_radius_range=(2.0, 3.0), galaxy_dev_fraction=0.0, n_transients=0,
        n_host_transients=0, n_transient_pairs=0, n_cr_transients=0, n_variables=0, n_movers=0, n_cosmic_rays=0,
        n_bad_columns=0,
    )
    o = p.options
    sci = p.science_model - _sky(p.science.shape, o["science_sky"], o["science_sky_gradient"])
    tmp = p.template_model - _sky(p.template.shape, o["template_sky"], o["template_sky_gradient"])
    t = p.truth
    gal = t[t["kind"] == "galaxy"]
    checked = 0

    def pa(img, x, y):
        ix, iy = int(round(x)), int(round(y))
        st = img[iy - 15 : iy + 16, ix - 15 : ix + 16].astype(float)
        yy, xx = np.mgrid[-15:16, -15:16]
        xx, yy = xx - (x - ix), yy - (y - iy)
        return math.degrees(0.5 * math.atan2(2 * (st * xx * yy).sum(), (st * (xx * xx - yy * yy)).sum()))

    # Objects outside the science (rendered in the template margin) are not in the truth table: require the
    # galaxy to be far from every truth galaxy *and* well inside the science so no hidden neighbour is near.
    for r in gal:
        d = np.hypot(gal["x"] - r["x"], gal["y"] - r["y"])
        if (d[d > 0] < 40).any() or r["axis_ratio"] > 0.8:
            continue
        if not (40 < r["x"] < 280 and 40 < r["y"] < 280):
            continue
        want_s = math.degrees(r["theta"])
        want_t = want_s - rot
        for got, want in [(pa(sci, r["x"], r["y"]), want_s), (pa(tmp, r["x_template"], r["y_template"]), want_t)]:
            diff = (got - want + 90) % 180 - 90
            assert abs(diff) < 3.0
        checked += 1
    assert checked >= 2


def test_option_aliases_used_by_the_command_line(tmp_path):
    """`diffim simulate --psf elliptical --template-psf broader --rotation 1 --offset 3 2` option names work."""
    from diffim.cli import main as cli_main

    p = simulate_pair(128, seed=1, psf="elliptical", template_psf_mode="broader", wcs_rotation_deg=1.0, wcs_offset_pix=(3.0, 2.0))
    assert p.science_psf.axis_ratio0 == 0.8 and p.options["template_psf"] == "broader"
    assert p.options["template_rotation"] == 1.0 and p.template.shape[0] > 128
    rc = cli_main(["-q", "simulate", str(tmp_path / "s"), "--size", "96", "--psf", "elliptical", "--template-psf", "mixed", "--offset", "2", "1"])
    assert rc == 0 and (tmp_path / "s" / "template.fits").exists()


@pytest.mark.parametrize(
    "size, options",
    [(64, dict(n_movers=3, n_saturated=2)), (100, dict(template_psf="same", wcs=False)), (96, dict(n_stars=0, n_galaxies=0, n_transients=0, n_host_transients=0, n_transient_pairs=0, n_cr_transients=0, n_variables=0, n_movers=0, n_cosmic_rays=0, n_bad_columns=0))],
)
def test_small_and_empty_scenes(size, options):
    """Tiny images and empty scenes still give consistent exposures and a (possibly empty) truth table."""
    p = simulate_pair(size, seed=2, **options)
    assert p.science.shape == (size, size) and np.isfinite(p.science.image).all()
    assert set(p.truth.colnames) >= {"id", "kind", "x", "y", "snr", "isolated"}
    assert (p.science.wcs is None) == (options.get("wcs") is False)
