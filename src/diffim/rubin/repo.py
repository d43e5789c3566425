"""A butler repository for diffim without an obs_* package: create it, register an instrument, ingest pairs.

Command line (``python -m diffim.rubin.repo``)::

    python -m diffim.rubin.repo create REPO
    python -m diffim.rubin.repo ingest REPO pairs.csv [--run diffim/inputs] [--instrument DIFFIMCAM]

``create`` makes a SQLite repository whose ``butler.yaml`` knows the ``DiffimExposure`` storage class.
``ingest`` registers the instrument, one physical filter per band it meets and detector 0, then for pair
number *i* of the list (CSV/YAML as for ``diffim batch``; an integer ``visit`` column overrides *i* + 1) inserts
a visit and its ``visit_detector_region`` (from the science WCS) and ingests the science file as ``calexp``
and the template as ``deepDiff_templateExp``. After that::

    pipetask run -b REPO -p pipelines/ImageDifference.yaml -i diffim/inputs -o diffim/out --register-dataset-types
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Any

from . import STORAGE_CLASS, require_rubin

__all__ = ["seed_config", "create_repo", "register_instrument", "ingest_pair", "ingest_pairs", "main",
           "DEFAULT_INSTRUMENT", "DEFAULT_RUN", "SCIENCE_DATASET", "TEMPLATE_DATASET"]

DEFAULT_INSTRUMENT = "DIFFIMCAM"
DEFAULT_RUN = "diffim/inputs"
SCIENCE_DATASET = "calexp"
TEMPLATE_DATASET = "deepDiff_templateExp"
_DIMS = ("instrument", "visit", "detector")


def seed_config() -> dict[str, Any]:
    """Butler seed configuration declaring the DiffimExposure storage class and its formatter.

    Merge it into an existing repository's ``butler.yaml`` by hand if needed: add the ``formatters`` entry
    to the **existing** ``datastore:`` section (a second top-level ``datastore:`` key silently replaces the
    first one, losing ``root: <butlerRoot>``).
    """
    return {
        "storageClasses": {STORAGE_CLASS: {"pytype": "diffim.model.Exposure"}},
        "datastore": {"formatters": {STORAGE_CLASS: "diffim.rubin.formatters.DiffimExposureFormatter"}},
    }


def create_repo(root: str | Path) -> Path:
    """Create a SQLite butler repository at ``root`` that can store diffim exposures."""
    require_rubin()
    from lsst.daf.butler import Butler, Config

    root = Path(root).absolute()
    Butler.makeRepo(str(root), config=Config(seed_config()))
    return root


def register_instrument(butler, name: str = DEFAULT_INSTRUMENT, *, bands=("g", "r", "i"), detectors=(0,)) -> None:
    """Insert a minimal instrument: physical filters named after their bands, and detectors (idempotent)."""
    reg = butler.registry
    reg.syncDimensionData("instrument", {"name": name, "visit_max": 10**8, "exposure_max": 10**8,
                                         "detector_max": 1000, "class_name": "diffim.rubin.repo.NoInstrumentClass"})
    for band in bands:
        reg.syncDimensionData("physical_filter", {"instrument": name, "name": band, "band": band})
    for det in detectors:
        reg.syncDimensionData("detector", {"instrument": name, "id": int(det), "full_name": f"d{int(det)}"})


def _region(exposure):
    """Sky polygon of an exposure's bbox corners (a tiny dummy polygon if it has no celestial WCS)."""
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    box = exposure.bbox
    corners = [(box.x0 - 0.5, box.y0 - 0.5), (box.x1 - 0.5, box.y0 - 0.5), (box.x1 - 0.5, box.y1 - 0.5),
               (box.x0 - 0.5, box.y1 - 0.5)]
    pts = None
    wcs = getattr(exposure, "wcs", None)
    if wcs is not None:
        try:
            ra, dec = wcs.pixel_to_world_values([c[0] for c in corners], [c[1] for c in corners])
            pts = list(zip(map(float, ra), map(float, dec)))
        except Exception:  # non-celestial WCS: fall back to the dummy region
            pts = None
    if pts is None:
        pts = [(0.0, 0.0), (0.01, 0.0), (0.01, 0.01), (0.0, 0.01)]
    return ConvexPolygon([UnitVector3d(LonLat.fromDegrees(r, d)) for r, d in pts])


def _day_obs(exposure) -> int:
    vi = getattr(exposure, "visit_info", None)
    date = getattr(vi, "date", None) if vi is not None else None
    try:
        from astropy.time import Time

        t = Time(date) if date is not None else None
        if t is not None:
            d = (t - 12 / 24).to_datetime()  # Rubin's day_obs: local-noon-to-noon, here UTC-12h
            return int(d.strftime("%Y%m%d"))
    except Exception:  # no usable date: a fixed day
        pass
    return int(_dt.date(2026, 1, 1).strftime("%Y%m%d"))


