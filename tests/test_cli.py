"""The ``diffim`` command line: simulate, subtract, run; config overrides; errors and exit codes.

The commands run in-process through :func:`diffim.cli.main` (fast, output captured with capsys); one test runs
the installed console script in a subprocess to prove the entry point works. One 512² simulated pair is written
once per module and shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffim.cli import EXIT_BAD_INPUT, EXIT_OK, main

SIZE = 512
SEED = 5
_RUNS: dict = {}


@pytest.fixture(scope="module")
def simdir(tmp_path_factory):
    """``diffim simulate`` output (science.fits, template.fits, truth) for the whole module."""
    out = tmp_path_factory.mktemp("cli") / "sim"
    code = main(["simulate", str(out), "--size", str(SIZE), "--seed", str(SEED)])
    assert code == EXIT_OK
    return out


@pytest.fixture(scope="module")
def run_dir(simdir):
    """``diffim run`` on the simulated pair (default config)."""
    out = simdir.parent / "run"
    code = main(["-q", "run", str(simdir / "science.fits"), str(simdir / "template.fits"), "-o", str(out)])
    assert code == EXIT_OK
    return out


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("diffim:")]
    assert len(lines) == 1, err
    return lines[0]


def test_simulate_writes_science_template_truth(simdir, capsys):
    from astropy.table import Table

    from diffim.io import read_exposure

    for name in ("science.fits", "template.fits", "truth.fits"):
        assert (simdir / name).is_file()
    sci = read_exposure(simdir / "science.fits")
    tmpl = read_exposure(simdir / "template.fits")
    assert sci.shape == (SIZE, SIZE) and tmpl.shape == (SIZE, SIZE)
    assert sci.psf is not None and tmpl.psf is not None
    truth = Table.read(simdir / "truth.fits")
    assert {"x", "y", "kind", "delta_flux"} <= set(truth.colnames)
    kinds = [k.decode() if isinstance(k, bytes) else str(k) for k in truth["kind"]]
    assert kinds.count("transient") > 3


def test_subtract_writes_a_readable_difference(simdir, tmp_path, capsys):
    """``diffim subtract`` writes a difference exposure whose noise is that of two independent images."""
    from diffim.io import read_exposure

    out = tmp_path / "diff.fits"
    code = main(["subtract", str(simdir / "science.fits"), str(simdir / "template.fits"), "-o", str(out)])
    assert code == EXIT_OK
    printed = capsys.readouterr().out
    assert str(out) in printed and "nan" not in printed
    diff = read_exposure(out)
    assert diff.shape == (SIZE, SIZE) and diff.psf is not None
    bad = diff.mask.get(["NO_DATA", "EDGE", "SAT", "BAD", "CR", "DETECTED", "DETECTED_NEGATIVE"], ignore_missing=True)
    z = (diff.image / np.sqrt(diff.variance))[~bad]
    z = z[np.isfinite(z)]
    # Robust σ of D/√V on empty sky ≈ 1 (a raw science−template would be dominated by sky and stars).
    assert 0.9 < 1.4826 * np.median(np.abs(z - np.median(z))) < 1.15


def test_run_writes_all_outputs(run_dir):
    """``diffim run``: difference, catalogue (Parquet + FITS), config, metadata (per-stage times, counts,
    quality) and a diagnostics PNG."""
    from astropy.table import Table

    from diffim.io import read_exposure

    names = {p.name for p in run_dir.iterdir()}
    assert {"difference.fits", "diaSources.parquet", "diaSources.fits", "config.py", "metadata.json",
            "diagnostics.png"} <= names
    assert read_exposure(run_dir / "difference.fits").shape == (SIZE, SIZE)
    cat = Table.read(run_dir / "diaSources.fits")
    assert len(cat) > 5 and {"diaSourceId", "ra", "dec", "psfFlux"} <= set(cat.colnames)
    import pyarrow.parquet as pq

    assert pq.read_table(run_dir / "diaSources.parquet").num_rows == len(cat)
    md = json.loads((run_dir / "metadata.json").read_text())
    assert {"subtract", "detection", "measurement"} <= set(md["stageWallTime"])
    assert all(v >= 0 for v in md["stageWallTime"].values())
    assert md["counts"]["nDiaSources"] == len(cat) - md["counts"]["nSkySources"]
    assert 0.9 < md["quality"]["noiseRatio"] < 1.15
    assert md["wallTimeTotal"] > 0
    png = (run_dir / "diagnostics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # No temporary directories left next to the output.
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".run.")]


def test_run_config_file_round_trip(run_dir, simdir, tmp_path, capsys):
    """OUTDIR/config.py loads with -C and reproduces the run: same config, same catalogue."""
    from astropy.table import Table

    from diffim.pipeline import make_config

    saved = make_config(files=[str(run_dir / "config.py")])
    default = make_config()
    assert saved.compare(default, shortcut=False)
    out = tmp_path / "again"
    code = main(["-q", "run", str(simdir / "science.fits"), str(simdir / "template.fits"), "-o", str(out),
                 "-C", str(run_dir / "config.py"), "--no-plot"])
    assert code == EXIT_OK
    assert capsys.readouterr().out == ""  # -q
    assert (out / "config.py").read_text() == (run_dir / "config.py").read_text()
    a = Table.read(run_dir / "diaSources.fits")
    b = Table.read(out / "diaSources.fits")
    assert len(a) == len(b)
    np.testing.assert_allclose(np.asarray(a["psfFlux"], float), np.asarray(b["psfFlux"], float), rtol=1e-6)


def test_show_config(capsys):
    """--show-config prints the full (overridden) config as loadable Python and exits 0 without running."""
    code = main(["run", "nosuch_science.fits", "nosuch_template.fits", "-o", "nosuch_out", "--show-config",
                 "-c", "doSkySources=True", "-c", "subtract.name=zogy"])
    assert code == EXIT_OK
    text = capsys.readouterr().out
    assert "config.doSkySources=True" in text
    assert "config.subtract.name='zogy'" in text
    assert "config.detection.thresholdValue=5.0" in text
    assert not Path("nosuch_out").exists()


def test_override_reaches_the_task(simdir, tmp_path, capsys):
    """-c doSkySources=True: the catalogue gains sky sources (the default run has none)."""
    from astropy.table import Table

    out = tmp_path / "sky"
    code = main(["-q", "run", str(simdir / "science.fits"), str(simdir / "template.fits"), "-o", str(out),
                 "--no-plot", "-c", "doSkySources=True", "-c", "skySources.nSources=20"])
    assert code == EXIT_OK
    cat = Table.read(out / "diaSources.fits")
    assert 10 <= np.asarray(cat["sky_source"], bool).sum() <= 20
    assert "config.doSkySources=True" in (out / "config.py").read_text()


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_bad_input_exit_2_one_line_no_output(simdir, tmp_path, capsys, problem):
    """A missing or corrupt input: one-line error on stderr, exit code 2, no output directory."""
    bad = tmp_path / "science.fits"
    if problem == "corrupt":
        bad.write_bytes(b"SIMPLE  =                    T" + b"\0" * 100)
    out = tmp_path / "out"
    code = main(["run", str(bad), str(simdir / "template.fits"), "-o", str(out)])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    line = _one_line_error(err)
    assert "science.fits" in line
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_bad_override_exit_2(simdir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(simdir / "science.fits"), str(simdir / "template.fits"), "-o", str(out),
                 "-c", "nosuchfield=1"])
    assert code == EXIT_BAD_INPUT
    assert "nosuchfield" in _one_line_error(capsys.readouterr().err)
    assert not out.exists()


def test_invalid_combination_exit_2(simdir, tmp_path, capsys):
    """A combination validate() forbids is a configuration error too."""
    code = main(["run", str(simdir / "science.fits"), str(simdir / "template.fits"), "-o", str(tmp_path / "o"),
                 "-c", "doWriteScoreExp=True"])
    assert code == EXIT_BAD_INPUT
    assert "useScoreImageDetection" in _one_line_error(capsys.readouterr().err)


def test_existing_output_needs_overwrite(simdir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code = main(["run", str(simdir / "science.fits"), str(simdir / "template.fits"), "-o", str(out)])
    assert code == EXIT_BAD_INPUT
    assert "--overwrite" in _one_line_error(capsys.readouterr().err)
    assert (out / "keep.txt").read_text() == "x"


def test_quiet_prints_nothing_on_success(tmp_path, capsys):
    """--quiet: nothing on stdout for a successful command (the same command prints a line without it). The
    ``run`` commands of this module also use -q and are checked for silence in the round-trip test."""
    assert main(["-q", "simulate", str(tmp_path / "a"), "--size", "64"]) == EXIT_OK
    assert capsys.readouterr().out == ""
    assert main(["simulate", str(tmp_path / "b"), "--size", "64"]) == EXIT_OK
    assert "wrote" in capsys.readouterr().out


def test_console_script_runs(simdir, tmp_path):
    """The installed ``diffim`` entry point works (subprocess): subtract exits 0 and writes the difference."""
    from diffim.io import read_exposure

    exe = Path(sys.executable).with_name("diffim")
    if not exe.exists():
        pytest.skip("console script not installed next to the interpreter")
    out = tmp_path / "d.fits"
    proc = subprocess.run([str(exe), "subtract", str(simdir / "science.fits"), str(simdir / "template.fits"),
                           "-o", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote") and "noise ratio" in proc.stdout
    assert read_exposure(out).shape == (SIZE, SIZE)
