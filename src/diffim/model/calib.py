"""Photometric calibration and visit information."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PhotoCalib", "VisitInfo", "NJY_AB_ZEROPOINT"]

#: AB magnitude of 1 nJy: m = 31.4 - 2.5 log10(f / nJy).
NJY_AB_ZEROPOINT = 31.4


@dataclass(frozen=True)
class PhotoCalib:
    """A spatially constant photometric calibration (afw ``PhotoCalib`` with a scalar calibration).

    Parameters
    ----------
    calibration_mean
        nJy per instrumental count (per unit of the image).
    calibration_err
        Uncertainty of ``calibration_mean`` (nJy per count).
    """

    calibration_mean: float = 1.0
    calibration_err: float = 0.0

    def __post_init__(self) -> None:
        if not np.isfinite(self.calibration_mean) or self.calibration_mean <= 0:
            raise ValueError(f"PhotoCalib calibration_mean must be finite and > 0, got {self.calibration_mean}")

    def inst_flux_to_nanojansky(self, inst_flux, inst_flux_err=None):
        """Convert instrumental flux (and its error) to nJy.

        Returns the flux, or ``(flux, err)`` when ``inst_flux_err`` is given. As in afw, the error combines
        the flux error and the calibration error in quadrature.
        """
        c = self.calibration_mean
        flux = np.asarray(inst_flux, dtype=float) * c
        if inst_flux_err is None:
            return flux
        err = np.hypot(np.asarray(inst_flux_err, dtype=float) * c, np.asarray(inst_flux, float) * self.calibration_err)
        return flux, err

    def inst_flux_to_magnitude(self, inst_flux):
        """AB magnitude of an instrumental flux."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return NJY_AB_ZEROPOINT - 2.5 * np.log10(np.asarray(inst_flux, float) * self.calibration_mean)

    @property
    def zero_point(self) -> float:
        """AB magnitude of one instrumental count."""
        return float(self.inst_flux_to_magnitude(1.0))


@dataclass
class VisitInfo:
    """What is known of the observation: date (MJD, TAI if known), exposure time, airmass, ids."""

    mjd: float | None = None
    exposure_time: float | None = None
    airmass: float | None = None
    visit: int | None = None
    detector: int | None = None
    extra: dict = field(default_factory=dict)
