"""RegisterTask: image-to-image registration of a template onto a science exposure (LSST ``RegisterTask``).

``run`` matches template sources to science sources on the sky, fits a TAN-SIP WCS for the template that maps
its source centroids onto the matched science positions (iterative 3σ clipping), and returns it;
``warpExposure`` then warps the template with that WCS onto the science WCS and bbox. This corrects template
WCS errors (offsets of arcseconds, small rotations) using the science exposure's astrometry as the reference.

Extension over LSST: when the template WCS is off by more than ``matchRadius`` (LSST fails with "no matches"),
a pre-alignment finds the dominant offset of all pairs within ``maxOffset`` arcsec (the mode of a 2-D
histogram of pair offsets) and matches after removing it. ``maxOffset=0`` restores LSST's behaviour.
"""

from __future__ import annotations

import os

import lsst.pex.config as pexConfig
import numpy as np

from ..errors import WcsError
from ..warp.matching import match_sky
from ..warp.warper import warp_exposure
from ..warp.wcs_fit import fit_tan_sip_clipped, sky_separation_arcsec
from .base import Struct, Task, timeMethod

__all__ = ["RegisterConfig", "RegisterTask", "WarperConfig", "source_positions", "write_match_diagnostics"]


class WarperConfig(pexConfig.Config):
    """Warping parameters (afw ``WarperConfig``)."""

    warpingKernelName = pexConfig.ChoiceField(
        dtype=str,
        default="lanczos3",
        allowed={"bilinear": "bilinear interpolation", "lanczos3": "Lanczos kernel of order 3",
                 "lanczos4": "Lanczos kernel of order 4", "lanczos5": "Lanczos kernel of order 5"},
        doc="Warping kernel",
    )
    maskWarpingKernelName = pexConfig.ChoiceField(
        dtype=str,
        default="bilinear",
        allowed={"bilinear": "bilinear footprint (all bits)"},
        doc="Warping kernel for mask (the mask is OR-ed over this footprint; EDGE/NO_DATA over the full one)",
    )
    interpLength = pexConfig.Field(
        dtype=int, default=10, doc="interpLength argument to WarpingControl: the WCS is exact every this many px"
    )
    cacheSize = pexConfig.Field(
        dtype=int, default=1000000, doc="cacheSize argument to WarpingControl (kernel table size; informational)"
    )
    growFullMask = pexConfig.Field(
        dtype=int, default=16, doc="mask bits to grow to full width of image/variance kernel (EDGE; informational)"
    )


class RegisterConfig(pexConfig.Config):
    """Configuration for RegisterTask (LSST names and defaults)."""

    matchRadius = pexConfig.Field(dtype=float, default=1.0, doc="Matching radius (arcsec)", check=lambda x: x > 0)
    sipOrder = pexConfig.Field(dtype=int, default=4, doc="Order for SIP WCS", check=lambda x: x >= 1)
    sipIter = pexConfig.Field(dtype=int, default=3, doc="Rejection iterations for SIP WCS", check=lambda x: x >= 0)
    sipRej = pexConfig.Field(dtype=float, default=3.0, doc="Rejection threshold for SIP WCS", check=lambda x: x > 0)
    warper = pexConfig.ConfigField(dtype=WarperConfig, doc="Configuration for warping")
    maxOffset = pexConfig.Field(
        dtype=float,
        default=10.0,
        doc="Largest template WCS offset (arcsec) searched for before matching (diffim extension; 0 = off)",
        check=lambda x: x >= 0,
    )
    minMatches = pexConfig.Field(dtype=int, default=6, doc="Fewest matches accepted for the WCS fit (diffim)")


def _column(cat, names):
    for n in names:
        try:
            return np.asarray(cat[n], float)
        except (KeyError, ValueError, IndexError, TypeError):
            continue
    return None


def source_positions(cat, wcs=None):
    """``(x, y, ra, dec)`` of a source catalogue (astropy Table, dict or structured array).

    Pixel columns: ``x``/``y``, ``slot_Centroid_x``/``_y``, ``centroid_x``/``_y``, ``base_SdssCentroid_x``/``_y``.
    Sky columns (degrees): ``ra``/``dec`` or ``coord_ra``/``coord_dec``; computed from the pixels with ``wcs``
    when absent (and pixels from the sky the other way round). Missing ones are None.
    """
    x = _column(cat, ("x", "slot_Centroid_x", "centroid_x", "base_SdssCentroid_x"))
    y = _column(cat, ("y", "slot_Centroid_y", "centroid_y", "base_SdssCentroid_y"))
    ra = _column(cat, ("ra", "coord_ra", "RA"))
    dec = _column(cat, ("dec", "coord_dec", "DEC"))
    if (ra is None or dec is None) and x is not None and y is not None and wcs is not None:
        ra, dec = wcs.all_pix2world(x, y, 0)
    if (x is None or y is None) and ra is not None and wcs is not None:
        x, y = wcs.all_world2pix(ra, dec, 0)
    return x, y, ra, dec


