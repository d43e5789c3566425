"""``DipoleFitTask``: dipole measurement of difference-image sources (LSST ``ip_diffim`` ``DipoleFitTask``).

The task selects the footprints that hold peaks of both signs, fits each with the two-lobe PSF model of
:mod:`diffim.measure.dipole` (difference image + science + matched template), classifies them and returns
per-source columns under both the APDB DiaSource names and the LSST ``ip_diffim_DipoleFit_*`` names.

The LSST plugin configuration (``config.plugins["ip_diffim_DipoleFit"]``) is the nested field
``config.dipoleFit`` here, with the same field names and defaults.
"""

from __future__ import annotations

import math
from typing import Sequence

import lsst.pex.config as pexConfig
import numpy as np

from ..errors import ShapeMismatchError
from ..footprint import Footprint
from ..measure.dipole import (
    DipoleFitResult,
    LobePsfModel,
    classify_dipole,
    fit_dipole,
    is_dipole_footprint,
)
from ..model.exposure import Exposure
from .base import Struct, Task, timeMethod

__all__ = ["DipoleFitPluginConfig", "DipoleFitConfig", "DipoleFitTask", "DIASOURCE_DIPOLE_COLUMNS"]

#: DiaSource columns produced by :class:`DipoleFitTask` (plus ``dipoleSep_px``, ours).
DIASOURCE_DIPOLE_COLUMNS = (
    "dipoleMeanFlux", "dipoleMeanFluxErr", "dipoleFluxDiff", "dipoleFluxDiffErr", "dipoleLength",
    "dipoleAngle", "dipoleChi2", "dipoleNdata", "isDipole", "dipoleFitAttempted", "dipoleSep_px",
)


class DipoleFitPluginConfig(pexConfig.Config):
    """Configuration of the dipole fit (LSST ``DipoleFitPluginConfig``, same names and defaults)."""

    fitAllDiaSources = pexConfig.Field(
        dtype=bool, default=False, doc="Attempt dipole fit of all diaSources (otherwise only ones consisting of "
        "overlapping but separated peaks)"
    )
    maxSeparation = pexConfig.RangeField(
        dtype=float, default=5.0, min=0.0, doc="Assume dipole is not separated by more than maxSeparation * psfSigma"
    )
    relWeight = pexConfig.RangeField(
        dtype=float, default=0.5, min=0.0,
        doc="Relative weighting of pre-subtraction images (higher -> greater influence of pre-sub. images on fit)"
    )
    tolerance = pexConfig.RangeField(dtype=float, default=1e-7, min=0.0, doc="Fit tolerance")
    fitBackground = pexConfig.Field(
        dtype=int, default=1,
        doc="Set whether and how to fit for linear gradient in pre-sub. images. Possible values: 0: do not fit "
        "background at all; 1 (default): pre-fit the background using linear least squares and then do not "
        "fit it as part of the dipole fitting optimization; 2: pre-fit the background using linear least "
        "squares (as in 1), and use the parameter estimates from that fit as starting parameters for an "
        "integrated re-fit of the background"
    )
    fitSeparateNegParams = pexConfig.Field(
        dtype=bool, default=False, doc="Include parameters to fit for negative values (flux, gradient) separately "
        "from pos."
    )
    minSn = pexConfig.RangeField(
        dtype=float, default=math.sqrt(2.0) * 5.0, min=0.0, doc="Minimum quadrature sum of positive+negative lobe "
        "S/N to be considered a dipole"
    )
    maxFluxRatio = pexConfig.RangeField(
        dtype=float, default=0.65, min=0.0, doc="Maximum flux ratio in either lobe to be considered a dipole"
    )
    maxChi2DoF = pexConfig.RangeField(
        dtype=float, default=0.05, min=0.0,
        doc="Maximum Chi2/DoF significance of fit to be considered a dipole (unused, as in LSST)"
    )
    maxFootprintArea = pexConfig.RangeField(
        dtype=int, default=1200, min=0, doc="Maximum area for footprints before they are ignored as large; "
        "non-positive means no threshold applied"
    )
    bgGradientOrder = pexConfig.ChoiceField(
        dtype=int, default=1, allowed={1: "plane [1, x, y]", 2: "quadratic [1, x, y, xy, x², y²]"},
        doc="Order of the background gradient fitted to the pre-subtraction images"
    )

    def validate(self) -> None:
        super().validate()
        if self.fitBackground not in (0, 1, 2):
            raise pexConfig.FieldValidationError(
                DipoleFitPluginConfig.fitBackground, self, f"fitBackground must be 0, 1 or 2, not {self.fitBackground}"
            )


