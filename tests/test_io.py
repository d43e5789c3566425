"""Tests of diffim.io: FITS round trips, afw/LSST files, plain telescope images."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from diffim.io import read_exposure, write_exposure
from diffim.model import Exposure, GaussianPsf, ImagePsf, Mask, MaskedImage, PhotoCalib, VisitInfo
from diffim.psf import PixelBasisPsf

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
HOTPANTS = os.path.join(DATA, "lsst_ipdiffim_hotpants_synthetic")
ALERTS = os.path.join(DATA, "alert_triplets_multisurvey")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="shared data not available")


def _sip_wcs() -> WCS:
    """A TAN-SIP WCS (0-based parent pixels) with a rotated CD matrix and a quadratic distortion."""
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    h["CRVAL1"], h["CRVAL2"] = 150.1, 2.2
    h["CRPIX1"], h["CRPIX2"] = 1040.3, 980.7
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -5.0e-5, 1.0e-6, 1.2e-6, 5.1e-5
    h["A_ORDER"] = h["B_ORDER"] = 2
    h["A_2_0"], h["A_0_2"], h["B_1_1"] = 2e-6, -1e-6, 3e-6
    return WCS(h)


def _exposure(psf, seed=0) -> Exposure:
    rng = np.random.default_rng(seed)
    ny, nx = 64, 80
    image = rng.normal(100.0, 10.0, (ny, nx)).astype(np.float32)
    variance = rng.uniform(90.0, 110.0, (ny, nx)).astype(np.float32)
    mask = Mask.zeros((ny, nx))
    mask.set("SAT", rng.random((ny, nx)) < 0.05)
    mask.set("CR", rng.random((ny, nx)) < 0.05)
    mask.set("MY_CUSTOM_PLANE", rng.random((ny, nx)) < 0.05)  # long name → HIERARCH card
    mi = MaskedImage(image, mask, variance, xy0=(1000, 950))
    return Exposure(
        mi,
        psf=psf,
        wcs=_sip_wcs(),
        photo_calib=PhotoCalib(0.437, 0.002),
        band="r",
        visit_info=VisitInfo(mjd=60000.25, exposure_time=30.0, airmass=1.2, visit=42, detector=7),
        metadata={"OBSERVER": "test", "SEEING": 0.8},
        ap_corr_map={"base_PsfFlux_instFlux": 0.98, "base_PsfFlux_instFluxErr": 0.0},
        id=1234,
    )


def _pixel_basis_psf() -> PixelBasisPsf:
    """Degree-1 model whose width grows along x: basis = [G(1.6), dG/dx-like difference, small y term]."""
    g1 = GaussianPsf(1.6, size=21).compute_kernel_image()
    g2 = GaussianPsf(2.2, size=21).compute_kernel_image()
    basis = np.stack([0.5 * (g1 + g2), 0.5 * (g2 - g1), 0.05 * (g2 - g1)])
    return PixelBasisPsf(basis, degree=1, x_offset=1040.0, y_offset=980.0, x_scale=40.0, y_scale=32.0)


PSFS = {
    "gaussian": lambda: GaussianPsf(2.1, sigma_minor=1.7, theta=0.4, average_position=(1030.0, 980.0)),
    "image": lambda: ImagePsf(GaussianPsf(1.9, size=25).compute_kernel_image() + 1e-4),
    "pixelbasis": _pixel_basis_psf,
}


@pytest.mark.parametrize("kind", sorted(PSFS))
def test_round_trip_is_exact(tmp_path, kind):
    """write → read gives bitwise-equal planes, the same planes/bits, WCS, xy0, calibration and PSF.

    The WCS comparison is at several parent positions across a non-zero-xy0 image; a CRPIX shift error of even
    one pixel would move positions by ~0.18″ = 5e-5 deg, far above the 1e-9 deg tolerance.
    """
    exp = _exposure(PSFS[kind]())
    path = tmp_path / "exp.fits"
    write_exposure(exp, path)
    assert [p.name for p in tmp_path.iterdir()] == ["exp.fits"]  # no temporary file left behind
    back = read_exposure(path)
    assert back.xy0 == exp.xy0 == (1000, 950)
    assert back.image.dtype == np.float32 and back.variance.dtype == np.float32 and back.mask.array.dtype == np.int32
    assert np.array_equal(back.image.view(np.int32), exp.image.view(np.int32))
    assert np.array_equal(back.variance.view(np.int32), exp.variance.view(np.int32))
    assert np.array_equal(back.mask.array, exp.mask.array)
    assert back.mask.planes == exp.mask.planes
    xs = np.array([1000.0, 1079.0, 1040.5, 1003.2])
    ys = np.array([950.0, 1013.0, 980.5, 1010.9])
    ra0, dec0 = exp.pixel_to_sky(xs, ys)
    ra1, dec1 = back.pixel_to_sky(xs, ys)
    assert np.max(np.abs(ra1 - ra0)) < 1e-9 and np.max(np.abs(dec1 - dec0)) < 1e-9
    assert back.photo_calib == exp.photo_calib
    assert back.band == "r" and back.id == 1234
    assert back.visit_info.mjd == 60000.25 and back.visit_info.exposure_time == 30.0
    assert back.visit_info.airmass == 1.2 and back.visit_info.visit == 42 and back.visit_info.detector == 7
    assert back.ap_corr_map == exp.ap_corr_map
    assert back.metadata["OBSERVER"] == "test" and back.metadata["SEEING"] == 0.8
    assert type(back.psf) is type(exp.psf)
    for x, y in [(1000.0, 950.0), (1040.0, 980.0), (1079.0, 1013.0)]:
        k0 = exp.psf.compute_kernel_image(x, y)
        k1 = back.psf.compute_kernel_image(x, y)
        assert k0.shape == k1.shape
        assert np.max(np.abs(k1 - k0)) < 1e-6
    assert back.psf.average_position == exp.psf.average_position


def test_pixel_basis_psf_varies_with_position():
    """The PixelBasisPsf used in the round trip really varies: its FWHM grows along x as built."""
    psf = _pixel_basis_psf()
    left, centre, right = (psf.fwhm(x, 980.0) for x in (1000.0, 1040.0, 1080.0))
    assert left < centre < right and right / left > 1.2


def test_write_refuses_overwrite_and_is_atomic(tmp_path):
    """overwrite=False keeps the existing file; a second write replaces it without temp files."""
    exp = _exposure(GaussianPsf(2.0))
    path = tmp_path / "a.fits"
    write_exposure(exp, path)
    from diffim.errors import DiffimIOError

    with pytest.raises(DiffimIOError, match="overwrite=False"):
        write_exposure(exp, path, overwrite=False)
    exp.image[:] = 1.0
    write_exposure(exp, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.fits"]
    assert np.all(read_exposure(path).image == 1.0)


def test_unserialisable_ap_corr_is_skipped(tmp_path, caplog):
    exp = _exposure(GaussianPsf(2.0))
    exp.ap_corr_map = {"a": 1.01, "b": (lambda x, y: 1.0)}
    write_exposure(exp, tmp_path / "x.fits")
    assert read_exposure(tmp_path / "x.fits").ap_corr_map == {"a": 1.01}
    assert "cannot be written" in caplog.text


def _afw_style_file(path, planes: dict[str, int], with_extname=True):
    """A MEF laid out as afw writes it, with MP_ cards in a non-default bit order."""
    ny, nx = 20, 30
    image = np.arange(ny * nx, dtype=np.float32).reshape(ny, nx)
    mask = np.zeros((ny, nx), dtype=np.int32)
    mask[2, 3] = 1 << planes["SAT"]
    mask[4, 5] = 1 << planes["BAD"]
    mask[6, 7] = (1 << planes["STREAK"]) | (1 << planes["CR"])
    var = np.full((ny, nx), 4.0, np.float32)
    hdus = [fits.PrimaryHDU()]
    for name, data in (("IMAGE", image), ("MASK", mask), ("VARIANCE", var)):
        h = fits.ImageHDU(data, name=name if with_extname else None)
        h.header["EXTTYPE"] = name
        h.header["CRVAL1A"], h.header["CRVAL2A"], h.header["CTYPE1A"] = 17, 23, "LINEAR"
        if name == "MASK":
            for pname, bit in planes.items():
                h.header["HIERARCH MP_" + pname] = bit
        hdus.append(h)
    fits.HDUList(hdus).writeto(path)


def test_mask_planes_map_by_name(tmp_path):
    """MP_ cards in a non-default order (SAT=5, BAD=9, CR=0, STREAK=12) map onto our planes by name."""
    planes = {"SAT": 5, "BAD": 9, "CR": 0, "STREAK": 12, "EDGE": 1, "DETECTED": 2}
    path = tmp_path / "afw.fits"
    _afw_style_file(path, planes)
    exp = read_exposure(path)
    m = exp.mask
    assert exp.xy0 == (17, 23)
    assert m.planes["SAT"] == 1 and m.planes["BAD"] == 0 and m.planes["CR"] == 3  # our (afw default) bits
    assert "STREAK" in m.planes
    assert m.get("SAT")[2, 3] and m.array[2, 3] == 1 << 1
    assert m.get("BAD")[4, 5] and m.array[4, 5] == 1 << 0
    assert m.get("STREAK")[6, 7] and m.get("CR")[6, 7]
    assert m.get(["SAT", "BAD", "CR", "STREAK"]).sum() == 3


def test_afw_layout_without_extname(tmp_path):
    """afw MaskedImage files without EXTNAME are found by HDU order 1, 2, 3."""
    planes = {"BAD": 0, "SAT": 1, "CR": 3, "STREAK": 9}
    path = tmp_path / "noname.fits"
    _afw_style_file(path, planes, with_extname=False)
    with fits.open(path, mode="update") as h:
        for i in (1, 2, 3):
            del h[i].header["EXTTYPE"]
    exp = read_exposure(path)
    assert np.all(exp.variance == 4.0) and exp.mask.get("STREAK")[6, 7]


@needs_data
def test_read_lsst_hotpants_masked_image():
    """ip_diffim's scienceMI.fits (uint16 mask, EXTTYPE cards, no EXTNAME): xy0, planes, variance."""
    exp = read_exposure(os.path.join(HOTPANTS, "scienceMI.fits"))
    with fits.open(os.path.join(HOTPANTS, "scienceMI.fits")) as h:
        assert np.array_equal(exp.image, h[1].data.astype(np.float32))
        assert np.array_equal(exp.variance, h[3].data.astype(np.float32))
        assert exp.xy0 == (int(h[1].header["CRVAL1A"]), int(h[1].header["CRVAL2A"]))
    assert exp.shape == (193, 193)
    assert exp.mask.planes["DETECTED_NEGATIVE"] == 6 and exp.mask.planes["INTRP"] == 2
    assert np.median(exp.variance) == 100.0
    assert exp.wcs is None and exp.psf is None


