"""Cosmic rays and hot pixels: find pixels sharper than the PSF allows, and interpolate over them.

LSST's inputs to ``ImageDifferenceTask`` are calexps whose cosmic rays were already found and interpolated
(``characterizeImage``'s repair step). Plain FITS frames from other telescopes come without that step, and a
single sharp pixel in one image becomes a 10–20 σ "transient" in the difference. This module gives the
pipeline that step for such inputs.

Criterion (after LSST's ``findCosmicRays``, written from its description): a pixel ``p`` (background
subtracted) is a cosmic ray if ``p > min_sigma·σ`` and, for at least three of the four neighbour pairs
through it (horizontal, vertical, both diagonals), ``(p − cond3·σ)·r > mean(pair) + cond3·σ`` with ``r`` the
PSF's value one step away relative to its peak (``exp(−d²/2s²)``, ``d = 1`` or ``√2``) times ``sharpness``
(0.5, because real stellar cores are peakier than the Gaussian of the same second moments). A PSF-shaped
source satisfies none (its neighbours carry at least the fraction ``r`` of the peak); a hot pixel satisfies
all four, and a ray along one axis three. The flagged pixels are grown by two pixels.

Faint rays in a *resampled* frame escape that test: the registration spreads a 10–20 σ ray over 2×3 pixels
whose neighbours are then no longer below ``r`` of the peak by the 3σ noise allowance. They are still far
sharper than the PSF, which a likelihood-ratio test sees (:func:`sharp_sources`): at each local maximum, fit
a pixel-integrated Gaussian of the PSF's σ and one of σ = 0.5 px (a ray smeared by interpolation), each with
free amplitude and sub-pixel centre, on the 5×5 stamp; the source is a ray when the sharp model's χ² is lower
by more than ``delta_chi2`` (25) and its amplitude is ≥ ``min_sigma`` σ. A PSF-shaped source of S/N ``s``
gives Δχ² ≈ −s²(1 − ρ²) < 0 (ρ the correlation of the two profiles, 0.7 for FWHM 3 px), so stars are not
taken; only sources fainter than S/N 50 are tested (brighter rays pass the neighbour test) and the test is
skipped when the PSF is itself nearly as sharp (σ < 0.8 px).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, special

__all__ = ["find_cosmic_rays", "interpolate_pixels", "sharp_sources"]

#: σ (pixels) of the "ray smeared by resampling" profile of the likelihood-ratio test.
SHARP_SIGMA = 0.5


def find_cosmic_rays(image: np.ndarray, variance: np.ndarray, psf_sigma: float, *,
                     background: np.ndarray | float = 0.0, bad: np.ndarray | None = None,
                     min_sigma: float = 6.0, cond3: float = 3.0, sharpness: float = 0.5,
                     min_directions: int = 3, grow: int = 2, delta_chi2: float | None = 25.0) -> np.ndarray:
    """Boolean map of cosmic-ray / hot pixels (see the module docstring), grown by ``grow`` pixels.

    Parameters
    ----------
    image, variance
        Image and its variance (same shape).
    psf_sigma
        Gaussian σ of the PSF core in pixels.
    background
        Background to subtract first (scalar or map).
    bad
        Pixels never flagged and not used as neighbours' evidence (their value is replaced by the background).
    min_sigma, cond3
        Significance of the pixel, and the noise allowance in the neighbour test, in σ.
    sharpness
        Factor (≤ 1) on the PSF ratio ``r``: a pixel is flagged only if its neighbours are below
        ``sharpness·r`` of it. Seeing-limited stars have cores sharper than the Gaussian of the same second
        moments (their neighbours can fall to ≈ 0.7 r); cosmic rays and hot pixels have neighbours near 0.
    min_directions
        How many of the four neighbour pairs must show the pixel sharper than the PSF (3: a ray along one
        axis fails only that axis; a star fails all four).
    grow
        Dilation of the flagged pixels (3×3, this many times): the wings of a ray smeared by resampling.
    delta_chi2
        Threshold of the likelihood-ratio test for smeared rays (:func:`sharp_sources`); None disables it.
    """
    p = np.asarray(image, dtype=np.float64) - background
    sig = np.sqrt(np.clip(np.asarray(variance, dtype=np.float64), 0, None))
    if bad is not None:
        p = np.where(bad, 0.0, p)
    s2 = 2.0 * max(float(psf_sigma), 0.3) ** 2
    hit = p > min_sigma * sig
    if bad is not None:
        hit &= ~bad
    sharp = None
    if delta_chi2 is not None:
        sharp = sharp_sources(p, sig * sig, psf_sigma, bad=bad, min_sigma=min_sigma, delta_chi2=delta_chi2)
    if not hit.any():
        return _grow(sharp, grow, bad) if sharp is not None else hit
    pad = np.pad(p, 1, mode="edge")
    ny, nx = p.shape
    n_sharp = np.zeros(p.shape, dtype=np.int8)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        r = sharpness * math.exp(-(dy * dy + dx * dx) / s2)
        a = pad[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx]
        b = pad[1 - dy : 1 - dy + ny, 1 - dx : 1 - dx + nx]
        n_sharp += (p - cond3 * sig) * r > 0.5 * (a + b) + cond3 * sig
    hit &= n_sharp >= min_directions
    if sharp is not None:
        hit |= sharp
    return _grow(hit, grow, bad)


def _grow(hit: np.ndarray, grow: int, bad: np.ndarray | None) -> np.ndarray:
    if grow > 0 and hit.any():
        hit = ndimage.binary_dilation(hit, structure=np.ones((3, 3), bool), iterations=int(grow))
        if bad is not None:
            hit &= ~bad
    return hit


def _pixel_gaussian(offsets: np.ndarray, sigma: float, half: int) -> np.ndarray:
    """Pixel-integrated unit 1-D Gaussians centred at ``offsets`` (n,), on pixels ``-half … half`` (n, 2h+1)."""
    k = np.arange(-half, half + 1)
    s = math.sqrt(2.0) * sigma
    return 0.5 * (special.erf((k[None, :] - offsets[:, None] + 0.5) / s)
                  - special.erf((k[None, :] - offsets[:, None] - 0.5) / s))


def sharp_sources(image: np.ndarray, variance: np.ndarray, psf_sigma: float, *, bad: np.ndarray | None = None,
                  min_sigma: float = 6.0, delta_chi2: float = 25.0, max_snr: float = 50.0,
                  candidate_sigma: float = 4.0) -> np.ndarray:
    """Local maxima much sharper than the PSF by a likelihood-ratio test (module docstring).

    Parameters
    ----------
    image, variance
        Background-subtracted image and its variance.
    psf_sigma
        Gaussian σ of the PSF (pixels); below 0.8 px nothing is tested (the two profiles are too alike).
    bad
        Pixels that carry no information (weight 0) and are never flagged.
    min_sigma
        Minimum S/N of the sharp fit.
    delta_chi2
        Minimum ``χ²_PSF − χ²_sharp``.
    max_snr
        Sources whose PSF fit has S/N above this are not tested.
    candidate_sigma
        Local maxima below this per-pixel S/N are not tested.

    Returns
    -------
    np.ndarray
        Boolean map, True on the peak pixel of each sharp source (not grown).
    """
    from ..detection import local_maxima

    p = np.asarray(image, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    out = np.zeros(p.shape, bool)
    if not (np.isfinite(psf_sigma) and psf_sigma >= 0.8):
        return out
    h = 2
    ny, nx = p.shape
    if ny <= 2 * h or nx <= 2 * h:
        return out
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where((v > 0) & np.isfinite(v) & np.isfinite(p), 1.0 / v, 0.0)
    if bad is not None:
        w[bad] = 0.0
    pz = np.where(w > 0, p, 0.0)
    with np.errstate(invalid="ignore"):
        cand = pz * np.sqrt(w) > candidate_sigma
    cand[:h], cand[ny - h:], cand[:, :h], cand[:, nx - h:] = False, False, False, False
    ys, xs = np.nonzero(cand)
    if ys.size == 0:
        return out
    is_max = local_maxima(pz, ys, xs)
    ys, xs = ys[is_max], xs[is_max]
    if ys.size == 0:
        return out
    k = np.arange(-h, h + 1)
    iy = ys[:, None, None] + k[None, :, None]
    ix = xs[:, None, None] + k[None, None, :]
    d, wt = pz[iy, ix], w[iy, ix]
    offs = np.linspace(-0.5, 0.5, 5)
    oy, ox = (a.ravel() for a in np.meshgrid(offs, offs, indexing="ij"))
    best, snr = {}, {}
    for name, sg in (("psf", float(psf_sigma)), ("sharp", SHARP_SIGMA)):
        m = _pixel_gaussian(oy, sg, h)[:, :, None] * _pixel_gaussian(ox, sg, h)[:, None, :]
        dm = np.einsum("nij,oij,nij->no", d, m, wt)
        mm = np.einsum("oij,oij,nij->no", m, m, wt)
        with np.errstate(invalid="ignore", divide="ignore"):
            gain = np.where(mm > 0, dm * dm / mm, 0.0)  # χ² reduction of the best amplitude at each centre
        j = np.argmax(gain, axis=1)
        rows = np.arange(ys.size)
        best[name] = gain[rows, j]
        with np.errstate(invalid="ignore", divide="ignore"):
            snr[name] = dm[rows, j] / np.sqrt(mm[rows, j])
    flag = ((best["sharp"] - best["psf"]) > delta_chi2) & (snr["sharp"] >= min_sigma) & (snr["psf"] <= max_snr)
    out[ys[flag], xs[flag]] = True
    return out


def interpolate_pixels(image: np.ndarray, pixels: np.ndarray, sigma: float,
                       invalid: np.ndarray | None = None) -> np.ndarray:
    """``image`` with ``pixels`` replaced by a Gaussian-weighted mean of the valid pixels around them.

    Normalised convolution: ``G * (I·w) / G * w`` with ``w`` zero on ``pixels`` (and ``invalid``); the
    Gaussian's σ is ``sigma`` (about the PSF's), widened where a hole has no valid pixel nearby.
    """
    out = np.array(image, dtype=np.float32, copy=True)
    if not pixels.any():
        return out
    w = (~pixels).astype(np.float64)
    if invalid is not None:
        w[invalid] = 0.0
    val = np.where(w > 0, image, 0.0).astype(np.float64)
    todo = pixels.copy()
    s = max(float(sigma), 0.7)
    for _ in range(6):
        num = ndimage.gaussian_filter(val * w, s, mode="constant", truncate=3.0)
        den = ndimage.gaussian_filter(w, s, mode="constant", truncate=3.0)
        ok = todo & (den > 1e-3)
        out[ok] = (num[ok] / den[ok]).astype(np.float32)
        todo &= ~ok
        if not todo.any():
            break
        s *= 2.0
    return out
