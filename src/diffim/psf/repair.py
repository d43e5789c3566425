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
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["find_cosmic_rays", "interpolate_pixels"]


def find_cosmic_rays(image: np.ndarray, variance: np.ndarray, psf_sigma: float, *,
                     background: np.ndarray | float = 0.0, bad: np.ndarray | None = None,
                     min_sigma: float = 6.0, cond3: float = 3.0, sharpness: float = 0.5,
                     min_directions: int = 3, grow: int = 2) -> np.ndarray:
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
    """
    p = np.asarray(image, dtype=np.float64) - background
    sig = np.sqrt(np.clip(np.asarray(variance, dtype=np.float64), 0, None))
    if bad is not None:
        p = np.where(bad, 0.0, p)
    s2 = 2.0 * max(float(psf_sigma), 0.3) ** 2
    hit = p > min_sigma * sig
    if bad is not None:
        hit &= ~bad
    if not hit.any():
        return hit
    pad = np.pad(p, 1, mode="edge")
    ny, nx = p.shape
    n_sharp = np.zeros(p.shape, dtype=np.int8)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        r = sharpness * math.exp(-(dy * dy + dx * dx) / s2)
        a = pad[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx]
        b = pad[1 - dy : 1 - dy + ny, 1 - dx : 1 - dx + nx]
        n_sharp += (p - cond3 * sig) * r > 0.5 * (a + b) + cond3 * sig
    hit &= n_sharp >= min_directions
    if not hit.any():
        return hit
    if grow > 0:
        hit = ndimage.binary_dilation(hit, structure=np.ones((3, 3), bool), iterations=int(grow))
        if bad is not None:
            hit &= ~bad
    return hit


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
