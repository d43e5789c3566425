"""Shared helpers for the benchmark scripts: timing, peak memory, machine description."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, in GiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def time_best(func, repeat: int = 1):
    """Run ``func`` ``repeat`` times; return (best wall time in s, last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = func()
        best = min(best, time.perf_counter() - t0)
    return best, out


def environment() -> dict:
    import numpy
    import scipy

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": numpy.__version__, "scipy": scipy.__version__}


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = dict(payload, environment=environment())
    path.write_text(json.dumps(payload, indent=2))
    return path
