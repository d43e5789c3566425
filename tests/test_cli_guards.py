"""Guards of ``diffim run`` / ``diffim subtract``: outputs that would destroy files, pairs with nothing to subtract.

* ``--overwrite`` replaces only an earlier output directory: never a file, an input, a directory holding an
  input, or a directory with files diffim did not write; ``subtract -o`` never writes onto an input and checks
  its directory before the subtraction;
* the same file, or identical pixels, as science and template is refused;
* science and template in different bands are refused unless ``--allow-band-mismatch``;
* a failed PSF estimation names the image and the option that supplies a PSF.

The commands run in-process through :func:`diffim.cli.main`. Refusals that must come before any image is read
run with the reader replaced by one that fails the test (exit code 1 instead of 2), which proves the order.
One 256² simulated pair is written once per module; tests that could damage files work on copies.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from diffim.cli import EXIT_BAD_INPUT, EXIT_OK, main

SIZE = 256
SEED = 5
#: Stand-in content of the files of a fake earlier output directory; a real run never writes these bytes.
DUMMY = b"an earlier run"


@pytest.fixture(scope="module")
def simdir(tmp_path_factory) -> Path:
    """``diffim simulate`` output (science.fits, template.fits in the diffim layout, band 'r', with PSFs)."""
    out = tmp_path_factory.mktemp("guards") / "sim"
    assert main(["-q", "simulate", str(out), "--size", str(SIZE), "--seed", str(SEED)]) == EXIT_OK
    return out


@pytest.fixture
def pair(simdir, tmp_path) -> tuple[Path, Path]:
    """A private copy of the simulated pair in ``tmp_path/in``, so a guard that fails cannot damage the
    module's files."""
    indir = tmp_path / "in"
    indir.mkdir()
    sci, tpl = indir / "science.fits", indir / "template.fits"
    shutil.copyfile(simdir / "science.fits", sci)
    shutil.copyfile(simdir / "template.fits", tpl)
    return sci, tpl


@pytest.fixture
def no_reading(monkeypatch) -> None:
    """Make reading an image fail the test: the guard under test must refuse before any input is read."""
    import diffim.pipeline

    def _fail(path, kwargs):
        raise AssertionError(f"{path} was read before the output was checked")

    monkeypatch.setattr(diffim.pipeline, "_read_one", _fail)


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("diffim:")]
    assert len(lines) == 1, err
    return lines[0]


def _fake_output_dir(path: Path, names=("config.py", "metadata.json", "difference.fits")) -> Path:
    """A directory that looks like an earlier ``diffim run`` output (names only; the content is `DUMMY`)."""
    path.mkdir()
    for name in names:
        (path / name).write_bytes(DUMMY)
    return path


def _snapshot(*paths: Path) -> dict[Path, bytes]:
    """The bytes of every file under ``paths``, to prove afterwards that nothing was touched."""
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    return {f: f.read_bytes() for f in files}


# ---------------------------------------------------------------------------------------------- P8: run -o


def test_overwrite_refuses_a_file(pair, tmp_path, capsys, no_reading):
    """-o naming a regular file: refused with --overwrite (it is not an output directory), the file kept."""
    sci, tpl = pair
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    code = main(["run", str(sci), str(tpl), "-o", str(target), "--overwrite"])
    assert code == EXIT_BAD_INPUT
    line = _one_line_error(capsys.readouterr().err)
    assert str(target) in line and "file" in line
    assert target.read_text() == "keep me"


def test_overwrite_refuses_an_input_file(pair, capsys, no_reading):
    """-o naming the science file itself: refused, the science file unchanged."""
    sci, tpl = pair
    before = _snapshot(sci, tpl)
    code = main(["run", str(sci), str(tpl), "-o", str(sci), "--overwrite"])
    assert code == EXIT_BAD_INPUT
    assert str(sci) in _one_line_error(capsys.readouterr().err)
    assert _snapshot(sci, tpl) == before


def test_overwrite_refuses_the_directory_holding_the_inputs(pair, capsys, no_reading):
    """-o naming the inputs' directory: refused and the message names an input; nothing in it is touched."""
    sci, tpl = pair
    before = _snapshot(sci.parent)
    code = main(["run", str(sci), str(tpl), "-o", str(sci.parent), "--overwrite"])
    assert code == EXIT_BAD_INPUT
    line = _one_line_error(capsys.readouterr().err)
    assert "science.fits" in line or "template.fits" in line
    assert _snapshot(sci.parent) == before