@needs_data
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ALERTS, "lsst_*.fits"))))
def test_read_lsst_alert_stamps(path):
    """LSST alert stamps: SCI/SCI_VAR/SCI_PSF selection, TAN assumed for the CTYPE-less WCS, nJy calibration.

    The WCS check compares with a TAN WCS built by hand from the same cards: the stamp centre must land at the
    same sky position (a wrong CRPIX shift or projection would move it by arcseconds).
    """
    exp = read_exposure(path, hdu="SCI", variance="SCI_VAR", psf="SCI_PSF")
    with fits.open(path) as h:
        sci, var, psf = h["SCI"].data, h["SCI_VAR"].data, h["SCI_PSF"].data
        hdr = h["SCI"].header.copy()
    assert np.array_equal(exp.image, sci.astype(np.float32))
    assert np.array_equal(exp.variance, var.astype(np.float32))
    assert np.allclose(exp.psf.compute_kernel_image(), psf / psf.sum())
    assert 0.1 < exp.pixel_scale() < 0.3  # HSC / LSSTCam: 0.17 / 0.2 arcsec
    hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
    ref = WCS(hdr)
    assert np.allclose(exp.pixel_to_sky(14.5, 14.5), ref.all_pix2world(14.5, 14.5, 0), atol=1e-10, rtol=0)
    assert exp.photo_calib.calibration_mean == 1.0  # BUNIT = nJy


