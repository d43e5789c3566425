"""The DiaSource catalogue: APDB column names and units (lsst-sdm-schemas ``apdb.yaml`` DiaSource), built from
per-source measurement arrays, and written as Parquet + FITS.

Inputs are in instrumental units (counts, pixels, pixels²) under APDB names or the LSST-internal names of
:data:`LSST_ALIASES`; :func:`build_dia_source_table` converts fluxes to nJy with the PhotoCalib (instrumental
if there is none), moments to arcsec² and lengths to arcsec with the WCS pixel scale, and fills the columns we
do not measure with NaN / False / 0. The mapping to LSST-internal names is documented in ``docs/catalog.md``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from .errors import DiffimIOError, DiffimValueError
from .measure.flags import pixel_flag_names
from .model.calib import PhotoCalib
from .model.exposure import Exposure

__all__ = [
    "APDB_DIASOURCE_COLUMNS",
    "EXTRA_COLUMNS",
    "FLUX_COLUMNS",
    "LSST_ALIASES",
    "build_dia_source_table",
    "write_catalog",
    "read_catalog",
]

#: (name, APDB type, unit) of every DiaSource column of the APDB schema, in schema order.
APDB_DIASOURCE_COLUMNS: list[tuple[str, str, str]] = [
    ("diaSourceId", "long", ""), ("visit", "long", ""), ("detector", "short", ""),
    ("diaObjectId", "long", ""), ("ssObjectId", "long", ""), ("parentDiaSourceId", "long", ""),
    ("ssObjectReassocTimeMjdTai", "double", ""), ("midpointMjdTai", "double", "d"),
    ("exposureTime", "float", "s"), ("ra", "double", "deg"), ("raErr", "float", "deg"),
    ("dec", "double", "deg"), ("decErr", "float", "deg"), ("ra_dec_Cov", "float", "deg**2"),
    ("x", "float", "pixel"), ("xErr", "float", "pixel"), ("y", "float", "pixel"), ("yErr", "float", "pixel"),
    ("centroid_flag", "boolean", ""), ("apFlux", "float", "nJy"), ("apFluxErr", "float", "nJy"),
    ("apFlux_flag", "boolean", ""), ("apFlux_flag_apertureTruncated", "boolean", ""),
    ("isNegative", "boolean", ""), ("snr", "float", ""), ("psfFlux", "float", "nJy"),
    ("psfFluxErr", "float", "nJy"), ("psfLnL", "float", ""), ("psfChi2", "float", ""), ("psfNdata", "int", ""),
    ("psfFlux_flag", "boolean", ""), ("psfFlux_flag_edge", "boolean", ""),
    ("psfFlux_flag_noGoodPixels", "boolean", ""), ("trailFlux", "float", "nJy"),
    ("trailFluxErr", "float", "nJy"), ("trailRa", "double", "deg"), ("trailRaErr", "float", "deg"),
    ("trailDec", "double", "deg"), ("trailDecErr", "float", "deg"), ("trailLength", "float", "arcsec"),
    ("trailLengthErr", "float", "arcsec"), ("trailAngle", "float", "deg"), ("trailAngleErr", "float", "deg"),
    ("trailChi2", "float", ""), ("trailNdata", "int", ""), ("trailAlgorithm", "int", ""),
    ("trail_flag_edge", "boolean", ""), ("trail_flag", "boolean", ""), ("dipoleMeanFlux", "float", "nJy"),
    ("dipoleMeanFluxErr", "float", "nJy"), ("dipoleFluxDiff", "float", "nJy"),
    ("dipoleFluxDiffErr", "float", "nJy"), ("dipoleLength", "float", "arcsec"), ("dipoleAngle", "float", "deg"),
    ("dipoleChi2", "float", ""), ("dipoleNdata", "int", ""), ("scienceFlux", "float", "nJy"),
    ("scienceFluxErr", "float", "nJy"), ("forced_PsfFlux_flag", "boolean", ""),
    ("forced_PsfFlux_flag_edge", "boolean", ""), ("forced_PsfFlux_flag_noGoodPixels", "boolean", ""),
    ("templateFlux", "float", "nJy"), ("templateFluxErr", "float", "nJy"), ("ixx", "float", "arcsec**2"),
    ("iyy", "float", "arcsec**2"), ("ixy", "float", "arcsec**2"), ("ixxPSF", "float", "arcsec**2"),
    ("iyyPSF", "float", "arcsec**2"), ("ixyPSF", "float", "arcsec**2"), ("shape_flag", "boolean", ""),
    ("shape_flag_no_pixels", "boolean", ""), ("shape_flag_not_contained", "boolean", ""),
    ("shape_flag_parent_source", "boolean", ""), ("extendedness", "float", ""), ("reliability", "float", ""),
    ("reliabilityVersion", "string", ""), ("band", "char", ""), ("isDipole", "boolean", ""),
    ("dipoleFitAttempted", "boolean", ""), ("timeProcessedMjdTai", "double", ""),
    ("timeWithdrawnMjdTai", "double", ""), ("bboxSize", "int", "pixel"), ("pixelFlags", "boolean", ""),
    ("pixelFlags_bad", "boolean", ""), ("pixelFlags_cr", "boolean", ""), ("pixelFlags_crCenter", "boolean", ""),
    ("pixelFlags_edge", "boolean", ""), ("pixelFlags_nodata", "boolean", ""),
    ("pixelFlags_nodataCenter", "boolean", ""), ("pixelFlags_interpolated", "boolean", ""),
    ("pixelFlags_interpolatedCenter", "boolean", ""), ("pixelFlags_offimage", "boolean", ""),
    ("pixelFlags_saturated", "boolean", ""), ("pixelFlags_saturatedCenter", "boolean", ""),
    ("pixelFlags_suspect", "boolean", ""), ("pixelFlags_suspectCenter", "boolean", ""),
    ("pixelFlags_streak", "boolean", ""), ("pixelFlags_streakCenter", "boolean", ""),
    ("pixelFlags_injected", "boolean", ""), ("pixelFlags_injectedCenter", "boolean", ""),
    ("pixelFlags_injected_template", "boolean", ""), ("pixelFlags_injected_templateCenter", "boolean", ""),
    ("glint_trail", "boolean", ""),
]

_APDB_NAMES = {c[0] for c in APDB_DIASOURCE_COLUMNS}

#: Columns we measure that the APDB schema lacks (appended after the schema columns).
EXTRA_COLUMNS: list[tuple[str, str, str]] = [
    ("ixxErr", "float", "arcsec**2"), ("iyyErr", "float", "arcsec**2"), ("ixyErr", "float", "arcsec**2"),
    ("psfArea", "float", "pixel"), ("centroid_flag_resetToPeak", "boolean", ""),
    ("psfFlux_apCorr", "float", ""), ("psfFlux_flag_apCorr", "boolean", ""),
    ("forced_template_PsfFlux_flag", "boolean", ""), ("forced_template_PsfFlux_flag_edge", "boolean", ""),
    ("forced_template_PsfFlux_flag_noGoodPixels", "boolean", ""), ("sky_source", "boolean", ""),
] + [
    (f"pixelFlags_{n}", "boolean", "")
    for n in pixel_flag_names()
    if f"pixelFlags_{n}" not in _APDB_NAMES
]

#: Flux columns converted to nJy, and which calibration converts them.
FLUX_COLUMNS: dict[str, str] = {
    "apFlux": "difference", "apFluxErr": "difference", "psfFlux": "difference", "psfFluxErr": "difference",
    "trailFlux": "difference", "trailFluxErr": "difference", "dipoleMeanFlux": "difference",
    "dipoleMeanFluxErr": "difference", "dipoleFluxDiff": "difference", "dipoleFluxDiffErr": "difference",
    "scienceFlux": "science", "scienceFluxErr": "science", "templateFlux": "template",
    "templateFluxErr": "template",
}
_MOMENT_COLUMNS = ("ixx", "iyy", "ixy", "ixxPSF", "iyyPSF", "ixyPSF", "ixxErr", "iyyErr", "ixyErr")

#: LSST-internal (afw table) name → APDB/diffim name accepted as input (see docs/catalog.md).
LSST_ALIASES: dict[str, str] = {
    "id": "diaSourceId",
    "base_SdssCentroid_x": "x", "base_SdssCentroid_y": "y",
    "base_SdssCentroid_xErr": "xErr", "base_SdssCentroid_yErr": "yErr",
    "base_SdssCentroid_flag": "centroid_flag", "slot_Centroid_x": "x", "slot_Centroid_y": "y",
    "slot_Centroid_xErr": "xErr", "slot_Centroid_yErr": "yErr", "slot_Centroid_flag": "centroid_flag",
    "base_SdssCentroid_flag_resetToPeak": "centroid_flag_resetToPeak",
    "base_CircularApertureFlux_12_0_instFlux": "apFlux", "base_CircularApertureFlux_12_0_instFluxErr": "apFluxErr",
    "base_CircularApertureFlux_12_0_flag": "apFlux_flag",
    "base_CircularApertureFlux_12_0_flag_apertureTruncated": "apFlux_flag_apertureTruncated",
    "is_negative": "isNegative",
    "base_PsfFlux_instFlux": "psfFlux", "base_PsfFlux_instFluxErr": "psfFluxErr", "base_PsfFlux_chi2": "psfChi2",
    "base_PsfFlux_npixels": "psfNdata", "base_PsfFlux_area": "psfArea", "base_PsfFlux_flag": "psfFlux_flag",
    "base_PsfFlux_flag_edge": "psfFlux_flag_edge", "base_PsfFlux_flag_noGoodPixels": "psfFlux_flag_noGoodPixels",
    "base_PsfFlux_apCorr": "psfFlux_apCorr", "base_PsfFlux_flag_apCorr": "psfFlux_flag_apCorr",
    "ip_diffim_forced_PsfFlux_instFlux": "scienceFlux", "ip_diffim_forced_PsfFlux_instFluxErr": "scienceFluxErr",
    "ip_diffim_forced_PsfFlux_flag": "forced_PsfFlux_flag",
    "ip_diffim_forced_PsfFlux_flag_edge": "forced_PsfFlux_flag_edge",
    "ip_diffim_forced_PsfFlux_flag_noGoodPixels": "forced_PsfFlux_flag_noGoodPixels",
    "ip_diffim_forced_template_PsfFlux_instFlux": "templateFlux",
    "ip_diffim_forced_template_PsfFlux_instFluxErr": "templateFluxErr",
    "ip_diffim_forced_template_PsfFlux_flag": "forced_template_PsfFlux_flag",
    "ip_diffim_forced_template_PsfFlux_flag_edge": "forced_template_PsfFlux_flag_edge",
    "ip_diffim_forced_template_PsfFlux_flag_noGoodPixels": "forced_template_PsfFlux_flag_noGoodPixels",
    "ip_diffim_DipoleFit_separation": "dipoleLength", "ip_diffim_DipoleFit_orientation": "dipoleAngle",
    "ip_diffim_DipoleFit_chi2dof": "dipoleChi2", "ip_diffim_DipoleFit_nData": "dipoleNdata",
    "ip_diffim_DipoleFit_classification": "isDipole",
    "ip_diffim_DipoleFit_classificationAttempted": "dipoleFitAttempted",
    "base_SdssShape_xx": "ixx", "base_SdssShape_yy": "iyy", "base_SdssShape_xy": "ixy",
    "base_SdssShape_xxErr": "ixxErr", "base_SdssShape_yyErr": "iyyErr", "base_SdssShape_xyErr": "ixyErr",
    "base_SdssShape_psf_xx": "ixxPSF", "base_SdssShape_psf_yy": "iyyPSF", "base_SdssShape_psf_xy": "ixyPSF",
    "base_SdssShape_flag": "shape_flag",
    "base_PixelFlags_flag": "pixelFlags",
    **{f"base_PixelFlags_flag_{n}": f"pixelFlags_{n}" for n in pixel_flag_names()},
}

_IDENTITY = PhotoCalib(1.0)

_NUMPY_TYPES = {"long": np.int64, "short": np.int16, "int": np.int32, "float": np.float32, "double": np.float64,
                "boolean": np.bool_}


def _default(apdb_type: str, n: int) -> np.ndarray:
    if apdb_type in ("string", "char"):
        return np.full(n, "", dtype="U16" if apdb_type == "string" else "U8")
    dt = _NUMPY_TYPES[apdb_type]
    if dt is np.bool_:
        return np.zeros(n, bool)
    if np.issubdtype(dt, np.integer):
        return np.zeros(n, dt)  # APDB NULL for ids/counts: 0 (integers have no NaN)
    return np.full(n, np.nan, dt)


def _as_columns(columns: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Plain arrays, and the units of the inputs that carry one (a Table column or an astropy Quantity)."""
    units: dict[str, str] = {}
    if isinstance(columns, Table):
        for name in columns.colnames:
            if columns[name].unit is not None:
                units[name] = str(columns[name].unit)
        return {name: np.asarray(columns[name]) for name in columns.colnames}, units
    out = {}
    for k, v in dict(columns).items():
        if getattr(v, "unit", None) is not None:
            units[k] = str(v.unit)
            v = getattr(v, "value", v)
        out[k] = np.asarray(v)
    return out, units


