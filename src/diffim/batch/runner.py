"""Resumable batch runner: many science/template pairs, one ``diffim run`` per pair, in worker processes.

Design
------
* Workers receive **file paths and the config text**, never arrays or Config objects, so any
  ``concurrent.futures``-style executor (a process pool, a Dask client, ...) can run them.
* Each pair is run by :func:`diffim.pipeline.run_files`, which assembles its outputs in a temporary sibling
  directory and renames it to ``OUTROOT/<id>/`` only on success: an output directory either is complete or
  does not exist.
* ``OUTROOT/manifest.json`` (and ``manifest.parquet`` when pyarrow is installed) lists every pair with its
  status, timings, peak memory, DIA-source counts and config hash. It is rewritten atomically (temporary file
  + ``os.replace``) after each finished pair, so killing the batch at any moment leaves a consistent manifest.
* Re-running skips pairs whose output directory exists and was produced with the same config (sha256 of the
  ``config.saveToStream`` text) from the same inputs; ``redo=True`` forces them. Temporary directories left
  by a killed run are removed first.
* Workers run single-threaded by default (BLAS/OpenMP and FFT threads capped to 1), because the batch gets
  its parallelism from processes; ``threads=`` changes that.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import os
import queue
import shutil
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInputError, DiffimIOError, InputFileNotFoundError

__all__ = [
    "Pair",
    "BatchResult",
    "read_pairs",
    "normalize_pairs",
    "config_text",
    "config_hash",
    "run_pair",
    "run_batch",
    "MANIFEST_NAME",
    "MANIFEST_COLUMNS",
]

log = logging.getLogger("diffim.batch")

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

#: Manifest columns, in order (``counts`` keys are added as extra ``n*`` columns in the Parquet file).
MANIFEST_COLUMNS = (
    "id", "science", "template", "status", "error", "wall_time", "cpu_time", "peak_memory_mb", "counts", "config_hash",
    "outdir", "started", "finished", "host", "pid", "attempts", "files", "options",
)

#: Batch-wide input options (``run_batch(read_options=...)``), as the ``diffim run`` input flags.
READ_OPTIONS = ("companions", "variance_kind", "gain", "read_noise", "reset_xy0", "repair_cosmic_rays",
                "allow_band_mismatch")

#: Pair statuses: ``pending`` (not run yet or interrupted), ``done`` (run by this batch), ``skipped`` (done
#: by an earlier batch with the same config and inputs), ``failed``.
STATUSES = ("pending", "done", "skipped", "failed")

# Files every complete output directory holds (run_files writes them last, just before the rename).
_REQUIRED_FILES = ("metadata.json", "config.py")
_LOCK_NAME = ".diffim-batch.lock"


# ----------------------------------------------------------------------------------------------- pairs


#: Optional per-image companion columns of a pair list and the ``read_exposure`` keyword each one sets.
COMPANION_COLUMNS = {f"{who}_{kind}": (who, kind) for who in ("science", "template")
                     for kind in ("variance", "mask", "psf")}


@dataclass(frozen=True)
class Pair:
    """One science/template pair; ``id`` names its output directory ``OUTROOT/<id>``.

    ``companions`` holds per-image files as ``(column, absolute path)`` tuples, columns from
    `COMPANION_COLUMNS` (``science_variance``, ``template_psf``, ...).
    """

    id: str
    science: str
    template: str | None
    companions: tuple[tuple[str, str], ...] = ()

    def read_kwargs(self, who: str) -> dict[str, str]:
        """``read_exposure`` keywords from this pair's companion files for ``who`` ('science'/'template')."""
        return {COMPANION_COLUMNS[c][1]: v for c, v in self.companions if COMPANION_COLUMNS[c][0] == who}


# Names in OUTROOT that belong to the batch itself.
_RESERVED = frozenset({"logs", "manifest.json", "manifest.parquet", "batch_config.py", ".diffim-batch.lock"})


def _check_id(pair_id: str) -> str:
    pair_id = str(pair_id).strip()
    if not pair_id or pair_id in (".", "..") or pair_id.startswith(".") or "/" in pair_id or "\\" in pair_id:
        raise BadInputError(f"Pair id {pair_id!r} cannot name a directory: use letters, digits, '-', '_' or '.'"
                            " (not leading) and no slashes.")
    if pair_id in _RESERVED:
        raise BadInputError(f"Pair id {pair_id!r} is reserved for the batch's own files; choose another id.")
    return pair_id


def _resolve(path: Any, base: Path | None) -> str:
    p = Path(str(path).strip()).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    return str(p.absolute())


def _default_ids(rows: list[tuple[str, str | None]], base: Path | None) -> list[str]:
    """Stable ids from science file names: the stem if unique, else the path relative to the list."""
    stems = [Path(s).name.split(".")[0] for s, _ in rows]
    if len(set(stems)) == len(stems):
        return stems
    ids = []
    for s, _ in rows:
        p = Path(s)
        try:
            rel = p.relative_to(base) if base is not None else p
        except ValueError:
            rel = p
        parts = [x for x in rel.with_name(rel.name.split(".")[0]).parts if x not in ("/", "")]
        ids.append("__".join(parts).lstrip("."))
    return ids


