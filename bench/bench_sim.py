"""Benchmark: simulate a science/template pair and score its perfect difference (metrics.md's last column).

Usage::

    .venv/bin/python bench/bench_sim.py [--size 2048] [--seed 0] [--repeat 1]

Times :func:`diffim.sim.simulate_pair` (target: ≲ 10 s at 2048²), then measures the quality figures of the
perfect difference (science − its own noiseless static sky) with the reference matched-filter detector, i.e.
the "perfect subtraction" column of /work/shared/design/metrics.md. Writes ``bench/results/sim.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _helpers import peak_rss_gib, save, time_best  # noqa: E402

from diffim import metrics  # noqa: E402
from diffim.sim import simulate_pair  # noqa: E402
from diffim.testing.reference import matched_filter_catalog  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    wall, pair = time_best(lambda: simulate_pair(args.size, seed=args.seed), args.repeat)
    kinds = {str(k): int((pair.truth["kind"] == k).sum()) for k in sorted(set(pair.truth["kind"]))}
    print(f"simulate_pair({args.size}) in {wall:.2f} s wall; truth rows: {kinds}")

    t0 = time.perf_counter()
    perfect = pair.perfect_difference()
    cat = matched_filter_catalog(perfect, pair.truth.meta["SCIFWHM"])
    figures = metrics.evaluate(perfect, cat, pair.truth)
    t_eval = time.perf_counter() - t0
    print(f"perfect difference scored in {t_eval:.2f} s:")
    for k, v in figures.items():
        print(f"  {k:28s} {v:.4g}" if isinstance(v, float) else f"  {k:28s} {v}")
    save(
        "sim",
        {
            "size": args.size,
            "seed": args.seed,
            "simulate_wall_s": wall,
            "evaluate_wall_s": t_eval,
            "peak_rss_gib": peak_rss_gib(),
            "truth_counts": kinds,
            "perfect_difference": figures,
        },
    )


if __name__ == "__main__":
    main()