@needs_data
def test_read_roman_tpv_stamp():
    """A TPV WCS (with empty SIP cards) is read with its distortion, and written back as TPV."""
    path = os.path.join(ALERTS, "roman_2240034736.fits")
    exp = read_exposure(path, hdu="SCI")
    assert exp.band == "W146" and abs(exp.visit_info.mjd - 61679.30210648) < 1e-6
    assert 0.09 < exp.pixel_scale() < 0.13  # Roman WFI: 0.11 arcsec
    with fits.open(path) as h:
        hdr = h["SCI"].header
        assert hdr["CTYPE1"] == "RA---TPV"
    assert any(k.startswith("PV1_") for k in exp.wcs.to_header(relax=True))


def _plain(path, data, **cards):
    hdu = fits.PrimaryHDU(data)
    for k, v in cards.items():
        hdu.header[k] = v
    hdu.writeto(path)


def test_plain_int_image_with_bzero_and_gain_model(tmp_path):
    """uint16 stored with BZERO; variance from GAIN/RDNOISE follows the documented model.

    A raw image with sky 1000 ADU, gain 2 and read noise 10 e-: Poisson sky variance 500 + (10/2)² = 525
    ADU², larger than the pixel scatter here (σ = 5 → 25 ADU²), so the model's sky term wins; a star pixel at
    sky + 2000 adds 2000/2 = 1000 ADU².
    """
    rng = np.random.default_rng(1)
    data = (1000 + rng.normal(0, 5, (40, 50))).round().astype(np.uint16)
    data[20, 25] = 3000
    _plain(tmp_path / "raw.fits", data, GAIN=2.0, RDNOISE=10.0, SATURATE=2500, FILTER="g", EXPTIME=60.0)
    with fits.open(tmp_path / "raw.fits") as h:
        assert h[0].header["BZERO"] == 32768
    exp = read_exposure(tmp_path / "raw.fits")
    assert exp.image.dtype == np.float32 and exp.image[20, 25] == 3000.0
    sky = np.median(data)
    assert exp.variance[0, 0] == pytest.approx(max(data[0, 0] - sky, 0) / 2 + sky / 2 + 25, rel=1e-5)
    assert exp.variance[20, 25] == pytest.approx((3000 - sky) / 2 + sky / 2 + 25, rel=1e-5)
    assert exp.mask.get("SAT")[20, 25] and exp.mask.get("SAT").sum() == 1
    assert exp.band == "g" and exp.visit_info.exposure_time == 60.0
    # An explicit gain overrides the card.
    exp4 = read_exposure(tmp_path / "raw.fits", gain=4.0, read_noise=0.0)
    assert exp4.variance[20, 25] == pytest.approx((3000 - sky) / 4 + sky / 4, rel=1e-5)


