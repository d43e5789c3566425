"""Bad inputs raise the documented diffim.errors exception with a one-line message naming the file."""

from __future__ import annotations

import os

import numpy as np
import pytest
from astropy.io import fits

from diffim import errors
from diffim.io import read_exposure, write_exposure
from diffim.model import Exposure, GaussianPsf


def _one_line(excinfo) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert excinfo.value.__cause__ is None or not isinstance(excinfo.value.__cause__, (ValueError, OSError))


def _plain(path, data, **cards):
    hdu = fits.PrimaryHDU(data)
    for k, v in cards.items():
        hdu.header[k] = v
    hdu.writeto(path)
    return str(path)


@pytest.fixture
def image_file(tmp_path):
    return _plain(tmp_path / "img.fits", np.ones((20, 30), np.float32), GAIN=2.0)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.fits")
    with pytest.raises(errors.InputFileNotFoundError, match=r"nope\.fits: file not found") as ei:
        read_exposure(path)
    assert isinstance(ei.value, FileNotFoundError)
    _one_line(ei)


def test_not_a_fits_file(tmp_path):
    path = tmp_path / "notes.fits"
    path.write_text("this is not FITS\n" * 200)
    with pytest.raises(errors.BadInputError, match=r"notes\.fits: not a readable FITS file") as ei:
        read_exposure(path)
    _one_line(ei)


def test_truncated_fits_file(tmp_path):
    full = _plain(tmp_path / "full.fits", np.zeros((100, 100), np.float32))
    data = open(full, "rb").read()
    (tmp_path / "cut.fits").write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.BadInputError, match=r"cut\.fits: not a readable FITS file.*complete") as ei:
        read_exposure(tmp_path / "cut.fits")
    _one_line(ei)


def test_missing_requested_hdus(image_file):
    with pytest.raises(errors.MissingHduError, match=r"img\.fits: no image HDU 'SCI'.*HDUs \['PRIMARY'\]") as ei:
        read_exposure(image_file, hdu="SCI")
    _one_line(ei)
    with pytest.raises(errors.MissingHduError, match=r"no variance HDU 'SCI_VAR'"):
        read_exposure(image_file, variance="SCI_VAR")
    with pytest.raises(errors.MissingHduError, match=r"no PSF HDU 'SCI_PSF'"):
        read_exposure(image_file, psf="SCI_PSF")


def test_afw_file_missing_variance_hdu_requested(tmp_path):
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(np.zeros((5, 5), np.float32), name="IMAGE")]
    fits.HDUList(hdus).writeto(tmp_path / "mef.fits")
    with pytest.raises(errors.MissingHduError, match=r"mef\.fits: no variance HDU 'VARIANCE'"):
        read_exposure(tmp_path / "mef.fits", variance="VARIANCE")


def test_variance_shape_mismatch(tmp_path, image_file):
    var = _plain(tmp_path / "var.fits", np.ones((21, 30), np.float32))
    with pytest.raises(errors.ShapeMismatchError, match=r"img\.fits: variance shape \(21, 30\) differs from image shape \(20, 30\)") as ei:
        read_exposure(image_file, variance=var)
    _one_line(ei)


def test_mask_file_wrong_shape(tmp_path, image_file):
    m = _plain(tmp_path / "mask.fits", np.zeros((20, 31), np.uint8))
    with pytest.raises(errors.ShapeMismatchError, match=r"mask shape \(20, 31\) differs from image shape \(20, 30\)"):
        read_exposure(image_file, mask=m)


def test_unknown_mask_plane_requested(image_file):
    exp = read_exposure(image_file)
    with pytest.raises(errors.MaskPlaneError, match=r"Unknown mask plane 'NOT_A_PLANE'.*add_plane") as ei:
        exp.mask.get("NOT_A_PLANE")
    _one_line(ei)


