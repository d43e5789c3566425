"""Tests of the quality figures (diffim.metrics, /work/shared/design/metrics.md).

Two kinds of truth: a *perfect* difference (the science minus its own noiseless static sky) whose figures are
known from statistics alone, and hand-made tables/catalogues whose counts can be worked out by hand.
"""

import math

import numpy as np
import pytest
from astropy.table import Table

from diffim import metrics as M
from diffim.model import Exposure, Mask, PhotoCalib
from diffim.sim import simulate_pair
from diffim.testing.reference import matched_filter_catalog

FWHM = 4.0


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(1024, seed=21, n_transients=150)


@pytest.fixture(scope="module")
def perfect(pair):
    return pair.perfect_difference()


# ----------------------------------------------------------------------------------------------------------
# The perfect difference
# ----------------------------------------------------------------------------------------------------------
def test_perfect_difference_noise_ratio_is_one(pair, perfect):
    """Pure Gaussian noise with an honest variance: robust std of D/σ over ≳ 3·10⁵ empty pixels is 1 ± 0.01
    (the MAD-based estimate's standard error is ≈ 0.002 here)."""
    empty = M.empty_pixels(perfect, pair.truth, FWHM)
    assert empty.sum() > 3e5
    assert M.noise_ratio(perfect, pair.truth, FWHM) == pytest.approx(1.0, abs=0.01)
    # science − its complete noiseless model (changes included) is pure noise as well.
    resid = pair.science.copy()
    resid.image[...] = pair.science.image - pair.science_model
    assert M.noise_ratio(resid, pair.truth, FWHM) == pytest.approx(1.0, abs=0.02)
    # A variance plane 21 % too large must read as a noise ratio of 1/1.1.
    wrong = perfect.copy()
    wrong.variance[...] *= 1.21
    assert M.noise_ratio(wrong, pair.truth, FWHM) == pytest.approx(1 / 1.1, abs=0.01)


def test_empty_pixels_exclude_sources_changes_masks_and_edge(pair, perfect):
    t = pair.truth
    empty = M.empty_pixels(perfect, t, FWHM)
    e = int(math.ceil(6 * FWHM))
    assert not empty[:e].any() and not empty[:, -e:].any()
    assert not empty[perfect.mask.get(["BAD", "SAT", "CR"])].any()
    for r in t[np.isin(t["kind"], ["star", "transient", "galaxy"])][:200]:
        ix, iy = int(round(r["x"])), int(round(r["y"]))
        if 0 <= ix < perfect.width and 0 <= iy < perfect.height:
            assert not empty[iy, ix]


def test_perfect_difference_star_chi2(pair, perfect):
    """Noise alone in a 13×13 box: mean χ² has std √(2/169) ≈ 0.11, so p95 ≈ 1 + 1.645·0.11 ≈ 1.18; the
    max |z| over 169 pixels has p95 ≈ 3.8. A 5 % flux-scale error on the static sky must blow p95 up."""
    rows = M.bright_star_rows(perfect, pair.truth, FWHM)
    assert len(rows) >= 50
    chi = M.star_chi2_p95(perfect, pair.truth, FWHM)
    assert 1.08 < chi < 1.32
    assert 3.2 < M.star_max_p95(perfect, pair.truth, FWHM) < 4.4
    bad = perfect.copy()
    bad.image[...] = pair.science.image - 0.95 * pair.science_static
    assert M.star_chi2_p95(bad, pair.truth, FWHM) > 2.0


def test_perfect_difference_with_reference_detector(pair, perfect):
    """The simple matched-filter detector on the perfect difference: no false detections (a 5σ noise peak
    is expected ≲ 0.2 times per Mpix), complete for S/N ≥ 7, unbiased fluxes and unit pulls.

    Thresholds: completeness at S/N ≥ 7 vs a 5σ threshold is ≥ 97 % per source, so ≥ 0.93 over ~70; the
    flux-bias median of ~60 S/N ≥ 15 sources has σ ≲ 0.006; the pull std of ~90 sources has σ ≈ 0.09."""
    cat = matched_filter_catalog(perfect, FWHM)
    r = M.evaluate(perfect, cat, pair.truth, FWHM)
    assert r["false_detections_per_mpix"] <= 2.0
    assert r["n_snr7"] >= 50 and r["completeness_snr7"] >= 0.93
    assert r["completeness_galaxy"] >= 0.85
    assert r["n_flux_bias"] >= 30 and abs(r["flux_bias"]) < 0.02
    assert r["n_pull"] >= 50 and r["pull_std"] == pytest.approx(1.0, abs=0.25)
    # Low-S/N transients are found less often than S/N ≥ 7 ones.
    assert r["completeness_all"] < r["completeness_snr7"]
    # An empty catalogue: nothing found, nothing false.
    e = M.evaluate(perfect, None, pair.truth, FWHM)
    assert e["false_detections_per_mpix"] == 0 and e["n_false"] == 0
    assert e["completeness_snr7"] == 0 and math.isnan(e["flux_bias"])