def test_sky_subtracted_image_uses_measured_sky_noise(tmp_path):
    """For a sky-subtracted image the Poisson sky is gone from the counts: the measured σ² (here 25²) wins."""
    rng = np.random.default_rng(2)
    data = rng.normal(0, 25.0, (200, 200)).astype(np.float32)
    _plain(tmp_path / "sub.fits", data, GAIN=4.0, RDNOISE=5.0)
    exp = read_exposure(tmp_path / "sub.fits")
    assert np.median(exp.variance) == pytest.approx(625.0, rel=0.05)


def test_weight_noise_and_variance_maps(tmp_path):
    """weight → 1/w, noise/err → σ², variance → itself; by name inference and by explicit kind."""
    data = np.ones((10, 12), np.float32)
    sig = np.full((10, 12), 3.0, np.float32)
    _plain(tmp_path / "img.fits", data)
    fits.PrimaryHDU(1 / sig**2).writeto(tmp_path / "img.weight.fits")
    fits.PrimaryHDU(sig).writeto(tmp_path / "img_noise.fits")
    fits.PrimaryHDU(sig**2).writeto(tmp_path / "img_var.fits")
    for name in ("img.weight.fits", "img_noise.fits", "img_var.fits"):
        exp = read_exposure(tmp_path / "img.fits", variance=str(tmp_path / name))
        assert np.allclose(exp.variance, 9.0), name
    exp = read_exposure(tmp_path / "img.fits", variance=str(tmp_path / "img_noise.fits"), variance_kind="variance")
    assert np.allclose(exp.variance, 3.0)


def test_nan_pixels_become_no_data(tmp_path):
    """NaN/inf → NO_DATA, image 0, variance = median finite variance (finite everywhere)."""
    data = np.full((10, 10), 5.0, np.float32)
    data[1, 2] = np.nan
    data[3, 4] = np.inf
    _plain(tmp_path / "n.fits", data)
    var = np.full((10, 10), 2.0, np.float32)
    exp = read_exposure(tmp_path / "n.fits", variance=var)
    nd = exp.mask.get("NO_DATA")
    assert nd[1, 2] and nd[3, 4] and nd.sum() == 2
    assert exp.image[1, 2] == 0 and np.all(np.isfinite(exp.image)) and np.all(exp.variance == 2.0)


def test_mask_file_nonzero_is_bad(tmp_path):
    data = np.zeros((10, 10), np.float32)
    m = np.zeros((10, 10), np.uint8)
    m[5, 6] = 3
    _plain(tmp_path / "i.fits", data)
    fits.PrimaryHDU(m).writeto(tmp_path / "m.fits")
    exp = read_exposure(tmp_path / "i.fits", mask=str(tmp_path / "m.fits"), gain=1.0)
    assert exp.mask.get("BAD")[5, 6] and exp.mask.get("BAD").sum() == 1


