"""Reference-catalogue loading from a local file (stand-in for LSST's ``LoadReferenceObjectsTask``).

LSST reads sharded HTM reference catalogues through the Butler. diffim reads one local table (Parquet, FITS or
CSV) with sky positions in degrees and optional fluxes or magnitudes, and returns the objects that fall inside
an exposure's bounding box grown by ``pixelMargin`` pixels.
"""

from __future__ import annotations

import os

import lsst.pex.config as pexConfig
import numpy as np

from ..errors import BadInputError, InputFileNotFoundError, WcsError
from .base import Struct, Task, timeMethod

__all__ = ["LoadReferenceObjectsConfig", "LoadReferenceObjectsTask", "load_reference_catalog", "read_reference_table"]


class LoadReferenceObjectsConfig(pexConfig.Config):
    """Configuration of the reference-object loader (LSST names where they exist)."""

    filename = pexConfig.Field(
        dtype=str, default="",
        doc="Path to a local reference catalogue (Parquet, FITS or CSV) with ra/dec in degrees; empty = none",
    )
    raColumn = pexConfig.Field(dtype=str, default="ra", doc="Column holding right ascension (degrees)")
    decColumn = pexConfig.Field(dtype=str, default="dec", doc="Column holding declination (degrees)")
    idColumn = pexConfig.Field(dtype=str, default="id", doc="Column holding the object id (row number if absent)")
    fluxColumns = pexConfig.ListField(
        dtype=str, default=[], doc="Flux or magnitude columns to carry along (empty: every other numeric column)"
    )
    pixelMargin = pexConfig.RangeField(
        dtype=int, default=250, min=0, doc="Padding to add to 4 all edges of the bounding box (pixels)"
    )
    anyFilterMapsToThis = pexConfig.Field(
        dtype=str, default=None, optional=True,
        doc="Always use this reference catalog filter, no matter whether or what filter name is supplied to the "
        "loader. Effectively a trivial filterMap: map all filter names to this filter.",
    )
    filterMap = pexConfig.DictField(
        keytype=str, itemtype=str, default={},
        doc="Mapping of camera filter name: reference catalog filter name; each reference filter must exist",
    )
    requireProperMotion = pexConfig.Field(
        dtype=bool, default=False, doc="Require that the fields needed to correct proper motion are present?"
    )

    def validate(self):
        super().validate()
        if self.anyFilterMapsToThis and self.filterMap:
            raise pexConfig.FieldValidationError(
                LoadReferenceObjectsConfig.filterMap, self, "`filterMap` and `anyFilterMapsToThis` are mutually exclusive"
            )


def read_reference_table(path: str):
    """Read a reference table (Parquet, FITS or CSV by extension) as an astropy Table."""
    from astropy.table import Table

    if not os.path.exists(path):
        raise InputFileNotFoundError(
            f"Reference catalogue {path!r} does not exist; set refObjLoader.filename to an existing file."
        )
    low = path.lower()
    try:
        if low.endswith((".parq", ".parquet", ".pq")):
            return Table.read(path, format="parquet")
        if low.endswith((".csv", ".txt", ".dat")):
            return Table.read(path, format="ascii.csv")
        return Table.read(path)
    except Exception as exc:  # noqa: BLE001 - re-raised as a clear diffim error
        raise BadInputError(f"Cannot read reference catalogue {path!r}: {str(exc).splitlines()[0]}") from exc


def _ref_filter(config: LoadReferenceObjectsConfig, band: str | None) -> str | None:
    if config.anyFilterMapsToThis:
        return config.anyFilterMapsToThis
    if band is None:
        return None
    return config.filterMap.get(band, band)