def test_unreadable_psf_hdus(tmp_path):
    base = [fits.PrimaryHDU(np.ones((9, 9), np.float32))]
    bad_type = fits.ImageHDU(np.ones((5, 5)), name="PSF")
    bad_type.header["PSFTYPE"] = "NO_SUCH_MODEL"
    fits.HDUList(base + [bad_type]).writeto(tmp_path / "t.fits")
    with pytest.raises(errors.PsfError, match=r"t\.fits: unknown PSFTYPE 'NO_SUCH_MODEL'") as ei:
        read_exposure(tmp_path / "t.fits", gain=1.0)
    _one_line(ei)
    wrong = fits.ImageHDU(np.ones((4, 9, 9)), name="PSF")  # degree 1 needs 3 basis images, not 4
    for k, v in dict(PSFTYPE="PIXELBASIS", POLDEG=1, XOFFSET=0.0, YOFFSET=0.0, XSCALE=1.0, YSCALE=1.0).items():
        wrong.header[k] = v
    fits.HDUList([fits.PrimaryHDU(np.ones((9, 9), np.float32)), wrong]).writeto(tmp_path / "w.fits")
    with pytest.raises(errors.PsfError, match=r"w\.fits: cannot read the PIXELBASIS PSF.*needs 3 basis images"):
        read_exposure(tmp_path / "w.fits", gain=1.0)
    nan_psf = fits.ImageHDU(np.full((5, 5), np.nan), name="MYPSF")
    fits.HDUList([fits.PrimaryHDU(np.ones((9, 9), np.float32)), nan_psf]).writeto(tmp_path / "n.fits")
    with pytest.raises(errors.PsfError, match=r"n\.fits\[MYPSF\]: the PSF image contains non-finite values"):
        read_exposure(tmp_path / "n.fits", psf="MYPSF", gain=1.0)


def test_bad_psfex_files(tmp_path):
    from diffim.psf import read_psfex
    from diffim.psf.psfex import write_psfex

    _plain(tmp_path / "img.psf", np.ones((5, 5), np.float32))
    with pytest.raises(errors.PsfError, match=r"img\.psf: no PSF_DATA extension; this is not a PSFEx") as ei:
        read_psfex(tmp_path / "img.psf")
    _one_line(ei)
    write_psfex(tmp_path / "deg.psf", np.ones((4, 9, 9)), degree=2)  # degree 2 needs 6 images
    with pytest.raises(errors.PsfError, match=r"deg\.psf: PSF_MASK has 4 basis images but a degree-2 polynomial needs 6"):
        read_psfex(tmp_path / "deg.psf")
    (tmp_path / "junk.psf").write_bytes(b"\x00" * 100)
    with pytest.raises(errors.PsfError, match=r"junk\.psf: cannot read the PSFEx file"):
        read_psfex(tmp_path / "junk.psf")
    with pytest.raises(errors.InputFileNotFoundError, match=r"missing\.psf: PSFEx file not found"):
        read_psfex(tmp_path / "missing.psf")


def test_non_finite_wcs(tmp_path):
    cards = dict(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRPIX1=5.0, CRPIX2=5.0, CRVAL1=10.0, CRVAL2=20.0,
                 CD1_1=1.25, CD1_2=0.0, CD2_1=0.0, CD2_2=1e-4)
    path = tmp_path / "wcs.fits"
    hdu = fits.PrimaryHDU(np.ones((10, 10), np.float32))
    for k, v in cards.items():
        hdu.header[k] = v
    hdu.writeto(path)
    # astropy refuses to write NaN cards; patch the bytes as a broken pipeline would have written them.
    raw = path.read_bytes()
    card = fits.Card("CD1_1", 1.25).image.encode()
    assert card in raw
    path.write_bytes(raw.replace(card, b"CD1_1   =                  NaN".ljust(80)))
    with pytest.raises(errors.WcsError, match=r"wcs\.fits: the WCS has non-finite") as ei:
        read_exposure(path, gain=1.0)
    _one_line(ei)


def test_empty_image(tmp_path):
    path = _plain(tmp_path / "empty.fits", np.zeros((0, 5), np.float32))
    with pytest.raises(errors.BadInputError, match=r"empty\.fits: the image HDU is empty \(shape \(0, 5\)\)") as ei:
        read_exposure(path)
    _one_line(ei)
    path = _plain(tmp_path / "nodata.fits", None)
    with pytest.raises(errors.MissingHduError, match=r"nodata\.fits: no image HDU with data"):
        read_exposure(path)


