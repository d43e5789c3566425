"""Quality figures of a difference image against simulated truth (``/work/shared/design/metrics.md``).

All functions take the difference :class:`~diffim.model.Exposure` (or its mask), a truth table as made by
:func:`diffim.sim.simulate_pair` (columns ``kind, x, y, flux_science, delta_flux, snr, radius, saturated``), and
``fwhm``: the science PSF FWHM in pixels (a scalar). Positions are 0-based science *parent* coordinates; the
difference may be a sub-image (its ``xy0`` is honoured). σ is √VARIANCE of the difference.

Figures
-------
``noise_ratio``
    1.4826 × MAD of difference/σ over *empty* pixels (:func:`empty_pixels`).
``star_chi2_p95`` / ``star_max_p95``
    95th percentile over bright unchanged stars (:func:`bright_star_rows`) of the mean of (difference/σ)², and
    of max |difference/σ|, in the box of half-width ⌈1.5 fwhm⌉ around each.
``completeness``
    Fractions of transients with a DIA source within ``max(2 px, 0.75 fwhm)``: isolated field transients with
    S/N ≥ 7, with 5 ≤ S/N < 7, isolated transients on galaxies with S/N ≥ 7, and all transients.
``false_detections_per_mpix``
    DIA sources farther than 6 px from every true change, without a BAD/SAT/CR/EDGE/NO_DATA pixel in their
    5 × 5 box, at least 6 fwhm from the edge, per 10⁶ pixels of that interior region.
``noise_detection_rate``
    Not a figure of a result but its floor: detections per 10⁶ pixels that pure white noise gives with a
    perfect variance at a threshold, for a PSF width (see the function). With :func:`counted_area` it turns a
    false-detection count into "as many as noise alone gives".
``flux_bias``
    median(psfFlux / true flux − 1) over matched isolated transients with S/N ≥ 15.
``pull_std``
    1.4826 × MAD of (psfFlux − true flux) / psfFluxErr over matched isolated transients with S/N ≥ 7.

Flux units
----------
Fluxes are compared in the difference's units, i.e. the *science image's counts* (the truth's ``delta_flux``).
A catalogue in nJy (APDB ``psfFlux``) is converted by passing ``flux_unit_scale``: either the factor that turns
catalogue units into science counts, or the science :class:`~diffim.model.PhotoCalib` (then ``1 /
calibration_mean`` is used).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .model import Exposure, Mask, PhotoCalib

__all__ = [
    "MAD_TO_SIGMA",
    "CHANGE_KINDS",
    "DEFECT_PLANES",
    "BRIGHT_STAR_FLUX",
    "robust_std",
    "match_radius",
    "empty_pixels",
    "noise_ratio",
    "bright_star_rows",
    "star_box_statistics",
    "star_chi2_p95",
    "star_max_p95",
    "isolated_transients",
    "match_sources",
    "completeness",
    "false_detection_flags",
    "false_detections_per_mpix",
    "counted_area",
    "noise_detection_rate",
    "flux_bias",
    "pull_std",
    "evaluate",
]

MAD_TO_SIGMA = 1.4826
#: Truth kinds that are changes between template and science.
CHANGE_KINDS = ("transient", "variable", "mover", "dipole", "cosmic_ray")
#: Mask planes that disqualify a pixel near a transient or a detection.
DEFECT_PLANES = ("BAD", "SAT", "CR", "EDGE", "NO_DATA")
#: Science counts above which a star is "bright" for the χ² figures.
BRIGHT_STAR_FLUX = 5000.0
#: Planes that do not make a pixel "masked" for the noise ratio (detection bookkeeping only).
_BENIGN_PLANES = ("DETECTED", "DETECTED_NEGATIVE")
_STAR_KINDS = ("star", "variable", "dipole")


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------
def robust_std(values: np.ndarray) -> float:
    """1.4826 × median absolute deviation about the median (NaN for an empty sample)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(MAD_TO_SIGMA * np.median(np.abs(v - np.median(v))))


def match_radius(fwhm: float) -> float:
    """Matching radius of metrics.md: ``max(2 px, 0.75 fwhm)``."""
    return max(2.0, 0.75 * float(fwhm))


