"""``ImagePsfMatchTask``: Alard–Lupton PSF matching and subtraction of two exposures on one pixel grid.

Config classes mirror LSST's ``PsfMatchConfigAL`` / ``PsfMatchConfigDF`` (field names and defaults of the
spec §2.1); :class:`ImagePsfMatchConfig` applies the AL subtract-task overrides (``fitForBackground=True``,
``spatialKernelOrder=1``, ``spatialBgOrder=2``). The algorithms live in :mod:`diffim.psfmatch` and
:mod:`diffim.convolve`; this module only wires them together.

``subtractAlgorithmRegistry`` lets ``ImageDifferenceTask`` choose the subtraction algorithm by name
(``subtract.name = "al"`` or ``"zogy"``).
"""

from __future__ import annotations

import math

import lsst.pex.config as pexConfig
import numpy as np

from ..convolve import convolve_exposure
from ..errors import InsufficientKernelCandidatesError, NoOverlapError, PsfError
from ..model.exposure import Exposure
from ..model.psf import FWHM_PER_SIGMA, Psf
from ..psfmatch.basis import make_kernel_basis_list, regularization_matrix
from ..psfmatch.candidates import detect_kernel_sources, make_kernel_candidates
from ..psfmatch.noise import noise_correlation
from ..psfmatch.solve import solve_psf_matching
from ..psfmatch.spatial_order import choose_spatial_kernel_order, predicted_kernel_residuals
from .base import Struct, Task, timeMethod

# Pixels the background refit ignores besides sources: no data, defects and the unconvolvable border.
REFIT_EXCLUDE_PLANES = ("BAD", "SAT", "EDGE", "NO_DATA", "CR", "INTRP", "SUSPECT")

__all__ = [
    "PsfMatchConfig",
    "PsfMatchConfigAL",
    "PsfMatchConfigDF",
    "ImagePsfMatchConfig",
    "ImagePsfMatchTask",
    "subtractAlgorithmRegistry",
    "choose_convolve_template",
    "psf_fwhm_grid",
]


class PsfMatchConfig(pexConfig.Config):
    """Fields shared by the Alard–Lupton and delta-function kernel configurations (LSST names/defaults)."""

    kernelBasisSet = pexConfig.ChoiceField(
        dtype=str, doc="Type of basis set for PSF matching kernel.", default="alard-lupton",
        allowed={"alard-lupton": "Alard-Lupton Gaussian x polynomial basis",
                 "delta-function": "one basis per kernel pixel"},
    )
    kernelSize = pexConfig.Field(dtype=int, doc="Kernel size if not scaleByFwhm (odd).", default=21)
    scaleByFwhm = pexConfig.Field(dtype=bool, doc="Scale kernelSize and basis widths by the PSF FWHMs.", default=True)
    kernelSizeFwhmScaling = pexConfig.Field(dtype=float, doc="Kernel size = this × widest basis sigma.", default=6.0)
    kernelSizeMin = pexConfig.Field(dtype=int, doc="Minimum kernel size.", default=21)
    kernelSizeMax = pexConfig.Field(dtype=int, doc="Maximum kernel size.", default=35)
    spatialModelType = pexConfig.ChoiceField(
        dtype=str, doc="Spatial functions of the kernel and background.", default="chebyshev1",
        allowed={"chebyshev1": "Chebyshev polynomials of the first kind on the bbox", "polynomial": "plain powers"},
    )
    spatialKernelOrder = pexConfig.Field(dtype=int, doc="Spatial order of the kernel variation.", default=2)
    spatialBgOrder = pexConfig.Field(dtype=int, doc="Spatial order of the differential background.", default=1)
    fitForBackground = pexConfig.Field(dtype=bool, doc="Fit a differential background with the kernel.", default=False)
    sizeCellX = pexConfig.Field(dtype=int, doc="Size (x) of the spatial cells, pixels.", default=128)
    sizeCellY = pexConfig.Field(dtype=int, doc="Size (y) of the spatial cells, pixels.", default=128)
    nStarPerCell = pexConfig.Field(dtype=int, doc="Candidates used per cell (-1: all).", default=5)
    maxSpatialIterations = pexConfig.Field(dtype=int, doc="Spatial clipping iterations.", default=3)
    usePcaForSpatialKernel = pexConfig.Field(
        dtype=bool, default=False,
        doc="Fit the spatial kernel model in the basis of the mean and principal components of the single-candidate "
            "kernels (diffim.psfmatch.pca) instead of the original basis.")
    subtractMeanForPca = pexConfig.Field(dtype=bool, doc="Subtract the mean kernel before PCA.", default=True)
    numPrincipalComponents = pexConfig.Field(dtype=int, doc="PCA components incl. the mean.", default=5)
    singleKernelClipping = pexConfig.Field(dtype=bool, doc="Reject candidates on single-kernel residuals.", default=True)
    kernelSumClipping = pexConfig.Field(dtype=bool, doc="Reject kernel-sum outliers.", default=True)
    spatialKernelClipping = pexConfig.Field(dtype=bool, doc="Reject candidates on spatial-kernel residuals.",
                                            default=True)
    checkConditionNumber = pexConfig.Field(dtype=bool, doc="Reject ill-conditioned single kernels.", default=False)
    maxConditionNumber = pexConfig.Field(dtype=float, doc="Maximum single-kernel condition number.", default=5.0e7)
    conditionNumberType = pexConfig.ChoiceField(
        dtype=str, doc="How the condition number is computed.", default="EIGENVALUE",
        allowed={"EIGENVALUE": "ratio of extreme eigenvalues", "SVD": "ratio of extreme singular values"},
    )
    maxSpatialConditionNumber = pexConfig.Field(dtype=float, doc="Warn above this spatial condition number.",
                                                default=1.0e10)
    badMaskPlanes = pexConfig.ListField(dtype=str, doc="Mask planes excluded from residual statistics.",
                                        default=("NO_DATA", "EDGE", "SAT"))
    candidateResidualMeanMax = pexConfig.Field(dtype=float, doc="Max |mean| of normalised residuals.", default=0.25)
    candidateResidualStdMax = pexConfig.Field(dtype=float, doc="Max rms of normalised residuals.", default=1.50)
    useCoreStats = pexConfig.Field(dtype=bool, doc="Residual statistics in the core only.", default=False)
    candidateCoreRadius = pexConfig.Field(dtype=int, doc="Core radius for useCoreStats.", default=3)
    maxKsumSigma = pexConfig.Field(dtype=float, doc="Kernel-sum clipping threshold (sigma).", default=3.0)
    iterateSingleKernel = pexConfig.Field(dtype=bool, doc="Refit singles with the difference variance.", default=False)
    constantVarianceWeighting = pexConfig.Field(dtype=bool, doc="One variance per stamp (median).", default=True)
    calculateKernelUncertainty = pexConfig.Field(dtype=bool, doc="Kernel uncertainty (not used).", default=False)
    useBicForKernelBasis = pexConfig.Field(dtype=bool, doc="BIC basis selection (not used).", default=False)

    def validate(self):
        super().validate()
        if self.kernelSize % 2 == 0:
            raise pexConfig.FieldValidationError(PsfMatchConfig.kernelSize, self, "kernelSize must be odd")
        if self.numPrincipalComponents < 1:
            raise pexConfig.FieldValidationError(PsfMatchConfig.numPrincipalComponents, self,
                                                 "numPrincipalComponents must be at least 1 (the mean kernel)")


