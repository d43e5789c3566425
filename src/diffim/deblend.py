"""Split multi-peak footprints into one DIA source per significant peak.

Detection on a difference image can join two nearby changes (transients a few FWHM apart, a transient beside a
cosmic ray) into one footprint with several peaks. LSST's diffim pipeline does not deblend, so such pairs become
one DIA source measured at the brightest peak. Here a same-sign footprint yields one child source per peak
that is separated from every brighter kept peak by a real dip of the PSF-smoothed detection image (at least
``min_dip`` σ below the fainter peak along the segment joining them); noise wiggles on a bright source's wings
do not make children. Footprints holding peaks of both signs are dipole candidates and stay whole.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .footprint import Footprint, Peak

__all__ = ["split_footprints"]


def _dip_significance(snr_image: np.ndarray, xy0, a: Peak, b: Peak, sign: float) -> float:
    """Depth (in σ of the smoothed image) of the lowest point between peaks ``a`` and ``b`` below the fainter."""
    n = int(max(abs(a.x - b.x), abs(a.y - b.y))) + 1
    t = np.linspace(0.0, 1.0, max(n, 2))
    xs = np.rint(a.x + t * (b.x - a.x)).astype(int) - xy0[0]
    ys = np.rint(a.y + t * (b.y - a.y)).astype(int) - xy0[1]
    ok = (xs >= 0) & (ys >= 0) & (xs < snr_image.shape[1]) & (ys < snr_image.shape[0])
    if not ok.any():
        return 0.0
    profile = sign * snr_image[ys[ok], xs[ok]]
    ends = min(profile[0], profile[-1])
    return float(ends - np.nanmin(profile))


def _kept_peaks(order: list[Peak], snr_image: np.ndarray, xy0, sign: float, min_separation: float, min_dip: float,
                min_significance: float, radius: float, max_peaks: int) -> list[Peak]:
    """The peaks of one sign (``order``: strongest first) that are sources of their own: the strongest, then
    each that is significant, not within ``min_separation`` of a kept one, and separated from every kept one
    within ``radius`` by a saddle at least ``min_dip`` σ deep."""
    kept: list[Peak] = [order[0]]
    kx, ky = [float(order[0].x)], [float(order[0].y)]
    for p in order[1:max_peaks]:
        if not (p.significance >= min_significance):
            continue
        d = np.hypot(np.asarray(kx) - p.x, np.asarray(ky) - p.y)
        if np.any(d < min_separation):
            continue
        close = np.nonzero(d < radius)[0]
        if all(_dip_significance(snr_image, xy0, kept[j], p, sign) >= min_dip for j in close):
            kept.append(p)
            kx.append(float(p.x))
            ky.append(float(p.y))
    return kept


def split_footprints(
    footprints: list[Footprint],
    snr_image: np.ndarray | None,
    *,
    xy0: tuple[int, int] = (0, 0),
    min_separation: float = 2.0,
    min_dip: float = 1.0,
    max_dipole_separation: float | None = None,
    max_peaks: int = 1000,
    min_significance: float = 0.0,
    dip_radius: float | None = None,
) -> tuple[list[Footprint], np.ndarray]:
    """One footprint per DIA source.

    Parameters
    ----------
    footprints
        Merged detection footprints (peaks ordered as detection/merging left them).
    snr_image
        The PSF-smoothed detection image divided by its noise (same grid as the footprints, origin ``xy0``);
        None disables splitting.
    min_separation
        Peaks closer than this (pixels) to a brighter kept peak are never separate sources.
    min_dip
        Required depth, in σ, of the saddle between two peaks for the fainter to become its own source.

    max_dipole_separation
        A footprint with peaks of both signs is a dipole candidate only if its most positive and most negative
        peaks are at most this far apart (pixels); farther apart (a fast mover's two epochs, two unrelated
        changes joined by footprint growth) it is split into its positive and its negative part. None: never.
    max_peaks
        At most this many peaks (the most significant) of one footprint are considered.
    min_significance
        A peak below this detection significance (σ) never becomes a source of its own (peaks in the grown
        part of a footprint lie below the detection threshold).
    dip_radius
        Peaks farther than this from every brighter kept peak are separate without a saddle test (the PSF
        cannot join them); default ``3 × min_separation``.

    Returns
    -------
    children, parent_index
        Child footprints (the whole parent footprint, with the child's peak first) and the index of each
        child's parent in ``footprints``.
    """
    children: list[Footprint] = []
    parents: list[int] = []
    for i, fp in enumerate(footprints):
        signs = {p.is_negative for p in fp.peaks}
        if len(signs) > 1 and max_dipole_separation is not None:
            pos_peaks = [p for p in fp.peaks if not p.is_negative]
            neg_peaks = [p for p in fp.peaks if p.is_negative]
            top = max(pos_peaks, key=lambda p: p.value)
            bottom = min(neg_peaks, key=lambda p: p.value)
            if np.hypot(top.x - bottom.x, top.y - bottom.y) > max_dipole_separation:
                parts = [replace(fp, peaks=pos_peaks, is_negative=False, from_negative=False),
                         replace(fp, peaks=neg_peaks, is_negative=True, from_positive=False)]
                sub, _ = split_footprints(parts, snr_image, xy0=xy0, min_separation=min_separation, min_dip=min_dip,
                                          max_peaks=max_peaks, min_significance=min_significance,
                                          dip_radius=dip_radius)
                children.extend(sub)
                parents.extend([i] * len(sub))
                continue
        radius = 3.0 * min_separation if dip_radius is None else dip_radius
        if snr_image is not None and len(signs) > 1:
            # A dipole candidate: its strongest positive and negative peaks stay one source; any other peak of
            # either sign that is a source of its own by the same tests (a transient beside a bright star's
            # residual) is split off rather than swallowed.
            top = max((p for p in fp.peaks if not p.is_negative), key=lambda p: p.value)
            bottom = min((p for p in fp.peaks if p.is_negative), key=lambda p: p.value)
            extra = []
            for lobe, sign in ((top, 1.0), (bottom, -1.0)):
                order = sorted((p for p in fp.peaks if p.is_negative == (sign < 0)), key=lambda p: -sign * p.value)
                kept = _kept_peaks(order, snr_image, xy0, sign, min_separation, min_dip, min_significance,
                                   radius, max_peaks)[1:]
                # Only peaks beyond the PSF's reach of both lobes: structure within it (the rings and wings of
                # a bright star's residual) belongs to the dipole.
                extra += [p for p in kept if min(np.hypot(p.x - top.x, p.y - top.y),
                                                  np.hypot(p.x - bottom.x, p.y - bottom.y)) >= radius]
            children.append(replace(fp, peaks=[p for p in fp.peaks if not any(p is e for e in extra)]))
            parents.append(i)
            for e in extra:
                flags = ({"is_negative": True, "from_positive": False} if e.is_negative
                         else {"is_negative": False, "from_negative": False})
                children.append(replace(fp, peaks=[e], **flags))
                parents.append(i)
            continue
        if snr_image is None or len(fp.peaks) < 2 or len(signs) > 1:
            children.append(fp)
            parents.append(i)
            continue
        sign = -1.0 if fp.peaks[0].is_negative else 1.0
        order = sorted(fp.peaks, key=lambda p: -sign * p.value)
        kept = _kept_peaks(order, snr_image, xy0, sign, min_separation, min_dip, min_significance, radius, max_peaks)
        if len(kept) == 1:
            children.append(replace(fp, peaks=[kept[0]] + [p for p in fp.peaks if p is not kept[0]]))
            parents.append(i)
            continue
        for k in kept:
            children.append(replace(fp, peaks=[k]))
            parents.append(i)
    return children, np.asarray(parents, dtype=np.int64)
