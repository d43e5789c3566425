"""Positional matching of catalogues: on the sky (unit vectors in a KD-tree) and in pixels.

Used by :class:`~diffim.tasks.register.RegisterTask` (template ↔ science sources, 1″), by
:class:`~diffim.tasks.astrometry.AstrometryTask` (DIA sources ↔ reference objects, 0.5″) and by the
ImageDifferenceTask's ``doMatchSources`` (DIA sources ↔ science sources, ``diaSourceMatchRadius``).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["radec_to_unit", "match_sky", "match_xy", "match_dia_sources"]

_ARCSEC = np.pi / (180.0 * 3600.0)


def radec_to_unit(ra_deg, dec_deg) -> np.ndarray:
    """Unit vectors ``(N, 3)`` of sky positions in degrees."""
    ra = np.radians(np.asarray(ra_deg, float))
    dec = np.radians(np.asarray(dec_deg, float))
    cd = np.cos(dec)
    return np.column_stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)])


def _chord(radius_arcsec: float) -> float:
    return 2.0 * np.sin(0.5 * radius_arcsec * _ARCSEC)


def _arcsec_from_chord(d: np.ndarray) -> np.ndarray:
    return 2.0 * np.arcsin(np.clip(d / 2.0, 0.0, 1.0)) / _ARCSEC


def match_sky(ra1, dec1, ra2, dec2, radius_arcsec: float, closest: bool = True):
    """Match catalogue 1 to catalogue 2 on the sky.

    Parameters
    ----------
    ra1, dec1, ra2, dec2
        Degrees.
    radius_arcsec
        Maximum separation.
    closest
        If True, each object of catalogue 1 gets its nearest neighbour in catalogue 2 (within the radius), and
        each object of catalogue 2 is used at most once (the closer pair wins), like LSST's ``matchRaDec`` with
        ``closest=True``. If False, every pair within the radius is returned.

    Returns
    -------
    i1, i2, sep_arcsec
        Index arrays into the two catalogues and the separations in arcsec, sorted by ``i1``.
    """
    v1, v2 = radec_to_unit(ra1, dec1), radec_to_unit(ra2, dec2)
    empty = (np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0))
    if len(v1) == 0 or len(v2) == 0:
        return empty
    tree = cKDTree(v2)
    r = _chord(radius_arcsec)
    if closest:
        d, j = tree.query(v1, k=1, distance_upper_bound=r)
        ok = np.isfinite(d)
        i1, i2, d = np.nonzero(ok)[0], j[ok], d[ok]
        # One-to-one: sort by separation, keep the first use of each catalogue-2 object.
        order = np.argsort(d, kind="stable")
        _, first = np.unique(i2[order], return_index=True)
        keep = np.sort(order[first])
        return i1[keep], i2[keep], _arcsec_from_chord(d[keep])
    pairs = tree.query_ball_point(v1, r)
    i1 = np.repeat(np.arange(len(v1)), [len(p) for p in pairs])
    if i1.size == 0:
        return empty
    i2 = np.concatenate([np.asarray(p, np.intp) for p in pairs if len(p)])
    d = np.linalg.norm(v1[i1] - v2[i2], axis=1)
    return i1, i2.astype(np.intp), _arcsec_from_chord(d)


def match_xy(x1, y1, x2, y2, radius_px: float, closest: bool = True):
    """Pixel-coordinate version of :func:`match_sky` (``radius_px`` in pixels; separations in pixels)."""
    p1 = np.column_stack([np.asarray(x1, float), np.asarray(y1, float)])
    p2 = np.column_stack([np.asarray(x2, float), np.asarray(y2, float)])
    empty = (np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0))
    if len(p1) == 0 or len(p2) == 0:
        return empty
    tree = cKDTree(p2)
    if closest:
        d, j = tree.query(p1, k=1, distance_upper_bound=radius_px)
        ok = np.isfinite(d)
        i1, i2, d = np.nonzero(ok)[0], j[ok], d[ok]
        order = np.argsort(d, kind="stable")
        _, first = np.unique(i2[order], return_index=True)
        keep = np.sort(order[first])
        return i1[keep], i2[keep], d[keep]
    pairs = tree.query_ball_point(p1, radius_px)
    i1 = np.repeat(np.arange(len(p1)), [len(p) for p in pairs])
    if i1.size == 0:
        return empty
    i2 = np.concatenate([np.asarray(p, np.intp) for p in pairs if len(p)])
    return i1, i2, np.hypot(*(p1[i1] - p2[i2]).T)


def match_dia_sources(dia, other, radius_arcsec: float, pixel_scale: float | None = None,
                      other_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest ``other`` object of each DIA source within ``radius_arcsec`` (old ``doMatchSources``).

    Parameters
    ----------
    dia
        DIA-source positions: ``(ra, dec)`` in degrees (a pair of arrays, an ``(N, 2)`` array with
        ``pixel_scale=None``, or a table/dict with ``ra``/``dec`` or ``coord_ra``/``coord_dec`` columns), or pixel
        positions ``(x, y)`` when ``pixel_scale`` (arcsec/px) is given (table columns ``x``/``y``).
    other
        The catalogue to match against, in the same kind of coordinates.
    radius_arcsec
        Match radius (``diaSourceMatchRadius``, 0.5″ by default in LSST).
    pixel_scale
        Arcsec per pixel; if given, positions are pixels and the radius becomes ``radius_arcsec / pixel_scale``.
    other_ids
        Ids to report for the ``other`` rows (default: the table's ``id`` column if any, else row indices).

    Returns
    -------
    matched_id, distance
        Per DIA source: the matched id (``-1`` if none; int64) and the separation in arcsec (NaN if none).
        A DIA source gets its nearest neighbour; several DIA sources may share one object (as LSST's
        ``matchXy`` with ``closest=True`` per DIA source).
    """
    def coords(cat, names_a, names_b):
        if isinstance(cat, (tuple, list)) and len(cat) == 2:
            return np.asarray(cat[0], float), np.asarray(cat[1], float)
        if isinstance(cat, np.ndarray) and cat.dtype.names is None:
            arr = np.atleast_2d(np.asarray(cat, float))
            return arr[:, 0], arr[:, 1]
        for a, b in zip(names_a, names_b):
            try:
                return np.asarray(cat[a], float), np.asarray(cat[b], float)
            except (KeyError, ValueError, IndexError):
                continue
        raise KeyError(f"Cannot find position columns {names_a}/{names_b} in the catalogue.")

    if pixel_scale is None:
        a1, b1 = coords(dia, ("ra", "coord_ra", "RA"), ("dec", "coord_dec", "DEC"))
        a2, b2 = coords(other, ("ra", "coord_ra", "RA"), ("dec", "coord_dec", "DEC"))
    else:
        a1, b1 = coords(dia, ("x", "centroid_x", "slot_Centroid_x"), ("y", "centroid_y", "slot_Centroid_y"))
        a2, b2 = coords(other, ("x", "centroid_x", "slot_Centroid_x"), ("y", "centroid_y", "slot_Centroid_y"))
    if other_ids is None:
        try:
            other_ids = np.asarray(other["id"])
        except (KeyError, ValueError, IndexError, TypeError):
            other_ids = np.arange(len(a2))
    other_ids = np.asarray(other_ids).astype(np.int64)
    matched = np.full(len(a1), -1, dtype=np.int64)
    dist = np.full(len(a1), np.nan)
    # Rows without a finite position (failed centroids) never match.
    f1 = np.isfinite(a1) & np.isfinite(b1)
    f2 = np.isfinite(a2) & np.isfinite(b2)
    if not f1.any() or not f2.any():
        return matched, dist
    r1, r2 = np.nonzero(f1)[0], np.nonzero(f2)[0]
    if pixel_scale is None:
        v1, v2 = radec_to_unit(a1[r1], b1[r1]), radec_to_unit(a2[r2], b2[r2])
        d, j = cKDTree(v2).query(v1, k=1, distance_upper_bound=_chord(radius_arcsec))
        ok = np.isfinite(d)
        dist[r1[ok]] = _arcsec_from_chord(d[ok])
    else:
        p1, p2 = np.column_stack([a1[r1], b1[r1]]), np.column_stack([a2[r2], b2[r2]])
        d, j = cKDTree(p2).query(p1, k=1, distance_upper_bound=radius_arcsec / pixel_scale)
        ok = np.isfinite(d)
        dist[r1[ok]] = d[ok] * pixel_scale
    matched[r1[ok]] = other_ids[r2[j[ok]]]
    return matched, dist