class PsfMatchConfigAL(PsfMatchConfig):
    """Alard–Lupton basis configuration (LSST defaults; the subtract task overrides the spatial orders)."""

    alardNGauss = pexConfig.Field(dtype=int, doc="Number of Gaussians in the AL basis.", default=3)
    alardDegGauss = pexConfig.ListField(dtype=int, doc="Polynomial degree per Gaussian.", default=(4, 2, 2))
    alardSigGauss = pexConfig.ListField(dtype=float, doc="Gaussian sigmas when not scaling by FWHM.",
                                        default=(0.7, 1.5, 3.0))
    alardGaussBeta = pexConfig.Field(dtype=float, doc="Sigma ratio of successive Gaussians.", default=2.0)
    alardMinSig = pexConfig.Field(dtype=float, doc="Minimum sigma (convolution).", default=0.7)
    alardDegGaussDeconv = pexConfig.Field(dtype=int, doc="Degree of the old deconvolution basis.", default=3)
    alardMinSigDeconv = pexConfig.Field(dtype=float, doc="Minimum sigma (deconvolution).", default=0.4)
    alardNGaussDeconv = pexConfig.Field(dtype=int, doc="Gaussians of the old deconvolution basis.", default=3)

    def setDefaults(self):
        super().setDefaults()
        self.kernelBasisSet = "alard-lupton"
        self.maxConditionNumber = 5.0e7

    def validate(self):
        super().validate()
        if len(self.alardDegGauss) != self.alardNGauss or len(self.alardSigGauss) != self.alardNGauss:
            raise pexConfig.FieldValidationError(
                PsfMatchConfigAL.alardNGauss, self, "alardDegGauss and alardSigGauss need alardNGauss entries"
            )