def normalize_pairs(pairs: Iterable[Any], base: str | Path | None = None) -> list[Pair]:
    """Turn ``Pair`` objects, ``(science, template[, id])`` tuples or mappings into a checked list of `Pair`.

    Relative paths are resolved against ``base`` (the pair list's directory) or the current directory. Pairs
    without an id get one from the science file name (its stem, or its relative path if stems repeat).
    Raises `~diffim.errors.BadInputError` for malformed entries and duplicate ids.
    """
    base_path = Path(base).absolute() if base is not None else None
    rows: list[tuple[str, str | None]] = []
    ids: list[str | None] = []
    extras: list[tuple[tuple[str, str], ...]] = []
    for i, item in enumerate(pairs):
        comp: tuple[tuple[str, str], ...] = ()
        if isinstance(item, Pair):
            sci, tmpl, pid, comp = item.science, item.template, item.id, item.companions
        elif isinstance(item, dict):
            keys = {str(k).strip().lower(): v for k, v in item.items() if k is not None}
            if "science" not in keys:
                raise BadInputError(f"Pair {i + 1} has no 'science' entry (keys: {sorted(keys)}).")
            sci, tmpl, pid = keys["science"], keys.get("template"), keys.get("id")
            comp = tuple((c, _resolve(keys[c], base_path)) for c in COMPANION_COLUMNS
                         if keys.get(c) is not None and str(keys[c]).strip())
        elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
            sci = item[0]
            tmpl = item[1] if len(item) > 1 else None
            pid = item[2] if len(item) > 2 else None
        else:
            raise BadInputError(f"Pair {i + 1} is not (science, template[, id]) or a mapping: {item!r}.")
        if sci is None or not str(sci).strip():
            raise BadInputError(f"Pair {i + 1} has an empty science path.")
        tmpl = None if tmpl is None or not str(tmpl).strip() else _resolve(tmpl, base_path)
        rows.append((_resolve(sci, base_path), tmpl))
        ids.append(None if pid is None or not str(pid).strip() else str(pid).strip())
        extras.append(comp)
    defaults = _default_ids(rows, base_path)
    out = []
    seen: dict[str, int] = {}
    for i, ((sci, tmpl), pid) in enumerate(zip(rows, ids)):
        pid = _check_id(pid if pid is not None else defaults[i])
        if pid in seen:
            raise BadInputError(f"Pair id {pid!r} is used by pairs {seen[pid] + 1} and {i + 1}: give each pair a"
                                " unique 'id' column.")
        seen[pid] = i
        out.append(Pair(pid, sci, tmpl, extras[i]))
    return out


