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


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """A repository holding one simulated 256² pair as visit 1, detector 0."""
    from diffim.rubin.repo import create_repo, ingest_pairs
    from diffim.sim import write_simulation

    root = tmp_path_factory.mktemp("rubin")
    write_simulation(root / "in", size=256, seed=0)
    (root / "pairs.csv").write_text("science,template\nin/science.fits,in/template.fits\n")
    repo = create_repo(root / "repo")
    ids = ingest_pairs(repo, root / "pairs.csv")
    return root, repo, ids[0]


def _same_array(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


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
    """`pipetask run` on the ingested pair equals `run_files` on the original files, pixel for pixel."""
    from lsst.daf.butler import Butler

    from diffim.catalog import read_catalog
    from diffim.io import read_exposure
    from diffim.pipeline import make_config, run_files

    root, repo, data_id = ingested
    cmd = [_tool("pipetask"), "run", "-b", str(repo), "-p", str(PIPELINE), "-i", "diffim/inputs",
           "-o", "diffim/test_out", "--register-dataset-types"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]

    butler = Butler.from_config(str(repo), collections="diffim/test_out")
    diff_b = butler.get("deepDiff_differenceExp", data_id)
    cat_b = butler.get("deepDiff_diaSrc", data_id)

    res = run_files(root / "in" / "science.fits", root / "in" / "template.fits", tmp_path / "direct",
                    config=make_config(), plot=False, progress=False)
    diff_f = read_exposure(res.files["difference"])
    cat_f = read_catalog(tmp_path / "direct" / "diaSources.parquet")

    assert diff_b.bbox == diff_f.bbox
    assert _same_array(diff_b.image, diff_f.image)
    assert _same_array(diff_b.variance, diff_f.variance)
    assert _same_array(diff_b.mask.array, diff_f.mask.array)
    assert len(cat_b) == len(cat_f) > 0
    assert _same_array(cat_b["x"], cat_f["x"]) and _same_array(cat_b["y"], cat_f["y"])
    assert _same_array(cat_b["psfFlux"], cat_f["psfFlux"])
    # Provenance the middleware keeps: the config and the task metadata with diffim's own figures.
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

    root, repo, data_id = ingested
    env = dict(os.environ, DIFFIM_DIR=str(REPO_ROOT), DIFFIM_REPO=str(repo),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([_tool("bps"), "submit", str(REPO_ROOT / "pipelines" / "bps_parsl.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    butler = Butler.from_config(str(repo))
    outs = [c for c in butler.registry.queryCollections("u/*/diffim")]
    assert outs, "bps wrote no u/<operator>/diffim collection"
    diff_b = butler.get("deepDiff_differenceExp", data_id, collections=outs[0])
    res = run_files(root / "in" / "science.fits", root / "in" / "template.fits", tmp_path / "direct",
                    config=make_config(), plot=False, progress=False)
    diff_f = read_exposure(res.files["difference"])
    assert _same_array(diff_b.image, diff_f.image) and _same_array(diff_b.mask.array, diff_f.mask.array)