class PsfMatchConfigDF(PsfMatchConfig):
    """Delta-function basis configuration with central-difference regularisation."""

    useRegularization = pexConfig.Field(dtype=bool, doc="Regularise the delta-function solution.", default=True)
    regularizationType = pexConfig.ChoiceField(
        dtype=str, doc="Regularisation operator.", default="centralDifference",
        allowed={"centralDifference": "Laplacian stencil", "forwardDifference": "forward differences"},
    )
    centralRegularizationStencil = pexConfig.ChoiceField(
        dtype=int, doc="Laplacian stencil points.", default=9, allowed={5: "5-point", 9: "9-point"}
    )
    forwardRegularizationOrders = pexConfig.ListField(dtype=int, doc="Forward-difference orders.", default=(1, 2))
    regularizationBorderPenalty = pexConfig.Field(dtype=float, doc="Penalty on kernel border pixels.", default=3.0)
    lambdaType = pexConfig.ChoiceField(
        dtype=str, doc="How lambda is chosen.", default="absolute",
        allowed={"absolute": "lambdaValue", "relative": "trace(M)/trace(H) × lambdaScaling"},
    )
    lambdaValue = pexConfig.Field(dtype=float, doc="Regularisation strength.", default=0.2)
    lambdaScaling = pexConfig.Field(dtype=float, doc="Relative lambda scaling.", default=1.0e-4)
    lambdaStepType = pexConfig.Field(dtype=str, doc="Lambda scan step type (unused).", default="log")
    lambdaMin = pexConfig.Field(dtype=float, doc="Lambda scan start (log10, unused).", default=-1.0)
    lambdaMax = pexConfig.Field(dtype=float, doc="Lambda scan end (log10, unused).", default=2.0)
    lambdaStep = pexConfig.Field(dtype=float, doc="Lambda scan step (unused).", default=0.1)

    def validate(self):
        super().validate()
        for name in ("lambdaValue", "lambdaScaling", "regularizationBorderPenalty"):
            if not getattr(self, name) >= 0:
                raise pexConfig.FieldValidationError(getattr(PsfMatchConfigDF, name), self,
                                                     f"{name} must be ≥ 0 (a negative penalty rewards rough kernels)")
        orders = list(self.forwardRegularizationOrders)
        if not orders or any(o not in (1, 2, 3) for o in orders):
            raise pexConfig.FieldValidationError(PsfMatchConfigDF.forwardRegularizationOrders, self,
                                                 f"forwardRegularizationOrders must be 1, 2 or 3, got {orders}")

    def setDefaults(self):
        super().setDefaults()
        self.kernelBasisSet = "delta-function"
        self.maxConditionNumber = 5.0e6
        # LSST sets usePcaForSpatialKernel = True here. A single delta-function kernel (~1100 pixels fitted to
        # ~1200) is noise, so principal components of single kernels miss the spatial variation (docs/deviations.md).
        self.usePcaForSpatialKernel = False


class DetectionConfig(pexConfig.Config):
    """Private kernel-star detection (used when no candidate list is given)."""

    detThreshold = pexConfig.Field(dtype=float, doc="Detection threshold (S/N of the PSF-smoothed peak).",
                                   default=10.0)
    badMaskPlanes = pexConfig.ListField(dtype=str, doc="A stamp touching any of these planes is rejected.",
                                        default=("NO_DATA", "EDGE", "SAT", "BAD", "CR"))