def _pixel_scale_arcsec(wcs, x: float, y: float) -> float | None:
    """Pixel scale (arcsec) of an astropy WCS at ``(x, y)``: √|det J| of the pixel→sky Jacobian."""
    if wcs is None:
        return None
    xs = np.array([x, x + 1.0, x])
    ys = np.array([y, y, y + 1.0])
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    cosd = np.cos(np.deg2rad(dec[0]))
    dra = ((ra[1:] - ra[0] + 180.0) % 360.0 - 180.0) * cosd
    ddec = dec[1:] - dec[0]
    det = abs(dra[0] * ddec[1] - dra[1] * ddec[0])
    return float(np.sqrt(det) * 3600.0) if det > 0 else None


def build_dia_source_table(
    columns: Mapping[str, Any] | Table,
    *,
    exposure: Exposure | None = None,
    photo_calib: PhotoCalib | None = None,
    science_photo_calib: PhotoCalib | None = None,
    template_photo_calib: PhotoCalib | None = None,
    wcs: Any = None,
    visit: int | None = None,
    detector: int | None = None,
    band: str | None = None,
    id_base: int | None = None,
    include_extra: bool = True,
) -> Table:
    """Build the DiaSource table (APDB names, schema order, schema units) from measurement arrays.

    Parameters
    ----------
    columns
        Mapping (or Table) of column name → array of length ``n``, in instrumental units: fluxes in counts of
        the image they were measured on, ``x``/``y``/``xErr``/``yErr``/``dipoleLength`` in pixels, moments in
        pixels², ``dipoleAngle`` in degrees. APDB names or the LSST names of :data:`LSST_ALIASES`.
    exposure
        The difference exposure: default PhotoCalib, WCS, visit, detector, band, time and exposure id.
    photo_calib, science_photo_calib, template_photo_calib
        Calibrations (nJy per count) of the difference, science and template; the science and template
        ones default to the difference's. Without any, fluxes stay instrumental (``meta['FLUXUNIT']='count'``).
    wcs
        astropy WCS of the difference (0-based parent pixels): ``ra``/``dec`` (unless given), their errors
        and the pixel scale that converts moments to arcsec² and lengths to arcsec. Without a WCS they stay
        in pixel units (``meta['MOMUNIT']='pixel**2'``) and ``ra``/``dec`` are NaN.
    visit, detector, band
        Identifiers (default from ``exposure.visit_info`` / ``exposure.band``).
    id_base
        ``diaSourceId = id_base + 1 + row`` unless ``diaSourceId`` is given (default ``exposure.id << 20``
        or 0).
    include_extra
        Append :data:`EXTRA_COLUMNS` (errors of moments, all pixel flags, ap-corr columns...).

    Returns
    -------
    astropy.table.Table
        One row per source; ``meta`` records the units actually used.
    """
    cols, in_units = _as_columns(columns)
    for lsst_name, name in LSST_ALIASES.items():
        if lsst_name in cols and name not in cols:
            cols[name] = cols[lsst_name]
    # Dipole lobe fluxes → APDB mean/difference (negative-lobe flux is negative, as LSST stores it).
    pos, neg = cols.get("ip_diffim_DipoleFit_pos_instFlux"), cols.get("ip_diffim_DipoleFit_neg_instFlux")
    if pos is not None and neg is not None and "dipoleMeanFlux" not in cols:
        pe = cols.get("ip_diffim_DipoleFit_pos_instFluxErr", np.full(len(pos), np.nan))
        ne = cols.get("ip_diffim_DipoleFit_neg_instFluxErr", np.full(len(pos), np.nan))
        cols["dipoleMeanFlux"] = 0.5 * (np.abs(pos) + np.abs(neg))
        cols["dipoleMeanFluxErr"] = 0.5 * np.hypot(pe, ne)
        cols["dipoleFluxDiff"] = np.abs(pos) - np.abs(neg)
        cols["dipoleFluxDiffErr"] = np.hypot(pe, ne)
    lengths = {len(v) for v in cols.values() if np.ndim(v) == 1}
    if len(lengths) > 1:
        raise DiffimValueError(f"DiaSource columns have different lengths {sorted(lengths)}; pass one value per source.")
    n = lengths.pop() if lengths else 0

    if exposure is not None:
        photo_calib = photo_calib if photo_calib is not None else exposure.photo_calib
        wcs = wcs if wcs is not None else exposure.wcs
        vi = exposure.visit_info
        visit = visit if visit is not None else (vi.visit if vi.visit is not None else exposure.id)
        detector = detector if detector is not None else vi.detector
        band = band if band is not None else exposure.band
        if id_base is None and exposure.id is not None:
            id_base = int(exposure.id) << 20
    calibs = {
        "difference": photo_calib,
        "science": science_photo_calib if science_photo_calib is not None else photo_calib,
        "template": template_photo_calib if template_photo_calib is not None else photo_calib,
    }

    spec = list(APDB_DIASOURCE_COLUMNS) + (list(EXTRA_COLUMNS) if include_extra else [])
    out = Table()
    x = cols.get("x")
    y = cols.get("y")
    scale = None
    if wcs is not None and n > 0 and x is not None:
        fx, fy = np.asarray(x, float), np.asarray(y, float)
        ok = np.isfinite(fx) & np.isfinite(fy)
        cx, cy = (float(np.median(fx[ok])), float(np.median(fy[ok]))) if ok.any() else (0.0, 0.0)
        scale = _pixel_scale_arcsec(wcs, cx, cy)
    derived: dict[str, np.ndarray] = {}
    if wcs is not None and x is not None and "ra" not in cols:
        ra, dec = wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        derived["ra"], derived["dec"] = np.asarray(ra, float), np.asarray(dec, float)
        if scale is not None:
            if "xErr" in cols:
                derived["raErr"] = np.asarray(cols["xErr"], float) * scale / 3600.0
            if "yErr" in cols:
                derived["decErr"] = np.asarray(cols["yErr"], float) * scale / 3600.0
    if exposure is not None:
        vi = exposure.visit_info
        if vi.mjd is not None:
            derived["midpointMjdTai"] = np.full(n, float(vi.mjd))
        if vi.exposure_time is not None:
            derived["exposureTime"] = np.full(n, float(vi.exposure_time))
    if visit is not None:
        derived["visit"] = np.full(n, int(visit), np.int64)
    if detector is not None:
        derived["detector"] = np.full(n, int(detector), np.int16)
    if band is not None:
        derived["band"] = np.full(n, str(band), dtype="U8")
    if "diaSourceId" not in cols:
        derived["diaSourceId"] = np.int64(id_base or 0) + np.arange(1, n + 1, dtype=np.int64)
    from astropy.time import Time

    derived["timeProcessedMjdTai"] = np.full(n, Time.now().tai.mjd)

    flux_unit = "nJy" if photo_calib is not None else "count"
    for name, apdb_type, unit in spec:
        if name in cols:
            values = np.asarray(cols[name])
        elif name in derived:
            values = derived[name]
        else:
            out[name] = _default(apdb_type, n)
            if unit and name not in FLUX_COLUMNS and name not in _MOMENT_COLUMNS and name != "dipoleLength":
                out[name].unit = unit
            elif name in FLUX_COLUMNS:
                out[name].unit = flux_unit
            continue
        col_unit = unit
        if name in FLUX_COLUMNS:
            calib = calibs[FLUX_COLUMNS[name]]
            if in_units.get(name) == "nJy":  # already calibrated (e.g. by ForcedMeasurementTask)
                calib = _IDENTITY
            values = np.asarray(values, float)
            if calib is not None:
                values = values * calib.calibration_mean
            col_unit = "nJy" if calib is not None else "count"
        elif name in _MOMENT_COLUMNS:
            values = np.asarray(values, float)
            if scale is not None:
                values = values * scale * scale
            else:
                col_unit = "pixel**2"
        elif name == "dipoleLength":
            values = np.asarray(values, float)
            if scale is not None:
                values = values * scale
            else:
                col_unit = "pixel"
        if apdb_type in _NUMPY_TYPES:
            dt = _NUMPY_TYPES[apdb_type]
            if np.issubdtype(dt, np.integer) and np.issubdtype(np.asarray(values).dtype, np.floating):
                values = np.where(np.isfinite(values), values, 0)
            values = np.asarray(values).astype(dt)
        else:
            values = np.asarray(values).astype(str)
        out[name] = values
        if col_unit:
            out[name].unit = col_unit
    # Flux errors include the calibration uncertainty (afw instFluxToNanojansky).
    for name, which in FLUX_COLUMNS.items():
        calib = calibs[which]
        if in_units.get(name) == "nJy":
            continue
        if name.endswith("Err") and calib is not None and calib.calibration_err > 0 and name[:-3] in cols:
            inst = np.asarray(cols[name[:-3]], float)
            inst_err = np.asarray(cols[name], float)
            out[name] = np.hypot(inst_err * calib.calibration_mean, inst * calib.calibration_err).astype(np.float32)
            out[name].unit = "nJy"
    out.meta["FLUXUNIT"] = flux_unit
    out.meta["MOMUNIT"] = "arcsec**2" if scale is not None else "pixel**2"
    if scale is not None:
        out.meta["PIXSCALE"] = scale
    out.meta["SCHEMA"] = "APDB DiaSource (sdm_schemas apdb.yaml 10.0.0)"
    return out


