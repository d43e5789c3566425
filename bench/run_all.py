"""Run every ``bench/bench_*.py`` script in its own process (so peak memory is per benchmark)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
scripts = sorted(here.glob("bench_*.py"))
if len(sys.argv) > 1:
    scripts = [s for s in scripts if any(k in s.name for k in sys.argv[1:])]
failed = []
for script in scripts:
    print(f"=== {script.name}", flush=True)
    rc = subprocess.call([sys.executable, str(script)])
    if rc:
        failed.append(script.name)
print("benchmark results in", here / "results")
if failed:
    print("FAILED:", ", ".join(failed))
    sys.exit(1)
