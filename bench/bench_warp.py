"""Benchmark: wall time and peak RSS of a 4096² Lanczos-3 warp (0.35° rotation + sub-pixel shift, TAN WCSs).

Usage: ``python bench/bench_warp.py [size] [--threads N] [--strip W]``. Prints one line per run.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from diffim.model import Exposure, GaussianPsf
from diffim.warp import warp_exposure
from diffim.warp.synthetic import make_tan_wcs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("size", nargs="?", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--strip", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()
    n = a.size
    rng = np.random.default_rng(0)
    img = rng.normal(100.0, 10.0, (n, n)).astype(np.float32)
    var = np.full((n, n), 100.0, np.float32)
    wt = make_tan_wcs((n / 2 + 12.3, n / 2 - 7.9), rotation_deg=0.35)
    ws = make_tan_wcs((n / 2, n / 2))
    exp = Exposure(image=img, variance=var, wcs=wt, psf=GaussianPsf(2.0))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kw = {}
    if a.strip:
        kw["strip_width"] = a.strip
    for _ in range(a.repeat):
        import os

        if a.threads is not None:
            os.environ["DIFFIM_WARP_THREADS"] = str(a.threads)
        t0, c0 = time.perf_counter(), time.process_time()
        out = warp_exposure(exp, ws, exp.bbox, **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        good = np.count_nonzero(~out.mask.get("NO_DATA")) / out.image.size
        print(f"warp {n}x{n}: wall {wall:.2f} s, cpu {cpu:.2f} s, peak RSS {rss:.0f} MB "
              f"(inputs {rss0:.0f} MB), covered {100 * good:.1f}%, threads {os.environ.get('DIFFIM_WARP_THREADS', 'default')}")


if __name__ == "__main__":
    main()
