"""Tests of registration (RegisterTask, TAN-SIP fitting) and of the matching helpers, AstrometryTask and the
reference-catalogue loader."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import Sip

from diffim.errors import BadInputError, InputFileNotFoundError, WcsError
from diffim.model import Box, Exposure, GaussianPsf
from diffim.tasks.astrometry import AstrometryTask
from diffim.tasks.ref_obj_loader import LoadReferenceObjectsConfig, load_reference_catalog
from diffim.tasks.register import RegisterConfig, RegisterTask
from diffim.warp import fit_tan_sip, match_dia_sources, match_sky
from diffim.warp.synthetic import make_tan_wcs, render_stars
from diffim.warp.wcs_fit import fit_tan_sip_clipped


def _pixel_rms(wcs_fit, wcs_true, box, step=32):
    """RMS (px) over a grid of ``box`` of the distance between where the two WCSs put each pixel's sky point."""
    y, x = np.mgrid[box.y0 : box.y1 : step, box.x0 : box.x1 : step].astype(float)
    ra, dec = wcs_fit.all_pix2world(x, y, 0)
    xt, yt = wcs_true.all_world2pix(ra, dec, 0)
    return float(np.sqrt(np.mean((xt - x) ** 2 + (yt - y) ** 2)))


def _scene(rng, n=512, n_stars=250, centroid_noise=0.02):
    """Science WCS, true template WCS, template WCS wrong by 2″ and 0.1°, source tables."""
    ws = make_tan_wcs((n / 2, n / 2))
    wt_true = make_tan_wcs((n / 2 + 13.4, n / 2 - 6.7), rotation_deg=0.35)
    # The template's recorded WCS: off by (1.6″, 1.2″) = 2″ and rotated by a further 0.1°.
    wt_bad = make_tan_wcs((n / 2 + 13.4, n / 2 - 6.7), rotation_deg=0.45,
                          crval=(150.0 + 1.6 / 3600 / np.cos(np.radians(2.0)), 2.0 + 1.2 / 3600))
    xs = rng.uniform(10, n - 10, n_stars)
    ys = rng.uniform(10, n - 10, n_stars)
    ra, dec = ws.all_pix2world(xs, ys, 0)
    xt, yt = wt_true.all_world2pix(ra, dec, 0)
    inside = (xt > 5) & (xt < n - 5) & (yt > 5) & (yt < n - 5)
    sci = Table({"x": xs, "y": ys, "coord_ra": ra, "coord_dec": dec})
    tmpl = Table({"x": xt[inside] + rng.normal(0, centroid_noise, inside.sum()),
                  "y": yt[inside] + rng.normal(0, centroid_noise, inside.sum())})
    return ws, wt_true, wt_bad, sci, tmpl, Box(0, 0, n, n)


def test_register_corrects_offset_and_rotation():
    """A template WCS off by 2″ (10 px; LSST's 1″ match radius alone would find nothing) and 0.1° is corrected
    to < 0.05 px RMS over the template using ~250 matched stars with 0.02 px centroid noise (expected
    fit error ≈ 0.02·√(12/250) ≈ 0.005 px). Metadata MATCH_NUM, SIP_RMS (px ≈ centroid noise), SIP_GOOD."""
    rng = np.random.default_rng(11)
    ws, wt_true, wt_bad, sci, tmpl, box = _scene(rng)
    assert _pixel_rms(wt_bad, wt_true, box) > 8.0
    task = RegisterTask()
    res = task.run(tmpl, wt_bad, box, sci, sipOrder=2)
    assert _pixel_rms(res.wcs, wt_true, box) < 0.05
    md = task.metadata
    assert md["MATCH_NUM"] >= 0.9 * len(tmpl)
    assert md["SIP_GOOD"] + md["SIP_REJECTED"] == md["MATCH_NUM"]
    assert 0.01 < md["SIP_RMS"] < 0.05
    assert res.sipRms == pytest.approx(md["SIP_RMS"])
    assert res.nMatches == md["MATCH_NUM"] and res.debug is None


def test_register_rejects_outliers():
    """10 % of the matches displaced by 0.4–0.8″ (2–4 px) are clipped by the 3σ loop and the fit stays
    < 0.05 px accurate; without clipping the bad matches would bias it."""
    rng = np.random.default_rng(12)
    ws, wt_true, wt_bad, sci, tmpl, box = _scene(rng)
    bad = rng.random(len(tmpl)) < 0.1
    tmpl["x"][bad] += rng.choice([-1, 1], bad.sum()) * rng.uniform(2, 4, bad.sum())
    task = RegisterTask()
    res = task.run(tmpl, wt_bad, box, sci, sipOrder=2)
    assert task.metadata["SIP_REJECTED"] >= 0.8 * bad.sum()
    assert _pixel_rms(res.wcs, wt_true, box) < 0.05