class DipoleFitConfig(pexConfig.Config):
    """Configuration of :class:`DipoleFitTask`."""

    dipoleFit = pexConfig.ConfigField(
        dtype=DipoleFitPluginConfig, doc="The ip_diffim_DipoleFit plugin configuration"
    )
    badMaskPlanes = pexConfig.ListField(
        dtype=str, default=["NO_DATA"], doc="Mask planes of the difference image whose pixels are left out of the fit"
    )


class DipoleFitTask(Task):
    """Fit dipole models to difference-image sources (LSST ``lsst.ip.diffim.DipoleFitTask``).

    ``run(sources, exposure, posExp, negExp)`` fits every footprint with peaks of both signs (all footprints if
    ``fitAllDiaSources``) whose area is at most ``maxFootprintArea``; the others get the fallback centroid.
    """

    ConfigClass = DipoleFitConfig
    _DefaultName = "measurement"

    @timeMethod
    def run(
        self,
        sources: Sequence[Footprint],
        exposure: Exposure,
        posExp: Exposure | None = None,
        negExp: Exposure | None = None,
        centroids: dict | None = None,
    ) -> Struct:
        """Measure dipoles.

        Parameters
        ----------
        sources
            Footprints on the difference image (merged: peaks of both signs for dipoles), or an object with a
            ``footprints`` attribute holding them.
        exposure
            The difference image with its PSF (and optionally WCS and photo-calibration).
        posExp, negExp
            Science image and PSF-matched template on the same pixel grid (either may be None).
        centroids
            Optional slot centroids for the sources that are not fitted (or whose fit fails): a mapping with
            arrays ``x, y`` and optionally ``xErr, yErr, flag``. Default: :func:`diffim.measure.centroid.sdss_centroid`
            from each footprint's first peak (or the peak itself if that module is unavailable or fails).

        Returns
        -------
        Struct
            ``dipoles``: dict of per-source arrays (length ``len(sources)``) in the units
            :func:`diffim.catalog` expects (it calibrates them): all ``ip_diffim_DipoleFit_*`` fields
            (instrumental fluxes, both positive; parent-pixel positions; orientation in radians) and the
            DiaSource columns ``dipoleMeanFlux, dipoleMeanFluxErr, dipoleFluxDiff, dipoleFluxDiffErr`` (image
            units), ``dipoleLength`` (= ``dipoleSep_px``, pixels), ``dipoleAngle`` (degrees: with a WCS the APDB
            bearing east of north from the negative to the positive lobe, else counter-clockwise from +x),
            ``dipoleChi2`` (= chi2dof), ``dipoleNdata``, ``isDipole`` (= classification) and
            ``dipoleFitAttempted`` (a fit was run).
            ``calibrated``: the same flux columns in nJy (if the exposure has a photo-calibration),
            ``dipoleLength`` in arcsec (if it has a WCS) and ``dipoleAngle``.
            ``results``: the :class:`DipoleFitResult` of each source.
        """
        cfg = self.config.dipoleFit
        if not isinstance(sources, (list, tuple)) and hasattr(sources, "footprints"):
            sources = sources.footprints  # a catalogue object carrying its footprints
        sources = list(sources)
        n = len(sources)
        psf = exposure.require_psf()
        psf_sigma = psf.determinant_radius(*exposure.psf_position())
        bad = None
        if len(self.config.badMaskPlanes):
            bad = exposure.mask.get(list(self.config.badMaskPlanes), ignore_missing=True)
        posExp = self._on_grid(posExp, exposure, "posExp")
        negExp = self._on_grid(negExp, exposure, "negExp")
        arrays = dict(
            diff_image=exposure.image, diff_variance=exposure.variance,
            pos_image=None if posExp is None else posExp.image,
            pos_variance=None if posExp is None else posExp.variance,
            neg_image=None if negExp is None else negExp.image,
            neg_variance=None if negExp is None else negExp.variance,
        )
        results: list[DipoleFitResult] = []
        not_candidate: set[int] = set()
        n_fit = n_large = 0
        for i, fp in enumerate(sources):
            two_signed = is_dipole_footprint(fp)
            candidate = two_signed or (cfg.fitAllDiaSources and len(fp.peaks) >= 1)
            too_large = cfg.maxFootprintArea > 0 and fp.area > cfg.maxFootprintArea
            if candidate and not too_large:
                cx, cy = fp.bbox.center
                lobes = LobePsfModel.from_psf(psf, cx, cy)  # the PSF is taken as constant over the stamp
                try:
                    res = fit_dipole(
                        fp, lobes=lobes, psf_sigma=psf_sigma, bad=bad, xy0=exposure.xy0,
                        rel_weight=cfg.relWeight, tolerance=cfg.tolerance, fit_background=cfg.fitBackground,
                        separate_neg_params=cfg.fitSeparateNegParams, max_sep_in_sigma=cfg.maxSeparation,
                        bg_gradient_order=cfg.bgGradientOrder, **arrays,
                    )
                except Exception as exc:  # per-source failures become flags, never exceptions
                    self.log.warning("Dipole fit of source %d at %s failed: %s", i, fp.bbox, exc)
                    res = DipoleFitResult(flag=True, fit_attempted=True, message=str(exc))
                n_fit += 1
                if not res.flag:
                    # A single-signed source (fitted because fitAllDiaSources) is not classified a dipole: with
                    # one flux for both lobes LSST's flux-ratio test cannot fail, so every bright transient
                    # passed and took the fit's centroid, up to 12 px off (completeness 1.00 → 0.14).
                    res.classification = two_signed and classify_dipole(res, cfg.minSn, cfg.maxFluxRatio)
                    res.classification_attempted = True
            else:
                res = DipoleFitResult()
                if candidate:  # too large: a failure, as LSST
                    res.flag = True
                    res.message = f"footprint area {fp.area} > maxFootprintArea={cfg.maxFootprintArea}"
                    n_large += 1
                else:  # not a dipole: the fit centroid is the slot centroid and its flag
                    not_candidate.add(i)
            results.append(res)

        # Sources without a usable fit centroid get the slot centroid (computed only for those).
        need = [i for i, r in enumerate(results)
                if not (np.isfinite(r.x) and np.isfinite(r.y)) or (r.flag and not r.flag_edge)]
        if need:
            sub = None if centroids is None else {k: np.asarray(v)[need] for k, v in centroids.items()}
            fx, fy, fxe, fye, fflag = self._fallback_centroids([sources[i] for i in need], exposure, sub)
            for k, i in enumerate(need):
                r = results[i]
                r.x, r.y, r.x_err, r.y_err = float(fx[k]), float(fy[k]), float(fxe[k]), float(fye[k])
                if i in not_candidate:
                    r.flag = bool(fflag[k])

        self.metadata["nDipoleCandidates"] = n_fit + n_large
        self.metadata["nDipoleFits"] = n_fit
        self.metadata["nDipoleTooLarge"] = n_large
        self.metadata["nDipoles"] = int(sum(r.classification for r in results))
        self.log.info("Fitted %d dipole candidates among %d sources; %d classified as dipoles.",
                      n_fit, n, self.metadata["nDipoles"])
        dipoles, calibrated = self.make_columns(results, exposure)
        return Struct(dipoles=dipoles, calibrated=calibrated, results=results)

    @staticmethod
    def _on_grid(other: Exposure | None, exposure: Exposure, name: str) -> Exposure | None:
        """``other`` restricted to the difference image's bbox (it must share the pixel grid and cover it)."""
        if other is None or other.bbox == exposure.bbox:
            return other
        if other.bbox.contains(exposure.bbox):
            return other[exposure.bbox]
        raise ShapeMismatchError(
            f"{name} bbox {other.bbox} does not cover the difference image bbox {exposure.bbox}; pass the science "
            "and matched template on the difference image's pixel grid."
        )

    def _fallback_centroids(self, sources: Sequence[Footprint], exposure: Exposure, centroids: dict | None):
        """Slot centroids for sources that are not fitted: given, else SdssCentroid-like, else the first peak."""
        n = len(sources)
        if centroids is not None:
            x = np.asarray(centroids["x"], float)
            y = np.asarray(centroids["y"], float)
            xe = np.asarray(centroids.get("xErr", np.full(n, np.nan)), float)
            ye = np.asarray(centroids.get("yErr", np.full(n, np.nan)), float)
            flag = np.asarray(centroids.get("flag", np.zeros(n, bool)), bool)
            return x, y, xe, ye, flag
        px = np.array([fp.peaks[0].x if fp.peaks else round(fp.centroid()[0]) for fp in sources], float)
        py = np.array([fp.peaks[0].y if fp.peaks else round(fp.centroid()[1]) for fp in sources], float)
        fallback = (px, py, np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool))
        if n == 0:
            return fallback
        try:
            from ..measure.centroid import sdss_centroid
        except ImportError:
            return fallback
        negative = np.array([bool(fp.peaks[0].is_negative or fp.peaks[0].value < 0) if fp.peaks else fp.is_negative
                             for fp in sources])
        try:
            c = sdss_centroid(exposure.image, exposure.variance, exposure.psf, px, py, negative=negative,
                              xy0=exposure.xy0, footprints=list(sources))
        except Exception as exc:  # the fallback must never sink the dipole measurement
            self.log.warning("Centroid fallback failed (%s); using the footprint peaks.", exc)
            return fallback
        return (np.asarray(c.x, float), np.asarray(c.y, float), np.asarray(c.x_err, float),
                np.asarray(c.y_err, float), np.asarray(c.flag, bool))

    @staticmethod
    def make_columns(results: Sequence[DipoleFitResult], exposure: Exposure) -> tuple[dict, dict]:
        """Per-source column arrays from fit results: ``(instrumental, calibrated)`` (see :meth:`run`)."""
        n = len(results)
        cols: dict[str, np.ndarray] = {}
        lsst = [r.as_lsst() for r in results]
        if n:
            for key in lsst[0]:
                cols[key] = np.array([d[key] for d in lsst])
        else:
            for key in DipoleFitResult().as_lsst():
                cols[key] = np.zeros(0)
        get = lambda name: np.array([getattr(r, name) for r in results], dtype=float)  # noqa: E731
        mean, mean_err = get("flux"), get("flux_err")
        diff, diff_err = get("flux_diff"), get("flux_diff_err")
        cols["dipoleMeanFlux"], cols["dipoleMeanFluxErr"] = mean, mean_err
        cols["dipoleFluxDiff"], cols["dipoleFluxDiffErr"] = diff, diff_err
        sep = get("separation")
        cols["dipoleSep_px"] = sep
        cols["dipoleLength"] = sep
        cols["dipoleAngle"] = np.degrees(get("orientation"))
        cols["dipoleChi2"] = get("chi2dof")
        cols["dipoleNdata"] = np.array([r.n_data for r in results], dtype=np.int64)
        cols["isDipole"] = np.array([r.classification for r in results], dtype=bool)
        cols["dipoleFitAttempted"] = np.array([r.fit_attempted for r in results], dtype=bool)

        calibrated = {k: cols[k] for k in ("dipoleMeanFlux", "dipoleMeanFluxErr", "dipoleFluxDiff",
                                            "dipoleFluxDiffErr", "dipoleLength")}
        if exposure.photo_calib is not None:
            pc = exposure.photo_calib
            calibrated["dipoleMeanFlux"], calibrated["dipoleMeanFluxErr"] = pc.inst_flux_to_nanojansky(mean, mean_err)
            calibrated["dipoleFluxDiff"], calibrated["dipoleFluxDiffErr"] = pc.inst_flux_to_nanojansky(diff, diff_err)
        if exposure.wcs is not None and n:
            from astropy.coordinates import SkyCoord
            import astropy.units as u

            px, py, nx_, ny_ = get("pos_x"), get("pos_y"), get("neg_x"), get("neg_y")
            ok = np.isfinite(px) & np.isfinite(py) & np.isfinite(nx_) & np.isfinite(ny_)
            length = np.full(n, np.nan)
            angle = np.full(n, np.nan)
            if ok.any():
                ra_p, dec_p = exposure.pixel_to_sky(px[ok], py[ok])
                ra_n, dec_n = exposure.pixel_to_sky(nx_[ok], ny_[ok])
                cp = SkyCoord(ra_p * u.deg, dec_p * u.deg)
                cn = SkyCoord(ra_n * u.deg, dec_n * u.deg)
                length[ok] = cn.separation(cp).arcsec
                angle[ok] = cn.position_angle(cp).deg
            calibrated["dipoleLength"] = length
            cols["dipoleAngle"] = angle  # degrees either way: the APDB bearing when a WCS is known
        calibrated["dipoleAngle"] = cols["dipoleAngle"]
        return cols, calibrated