def read_pairs(path: str | Path) -> list[Pair]:
    """Read a pair list: CSV (columns ``science``, ``template``, optional ``id``) or YAML.

    Optional per-image columns name companion files of plain FITS inputs: ``science_variance``,
    ``science_mask``, ``science_psf``, ``template_variance``, ``template_mask``, ``template_psf`` (as
    ``diffim run --science-variance`` ...). The YAML form is a list of mappings with the same keys, or a
    mapping with a ``pairs`` list. Relative paths are resolved against the list file's directory. Lines
    starting with ``#`` in a CSV are comments.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileNotFoundError(f"Pair list {path} does not exist.")
    base = path.absolute().parent
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise BadInputError(f"Pair list {path} is not valid YAML: {exc}") from None
        if isinstance(data, dict):
            data = data.get("pairs")
        if not isinstance(data, list):
            raise BadInputError(f"Pair list {path} must be a YAML list of {{science, template, id}} mappings"
                                " (or a mapping with a 'pairs' list).")
        return normalize_pairs(data, base)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise BadInputError(f"Pair list {path} has no pairs.")
    reader = csv.DictReader(lines, skipinitialspace=True)
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "science" not in fields:
        raise BadInputError(f"Pair list {path} needs a header line with columns science,template[,id]; got {fields}.")
    return normalize_pairs(reader, base)


# ---------------------------------------------------------------------------------------------- config


def config_text(config: Any) -> str:
    """The ``saveToStream`` text of a pex_config Config (strings are returned unchanged)."""
    if isinstance(config, str):
        return config
    import io

    buf = io.StringIO()
    config.saveToStream(buf)
    return buf.getvalue()


def config_hash(config: Any) -> str:
    """sha256 (hex) of :func:`config_text`: two batches with equal hashes ran the same configuration."""
    return hashlib.sha256(config_text(config).encode()).hexdigest()


def _load_config(text: str):
    """Rebuild an ImageDifferenceConfig from its saved text (inside a worker)."""
    from ..tasks.image_difference import ImageDifferenceConfig

    config = ImageDifferenceConfig()
    config.loadFromString(text)
    return config


# ---------------------------------------------------------------------------------------------- worker


def run_pair(science: str, template: str | None, outdir: str, *, config_text: str, plot: bool = True,
             science_kwargs: dict | None = None, template_kwargs: dict | None = None,
             repair_cosmic_rays: bool | None = None, allow_band_mismatch: bool = False) -> None:
    """Default per-pair worker: exactly what ``diffim run SCIENCE TEMPLATE -o OUTDIR --overwrite`` does.

    ``science_kwargs``/``template_kwargs`` are ``read_exposure`` keywords (companion files, gain, ...),
    ``repair_cosmic_rays`` is ``--cr-repair`` (None: auto) and ``allow_band_mismatch`` is
    ``--allow-band-mismatch``, as for :func:`diffim.pipeline.run_files`.
    """
    from ..pipeline import run_files

    kw = {}
    if science_kwargs:
        kw["science_kwargs"] = science_kwargs
    if template_kwargs:
        kw["template_kwargs"] = template_kwargs
    if repair_cosmic_rays is not None:
        kw["repair_cosmic_rays"] = repair_cosmic_rays
    if allow_band_mismatch:
        kw["allow_band_mismatch"] = True
    run_files(science, template, outdir, config=_load_config(config_text), overwrite=True, plot=plot,
              progress=False, **kw)


def _pair_read_kwargs(task: dict[str, Any], who: str) -> dict[str, Any]:
    """``read_exposure`` keywords for one image: found companions, then the pair's columns, then batch-wide
    options (gain, read noise, variance kind) — later sources win, as on the ``diffim run`` command line."""
    opts = task.get("read_options") or {}
    path = task.get(who)
    kw: dict[str, Any] = {}
    if opts.get("companions") and path is not None:
        from ..io.layouts import find_companions

        kw.update(find_companions(path))
    explicit = dict(task.get(f"{who}_kwargs") or {})
    if "variance" in explicit:
        kw.pop("variance_kind", None)
        if opts.get("variance_kind"):
            explicit["variance_kind"] = opts["variance_kind"]
    kw.update(explicit)
    for key in ("gain", "read_noise"):
        if opts.get(key) is not None:
            kw[key] = opts[key]
    if opts.get("reset_xy0"):
        kw["xy0"] = (0, 0)
    return kw


def _reset_peak_memory() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_memory_mb(reset_ok: bool) -> float | None:
    """Peak resident memory of this process in MB: since the last reset (Linux) or since it started."""
    if reset_ok:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0
        except (OSError, ValueError, IndexError):
            pass
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0
    except Exception:  # no resource module (Windows)
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def _read_counts(outdir: Path) -> dict[str, Any]:
    try:
        with open(outdir / "metadata.json") as fh:
            md = json.load(fh)
    except (OSError, ValueError):
        return {}
    counts = md.get("counts") if isinstance(md, dict) else None
    return dict(counts) if isinstance(counts, dict) else {}


def _list_files(outdir: Path) -> list[str]:
    try:
        return sorted(p.name for p in outdir.iterdir() if p.is_file())
    except OSError:
        return []


def _execute(task: dict[str, Any]) -> dict[str, Any]:
    """Run one pair inside a worker process and describe what happened (never raises for pair failures)."""
    from .._threads import limit_threads

    if task.get("threads"):
        limit_threads(task["threads"])
    reset_ok = _reset_peak_memory()
    outdir = Path(task["outdir"])
    started = _now()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    handler = None
    root = logging.getLogger()
    old_level = root.level
    if task.get("logfile"):
        try:
            Path(task["logfile"]).parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(task["logfile"], mode="w")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
            root.addHandler(handler)
            root.setLevel(logging.INFO)
        except OSError:
            handler = None
    status, error = "done", None
    try:
        worker = task.get("worker") or run_pair
        extra: dict[str, Any] = {}
        if task.get("read_options") or task.get("science_kwargs") or task.get("template_kwargs"):
            extra["science_kwargs"] = _pair_read_kwargs(task, "science")
            extra["template_kwargs"] = _pair_read_kwargs(task, "template") if task["template"] else {}
            if (task.get("read_options") or {}).get("repair_cosmic_rays") is not None:
                extra["repair_cosmic_rays"] = task["read_options"]["repair_cosmic_rays"]
            if (task.get("read_options") or {}).get("allow_band_mismatch"):
                extra["allow_band_mismatch"] = True
        worker(task["science"], task["template"], str(outdir), config_text=task["config_text"],
               plot=task.get("plot", True), **extra)
        missing = [f for f in _REQUIRED_FILES if not (outdir / f).is_file()]
        if missing:
            status, error = "failed", f"output directory {outdir} lacks {', '.join(missing)}"
    except KeyboardInterrupt:  # Ctrl-C stops the batch, it is not a failure of this pair
        raise
    except BaseException as exc:  # a pair failure (even SystemExit from a library) must not end the batch
        status = "failed"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
        logging.getLogger("diffim.batch").error("pair %s failed:\n%s", task["id"], traceback.format_exc())
    finally:
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
            root.setLevel(old_level)
    wall = time.perf_counter() - t0
    return {
        "id": task["id"],
        "status": status,
        "error": error,
        "wall_time": round(wall, 3),
        "cpu_time": round(time.process_time() - cpu0, 3),
        "peak_memory_mb": _round(_peak_memory_mb(reset_ok), 1),
        "counts": _read_counts(outdir) if status == "done" else {},
        "started": started,
        "finished": _now(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "files": _list_files(outdir) if status == "done" else [],
    }


def _round(x: float | None, nd: int) -> float | None:
    return None if x is None else round(float(x), nd)


# -------------------------------------------------------------------------------------------- manifest


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    count_keys = sorted({k for r in rows for k in (r.get("counts") or {})})
    cols: dict[str, list] = {}
    for name in MANIFEST_COLUMNS:
        if name == "counts":
            continue
        if name == "options":
            cols[name] = [json.dumps(r.get(name) or {}, sort_keys=True) for r in rows]
            continue
        cols[name] = [r.get(name) for r in rows]
    for k in count_keys:
        vals = [(r.get("counts") or {}).get(k) for r in rows]
        cols[k] = [None if v is None else float(v) for v in vals]
    types = {"wall_time": pa.float64(), "cpu_time": pa.float64(), "peak_memory_mb": pa.float64(), "pid": pa.int64(), "attempts": pa.int64(),
             "files": pa.list_(pa.string())}
    arrays = {name: pa.array(vals, type=types.get(name, pa.float64() if name in count_keys else pa.string()))
              for name, vals in cols.items()}
    table = pa.table(arrays)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class _Manifest:
    """The batch's manifest rows, rewritten atomically (JSON, and Parquet if pyarrow) on every update."""

    def __init__(self, outroot: Path, header: dict[str, Any], rows: list[dict[str, Any]], parquet: bool):
        self.path = outroot / MANIFEST_NAME
        self.parquet_path = outroot / "manifest.parquet"
        self.header = header
        self.rows = rows
        self.index = {r["id"]: i for i, r in enumerate(rows)}
        self.parquet = parquet

    @staticmethod
    def load_rows(outroot: Path) -> dict[str, dict[str, Any]]:
        """Rows of an existing manifest by id ({} if absent or unreadable)."""
        try:
            with open(outroot / MANIFEST_NAME) as fh:
                data = json.load(fh)
            return {r["id"]: r for r in data.get("pairs", []) if isinstance(r, dict) and "id" in r}
        except (OSError, ValueError, AttributeError, TypeError):
            return {}

    def update(self, pair_id: str, **values: Any) -> dict[str, Any]:
        row = self.rows[self.index[pair_id]]
        row.update(values)
        return row

    def write(self) -> None:
        self.header["updated"] = _now()
        self.header["summary"] = {s: sum(r["status"] == s for r in self.rows) for s in STATUSES}
        data = dict(self.header, pairs=self.rows)
        _atomic_write_bytes(self.path, json.dumps(data, indent=1, sort_keys=False).encode())
        if self.parquet:
            try:
                _write_parquet(self.parquet_path, self.rows)
            except Exception as exc:  # the JSON manifest is authoritative; Parquet is a convenience copy
                log.warning("could not write %s: %s", self.parquet_path, exc)
                self.parquet = False


