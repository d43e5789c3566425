"""End-to-end ImageDifferenceTask benchmark: a simulated pair at 2048² and 4096², default config.

Prints and records the total wall and CPU time of ``task.run`` (inputs already in memory, as after reading),
the per-stage wall (task metadata) and CPU breakdown, the load average and the peak resident memory of the
process. Each size runs in its own subprocess so peak memory is per size. Usage: ``python bench/bench_end_to_end.py [SIZE ...]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from _helpers import peak_rss_gib, save


def one(size: int, seed: int = 7) -> dict:
    """Run the task on a pair written to disk beforehand (so the simulator's memory is not counted)."""
    from diffim.io import read_exposure
    from diffim.tasks.image_difference import ImageDifferenceTask

    d = _pair_dir(size, seed)
    sci = read_exposure(d / "science.fits")
    tmpl = read_exposure(d / "template.fits")
    rss_inputs = peak_rss_gib()
    stage_cpu = _record_stage_cpu(ImageDifferenceTask)
    task = ImageDifferenceTask()
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    res = task.run(exposure=sci, templateExposure=tmpl)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    md = task.metadata
    return {
        "size": size,
        "wall_s": wall,
        "cpu_s": cpu,
        "load_average_1min": [load0, os.getloadavg()[0]],
        "stages_s": dict(md["stageWallTime"]),
        "stages_cpu_s": dict(stage_cpu),
        "n_dia_sources": len(res.diaSources),
        "noise_ratio": md.get("quality", {}).get("noiseRatio"),
        "peak_rss_gib": peak_rss_gib(),
        "peak_rss_after_inputs_gib": rss_inputs,
    }


def _record_stage_cpu(task_class) -> dict:
    """Wrap the task's ``_stage`` context so that each stage's CPU time (all threads) is recorded too: on a
    shared machine wall times depend on the load, CPU times much less."""
    from contextlib import contextmanager

    cpu: dict = {}
    original = task_class._stage

    @contextmanager
    def _stage(self, name):
        c0 = time.process_time()
        with original(self, name):
            yield
        cpu[name] = time.process_time() - c0

    task_class._stage = _stage
    return cpu


def _pair_dir(size: int, seed: int):
    import tempfile
    from pathlib import Path

    return Path(tempfile.gettempdir()) / f"diffim_bench_pair_{size}_{seed}"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(one(int(sys.argv[2]))))
        return
    sizes = [int(s) for s in sys.argv[1:]] or [2048, 4096]
    results = []
    for size in sizes:
        d = _pair_dir(size, 7)
        if not (d / "template.fits").exists():
            subprocess.run([sys.executable, "-c", f"from diffim.sim import write_simulation; "
                            f"write_simulation({str(d)!r}, size={size}, seed=7)"], check=True)
        out = subprocess.run([sys.executable, __file__, "--one", str(size)], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:])
            raise SystemExit(f"benchmark at {size}² failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        stages = ", ".join(f"{k} {v:.2f}/{r['stages_cpu_s'].get(k, float('nan')):.2f}"
                           for k, v in r["stages_s"].items())
        print(f"{size}²: run {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU (load {r['load_average_1min'][0]:.1f}), "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB (inputs {r['peak_rss_after_inputs_gib']:.2f}), "
              f"{r['n_dia_sources']} DIA sources, noise ratio {r['noise_ratio']:.3f}\n"
              f"   stages (wall/CPU s): {stages}")
    print("saved", save("end_to_end", {"results": results}))


if __name__ == "__main__":
    main()
