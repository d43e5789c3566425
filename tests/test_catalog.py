"""The DiaSource table: APDB names and units, nJy conversion, LSST aliases, Parquet + FITS round trips."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from diffim.catalog import APDB_DIASOURCE_COLUMNS, build_dia_source_table, read_catalog, write_catalog
from diffim.footprint import Footprint, Peak
from diffim.model import Box, Exposure, GaussianPsf, PhotoCalib, VisitInfo
from diffim.measure.single_frame import measure_dia_sources
from diffim.tasks.forced_measurement import ForcedMeasurementTask


def _wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [50.0, 50.0]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def _difference(seed=0):
    """A 100² difference with a positive and a negative transient (fluxes +5000, −3000 counts)."""
    rng = np.random.RandomState(seed)
    psf = GaussianPsf(2.0)
    img = rng.normal(0, 3.0, (100, 100))
    truth = [(30.2, 40.7, 5000.0), (70.6, 60.1, -3000.0)]
    for x, y, f in truth:
        im, box = psf.compute_image(x, y)
        img[box.slices()] += f * im
    exp = Exposure(image=img, variance=np.full(img.shape, 9.0), psf=psf, wcs=_wcs(),
                   photo_calib=PhotoCalib(2.0), band="r", visit_info=VisitInfo(mjd=60000.5, exposure_time=30.0,
                                                                               visit=1234, detector=7), id=99)
    fps = []
    for x, y, f in truth:
        ix, iy = int(round(x)), int(round(y))
        yy, xx = np.mgrid[-6:7, -6:7]
        fps.append(Footprint(Box(ix - 6, iy - 6, 13, 13), xx**2 + yy**2 <= 36,
                             [Peak(ix, iy, f, significance=abs(f) / 50.0, is_negative=f < 0)], is_negative=f < 0))
    return exp, fps, truth


def test_measured_table_has_schema_columns_and_njy():
    """Every APDB DiaSource column exists with the schema's name, order, and unit; fluxes are nJy (×2.0 of
    counts), moments arcsec² (×0.04 of pixels²), ra/dec from the WCS; the negative source has isNegative and
    a negative psfFlux; unmeasured columns are NaN/False."""
    exp, fps, truth = _difference()
    cols = measure_dia_sources(exp, fps)
    table = build_dia_source_table(cols, exposure=exp)
    names = [c[0] for c in APDB_DIASOURCE_COLUMNS]
    assert table.colnames[: len(names)] == names
    for name, _, unit in APDB_DIASOURCE_COLUMNS:
        if unit in ("nJy", "deg", "pixel", "arcsec**2"):
            assert table[name].unit is not None and table[name].unit.to_string() in (
                unit, "deg", "pix", "arcsec2", "nJy"), name
    np.testing.assert_allclose(table["psfFlux"], 2.0 * cols["psfFlux"], rtol=1e-6)
    np.testing.assert_allclose(table["psfFlux"], [2.0 * 5000, -2.0 * 3000], rtol=0.05)
    np.testing.assert_allclose(table["x"], [t[0] for t in truth], atol=0.1)
    np.testing.assert_allclose(table["ixx"], 4.0 * 0.2**2, rtol=0.1)
    assert list(table["isNegative"]) == [False, True]
    ra, dec = _wcs().all_pix2world(table["x"], table["y"], 0)
    np.testing.assert_allclose(table["ra"], ra)
    assert table["visit"][0] == 1234 and table["detector"][0] == 7 and table["band"][0] == "r"
    assert table["midpointMjdTai"][0] == 60000.5
    assert np.all(table["diaSourceId"] == (99 << 20) + np.arange(1, 3))
    assert np.isnan(table["reliability"]).all() and not table["glint_trail"].any()
    assert table.meta["FLUXUNIT"] == "nJy"


def test_instrumental_without_photocalib_and_aliases():
    """Without PhotoCalib/WCS fluxes stay in counts and moments in pixels² (recorded in meta); LSST-internal
    names are accepted; dipole lobe fluxes become dipoleMeanFlux/dipoleFluxDiff; already-nJy scienceFlux
    columns (from ForcedMeasurementTask) are not converted twice."""
    cols = {"base_PsfFlux_instFlux": np.array([10.0]), "base_SdssShape_xx": np.array([4.0]),
            "slot_Centroid_x": np.array([1.0]), "slot_Centroid_y": np.array([2.0]),
            "ip_diffim_DipoleFit_pos_instFlux": np.array([100.0]), "ip_diffim_DipoleFit_neg_instFlux": np.array([-60.0])}
    t = build_dia_source_table(cols)
    assert t["psfFlux"][0] == 10.0 and t.meta["FLUXUNIT"] == "count" and t.meta["MOMUNIT"] == "pixel**2"
    assert t["ixx"][0] == 4.0 and t["x"][0] == 1.0
    assert t["dipoleMeanFlux"][0] == 80.0 and t["dipoleFluxDiff"][0] == 40.0
    exp, fps, _ = _difference()
    diff = Table(measure_dia_sources(exp, fps))
    ForcedMeasurementTask().run(diff, exp)  # scienceFlux in nJy already
    t2 = build_dia_source_table(diff, exposure=exp)
    np.testing.assert_allclose(t2["scienceFlux"], 2.0 * diff["ip_diffim_forced_PsfFlux_instFlux"], rtol=1e-6)
    with pytest.raises(ValueError, match="different lengths"):
        build_dia_source_table({"x": np.zeros(2), "y": np.zeros(3)})


def test_write_and_read_back_equal(tmp_path):
    """Parquet and FITS are written (no temporary files left) and read back with equal values and units."""
    exp, fps, _ = _difference()
    table = build_dia_source_table(measure_dia_sources(exp, fps), exposure=exp)
    paths = write_catalog(table, tmp_path / "diaSources")
    assert sorted(p.name for p in paths) == ["diaSources.fits", "diaSources.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diaSources.fits", "diaSources.parquet"]
    for p in paths:
        back = read_catalog(p)
        assert back.colnames == table.colnames
        for name in table.colnames:
            a, b = np.asarray(table[name]), np.asarray(back[name])
            if a.dtype.kind == "f":
                np.testing.assert_array_equal(a, b)
            else:
                assert list(a) == list(b), name
        assert back["psfFlux"].unit == table["psfFlux"].unit
        assert back.meta["FLUXUNIT"] == "nJy"


def test_empty_table():
    """Zero sources still give every column (e.g. an empty difference)."""
    t = build_dia_source_table({}, photo_calib=PhotoCalib(1.0))
    assert len(t) == 0 and "pixelFlags_nodataCenter" in t.colnames