def test_all_nan_image(tmp_path):
    path = _plain(tmp_path / "nan.fits", np.full((8, 8), np.nan, np.float32))
    with pytest.raises(errors.BadInputError, match=r"nan\.fits: every image \(or variance\) pixel is NaN") as ei:
        read_exposure(path)
    _one_line(ei)


@pytest.mark.parametrize("gain", [-2.0, 0.0, float("nan"), "abc"])
def test_invalid_gain_argument(image_file, gain):
    with pytest.raises(errors.BadInputError, match=r"img\.fits: gain=.* (is invalid|is not a number)") as ei:
        read_exposure(image_file, gain=gain)
    _one_line(ei)


def test_invalid_gain_card(tmp_path):
    path = _plain(tmp_path / "g.fits", np.ones((5, 5), np.float32), GAIN=-1.5)
    with pytest.raises(errors.BadInputError, match=r"g\.fits: GAIN card=-1\.5 is invalid; it must be a finite number > 0"):
        read_exposure(path)
    path = _plain(tmp_path / "rn.fits", np.ones((5, 5), np.float32), GAIN=1.0, RDNOISE=-3.0)
    with pytest.raises(errors.BadInputError, match=r"rn\.fits: read noise -3\.0 is invalid"):
        read_exposure(path)


def _exp():
    return Exposure(image=np.ones((10, 10), np.float32), psf=GaussianPsf(1.5))


def test_write_to_missing_directory(tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "out.fits"
    with pytest.raises(errors.DiffimIOError, match=r"out\.fits: directory .*dir does not exist; create it first") as ei:
        write_exposure(_exp(), target)
    _one_line(ei)
    assert not (tmp_path / "no").exists()


def test_write_to_unwritable_directory_leaves_nothing(tmp_path, monkeypatch):
    """Permission denied when creating the temporary file → DiffimIOError, directory untouched.

    Root ignores file permissions, so the refusal is simulated at the tempfile layer when running as root.
    """
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        import tempfile

        def deny(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", deny)
    else:
        d.chmod(0o500)
    try:
        with pytest.raises(errors.DiffimIOError, match=r"out\.fits: cannot write in .*ro \(Permission denied\); check permissions"):
            write_exposure(_exp(), d / "out.fits")
        assert list(d.iterdir()) == []
    finally:
        d.chmod(0o700)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A write that fails half-way (disk full) removes its temporary file and keeps the old file intact."""
    target = tmp_path / "out.fits"
    write_exposure(_exp(), target)
    before = target.read_bytes()

    def fail(self, fileobj, **kwargs):
        fileobj.write(b"SIMPLE  =                    T" + b" " * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fits.HDUList, "writeto", fail)
    with pytest.raises(errors.DiffimIOError, match=r"out\.fits: write failed \(No space left on device\); nothing was written") as ei:
        write_exposure(_exp(), target)
    _one_line(ei)
    assert [p.name for p in tmp_path.iterdir()] == ["out.fits"]
    assert target.read_bytes() == before


def test_template_of_another_shape_without_wcs_or_origin_is_refused():
    """Without a WCS or pixel origins nothing says how arrays of different shapes lie on each other; taking
    their first pixels as the same one subtracted unrelated pixels (119 DIA sources instead of 3 on a real
    crop) without a word."""
    from diffim import ImageDifferenceTask

    rng = np.random.default_rng(1)
    sci = Exposure(image=rng.normal(100, 5, (64, 64)).astype(np.float32), variance=np.full((64, 64), 25, np.float32),
                   psf=GaussianPsf(1.5))
    tpl = Exposure(image=rng.normal(100, 5, (80, 90)).astype(np.float32), variance=np.full((80, 90), 25, np.float32),
                   psf=GaussianPsf(1.5))
    with pytest.raises(errors.ShapeMismatchError, match=r"differ in shape, neither has a WCS.*LTV1") as ei:
        ImageDifferenceTask().run(exposure=sci, templateExposure=tpl)
    _one_line(ei)
    # An origin on the science places it on the template: then the arrays are aligned by their bboxes.
    placed = Exposure(image=sci.image, variance=sci.variance, psf=sci.psf, xy0=(10, 8))
    assert ImageDifferenceTask()._align_template(placed, tpl, None, None) is tpl
