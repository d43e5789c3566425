"""AstrometryTask: match sources to reference objects (LSST ``AstrometryTask``, matching only).

In ImageDifferenceTask the astrometer is "used to match sources to reference objects, but not to fit a WCS":
with ``doMatchSources`` it finds, for each DIA source, the nearest reference object within
``matcher.maxMatchDistArcSec`` (0.5″) to fill ``refMatchId``. No WCS is fitted here (that is RegisterTask).
"""

from __future__ import annotations

import lsst.pex.config as pexConfig
import numpy as np

from ..errors import BadInputError
from ..warp.matching import match_dia_sources
from .base import Struct, Task, timeMethod
from .ref_obj_loader import LoadReferenceObjectsConfig, LoadReferenceObjectsTask

__all__ = ["AstrometryConfig", "AstrometryTask", "MatcherConfig"]


class MatcherConfig(pexConfig.Config):
    """Matcher parameters (the relevant part of LSST's ``MatchOptimisticBConfig``)."""

    maxMatchDistArcSec = pexConfig.RangeField(
        dtype=float, default=0.5, min=0, inclusiveMin=False, doc="Maximum separation between reference objects and "
        "sources beyond which they will not be considered a match (arcsec)",
    )
    maxOffsetPix = pexConfig.RangeField(dtype=int, default=250, min=0, doc="Maximum allowed shift of WCS (pixels); informational")
    numBrightStars = pexConfig.RangeField(dtype=int, default=150, min=2, doc="Number of bright stars to use; informational")


class AstrometryConfig(pexConfig.Config):
    """Configuration for AstrometryTask (matching part)."""

    matcher = pexConfig.ConfigField(dtype=MatcherConfig, doc="Reference-object matcher")
    forceKnownWcs = pexConfig.Field(
        dtype=bool, default=True, doc="If True then load reference objects and match sources but do not fit a WCS; "
        "this simply controls whether 'run' calls 'solve' or 'loadAndMatch' (always loadAndMatch in diffim)",
    )
    maxMeanDistanceArcsec = pexConfig.RangeField(
        dtype=float, default=0.5, min=0, doc="Maximum mean on-sky distance (arcsec) between matched source and "
        "reference objects post-fit; reported in metadata only",
    )


class AstrometryTask(Task):
    """Match a source catalogue to reference objects.

    Parameters
    ----------
    refObjLoader
        An object with ``loadPixelBox(bbox, wcs, filterName)`` returning ``Struct(refCat=...)``, or None to build
        a :class:`LoadReferenceObjectsTask` from ``refObjLoaderConfig``.
    refObjLoaderConfig
        :class:`LoadReferenceObjectsConfig` (ImageDifferenceConfig's ``refObjLoader``).
    """

    ConfigClass = AstrometryConfig
    _DefaultName = "astrometry"

    def __init__(self, refObjLoader=None, refObjLoaderConfig=None, **kwargs):
        super().__init__(**kwargs)
        if refObjLoader is None:
            cfg = refObjLoaderConfig if refObjLoaderConfig is not None else LoadReferenceObjectsConfig()
            refObjLoader = LoadReferenceObjectsTask(config=cfg)
        self.refObjLoader = refObjLoader

    def setRefObjLoader(self, refObjLoader) -> None:
        self.refObjLoader = refObjLoader

    def match(self, sourceCat, refCat, radius_arcsec: float | None = None) -> Struct:
        """Nearest reference object of each source within ``radius_arcsec`` (default ``maxMatchDistArcSec``).

        ``sourceCat`` needs ``ra``/``dec`` (or ``coord_ra``/``coord_dec``) in degrees; ``refCat`` ``ra``/``dec``
        and optionally ``id``. Returns ``Struct(refMatchId, distance, nMatched)``; unmatched rows get id -1.
        """
        radius = self.config.matcher.maxMatchDistArcSec if radius_arcsec is None else float(radius_arcsec)
        if refCat is None or len(refCat) == 0:
            n = len(sourceCat) if sourceCat is not None else 0
            return Struct(refMatchId=np.full(n, -1, np.int64), distance=np.full(n, np.nan), nMatched=0)
        ids, dist = match_dia_sources(sourceCat, refCat, radius)
        ok = ids >= 0
        self.metadata["matchedRefCount"] = int(ok.sum())
        if ok.any():
            self.metadata["matchMeanDistArcsec"] = float(np.mean(dist[ok]))
        return Struct(refMatchId=ids, distance=dist, nMatched=int(ok.sum()))

    @timeMethod
    def run(self, sourceCat, exposure) -> Struct:
        """Load the reference objects overlapping ``exposure`` and match ``sourceCat`` to them.

        Sources without sky columns get them from ``exposure.wcs`` and their ``x``/``y``. Returns
        ``Struct(refCat, matches=Struct(refMatchId, distance, nMatched), refMatchId, distance)``; with no
        reference catalogue configured every source is unmatched (id -1).
        """
        if exposure.wcs is None:
            raise BadInputError("AstrometryTask needs an exposure with a WCS to match to reference objects.")
        loaded = self.refObjLoader.loadPixelBox(exposure.bbox, exposure.wcs, exposure.band)
        refCat = loaded.refCat
        cat = sourceCat
        has_sky = any(c in getattr(sourceCat, "colnames", getattr(sourceCat, "keys", lambda: [])())
                      for c in ("ra", "coord_ra"))
        if not has_sky:
            x = np.asarray(sourceCat["x"], float)
            y = np.asarray(sourceCat["y"], float)
            ra, dec = exposure.pixel_to_sky(x, y)
            cat = {"ra": ra, "dec": dec}
        m = self.match(cat, refCat)
        return Struct(refCat=refCat, matches=m, refMatchId=m.refMatchId, distance=m.distance)

    loadAndMatch = run
