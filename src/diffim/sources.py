"""Single-frame source catalogue of a (science or template) exposure: LSST's ``src`` in miniature.

Detection above ``threshold`` σ (positive polarity, PSF-smoothed) and the single-frame measurements of
:mod:`diffim.measure` (SDSS centroid, PSF flux, adaptive moments, pixel flags), with the column names LSST
users know (``base_PsfFlux_instFlux``, ``base_SdssShape_xx``, ``base_PixelFlags_flag_*``, ``slot_Centroid_flag``)
plus plain ``x``, ``y``. Used for kernel-source selection (``doSelectSources``), aperture corrections,
registration and ``doMatchSources`` when the caller gives no catalogue.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from .detection import detect_footprints
from .measure.single_frame import measure_dia_sources
from .model.exposure import Exposure

__all__ = ["detect_and_measure_sources", "background_subtracted", "mark_detections"]

_STATS_PLANES = ("BAD", "SAT", "EDGE", "NO_DATA")


def detect_and_measure_sources(exposure: Exposure, *, threshold: float = 10.0, max_sources: int = 5000,
                               min_significance: float = 0.0, work: Exposure | None = None,
                               footprints: list | None = None) -> Table:
    """Detect and measure the sources of ``exposure``.

    Parameters
    ----------
    exposure
        Exposure with a PSF; its background should be (roughly) subtracted or smooth: a local background is
        removed with a coarse mesh before detection.
    threshold
        Detection threshold in units of the per-pixel noise of the smoothed image.
    max_sources
        Keep at most this many, brightest first.
    min_significance
        Measure only sources whose peak significance reaches this (the positions of all detections are kept
        in ``table.meta["all_x"]``, ``["all_y"]`` for isolation tests: every peak of every footprint at that
        detection's threshold, besides each source's own).
    work
        The background-subtracted exposure (:func:`background_subtracted`), if already computed.
    footprints
        Per-peak source footprints from an earlier detection of the same exposure (``mark_detections(...,
        return_sources=True)``); detection is then skipped and ``threshold`` is not used.

    Returns
    -------
    astropy.table.Table
        ``id, x, y, base_PsfFlux_instFlux(+Err), base_SdssShape_xx/yy/xy, base_PixelFlags_flag_*,
        slot_Centroid_flag`` (and ``flux``, ``fluxErr`` aliases).
    """
    psf = exposure.require_psf()
    sigma = psf.sigma(*exposure.psf_position())
    if work is None:
        work = background_subtracted(exposure)
    if footprints is not None:
        pos = list(footprints)
    else:
        pos, _, sm_img, sm_var = detect_footprints(
            work.image, work.variance, work.mask.array, sigma, threshold, "positive",
            stats_bits=work.mask.bitmask(list(_STATS_PLANES), ignore_missing=True), xy0=work.xy0)
        pos = _per_peak_sources(pos, sm_img, sm_var, work.xy0, sigma, threshold)
        del sm_img, sm_var
    # Every significant peak, not only each source's own: a neighbour that the per-peak split left inside a
    # bright star's source (no saddle deep enough between them) is still a neighbour for isolation tests.
    peaks = significant_peaks(pos, _MARK_THRESHOLD if footprints is not None else threshold)
    peaks |= {(fp.peaks[0].x, fp.peaks[0].y) for fp in pos}
    all_x = np.array([q[0] for q in peaks], float)
    all_y = np.array([q[1] for q in peaks], float)
    pos = [fp for fp in pos if not (fp.peaks[0].significance < min_significance)]
    pos.sort(key=lambda fp: -fp.peaks[0].value)
    pos = pos[:max_sources]
    cols = measure_dia_sources(work, pos, psf_shapes=False)  # the *PSF moment columns are not published here
    t = Table()
    n = len(pos)
    t["id"] = np.arange(1, n + 1, dtype=np.int64)
    t["x"] = np.asarray(cols["x"], float)
    t["y"] = np.asarray(cols["y"], float)
    t["base_PsfFlux_instFlux"] = np.asarray(cols["psfFlux"], float)
    t["base_PsfFlux_instFluxErr"] = np.asarray(cols["psfFluxErr"], float)
    t["base_PsfFlux_flag"] = np.asarray(cols["psfFlux_flag"], bool)
    t["base_SdssShape_xx"] = np.asarray(cols["ixx"], float)
    t["base_SdssShape_yy"] = np.asarray(cols["iyy"], float)
    t["base_SdssShape_xy"] = np.asarray(cols["ixy"], float)
    t["slot_Centroid_flag"] = np.asarray(cols["centroid_flag"], bool)
    for key, arr in cols.items():
        if key.startswith("pixelFlags_"):
            t["base_PixelFlags_flag_" + key[len("pixelFlags_"):]] = np.asarray(arr, bool)
    t["flux"] = t["base_PsfFlux_instFlux"]
    t["fluxErr"] = t["base_PsfFlux_instFluxErr"]
    if exposure.wcs is not None and n:
        ra, dec = exposure.pixel_to_sky(t["x"], t["y"])
        t["coord_ra"], t["coord_dec"] = ra, dec
    t.meta["threshold"] = threshold
    t.meta["all_x"], t.meta["all_y"] = all_x, all_y
    return t


def background_subtracted(exposure: Exposure, *, bin_size: int = 128) -> Exposure:
    """A copy of ``exposure`` with a coarse mesh background removed and unusable pixels set to 0.

    Mask and variance are shared with ``exposure`` (read-only here: nothing that measures on the copy writes
    to them; sharing the mask saves an image-sized int32 plane for as long as the copy is kept).
    """
    from .background import estimate_background

    mi = exposure.masked_image
    bad = mi.mask.get(list(_STATS_PLANES), ignore_missing=True) | ~np.isfinite(mi.image)
    try:
        bg = estimate_background(mi.image, bad, bin_size=bin_size)
    except Exception:  # tiny images: a scalar median is enough
        bg = np.nanmedian(mi.image[~bad]) if (~bad).any() else 0.0
    image = np.subtract(mi.image, bg, dtype=np.float32)
    image[bad] = 0.0
    return Exposure(image=image, mask=mi.mask,
                    variance=mi.variance, xy0=mi.xy0, psf=exposure.psf, wcs=exposure.wcs,
                    photo_calib=exposure.photo_calib, band=exposure.band)


def _per_peak_sources(footprints, sm_img, sm_var, xy0, sigma: float, threshold: float) -> list:
    """Neighbouring stars joined by one footprint become separate sources (one per significant peak)."""
    from .deblend import split_footprints

    footprints = [fp for fp in footprints if fp.peaks]
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = sm_img / np.sqrt(sm_var)
    out, _ = split_footprints(footprints, snr, xy0=xy0, min_separation=max(2.0, 2.3548 * sigma),
                              min_significance=threshold)
    return out


#: Default threshold (σ) of :func:`mark_detections`.
_MARK_THRESHOLD = 5.0


def significant_peaks(footprints, level: float = _MARK_THRESHOLD) -> set[tuple[int, int]]:
    """The distinct parent ``(x, y)`` of every peak of ``footprints`` whose significance reaches ``level`` (per-peak
    sources share their parent's peaks, so each position appears once)."""
    return {(p.x, p.y) for fp in footprints for p in fp.peaks if not (p.significance < level)}


def mark_detections(exposure: Exposure, *, threshold: float = _MARK_THRESHOLD, n_sigma_to_grow: float = 2.4,
                    work: Exposure | None = None, return_sources: bool = False):
    """Set DETECTED on the pixels of sources detected above ``threshold`` σ (in place); return their number.

    A calibrated LSST exposure arrives with DETECTED set by its own source detection, and variance scaling of
    the difference ignores those pixels; this gives plain inputs the same property. With ``return_sources``
    the per-peak source footprints are returned too (``(n, footprints)``), so a later science catalogue
    (:func:`detect_and_measure_sources` with ``footprints=``) need not detect again.
    """
    psf = exposure.require_psf()
    sigma = psf.sigma(*exposure.psf_position())
    if work is None:
        work = background_subtracted(exposure)
    from .detection import detect_footprints_smoothed, footprints_to_mask

    pos, _, sm, pos_map, _ = detect_footprints_smoothed(
        work.image, work.variance, work.mask.array, sigma, threshold, "positive", n_sigma_to_grow=n_sigma_to_grow,
        stats_bits=work.mask.bitmask(list(_STATS_PLANES), ignore_missing=True), xy0=work.xy0)
    if work.shape != exposure.shape or tuple(work.xy0) != tuple(exposure.xy0):
        pos_map = footprints_to_mask(pos, exposure.shape, exposure.xy0)
    # The detection map is the union of the footprints' pixels: no need to paint them one by one.
    exposure.mask.set("DETECTED", pos_map)
    if not return_sources:
        return len(pos)
    sources = _per_peak_sources(pos, sm.image, sm.variance, work.xy0, sigma, threshold)
    return len(pos), sources
