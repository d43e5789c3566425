"""``SkyObjectsTask``: sky-source footprints on empty parts of an image (LSST ``SkyObjectsTask``)."""

from __future__ import annotations

import lsst.pex.config as pexConfig

from ..footprint import Footprint
from ..model.mask import Mask
from ..sky_sources import generate_sky_sources
from .base import Task, timeMethod

__all__ = ["SkyObjectsConfig", "SkyObjectsTask"]


class SkyObjectsConfig(pexConfig.Config):
    """Configuration of :class:`SkyObjectsTask` (LSST names and defaults)."""

    avoidMask = pexConfig.ListField(
        dtype=str, default=["DETECTED", "DETECTED_NEGATIVE", "BAD", "NO_DATA"],
        doc="Mask planes a sky object must not touch.",
    )
    growMask = pexConfig.RangeField(
        dtype=int, default=0, min=0,
        doc="Grow the avoided pixels by this many pixels before placing sky objects.",
    )
    sourceRadius = pexConfig.Field(dtype=float, default=8, doc="Radius of a sky object, pixels.")
    nSources = pexConfig.RangeField(dtype=int, default=100, min=0, doc="Number of sky objects to place.")
    nTrialSources = pexConfig.Field(
        dtype=int, default=None, optional=True,
        doc="Number of trial positions; None means nSources × nTrialSourcesMultiplier.",
    )
    nTrialSourcesMultiplier = pexConfig.RangeField(
        dtype=int, default=5, min=1,
        doc="Trial positions per wanted sky object when nTrialSources is None.",
    )


class SkyObjectsTask(Task):
    """Generate circular footprints on empty sky, reproducible for a given seed."""

    ConfigClass = SkyObjectsConfig
    _DefaultName = "skySources"

    @timeMethod
    def run(self, mask: Mask, seed: int, xy0: tuple[int, int] | None = None) -> list[Footprint]:
        """Footprints of sky objects avoiding ``avoidMask`` pixels of ``mask``.

        Parameters
        ----------
        mask
            The image mask (planes named in ``avoidMask`` that it lacks are ignored), or an Exposure /
            MaskedImage (its mask and ``xy0`` are used).
        seed
            Seed of the Halton sequence (LSST: the exposure id).
        xy0
            Parent coordinates of the mask's first pixel (default: the exposure's, else ``(0, 0)``).

        Returns
        -------
        list of Footprint
            Circles of radius ``int(sourceRadius)`` with one peak (value 0) at the centre.
        """
        cfg = self.config
        if not isinstance(mask, Mask) and hasattr(mask, "mask"):
            xy0 = mask.xy0 if xy0 is None else xy0
            mask = mask.mask
        xy0 = (0, 0) if xy0 is None else xy0
        avoid = mask.get(list(cfg.avoidMask), ignore_missing=True)
        n_trial = cfg.nTrialSources if cfg.nTrialSources is not None else cfg.nSources * cfg.nTrialSourcesMultiplier
        footprints = generate_sky_sources(
            avoid, n_sources=cfg.nSources, radius=cfg.sourceRadius, n_trial=n_trial, seed=int(seed),
            grow_mask=cfg.growMask, xy0=xy0,
        )
        self.metadata["sky_footprint_count"] = len(footprints)
        if len(footprints) < cfg.nSources:
            self.log.warning("Placed only %d of %d sky objects (too little empty sky).", len(footprints), cfg.nSources)
        else:
            self.log.info("Added %d sky sources.", len(footprints))
        return footprints
