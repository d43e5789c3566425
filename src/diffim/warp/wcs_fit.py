"""Fit a TAN-SIP WCS to matched pixel and sky positions (linear least squares), with iterative clipping.

Model: gnomonic projection about a tangent point ``crval``; intermediate world coordinates
``(ξ, η) = CD · (u + A(u, v), v + B(u, v))`` with ``(u, v) = pixel − crpix`` and SIP polynomials ``A``, ``B`` of
total degree 2 … ``order``. Writing ``ξ`` and ``η`` as full polynomials of ``(u, v)`` makes the fit linear; the
linear terms give ``CD`` and the rest, multiplied by ``CD⁻¹``, the SIP coefficients. A constant term means the
tangent point is off: ``crval`` is moved to the sky position of ``crpix`` and the fit repeated (two rounds
converge to ≪ 1 mas). The pixel coordinates are 0-based parent coordinates, as every WCS in diffim.
"""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS, Sip

from ..errors import WcsError

__all__ = ["fit_tan_sip", "fit_tan_sip_clipped", "gnomonic", "sky_separation_arcsec"]


def gnomonic(ra, dec, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic (TAN) projection of ``(ra, dec)`` about ``(ra0, dec0)``, all in degrees; result in degrees."""
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    a0, d0 = np.radians(ra0), np.radians(dec0)
    cosc = np.sin(d0) * np.sin(dec) + np.cos(d0) * np.cos(dec) * np.cos(ra - a0)
    xi = np.cos(dec) * np.sin(ra - a0) / cosc
    eta = (np.cos(d0) * np.sin(dec) - np.sin(d0) * np.cos(dec) * np.cos(ra - a0)) / cosc
    return np.degrees(xi), np.degrees(eta)


def sky_separation_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle separation in arcsec (haversine)."""
    r1, d1, r2, d2 = (np.radians(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * 3600.0


def _terms(order: int) -> list[tuple[int, int]]:
    return [(p, t - p) for t in range(order + 1) for p in range(t, -1, -1)]


def fit_tan_sip(x, y, ra, dec, order: int = 2, crpix: tuple[float, float] | None = None,
                crval: tuple[float, float] | None = None) -> WCS:
    """Least-squares TAN(-SIP) WCS mapping 0-based pixel ``(x, y)`` to ``(ra, dec)`` (degrees).

    Parameters
    ----------
    order
        SIP order (1 = plain TAN with a free CD matrix). Lowered automatically when there are too few points
        (each order ``n`` needs ``(n+1)(n+2)/2`` points per axis); :class:`WcsError` with fewer than 3 points.
    crpix
        0-based reference pixel (default: mean of the positions).
    crval
        Initial tangent point (default: mean sky position).
    """
    x, y, ra, dec = (np.asarray(v, float) for v in (x, y, ra, dec))
    n = x.size
    if n < 3:
        raise WcsError(f"Cannot fit a WCS to {n} matched positions; need at least 3.")
    while order > 1 and (order + 1) * (order + 2) // 2 > max(3, n - 2):
        order -= 1
    if crpix is None:
        crpix = (float(x.mean()), float(y.mean()))
    if crval is None:
        v = np.column_stack([np.cos(np.radians(dec)) * np.cos(np.radians(ra)),
                             np.cos(np.radians(dec)) * np.sin(np.radians(ra)), np.sin(np.radians(dec))]).mean(0)
        crval = (float(np.degrees(np.arctan2(v[1], v[0])) % 360.0), float(np.degrees(np.arcsin(v[2] / np.linalg.norm(v)))))
    u, v = x - crpix[0], y - crpix[1]
    # Scale the design matrix for conditioning.
    s = max(float(np.max(np.abs(np.concatenate([u, v])))), 1.0)
    terms = _terms(order)
    design = np.column_stack([(u / s) ** p * (v / s) ** q for p, q in terms])
    ra0, dec0 = crval
    for _ in range(6):
        xi, eta = gnomonic(ra, dec, ra0, dec0)
        cx, *_ = np.linalg.lstsq(design, xi, rcond=None)
        cy, *_ = np.linalg.lstsq(design, eta, rcond=None)
        # Constant terms: the tangent point belongs at the sky position of crpix (1e-10 deg = 0.4 µas).
        if abs(cx[0]) < 1e-10 and abs(cy[0]) < 1e-10:
            break
        w = _tan_wcs(crpix, (ra0, dec0), np.eye(2))
        ra0, dec0 = (float(c) for c in w.wcs_pix2world([[crpix[0] + cx[0], crpix[1] + cy[0]]], 0)[0])
    cd = np.array([[cx[1], cx[2]], [cy[1], cy[2]]]) / s
    wcs = _tan_wcs(crpix, (ra0, dec0), cd)
    if order >= 2:
        cdinv = np.linalg.inv(cd)
        a = np.zeros((order + 1, order + 1))
        b = np.zeros((order + 1, order + 1))
        for k, (p, q) in enumerate(terms):
            if p + q < 2:
                continue
            scale = s ** (p + q)
            fx, fy = cdinv @ np.array([cx[k], cy[k]])
            a[p, q], b[p, q] = fx / scale, fy / scale
        wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
        wcs.wcs.set()
    return wcs


def _tan_wcs(crpix, crval, cd) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [crpix[0] + 1.0, crpix[1] + 1.0]  # FITS CRPIX is 1-based
    w.wcs.crval = [crval[0], crval[1]]
    w.wcs.cd = np.asarray(cd, float)
    w.wcs.set()
    return w


def fit_tan_sip_clipped(x, y, ra, dec, order: int = 2, n_iter: int = 3, n_sigma: float = 3.0,
                        crpix: tuple[float, float] | None = None):
    """:func:`fit_tan_sip` with LSST's RegisterTask clipping loop.

    Up to ``n_iter`` times: fit, compute each match's separation ``dr`` (arcsec) under the fitted WCS,
    ``rms = max(√mean(dr²), 1e-9)``, keep ``dr < n_sigma·rms``; stop when nothing is rejected; fit again.

    Returns
    -------
    wcs, good, rms_arcsec
        The final WCS, the boolean mask of matches kept and the RMS separation (arcsec) of the kept ones.
    """
    x, y, ra, dec = (np.asarray(v, float) for v in (x, y, ra, dec))
    good = np.ones(x.size, bool)
    wcs = fit_tan_sip(x, y, ra, dec, order, crpix)
    for _ in range(n_iter):
        r, d = wcs.all_pix2world(x, y, 0)
        dr = sky_separation_arcsec(r, d, ra, dec)
        rms = max(float(np.sqrt(np.mean(dr[good] ** 2))), 1e-9)
        new_good = good & (dr < n_sigma * rms)
        if new_good.sum() == good.sum() or new_good.sum() < 3:
            break
        good = new_good
        wcs = fit_tan_sip(x[good], y[good], ra[good], dec[good], order, crpix)
    r, d = wcs.all_pix2world(x[good], y[good], 0)
    rms = float(np.sqrt(np.mean(sky_separation_arcsec(r, d, ra[good], dec[good]) ** 2)))
    return wcs, good, rms