# ------------------------------------------------------------------------------------------- executors


class _SerialExecutor(Executor):
    """Runs each task in the calling process when submitted (``executor="serial"``: debugging, profiling)."""

    def submit(self, fn, /, *args, **kwargs):
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            fut.set_exception(exc)
        return fut


@dataclass
class _ExecutorHandle:
    executor: Any
    window: int
    kind: str
    owned: bool
    cluster: Any = None
    restart: Callable[[], Any] | None = None

    def submit(self, fn, task):
        if self.kind == "dask":
            return self.executor.submit(fn, task, pure=False, key=f"diffim-batch-{task['id']}-{time.time_ns()}")
        return self.executor.submit(fn, task)

    def close(self, cancel: bool = False) -> None:
        if not self.owned:
            return
        try:
            if self.kind == "dask":
                self.executor.close()
                if self.cluster is not None:
                    self.cluster.close()
            else:
                self.executor.shutdown(wait=not cancel, cancel_futures=cancel)
        except Exception as exc:  # shutting down must not hide the batch's own outcome
            log.debug("executor shutdown: %s", exc)


def _local_pool(workers: int, max_tasks_per_child: int | None, warm_up: bool = True):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: fresh interpreters (no inherited threads or locks), environment taken at start.
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=max_tasks_per_child,
                               initializer=_warm_up if warm_up else None)