def _write_parquet(table: Table, path: Path) -> None:
    """Parquet through pyarrow directly (astropy's reader needs pandas); units and meta go in the metadata."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = []
    arrays = []
    for name in table.colnames:
        col = table[name]
        arr = pa.array(np.asarray(col))
        md = {b"unit": str(col.unit).encode()} if col.unit is not None else None
        fields.append(pa.field(name, arr.type, metadata=md))
        arrays.append(arr)
    meta = {b"diffim_meta": json.dumps({k: v for k, v in table.meta.items()}, default=str).encode()}
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=meta)), str(path))


def _read_parquet(path: Path) -> Table:
    import json

    import pyarrow.parquet as pq

    pt = pq.read_table(str(path))
    out = Table()
    for field, col in zip(pt.schema, pt.columns):
        values = col.to_numpy(zero_copy_only=False)
        if values.dtype == object:
            values = values.astype(str)
        out[field.name] = values
        if field.metadata and b"unit" in field.metadata:
            out[field.name].unit = field.metadata[b"unit"].decode()
    md = pt.schema.metadata or {}
    if b"diffim_meta" in md:
        out.meta.update(json.loads(md[b"diffim_meta"].decode()))
    return out


def _atomic_write(table: Table, path: Path, fmt: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if fmt == "parquet":
            _write_parquet(table, tmp)
        else:
            table.write(str(tmp), format=fmt, overwrite=True)
        os.replace(tmp, path)
    except OSError as exc:
        raise DiffimIOError(f"Could not write {path}: {exc}. Check the directory exists and is writable.") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_catalog(table: Table, path_stem: str | os.PathLike, *, formats: tuple[str, ...] = ("parquet", "fits")) -> list[Path]:
    """Write ``<stem>.parquet`` and ``<stem>.fits`` atomically (temporary file, then ``os.replace``).

    Parquet needs pyarrow (the ``[parquet]`` extra); without it a warning is issued and only FITS is
    written. Returns the paths written.
    """
    stem = Path(path_stem)
    if stem.suffix in (".parquet", ".fits"):
        stem = stem.with_suffix("")
    written: list[Path] = []
    for fmt in formats:
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                warnings.warn(
                    "pyarrow is not installed, so the DiaSource catalogue is written as FITS only; "
                    "install it with: pip install 'diffim[parquet]'",
                    stacklevel=2,
                )
                continue
            path = stem.with_suffix(".parquet")
            _atomic_write(table, path, "parquet")
        elif fmt == "fits":
            path = stem.with_suffix(".fits")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # long meta keys become HIERARCH cards
                _atomic_write(table, path, "fits")
        else:
            raise DiffimValueError(f"Unknown catalogue format {fmt!r}; use 'parquet' or 'fits'.")
        written.append(path)
    return written


def read_catalog(path: str | os.PathLike) -> Table:
    """Read a catalogue written by :func:`write_catalog` (``.parquet`` or ``.fits``)."""
    path = Path(path)
    if not path.exists():
        from .errors import InputFileNotFoundError

        raise InputFileNotFoundError(f"Catalogue file {path} does not exist.")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    table = Table.read(str(path), format="fits")
    for name in table.colnames:
        if table[name].dtype.kind == "S":
            table[name] = np.char.decode(np.asarray(table[name]), "ascii")
    return table