def test_cd_without_ctype_assumes_tan(tmp_path):
    hdu = fits.PrimaryHDU(np.zeros((10, 10), np.float32))
    for k, v in dict(CRPIX1=5.0, CRPIX2=5.0, CRVAL1=10.0, CRVAL2=-30.0, CD1_1=-5e-5, CD1_2=0.0, CD2_1=0.0, CD2_2=5e-5).items():
        hdu.header[k] = v
    hdu.writeto(tmp_path / "w.fits")
    exp = read_exposure(tmp_path / "w.fits")
    assert list(exp.wcs.wcs.ctype) == ["RA---TAN", "DEC--TAN"]
    ra, dec = exp.pixel_to_sky(4.0, 4.0)  # CRPIX 5 (1-based) = pixel 4 (0-based)
    assert abs(ra - 10.0) < 1e-12 and abs(dec + 30.0) < 1e-12


def test_ltv_xy0_only_for_integer_unrotated_offsets(tmp_path):
    """IRAF LTV of a cutout (integer, LTM = identity) is an xy0; registration LTV (fractional, rotated) is not."""
    _plain(tmp_path / "cut.fits", np.zeros((5, 5), np.float32), LTV1=-5.0, LTV2=-7.0, GAIN=1.0)
    assert read_exposure(tmp_path / "cut.fits").xy0 == (5, 7)
    _plain(tmp_path / "reg.fits", np.zeros((5, 5), np.float32), LTV1=-17.7, LTV2=-3.0, LTM1_1=0.9996, GAIN=1.0)
    assert read_exposure(tmp_path / "reg.fits").xy0 == (0, 0)


def test_noise_model_ignores_nan_regions(tmp_path):
    """Half the stamp is NaN (as in the WINTER alert): the robust σ comes from the finite half only (σ = 7)."""
    rng = np.random.default_rng(3)
    data = rng.normal(0, 7.0, (100, 100)).astype(np.float32)
    data[:, 50:] = np.nan
    _plain(tmp_path / "half.fits", data)
    exp = read_exposure(tmp_path / "half.fits")
    assert exp.mask.get("NO_DATA").sum() == 5000
    assert np.median(exp.variance) == pytest.approx(49.0, rel=0.1)


def test_decam_filter_card_gives_the_band(tmp_path):
    _plain(tmp_path / "d.fits", np.zeros((5, 5), np.float32), FILTER="i DECam SDSS c0003 7835.0 1470.0", GAIN=1.0)
    assert read_exposure(tmp_path / "d.fits").band == "i"


def test_ap_corr_models_round_trip(tmp_path):
    """Chebyshev aperture-correction models (measure area's ApCorrModel) are written and read back exactly."""
    from diffim.measure.apcorr import ApCorrModel

    exp = _exposure(GaussianPsf(2.0))
    bbox = exp.bbox
    model = ApCorrModel(np.array([[0.97, 0.01, 0.002], [-0.003, 0.001, 0.0], [0.0004, 0.0, 0.0]]), bbox)
    exp.ap_corr_map = {"base_PsfFlux_instFlux": model, "base_PsfFlux_instFluxErr": ApCorrModel.constant(0.0, bbox),
                       "plain": 1.02}
    write_exposure(exp, tmp_path / "ap.fits")
    back = read_exposure(tmp_path / "ap.fits").ap_corr_map
    assert back["plain"] == 1.02
    got = back["base_PsfFlux_instFlux"]
    assert isinstance(got, ApCorrModel) and got.bbox == bbox
    x, y = np.array([1000.0, 1050.0, 1079.0]), np.array([950.0, 990.0, 1013.0])
    assert np.array_equal(got(x, y), model(x, y))
    assert np.all(back["base_PsfFlux_instFluxErr"](x, y) == 0.0)


def test_every_psf_type_in_the_package_can_be_read_back():
    """read_exposure resolves every PSFTYPE the package writes (a ZOGY difference's ZOGY_CELLS was unknown to
    a fresh reader): every class registered with ``@register_psf_type`` in src/ is known after the reader's own
    imports, in a fresh interpreter."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "diffim"
    names = set()
    for path in src.rglob("*.py"):  # classes decorated with @register_psf_type (others write an IMAGE PSF)
        names |= set(re.findall(r'@register_psf_type\s*\nclass \w+[^\n]*\n(?:[^\n]*\n)*?\s+psf_type = "(\w+)"',
                                path.read_text()))
    assert {"GAUSSIAN", "ZOGY_CELLS", "DECORRELATED", "PSFEX"} <= names
    code = ("from diffim.io.fits import _import_psf_types; from diffim.model.psf import psf_type_registry; "
            "_import_psf_types(); print(' '.join(sorted(psf_type_registry())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert names <= set(out), names - set(out)