def _warm_up() -> None:
    """Import the pipeline when a worker starts, so the first pair's wall time measures the pair itself."""
    try:
        import diffim.io  # noqa: F401
        import diffim.pipeline  # noqa: F401
        import diffim.tasks.image_difference  # noqa: F401
    except Exception:  # an import problem will be reported by the pair that hits it
        pass


def _make_executor(executor: Any, workers: int | None, scheduler: str | None, threads: int,
                   max_tasks_per_child: int | None, warm_up: bool = True) -> _ExecutorHandle:
    if executor is None:
        executor = "dask" if scheduler else "local"
    if isinstance(executor, str):
        kind = executor.lower()
        if kind == "local":
            n = workers or max(1, os.cpu_count() or 1)
            return _ExecutorHandle(_local_pool(n, max_tasks_per_child, warm_up), n, "local", True,
                                   restart=lambda: _local_pool(n, max_tasks_per_child, warm_up))
        if kind == "serial":
            return _ExecutorHandle(_SerialExecutor(), 1, "serial", True)
        if kind == "dask":
            return _dask_executor(workers, scheduler, threads)
        raise BadInputError(f"Unknown executor {executor!r}: use 'local', 'dask' or 'serial'.")
    # A user-supplied object: a distributed.Client, or anything with a concurrent.futures-style submit().
    if type(executor).__module__.startswith("distributed") and hasattr(executor, "nthreads"):
        n = workers or max(1, sum(executor.nthreads().values()))
        return _ExecutorHandle(executor, 2 * n, "dask", False)
    if not hasattr(executor, "submit"):
        raise BadInputError(f"executor {executor!r} has no submit(): pass 'local', 'dask' or a concurrent.futures"
                            " Executor.")
    n = workers or getattr(executor, "_max_workers", None) or max(1, os.cpu_count() or 1)
    return _ExecutorHandle(executor, n, "external", False)


def _dask_executor(workers: int | None, scheduler: str | None, threads: int) -> _ExecutorHandle:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise BadInputError("--executor dask needs Dask: pip install 'diffim[dask]'.") from None
    env = {"DIFFIM_FFT_WORKERS": str(threads), "OMP_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if scheduler:
        client = Client(scheduler)
        n = workers or max(1, sum(client.nthreads().values()))
        return _ExecutorHandle(client, 2 * n, "dask", True)
    n = workers or max(1, os.cpu_count() or 1)
    import dask

    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers. That switches off glibc's adaptive mmap
    # threshold, so every large numpy temporary is mmapped and page-faulted afresh: measured on a 1024² pair,
    # 13× more page faults and 35 % more wall time. Start our workers without it.
    spawn_env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    spawn_env.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_env}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               env=env)
    client = Client(cluster)
    return _ExecutorHandle(client, n, "dask", True, cluster=cluster)


# ------------------------------------------------------------------------------------------------ batch


@dataclass
class BatchResult:
    """Outcome of :func:`run_batch`: one manifest row per pair, plus totals."""

    outroot: Path
    rows: list[dict[str, Any]]
    wall_time: float
    config_hash: str
    manifest: Path
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_done(self) -> int:
        return self.counts.get("done", 0)

    @property
    def n_failed(self) -> int:
        return self.counts.get("failed", 0)

    @property
    def n_skipped(self) -> int:
        return self.counts.get("skipped", 0)

    @property
    def n_pending(self) -> int:
        return self.counts.get("pending", 0)

    @property
    def ok(self) -> bool:
        """True when every pair is done or skipped."""
        return self.n_failed == 0 and self.n_pending == 0

    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]

    def summary(self) -> str:
        lines = [f"diffim batch: {len(self.rows)} pairs in {self.wall_time:.1f} s — {self.n_done} done, "
                 f"{self.n_skipped} skipped, {self.n_failed} failed"
                 + (f", {self.n_pending} not run" if self.n_pending else "")]
        for r in self.failed()[:20]:
            lines.append(f"  failed {r['id']}: {r['error']}")
        if self.n_failed > 20:
            lines.append(f"  ... and {self.n_failed - 20} more (see the manifest)")
        lines.append(f"  manifest: {self.manifest}")
        return "\n".join(lines)


def _lock(outroot: Path):
    """Hold an exclusive lock on OUTROOT for the batch (released automatically if the process dies)."""
    fh = open(outroot / _LOCK_NAME, "a+")
    try:
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not POSIX: no locking
        pass
    except OSError:
        fh.close()
        raise DiffimIOError(f"Another diffim batch is writing to {outroot}; wait for it or choose another -o.") from None
    return fh


