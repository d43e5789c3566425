"""Measurement of DIA sources: centroids, PSF and aperture fluxes, adaptive moments, pixel flags and aperture
corrections, each vectorised over sources (LSST meas_base ``SdssCentroid``, ``PsfFlux``,
``CircularApertureFlux``, ``SdssShape``, ``PixelFlags``; meas_algorithms ``MeasureApCorrTask``).
Dipole fitting lives in :mod:`diffim.measure.dipole`.
"""

from .aperture import ApertureFluxResult, aperture_flux, circle_pixel_weights
from .apcorr import ApCorrModel, ApCorrResult, apply_ap_corr, measure_ap_corr
from .centroid import CentroidResult, sdss_centroid
from .flags import PIXEL_FLAG_PLANES, pixel_flag_names, pixel_flags
from .psf_flux import PsfFluxResult, psf_flux
from .shape import ShapeResult, adaptive_moments
from .single_frame import footprint_peaks, measure_dia_sources

__all__ = [
    "ApertureFluxResult",
    "aperture_flux",
    "circle_pixel_weights",
    "ApCorrModel",
    "ApCorrResult",
    "apply_ap_corr",
    "measure_ap_corr",
    "CentroidResult",
    "sdss_centroid",
    "PIXEL_FLAG_PLANES",
    "pixel_flag_names",
    "pixel_flags",
    "PsfFluxResult",
    "psf_flux",
    "ShapeResult",
    "adaptive_moments",
    "footprint_peaks",
    "measure_dia_sources",
]
