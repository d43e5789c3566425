"""Batch throughput: the same simulated pairs with 1 local worker, N local workers and an N-worker Dask cluster.

    .venv/bin/python bench/bench_batch.py [--pairs 16] [--size 1024] [--workers 2] [--no-dask] [--repeat R]
                                          [--workdir DIR]

Every run is single-threaded per worker (``threads=1``), so the ratio measures how well the batch scales over
processes; the load average before and after each run is printed, because other jobs on a shared machine
take cores away. Writes ``<workdir>/bench_batch.json``. Target: ≥ 1.7× with 2 workers on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _simulate(root: Path, n: int, size: int) -> Path:
    from diffim.sim import write_simulation

    rows = []
    for i in range(n):
        d = (root / "inputs" / f"pair{i:02d}").resolve()  # absolute: the list's relative paths resolve against it
        if not (d / "template.fits").exists():
            write_simulation(d, size=size, seed=100 + i)
        rows.append(f"{d / 'science.fits'},{d / 'template.fits'},pair{i:02d}")
    plist = root / "pairs.csv"
    plist.write_text("science,template,id\n" + "\n".join(rows) + "\n")
    return plist


def _run(label: str, plist: Path, out: Path, **kw) -> dict:
    from diffim.batch import run_batch

    shutil.rmtree(out, ignore_errors=True)
    load_before = _load()
    t0 = time.perf_counter()
    res = run_batch(plist, None, out, progress=False, plot=False, **kw)
    wall = time.perf_counter() - t0
    pair_walls = [r["wall_time"] for r in res.rows if r.get("wall_time")]
    cpu = sum(r.get("cpu_time") or 0.0 for r in res.rows)
    peaks = [r["peak_memory_mb"] for r in res.rows if r.get("peak_memory_mb")]
    row = {
        "label": label, "wall_s": round(wall, 1), "pairs_per_min": round(60 * len(res.rows) / wall, 2),
        "done": res.n_done, "failed": res.n_failed, "mean_pair_s": round(sum(pair_walls) / max(1, len(pair_walls)), 2),
        "max_peak_mb": round(max(peaks), 0) if peaks else None, "load_before": load_before, "load_after": _load(),
        # CPU seconds the pairs got per wall second: what the batch could use of the machine. On idle cores it
        # approaches the worker count; on a shared machine it shows how much the other jobs left over.
        "pair_cpu_s": round(cpu, 1), "cores_used": round(cpu / wall, 2),
    }
    print(f"{label:<22} {row['wall_s']:>7.1f} s  {row['pairs_per_min']:>6.2f} pairs/min  mean pair "
          f"{row['mean_pair_s']:.1f} s  CPU {row['pair_cpu_s']:.0f} s ({row['cores_used']:.2f} cores)  "
          f"peak {row['max_peak_mb']} MB  failed {row['failed']}  "
          f"load {load_before} → {row['load_after']}", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-dask", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; the fastest of each is kept")
    p.add_argument("--workdir", type=Path, default=Path("bench_batch_work"))
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"bench_batch: {args.pairs} pairs of {args.size}², CPUs {os.cpu_count()}, load {_load()}", flush=True)
    t0 = time.perf_counter()
    plist = _simulate(args.workdir, args.pairs, args.size)
    print(f"simulated in {time.perf_counter() - t0:.0f} s", flush=True)

    setups = [("local, 1 worker", "out_1", dict(workers=1)),
              (f"local, {args.workers} workers", f"out_{args.workers}", dict(workers=args.workers))]
    if not args.no_dask:
        try:
            import distributed  # noqa: F401

            setups.append((f"dask, {args.workers} workers", f"out_dask{args.workers}",
                           dict(workers=args.workers, executor="dask")))
        except ImportError:
            print("dask: not installed (pip install 'diffim[dask]'); skipped")
    # Interleave the set-ups and keep each one's fastest run: other jobs on a shared machine only ever slow
    # a run down, so the minimum is the best estimate of what the batch itself costs.
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for label, sub, kw in setups:
            row = _run(label, plist, args.workdir / sub, **kw)
            if label not in best or row["wall_s"] < best[label]["wall_s"]:
                best[label] = row
    rows = [best[label] for label, _, _ in setups]
    base = rows[0]["wall_s"]
    for r in rows[1:]:
        r["speedup"] = round(base / r["wall_s"], 2)
        print(f"speed-up {r['label']}: {r['speedup']:.2f}× (target ≥ 1.7× on idle cores)")
    (args.workdir / "bench_batch.json").write_text(json.dumps(
        {"pairs": args.pairs, "size": args.size, "cpus": os.cpu_count(), "repeat": args.repeat, "best": rows},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