def _pre_offset(ra1, dec1, ra2, dec2, max_offset: float, bin_arcsec: float) -> tuple[float, float]:
    """Dominant sky offset (arcsec, in the tangent plane) of catalogue 2 relative to 1 (mode of pair offsets)."""
    i1, i2, _ = match_sky(ra1, dec1, ra2, dec2, max_offset, closest=False)
    if i1.size == 0:
        return 0.0, 0.0
    cosd = np.cos(np.radians(dec1[i1]))
    dra = ((ra2[i2] - ra1[i1] + 180.0) % 360.0 - 180.0) * cosd * 3600.0
    ddec = (dec2[i2] - dec1[i1]) * 3600.0
    nb = max(int(np.ceil(2 * max_offset / bin_arcsec)), 1)
    h, ex, ey = np.histogram2d(dra, ddec, bins=nb, range=[[-max_offset, max_offset], [-max_offset, max_offset]])
    # Smooth over 3x3 bins so a peak split across bin edges still wins, then refine by the mean near the peak.
    from scipy.ndimage import uniform_filter

    hs = uniform_filter(h, 3, mode="constant")
    ix, iy = np.unravel_index(np.argmax(hs), hs.shape)
    cx, cy = 0.5 * (ex[ix] + ex[ix + 1]), 0.5 * (ey[iy] + ey[iy + 1])
    near = np.hypot(dra - cx, ddec - cy) < 2 * bin_arcsec
    if near.sum() == 0:
        return 0.0, 0.0
    return float(np.median(dra[near])), float(np.median(ddec[near]))