def _dataset_types(butler) -> dict[str, Any]:
    from lsst.daf.butler import DatasetType

    out = {}
    for name in (SCIENCE_DATASET, TEMPLATE_DATASET):
        dt = DatasetType(name, _DIMS, STORAGE_CLASS, universe=butler.dimensions)
        butler.registry.registerDatasetType(dt)
        out[name] = dt
    return out


def ingest_pair(butler, science: str | Path, template: str | Path, *, visit: int, detector: int = 0,
                instrument: str = DEFAULT_INSTRUMENT, run: str = DEFAULT_RUN, transfer: str = "copy") -> dict:
    """Define ``visit`` from the science exposure and ingest the two files (unchanged) into ``run``.

    Returns the data ID used. ``transfer`` is a butler transfer mode ("copy", "symlink", "direct", ...).
    """
    from lsst.daf.butler import DatasetRef, FileDataset

    from ..io import read_exposure
    from .formatters import DiffimExposureFormatter

    exposure = read_exposure(science)
    band = getattr(exposure, "band", None) or "r"
    register_instrument(butler, instrument, bands=(band,), detectors=(detector,))
    reg = butler.registry
    day_obs = _day_obs(exposure)
    reg.syncDimensionData("day_obs", {"instrument": instrument, "id": day_obs})
    region = _region(exposure)
    reg.syncDimensionData("visit", {"instrument": instrument, "id": int(visit), "name": f"v{int(visit)}",
                                    "physical_filter": band, "day_obs": day_obs, "region": region})
    reg.syncDimensionData("visit_detector_region", {"instrument": instrument, "visit": int(visit),
                                                    "detector": int(detector), "region": region})
    reg.registerRun(run)
    types = _dataset_types(butler)
    data_id = {"instrument": instrument, "visit": int(visit), "detector": int(detector)}
    datasets = []
    for name, path in ((SCIENCE_DATASET, science), (TEMPLATE_DATASET, template)):
        ref = DatasetRef(types[name], butler.registry.expandDataId(data_id), run=run)
        datasets.append(FileDataset(path=str(Path(path).absolute()), refs=[ref], formatter=DiffimExposureFormatter))
    butler.ingest(*datasets, transfer=transfer)
    return data_id


def ingest_pairs(repo: str | Path, pairs, *, instrument: str = DEFAULT_INSTRUMENT, run: str = DEFAULT_RUN,
                 transfer: str = "copy") -> list[dict]:
    """Ingest every pair of a pair list (path or sequence, as for ``diffim batch``); visit = row number + 1."""
    require_rubin()
    from lsst.daf.butler import Butler

    from ..batch.runner import normalize_pairs, read_pairs

    plist = read_pairs(pairs) if isinstance(pairs, str | Path) else normalize_pairs(pairs)
    visits = _visit_column(pairs) if isinstance(pairs, str | Path) else {}
    butler = Butler.from_config(str(repo), writeable=True)
    ids = []
    for i, pair in enumerate(plist):
        ids.append(ingest_pair(butler, pair.science, pair.template, visit=visits.get(i, i + 1),
                               instrument=instrument, run=run, transfer=transfer))
    return ids


def _visit_column(path) -> dict[int, int]:
    """Optional integer ``visit`` column of a CSV pair list (row index → visit)."""
    import csv

    path = Path(path)
    if path.suffix.lower() not in (".csv", ".txt"):
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    out = {}
    for i, row in enumerate(csv.DictReader(lines, skipinitialspace=True)):
        v = {str(k).strip().lower(): v for k, v in row.items()}.get("visit")
        if v not in (None, ""):
            out[i] = int(v)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffim.rubin.repo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="create a SQLite butler repository that knows DiffimExposure")
    c.add_argument("repo", type=Path)
    i = sub.add_parser("ingest", help="register the instrument and visits, ingest science/template pairs")
    i.add_argument("repo", type=Path)
    i.add_argument("pairs", type=Path, help="pair list (CSV or YAML, as for `diffim batch`)")
    i.add_argument("--run", default=DEFAULT_RUN)
    i.add_argument("--instrument", default=DEFAULT_INSTRUMENT)
    i.add_argument("--transfer", default="copy", help="butler transfer mode (copy, symlink, direct, ...)")
    args = p.parse_args(argv)
    if args.command == "create":
        print(f"created {create_repo(args.repo)}")
    else:
        ids = ingest_pairs(args.repo, args.pairs, instrument=args.instrument, run=args.run, transfer=args.transfer)
        print(f"ingested {len(ids)} pairs into {args.repo} run {args.run}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
