"""Pixel-noise autocorrelation of an image, for the template-noise correction of the kernel fit.

Resampled and coadded images (warped templates, drizzled frames) have noise that is correlated between
neighbouring pixels, while their variance plane only holds each pixel's own variance. The correction of the
normal equations (:func:`diffim.psfmatch.solve.template_noise_matrix`) needs the covariance of the convolved
image's noise at the lags a kernel spans; with the variance plane that means the normalised autocorrelation
``ρ(d) = Cov(n(p), n(p + d)) / √(V(p) V(p + d))`` (``ρ(0) = 1``), measured here on the source-free pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["noise_correlation"]


def noise_correlation(
    image: np.ndarray,
    variance: np.ndarray,
    good: np.ndarray | None = None,
    *,
    radius: int = 2,
    background_box: int = 17,
    clip: float = 3.0,
    max_size: int = 1024,
    return_scale: bool = False,
) -> np.ndarray | tuple[np.ndarray, float]:
    """Normalised noise autocorrelation ``ρ`` of ``image`` at lags up to ``radius`` (``(2r+1, 2r+1)``, ρ[r, r] = 1).

    The image is scaled by ``1/√variance``; a running mean over ``background_box`` pixels (of the unmasked
    pixels) is subtracted, and pixels beyond ``clip`` times the measured noise or in a 5×5 mean above one
    noise σ (sources), grown by 4 pixels, are excluded; this is done twice so the source mask no longer biases
    the background. ``ρ(d)`` is the
    mean product of the remaining pixel pairs at lag ``d`` divided by the lag-0 mean, symmetrised
    (``ρ(d) = ρ(−d)``). Only the central ``max_size × max_size`` region is used (the estimate's error is
    ~``1/√npix`` already far below what the correction needs).

    With ``return_scale`` also the ratio of the measured pixel variance to the variance plane, ``(IQR/1.349)²``
    of the scaled background pixels (robust, so the clipped tails and the residual faint sources barely move
    it); ``scale · ρ`` is then the noise covariance in units of the variance plane.

    Returns the identity (``ρ = δ``, scale 1) if fewer than 1000 pixels are usable: white noise as the variance
    plane says is then assumed. A noiseless image (every background residual 0) gives scale 0.
    """
    r = int(radius)
    img = np.asarray(image, dtype=np.float64)
    var = np.asarray(variance, dtype=np.float64)
    ny, nx = img.shape
    y0, x0 = max(0, (ny - max_size) // 2), max(0, (nx - max_size) // 2)
    sl = (slice(y0, y0 + max_size), slice(x0, x0 + max_size))
    img, var = img[sl], var[sl]
    ok = np.isfinite(img) & np.isfinite(var) & (var > 0)
    if good is not None:
        ok &= np.asarray(good, bool)[sl]
    delta = np.zeros((2 * r + 1, 2 * r + 1))
    delta[r, r] = 1.0
    if ok.sum() < 1000:
        return (delta, 1.0) if return_scale else delta
    x = np.where(ok, img / np.sqrt(np.where(ok, var, 1.0)), 0.0)

    def robust_var(v):
        q25, q75 = np.percentile(v, [25, 75])
        return float(((q75 - q25) / 1.349) ** 2)

    # Thresholds are in units of the measured noise, not the variance plane's, so a mis-scaled plane is
    # clipped like a right one.
    scale = robust_var(x[ok] - np.median(x[ok]))
    use = ok.copy()
    resid = x
    for _ in range(2):
        w = use.astype(np.float64)
        bg = ndimage.uniform_filter(x * w, background_box) / np.maximum(ndimage.uniform_filter(w, background_box),
                                                                         1e-3)
        resid = x - bg
        sd = np.sqrt(scale) if scale > 0 else 1.0
        src = (np.abs(resid) > clip * sd) | (ndimage.uniform_filter(np.where(ok, resid, 0.0), 5) > sd)
        use = ok & ~ndimage.binary_dilation(src, iterations=4)
        if use.sum() < 1000:
            return (delta, 1.0) if return_scale else delta
        scale = robust_var(resid[use])
    z = np.where(use, resid, 0.0)
    H, W = z.shape
    rho = np.zeros((2 * r + 1, 2 * r + 1))
    for dy in range(0, r + 1):
        for dx in range(-r, r + 1):
            if dy == 0 and dx < 0:
                continue
            a = (slice(0, H - dy), slice(max(0, -dx), W - max(0, dx)))
            b = (slice(dy, H), slice(max(0, dx), W - max(0, -dx)))
            n = np.count_nonzero(use[a] & use[b])
            val = float((z[a] * z[b]).sum() / n) if n else 0.0
            rho[r + dy, r + dx] = rho[r - dy, r - dx] = val
    lag0 = rho[r, r]
    if not lag0 > 0:  # no noise at all (a noiseless image whatever its variance plane says)
        return (delta, 0.0) if return_scale else delta
    if not scale > 0:  # more than half the pixels identical (quantised): the mean square instead
        scale = float(lag0)
    rho = rho / lag0
    return (rho, scale) if return_scale else rho
