"""``diagnostics.png``: a one-page visual check of a difference-imaging run (matplotlib, Agg backend).

Panels: science, template, difference and score (or S/N) cut-outs with the DIA sources marked; the
PSF-matching kernel at 9 positions; the histogram of difference/σ on unmasked pixels against a unit Gaussian.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_diagnostics"]


def _zscale(img: np.ndarray) -> tuple[float, float]:
    from astropy.visualization import ZScaleInterval

    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = ZScaleInterval().get_limits(finite[:: max(1, finite.size // 200000)])
    return float(lo), float(hi)


def _matched_filter(diff):
    """The difference smoothed with a Gaussian of the PSF's σ, over its noise: what detection thresholds."""
    from scipy.ndimage import gaussian_filter

    sigma = diff.psf.sigma(*diff.psf_position())
    img = np.nan_to_num(diff.image.astype(float))
    var = np.nan_to_num(diff.variance.astype(float), posinf=0.0)
    sm = gaussian_filter(img, sigma)
    # Σ g² ⊗ V for a unit-sum Gaussian g of width σ is a Gaussian of width σ/√2 scaled by 1/(4πσ²).
    noise = np.sqrt(np.maximum(gaussian_filter(var, sigma / np.sqrt(2.0)) / (4 * np.pi * sigma * sigma), 1e-30))
    out = diff.copy(deep=True)
    out.image[...] = sm
    out.variance[...] = noise**2
    return out


def _cutout_box(exposure, size: int = 600):
    from .model import Box

    b = exposure.bbox
    w, h = min(size, b.width), min(size, b.height)
    cx, cy = b.x0 + b.width // 2, b.y0 + b.height // 2
    return Box(cx - w // 2, cy - h // 2, w, h)


def write_diagnostics(path, *, science, template, result, task=None, cutout: int = 600) -> Path:
    """Write the diagnostics figure to ``path`` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = result.subtractedExposure
    score = getattr(result, "scoreExposure", None)
    box = _cutout_box(diff, cutout)
    fig = plt.figure(figsize=(16, 9.5), dpi=90)
    gs = fig.add_gridspec(2, 4, height_ratios=[1.0, 0.8], hspace=0.25, wspace=0.18)

    def show(ax, exp, title, snr=False):
        if exp is None:
            ax.set_axis_off()
            ax.set_title(f"{title}: none")
            return
        sub = exp[box.intersection(exp.bbox)] if exp.bbox.contains(box) else exp
        img = sub.image.astype(float)
        if snr:
            with np.errstate(divide="ignore", invalid="ignore"):
                img = img / np.sqrt(sub.variance)
            # Masked pixels (bad columns, saturated cores, no data) carry no S/N: leave them blank.
            img[sub.mask.get(["BAD", "SAT", "NO_DATA"], ignore_missing=True)] = np.nan
            vmin, vmax = -5, 5
            cmap = "RdBu_r"
        else:
            vmin, vmax = _zscale(img)
            cmap = "gray"
        b = sub.bbox
        ax.imshow(img, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                  extent=(b.x0 - 0.5, b.x1 - 0.5, b.y0 - 0.5, b.y1 - 0.5))
        ax.set_title(title, fontsize=11)
        ax.tick_params(labelsize=7)
        cat = getattr(result, "diaSources", None)
        if cat is not None and len(cat):
            x = np.asarray(cat["x"], float)
            y = np.asarray(cat["y"], float)
            neg = np.asarray(cat["isNegative"], bool) if "isNegative" in cat.colnames else np.zeros(len(x), bool)
            dip = np.asarray(cat["isDipole"], bool) if "isDipole" in cat.colnames else np.zeros(len(x), bool)
            inside = (x >= b.x0) & (x < b.x1) & (y >= b.y0) & (y < b.y1)
            for sel, color, label in ((inside & ~neg & ~dip, "lime", "positive"), (inside & neg & ~dip, "red", "negative"),
                                      (inside & dip, "orange", "dipole")):
                ax.scatter(x[sel], y[sel], s=90, facecolors="none", edgecolors=color, linewidths=1.0, label=label)

    show(fig.add_subplot(gs[0, 0]), science, "science")
    show(fig.add_subplot(gs[0, 1]), template, "template (warped)")
    show(fig.add_subplot(gs[0, 2]), diff, "difference / σ", snr=True)
    axs = fig.add_subplot(gs[0, 3])
    if score is None and diff.psf is not None:
        score = _matched_filter(diff)
        show(axs, score, "PSF-matched-filter S/N of the difference", snr=True)
    else:
        show(axs, score, "score / σ", snr=True)
    handles, labels = fig.axes[2].get_legend_handles_labels()
    if handles:
        fig.axes[2].legend(handles, labels, loc="upper right", fontsize=7, framealpha=0.6)

    # -- kernel at 9 positions
    axk = fig.add_subplot(gs[1, 0:2])
    kern = getattr(getattr(result, "subtractRes", None), "psfMatchingKernel", None)
    if kern is not None and hasattr(kern, "kernel_image"):
        b = diff.bbox
        xs = [b.x0 + f * (b.width - 1) for f in (0.1, 0.5, 0.9)]
        ys = [b.y0 + f * (b.height - 1) for f in (0.1, 0.5, 0.9)]
        tiles = []
        for y in ys[::-1]:
            row = [np.asarray(kern.kernel_image(x, y), float) for x in xs]
            n = row[0].shape[0]
            sep = np.full((n, 2), np.nan)
            tiles.append(np.hstack(sum(([r, sep] for r in row), [])[:-1]))
        sep_row = np.full((2, tiles[0].shape[1]), np.nan)
        mosaic = np.vstack(sum(([t, sep_row] for t in tiles), [])[:-1])
        vmax = np.nanmax(np.abs(mosaic))
        axk.imshow(mosaic, origin="upper", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        axk.set_title("PSF-matching kernel at 9 positions (rows: top→bottom of the image)", fontsize=11)
    else:
        axk.text(0.5, 0.5, "no PSF-matching kernel (ZOGY or no subtraction)", ha="center", va="center")
        axk.set_title("PSF-matching kernel", fontsize=11)
    axk.set_xticks([])
    axk.set_yticks([])

    # -- residual histogram
    axh = fig.add_subplot(gs[1, 2:4])
    bad = diff.mask.get(["NO_DATA", "BAD", "SAT", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "CR"], ignore_missing=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (diff.image / np.sqrt(diff.variance))[~bad]
    z = z[np.isfinite(z)]
    if z.size:
        bins = np.linspace(-6, 6, 121)
        axh.hist(z, bins=bins, density=True, histtype="stepfilled", alpha=0.5, color="C0", label="difference/σ (unmasked, undetected)")
        xx = np.linspace(-6, 6, 400)
        axh.plot(xx, np.exp(-0.5 * xx * xx) / np.sqrt(2 * np.pi), "k-", lw=1.2, label="unit Gaussian")
        axh.set_yscale("log")
        axh.set_ylim(1e-6, 1)
        rstd = 1.4826 * np.median(np.abs(z - np.median(z)))
        axh.set_title(f"residual distribution: robust std {rstd:.3f}, mean {np.mean(z):+.3f}", fontsize=11)
        axh.legend(fontsize=8)
    fig.suptitle(f"diffim diagnostics — {len(result.diaSources) if getattr(result, 'diaSources', None) is not None else 0} DIA sources",
                 fontsize=13)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