def _col(truth, name: str, default=None) -> np.ndarray:
    names = truth.colnames if hasattr(truth, "colnames") else list(truth.keys())
    if name in names:
        return np.asarray(truth[name])
    if default is None:
        raise KeyError(f"The truth table has no column {name!r}; make it with diffim.sim.simulate_pair().")
    return np.full(len(truth), default)


def _as_bool(values) -> np.ndarray:
    """Boolean array from bools, numbers or the strings 'True'/'False' (a truth table read back from CSV)."""
    v = np.asarray(values)
    if v.dtype.kind in "US":
        return np.char.lower(v.astype(str)) == "true"
    return v.astype(bool)


def _template_flux_sci(truth) -> np.ndarray:
    """Template-epoch flux on the science scale: ``flux_science − delta_flux``."""
    return _col(truth, "flux_science") - _col(truth, "delta_flux")


def _catalog_columns(catalog, flux_unit_scale=1.0) -> dict[str, np.ndarray]:
    """``x, y`` (and ``psfFlux, psfFluxErr`` in science counts, if present) of usable catalogue rows.

    Accepts an astropy Table, a dict of arrays, or an ``(N, 2)`` array of positions. Rows with non-finite
    positions and sky sources (``sky_source`` True) are dropped.
    """
    if catalog is None:
        return {"x": np.zeros(0), "y": np.zeros(0)}
    if isinstance(catalog, np.ndarray) or (isinstance(catalog, (list, tuple)) and not hasattr(catalog, "keys")):
        arr = np.asarray(catalog, float).reshape(-1, 2)
        cols = {"x": arr[:, 0], "y": arr[:, 1]}
    else:
        names = catalog.colnames if hasattr(catalog, "colnames") else list(catalog.keys())
        cols = {"x": np.asarray(catalog["x"], float), "y": np.asarray(catalog["y"], float)}
        keep = np.ones(cols["x"].shape, bool)
        if "sky_source" in names:
            keep &= ~_as_bool(catalog["sky_source"])
        for name in ("psfFlux", "psfFluxErr"):
            if name in names:
                cols[name] = np.asarray(catalog[name], float)
        cols = {k: v[keep] for k, v in cols.items()}
    if isinstance(flux_unit_scale, PhotoCalib):
        flux_unit_scale = 1.0 / flux_unit_scale.calibration_mean
    s = 1.0 if flux_unit_scale is None else float(flux_unit_scale)
    for name in ("psfFlux", "psfFluxErr"):
        if name in cols:
            cols[name] = cols[name] * s
    ok = np.isfinite(cols["x"]) & np.isfinite(cols["y"])
    return {k: v[ok] for k, v in cols.items()}


def _mask_of(obj) -> tuple[np.ndarray, Mask | None, tuple[int, int], tuple[int, int]]:
    """(mask array or None, Mask or None, shape, xy0) of an Exposure / Mask / shape tuple."""
    if isinstance(obj, Exposure):
        return obj.mask.array, obj.mask, obj.shape, obj.xy0
    if isinstance(obj, Mask):
        return obj.array, obj, obj.shape, (0, 0)
    if obj is None:
        raise ValueError("Pass the difference exposure (or its Mask) to locate masked pixels and the image edge.")
    return None, None, tuple(obj), (0, 0)


