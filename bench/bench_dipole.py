"""Benchmark the dipole fit: 200 dipoles (a star shifted 0.3–3 px between template and science) on one image.

Reports the wall time per fitted source and the accuracy of the recovered separation and lobe flux.
Usage: ``python bench/bench_dipole.py [n_dipoles]``.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from _helpers import peak_rss_gib, save, time_best
from diffim.footprint import Footprint, Peak
from diffim.model import Box, Exposure, GaussianPsf
from diffim.tasks.dipole_fit import DipoleFitTask

SIGMA, NOISE = 2.0, 10.0


def make_scene(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    step = 40
    ncol = int(math.ceil(math.sqrt(n)))
    w = h = step * (ncol + 1)
    xc = (np.arange(n) % ncol + 1) * step + rng.uniform(-0.5, 0.5, n)
    yc = (np.arange(n) // ncol + 1) * step + rng.uniform(-0.5, 0.5, n)
    sep = rng.uniform(0.3, 3.0, n)
    ang = rng.uniform(0, 2 * np.pi, n)
    flux = rng.uniform(5000.0, 50000.0, n)
    dx, dy = 0.5 * sep * np.cos(ang), 0.5 * sep * np.sin(ang)
    pos = np.zeros((h, w))
    neg = np.zeros((h, w))
    r = 12
    u = np.arange(-r, r + 1)
    for i in range(n):
        ix, iy = int(round(xc[i])), int(round(yc[i]))
        for img, x0, y0 in ((pos, xc[i] + dx[i], yc[i] + dy[i]), (neg, xc[i] - dx[i], yc[i] - dy[i])):
            gx = np.exp(-0.5 * ((ix + u - x0) / SIGMA) ** 2)
            gy = np.exp(-0.5 * ((iy + u - y0) / SIGMA) ** 2)
            img[iy - r : iy + r + 1, ix - r : ix + r + 1] += flux[i] * np.outer(gy, gx) / (2 * np.pi * SIGMA**2)
    pos += rng.normal(0, NOISE, pos.shape)
    neg += rng.normal(0, NOISE, neg.shape)
    psf = GaussianPsf(SIGMA, size=17)
    var = np.full(pos.shape, NOISE**2)
    pexp = Exposure(image=pos, variance=var, psf=psf)
    nexp = Exposure(image=neg, variance=var, psf=psf)
    dexp = Exposure(pexp.masked_image - nexp.masked_image, psf=psf)
    # footprints: disks of radius 9 around each dipole, peaks at the lobe extremes of the difference image
    yy, xx = np.mgrid[-9:10, -9:10]
    disk = xx**2 + yy**2 <= 81
    footprints = []
    for i in range(n):
        ix, iy = int(round(xc[i])), int(round(yc[i]))
        box = Box(ix - 9, iy - 9, 19, 19)
        stamp = np.where(disk, dexp.image[box.slices()], 0.0)
        kmax, kmin = np.argmax(stamp), np.argmin(stamp)
        peaks = [Peak(box.x0 + kmax % 19, box.y0 + kmax // 19, float(stamp.flat[kmax])),
                 Peak(box.x0 + kmin % 19, box.y0 + kmin // 19, float(stamp.flat[kmin]), is_negative=True)]
        footprints.append(Footprint(box, disk.copy(), peaks))
    truth = dict(x=xc, y=yc, sep=sep, angle=ang, flux=flux)
    return dexp, pexp, nexp, footprints, truth


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    diff, pos, neg, footprints, truth = make_scene(n)
    task = DipoleFitTask()
    wall, out = time_best(lambda: task.run(footprints, diff, pos, neg), repeat=2)
    d = out.dipoles
    sep_err = d["dipoleSep_px"] - truth["sep"]
    flux_ratio = d["ip_diffim_DipoleFit_instFlux"] / truth["flux"]
    payload = {
        "n_dipoles": n,
        "wall_s": wall,
        "ms_per_dipole": 1e3 * wall / n,
        "fraction_classified": float(np.mean(d["isDipole"])),
        "fraction_flagged": float(np.mean(d["ip_diffim_DipoleFit_flag"])),
        "separation_error_median_px": float(np.nanmedian(sep_err)),
        "separation_error_p95_abs_px": float(np.nanpercentile(np.abs(sep_err), 95)),
        "flux_ratio_median": float(np.nanmedian(flux_ratio)),
        "flux_ratio_p95_abs_dev": float(np.nanpercentile(np.abs(flux_ratio - 1), 95)),
        "median_nfev": float(np.median([r.n_fev for r in out.results])),
        "peak_rss_gib": peak_rss_gib(),
    }
    for k, v in payload.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    print("saved", save("bench_dipole", payload))


if __name__ == "__main__":
    main()