def load_reference_catalog(config: LoadReferenceObjectsConfig, exposure=None, *, bbox=None, wcs=None,
                           band: str | None = None):
    """Objects of the configured catalogue inside the exposure's bbox grown by ``pixelMargin``.

    Returns an astropy Table with ``id``, ``ra``, ``dec`` (also under the configured ``raColumn``/``decColumn``
    names), ``x``, ``y`` (exposure parent pixels), the flux
    columns, and meta ``fluxField`` (the column of the exposure's band per ``filterMap``/``anyFilterMapsToThis``,
    or None). Returns None when ``config.filename`` is empty.

    Raises
    ------
    InputFileNotFoundError
        The file does not exist.
    BadInputError
        The file is unreadable or lacks the ra/dec columns (or the mapped filter's column).
    WcsError
        The exposure has no WCS.
    """
    if not config.filename:
        return None
    t = read_reference_table(config.filename)
    for col in (config.raColumn, config.decColumn):
        if col not in t.colnames:
            raise BadInputError(
                f"Reference catalogue {config.filename!r} has no column {col!r} (columns: {', '.join(t.colnames[:12])}"
                f"{'…' if len(t.colnames) > 12 else ''}); set refObjLoader.raColumn/decColumn."
            )
    if exposure is not None:
        bbox = exposure.bbox if bbox is None else bbox
        wcs = exposure.wcs if wcs is None else wcs
        band = exposure.band if band is None else band
    from astropy.table import Table

    ra = np.asarray(t[config.raColumn], float)
    dec = np.asarray(t[config.decColumn], float)
    ids = np.asarray(t[config.idColumn]) if config.idColumn in t.colnames else np.arange(len(t))
    out = Table({"id": ids, "ra": ra, "dec": dec})
    # Keep the configured names too, so callers may index with raColumn/decColumn either way.
    if config.raColumn not in out.colnames:
        out[config.raColumn] = ra
    if config.decColumn not in out.colnames:
        out[config.decColumn] = dec
    if wcs is not None or bbox is not None:
        if wcs is None:
            raise WcsError("Loading reference objects for an exposure needs its WCS; the exposure has none.")
        x, y = wcs.all_world2pix(ra, dec, 0, quiet=True)
        out["x"], out["y"] = x, y
    flux_cols = list(config.fluxColumns) or [
        c for c in t.colnames
        if c not in (config.raColumn, config.decColumn, config.idColumn) and np.issubdtype(t[c].dtype, np.number)
    ]
    for c in flux_cols:
        if c not in t.colnames:
            raise BadInputError(f"Reference catalogue {config.filename!r} has no flux column {c!r}.")
        out[c] = t[c]
    ref_filter = _ref_filter(config, band)
    flux_field = None
    if ref_filter is not None:
        for cand in (f"{ref_filter}_flux", ref_filter, f"{ref_filter}_mag", f"{ref_filter}mag"):
            if cand in out.colnames:
                flux_field = cand
                break
        if flux_field is None and (config.anyFilterMapsToThis or band in config.filterMap):
            raise BadInputError(
                f"Reference catalogue {config.filename!r} has no column for filter {ref_filter!r} "
                f"(tried {ref_filter}_flux, {ref_filter}, {ref_filter}_mag)."
            )
    out.meta["fluxField"] = flux_field
    if bbox is not None:
        m = config.pixelMargin
        keep = (
            np.isfinite(out["x"]) & np.isfinite(out["y"])
            & (out["x"] >= bbox.x0 - 0.5 - m) & (out["x"] < bbox.x1 - 0.5 + m)
            & (out["y"] >= bbox.y0 - 0.5 - m) & (out["y"] < bbox.y1 - 0.5 + m)
        )
        out = out[keep]
    return out


class LoadReferenceObjectsTask(Task):
    """Load reference objects overlapping an exposure from ``config.filename``."""

    ConfigClass = LoadReferenceObjectsConfig
    _DefaultName = "refObjLoader"

    @timeMethod
    def loadPixelBox(self, bbox, wcs, filterName: str | None = None) -> Struct:
        """Objects inside ``bbox`` (grown by ``pixelMargin``); ``Struct(refCat, fluxField)``."""
        cat = load_reference_catalog(self.config, bbox=bbox, wcs=wcs, band=filterName)
        return Struct(refCat=cat, fluxField=None if cat is None else cat.meta.get("fluxField"))

    def run(self, exposure) -> Struct:
        return self.loadPixelBox(exposure.bbox, exposure.wcs, exposure.band)
