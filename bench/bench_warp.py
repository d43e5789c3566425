"""Benchmark: wall time and peak RSS of a 4096² Lanczos-3 warp (0.35° rotation + sub-pixel shift, TAN WCSs).

Usage: ``python bench/bench_warp.py [size] [--threads N] [--strip W] [--repeat R] [--masks] [--method M]``.
Prints one line per run with wall and CPU time and the machine's 1-minute load average (the machine is
shared: compare runs at similar load, and quote the best of several). ``--masks`` adds realistic mask
planes (DETECTED on ~15 % of the pixels, a few SAT/CR pixels, a NO_DATA border) so the mask propagation is
timed too; ``--method two-pass-gather`` times the per-pixel-gather reference path.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

from diffim.model import Exposure, GaussianPsf, Mask
from diffim.warp import warp_exposure
from diffim.warp.synthetic import make_tan_wcs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("size", nargs="?", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--strip", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--masks", action="store_true")
    p.add_argument("--method", default="auto")
    a = p.parse_args()
    n = a.size
    rng = np.random.default_rng(0)
    img = rng.normal(100.0, 10.0, (n, n)).astype(np.float32)
    var = np.full((n, n), 100.0, np.float32)
    mask = Mask.zeros((n, n))
    if a.masks:
        yy, xx = np.ogrid[:n, :n]
        blobs = (np.sin(xx / 37.0) * np.cos(yy / 23.0)) > 0.72  # ~15 % of the area
        mask.set("DETECTED", blobs)
        mask.set("SAT", rng.random((n, n)) < 1e-4)
        mask.set("CR", rng.random((n, n)) < 1e-4)
        border = np.zeros((n, n), bool)
        border[:8] = border[-8:] = True
        border[:, :8] = border[:, -8:] = True
        mask.set("NO_DATA", border)
    wt = make_tan_wcs((n / 2 + 12.3, n / 2 - 7.9), rotation_deg=0.35)
    ws = make_tan_wcs((n / 2, n / 2))
    exp = Exposure(image=img, variance=var, mask=mask, wcs=wt, psf=GaussianPsf(2.0))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kw = {"method": a.method}
    if a.strip:
        kw["strip_width"] = a.strip
    if a.threads is not None:
        os.environ["DIFFIM_WARP_THREADS"] = str(a.threads)
    for _ in range(a.repeat):
        load = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        out = warp_exposure(exp, ws, exp.bbox, **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        good = np.count_nonzero(~out.mask.get("NO_DATA")) / out.image.size
        print(f"warp {n}x{n}: wall {wall:.2f} s, cpu {cpu:.2f} s, peak RSS {rss:.0f} MB "
              f"(inputs {rss0:.0f} MB), covered {100 * good:.1f}%, "
              f"threads {os.environ.get('DIFFIM_WARP_THREADS', 'default')}, load {load:.1f}")


if __name__ == "__main__":
    main()