@pytest.mark.parametrize("which", ["science", "template-psf", "coadd-dir"])
def test_overwrite_refuses_an_earlier_output_holding_an_input(pair, tmp_path, capsys, no_reading, which):
    """A directory that looks like an earlier output (only diffim's file names) but holds or is an input —
    the science image, a companion file, the coadd directory — is refused, naming that input. The input sits
    under a name diffim writes (``difference.fits``), so only the input rule can refuse it."""
    sci, tpl = pair
    out = _fake_output_dir(tmp_path / "out")
    inside = out / "difference.fits"
    shutil.copyfile(sci, inside)
    if which == "science":
        argv = ["run", str(inside), str(tpl)]
    elif which == "template-psf":
        argv = ["run", str(sci), str(tpl), "--template-psf", str(inside)]
    else:
        argv = ["run", str(sci), "--coadd-dir", str(out)]
    before = _snapshot(out)
    code = main([*argv, "-o", str(out), "--overwrite"])
    assert code == EXIT_BAD_INPUT
    line = _one_line_error(capsys.readouterr().err)
    assert "input" in line and (str(inside) in line if which != "coadd-dir" else str(out) in line)
    assert _snapshot(out) == before


def test_overwrite_refuses_a_directory_with_other_files(pair, tmp_path, capsys, no_reading):
    """An earlier output to which the user added a file: refused, the message names that file."""
    sci, tpl = pair
    out = _fake_output_dir(tmp_path / "out")
    (out / "my_notes.txt").write_text("keep me")
    before = _snapshot(out)
    code = main(["run", str(sci), str(tpl), "-o", str(out), "--overwrite"])
    assert code == EXIT_BAD_INPUT
    assert "my_notes.txt" in _one_line_error(capsys.readouterr().err)
    assert _snapshot(out) == before


def test_overwrite_refuses_a_directory_without_config(pair, tmp_path, capsys, no_reading):
    """Every run writes config.py: a non-empty directory without it was not written by ``diffim run``."""
    sci, tpl = pair
    out = _fake_output_dir(tmp_path / "out", names=("difference.fits",))
    code = main(["run", str(sci), str(tpl), "-o", str(out), "--overwrite"])
    assert code == EXIT_BAD_INPUT
    assert "config.py" in _one_line_error(capsys.readouterr().err)
    assert (out / "difference.fits").read_bytes() == DUMMY


def test_overwrite_replaces_an_earlier_output(pair, tmp_path, capsys):
    """What --overwrite is for still works: an earlier output directory is replaced by the new outputs, and
    no temporary or old directory is left next to it."""
    sci, tpl = pair
    out = _fake_output_dir(tmp_path / "out")
    code = main(["-q", "run", str(sci), str(tpl), "-o", str(out), "--overwrite", "--no-plot"])
    assert code == EXIT_OK, capsys.readouterr().err
    assert (out / "config.py").read_bytes() != DUMMY
    assert (out / "difference.fits").read_bytes()[:6] == b"SIMPLE"
    assert {"config.py", "metadata.json", "difference.fits", "diaSources.fits"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_existing_file_without_overwrite_is_called_a_file(pair, tmp_path, capsys, no_reading):
    """Without --overwrite an existing -o is still refused, and a file is called a file, not a directory."""
    sci, tpl = pair
    target = tmp_path / "result"
    target.write_text("keep me")
    code = main(["run", str(sci), str(tpl), "-o", str(target)])
    assert code == EXIT_BAD_INPUT
    line = _one_line_error(capsys.readouterr().err)
    assert "file" in line and "directory already exists" not in line
    assert target.read_text() == "keep me"


def test_demo_replaces_its_own_results(tmp_path, capsys):
    """``diffim demo`` re-run into the same directory replaces OUTDIR/results (overwrite semantics) with its
    inputs in the sibling OUTDIR/inputs: the guards must not refuse it."""
    out = tmp_path / "demo"
    out.mkdir()
    _fake_output_dir(out / "results", names=("config.py", "metadata.json", "difference.fits", "diagnostics.png"))
    code = main(["-q", "demo", str(out), "--size", str(SIZE), "--seed", "1"])
    assert code == EXIT_OK, capsys.readouterr().err
    assert (out / "results" / "config.py").read_bytes() != DUMMY
    assert (out / "inputs" / "science.fits").is_file()


# ----------------------------------------------------------------------------------------- P8: subtract -o


@pytest.mark.parametrize("spelling", ["science", "template", "science via .."])
def test_subtract_refuses_to_write_onto_an_input(pair, capsys, no_reading, spelling):
    """-o resolving to an input (also spelled through ``..``): refused before reading, the input unchanged."""
    sci, tpl = pair
    target = {"science": sci, "template": tpl,
              "science via ..": sci.parent / ".." / sci.parent.name / sci.name}[spelling]
    before = _snapshot(sci, tpl)
    code = main(["subtract", str(sci), str(tpl), "-o", str(target)])
    assert code == EXIT_BAD_INPUT
    assert "input" in _one_line_error(capsys.readouterr().err)
    assert _snapshot(sci, tpl) == before


def test_subtract_checks_the_output_directory_first(pair, tmp_path, capsys, no_reading):
    """A missing output directory is reported before the (slow) subtraction, not after it."""
    sci, tpl = pair
    target = tmp_path / "no" / "such" / "diff.fits"
    code = main(["subtract", str(sci), str(tpl), "-o", str(target)])
    assert code == EXIT_BAD_INPUT
    assert "does not exist" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "no").exists()


