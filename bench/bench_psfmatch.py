"""Benchmark Alard–Lupton matching + subtraction (ImagePsfMatchTask.subtractExposures) on synthetic pairs.

Usage: ``python bench/bench_psfmatch.py [--sizes 2048 4096]``. Each size runs in a fresh subprocess so that the
reported peak RSS belongs to that size alone. The pair: Gaussian stars (σ_template = 1.5, σ_science = 2.0 px,
~260 stars per 1024²), flux ratio 1.25, Poisson-like noise, a sky gradient in the science; default config
(kernel order 1, background order 2, worst-case-sized basis). CPU time (user + system, all threads) is printed
next to the wall time because on a shared machine the wall time mostly measures the other users.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _pair(size: int, seed: int = 0):
    import numpy as np
    from scipy import ndimage

    from diffim.model import Exposure, GaussianPsf, PhotoCalib

    rng = np.random.default_rng(seed)
    n = int(260 * (size / 1024) ** 2)
    x = rng.integers(0, size, n)
    y = rng.integers(0, size, n)
    f = 10 ** rng.uniform(2.5, 5.0, n)
    delta = np.zeros((size, size), np.float32)
    np.add.at(delta, (y, x), f.astype(np.float32))
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    sky_s = 300 + 0.01 * xx - 0.005 * yy
    sci = ndimage.gaussian_filter(delta * 1.25, 2.0) + sky_s
    tmp = ndimage.gaussian_filter(delta, 1.5) + 100
    sci += rng.normal(size=sci.shape).astype(np.float32) * np.sqrt(sci)
    tmp += rng.normal(size=tmp.shape).astype(np.float32) * np.sqrt(tmp) * 0.5
    science = Exposure(image=sci, variance=np.maximum(sci, 1), psf=GaussianPsf(2.0), photo_calib=PhotoCalib(1.0))
    template = Exposure(image=tmp, variance=np.maximum(tmp, 1) * 0.25, psf=GaussianPsf(1.5),
                        photo_calib=PhotoCalib(1.25))
    return science, template


def run_one(size: int) -> dict:
    from diffim.tasks.image_psf_match import ImagePsfMatchTask

    science, template = _pair(size)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    task = ImagePsfMatchTask()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    res = task.subtractExposures(template, science)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "size": size,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mb": round(peak, 1),
        "rss_before_match_mb": round(rss0, 1),
        "kernel_size": task.metadata["ALKernelSize"],
        "candidates_used": task.metadata["nKernelCandidatesUsed"],
        "kernel_sum": round(res.psfMatchingKernel.kernel_sum(size / 2, size / 2), 5),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one)))
        return 0
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(size)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{size}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['size']}²: match+subtract {r['wall_s']:.2f} s wall ({r['cpu_s']:.2f} s CPU), peak RSS {r['peak_rss_mb']:.0f} MB "
              f"({r['rss_before_match_mb']:.0f} MB before matching), kernel {r['kernel_size']}, "
              f"{r['candidates_used']} candidates, kernel sum {r['kernel_sum']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