class ImagePsfMatchConfig(pexConfig.Config):
    """Configuration of :class:`ImagePsfMatchTask`."""

    kernel = pexConfig.ConfigChoiceField(
        doc="Kernel basis configuration.", typemap={"AL": PsfMatchConfigAL, "DF": PsfMatchConfigDF}, default="AL"
    )
    selectDetection = pexConfig.ConfigField(dtype=DetectionConfig, doc="Kernel candidate detection.")
    maxKernelSources = pexConfig.Field(dtype=int, doc="Keep at most this many candidates (≤0: all).", default=1000)
    minKernelSources = pexConfig.Field(dtype=int, doc="Fewer usable candidates raise an error.", default=3)
    restrictKernelEdgeSources = pexConfig.Field(dtype=bool, doc="Keep stamps a kernel size away from the edge.",
                                                default=True)
    doCopyEdge = pexConfig.Field(dtype=bool, doc="Copy the unconvolvable border (else NaN/NO_DATA).", default=True)
    preserveMaskPlanes = pexConfig.ListField(
        dtype=str, doc="Mask planes not dilated by the convolution.",
        default=("INJECTED", "INJECTED_CORE", "INJECTED_TEMPLATE", "INJECTED_CORE_TEMPLATE"),
    )
    mode = pexConfig.ChoiceField(
        dtype=str, default="convolveTemplate",
        doc="Which image ImageDifferenceTask convolves (modern LSST AlardLuptonSubtractConfig.mode).",
        allowed={
            "convolveTemplate": "as ImageDifferenceConfig.convolveTemplate says (default: the template)",
            "auto": "the template unless it is wider than the science in both axes (then the science)",
        },
    )
    psfGridSize = pexConfig.Field(dtype=int, doc="PSF FWHMs are evaluated on this n×n grid; the worst case sizes "
                                  "the kernel basis.", default=3)
    anisotropicBasisDegree = pexConfig.Field(
        dtype=int, optional=True, default=4,
        doc="Not in LSST: if the kernel implied by the PSF second moments (C_ref − C_target) is strongly "
            "anisotropic (axis ratio < anisotropyThreshold), raise the AL polynomial degree of every Gaussian after "
            "the first to at least this, so a kernel narrower than alardMinSig along one axis can be represented "
            "(elliptical science PSF: star χ² p95 1.39 → 1.24). None disables.",
    )
    anisotropyThreshold = pexConfig.Field(dtype=float, default=0.6,
                                          doc="Kernel axis ratio below which anisotropicBasisDegree applies.")
    narrowKernelBasisDegree = pexConfig.Field(
        dtype=int, optional=True, default=6,
        doc="Not in LSST: if the matching kernel's width from the PSF FWHMs, sqrt(sigma_ref^2 - sigma_target^2), "
            "is below alardMinSig (the narrowest basis Gaussian is then wider than the kernel: sharp, "
            "undersampled PSFs), raise the AL polynomial degree of the first Gaussian to at least this, so its "
            "Hermite terms can build the narrow kernel (science FWHM 1.8 px, template 20 % sharper: star chi2 "
            "p95 2.0-2.5 -> 1.5-1.7). Only when the target is convolved to a broader reference. None disables.",
    )
    maxSpatialKernelOrder = pexConfig.Field(
        dtype=int, optional=True, default=2,
        doc="Not in LSST: the AL kernel's spatial order may be raised above kernel.spatialKernelOrder, up to this, "
            "when the two PSF models say the kernel varies more across the field than that order can follow "
            "(diffim.psfmatch.spatial_order: the best kernel of each order fitted to the PSF models on a 7x7 grid "
            "leaves more than spatialOrderTolerance of a star's peak somewhere, and one order more at least halves "
            "it). Science FWHM +-35 % across 1024^2 (the simulator's default is +-15 %): star chi2 p95 1.48-1.69 "
            "-> 1.19-1.22. None disables.",
    )
    spatialOrderTolerance = pexConfig.RangeField(
        dtype=float, default=0.05, min=0.0,
        doc="Predicted kernel residual (fraction of a star's peak) above which maxSpatialKernelOrder may raise "
            "the spatial order.",
    )
    templateNoiseCorrection = pexConfig.Field(
        dtype=bool, default=True,
        doc="Not in LSST: remove the expected contribution of the convolved image's own pixel noise (variance "
            "plane × its noise covariance measured at 5×5 lags on the background pixels) from the spatial kernel fit's normal equations "
            "(errors-in-variables correction), each kernel direction to the extent that the bias removed is measured "
            "above the noise amplified. Without "
            "it the least-squares kernel is biased towards a wide, smoothing one whenever the convolved image "
            "is not much deeper than the other (the noise adds a penalty ∝ ‖K‖²).",
    )

    doRefitBackground = pexConfig.Field(
        dtype=bool, default=True,
        doc="Not in LSST: after subtraction, refit the differential background (same polynomial basis, "
            "spatialBgOrder) on the whole difference's source-free pixels and subtract the correction. The stamp "
            "fit pins the polynomial only at the kernel stamps, where its constant term trades off against the "
            "kernel sum times the template sky; on simulated 1024² pairs it left ±0.3–0.8 counts (±0.05–0.1 σ of "
            "the PSF-smoothed difference) and 1.6× as many negative as positive 4σ noise peaks. Only with "
            "fitForBackground. (Modern LSST re-estimates a mesh background of the difference before detection "
            "instead.)",
    )
    refitBackgroundBinSize = pexConfig.RangeField(
        dtype=int, default=32, min=4,
        doc="Super-pixel size (px) of the background refit (doRefitBackground): one median per super-pixel.",
    )

    def setDefaults(self):
        super().setDefaults()
        for name in ("AL", "DF"):  # the AL subtract-task overrides
            self.kernel[name].fitForBackground = True
            self.kernel[name].spatialKernelOrder = 1
            self.kernel[name].spatialBgOrder = 2


def _fwhm_xy(psf: Psf, x: float, y: float) -> tuple[float, float, float]:
    ixx, iyy, _ = psf.compute_shape(x, y)
    return FWHM_PER_SIGMA * math.sqrt(ixx), FWHM_PER_SIGMA * math.sqrt(iyy), FWHM_PER_SIGMA * math.sqrt(0.5 * (ixx + iyy))


def psf_fwhm_grid(psf: Psf, bbox, n: int = 3) -> np.ndarray:
    """Trace-radius FWHM of ``psf`` on an ``n × n`` grid inset 5 % from the edges of ``bbox`` (``(n, n)``)."""
    xs = np.linspace(bbox.x0 + 0.05 * bbox.width, bbox.x1 - 1 - 0.05 * bbox.width, n) if n > 1 else [bbox.center[0]]
    ys = np.linspace(bbox.y0 + 0.05 * bbox.height, bbox.y1 - 1 - 0.05 * bbox.height, n) if n > 1 else [bbox.center[1]]
    out = np.full((len(ys), len(xs)), np.nan)
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            try:
                out[j, i] = _fwhm_xy(psf, x, y)[2]
            except Exception:  # a position the PSF cannot be evaluated at is skipped, as LSST's grid fallback
                pass
    return out


def choose_convolve_template(science_psf: Psf, template_psf: Psf, position=None) -> bool:
    """``mode="auto"`` (spec §1.2 step 7): convolve the template iff it is not wider in at least one axis."""
    if position is None:
        position = science_psf.average_position
    xs, ys, _ = _fwhm_xy(science_psf, *position)
    xt, yt, _ = _fwhm_xy(template_psf, *position)
    return (xt <= xs) or (yt <= ys)