def test_subtract_refuses_a_directory_as_output(pair, tmp_path, capsys, no_reading):
    """-o naming an existing directory is refused up front (it used to fail only when writing)."""
    sci, tpl = pair
    code = main(["subtract", str(sci), str(tpl), "-o", str(tmp_path)])
    assert code == EXIT_BAD_INPUT
    assert "directory" in _one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------------------- P9: nothing to subtract


@pytest.mark.parametrize("command", ["run", "subtract"])
def test_same_file_twice_is_refused(pair, tmp_path, capsys, no_reading, command):
    """The same file as science and template (here also spelled differently) is refused before reading."""
    sci, _ = pair
    other_spelling = sci.parent / "." / sci.name
    code = main([command, str(sci), str(other_spelling), "-o", str(tmp_path / "out")])
    assert code == EXIT_BAD_INPUT
    assert "nothing to subtract" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_identical_pixels_are_refused(simdir, tmp_path, capsys):
    """Two files with identical pixels — plain FITS, NaN pixels included, different headers — are refused:
    NaN ≠ NaN must not make two copies look different."""
    from diffim.io import read_exposure

    image = read_exposure(simdir / "science.fits").image.copy()
    image[10:20, 30:40] = np.nan
    a, b = tmp_path / "a.fits", tmp_path / "b.fits"
    fits.PrimaryHDU(image, header=fits.Header({"OBJECT": "first"})).writeto(a)
    fits.PrimaryHDU(image, header=fits.Header({"OBJECT": "second"})).writeto(b)
    code = main(["run", str(a), str(b), "-o", str(tmp_path / "out")])
    assert code == EXIT_BAD_INPUT
    line = _one_line_error(capsys.readouterr().err)
    assert "identical" in line and "nothing to subtract" in line
    assert not (tmp_path / "out").exists()


def test_two_hdus_of_one_file_are_a_pair(simdir, tmp_path, monkeypatch):
    """Science and template in different HDUs of one file are a legitimate pair: the same-file rule applies
    only to the same HDU twice. (Preparation is stubbed out: only the guard is under test.)"""
    import diffim.pipeline
    from diffim.errors import BadInputError
    from diffim.io import read_exposure

    sci = read_exposure(simdir / "science.fits").image
    tpl = read_exposure(simdir / "template.fits").image
    path = tmp_path / "both.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(sci, name="SCI"), fits.ImageHDU(tpl, name="TMPL")]).writeto(path)
    monkeypatch.setattr(diffim.pipeline, "prepare_exposure", lambda exposure, **kw: exposure)
    science, template = diffim.pipeline._read_pair(path, path, {"hdu": "SCI"}, {"hdu": "TMPL"})
    assert not np.array_equal(science.image, template.image)
    with pytest.raises(BadInputError, match="nothing to subtract"):
        diffim.pipeline._read_pair(path, path, {"hdu": "SCI"}, {"hdu": "SCI"})


# ----------------------------------------------------------------------------------------- P5: band check


def _with_band(src: Path, dst: Path, band: str | None) -> Path:
    """A copy of the diffim file ``src`` whose BAND/FILTER cards say ``band`` (None: no band at all)."""
    shutil.copyfile(src, dst)
    with fits.open(dst, mode="update") as hdul:
        for hdu in hdul:
            for key in ("BAND", "FILTER", "FILTER1"):
                if key in hdu.header:
                    del hdu.header[key]
        if band is not None:
            hdul[0].header["BAND"] = band
    return dst


