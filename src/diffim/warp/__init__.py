"""Warping, registration, template assembly and positional matching.

* :func:`warp_exposure` — Lanczos warp of an exposure onto another WCS and pixel grid (afw ``Warper``).
* :class:`WarpedPsf` — the PSF of a warped exposure; :class:`StitchedPsf` — of a template stitched from patches.
* :func:`template_coverage` — fraction of a science exposure a template covers.
* :func:`stitch_masked_images` — merge warped patches (LSST's modern weighting).
* :func:`fit_tan_sip`, :func:`fit_tan_sip_clipped` — TAN-SIP fits for registration.
* :func:`match_sky`, :func:`match_xy`, :func:`match_dia_sources` — KD-tree matching.
"""

from .coverage import check_template_coverage, template_coverage
from .lanczos import lanczos_kernel, lanczos_table
from .matching import match_dia_sources, match_sky, match_xy
from .psf import StitchedPsf, WarpedPsf
from .stitch import stitch_masked_images
from .warper import pixel_transform, warp_exposure, warp_masked_image
from .wcs_fit import fit_tan_sip, fit_tan_sip_clipped

__all__ = [
    "warp_exposure",
    "warp_masked_image",
    "pixel_transform",
    "WarpedPsf",
    "StitchedPsf",
    "template_coverage",
    "check_template_coverage",
    "stitch_masked_images",
    "fit_tan_sip",
    "fit_tan_sip_clipped",
    "match_sky",
    "match_xy",
    "match_dia_sources",
    "lanczos_kernel",
    "lanczos_table",
]
