"""Benchmark: ZOGY on a 4096² pair (wall time and peak RSS).

Usage: ``.venv/bin/python bench/bench_zogy.py [size]``. Builds a white-noise pair with Gaussian PSFs of
different widths and a few hundred stars, then times :func:`diffim.zogy.zogy_subtract` (FFT workers = 2).
Peak RSS is the process's maximum resident set (``ru_maxrss``), which includes the inputs (≈ 256 MiB at 4096²).
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np


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
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0, c0 = time.perf_counter(), time.process_time()
    res = zogy_subtract(sci, vsci, tmp, vtmp, psf_n, psf_r)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = {"size": size, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": round(rss, 1), "rss_before_mib": round(rss0, 1),
           "F_D": res.F_D}
    print(out)
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