@pytest.mark.parametrize("command", ["run", "subtract"])
def test_band_mismatch_is_refused(pair, tmp_path, capsys, command):
    """Science in 'r', template in 'Halpha': refused; the message names both bands, both files and the flag."""
    sci, tpl = pair
    halpha = _with_band(tpl, tmp_path / "tpl_halpha.fits", "Halpha")
    out = tmp_path / ("out" if command == "run" else "diff.fits")
    code = main([command, str(sci), str(halpha), "-o", str(out)])
    assert code == EXIT_BAD_INPUT
    line = _one_line_error(capsys.readouterr().err)
    assert "'r'" in line and "'Halpha'" in line and str(sci) in line and str(halpha) in line
    assert "--allow-band-mismatch" in line
    assert not out.exists()


def test_allow_band_mismatch_subtracts_with_a_warning(pair, tmp_path, capsys, caplog):
    """--allow-band-mismatch turns the refusal into a logged warning naming both bands; the difference is
    written."""
    sci, tpl = pair
    halpha = _with_band(tpl, tmp_path / "tpl_halpha.fits", "Halpha")
    out = tmp_path / "diff.fits"
    with caplog.at_level(logging.WARNING, logger="diffim.pipeline"):
        code = main(["-q", "subtract", str(sci), str(halpha), "-o", str(out), "--allow-band-mismatch"])
    assert code == EXIT_OK, capsys.readouterr().err
    assert out.is_file()
    warned = [r.getMessage() for r in caplog.records if r.name == "diffim.pipeline" and r.levelno == logging.WARNING]
    assert any("'r'" in m and "'Halpha'" in m for m in warned), warned


@pytest.mark.parametrize("sci_band, tpl_band", [("r", " R "), ("r", None), (None, "Halpha"), ("", "g")])
def test_band_check_ignores_case_blanks_and_missing_bands(sci_band, tpl_band):
    """Only two non-empty, different labels are a mismatch: case and surrounding blanks do not count, and a
    missing band (plain frames often have none) says nothing."""
    from diffim.model import Exposure, MaskedImage
    from diffim.pipeline import _check_pair

    rng = np.random.default_rng(0)

    def exposure(band):
        image = rng.normal(100.0, 10.0, (32, 32)).astype(np.float32)
        return Exposure(MaskedImage(image, None, np.full_like(image, 100.0)), band=band)

    _check_pair(exposure(sci_band), exposure(tpl_band), "s.fits", "t.fits")  # must not raise


# -------------------------------------------------------------------------------- P2: PSF estimation label


@pytest.mark.parametrize("side", ["science", "template"])
def test_psf_failure_names_the_image_and_the_option(side):
    """A starless image without a PSF: the error of estimate_psf comes back as the same class, prefixed with
    the image's label and ending with the option that gives a PSF for that side. Its own wording (owned by
    diffim.psf) is only required to survive, not to read any particular way."""
    from diffim.errors import PsfError
    from diffim.model import Exposure, MaskedImage
    from diffim.pipeline import prepare_exposure
    from diffim.psf import estimate_psf

    image = np.random.default_rng(1).normal(100.0, 10.0, (128, 128)).astype(np.float32)

    def starless():
        return Exposure(MaskedImage(image.copy(), None, np.full_like(image, 100.0)))

    with pytest.raises(PsfError) as direct:
        estimate_psf(starless())
    with pytest.raises(PsfError) as wrapped:
        prepare_exposure(starless(), label=f"{side} img.fits", repair_cosmic_rays=False)
    message = str(wrapped.value)
    assert type(wrapped.value) is type(direct.value)
    assert message.startswith(f"{side} img.fits: ")
    assert message.endswith(f"or give a PSF model with --{side}-psf FILE")
    assert "provide a PSF model for this image" not in message
    assert str(direct.value).strip().rstrip(".") in message


def test_cli_psf_failure_names_the_template(pair, tmp_path, capsys):
    """``diffim run`` with a starless plain template: one error line naming the template file and
    --template-psf, exit code 2."""
    sci, _ = pair
    noise = tmp_path / "noise.fits"
    fits.PrimaryHDU(np.random.default_rng(2).normal(100.0, 10.0, (SIZE, SIZE)).astype(np.float32)).writeto(noise)
    code = main(["run", str(sci), str(noise), "-o", str(tmp_path / "out"), "--cr-repair", "no"])
    assert code == EXIT_BAD_INPUT
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith(f"diffim: error: template {noise}: ")
    assert line.endswith("or give a PSF model with --template-psf FILE")


# ------------------------------------------------------------------------------------------------ --help


@pytest.mark.parametrize("command", ["run", "subtract"])
def test_help_documents_the_new_switches(command, capsys):
    """``diffim run --help`` and ``diffim subtract --help`` still work and document --allow-band-mismatch
    (and, for run, what --overwrite will replace)."""
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--allow-band-mismatch" in text
    if command == "run":
        assert "--overwrite" in text and "earlier run" in text
