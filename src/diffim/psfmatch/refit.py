"""Refit of the differential background on the whole difference image.

The Alard–Lupton solution fits the background ``bg(x, y)`` (a polynomial of order ``spatialBgOrder``) jointly
with the kernel, from the kernel stamps only: a few tens of 30–40 px boxes, each centred on a star. The constant
term of a stamp is nearly degenerate with the kernel sum times the template's sky there, so the polynomial is
poorly pinned between the stamps. On simulated 1024² pairs it leaves a smooth error of ±0.3–0.8 counts
(≈ ±0.05–0.1 σ of the PSF-smoothed difference) with a negative mean, and twice as many negative as positive
4σ noise peaks.

:func:`refit_background` measures what the stamp fit left, on the difference's source-free pixels (≈ 10⁶ at
1024²), in the same polynomial basis, and returns that correction. A source mask (``|PSF-smoothed S/N| >
threshold``, grown) keeps transients and star residuals out. The level fitted is the median, per super-pixel,
of the *PSF-smoothed* difference: detection thresholds that image, and smoothing makes the noise Gaussian
enough that its median is its mean (raw pixel medians are not, when the pixel noise is skewed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..background import bin_statistics
from ..detection import box_any, smooth_for_detection
from .kernel import SpatialBackground, evaluate_on_axes

__all__ = ["BackgroundRefit", "refit_background", "source_mask"]


@dataclass
class BackgroundRefit:
    """Result of :func:`refit_background`.

    Attributes
    ----------
    correction
        Background to subtract from the difference (same spatial basis as the stamp fit), or None when the
        image had too few source-free super-pixels (``reason`` says why).
    n_bins
        Super-pixels used in the final fit.
    rms
        Root mean square of the correction over the image (image units).
    reason
        Why no correction was fitted (empty when one was).
    """

    correction: SpatialBackground | None
    n_bins: int
    rms: float
    reason: str = ""


def _block_views(a: np.ndarray, step: int):
    """The ``step²`` strided views whose element-wise combination reduces ``a`` over ``step × step`` blocks (a
    trailing partial row or column of blocks is dropped)."""
    ny, nx = (a.shape[0] // step) * step, (a.shape[1] // step) * step
    return [a[dy:ny:step, dx:nx:step] for dy in range(step) for dx in range(step)]


def _block_mean(a: np.ndarray, step: int) -> np.ndarray:
    if step == 1:
        return a
    views = _block_views(a, step)
    out = np.zeros(views[0].shape, np.float32)
    for v in views:
        out += v
    out /= np.float32(step * step)
    return out


def _block_any(a: np.ndarray, step: int) -> np.ndarray:
    if step == 1:
        return a
    views = _block_views(a, step)
    out = np.zeros(views[0].shape, bool)
    for v in views:
        out |= v
    return out


def _smoothed(image: np.ndarray, variance: np.ndarray, invalid: np.ndarray, sigma: float, step: int = 1):
    """The difference binned ``step × step`` (block means) and smoothed with the PSF's Gaussian (σ/step in binned
    pixels, unit sum, so in image units), the variance of that, and the binned pixels whose smoothing window
    touches an invalid one (a block with any invalid pixel is invalid and zeroed, which pulls the smoothed values
    near it towards 0)."""
    bad = _block_any(invalid, step)
    img = _block_mean(np.where(invalid, np.float32(0), image).astype(np.float32, copy=False), step)
    # The mean of step² pixels has 1/step² of their variance.
    var = _block_mean(np.where(invalid, np.float32(0), variance).astype(np.float32, copy=False), step)
    var /= np.float32(step * step)
    img[bad] = 0.0
    var[bad] = 0.0
    sm = smooth_for_detection(img, var, None, sigma / step)
    del img, var
    near = box_any(bad, sm.kernel_width) if bad.any() else bad
    return sm.image, sm.variance, near


def _hot(resid: np.ndarray, smoothed_variance: np.ndarray, usable: np.ndarray, threshold: float,
         grow: int) -> tuple[np.ndarray, float]:
    """Pixels within ``grow`` of a smoothed S/N beyond ±threshold × its robust scatter; and that scatter."""
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = resid / np.sqrt(smoothed_variance)
    # The variance plane's S/N assumes white noise; a difference whose noise is correlated (the science
    # convolved by a broad kernel, a pre-convolved score) scatters more once smoothed. Thresholding the
    # measured scatter masks sources, not most of the sky (82 % of a convolved-science difference otherwise).
    sample = snr[::4, ::4][usable[::4, ::4] & np.isfinite(snr[::4, ::4])]
    scale = 1.0
    if sample.size > 100:
        q25, q75 = np.percentile(sample, [25, 75])
        scale = max(float(q75 - q25) / 1.349, 1e-12)
    with np.errstate(invalid="ignore"):
        hot = np.abs(snr) > threshold * scale
    del snr
    if grow > 0 and hot.any():
        hot = box_any(hot, 2 * grow + 1)
    return hot, scale


def _sigma(psf_sigma: float) -> float:
    return float(psf_sigma) if np.isfinite(psf_sigma) and psf_sigma > 0 else 1.5


def source_mask(image: np.ndarray, variance: np.ndarray, exclude: np.ndarray, psf_sigma: float, *,
                threshold: float = 3.5, grow: int | None = None) -> np.ndarray:
    """True on pixels within ``grow`` px of a point where the PSF-smoothed S/N is beyond ``±threshold`` times
    its measured scatter (robust std over the image).

    Parameters
    ----------
    image, variance
        Difference image and its variance (2-D, same shape).
    exclude
        True on pixels that carry no data (bad, saturated, edge); they are zeroed before smoothing.
    psf_sigma
        Gaussian σ (px) of the smoothing filter: the PSF's.
    threshold
        |S/N| of the smoothed image above which a pixel belongs to a source.
    grow
        Growth radius (px); default one FWHM, which takes a faint source's wings (where its smoothed S/N falls
        below the threshold) out too.
    """
    sigma = _sigma(psf_sigma)
    invalid = np.asarray(exclude, bool) | ~np.isfinite(image) | ~np.isfinite(variance) | ~(variance > 0)
    sm, sv, near = _smoothed(image, variance, invalid, sigma)
    grow = int(math.ceil(2.35482 * sigma)) if grow is None else int(grow)
    return _hot(sm, sv, ~near, threshold, grow)[0]


def refit_background(image: np.ndarray, variance: np.ndarray, exclude: np.ndarray, background: SpatialBackground,
                     xy0: tuple[int, int], psf_sigma: float, *, bin_size: int = 32, threshold: float = 3.5,
                     min_fill: float = 0.25, clip: float = 5.0) -> BackgroundRefit:
    """Correction to the stamp-fitted background, fitted on the whole difference image.

    The level fitted is that of the PSF-smoothed difference, the image detection thresholds: its super-pixel
    medians estimate its mean, whereas the median of the raw pixels differs from their mean when the pixel noise
    is skewed (on a GOTO pair by 0.06 σ, which the smoothing turns into a 0.3 σ offset of the detection image).

    Parameters
    ----------
    image, variance
        The difference (background already subtracted) and its variance plane.
    exclude
        True on pixels to ignore besides sources (bad, saturated, edge, no data).
    background
        The stamp-fitted background; its spatial basis (``background.spatial``) is the one refitted.
    xy0
        Parent coordinates of ``image[0, 0]`` (the basis is defined on parent coordinates).
    psf_sigma
        Gaussian σ of the difference's PSF (px): the smoothing filter.
    bin_size
        Super-pixel size; each super-pixel contributes the median of its smoothed, source-free pixels.
    threshold
        Source-mask threshold (|PSF-smoothed S/N| in units of its measured scatter), see :func:`source_mask`.
    min_fill
        Super-pixels with fewer than this fraction of usable pixels are dropped (mostly masked ones sit in a
        source's wings).
    clip
        Super-pixels deviating from the fit by more than ``clip`` standard errors are dropped and the fit repeated
        (an extended residual the mask missed).

    Returns
    -------
    BackgroundRefit
    """
    spatial = background.spatial
    if spatial is None or len(background.params) == 0:
        return BackgroundRefit(None, 0, 0.0, "no background was fitted (fitForBackground=False)")
    n_terms = len(background.params)
    ny, nx = image.shape
    sigma = _sigma(psf_sigma)
    # ~(v > 0) is also True where the variance is NaN.
    invalid = np.asarray(exclude, bool) | ~np.isfinite(image) | ~(variance > 0) | np.isinf(variance)
    # The smoothed image is correlated over ≈ σ: binned 2 × 2 before smoothing it keeps nearly all its
    # information for a 32-px median, and smoothing, masking and binning cost 4× less (4096²: 3.6 → 0.9 s CPU).
    step = 2 if min(ny, nx) >= 256 and bin_size >= 8 and sigma >= 1.0 else 1
    sm, sv, unusable = _smoothed(image, variance, invalid, sigma, step)
    # Binned pixel j covers image pixels step·j … step·j + step − 1.
    xs = xy0[0] + step * np.arange(sm.shape[1], dtype=float) + (step - 1) / 2.0
    ys = xy0[1] + step * np.arange(sm.shape[0], dtype=float) + (step - 1) / 2.0
    grow = int(math.ceil(2.35482 * sigma / step))
    # Correlation area of the smoothed noise (white input): 1/Σk² = 4π(σ/step)² binned pixels.
    area = max(4.0 * math.pi * (sigma / step) ** 2, 1.0)
    coef, n_used, model = np.zeros(n_terms), 0, None
    # Two passes: the second masks sources on the image minus the first pass's fit, so that a large background
    # error (a smooth ≥ 0.5 σ offset is a ≥ 3σ "source" once PSF-smoothed) is not itself masked away.
    for _ in range(2):
        resid = sm if model is None else sm - model
        hot, scale = _hot(resid, sv, ~unusable, threshold, grow)
        del resid
        fit = _fit_bins(sm, sv, unusable | hot, spatial, xy0, step, n_terms, max(bin_size // step, 1), min_fill,
                        clip, scale, area)
        del hot
        if fit is None:
            break
        coef, n_used = fit
        model = evaluate_on_axes(spatial, coef, xs, ys)
    if model is None:
        return BackgroundRefit(None, 0, 0.0, f"fewer than {3 * n_terms} source-free super-pixels for {n_terms} "
                                             "background terms")
    correction = SpatialBackground(coef, spatial)
    # rms over a coarse grid of the image is enough for a diagnostic.
    gx = np.linspace(xy0[0], xy0[0] + nx - 1, 17)
    gy = np.linspace(xy0[1], xy0[1] + ny - 1, 17)
    gxx, gyy = np.meshgrid(gx, gy)
    rms = float(np.sqrt(np.mean(correction(gxx.ravel(), gyy.ravel()) ** 2)))
    return BackgroundRefit(correction, int(n_used), rms)


def _fit_bins(smoothed, smoothed_variance, skip, spatial, xy0, step, n_terms, bin_size, min_fill, clip, scale,
              area):
    """Weighted least-squares fit of the spatial basis to the super-pixel medians (arrays binned ``step × step``
    from the image); None if too few super-pixels are usable."""
    values, counts, xc, yc = bin_statistics(smoothed, skip, bin_size, "median")
    noise, _, _, _ = bin_statistics(smoothed_variance, skip, bin_size, "mean")
    full = np.diff(np.round(np.linspace(0, smoothed.shape[0], values.shape[0] + 1)))[:, None] * \
        np.diff(np.round(np.linspace(0, smoothed.shape[1], values.shape[1] + 1)))[None, :]
    ok = np.isfinite(values) & np.isfinite(noise) & (noise > 0) & (counts >= min_fill * full)
    if ok.sum() < 3 * n_terms:
        return None
    jj, ii = np.nonzero(ok)
    design = np.asarray(spatial(step * xc[ii] + (step - 1) / 2.0 + xy0[0], step * yc[jj] + (step - 1) / 2.0 + xy0[1]),
                        float)
    # Standard error of a median of n Gaussian values, 1.2533 σ/√n, with n the number of independent values.
    n_eff = np.maximum(counts[ok] / area, 1.0)
    err = 1.2533 * scale * np.sqrt(noise[ok]) / np.sqrt(n_eff)
    b = values[ok].astype(float)
    keep = np.ones(b.size, bool)
    col = np.sqrt((design**2).sum(axis=0))  # raw-coordinate polynomials span many decades
    col[col == 0] = 1.0
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[keep] / col / err[keep, None], b[keep] / err[keep], rcond=None)
        coef = coef / col
        new_keep = np.abs((b - design @ coef) / err) <= clip
        if new_keep.sum() < 3 * n_terms or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return coef, int(keep.sum())
