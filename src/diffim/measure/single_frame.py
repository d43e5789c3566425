"""All single-frame measurements of DIA sources on a difference image, as DiaSource columns.

Runs, in LSST's order, the centroid (SdssCentroid), PSF flux (PsfFlux), 12-px aperture flux
(CircularApertureFlux_12_0), adaptive moments (SdssShape, also of the PSF) and pixel flags (PixelFlags) on the
footprints found by detection, and returns APDB-named columns in instrumental units (pixels, counts, pixels²);
:func:`diffim.catalog.build_dia_source_table` converts them to the catalogue's units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..footprint import Footprint
from ..model.exposure import Exposure
from ._stamps import is_constant_psf
from .aperture import aperture_flux
from .centroid import sdss_centroid
from .flags import pixel_flags
from .psf_flux import psf_flux
from .shape import adaptive_moments

__all__ = ["measure_dia_sources", "footprint_peaks"]


def footprint_peaks(footprints: Sequence[Footprint]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First-peak position, polarity and detection significance of each footprint.

    A footprint without peaks uses its unweighted centroid. ``snr`` is the largest peak significance.
    """
    n = len(footprints)
    px, py = np.empty(n), np.empty(n)
    neg = np.zeros(n, bool)
    snr = np.full(n, np.nan)
    for i, fp in enumerate(footprints):
        if fp.peaks:
            pk = fp.peaks[0]
            px[i], py[i] = pk.x, pk.y
            sig = [p.significance for p in fp.peaks if np.isfinite(p.significance)]
            snr[i] = max(sig) if sig else np.nan
        else:
            px[i], py[i] = fp.centroid()
        neg[i] = bool(fp.is_negative)
    return px, py, neg, snr


def measure_dia_sources(
    exposure: Exposure,
    footprints: Sequence[Footprint],
    *,
    ap_radius: float = 12.0,
    bad_mask_planes: Sequence[str] = (),
    max_dist_to_peak: float = 5.0,
    psf_shapes: bool = True,
) -> dict[str, np.ndarray]:
    """Measure every footprint on ``exposure`` (the difference image).

    Parameters
    ----------
    exposure
        Difference image with a PSF.
    footprints
        Detected (merged) footprints; each is one DIA source measured at its first peak.
    ap_radius
        Aperture radius in pixels (``apFlux``).
    bad_mask_planes
        Mask planes excluded from the PSF fit (meas_base ``badMaskPlanes``, default none).
    max_dist_to_peak
        SdssCentroid ``maxDistToPeak`` (5 px in DetectAndMeasure).
    psf_shapes
        Measure the PSF moments at every source (``ixxPSF``…). False: only at ≤ 256 evenly chosen sources,
        whose median seeds the adaptive moments, and the ``*PSF`` columns hold that median (for catalogues
        that do not publish them, e.g. :func:`diffim.sources.detect_and_measure_sources`).

    Returns
    -------
    dict
        APDB column name → array (instrumental units): ``x, y, xErr, yErr, centroid_flag, psfFlux, psfFluxErr,
        psfChi2, psfNdata, psfFlux_flag*, apFlux*, ixx..ixyPSF, shape_flag*, isNegative, snr, bboxSize,
        pixelFlags*`` plus LSST-internal extras ``psfArea`` and ``centroid_flag_resetToPeak``.
    """
    psf = exposure.require_psf()
    mi = exposure.masked_image
    img, var, msk = mi.image, mi.variance, mi.mask
    xy0 = mi.xy0
    bad = msk.bitmask(list(bad_mask_planes), ignore_missing=True) if bad_mask_planes else 0
    px, py, neg, snr = footprint_peaks(footprints)
    cen = sdss_centroid(img, var, psf, px, py, negative=neg, xy0=xy0, footprints=list(footprints),
                        max_dist_to_peak=max_dist_to_peak)
    x, y = cen.x, cen.y
    pf = psf_flux(img, var, msk.array, psf, x, y, bad, xy0=xy0)
    ap = aperture_flux(img, var, x, y, ap_radius, xy0=xy0)
    if is_constant_psf(psf) or len(x) == 0:
        psf_shape = np.tile(np.asarray(psf.compute_shape(), float), (len(x), 1))
    elif hasattr(psf, "compute_shapes"):  # batched (e.g. DecorrelatedPsf)
        psf_shape = np.asarray(psf.compute_shapes(x, y), dtype=float).reshape(-1, 3)
    elif not psf_shapes and len(x) > 256:
        pick = np.linspace(0, len(x) - 1, 256).round().astype(int)
        some = np.array([psf.compute_shape(float(x[i]), float(y[i])) for i in pick], dtype=float)
        psf_shape = np.tile(np.median(some, axis=0), (len(x), 1))
    else:
        psf_shape = np.array([psf.compute_shape(float(a), float(b)) for a, b in zip(x, y)], dtype=float)
    initial = tuple(np.median(psf_shape, axis=0)) if len(x) else (4.0, 4.0, 0.0)
    sh = adaptive_moments(img, var, x, y, initial=initial, negative=neg, xy0=xy0)
    pflags = pixel_flags(msk.array, msk.planes, x, y, list(footprints), xy0=xy0)
    cols: dict[str, np.ndarray] = {
        "x": x, "y": y, "xErr": cen.x_err, "yErr": cen.y_err,
        "centroid_flag": cen.flag, "centroid_flag_resetToPeak": cen.flag_resetToPeak,
        "apFlux": ap.flux, "apFluxErr": ap.flux_err, "apFlux_flag": ap.flag,
        "apFlux_flag_apertureTruncated": ap.flag_apertureTruncated,
        "isNegative": neg, "snr": snr,
        "psfFlux": pf.flux, "psfFluxErr": pf.flux_err, "psfChi2": pf.chi2, "psfNdata": pf.npix,
        "psfArea": pf.area,
        "psfFlux_flag": pf.flag, "psfFlux_flag_edge": pf.flag_edge,
        "psfFlux_flag_noGoodPixels": pf.flag_noGoodPixels,
        "ixx": sh.ixx, "iyy": sh.iyy, "ixy": sh.ixy,
        "ixxErr": sh.ixx_err, "iyyErr": sh.iyy_err, "ixyErr": sh.ixy_err,
        "ixxPSF": psf_shape[:, 0], "iyyPSF": psf_shape[:, 1], "ixyPSF": psf_shape[:, 2],
        "shape_flag": sh.flag, "shape_flag_no_pixels": sh.flag_no_pixels,
        "bboxSize": np.array([max(fp.bbox.width, fp.bbox.height) for fp in footprints], dtype=np.int64),
    }
    cols["shape_flag_not_contained"] = np.array(
        [not fp.bbox.contains_point(a, b) for fp, a, b in zip(footprints, x, y)], dtype=bool)
    for name, arr in pflags.items():
        cols[f"pixelFlags_{name}"] = arr
    cols["pixelFlags"] = np.zeros(len(x), bool)
    return cols