def _clean_partial(outroot: Path) -> list[str]:
    """Remove temporary/old sibling directories and files left by a killed run (``.<id>.tmp-*``, ...)."""
    removed = []
    for p in outroot.iterdir():
        name = p.name
        if name.startswith(".") and (".tmp-" in name or ".old-" in name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    continue
            removed.append(name)
    return removed


def _dir_config_hash(outdir: Path) -> str | None:
    try:
        return hashlib.sha256((outdir / "config.py").read_bytes()).hexdigest()
    except OSError:
        return None


def _is_complete(outdir: Path, prev: dict[str, Any] | None) -> bool:
    if not outdir.is_dir():
        return False
    needed = set(_REQUIRED_FILES) | set((prev or {}).get("files") or [])
    return all((outdir / f).is_file() for f in needed)


def _pair_options(pair: Pair, read_options: dict[str, Any]) -> dict[str, Any]:
    """What besides the config decides a pair's outputs: companion files and batch-wide input options."""
    out: dict[str, Any] = {}
    if pair.companions:
        out["companions"] = dict(pair.companions)
    if read_options:
        out["read"] = dict(read_options)
    return out


def _inputs_match(outdir: Path, prev: dict[str, Any] | None, pair: Pair, options: dict[str, Any]) -> bool:
    if prev is not None:
        return (prev.get("science") == pair.science and prev.get("template") == pair.template
                and (prev.get("options") or {}) == options)
    try:
        with open(outdir / "metadata.json") as fh:
            inputs = json.load(fh).get("inputs", {})
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(inputs, dict) or "science" not in inputs:
        return True  # worker without input provenance: trust the config hash alone
    return (_resolve(inputs["science"], None) == pair.science
            and (inputs.get("template") is None) == (pair.template is None)
            and (pair.template is None or _resolve(inputs["template"], None) == pair.template))


def _empty_row(pair: Pair, chash: str, outdir: Path, options: dict[str, Any]) -> dict[str, Any]:
    return {"id": pair.id, "science": pair.science, "template": pair.template, "status": "pending", "error": None,
            "wall_time": None, "cpu_time": None, "peak_memory_mb": None, "counts": {}, "config_hash": chash, "outdir": str(outdir),
            "started": None, "finished": None, "host": None, "pid": None, "attempts": 0, "files": [],
            "options": options}


def _fmt_time(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class _Progress:
    """One line per finished pair with running totals and an ETA (plain text; works in logs and terminals)."""

    def __init__(self, total: int, to_run: int, enabled: bool | Callable[[str], None], stream=None):
        self.total, self.to_run = total, to_run
        self.finished = 0
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stdout
        self.emit = enabled if callable(enabled) else (self._print if enabled else None)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def start(self, n_skipped: int, outroot: Path, kind: str, window: int) -> None:
        self.t0 = time.perf_counter()  # the ETA should not count executor start-up
        if self.emit:
            self.emit(f"diffim batch: {self.total} pairs, {n_skipped} already done, {self.to_run} to run "
                      f"({kind}, {window} at a time) → {outroot}")

    def pair(self, row: dict[str, Any], totals: dict[str, int]) -> None:
        self.finished += 1
        if not self.emit:
            return
        elapsed = time.perf_counter() - self.t0
        left = self.to_run - self.finished
        eta = f", ETA {_fmt_time(elapsed / self.finished * left)}" if left > 0 else ""
        mem = f"{row['peak_memory_mb']:.0f} MB" if row.get("peak_memory_mb") is not None else "? MB"
        if row["status"] == "done":
            n = (row.get("counts") or {}).get("nDiaSources")
            what = f"{n} DIA sources" if n is not None else "ok"
        else:
            what = row.get("error") or row["status"]
        self.emit(f"[{self.finished:>{len(str(self.to_run))}}/{self.to_run}] {row['status']:<6} {row['id']}  "
                  f"{row.get('wall_time') or 0:.1f}s {mem}  {what}  | done {totals['done']}, failed "
                  f"{totals['failed']}, skipped {totals['skipped']}; {_fmt_time(elapsed)} elapsed{eta}")


def run_batch(
    pairs: str | Path | Sequence[Any],
    config: Any = None,
    outroot: str | Path | None = None,
    *,
    executor: Any = None,
    workers: int | None = None,
    redo: bool = False,
    overrides: Iterable[str] = (),
    config_files: Iterable[str] = (),
    progress: bool | Callable[[str], None] = True,
    worker: Callable[..., None] | None = None,
    scheduler: str | None = None,
    threads: int = 1,
    plot: bool = True,
    max_tasks_per_child: int | None = None,
    logs: bool = True,
    read_options: dict[str, Any] | None = None,
) -> BatchResult:
    """Run ``diffim run`` on many pairs into ``OUTROOT/<id>/``, resumably, in parallel worker processes.

    Parameters
    ----------
    pairs : path or sequence
        A pair list file (:func:`read_pairs`: CSV or YAML) or a sequence accepted by :func:`normalize_pairs`.
    config : ImageDifferenceConfig or `str`, optional
        The configuration (default: :func:`diffim.pipeline.make_config` with ``overrides``/``config_files``).
        A string is taken as saved config text (what ``config.saveToStream`` writes).
    outroot : path
        Root output directory; created if needed.
    executor : {"local", "dask", "serial"} or Executor, optional
        ``"local"`` (default): a spawn-context process pool of ``workers`` processes. ``"dask"``: a
        ``distributed.LocalCluster`` of ``workers`` single-threaded processes, or the scheduler at
        ``scheduler``. ``"serial"``: in this process. Any object with a ``concurrent.futures``-style
        ``submit`` (or a ``distributed.Client``) is used as is and not shut down.
    workers : `int`, optional
        Parallel pairs (default: the CPU count, or the Dask cluster's thread count).
    redo : `bool`
        Re-run pairs already done with the same configuration.
    overrides, config_files
        ``-c key=value`` strings and ``-C`` files applied when ``config`` is None (or on top of it).
    progress : `bool` or callable
        Print one line per finished pair (or pass each line to the callable).
    worker : callable, optional
        Per-pair function ``worker(science, template, outdir, *, config_text, plot)`` (default
        :func:`run_pair`); must be picklable (a module-level function) for process executors.
    scheduler : `str`, optional
        Address of a running Dask scheduler (implies ``executor="dask"``).
    threads : `int`
        BLAS/OpenMP/FFT threads per worker (default 1: parallelism comes from processes).
    plot : `bool`
        Write ``diagnostics.png`` for each pair, as ``diffim run`` does.
    max_tasks_per_child : `int`, optional
        Replace each local worker process after this many pairs (default: reuse them).
    logs : `bool`
        Keep each pair's log messages in ``OUTROOT/logs/<id>.log``.
    read_options : `dict`, optional
        Input options for every pair, as the ``diffim run`` flags: ``companions`` (bool: use companion files
        named after each image), ``variance_kind``, ``gain``, ``read_noise``, ``reset_xy0`` (bool) and
        ``repair_cosmic_rays`` (None = auto, True, False), ``allow_band_mismatch`` (bool). Per-pair companion
        files come from the pair list.

    Returns
    -------
    result : `BatchResult`
        Rows as written to the manifest and totals; ``result.ok`` is False if any pair failed.
    """
    if outroot is None:
        raise BadInputError("run_batch needs an output root directory (outroot).")
    t_start = time.perf_counter()
    outroot = Path(outroot).absolute()
    if isinstance(pairs, (str, Path)):
        pair_list = read_pairs(pairs)
    else:
        pair_list = normalize_pairs(pairs)
    if not pair_list:
        raise BadInputError("No pairs to run.")
    read_options = {k: v for k, v in (read_options or {}).items()
                    if v is not None and not (k in ("companions", "reset_xy0") and v is False)}
    unknown = sorted(set(read_options) - set(READ_OPTIONS))
    if unknown:
        raise BadInputError(f"Unknown read option(s) {unknown}; known: {list(READ_OPTIONS)}.")

    overrides, config_files = list(overrides), list(config_files)
    if config is None:
        from ..pipeline import make_config

        config = make_config(overrides, config_files)
    elif (overrides or config_files) and not isinstance(config, str):
        from ..tasks.base import apply_config_overrides

        config = config.copy() if hasattr(config, "copy") else config
        apply_config_overrides(config, overrides, config_files)
    ctext = config_text(config)
    chash = config_hash(ctext)

    try:
        outroot.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffimIOError(f"Cannot create the output root {outroot}: {exc.strerror}.") from None
    lock = _lock(outroot)
    handle = None
    try:
        removed = _clean_partial(outroot)
        if removed:
            log.info("removed %d partial output(s) left by an interrupted run: %s", len(removed),
                     ", ".join(removed[:5]))
        _atomic_write_bytes(outroot / "batch_config.py", ctext.encode())

        previous = _Manifest.load_rows(outroot)
        rows, to_run = [], []
        for pair in pair_list:
            outdir = outroot / pair.id
            prev = previous.get(pair.id)
            options = _pair_options(pair, read_options)
            row = _empty_row(pair, chash, outdir, options)
            if not redo and _is_complete(outdir, prev) and _inputs_match(outdir, prev, pair, options):
                if prev is not None and prev.get("status") in ("done", "skipped") and prev.get("config_hash") == chash:
                    row.update({k: prev.get(k) for k in row if k in prev})
                    row["status"] = "skipped"
                elif prev is None or prev.get("status") not in ("done", "skipped"):
                    # Finished but not recorded (killed between the rename and the manifest write), or no
                    # manifest at all: trust the directory if its config.py is this config.
                    if _dir_config_hash(outdir) == chash:
                        row.update(status="skipped", counts=_read_counts(outdir), files=_list_files(outdir))
            rows.append(row)
            if row["status"] != "skipped":
                to_run.append(pair)
        header = {"version": MANIFEST_VERSION, "outroot": str(outroot), "config_hash": chash, "started": _now(),
                  "diffim_version": _version()}
        manifest = _Manifest(outroot, header, rows, parquet=True)
        manifest.write()

        n_skipped = len(rows) - len(to_run)
        prog = _Progress(len(rows), len(to_run), progress)
        totals = {"done": 0, "failed": 0, "skipped": n_skipped}
        if to_run:
            handle = _make_executor(executor, workers, scheduler, threads, max_tasks_per_child,
                                    warm_up=worker is None)
            prog.start(n_skipped, outroot, handle.kind, handle.window)
            with _worker_environment(threads if handle.kind == "local" else None):
                _drive(handle, to_run, rows, manifest, prog, totals, dict(
                    config_text=ctext, plot=plot, threads=threads, worker=worker, read_options=read_options,
                    logdir=str(outroot / "logs") if logs else None, outroot=str(outroot)))
        elif prog.emit:
            prog.emit(f"diffim batch: all {len(rows)} pairs already done with this config → {outroot}"
                      " (--redo runs them again)")
    except BaseException:
        if handle is not None:
            handle.close(cancel=True)
            handle = None
        raise
    finally:
        if handle is not None:
            handle.close()
        lock.close()
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    return BatchResult(outroot=outroot, rows=rows, wall_time=time.perf_counter() - t_start, config_hash=chash,
                       manifest=outroot / MANIFEST_NAME, counts=counts)


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except Exception:
        return "unknown"


class _worker_environment:
    """Set thread-count variables in this process while the pool exists, so spawned workers inherit them."""

    def __init__(self, threads: int | None):
        self.values = {} if threads is None else {
            "DIFFIM_FFT_WORKERS": str(threads), "OMP_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "VECLIB_MAXIMUM_THREADS": str(threads)}
        self.saved: dict[str, str | None] = {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return False


def _is_broken_pool(exc: BaseException) -> bool:
    from concurrent.futures.process import BrokenProcessPool

    return isinstance(exc, BrokenProcessPool)


def _drive(handle: _ExecutorHandle, to_run: list[Pair], rows: list[dict[str, Any]], manifest: _Manifest,
           prog: _Progress, totals: dict[str, int], common: dict[str, Any]) -> None:
    """Submit pairs (at most ``handle.window`` in flight), record each result as it arrives.

    A worker process that dies (killed, out of memory) breaks a local pool and every pair running in it.
    Those pairs are re-run one at a time in a fresh pool; a pair that kills its worker alone is failed.
    """
    done_q: queue.Queue = queue.Queue()
    pending: deque[Pair] = deque(to_run)
    isolate: deque[Pair] = deque()
    inflight: dict[Any, tuple[Pair, bool]] = {}
    by_id = {r["id"]: r for r in rows}

    def task_for(pair: Pair) -> dict[str, Any]:
        return {"id": pair.id, "science": pair.science, "template": pair.template,
                "outdir": str(Path(common["outroot"]) / pair.id), "config_text": common["config_text"],
                "plot": common["plot"], "worker": common["worker"], "read_options": common["read_options"],
                "science_kwargs": pair.read_kwargs("science"), "template_kwargs": pair.read_kwargs("template"),
                # In-process (serial) runs leave the caller's thread settings alone.
                "threads": common["threads"] if handle.kind != "serial" else None,
                "logfile": str(Path(common["logdir"]) / f"{pair.id}.log") if common["logdir"] else None}

    def submit(pair: Pair, isolated: bool) -> None:
        by_id[pair.id]["attempts"] = (by_id[pair.id].get("attempts") or 0) + 1
        fut = handle.submit(_execute, task_for(pair))
        inflight[fut] = (pair, isolated)
        fut.add_done_callback(done_q.put)

    while pending or isolate or inflight:
        if isolate:
            if not inflight:
                submit(isolate.popleft(), True)
        else:
            while pending and len(inflight) < handle.window:
                submit(pending.popleft(), False)
        fut = done_q.get()
        entry = inflight.pop(fut, None)
        if entry is None:  # a future of a pool already abandoned after a worker died
            continue
        pair, isolated = entry
        try:
            res = fut.result()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            if handle.kind == "local" and _is_broken_pool(exc):
                # The pool is unusable: every pair in flight failed with it. Start a new pool and re-run those
                # pairs alone, so that only a pair which kills its own worker is marked failed.
                if not isolated:
                    isolate.append(pair)
                    for other, _ in list(inflight.values()):
                        isolate.append(other)
                    inflight.clear()
                    _drain(done_q)
                    handle.close(cancel=True)
                    handle.executor = handle.restart()
                    handle.owned = True
                    log.warning("a worker process died; re-running %d pair(s) one at a time", len(isolate))
                    continue
                handle.close(cancel=True)
                handle.executor = handle.restart()
                err = "worker process died (killed by a signal or out of memory)"
            else:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                err = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
            res = {"status": "failed", "error": err, "finished": _now()}
        row = manifest.update(pair.id, **{k: v for k, v in res.items() if k != "id"})
        totals[row["status"]] = totals.get(row["status"], 0) + 1
        manifest.write()
        prog.pair(row, totals)


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return
