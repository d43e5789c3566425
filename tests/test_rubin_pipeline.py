"""The Rubin PipelineTask form of ImageDifferenceTask (``diffim.rubin``; needs the ``[rubin]`` extra, Python ≥ 3.12).

A SQLite butler repository with a minimal instrument is built in a temporary directory, a simulated 256² pair
is ingested, ``pipetask run`` (a subprocess, as users run it) executes ``pipelines/ImageDifference.yaml``, and
its outputs must be **identical** to ``diffim.pipeline.run_files`` on the same files: same difference pixels
(image, mask, variance) and the same DIA sources (count and positions). Both paths run the same code on the
same bytes, so any difference means the adapter changed the inputs, the config or the outputs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if sys.version_info < (3, 12):
    pytest.skip("the Rubin middleware needs Python >= 3.12", allow_module_level=True)
pytest.importorskip("lsst.pipe.base")
pytest.importorskip("lsst.daf.butler")
pytest.importorskip("lsst.ctrl.mpexec")

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE = REPO_ROOT / "pipelines" / "ImageDifference.yaml"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _plain_fits(src: Path, dst: Path) -> None:
    """Keep only the pixels, WCS and observation cards: a plain FITS frame (no mask, variance or PSF)."""
    from astropy.io import fits

    with fits.open(src) as h:
        hdr = h["IMAGE"].header.copy()
        for k in ("EXTNAME", "EXTTYPE", "XTENSION", "PCOUNT", "GCOUNT"):
            hdr.remove(k, ignore_missing=True)
        for k in ("BAND", "FILTER", "MJD-OBS", "DATE-OBS", "EXPTIME"):
            if k in h[0].header:
                hdr[k] = h[0].header[k]
        fits.PrimaryHDU(h["IMAGE"].data, hdr).writeto(dst)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """A repository holding two simulated pairs: visit 1, a 256² pair in diffim's own FITS layout; visit 2,
    a 512² pair reduced to plain FITS frames, which takes the other input path of ``diffim run`` (variance
    model, PSF estimation, cosmic-ray repair)."""
    from diffim.rubin.repo import create_repo, ingest_pairs
    from diffim.sim import write_simulation

    root = tmp_path_factory.mktemp("rubin")
    write_simulation(root / "in", size=256, seed=0)
    write_simulation(root / "in512", size=512, seed=0)
    for name in ("science", "template"):
        _plain_fits(root / "in512" / f"{name}.fits", root / "in512" / f"plain_{name}.fits")
    (root / "pairs.csv").write_text("science,template\nin/science.fits,in/template.fits\n"
                                    "in512/plain_science.fits,in512/plain_template.fits\n")
    repo = create_repo(root / "repo")
    ids = ingest_pairs(repo, root / "pairs.csv")
    files = [(root / "in" / "science.fits", root / "in" / "template.fits"),
             (root / "in512" / "plain_science.fits", root / "in512" / "plain_template.fits")]
    return root, repo, ids, files


def _same_array(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


def test_repo_command_line(tmp_path):
    """`python -m diffim.rubin.repo create/ingest` makes a repository whose datasets read back as the files."""
    from lsst.daf.butler import Butler

    from diffim.io import read_exposure
    from diffim.rubin.repo import main
    from diffim.sim import write_simulation

    write_simulation(tmp_path / "in", size=128, seed=2)
    (tmp_path / "pairs.csv").write_text("science,template,id,visit\nin/science.fits,in/template.fits,a,42\n")
    assert main(["create", str(tmp_path / "repo")]) == 0
    assert main(["ingest", str(tmp_path / "repo"), str(tmp_path / "pairs.csv")]) == 0
    butler = Butler.from_config(str(tmp_path / "repo"), collections="diffim/inputs")
    got = butler.get("calexp", instrument="DIFFIMCAM", visit=42, detector=0)
    assert _same_array(got.image, read_exposure(tmp_path / "in" / "science.fits").image)
    assert butler.registry.queryDimensionRecords("visit_detector_region", instrument="DIFFIMCAM").count() == 1


def test_config_is_image_difference_config():
    """The PipelineTask config has every ImageDifferenceConfig field with the same defaults, and optional
    connections follow the do* switches."""
    from diffim.pipeline import make_config
    from diffim.rubin.pipeline_task import ImageDifferencePipelineConfig, ImageDifferencePipelineConnections
    from diffim.tasks.image_difference import ImageDifferenceConfig

    cfg = ImageDifferencePipelineConfig()
    plain = make_config()
    mine, theirs = cfg.toDict(), plain.toDict()
    for name in ImageDifferenceConfig._fields:
        if name != "connections":
            assert mine[name] == theirs[name], name
    conns = ImageDifferencePipelineConnections(config=cfg)
    assert {"exposure", "template"} == set(conns.inputs)
    expect = {"subtractedExposure", "diaSources"}
    expect |= {n for n, flag in (("warpedExposure", cfg.doWriteWarpedExp), ("matchedExposure", cfg.doWriteMatchedExp),
                                 ("scoreExposure", cfg.doWriteScoreExp)) if flag}
    assert set(conns.outputs) == expect
    cfg.doWriteMatchedExp = True
    cfg.doSelectSources = True
    conns = ImageDifferencePipelineConnections(config=cfg)
    assert "matchedExposure" in conns.outputs and "inputSources" in conns.inputs
    assert conns.subtractedExposure.name == "deepDiff_differenceExp"


def test_pipetask_run_matches_run_files(ingested, tmp_path):
    """`pipetask run` on the two ingested pairs (two quanta) equals `run_files` on the original files, pixel
    for pixel; the plain-FITS pair went through cosmic-ray repair (CR bits set) in both paths."""
    from lsst.daf.butler import Butler

    from threadpoolctl import threadpool_limits

    from diffim.catalog import read_catalog
    from diffim.io import read_exposure
    from diffim.pipeline import make_config, run_files

    root, repo, data_ids, files = ingested
    cmd = [_tool("pipetask"), "run", "-b", str(repo), "-p", str(PIPELINE), "-i", "diffim/inputs",
           "-o", "diffim/test_out", "--register-dataset-types", "-j", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]

    butler = Butler.from_config(str(repo), collections="diffim/test_out")
    for k, (data_id, (science, template)) in enumerate(zip(data_ids, files)):
        diff_b = butler.get("deepDiff_differenceExp", data_id)
        cat_b = butler.get("deepDiff_diaSrc", data_id)
        # pipetask runs tasks with BLAS/OpenMP limited to one thread (lsst.utils.threads); multi-threaded
        # BLAS rounds differently (≈1e-7 relative in the PSF fit), so compare like with like.
        with threadpool_limits(limits=1):
            res = run_files(science, template, tmp_path / f"direct{k}", config=make_config(), plot=False,
                            progress=False)
        diff_f = read_exposure(res.files["difference"])
        cat_f = read_catalog(tmp_path / f"direct{k}" / "diaSources.parquet")

        assert diff_b.bbox == diff_f.bbox
        assert _same_array(diff_b.image, diff_f.image)
        assert _same_array(diff_b.variance, diff_f.variance)
        assert _same_array(diff_b.mask.array, diff_f.mask.array)
        assert len(cat_b) == len(cat_f) > 0
        assert _same_array(cat_b["x"], cat_f["x"]) and _same_array(cat_b["y"], cat_f["y"])
        assert _same_array(cat_b["psfFlux"], cat_f["psfFlux"])
        if k == 1:  # the plain frames were repaired
            assert diff_b.mask.get("CR").any()
        # Provenance the middleware keeps: the task metadata with diffim's own figures.
        md = butler.get("imageDifference_metadata", data_id)
        assert "diffim" in md["imageDifference"]


@pytest.mark.slow
def test_bps_parsl_submit(ingested, tmp_path):
    """`bps submit pipelines/bps_parsl.yaml` (Parsl, local HighThroughputExecutor) produces the same difference
    image as `run_files`. Slow: BPS builds the graph, starts Parsl and runs one `pipetask` per job (≈ 1 min)."""
    pytest.importorskip("lsst.ctrl.bps.parsl")
    from lsst.daf.butler import Butler

    from diffim.io import read_exposure
    from diffim.pipeline import make_config, run_files

    root, repo, data_ids, files = ingested
    data_id = data_ids[0]
    env = dict(os.environ, DIFFIM_DIR=str(REPO_ROOT), DIFFIM_REPO=str(repo),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([_tool("bps"), "submit", str(REPO_ROOT / "pipelines" / "bps_parsl.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    butler = Butler.from_config(str(repo))
    outs = [c for c in butler.registry.queryCollections("u/*/diffim")]
    assert outs, "bps wrote no u/<operator>/diffim collection"
    diff_b = butler.get("deepDiff_differenceExp", data_id, collections=outs[0])
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # as pipetask runs tasks (see test_pipetask_run_matches_run_files)
        res = run_files(files[0][0], files[0][1], tmp_path / "direct", config=make_config(), plot=False,
                        progress=False)
    diff_f = read_exposure(res.files["difference"])
    assert _same_array(diff_b.image, diff_f.image) and _same_array(diff_b.mask.array, diff_f.mask.array)