def _as_sources(candidate_list) -> np.ndarray:
    """``(n, 3)`` x, y, flux from an array, a list of tuples/Footprints or a table with x/y/flux columns."""
    if candidate_list is None:
        return None
    if hasattr(candidate_list, "colnames"):
        t = candidate_list
        names = {c.lower(): c for c in t.colnames}
        xk = next(names[k] for k in ("x", "slot_centroid_x", "base_sdsscentroid_x", "xc") if k in names)
        yk = next(names[k] for k in ("y", "slot_centroid_y", "base_sdsscentroid_y", "yc") if k in names)
        fk = next((names[k] for k in ("flux", "base_psfflux_instflux", "psf_flux", "flux_science") if k in names), None)
        f = np.asarray(t[fk], float) if fk else np.ones(len(t))
        return np.column_stack([np.asarray(t[xk], float), np.asarray(t[yk], float), f])
    rows = []
    for item in candidate_list:
        if hasattr(item, "peaks"):  # a Footprint: its brightest peak
            p = item.peaks[0]
            rows.append((p.x, p.y, getattr(p, "value", getattr(p, "peak_value", 1.0))))
        else:
            v = list(item)
            rows.append((v[0], v[1], v[2] if len(v) > 2 else 1.0))
    return np.asarray(rows, float).reshape(-1, 3)


