"""Small synthetic-scene helpers for warping and registration tests and benchmarks.

* :func:`make_tan_wcs` — a TAN WCS with a given centre, scale, rotation and reference pixel;
* :func:`render_stars` — stars at sky positions rendered with a PSF on an exposure's own pixel grid.
"""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS

from ..model.box import Box
from ..model.psf import Psf

__all__ = ["make_tan_wcs", "render_stars", "random_sky_positions"]


def make_tan_wcs(
    crpix: tuple[float, float],
    crval: tuple[float, float] = (150.0, 2.0),
    scale_arcsec: float = 0.2,
    rotation_deg: float = 0.0,
    flip: bool = True,
) -> WCS:
    """TAN WCS whose 0-based pixel ``crpix`` sees ``crval``; axes rotated by ``rotation_deg`` (counter-clockwise).

    ``flip=True`` gives the usual east-left orientation (RA decreasing with x).
    """
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [crpix[0] + 1.0, crpix[1] + 1.0]
    w.wcs.crval = list(crval)
    s = scale_arcsec / 3600.0
    th = np.radians(rotation_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    par = np.diag([-s if flip else s, s])
    w.wcs.cd = par @ rot
    w.wcs.set()
    return w


def random_sky_positions(wcs, bbox: Box, n: int, rng: np.random.Generator, border: float = 10.0):
    """``(ra, dec)`` of ``n`` points uniform over ``bbox`` (shrunk by ``border`` px) of ``wcs``."""
    x = rng.uniform(bbox.x0 + border, bbox.x1 - 1 - border, n)
    y = rng.uniform(bbox.y0 + border, bbox.y1 - 1 - border, n)
    return wcs.all_pix2world(x, y, 0)


def render_stars(shape_box: Box, wcs, ra, dec, flux, psf: Psf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (float64) on ``shape_box`` with stars of total ``flux`` at the sky positions, drawn with
    ``psf.compute_image`` at their pixel positions; returns ``(image, x, y)``.

    Stars whose stamp falls partly outside the box are clipped (their flux in the image is then smaller).
    """
    img = np.zeros(shape_box.shape)
    x, y = wcs.all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
    flux = np.broadcast_to(np.asarray(flux, float), x.shape)
    for xi, yi, fi in zip(x, y, flux):
        stamp, box = psf.compute_image(float(xi), float(yi))
        inter = box.intersection(shape_box)
        if inter.is_empty():
            continue
        img[inter.slices(shape_box)] += fi * stamp[inter.slices(box)]
    return img, x, y
