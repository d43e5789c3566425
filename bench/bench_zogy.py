"""Benchmark: ZOGY on a 4096² pair (wall time, CPU time and peak RSS).

Usage: ``.venv/bin/python bench/bench_zogy.py [size]``. Builds a white-noise pair with Gaussian PSFs of
different widths (σ 2.2 / 1.6 px), ~840 stars and realistic variance planes (sky + source Poisson), then times
:func:`diffim.zogy.zogy_subtract` (one cell, FFT workers = 2) and, separately, the task's default differential
background fit. Peak RSS includes the inputs (≈ 256 MiB at 4096²). CPU time sums all threads: on a loaded
machine it is the better measure of the work done.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _helpers import peak_rss_gib, save  # noqa: E402


def main(size: int = 4096) -> dict:
    from diffim.model import GaussianPsf
    from diffim.zogy import zogy_subtract

    rng = np.random.default_rng(0)
    psf_n = GaussianPsf(2.2).compute_kernel_image()
    psf_r = GaussianPsf(1.6).compute_kernel_image()
    sci = rng.normal(0.0, 10.0, (size, size)).astype(np.float32)
    tmp = rng.normal(0.0, 5.0, (size, size)).astype(np.float32)
    nstar = size * size // 20000
    ys, xs = rng.integers(20, size - 20, (2, nstar))
    flux = rng.uniform(1e3, 1e5, nstar)
    for img, p in ((sci, psf_n), (tmp, psf_r)):
        h = p.shape[0] // 2
        for y, x, f in zip(ys, xs, flux):
            img[y - h : y + h + 1, x - h : x + h + 1] += (f * p).astype(np.float32)
    # Realistic variance planes: sky plus the sources' Poisson term (gain 1), not constants.
    vsci = (100.0 + np.clip(sci, 0, None)).astype(np.float32)
    vtmp = (25.0 + 0.25 * np.clip(tmp, 0, None)).astype(np.float32)
    rss0 = peak_rss_gib()

    t0, c0 = time.perf_counter(), time.process_time()
    res = zogy_subtract(sci, vsci, tmp, vtmp, psf_n, psf_r)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = peak_rss_gib()

    t0, c0 = time.perf_counter(), time.process_time()
    zogy_subtract(sci[:1024, :1024], vsci[:1024, :1024], tmp[:1024, :1024], vtmp[:1024, :1024], psf_n, psf_r,
                  difference_background_bin=128)
    bg_wall, bg_cpu = time.perf_counter() - t0, time.process_time() - c0

    out = {"size": size, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_gib": round(rss, 3),
           "rss_before_gib": round(rss0, 3), "F_D": res.F_D, "border": res.border,
           "with_background_1024_wall_s": round(bg_wall, 2), "with_background_1024_cpu_s": round(bg_cpu, 2)}
    print(out)
    save("zogy", out)
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