def test_register_then_warp_aligns_template():
    """End to end: RegisterTask fits the template WCS, warpExposure puts the template on the science grid;
    star residuals against a direct science-grid rendering are < 1 % of the peak (a 2″ = 10 px error left
    uncorrected would leave full-amplitude dipoles)."""
    rng = np.random.default_rng(13)
    n = 256
    ws, wt_true, wt_bad, sci, tmpl, box = _scene(rng, n=n, n_stars=120)
    res = RegisterTask().run(tmpl, wt_bad, box, sci, sipOrder=2)
    ra, dec = np.asarray(sci["coord_ra"]), np.asarray(sci["coord_dec"])
    psf = GaussianPsf(2.0, size=25)
    flux = 1000.0
    timg, _, _ = render_stars(box, wt_true, ra, dec, flux, psf)
    direct, _, _ = render_stars(box, ws, ra, dec, flux, psf)
    t = Exposure(image=timg, variance=np.ones((n, n)), wcs=wt_bad, psf=psf)
    out = RegisterTask().warpExposure(t, res.wcs, ws, box)
    good = ~out.mask.get("NO_DATA")
    peak = flux / (2 * np.pi * 4.0)
    assert np.abs(out.image - direct)[good].max() < 0.01 * peak


def test_register_no_matches_is_a_clear_error():
    rng = np.random.default_rng(14)
    ws, wt_true, wt_bad, sci, tmpl, box = _scene(rng)
    far = Table({"coord_ra": np.asarray(sci["coord_ra"]) + 0.1, "coord_dec": np.asarray(sci["coord_dec"])})
    with pytest.raises(WcsError, match="matched only 0"):
        RegisterTask().run(tmpl, wt_bad, box, far)


def test_register_debug_table(tmp_path):
    """doDebugRegister: the match table with residuals is written (FITS and CSV)."""
    rng = np.random.default_rng(15)
    ws, wt_true, wt_bad, sci, tmpl, box = _scene(rng, n_stars=80)
    for name in ("matches.fits", "matches.csv"):
        path = tmp_path / name
        res = RegisterTask().run(tmpl, wt_bad, box, sci, sipOrder=2, debugPath=str(path))
        t = Table.read(path, format="fits" if name.endswith("fits") else "ascii.csv")
        assert len(t) == len(res.matches["x"])
        assert {"x", "y", "ra", "dec", "sep_in", "sep_fit", "dx_fit", "dy_fit", "good"} <= set(t.colnames)
        assert np.median(t["sep_in"]) > 1.5 and np.median(t["sep_fit"]) < 0.02


def test_register_config_defaults():
    c = RegisterConfig()
    assert (c.matchRadius, c.sipOrder, c.sipIter, c.sipRej) == (1.0, 4, 3, 3.0)
    assert c.warper.warpingKernelName == "lanczos3" and c.warper.interpLength == 10


def test_fit_tan_sip_recovers_distortion():
    """Points generated by a TAN-SIP WCS with 3rd-order distortion (≈ 4 px at the corners) are refitted at
    order 3 to 1e-3 px; a plain TAN fit (order 1) cannot get below 0.1 px."""
    w = make_tan_wcs((511.5, 511.5), rotation_deg=12.0)
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[1, 1], a[0, 3] = 2e-6, -1e-6, 1.5e-9
    b[0, 2], b[3, 0], b[1, 2] = 1.5e-6, -1e-9, 5e-10
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    rng = np.random.default_rng(16)
    x, y = rng.uniform(0, 1023, 400), rng.uniform(0, 1023, 400)
    ra, dec = w.all_pix2world(x, y, 0)
    box = Box(0, 0, 1024, 1024)
    fit3 = fit_tan_sip(x, y, ra, dec, order=3)
    assert _pixel_rms(fit3, w, box) < 1e-3
    fit1 = fit_tan_sip(x, y, ra, dec, order=1)
    assert _pixel_rms(fit1, w, box) > 0.1
    wcs, good, rms = fit_tan_sip_clipped(x, y, ra, dec, order=3)
    assert good.all() and rms < 1e-3


def test_fit_tan_sip_needs_three_points():
    with pytest.raises(WcsError, match="at least 3"):
        fit_tan_sip([0, 1], [0, 1], [150, 150.0001], [2, 2.0001])