def write_match_diagnostics(path: str, matches: "np.ndarray | dict", wcs_fit=None) -> str:
    """Write the matches with their residuals to a FITS (``.fits``) or CSV table (``doDebugRegister``).

    Columns: template ``x``, ``y``, science ``ra``, ``dec``, ``sep_in`` (arcsec under the input template WCS),
    ``sep_fit`` (arcsec under the fitted WCS), ``dx_fit``/``dy_fit`` (pixel residual under the fit) and ``good``.
    """
    from astropy.table import Table

    t = Table({k: np.asarray(v) for k, v in matches.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if str(path).lower().endswith((".csv", ".txt")):
        t.write(path, format="ascii.csv", overwrite=True)
    else:
        t.write(path, format="fits", overwrite=True)
    return path


class RegisterTask(Task):
    """Register a template to a science exposure by matching sources and fitting a TAN-SIP WCS."""

    ConfigClass = RegisterConfig
    _DefaultName = "register"

    @timeMethod
    def run(self, inputSources, inputWcs, inputBBox, templateSources, sipOrder: int | None = None,
            templateWcs=None, debugPath: str | None = None) -> Struct:
        """Fit a new WCS for the input (template) exposure.

        Parameters
        ----------
        inputSources
            Sources detected on the exposure to be registered (the template): pixel centroids ``x``, ``y``
            (or LSST slot names).
        inputWcs
            That exposure's current WCS (used to match, and as the starting point).
        inputBBox
            That exposure's :class:`~diffim.model.box.Box` (the SIP reference pixel is its centre).
        templateSources
            Reference sources (LSST's naming: the *science* sources) with sky positions ``ra``/``dec`` (or
            ``coord_ra``/``coord_dec``), or pixel positions plus ``templateWcs``.
        sipOrder
            SIP order (default ``config.sipOrder``; ImageDifferenceTask passes ``templateSipOrder``).
        templateWcs
            WCS of the reference sources, used only if they lack sky columns.
        debugPath
            If given, write the match table with residuals there (``doDebugRegister``).

        Returns
        -------
        Struct
            ``matches`` (dict of arrays: ``x``, ``y``, ``ra``, ``dec``, ``sep_in``, ``sep_fit``, ``good``),
            ``wcs`` (the fitted astropy WCS), ``sipRms`` (pixels), ``offset`` (pre-alignment, arcsec),
            ``nMatches``, ``nGood``, ``nRejected``, ``debug`` (the diagnostics path written, or None).

        Raises
        ------
        WcsError
            No (or too few) matches within ``matchRadius``.
        """
        cfg = self.config
        order = cfg.sipOrder if sipOrder is None else int(sipOrder)
        x, y, _, _ = source_positions(inputSources)
        if x is None or y is None:
            raise WcsError("RegisterTask needs pixel centroids (x, y) for the sources of the exposure to register.")
        ra_in, dec_in = inputWcs.all_pix2world(x, y, 0)
        _, _, ra_ref, dec_ref = source_positions(templateSources, templateWcs)
        if ra_ref is None:
            raise WcsError("RegisterTask needs sky positions (ra, dec) or a WCS for the reference sources.")
        off = (0.0, 0.0)
        if cfg.maxOffset > cfg.matchRadius:
            off = _pre_offset(ra_in, dec_in, ra_ref, dec_ref, cfg.maxOffset, cfg.matchRadius / 2.0)
        cosd = np.cos(np.radians(dec_in))
        ra_sh = ra_in + off[0] / 3600.0 / np.maximum(cosd, 1e-6)
        dec_sh = dec_in + off[1] / 3600.0
        i1, i2, _ = match_sky(ra_sh, dec_sh, ra_ref, dec_ref, cfg.matchRadius, closest=True)
        self.metadata["MATCH_NUM"] = int(i1.size)
        if i1.size < max(cfg.minMatches, 3):
            raise WcsError(
                f"RegisterTask matched only {i1.size} sources within {cfg.matchRadius}\" (after a pre-alignment "
                f"offset of ({off[0]:.2f}, {off[1]:.2f})\"); need ≥ {max(cfg.minMatches, 3)}. Check the WCSs, "
                "raise register.matchRadius/maxOffset, or set doUseRegister=False."
            )
        mx, my = x[i1], y[i1]
        mra, mdec = ra_ref[i2], dec_ref[i2]
        crpix = inputBBox.center if inputBBox is not None else None
        wcs, good, rms_arcsec = fit_tan_sip_clipped(mx, my, mra, mdec, order, cfg.sipIter, cfg.sipRej, crpix)
        # SIP_RMS in pixels, as LSST: the arcsec RMS over the fitted pixel scale.
        cd = wcs.pixel_scale_matrix
        scale = float(np.sqrt(abs(np.linalg.det(cd)))) * 3600.0
        fx, fy = wcs.all_world2pix(mra, mdec, 0)
        rfit, dfit = wcs.all_pix2world(mx, my, 0)
        matches = {
            "x": mx, "y": my, "ra": mra, "dec": mdec,
            "sep_in": sky_separation_arcsec(ra_in[i1], dec_in[i1], mra, mdec),
            "sep_fit": sky_separation_arcsec(rfit, dfit, mra, mdec),
            "dx_fit": fx - mx, "dy_fit": fy - my, "good": good,
        }
        sip_rms = rms_arcsec / scale
        self.metadata["SIP_RMS"] = float(sip_rms)
        self.metadata["SIP_GOOD"] = int(good.sum())
        self.metadata["SIP_REJECTED"] = int((~good).sum())
        self.log.info("Registered with %d matches (%d rejected): rms %.4f px, pre-offset (%.2f, %.2f)\"",
                      good.sum(), (~good).sum(), sip_rms, off[0], off[1])
        if debugPath:
            write_match_diagnostics(debugPath, matches)
        return Struct(matches=matches, wcs=wcs, sipRms=float(sip_rms), offset=off, nMatches=int(i1.size),
                      nGood=int(good.sum()), nRejected=int((~good).sum()), debug=debugPath or None)

    @timeMethod
    def warpExposure(self, inputExp, newWcs, templateWcs, templateBBox):
        """Warp ``inputExp`` (carrying the WCS ``newWcs`` from :meth:`run`) onto ``templateWcs`` / ``templateBBox``.

        LSST's argument names: the *template* here is the destination (the science exposure's WCS and bbox).
        """
        w = self.config.warper
        return warp_exposure(inputExp, templateWcs, templateBBox, kernel=w.warpingKernelName,
                             interp_length=w.interpLength, wcs_in=newWcs)

    def warpSources(self, inputSources, newWcs, templateWcs, templateBBox=None):
        """Pixel positions of ``inputSources`` (in the registered exposure) on the destination grid."""
        x, y, _, _ = source_positions(inputSources)
        ra, dec = newWcs.all_pix2world(x, y, 0)
        return templateWcs.all_world2pix(ra, dec, 0)