def test_evaluate_flux_units(pair, perfect):
    """A catalogue in nJy converted with the science PhotoCalib gives the same figures as one in counts."""
    t = pair.truth
    sel = t["kind"] == "transient"
    cat = Table({"x": t["x"][sel], "y": t["y"][sel], "psfFlux": t["delta_flux"][sel] * 1.05, "psfFluxErr": t["delta_flux"][sel] / t["snr"][sel]})
    counts = M.evaluate(perfect, cat, t, FWHM)
    assert counts["flux_bias"] == pytest.approx(0.05, abs=1e-9)
    cal = pair.science.photo_calib
    njy = Table(cat, copy=True)
    njy["psfFlux"] *= cal.calibration_mean
    njy["psfFluxErr"] *= cal.calibration_mean
    for scale in (cal, 1.0 / cal.calibration_mean):
        assert M.evaluate(perfect, njy, t, FWHM, flux_unit_scale=scale)["flux_bias"] == pytest.approx(0.05, abs=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Hand-made tables
# ----------------------------------------------------------------------------------------------------------
def _truth(rows):
    cols = ["kind", "x", "y", "flux_science", "delta_flux", "snr", "host", "radius", "saturated"]
    defaults = {"flux_science": 1000.0, "delta_flux": 1000.0, "snr": 20.0, "host": -1, "radius": 0.0, "saturated": False}
    data = {c: [r.get(c, defaults.get(c)) for r in rows] for c in cols}
    t = Table(data)
    t["id"] = np.arange(len(t))
    return t


def _blank(shape=(200, 200)):
    return Exposure(image=np.zeros(shape, np.float32), variance=np.ones(shape, np.float32))


def test_isolation_rules():
    """Other change within 3 fwhm, brighter star within 3 fwhm or a defect within 2 px break isolation."""
    t = _truth(
        [
            dict(kind="transient", x=50, y=50),  # 0 isolated
            dict(kind="transient", x=100, y=50),  # 1 CR 11 px away (< 12) -> not
            dict(kind="cosmic_ray", x=111, y=50, delta_flux=5000.0, flux_science=5000.0),
            dict(kind="transient", x=150, y=50, delta_flux=1000.0),  # 3 brighter star 10 px away -> not
            dict(kind="star", x=160, y=50, flux_science=5000.0, delta_flux=0.0),
            dict(kind="transient", x=50, y=100, delta_flux=1000.0),  # 5 fainter star 10 px away -> isolated
            dict(kind="star", x=60, y=100, flux_science=500.0, delta_flux=0.0),
            dict(kind="transient", x=100, y=100),  # 7 change 13 px away -> isolated
            dict(kind="variable", x=113, y=100, delta_flux=-800.0, flux_science=200.0),
            dict(kind="transient", x=150, y=150),  # 9 BAD pixel 2 px away -> not (with the mask)
            dict(kind="transient", x=50, y=150),  # 10 BAD pixel 3 px away -> isolated
            dict(kind="transient", x=1, y=150),  # 11 off-image 5x5 box -> not (with the mask)
        ]
    )
    assert list(np.nonzero(M.isolated_transients(t, FWHM))[0]) == [0, 5, 7, 9, 10, 11]
    d = _blank()
    bad = np.zeros(d.shape, bool)
    bad[150, 152] = True
    bad[150, 53] = True
    d.mask.set("BAD", bad)
    assert list(np.nonzero(M.isolated_transients(t, FWHM, d))[0]) == [0, 5, 7, 10]


def test_completeness_counts_a_hand_made_catalogue():
    """Radius max(2, 0.75·4) = 3 px: sources at 2.9 px count, at 3.1 px do not; bins by S/N and host."""
    rows = []
    for i, snr in enumerate([10, 20, 30, 40, 6, 6.5, 3]):
        rows.append(dict(kind="transient", x=20 + 25 * i, y=20, snr=snr))
    rows.append(dict(kind="galaxy", x=20, y=120, delta_flux=0.0, flux_science=2e4, radius=3.0))
    rows.append(dict(kind="transient", x=21, y=121, snr=12, host=7))
    rows.append(dict(kind="transient", x=120, y=120, snr=12, host=7))
    t = _truth(rows)
    cat = {
        "x": np.array([20 + 2.9, 45, 70 + 3.1, 145.0, 21.0, 500.0]),
        "y": np.array([20, 20 + 1.0, 20, 20, 121.0, 500.0]),
    }
    c = M.completeness(cat, t, FWHM)
    assert c["n_snr7"] == 4 and c["completeness_snr7"] == pytest.approx(2 / 4)
    assert c["n_snr5_7"] == 2 and c["completeness_snr5_7"] == pytest.approx(1 / 2)
    assert c["n_galaxy"] == 2 and c["completeness_galaxy"] == pytest.approx(1 / 2)
    assert c["n_all"] == 9 and c["completeness_all"] == pytest.approx(4 / 9)
    # Sky sources are ignored.
    cat2 = dict(cat, sky_source=np.array([True, False, False, False, False, False]))
    assert M.completeness(cat2, t, FWHM)["completeness_snr7"] == pytest.approx(1 / 4)


def test_match_sources_is_one_to_one_and_nearest():
    t = _truth([dict(kind="transient", x=10.0, y=10.0), dict(kind="transient", x=12.5, y=10.0), dict(kind="transient", x=50, y=50)])
    m, d = M.match_sources(np.array([[11.5, 10.0], [10.2, 10.0], [80.0, 80.0]]), t, FWHM)
    assert list(m) == [1, 0, -1]
    np.testing.assert_allclose(d[:2], [0.2, 1.0])
    assert np.isnan(d[2])


def test_false_detections_hand_counted():
    """Only sources > 6 px from changes, off defects, ≥ 6 fwhm (24 px) from the edge count; rate per Mpix."""
    t = _truth([dict(kind="transient", x=100, y=100), dict(kind="cosmic_ray", x=60, y=60, radius=3.0), dict(kind="star", x=140, y=140, delta_flux=0.0)])
    d = _blank()
    bad = np.zeros(d.shape, bool)
    bad[:, 170] = True
    d.mask.set("BAD", bad)
    cat = {
        "x": np.array([105.0, 107.0, 60 + 8.5, 60 + 9.5, 140.0, 10.0, 172.0, 174.0]),
        "y": np.array([100.0, 100.0, 60.0, 60.0, 140.0, 100.0, 100.0, 100.0]),
    }
    counted, false = M.false_detection_flags(cat, t, FWHM, d)
    #            near tr  far tr  near CR  far CR  star   edge   BAD±2   clear
    assert list(counted) == [True, True, True, True, True, False, False, True]
    assert list(false) == [False, True, False, True, True, False, False, True]
    area = (200 - 48) ** 2
    assert M.false_detections_per_mpix(cat, t, FWHM, d) == pytest.approx(4 / area * 1e6)
    assert M.false_detections_per_mpix(None, t, FWHM, d) == 0.0


def test_flux_bias_and_pull_std_hand_made():
    """psfFlux = 1.1 × truth → bias 0.1; pulls drawn N(0, 1) → robust std ≈ 1 (n = 400, σ ≈ 0.06)."""
    rng = np.random.default_rng(1)
    n = 400
    xs = 30 + 40 * (np.arange(n) % 20)
    ys = 30 + 40 * (np.arange(n) // 20)
    truth = _truth([dict(kind="transient", x=float(x), y=float(y), delta_flux=1000.0, snr=20.0) for x, y in zip(xs, ys)])
    d = _blank((850, 850))
    err = np.full(n, 50.0)
    cat = {"x": xs + 0.5, "y": ys.astype(float), "psfFlux": 1000.0 * 1.1 + 0 * err, "psfFluxErr": err}
    assert M.flux_bias(cat, truth, FWHM, d) == pytest.approx(0.1, abs=1e-12)
    cat["psfFlux"] = 1000.0 + err * rng.standard_normal(n)
    assert M.pull_std(cat, truth, FWHM, d) == pytest.approx(1.0, abs=0.12)
    cat["psfFluxErr"] = err / math.sqrt(2)
    assert M.pull_std(cat, truth, FWHM, d) == pytest.approx(math.sqrt(2), abs=0.17)
    # Low-S/N transients are excluded from the bias (S/N ≥ 15) but used for the pulls (S/N ≥ 7).
    truth["snr"] = 10.0
    assert math.isnan(M.flux_bias(cat, truth, FWHM, d))
    assert np.isfinite(M.pull_std(cat, truth, FWHM, d))


def test_robust_std_and_match_radius():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(100000) * 3.0
    x[:1000] = 1e6  # 1 % outliers barely move the MAD
    assert M.robust_std(x) == pytest.approx(3.0, rel=0.03)
    assert M.match_radius(2.0) == 2.0 and M.match_radius(4.0) == 3.0


def test_evaluate_on_a_truth_table_read_back_from_fits(pair, perfect, tmp_path):
    """The truth written by SimulatedPair.write (FITS and CSV) scores exactly like the in-memory table."""
    from astropy.table import Table

    cat = matched_filter_catalog(perfect, FWHM)
    want = M.evaluate(perfect, cat, pair.truth, FWHM)
    pair.truth.write(tmp_path / "truth.fits")
    pair.truth.write(tmp_path / "truth.csv", format="ascii.csv")
    for path in ("truth.fits", "truth.csv"):
        got = M.evaluate(perfect, cat, Table.read(tmp_path / path), FWHM)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, nan_ok=True, rel=1e-9), (path, k)
    assert want["false_per_mpix"] == want["false_detections_per_mpix"]