# ---- matching ------------------------------------------------------------------------------------------
def test_match_sky_and_dia_sources():
    """Nearest-neighbour matches within the radius; unmatched get id -1 / NaN; pixel and sky forms agree."""
    w = make_tan_wcs((100, 100), scale_arcsec=0.2)
    rng = np.random.default_rng(17)
    x = rng.uniform(0, 200, 50)
    y = rng.uniform(0, 200, 50)
    ra, dec = w.all_pix2world(x, y, 0)
    # DIA sources: the first 30 at 0.3 px (0.06″) from a source, the rest 10 px away from everything.
    dx = np.r_[np.full(30, 0.3), np.full(20, 1000.0)]
    dia_x, dia_y = x + dx, y
    dia_ra, dia_dec = w.all_pix2world(dia_x, dia_y, 0)
    ids = np.arange(50) + 1000
    m_sky, d_sky = match_dia_sources((dia_ra, dia_dec), Table({"ra": ra, "dec": dec, "id": ids}), 0.5)
    assert np.array_equal(m_sky[:30], ids[:30]) and np.all(m_sky[30:] == -1)
    np.testing.assert_allclose(d_sky[:30], 0.06, rtol=1e-3)
    assert np.all(np.isnan(d_sky[30:]))
    m_pix, d_pix = match_dia_sources(Table({"x": dia_x, "y": dia_y}), Table({"x": x, "y": y, "id": ids}), 0.5,
                                     pixel_scale=0.2)
    assert np.array_equal(m_pix, m_sky)
    np.testing.assert_allclose(d_pix[:30], 0.06, rtol=1e-6)
    # Non-finite positions never match (and do not break the tree).
    nan_ra = np.r_[np.nan, dia_ra[1:]]
    m_nan, _ = match_dia_sources((nan_ra, dia_dec), (np.r_[ra[:5], np.nan, ra[6:]], dec), 0.5)
    assert m_nan[0] == -1 and m_nan[5] == -1 and m_nan[1] == 1
    i1, i2, sep = match_sky(dia_ra, dia_dec, ra, dec, 0.5)
    assert np.array_equal(i1, np.arange(30)) and np.array_equal(i2, np.arange(30))


def test_astrometry_task_matches_reference_file(tmp_path):
    """AstrometryTask loads a CSV reference catalogue for the exposure and matches within 0.5″ (no WCS fit)."""
    n = 200
    w = make_tan_wcs((n / 2, n / 2))
    rng = np.random.default_rng(18)
    x, y = rng.uniform(-100, 300, 80), rng.uniform(-100, 300, 80)
    ra, dec = w.all_pix2world(x, y, 0)
    path = tmp_path / "ref.csv"
    Table({"id": np.arange(80) + 7, "ra": ra, "dec": dec, "r_flux": rng.uniform(1, 2, 80)}).write(path, format="ascii.csv")
    cfg = LoadReferenceObjectsConfig()
    cfg.filename = str(path)
    cfg.pixelMargin = 10
    exp = Exposure(image=np.zeros((n, n)), wcs=w, band="r")
    cat = load_reference_catalog(cfg, exp)
    inside = (x >= -10.5) & (x < n + 9.5) & (y >= -10.5) & (y < n + 9.5)
    assert len(cat) == inside.sum() and cat.meta["fluxField"] == "r_flux"
    task = AstrometryTask(refObjLoaderConfig=cfg)
    sel = np.nonzero((x > 0) & (x < n) & (y > 0) & (y < n))[0]
    src = Table({"x": x[sel] + 0.5, "y": y[sel]})  # 0.1″ off
    res = task.run(src, exp)
    assert np.array_equal(res.refMatchId, sel + 7)
    none = AstrometryTask(refObjLoaderConfig=LoadReferenceObjectsConfig()).run(src, exp)
    assert np.all(none.refMatchId == -1)


def test_reference_loader_errors(tmp_path):
    cfg = LoadReferenceObjectsConfig()
    cfg.filename = str(tmp_path / "missing.parquet")
    exp = Exposure(image=np.zeros((10, 10)), wcs=make_tan_wcs((5, 5)))
    with pytest.raises(InputFileNotFoundError, match="does not exist"):
        load_reference_catalog(cfg, exp)
    path = tmp_path / "bad.csv"
    Table({"RAJ2000": [150.0], "DEJ2000": [2.0]}).write(path, format="ascii.csv")
    cfg.filename = str(path)
    with pytest.raises(BadInputError, match="no column 'ra'"):
        load_reference_catalog(cfg, exp)
    cfg.raColumn, cfg.decColumn = "RAJ2000", "DEJ2000"
    cat = load_reference_catalog(cfg, exp)
    assert len(cat) == 1 and cat["RAJ2000"][0] == cat["ra"][0] == 150.0
