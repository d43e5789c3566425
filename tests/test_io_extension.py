"""``'file.fits[EXT]'``: one extension of a multi-extension file as an input (:func:`diffim.io.fits.split_extension`)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from diffim import errors
from diffim.io import read_exposure
from diffim.io.fits import split_extension


@pytest.fixture
def mef(tmp_path):
    """SCI, TMPL, SCI_VAR and SCI_PSF extensions in one file, as alert stamps come."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[-7:8, -7:8]
    psf = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    hdus = [fits.PrimaryHDU()]
    for name, level in (("SCI", 100.0), ("TMPL", 200.0)):
        hdus.append(fits.ImageHDU(rng.normal(level, 5.0, (40, 50)).astype(np.float32), name=name))
    hdus.append(fits.ImageHDU(np.full((40, 50), 25.0, np.float32), name="SCI_VAR"))
    hdus.append(fits.ImageHDU((psf / psf.sum()).astype(np.float32), name="SCI_PSF"))
    path = tmp_path / "stamps.fits"
    fits.HDUList(hdus).writeto(path)
    return str(path)


def test_split_extension(tmp_path):
    assert split_extension("a.fits[SCI]") == ("a.fits", "SCI")
    assert split_extension("dir/a.fits[2]") == ("dir/a.fits", 2)
    assert split_extension("a.fits") == ("a.fits", None)
    odd = tmp_path / "odd[1].fits"
    odd.write_bytes(b"")
    assert split_extension(str(odd)) == (str(odd), None)  # brackets inside a real name are not an extension
    literal = tmp_path / "literal.fits[3]"
    literal.write_bytes(b"")
    assert split_extension(str(literal)) == (str(literal), None)


def test_read_by_name_and_index(mef):
    by_name = read_exposure(f"{mef}[TMPL]")
    assert np.array_equal(by_name.image, read_exposure(mef, hdu="TMPL").image)
    assert np.array_equal(read_exposure(f"{mef}[2]").image, by_name.image)
    assert abs(float(np.median(by_name.image)) - 200.0) < 2.0


def test_companions_in_brackets(mef):
    exp = read_exposure(f"{mef}[SCI]", variance=f"{mef}[SCI_VAR]", psf=f"{mef}[SCI_PSF]")
    assert np.allclose(exp.variance, 25.0)
    assert exp.psf is not None and exp.psf.fwhm() == pytest.approx(2.355 * 1.5, rel=0.05)


def test_bad_extension_and_conflict(mef):
    with pytest.raises(errors.MissingHduError, match=r"no image HDU 'DIFF'.*SCI_PSF"):
        read_exposure(f"{mef}[DIFF]")
    with pytest.raises(errors.BadInputError, match="disagree"):
        read_exposure(f"{mef}[SCI]", hdu="TMPL")


def test_same_extension_twice_is_refused_two_are_a_pair(mef):
    from diffim.pipeline import _read_pair

    with pytest.raises(errors.BadInputError, match="same file"):
        _read_pair(f"{mef}[SCI]", f"{mef}[SCI]")
    with pytest.raises(errors.PsfError):  # a real pair, read as one: it fails only later, for want of stars
        _read_pair(f"{mef}[SCI]", f"{mef}[TMPL]", repair_cosmic_rays=False)


def test_output_guards_see_the_file_behind_an_extension(mef, tmp_path):
    """'file.fits[SCI]' reads file.fits: `subtract -o file.fits` must refuse it as an input, and `run -o` the
    directory holding it (the guards compared the bracketed spelling, which names no file)."""
    from pathlib import Path

    from diffim.pipeline import _check_outdir, _check_output_file, _input_paths

    inputs = _input_paths(f"{mef}[SCI]", f"{mef}[TMPL]", {"variance": f"{mef}[SCI_VAR]"})
    assert Path(mef) in inputs
    with pytest.raises(errors.DiffimIOError, match="is the input"):
        _check_output_file(mef, inputs)
    with pytest.raises(errors.DiffimIOError, match="holds the input"):
        _check_outdir(Path(mef).parent, overwrite=True, inputs=inputs)
