"""Forced PSF photometry at DIA-source positions on the science (or template) exposure.

The LSST equivalent is ``ForcedMeasurementTask`` with ``base_TransformedCentroid`` (reference pixel position →
sky through the difference WCS → pixel through the measured image's WCS) and ``base_PsfFlux``; results become
``scienceFlux``/``scienceFluxErr`` (and ``templateFlux``) in the DiaSource table.
"""

from __future__ import annotations

import numpy as np

from .measure.psf_flux import PsfFluxResult, psf_flux
from .model.exposure import Exposure

__all__ = ["transform_positions", "forced_psf_photometry", "wcs_equal"]


def wcs_equal(a, b, bbox=None, tol: float = 1e-3) -> bool:
    """True if two astropy WCSs map the corners and centre of ``bbox`` to the same pixels within ``tol``."""
    if a is None or b is None:
        return True
    if a is b:
        return True
    if bbox is None:
        pts_x = np.array([0.0, 1000.0, 0.0, 1000.0, 500.0])
        pts_y = np.array([0.0, 0.0, 1000.0, 1000.0, 500.0])
    else:
        pts_x = np.array([bbox.x0, bbox.x1 - 1, bbox.x0, bbox.x1 - 1, bbox.center[0]], float)
        pts_y = np.array([bbox.y0, bbox.y0, bbox.y1 - 1, bbox.y1 - 1, bbox.center[1]], float)
    ra, dec = a.all_pix2world(pts_x, pts_y, 0)
    bx, by = b.all_world2pix(ra, dec, 0)
    return bool(np.all(np.hypot(bx - pts_x, by - pts_y) < tol))


def transform_positions(x, y, ref_wcs, target_wcs, bbox=None) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions ``(x, y)`` on the reference grid → pixels of the target image (via the sky).

    If either WCS is missing, or they agree over ``bbox``, the positions are returned unchanged (same grid).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if ref_wcs is None or target_wcs is None or wcs_equal(ref_wcs, target_wcs, bbox):
        return x.copy(), y.copy()
    ra, dec = ref_wcs.all_pix2world(x, y, 0)
    tx, ty = target_wcs.all_world2pix(ra, dec, 0)
    return np.asarray(tx, float), np.asarray(ty, float)


def forced_psf_photometry(
    exposure: Exposure,
    x,
    y,
    *,
    ref_wcs=None,
    bad_mask_planes=(),
) -> PsfFluxResult:
    """PSF fluxes of ``exposure`` at reference positions ``(x, y)``.

    Parameters
    ----------
    exposure
        The image to measure (science, or the matched/warped template), with a PSF.
    x, y
        Positions (parent pixels) on the reference (difference image) grid.
    ref_wcs
        WCS of the reference grid; when it differs from ``exposure.wcs`` the positions are transformed
        through the sky, otherwise they are used as they are.
    bad_mask_planes
        Mask planes excluded from the fit (default none, as LSST).

    Returns
    -------
    PsfFluxResult
        Instrumental fluxes in ``exposure``'s units, with the PsfFlux flags.

    Notes
    -----
    LSST replaces all other DIA footprints by noise while measuring each source (``doReplaceWithNoise``);
    here the pixels are measured as they are, which differs only for blended DIA sources.
    """
    psf = exposure.require_psf()
    tx, ty = transform_positions(x, y, ref_wcs, exposure.wcs, exposure.bbox)
    mi = exposure.masked_image
    bad = mi.mask.bitmask(list(bad_mask_planes), ignore_missing=True) if bad_mask_planes else 0
    return psf_flux(mi.image, mi.variance, mi.mask.array, psf, tx, ty, bad, xy0=mi.xy0)