def _defect_near(mask: Mask | None, shape, xy0, x, y, half: int = 2, planes=DEFECT_PLANES) -> np.ndarray:
    """True where the ``(2 half + 1)²`` box around ``(x, y)`` holds a defect pixel or leaves the image."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ix = np.floor(x + 0.5).astype(int) - xy0[0]
    iy = np.floor(y + 0.5).astype(int) - xy0[1]
    ny, nx = shape
    inside = (ix >= half) & (ix < nx - half) & (iy >= half) & (iy < ny - half)
    out = ~inside
    if mask is not None and inside.any():
        out[inside] = _defect_box_map(mask, half, planes)[iy[inside], ix[inside]]
    return out


def _defect_box_map(mask: Mask, half: int = 2, planes=DEFECT_PLANES) -> np.ndarray:
    """True where the ``(2 half + 1)²`` box around a pixel holds a pixel of one of ``planes``."""
    from scipy.ndimage import maximum_filter

    bits = mask.bitmask(list(planes), ignore_missing=True)
    return maximum_filter((mask.array & bits) != 0, size=2 * half + 1, mode="constant", cval=False)


def _paint_discs(exclude: np.ndarray, xy0, x, y, radius) -> None:
    """Set ``exclude`` True within ``radius`` of each ``(x, y)`` (parent coords)."""
    ny, nx = exclude.shape
    for xi, yi, r in zip(np.asarray(x, float), np.asarray(y, float), np.broadcast_to(radius, np.shape(x))):
        if not (np.isfinite(xi) and np.isfinite(yi) and r > 0):
            continue
        cx, cy = xi - xy0[0], yi - xy0[1]
        x0, x1 = max(0, int(math.floor(cx - r))), min(nx, int(math.ceil(cx + r)) + 1)
        y0, y1 = max(0, int(math.floor(cy - r))), min(ny, int(math.ceil(cy + r)) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        exclude[y0:y1, x0:x1] |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _normalised(difference: Exposure) -> np.ndarray:
    """difference / σ, NaN where the variance is not positive and finite."""
    var = difference.variance.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = difference.image.astype(float) / np.sqrt(var)
    z[~(np.isfinite(var) & (var > 0))] = np.nan
    return z


# ----------------------------------------------------------------------------------------------------------
# Noise ratio
# ----------------------------------------------------------------------------------------------------------
def empty_pixels(difference: Exposure, truth, fwhm: float) -> np.ndarray:
    """Boolean map of the "empty" pixels of metrics.md.

    A pixel is empty when it is farther than ``2.5 fwhm × max(1, (F / 5000)^(1/4))`` from every star (``F``
    its brighter-epoch flux in science counts; the radius grows with brightness so that PSF wings and their
    residuals stay out), farther than ``2.5 fwhm + 4 r_e`` from every galaxy (``r_e`` its half-light radius),
    farther than ``4 fwhm`` (+ the ray's half-length for cosmic rays) from every change, has no mask bit other
    than DETECTED/DETECTED_NEGATIVE, a finite positive variance, and lies ≥ 6 fwhm from the image edge.
    """
    fwhm = float(fwhm)
    ny, nx = difference.shape
    xy0 = difference.xy0
    exclude = np.zeros((ny, nx), bool)
    kind = _col(truth, "kind").astype(str)
    x, y = _col(truth, "x").astype(float), _col(truth, "y").astype(float)
    radius_col = _col(truth, "radius", 0.0).astype(float)
    fsci = np.maximum(_col(truth, "flux_science").astype(float), _template_flux_sci(truth))
    star = np.isin(kind, _STAR_KINDS)
    r_star = 2.5 * fwhm * np.maximum(1.0, np.clip(fsci[star], 0, None) / BRIGHT_STAR_FLUX) ** 0.25
    _paint_discs(exclude, xy0, x[star], y[star], r_star)
    gal = kind == "galaxy"
    _paint_discs(exclude, xy0, x[gal], y[gal], 2.5 * fwhm + 4.0 * radius_col[gal])
    ch = np.isin(kind, CHANGE_KINDS)
    _paint_discs(exclude, xy0, x[ch], y[ch], 4.0 * fwhm + np.where(kind[ch] == "cosmic_ray", radius_col[ch], 0.0))
    mask = difference.mask
    benign = mask.bitmask(list(_BENIGN_PLANES), ignore_missing=True)
    exclude |= (mask.array & ~np.int32(benign)) != 0
    e = int(math.ceil(6.0 * fwhm))
    edge = np.ones((ny, nx), bool)
    if ny > 2 * e and nx > 2 * e:
        edge[e : ny - e, e : nx - e] = False
    exclude |= edge
    var = difference.variance
    exclude |= ~(np.isfinite(var) & (var > 0)) | ~np.isfinite(difference.image)
    return ~exclude


def noise_ratio(difference: Exposure, truth, fwhm: float) -> float:
    """Robust std (1.4826 × MAD) of difference/σ over the empty pixels (:func:`empty_pixels`); 1 is ideal."""
    empty = empty_pixels(difference, truth, fwhm)
    if not empty.any():
        return float("nan")
    return robust_std(_normalised(difference)[empty])


# ----------------------------------------------------------------------------------------------------------
# Bright-star residuals
# ----------------------------------------------------------------------------------------------------------
def bright_star_rows(difference: Exposure, truth, fwhm: float) -> np.ndarray:
    """Indices of the truth rows used by the star χ² figures.

    Stars (kind 'star': unchanged by construction) with science flux ≥ 5000 counts, not flagged
    ``saturated``, whose box of half-width ``⌈1.5 fwhm⌉ + 2`` lies inside the difference and holds no BAD, SAT,
    CR, EDGE or NO_DATA pixel nor a non-finite value, and with no true change within ``⌈1.5 fwhm⌉ + 1.5 fwhm``
    (a transient or cosmic ray in the box would make the star look badly subtracted).
    """
    fwhm = float(fwhm)
    h = int(math.ceil(1.5 * fwhm))
    kind = _col(truth, "kind").astype(str)
    x, y = _col(truth, "x").astype(float), _col(truth, "y").astype(float)
    cand = (kind == "star") & (_col(truth, "flux_science").astype(float) >= BRIGHT_STAR_FLUX)
    cand &= ~_as_bool(_col(truth, "saturated", False))
    idx = np.nonzero(cand)[0]
    if idx.size == 0:
        return idx
    bad = _defect_near(difference.mask, difference.shape, difference.xy0, x[idx], y[idx], half=h + 2)
    ch = np.isin(kind, CHANGE_KINDS)
    if ch.any():
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([x[ch], y[ch]]))
        d, _ = tree.query(np.column_stack([x[idx], y[idx]]))
        bad |= d < h + 1.5 * fwhm
    idx = idx[~bad]
    # Non-finite σ or image in the box also disqualifies.
    z = _normalised(difference)
    keep = []
    for i in idx:
        ix, iy = int(math.floor(x[i] + 0.5)) - difference.xy0[0], int(math.floor(y[i] + 0.5)) - difference.xy0[1]
        if np.all(np.isfinite(z[iy - h : iy + h + 1, ix - h : ix + h + 1])):
            keep.append(i)
    return np.asarray(keep, dtype=int)


def star_box_statistics(difference: Exposure, truth, fwhm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, chi2, maxabs)``: per selected bright star, mean (difference/σ)² and max |difference/σ| in its box."""
    rows = bright_star_rows(difference, truth, fwhm)
    h = int(math.ceil(1.5 * float(fwhm)))
    z = _normalised(difference)
    x, y = _col(truth, "x").astype(float), _col(truth, "y").astype(float)
    chi2 = np.empty(rows.size)
    mx = np.empty(rows.size)
    for k, i in enumerate(rows):
        ix, iy = int(math.floor(x[i] + 0.5)) - difference.xy0[0], int(math.floor(y[i] + 0.5)) - difference.xy0[1]
        box = z[iy - h : iy + h + 1, ix - h : ix + h + 1]
        chi2[k] = float(np.mean(box * box))
        mx[k] = float(np.max(np.abs(box)))
    return rows, chi2, mx


def star_chi2_p95(difference: Exposure, truth, fwhm: float) -> float:
    """95th percentile over bright unchanged stars of mean (difference/σ)² in the ⌈1.5 fwhm⌉ box (≈ 1.2 ideal)."""
    _, chi2, _ = star_box_statistics(difference, truth, fwhm)
    return float(np.percentile(chi2, 95)) if chi2.size else float("nan")


def star_max_p95(difference: Exposure, truth, fwhm: float) -> float:
    """95th percentile of max |difference/σ| in the same boxes (informative; ≈ 3.8 for noise alone)."""
    _, _, mx = star_box_statistics(difference, truth, fwhm)
    return float(np.percentile(mx, 95)) if mx.size else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Transients: isolation, matching, completeness, photometry
# ----------------------------------------------------------------------------------------------------------
def isolated_transients(truth, fwhm: float, mask: Exposure | Mask | None = None) -> np.ndarray:
    """Boolean array over truth rows: isolated transients (metrics.md).

    A transient is isolated when no other change (transient, variable, mover, dipole, cosmic ray) and no star
    brighter than its |delta_flux| lies within 3 fwhm, and — if ``mask`` (the difference or its Mask) is given —
    no BAD, SAT, CR, EDGE or NO_DATA pixel lies within 2 px (the 5 × 5 box must also be on the image).
    """
    from scipy.spatial import cKDTree

    fwhm = float(fwhm)
    kind = _col(truth, "kind").astype(str)
    x, y = _col(truth, "x").astype(float), _col(truth, "y").astype(float)
    tr = np.nonzero(kind == "transient")[0]
    out = np.zeros(len(kind), bool)
    if tr.size == 0:
        return out
    pts = np.column_stack([x, y])
    tree = cKDTree(pts)
    change = np.isin(kind, CHANGE_KINDS)
    star = np.isin(kind, _STAR_KINDS)
    star_flux = np.maximum(_col(truth, "flux_science").astype(float), _template_flux_sci(truth))
    brightness = np.abs(_col(truth, "delta_flux").astype(float))
    r = 3.0 * fwhm
    for i, nbrs in zip(tr, tree.query_ball_point(pts[tr], r)):
        ok = True
        for j in nbrs:
            if j == i:
                continue
            if math.hypot(x[j] - x[i], y[j] - y[i]) >= r:
                continue
            if change[j] or (star[j] and star_flux[j] > brightness[i]):
                ok = False
                break
        out[i] = ok
    if mask is not None:
        _, m, shape, xy0 = _mask_of(mask)
        out[tr] &= ~_defect_near(m, shape, xy0, x[tr], y[tr], half=2)
    return out


def match_sources(catalog_xy, truth, fwhm: float, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one nearest matching of catalogue sources to truth rows within ``max(2 px, 0.75 fwhm)``.

    Parameters
    ----------
    catalog_xy
        ``(N, 2)`` positions, or a table/dict with ``x, y`` columns.
    truth
        The truth table.
    fwhm
        Science PSF FWHM (pixels).
    rows
        Truth row indices (or a boolean array) to match; default all rows.

    Returns
    -------
    match, distance
        For every truth row, the index of its catalogue source (-1 if none) and the distance (NaN if none).
        Pairs are assigned greedily by increasing distance, so a source matches at most one truth row.
    """
    from scipy.spatial import cKDTree

    cat = _catalog_columns(catalog_xy)
    n = len(truth)
    match = -np.ones(n, int)
    dist = np.full(n, np.nan)
    if rows is None:
        rows = np.arange(n)
    rows = np.asarray(rows)
    if rows.dtype == bool:
        rows = np.nonzero(rows)[0]
    if rows.size == 0 or cat["x"].size == 0:
        return match, dist
    tx, ty = _col(truth, "x").astype(float)[rows], _col(truth, "y").astype(float)[rows]
    r = match_radius(fwhm)
    ctree = cKDTree(np.column_stack([cat["x"], cat["y"]]))
    ttree = cKDTree(np.column_stack([tx, ty]))
    pairs = ttree.sparse_distance_matrix(ctree, r, output_type="ndarray")
    if pairs.size == 0:
        return match, dist
    order = np.argsort(pairs["v"], kind="stable")
    used_t = np.zeros(rows.size, bool)
    used_c = np.zeros(cat["x"].size, bool)
    for k in order:
        i, j, d = pairs["i"][k], pairs["j"][k], pairs["v"][k]
        if used_t[i] or used_c[j]:
            continue
        used_t[i] = used_c[j] = True
        match[rows[i]] = j
        dist[rows[i]] = d
    return match, dist


def _has_source_within(catalog, truth, fwhm, rows) -> np.ndarray:
    from scipy.spatial import cKDTree

    cat = _catalog_columns(catalog)
    if rows.size == 0:
        return np.zeros(0, bool)
    if cat["x"].size == 0:
        return np.zeros(rows.size, bool)
    tree = cKDTree(np.column_stack([cat["x"], cat["y"]]))
    d, _ = tree.query(np.column_stack([_col(truth, "x")[rows], _col(truth, "y")[rows]]))
    return d <= match_radius(fwhm)


def completeness(catalog, truth, fwhm: float, mask: Exposure | Mask | None = None) -> dict[str, float]:
    """Detection completeness of transients (metrics.md).

    Returns a dict with ``completeness_snr7`` (isolated field transients, S/N ≥ 7), ``completeness_snr5_7``
    (isolated field transients, 5 ≤ S/N < 7), ``completeness_galaxy`` (isolated transients on galaxies,
    S/N ≥ 7), ``completeness_all`` (all transients) and the sample sizes ``n_snr7``, ``n_snr5_7``,
    ``n_galaxy``, ``n_all``. A transient counts as found when any source lies within ``max(2 px, 0.75 fwhm)``.
    Empty samples give NaN.
    """
    kind = _col(truth, "kind").astype(str)
    snr = _col(truth, "snr").astype(float)
    host = _col(truth, "host", -1).astype(int)
    iso = isolated_transients(truth, fwhm, mask)
    samples = {
        "snr7": iso & (host < 0) & (snr >= 7),
        "snr5_7": iso & (host < 0) & (snr >= 5) & (snr < 7),
        "galaxy": iso & (host >= 0) & (snr >= 7),
        "all": kind == "transient",
    }
    out: dict[str, float] = {}
    for name, sel in samples.items():
        rows = np.nonzero(sel)[0]
        found = _has_source_within(catalog, truth, fwhm, rows)
        out[f"completeness_{name}"] = float(found.mean()) if rows.size else float("nan")
        out[f"n_{name}"] = int(rows.size)
    return out


def false_detection_flags(catalog, truth, fwhm: float, difference: Exposure | Mask) -> tuple[np.ndarray, np.ndarray]:
    """``(counted, false)`` per usable catalogue row (sky sources and non-finite positions dropped).

    ``counted``: the source is ≥ 6 fwhm from the image edge and has no BAD/SAT/CR/EDGE/NO_DATA pixel in its
    5 × 5 box. ``false``: counted and farther than 6 px from every true change (cosmic rays: 6 px plus the
    ray's half-length from its centre; movers have rows at both epochs' positions).
    """
    from scipy.spatial import cKDTree

    _, m, shape, xy0 = _mask_of(difference)
    cat = _catalog_columns(catalog)
    cx, cy = cat["x"], cat["y"]
    if cx.size == 0:
        return np.zeros(0, bool), np.zeros(0, bool)
    e = 6.0 * float(fwhm)
    ny, nx = shape
    interior = (cx - xy0[0] >= e) & (cx - xy0[0] <= nx - 1 - e) & (cy - xy0[1] >= e) & (cy - xy0[1] <= ny - 1 - e)
    counted = interior & ~_defect_near(m, shape, xy0, cx, cy, half=2)
    kind = _col(truth, "kind").astype(str)
    ch = np.nonzero(np.isin(kind, CHANGE_KINDS))[0]
    near = np.zeros(cx.size, bool)
    if ch.size:
        x, y = _col(truth, "x").astype(float)[ch], _col(truth, "y").astype(float)[ch]
        extra = np.where(kind[ch] == "cosmic_ray", _col(truth, "radius", 0.0).astype(float)[ch], 0.0)
        # One position per change suffices: a dipole's two lobes lie within its ≤ 2 px shift of the science
        # position, and movers have a row at each epoch's position.
        P = np.column_stack([x, y])
        R = 6.0 + extra
        tree = cKDTree(P)
        for k, nb in enumerate(tree.query_ball_point(np.column_stack([cx, cy]), float(R.max()))):
            for j in nb:
                if math.hypot(P[j, 0] - cx[k], P[j, 1] - cy[k]) <= R[j]:
                    near[k] = True
                    break
    return counted, counted & ~near


def false_detections_per_mpix(catalog, truth, fwhm: float, difference: Exposure | Mask) -> float:
    """False DIA detections per 10⁶ pixels of the interior (≥ 6 fwhm from the edge); see :func:`false_detection_flags`."""
    _, _, shape, _ = _mask_of(difference)
    _, false = false_detection_flags(catalog, truth, fwhm, difference)
    e = 6.0 * float(fwhm)
    ny, nx = shape
    area = max(0.0, nx - 2 * e) * max(0.0, ny - 2 * e)
    if area <= 0:
        return float("nan")
    return float(false.sum() / area * 1e6)


def counted_area(difference: Exposure | Mask, fwhm: float) -> int:
    """Pixels where a false detection would be counted (:func:`false_detection_flags`): ≥ 6 fwhm from the edge
    and no BAD/SAT/CR/EDGE/NO_DATA pixel in the 5 × 5 box. The denominator for comparing a count with
    :func:`noise_detection_rate`."""
    _, m, shape, _ = _mask_of(difference)
    ny, nx = shape
    e = int(math.ceil(6.0 * float(fwhm)))
    ok = np.zeros(shape, bool)
    ok[e:ny - e, e:nx - e] = True
    if m is not None:
        ok &= ~_defect_box_map(m, half=2)
    return int(ok.sum())


def noise_detection_rate(psf_sigma: float, threshold: float = 5.0, *, polarity: str = "both",
                         n_mpix: float = 16.0, seed: int = 0) -> tuple[float, float]:
    """Detections per 10⁶ pixels that pure noise gives: the false-detection floor of a correct pipeline.

    White Gaussian noise is filtered with a circular Gaussian of ``psf_sigma`` pixels (what detection's PSF
    smoothing does to a difference with white noise, and what a score image is), normalised to unit variance
    and thresholded at ``threshold``; each 8-connected region above it (below −threshold for the negative
    polarity) counts once, as a footprint does.

    Parameters
    ----------
    psf_sigma
        Gaussian σ of the PSF in pixels (> 0).
    threshold
        Detection threshold in σ of the filtered image.
    polarity
        ``"both"``, ``"positive"`` or ``"negative"``.
    n_mpix
        Megapixels simulated (in 1024² tiles); the relative error of the rate is about 1/√(rate · n_mpix).
    seed
        Random seed; the result is reproducible.

    Returns
    -------
    rate, error : float
        Expected detections per 10⁶ pixels and its Monte Carlo (Poisson) standard error.

    Notes
    -----
    Why a simulation and not the Euler-characteristic density of a Gaussian random field,
    λ t e^{−t²/2} / (2π)^{3/2} per pixel and polarity with λ = 1 / (2σ²): that formula counts the peaks of the
    continuous field, and a PSF of a pixel or two is sampled too coarsely for the pixels to reach them. At
    σ = 1.26 px and 4σ it predicts 54 per Mpix where the sampled field has 37; at σ = 4 px the two agree
    within a few per cent. For σ ≈ 1.3 px, 5σ gives ≈ 0.42 per Mpix: a perfect subtraction of a 0.6-Mpix image has one noise
    detection about one time in four.
    """
    from scipy import ndimage

    if not (np.isfinite(psf_sigma) and psf_sigma > 0):
        raise ValueError(f"psf_sigma must be a positive number of pixels, not {psf_sigma!r}.")
    if polarity not in ("both", "positive", "negative"):
        raise ValueError(f"polarity must be 'both', 'positive' or 'negative', not {polarity!r}.")
    rng = np.random.default_rng(seed)
    side, pad = 1024, int(math.ceil(5 * psf_sigma)) + 1
    n_tiles = max(1, int(math.ceil(n_mpix * 1e6 / side**2)))
    # The filtered field's variance: Σ g² of the kernel as ndimage applies it.
    probe = np.zeros((2 * pad + 1, 2 * pad + 1))
    probe[pad, pad] = 1.0
    norm = math.sqrt(float(np.sum(ndimage.gaussian_filter(probe, psf_sigma, truncate=5.0) ** 2)))
    eight = np.ones((3, 3), bool)
    count = 0
    for _ in range(n_tiles):
        noise = rng.standard_normal((side + 2 * pad, side + 2 * pad), dtype=np.float32)
        field = ndimage.gaussian_filter(noise, psf_sigma, truncate=5.0)[pad:-pad, pad:-pad] / np.float32(norm)
        if polarity != "negative":
            count += ndimage.label(field > threshold, structure=eight)[1]
        if polarity != "positive":
            count += ndimage.label(field < -threshold, structure=eight)[1]
    mpix = n_tiles * side**2 / 1e6
    return count / mpix, math.sqrt(max(count, 1)) / mpix


def _matched_transients(catalog, truth, fwhm, mask, snr_min, flux_unit_scale):
    cat = _catalog_columns(catalog, flux_unit_scale)
    if "psfFlux" not in cat or "psfFluxErr" not in cat:
        raise KeyError("The catalogue needs psfFlux and psfFluxErr columns for the flux figures.")
    iso = isolated_transients(truth, fwhm, mask)
    sel = iso & (_col(truth, "snr").astype(float) >= snr_min)
    match, _ = match_sources(np.column_stack([cat["x"], cat["y"]]), truth, fwhm, rows=sel)
    rows = np.nonzero(match >= 0)[0]
    j = match[rows]
    true = _col(truth, "delta_flux").astype(float)[rows]
    return cat["psfFlux"][j], cat["psfFluxErr"][j], true


def flux_bias(catalog, truth, fwhm: float, mask: Exposure | Mask | None = None, flux_unit_scale: Any = 1.0) -> float:
    """median(psfFlux / true flux − 1) over matched isolated transients with S/N ≥ 15 (0 ideal)."""
    f, _, t = _matched_transients(catalog, truth, fwhm, mask, 15.0, flux_unit_scale)
    ok = np.isfinite(f) & (t != 0)
    return float(np.median(f[ok] / t[ok] - 1.0)) if ok.any() else float("nan")


def pull_std(catalog, truth, fwhm: float, mask: Exposure | Mask | None = None, flux_unit_scale: Any = 1.0) -> float:
    """Robust std of (psfFlux − true flux) / psfFluxErr over matched isolated transients with S/N ≥ 7 (1 ideal)."""
    f, e, t = _matched_transients(catalog, truth, fwhm, mask, 7.0, flux_unit_scale)
    ok = np.isfinite(f) & np.isfinite(e) & (e > 0)
    return robust_std((f[ok] - t[ok]) / e[ok]) if ok.any() else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------------------
def evaluate(difference: Exposure, catalog, truth, fwhm: float | None = None, flux_unit_scale: Any = 1.0) -> dict:
    """All figures of metrics.md for one difference image and its DIA-source catalogue.

    Parameters
    ----------
    difference
        The difference exposure (science grid, science counts).
    catalog
        astropy Table or dict with ``x, y`` and, for the flux figures, ``psfFlux, psfFluxErr``; rows with
        ``sky_source`` True are ignored. ``None`` means no detections.
    truth
        Truth table of the simulated pair.
    fwhm
        Science PSF FWHM in pixels; default: ``truth.meta['SCIFWHM']`` (the science FWHM at the centre), else the median ``fwhm`` column.
    flux_unit_scale
        Factor turning catalogue fluxes into science counts, or the science PhotoCalib (for nJy catalogues).

    Returns
    -------
    dict
        ``noise_ratio, star_chi2_p95, star_max_p95, n_stars_chi2``, the :func:`completeness` entries,
        ``false_detections_per_mpix`` (alias ``false_per_mpix``), ``n_false``, ``flux_bias, pull_std,
        n_flux_bias, n_pull``.
    """
    if fwhm is None:
        meta = getattr(truth, "meta", {}) or {}
        fwhm = float(meta["SCIFWHM"]) if "SCIFWHM" in meta else float(np.median(_col(truth, "fwhm")))
    fwhm = float(fwhm)
    out: dict[str, Any] = {"fwhm": fwhm}
    out["noise_ratio"] = noise_ratio(difference, truth, fwhm)
    rows, chi2, mx = star_box_statistics(difference, truth, fwhm)
    out["star_chi2_p95"] = float(np.percentile(chi2, 95)) if chi2.size else float("nan")
    out["star_max_p95"] = float(np.percentile(mx, 95)) if mx.size else float("nan")
    out["n_stars_chi2"] = int(rows.size)
    out.update(completeness(catalog, truth, fwhm, difference))
    _, false = false_detection_flags(catalog, truth, fwhm, difference)
    out["false_detections_per_mpix"] = false_detections_per_mpix(catalog, truth, fwhm, difference)
    out["false_per_mpix"] = out["false_detections_per_mpix"]  # short alias
    out["n_false"] = int(false.sum())
    cat = _catalog_columns(catalog)
    if "psfFlux" in cat and "psfFluxErr" in cat:
        f15 = _matched_transients(catalog, truth, fwhm, difference, 15.0, flux_unit_scale)
        f7 = _matched_transients(catalog, truth, fwhm, difference, 7.0, flux_unit_scale)
        out["flux_bias"] = flux_bias(catalog, truth, fwhm, difference, flux_unit_scale)
        out["pull_std"] = pull_std(catalog, truth, fwhm, difference, flux_unit_scale)
        out["n_flux_bias"] = int(f15[0].size)
        out["n_pull"] = int(f7[0].size)
    else:
        out.update(flux_bias=float("nan"), pull_std=float("nan"), n_flux_bias=0, n_pull=0)
    return out