class ImagePsfMatchTask(Task):
    """Match the PSF of one exposure to another's with an Alard–Lupton kernel, and subtract them."""

    ConfigClass = ImagePsfMatchConfig
    _DefaultName = "imagePsfMatch"

    # -- sizing ---------------------------------------------------------------------------------------------
    def _basis_fwhms(self, target: Exposure, reference: Exposure, bbox) -> tuple[float | None, float | None]:
        """FWHMs of the target/reference PSFs at the grid point with the largest |σ_r² − σ_t²|."""
        if target.psf is None or reference.psf is None:
            return None, None
        n = self.config.psfGridSize
        ft, fr = psf_fwhm_grid(target.psf, bbox, n), psf_fwhm_grid(reference.psf, bbox, n)
        d = np.abs(fr**2 - ft**2)
        if not np.isfinite(d).any():
            return None, None
        j = np.nanargmax(d)
        return float(ft.flat[j]), float(fr.flat[j])

    def _kernel_axis_ratio(self, target: Exposure, reference: Exposure, bbox) -> float:
        """Axis ratio of the Gaussian kernel ``C_ref − C_target`` at the bbox centre (1 if unknown; 0 if the
        kernel would have to deconvolve along one axis only)."""
        if target.psf is None or reference.psf is None:
            return 1.0
        try:
            x, y = bbox.center
            rxx, ryy, rxy = reference.psf.compute_shape(x, y)
            txx, tyy, txy = target.psf.compute_shape(x, y)
        except Exception:
            return 1.0
        lam = np.linalg.eigvalsh(np.array([[rxx - txx, rxy - txy], [rxy - txy, ryy - tyy]]))
        if lam[1] <= 0:
            return 1.0  # pure deconvolution: the ordinary deconvolution basis applies
        return float(math.sqrt(max(lam[0], 0.0) / lam[1]))

    def makeKernelBasisList(self, targetFwhmPix: float | None = None, referenceFwhmPix: float | None = None,
                            kernelAxisRatio: float = 1.0):
        """Basis for matching ``target`` (convolved) to ``reference``; metadata goes to ``self.metadata``."""
        kc = self.config.kernel.active
        kw = dict(
            basis_set=kc.kernelBasisSet, kernel_size=kc.kernelSize, scale_by_fwhm=kc.scaleByFwhm,
            kernel_size_fwhm_scaling=kc.kernelSizeFwhmScaling, kernel_size_min=kc.kernelSizeMin,
            kernel_size_max=kc.kernelSizeMax,
        )
        if kc.kernelBasisSet == "alard-lupton":
            degrees = tuple(kc.alardDegGauss)
            boost = self.config.anisotropicBasisDegree
            if boost is not None and kernelAxisRatio < self.config.anisotropyThreshold:
                degrees = degrees[:1] + tuple(max(d, boost) for d in degrees[1:])
                self.log.info("Kernel axis ratio %.2f: AL polynomial degrees raised to %s.", kernelAxisRatio, degrees)
            narrow = self.config.narrowKernelBasisDegree
            if narrow is not None and kc.scaleByFwhm and targetFwhmPix and referenceFwhmPix \
                    and referenceFwhmPix >= targetFwhmPix and degrees[0] < narrow:
                sigma_k = math.sqrt(referenceFwhmPix**2 - targetFwhmPix**2) / FWHM_PER_SIGMA
                if sigma_k < kc.alardMinSig:
                    degrees = (narrow,) + degrees[1:]
                    self.log.info("Kernel width %.2f px < alardMinSig %.2f: AL polynomial degrees raised to %s.",
                                  sigma_k, kc.alardMinSig, degrees)
            kw.update(n_gauss=kc.alardNGauss, deg_gauss=degrees, sig_gauss=tuple(kc.alardSigGauss),
                      gauss_beta=kc.alardGaussBeta, min_sig=kc.alardMinSig, min_sig_deconv=kc.alardMinSigDeconv)
        basis, meta = make_kernel_basis_list(targetFwhmPix, referenceFwhmPix, **kw)
        self.metadata.update(meta)
        return basis

    # -- fitting ----------------------------------------------------------------------------------------------
    def _regularization(self, basis) -> tuple[np.ndarray | None, float | None]:
        """``(matrix, relative scaling)`` for :func:`~diffim.psfmatch.solve.solve_psf_matching`: ``(λH, None)``
        for ``lambdaType="absolute"``, ``(H, lambdaScaling)`` for ``"relative"``, ``(None, None)`` without."""
        kc = self.config.kernel.active
        if kc.kernelBasisSet != "delta-function" or not getattr(kc, "useRegularization", False):
            return None, None
        H = regularization_matrix(basis.size, kc.centralRegularizationStencil, kc.regularizationBorderPenalty,
                                  kind=kc.regularizationType, orders=tuple(kc.forwardRegularizationOrders))
        if kc.lambdaType == "relative":
            return H, float(kc.lambdaScaling)
        return kc.lambdaValue * H, None

    def _spatial_kernel_order(self, target: Exposure, reference: Exposure, basis, bbox) -> int:
        """``kernel.spatialKernelOrder``, raised up to ``maxSpatialKernelOrder`` when the PSF models predict
        that the kernel varies more than that order can follow (:mod:`diffim.psfmatch.spatial_order`)."""
        kc = self.config.kernel.active
        order, top = kc.spatialKernelOrder, self.config.maxSpatialKernelOrder
        if (top is None or top <= order or basis.kind != "alard-lupton" or kc.usePcaForSpatialKernel
                or target.psf is None or reference.psf is None):
            return order
        res = predicted_kernel_residuals(target.psf, reference.psf, basis, bbox, range(order, top + 1),
                                         spatial_model_type=kc.spatialModelType)
        for k, v in res.items():
            self.metadata[f"predictedKernelResidualOrder{k}"] = v
        chosen = choose_spatial_kernel_order(res, order, top, tolerance=self.config.spatialOrderTolerance)
        self.metadata["spatialKernelOrderUsed"] = chosen
        if chosen > order:
            self.log.info("The PSF models vary across the field more than a spatial kernel of order %d can follow "
                          "(predicted residual %.3f of a star's peak; order %d: %.3f): fitting order %d.",
                          order, res[order], chosen, res[chosen], chosen)
        return chosen

    def _fit(self, target: Exposure, reference: Exposure, candidateList, residualMeanScale: float = 1.0):
        """Fit ``reference ≈ corr(K, target) + bg``; returns (solution, basis). ``residualMeanScale``: see
        :meth:`matchExposures`."""
        kc = self.config.kernel.active
        bbox = reference.bbox.intersection(target.bbox)
        if bbox.is_empty():
            raise NoOverlapError(f"The exposures do not overlap: {target.bbox} vs {reference.bbox}.")
        ft, fr = self._basis_fwhms(target, reference, bbox)
        basis = self.makeKernelBasisList(ft, fr, self._kernel_axis_ratio(target, reference, bbox))
        ksize = basis.size
        sources = _as_sources(candidateList)
        if sources is None:
            # Detect on the sharper-or-not image we match to; stars look the same in both for selection purposes.
            det_img = reference
            sigma = 2.0
            if det_img.psf is not None:
                try:
                    sigma = det_img.psf.sigma(*bbox.center)
                except PsfError:
                    pass
            sources = detect_kernel_sources(
                det_img.masked_image[bbox], sigma, threshold=self.config.selectDetection.detThreshold,
                bad_mask_planes=tuple(self.config.selectDetection.badMaskPlanes),
            )
        region = bbox.grown(-ksize) if self.config.restrictKernelEdgeSources else bbox
        cands, counts = make_kernel_candidates(
            sources, reference.masked_image, target.masked_image, ksize,
            bad_mask_planes=tuple(self.config.selectDetection.badMaskPlanes), region=region,
            max_candidates=self.config.maxKernelSources,
        )
        if (len(cands) < max(1, self.config.minKernelSources) and self.config.restrictKernelEdgeSources
                and counts["outside"] > 0):
            # Small images: the kernel-size margin can exclude nearly every star. Stamps that merely lie
            # inside the image are still exact, so fall back to the whole overlap (as LSST does with the
            # option off) rather than fail.
            self.log.warning("Only %d kernel candidates a kernel size (%d px) from the edge; using candidates up to "
                             "the edge of the overlap.", len(cands), ksize)
            cands, counts = make_kernel_candidates(
                sources, reference.masked_image, target.masked_image, ksize,
                bad_mask_planes=tuple(self.config.selectDetection.badMaskPlanes), region=bbox,
                max_candidates=self.config.maxKernelSources,
            )
            self.metadata["kernelEdgeFallback"] = True
        self.metadata["nPsfSources"] = len(cands)
        if len(cands) < max(1, self.config.minKernelSources):
            raise InsufficientKernelCandidatesError(
                f"Only {len(cands)} usable kernel candidates (need {self.config.minKernelSources}): "
                f"{counts['input']} sources, {counts['outside']} too close to the edge, {counts['masked']} masked, "
                f"{counts['nonfinite']} with non-finite pixels. Provide more stars or a larger overlap."
            )
        rho = None
        if self.config.templateNoiseCorrection:
            good = None
            bits = target.mask.bitmask([p for p in kc.badMaskPlanes if target.mask.has_plane(p)])
            if bits:
                good = (target.mask.array[bbox.slices(target.xy0)] & bits) == 0
            tmi = target.masked_image[bbox]
            # The covariance is measured, shape and amplitude: the correction needs the actual noise, and a
            # variance plane off by a factor would make it over- or under-correct by that factor.
            rho, scale = noise_correlation(tmi.image, tmi.variance, good, return_scale=True)
            self.metadata["templateNoiseCorrelation1"] = float(0.25 * (rho[1, 2] + rho[3, 2] + rho[2, 1] + rho[2, 3]))
            self.metadata["templateNoiseVarianceRatio"] = scale
            rho = rho * scale
        reg, reg_scaling = self._regularization(basis)
        solution = solve_psf_matching(
            target.masked_image, reference.masked_image, cands, basis, bbox=bbox,
            spatial_kernel_order=self._spatial_kernel_order(target, reference, basis, bbox),
            spatial_bg_order=kc.spatialBgOrder,
            fit_for_background=kc.fitForBackground, spatial_model_type=kc.spatialModelType,
            size_cell_x=kc.sizeCellX, size_cell_y=kc.sizeCellY, n_star_per_cell=kc.nStarPerCell,
            max_spatial_iterations=kc.maxSpatialIterations, single_kernel_clipping=kc.singleKernelClipping,
            kernel_sum_clipping=kc.kernelSumClipping, spatial_kernel_clipping=kc.spatialKernelClipping,
            candidate_residual_mean_max=kc.candidateResidualMeanMax * float(residualMeanScale),
            candidate_residual_std_max=kc.candidateResidualStdMax, max_ksum_sigma=kc.maxKsumSigma,
            constant_variance_weighting=kc.constantVarianceWeighting,
            template_noise_correction=self.config.templateNoiseCorrection, noise_correlation=rho,
            regularization=reg, regularization_scaling=reg_scaling,
            use_pca=kc.usePcaForSpatialKernel, n_pca_components=kc.numPrincipalComponents,
            subtract_mean_for_pca=kc.subtractMeanForPca,
            log=self.log,
        )
        self.metadata.update(solution.metadata)
        return solution, basis

    @timeMethod
    def matchExposures(self, templateExposure: Exposure, scienceExposure: Exposure, candidateList=None,
                       convolveTemplate: bool = True, residualMeanScale: float = 1.0) -> Struct:
        """Fit the matching kernel and convolve one exposure with it.

        Both exposures must share the pixel grid (warp the template first; the template bbox must contain the
        science bbox). Returns ``Struct(matchedExposure, psfMatchingKernel, backgroundModel, kernelCandidates,
        kernelCellSet, warpedExposure, solution)``; ``matchedExposure`` is trimmed to the science bbox.

        ``residualMeanScale`` (diffim extension) multiplies ``candidateResidualMeanMax``: that limit on a
        candidate's mean normalised residual assumes white noise, for which the mean of a stamp's ``N`` pixels
        scatters by ``1/√N``. In an image whose noise is correlated over an area ``A`` (a science pre-convolved
        with its PSF: ``A = 1/Σp²``, ≈ 50 px) it scatters ``√A`` times more, and the white-noise limit rejects
        most good candidates (67 → 19 measured on a 768² scene, leaving the spatial kernel underdetermined).
        """
        if not templateExposure.bbox.contains(scienceExposure.bbox):
            raise NoOverlapError(
                f"The template bbox {templateExposure.bbox} does not contain the science bbox "
                f"{scienceExposure.bbox}; warp the template onto the science grid with a border first."
            )
        template = templateExposure[scienceExposure.bbox]
        if convolveTemplate:
            solution, _ = self._fit(template, scienceExposure, candidateList, residualMeanScale)
            matched = convolve_exposure(
                templateExposure, solution.kernel, copy_edge=self.config.doCopyEdge,
                preserve_mask_planes=tuple(self.config.preserveMaskPlanes), bbox=scienceExposure.bbox,
            )
            matched.psf = scienceExposure.psf
            matched.photo_calib = scienceExposure.photo_calib
        else:
            solution, _ = self._fit(scienceExposure, template, candidateList, residualMeanScale)
            matched = convolve_exposure(
                scienceExposure, solution.kernel, copy_edge=self.config.doCopyEdge,
                preserve_mask_planes=tuple(self.config.preserveMaskPlanes),
            )
            matched.psf = templateExposure.psf
        self.metadata["convolvedExposure"] = "Template" if convolveTemplate else "Science"
        return Struct(
            matchedExposure=matched,
            psfMatchingKernel=solution.kernel,
            backgroundModel=solution.background_model,
            kernelCandidates=solution.candidates,
            kernelCellSet=solution.candidates,
            warpedExposure=templateExposure,
            solution=solution,
        )

    @timeMethod
    def subtractExposures(self, templateExposure: Exposure, scienceExposure: Exposure, candidateList=None,
                          convolveTemplate: bool = True, doSubtractBackground: bool = True,
                          residualMeanScale: float = 1.0) -> Struct:
        """PSF-match and subtract.

        convolveTemplate: ``D = S − corr(K, T) − bg``. convolveScience: the fit is ``T ≈ corr(K, S) + bg`` and
        ``D = (corr(K, S) + bg − T) / k`` with ``k`` the kernel sum at the science bbox centre, so D is on the
        science flux scale in both modes. The difference keeps the science WCS, photoCalib, band and apCorrMap;
        its PSF is the science PSF (convolveTemplate) or the template PSF (convolveScience). The returned
        ``backgroundModel`` is the fitted background of science − matched template on the difference's scale.
        """
        res = self.matchExposures(templateExposure, scienceExposure, candidateList, convolveTemplate,
                                  residualMeanScale=residualMeanScale)
        sol = res.solution
        bbox = scienceExposure.bbox
        bg_image = sol.background_model.image(bbox)
        diff = scienceExposure.copy(deep=True)
        if convolveTemplate:
            diff.masked_image -= res.matchedExposure.masked_image
            if doSubtractBackground:
                diff.masked_image.image -= bg_image
            background = sol.background_model
            matched = res.matchedExposure
        else:
            norm = sol.kernel.kernel_sum(*bbox.center)
            template = templateExposure[bbox]
            mi = res.matchedExposure.masked_image.copy()
            if doSubtractBackground:
                mi.image += bg_image
            mi -= template.masked_image
            mi /= norm
            diff.masked_image = mi
            diff.psf = templateExposure.psf
            matched = res.matchedExposure
            matched.masked_image /= norm
            background = type(sol.background_model)(-np.asarray(sol.background_model.params) / norm,
                                                     sol.background_model.spatial)
        if doSubtractBackground and self.config.doRefitBackground:
            background = self._refit_background(diff, background)
        return Struct(
            subtractedExposure=diff,
            matchedExposure=matched,
            psfMatchingKernel=res.psfMatchingKernel,
            backgroundModel=background,
            kernelCellSet=res.kernelCellSet,
            kernelCandidates=res.kernelCandidates,
            warpedExposure=res.warpedExposure,
            solution=sol,
        )

    def _refit_background(self, diff: Exposure, background):
        """Subtract from ``diff`` (in place) the background the stamp fit left; return the total background.

        See :mod:`diffim.psfmatch.refit`. Metadata: ``backgroundRefitRms`` (rms of the correction, image units)
        and ``backgroundRefitBins`` (super-pixels used), or ``backgroundRefitSkipped`` (why not).
        """
        from ..psfmatch.refit import refit_background

        exclude = diff.mask.get(REFIT_EXCLUDE_PLANES, ignore_missing=True)
        sigma = float("nan")
        if diff.psf is not None:
            try:
                sigma = float(diff.psf.sigma(*diff.psf_position()))
            except Exception:  # a PSF without usable moments: the mask falls back to σ = 1.5 px
                pass
        ref = refit_background(diff.image, diff.variance, exclude, background, diff.xy0, sigma,
                               bin_size=self.config.refitBackgroundBinSize)
        if ref.correction is None:
            self.log.info("Background refit skipped: %s.", ref.reason)
            self.metadata["backgroundRefitSkipped"] = ref.reason
            return background
        diff.image -= ref.correction.image(diff.bbox)
        self.metadata["backgroundRefitRms"] = ref.rms
        self.metadata["backgroundRefitBins"] = ref.n_bins
        self.log.info("Background refit on %d super-pixels: correction rms %.3g.", ref.n_bins, ref.rms)
        return type(background)(np.asarray(background.params, float) + ref.correction.params, background.spatial)

    def run(self, templateExposure: Exposure, scienceExposure: Exposure, candidateList=None,
            convolveTemplate: bool = True) -> Struct:
        """Same as :meth:`subtractExposures`."""
        return self.subtractExposures(templateExposure, scienceExposure, candidateList, convolveTemplate)


subtractAlgorithmRegistry = pexConfig.makeRegistry(
    doc="Image subtraction algorithms for ImageDifferenceTask's `subtract` field ('al', 'zogy')."
)
subtractAlgorithmRegistry.register("al", ImagePsfMatchTask)
