"""Decorrelation of Alard–Lupton difference images ("afterburner"; Reiss & Lupton 2016, DMTN-021; DMTN-179).

Convolving the template with the PSF-matching kernel κ correlates its noise: the difference
``D = S − κ⊗T`` has the noise power spectrum ``σ²_S + σ²_T |K̂(k)|²``. Filtering ``D`` with

    φ̂(k) = sqrt( (σ²_S + σ²_T · κ_sum²) / (σ²_S + σ²_T |K̂(k)|²) )                        (DMTN-021 eq. 1)

whitens it: the filtered noise has the flat spectrum ``σ²_S + σ²_T κ_sum²``, and ``φ̂(0) = 1`` preserves fluxes.
The PSF of the result is ``φ ⊗ PSF_D``. In "pre-convolution" (score-image) mode the science image was first
convolved with its own PSF ``P`` and the filter is (DMTN-179)

    φ̂(k) = (σ²_S + σ²_T κ_sum²) / (σ²_S + σ²_T |K̂|² / |P̂|²),

evaluated as ``(σ²_S + σ²_T κ_sum²)·|P̂|² / (σ²_S |P̂|² + σ²_T |K̂|² + ε)`` with ``ε = 10⁻⁶ (σ²_S + σ²_T κ_sum²)``
(LSST instead floors |P̂|² at 1000·tiny): φ̂ rolls off smoothly where the PSF has no power.

The variance plane follows from Parseval: the filtered noise has per-pixel variance
``V_u · mean|ĉ_u|² + V_c · mean|ĉ_c|²`` (means over all frequency cells) with ``ĉ_u = φ̂`` (``conj(P̂)·φ̂`` in
pre-convolution mode) and ``ĉ_c = K̂ φ̂``; ``V_u``, ``V_c`` are the variance planes of the un-convolved and the
convolved input. With ``complete_variance=True`` the variance planes are convolved with ``c²`` instead.

Implementation notes (deliberate choices, see ``lsst_algorithms.md`` §3):

* FFT grids follow LSST (per axis the two largest of image/kernel/PSF sizes, ``n1 + n2 − 1``, made even) but are
  then rounded up to a fast FFT length (``scipy.fft.next_fast_len``): more zero padding changes nothing but speed.
* Images are filtered after subtracting their median (non-finite pixels are replaced by it; LSST uses the mean),
  which is the same as padding with the background level rather than with zeros: since ``φ̂(0) = 1`` the level
  passes unchanged, no step appears at the image edges and source flux is preserved. Non-finite pixels are
  restored afterwards.
* Kernel spectra are only needed through ``|K̂|²`` except for the complete variance propagation, where kernels
  are moved centre-to-origin as LSST's ``padCenterOriginArray`` does.
* The decorrelated PSF is computed on a small grid (a few times the kernel + PSF size) instead of the full image
  grid: φ is compact enough that the aliasing of its tails is far below float32 precision.
* Spatially varying decorrelation (:func:`decorrelate_spatial`) evaluates φ̂ on a grid of cell centres (local
  kernel, local clipped-mean variances) and blends the filtered images with bilinear weights between the four
  surrounding centres — the result equals filtering with a kernel that varies bilinearly in position, is
  continuous everywhere (no seams) and costs about ``5·(1 + 2·border/spacing)²`` image-sized FFTs. LSST instead
  averages overlapping decorrelated sub-images (``ImageMapReduceTask``), i.e. a piecewise-constant filter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft as sfft

from .errors import BadInputError
from .statistics import clipped_mean

__all__ = [
    "pad_center_origin",
    "unpad_center_origin",
    "decorrelation_fft_shape",
    "decorrelation_kernel_fourier",
    "decorrelation_variance_factors",
    "decorrelate",
    "decorrelate_psf",
    "decorrelate_spatial",
    "DecorrelationNodes",
    "spatial_decorrelation_nodes",
    "kernel_image_at",
]

_log = logging.getLogger(__name__)

#: A science image convolved with a kernel summing to 0 has lost its flux scale; its variance, divided by
#: κ_sum² as LSST does, would be infinite.
_ZERO_SUM_SCIENCE_KERNEL = (
    "The PSF-matching kernel applied to the science image sums to 0{where}: the difference has no flux scale "
    "and cannot be decorrelated; check that neither input image is blank (the kernel fit is degenerate)."
)

#: Pre-convolution mode: the score's noise power σ²_S|P̂|² + σ²_T|K̂|² is floored by this fraction of its value
#: at k = 0 (see :func:`decorrelation_kernel_fourier`).
_PREC_NOISE_FLOOR = 1e-6


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------
def kernel_image_at(kernel: Any, x: float, y: float) -> np.ndarray:
    """Kernel image (float64, un-normalised) of a constant array or a spatial kernel at parent ``(x, y)``.

    Accepts a 2-D array, any object with ``kernel_image(x, y)`` (:class:`diffim.psfmatch.kernel.SpatialKernel`),
    an object with ``compute_kernel_image(x, y)`` (a :class:`~diffim.model.psf.Psf`) or a callable ``f(x, y)``.
    """
    if isinstance(kernel, np.ndarray):
        k = kernel
    elif hasattr(kernel, "kernel_image"):
        k = kernel.kernel_image(x, y)
    elif hasattr(kernel, "compute_kernel_image"):
        k = kernel.compute_kernel_image(x, y)
    elif callable(kernel):
        k = kernel(x, y)
    else:
        k = np.asarray(kernel)
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2 or k.size == 0:
        raise BadInputError(f"A decorrelation kernel must be a non-empty 2-D image, got shape {k.shape}.")
    if not np.all(np.isfinite(k)):
        raise BadInputError(f"The PSF-matching kernel at ({x:.1f}, {y:.1f}) has non-finite values.")
    return k


def pad_center_origin(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zero-pad ``a`` to ``shape`` and move its centre (index ``n//2`` per axis) to index ``(0, 0)``."""
    a = np.asarray(a)
    if a.shape[0] > shape[0] or a.shape[1] > shape[1]:
        raise BadInputError(f"Cannot pad an array of shape {a.shape} to the smaller shape {shape}.")
    out = np.zeros(shape, dtype=a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return np.roll(out, (-(a.shape[0] // 2), -(a.shape[1] // 2)), axis=(0, 1))


def unpad_center_origin(b: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`pad_center_origin`: the ``shape`` array whose centre sits at ``b[0, 0]``."""
    return np.roll(b, (shape[0] // 2, shape[1] // 2), axis=(0, 1))[: shape[0], : shape[1]]


def decorrelation_fft_shape(*shapes: tuple[int, ...]) -> tuple[int, int]:
    """FFT grid for filtering: per axis the two largest sizes ``n1 + n2 − 1``, made even, then fast."""
    out = []
    for axis in range(2):
        sizes = sorted((int(s[axis]) for s in shapes if s is not None), reverse=True) + [1]
        n = sizes[0] + sizes[1] - 1
        n += n % 2
        out.append(sfft.next_fast_len(n, real=True))
    return out[0], out[1]


def _rfft_weights(shape: tuple[int, int]) -> np.ndarray:
    """Multiplicity of each column of an rfft2 half-plane within the full spectrum (for Parseval sums)."""
    nx = shape[1]
    w = np.full(nx // 2 + 1, 2.0)
    w[0] = 1.0
    if nx % 2 == 0:
        w[-1] = 1.0
    return w


def _full_mean(power: np.ndarray, shape: tuple[int, int]) -> float:
    """Mean over the full 2-D frequency grid of a quantity given on the rfft2 half-plane."""
    return float((power.sum(axis=0, dtype=np.float64) * _rfft_weights(shape)).sum() / (shape[0] * shape[1]))


def _power(kernel: np.ndarray, shape: tuple[int, int], workers: int, dtype=np.float64) -> np.ndarray:
    """``|K̂|²`` on the rfft2 half-plane of ``shape`` (shift-invariant, so no centring is needed).

    ``dtype=float32`` halves the cost on image-sized grids; its 1e-7 relative precision is irrelevant for φ̂.
    """
    k = sfft.rfft2(np.asarray(kernel, dtype=dtype), s=shape, workers=workers)
    out = np.abs(k)
    out *= out
    return out


def _variances(svar: float, tvar: float, template_matched: bool) -> tuple[float, float]:
    """``(σ²_u, σ²_c)``: the un-convolved image is the science when the template was matched."""
    return (float(svar), float(tvar)) if template_matched else (float(tvar), float(svar))


# ----------------------------------------------------------------------------------------------------------
# The correction in Fourier space
# ----------------------------------------------------------------------------------------------------------
def decorrelation_kernel_fourier(
    kernel_image: np.ndarray,
    svar: float,
    tvar: float,
    shape: tuple[int, int],
    preconv_kernel: np.ndarray | None = None,
    *,
    template_matched: bool = True,
    workers: int = 2,
    _kernel_power: np.ndarray | None = None,
) -> np.ndarray:
    """The decorrelation filter φ̂ on the ``scipy.fft.rfft2`` half-plane of an FFT grid of ``shape``.

    Parameters
    ----------
    kernel_image
        PSF-matching kernel κ (un-normalised; its sum matters).
    svar, tvar
        Typical per-pixel variances of the science and the (un-convolved) template.
    shape
        FFT grid ``(ny, nx)``; the result has shape ``(ny, nx // 2 + 1)``.
    preconv_kernel
        Pre-convolution kernel P (score-image mode, DMTN-179); normalised to unit sum here.
    template_matched
        True if the template was convolved (σ²_u = svar, σ²_c = tvar), False if the science was.

    Returns
    -------
    numpy.ndarray
        Real, non-negative float64 array; ``φ̂[0, 0] = 1`` for a normalised pre-convolution kernel.
    """
    su, sc = _variances(svar, tvar, template_matched)
    if not (np.isfinite(su) and np.isfinite(sc)) or su < 0 or sc < 0 or su + sc <= 0:
        raise BadInputError(f"Decorrelation needs finite, non-negative variances, got svar={svar}, tvar={tvar}.")
    ksum = float(np.sum(kernel_image))
    if not su + sc * ksum * ksum > 0:
        # The whitened noise level σ²_u + σ²_c κ_sum² is 0: φ̂(0) = 0/0, the filter is undefined (NaN everywhere
        # the kernel has no power). Only a degenerate input gets here: a noiseless un-convolved image *and* a
        # kernel summing to zero.
        raise BadInputError(
            f"Decorrelation is undefined: the un-convolved image has zero variance (svar={svar}, tvar={tvar}) and "
            f"the PSF-matching kernel sums to {ksum:g}; check that neither input image is blank."
        )
    k2 = _power(kernel_image, shape, workers) if _kernel_power is None else _kernel_power
    ft = k2.dtype.type
    num = ft(su + sc * ksum * ksum)
    if preconv_kernel is None:
        den = k2 * ft(sc)
        den += ft(su)
        # σ²_u = 0 (noiseless un-convolved image) would make φ̂ a deconvolution, infinite where K̂ vanishes:
        # cap the gain at 10⁵.
        np.maximum(den, ft(1e-10 * num), out=den)
        np.divide(num, den, out=den)
        return np.sqrt(den, out=den)
    # |K̂|²/|P̂|² divides two spectra that both fall to round-off level at high frequency (a truncated PSF
    # stamp also has near-zeros in |P̂|² there), so the filter is written as num·|P̂|² / N(k) with the score's
    # noise power N = σ²_u|P̂|² + σ²_c|K̂|² floored at 1e-6 of N(0). Where the PSF has power this is the formula;
    # beyond, φ̂ rolls off smoothly to 0 (the score holds no signal there). A floor on |P̂|² alone (tried:
    # 1e-6) makes φ̂ jump back up near Nyquist when the template is the broader image, and that step rings:
    # alternating ±2σ columns 20 px into the score from a garbage column at the image edge.
    if k2.dtype != np.float64:
        k2 = _power(kernel_image, shape, workers)
    p = np.asarray(preconv_kernel, dtype=np.float64)
    p2 = _power(p / p.sum(), shape, workers)
    den = p2 * su
    den += k2 * sc
    den += _PREC_NOISE_FLOOR * float(num)
    p2 *= float(num)
    p2 /= den
    p2 /= p2[0, 0]  # φ̂(0) = 1 exactly (the floor alone would leave 1 − 10⁻⁶): fluxes are preserved
    return p2.astype(ft, copy=False)


def decorrelation_variance_factors(
    phi: np.ndarray,
    kernel_image: np.ndarray,
    shape: tuple[int, int],
    preconv_kernel: np.ndarray | None = None,
    *,
    workers: int = 2,
    _kernel_power: np.ndarray | None = None,
) -> tuple[float, float]:
    """``(mean|ĉ_u|², mean|ĉ_c|²)`` over the full frequency grid (= Σ c² in pixel space, by Parseval).

    ``ĉ_u = φ̂`` (or ``conj(P̂) φ̂``) multiplies the un-convolved image's variance, ``ĉ_c = K̂ φ̂`` the convolved one's.
    """
    k2 = _power(kernel_image, shape, workers) if _kernel_power is None else _kernel_power
    phi2 = phi * phi
    if preconv_kernel is None:
        mu = _full_mean(phi2, shape)
    else:
        p = np.asarray(preconv_kernel, dtype=np.float64)
        mu = _full_mean(phi2 * _power(p / p.sum(), shape, workers, dtype=phi.dtype), shape)
    phi2 *= k2
    return mu, _full_mean(phi2, shape)


def _local_factor_map(kappa: np.ndarray, svar: float, tvar: float, template_matched: bool, kernel_at: Any,
                      size: tuple[int, int], origin: tuple[int, int], n_grid: int, preconv_kernel,
                      workers: int, centre_factor: float) -> np.ndarray:
    """Variance factor ``mean|K̂(x, y) φ̂|²`` of the convolved image with the *local* kernel (and the centre
    filter φ̂) on an ``n_grid``² node grid, bilinear over ``size`` (float32).

    Parseval means do not depend on the FFT grid once it holds the filters, so a small one (4× the kernel) is
    used, and the nodes are scaled by ``centre_factor / mean|κ̂ φ̂|²`` so that the centre kernel gives exactly
    the caller's ``centre_factor`` (computed on the image's grid). A centre kernel without any power (κ ≡ 0,
    e.g. the degenerate fit to a blank template) has no such ratio — it would divide by zero — and needs none:
    the small-grid factors are then used as they are (0 where the local kernel is 0 too).
    """
    ny, nx = size
    m = int(2 ** math.ceil(math.log2(4 * max(kappa.shape))))
    small = (m, m)
    phi = decorrelation_kernel_fourier(kappa, svar, tvar, small, preconv_kernel, template_matched=template_matched,
                                       workers=workers)
    centre = decorrelation_variance_factors(phi, kappa, small, preconv_kernel, workers=workers)[1]
    scale = float(centre_factor) / centre if centre > 0 and math.isfinite(centre) else 1.0
    ys = np.linspace(0.0, ny - 1.0, max(1, min(n_grid, ny)))
    xs = np.linspace(0.0, nx - 1.0, max(1, min(n_grid, nx)))
    grid = np.empty((ys.size, xs.size), dtype=np.float32)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            k = kernel_image_at(kernel_at, origin[0] + x, origin[1] + y)
            grid[i, j] = decorrelation_variance_factors(phi, k, small, preconv_kernel, workers=workers)[1] * scale
    # Separable bilinear interpolation as two small matrix products (no per-pixel gathers); the nodes span
    # the whole image, so the hat weights never extrapolate.
    return ((_tent_matrix(ny, ys).astype(np.float32) @ grid) @ _tent_matrix(nx, xs).astype(np.float32).T)


def _filter(work: np.ndarray, phi: np.ndarray, shape: tuple[int, int], workers: int,
            size: tuple[int, int]) -> np.ndarray:
    """Filter ``work`` (finite, level-subtracted float32 on the FFT grid) with φ̂; the ``size`` corner."""
    spec = sfft.rfft2(work, s=shape, workers=workers, overwrite_x=True)
    spec *= phi.astype(np.float32, copy=False)
    # contiguous copy: a view would keep the whole padded grid alive
    return np.ascontiguousarray(sfft.irfft2(spec, s=shape, workers=workers, overwrite_x=True)[: size[0], : size[1]])


def _prepare(image: np.ndarray, shape: tuple[int, int] | None = None,
             invalid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Level-subtracted float32 copy, the mask of its non-finite pixels and the level.

    Non-finite pixels and ``invalid`` ones inside the image are set to the level (0); ``invalid`` rows and
    columns along the edges are replaced by the mirror image of the interior (:func:`_mirror_invalid_border`).

    The level is the median of the other pixels (of a strided subsample of at most ~10⁶ of them): a robust
    background value, so that the sources' flux does not leak across the zero-padded image edges. With
    ``shape`` the copy is written into the corner of a zero array of that shape (the FFT grid).
    """
    img = np.asarray(image)
    nonfinite = ~np.isfinite(img)
    bad = nonfinite if invalid is None else nonfinite | np.asarray(invalid, dtype=bool)
    level = 0.0
    if (~bad).any():
        stride = max(1, int(np.sqrt(img.size / 1e6)))
        sample = img[::stride, ::stride]
        sample = sample[~bad[::stride, ::stride]]
        level = float(np.median(sample)) if sample.size else float(np.mean(img[~bad], dtype=np.float64))
    work = np.zeros(img.shape if shape is None else shape, dtype=np.float32)
    view = work[: img.shape[0], : img.shape[1]]
    np.subtract(img, np.float32(level), out=view, casting="unsafe")
    fill = _mirror_invalid_border(view, bad) if invalid is not None and bad.any() else bad
    if fill.any():
        view[fill] = 0.0
    return work, nonfinite, level  # only non-finite pixels are restored; invalid ones are filtered like the rest


def _mirror_invalid_border(view: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Replace the rows and columns at the image edges that are entirely ``bad`` (a convolution's EDGE border)
    by the mirror image of the valid interior; returns the ``bad`` pixels left to fill (those inside it).

    The filter then sees a continuous image rather than a step to the background level at the border, which
    would move the residuals of stars near it (score χ² p95 of a 1024² scene 2.01 → 2.07)."""
    rows = np.flatnonzero(~bad.all(axis=1))
    cols = np.flatnonzero(~bad.all(axis=0))
    if rows.size < 2 or cols.size < 2:
        return bad
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (y0, y1, x0, x1) == (0, view.shape[0], 0, view.shape[1]):
        return bad
    inner = bad[y0:y1, x0:x1]
    core = np.where(inner, np.float32(0.0), view[y0:y1, x0:x1])
    view[...] = np.pad(core, ((y0, view.shape[0] - y1), (x0, view.shape[1] - x1)), mode="symmetric")
    fill = np.zeros_like(bad)
    fill[y0:y1, x0:x1] = inner
    return fill


def _restore(out: np.ndarray, original: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Put NaN / ±inf back where the input had them (LSST turns +inf into NaN only while filtering)."""
    if bad.any():
        out[bad] = np.asarray(original)[bad]
    return out


def _keep_non_finite(new_var: np.ndarray, diff_var: np.ndarray) -> None:
    """Where the difference's variance is NaN/inf (e.g. the unconvolvable border) keep it so (in place).

    The new variance is built from the input variance planes, which know nothing of such pixels.
    """
    bad = ~np.isfinite(diff_var)
    if bad.any():
        new_var[bad] = diff_var[bad]


# ----------------------------------------------------------------------------------------------------------
# Constant decorrelation
# ----------------------------------------------------------------------------------------------------------
def decorrelate_psf(
    psf_image: np.ndarray,
    kernel_image: np.ndarray,
    svar: float,
    tvar: float,
    *,
    template_matched: bool = True,
    preconv_kernel: np.ndarray | None = None,
    workers: int = 1,
) -> np.ndarray:
    """PSF of the decorrelated difference, ``φ ⊗ psf``, same shape as ``psf_image``, normalised to unit sum.

    φ̂ is evaluated on a grid of four times ``psf + kernel`` size (φ is compact; see the module notes).
    ``psf_image`` may also be a stack ``(n, ny, nx)`` of PSF images: φ̂ is then built once and all of them are
    filtered by one batched FFT (each normalised to unit sum).
    """
    psf = np.asarray(psf_image, dtype=np.float64)
    if psf.ndim not in (2, 3):
        raise BadInputError(f"decorrelate_psf needs a 2-D PSF image or a 3-D stack, got shape {psf.shape}.")
    pshape = psf.shape[-2:]
    shapes = [pshape, np.shape(kernel_image)] + ([np.shape(preconv_kernel)] if preconv_kernel is not None else [])
    ny = sum(s[0] for s in shapes)
    nx = sum(s[1] for s in shapes)
    shape = (sfft.next_fast_len(4 * ny, real=True), sfft.next_fast_len(4 * nx, real=True))
    phi = decorrelation_kernel_fourier(
        kernel_image, svar, tvar, shape, preconv_kernel, template_matched=template_matched, workers=workers
    )
    return _filter_psf_stack(psf, phi, shape, workers)


def _phi_lags(phi: np.ndarray, shape: tuple[int, int], pshape: tuple[int, int], workers: int = 1) -> np.ndarray:
    """The real-space φ of the periodic ``shape`` grid at the lags a PSF image of ``pshape`` can see.

    Filtering a ``pshape`` image on the grid and cropping back to ``pshape`` only uses φ at lags within
    ``±(pshape − 1)``; this ``(2·pny − 1, 2·pnx − 1)`` window (lag 0 at its centre) reproduces that result
    exactly with a small linear convolution.
    """
    pny, pnx = pshape
    c = sfft.irfft2(phi, s=shape, workers=workers)
    rows = np.arange(-(pny - 1), pny) % shape[0]
    cols = np.arange(-(pnx - 1), pnx) % shape[1]
    return c[np.ix_(rows, cols)]


def _filter_psf_stack(psf: np.ndarray, phi: np.ndarray, shape: tuple[int, int], workers: int,
                      lags: np.ndarray | None = None) -> np.ndarray:
    """``φ ⊗ psf`` for a PSF image or stack as filtering on the periodic ``shape`` grid gives it, unit sum.

    Computed exactly from the φ lags the PSF box can see (:func:`_phi_lags`) with an FFT about 3 PSF widths
    across instead of the 4·(PSF + kernel) grid φ̂ lives on.
    """
    single = psf.ndim == 2
    stack = psf[None] if single else psf
    pny, pnx = stack.shape[-2:]
    if lags is None:
        lags = _phi_lags(phi, shape, (pny, pnx), workers)
    fshape = (sfft.next_fast_len(3 * pny - 2, real=True), sfft.next_fast_len(3 * pnx - 2, real=True))
    spec = sfft.rfft2(stack, s=fshape, axes=(1, 2), workers=workers)
    spec *= sfft.rfft2(lags, s=fshape, workers=workers)
    full = sfft.irfft2(spec, s=fshape, axes=(1, 2), workers=workers)
    out = np.ascontiguousarray(full[:, pny - 1 : 2 * pny - 1, pnx - 1 : 2 * pnx - 1])
    s = out.sum(axis=(1, 2), keepdims=True)
    ok = (s != 0) & np.isfinite(s)
    out = np.where(ok, out / np.where(ok, s, 1.0), out)
    return out[0] if single else out


def _complete_variance(
    variance: np.ndarray, coeff_spec: np.ndarray, shape: tuple[int, int], workers: int
) -> np.ndarray:
    """``V ⊗ c²`` where ``ĉ = coeff_spec`` (kernel centred at the origin); V's non-finite pixels kept as is."""
    c = sfft.irfft2(coeff_spec, s=shape, workers=workers)
    c2 = c * c
    c2_spec = sfft.rfft2(c2, workers=workers)
    v, bad, mean = _prepare(variance)
    out = sfft.irfft2(sfft.rfft2(v, s=shape, workers=workers) * c2_spec, s=shape, workers=workers)
    out = out[: v.shape[0], : v.shape[1]] + mean * c2.sum()  # the level passes with gain Σc²
    return _restore(out.astype(np.float32), variance, bad)


def decorrelate(
    diff_image: np.ndarray,
    diff_variance: np.ndarray,
    kernel_image: np.ndarray,
    svar: float,
    tvar: float,
    *,
    template_matched: bool = True,
    preconv_kernel: np.ndarray | None = None,
    psf_image: np.ndarray | None = None,
    science_variance: np.ndarray | None = None,
    template_variance: np.ndarray | None = None,
    complete_variance: bool = False,
    workers: int = 2,
    kernel_at: Any = None,
    origin: tuple[int, int] = (0, 0),
    n_grid: int = 8,
    invalid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Decorrelate a difference image with a constant kernel (LSST ``DecorrelateALKernelTask`` §3.1 / §3.4).

    Parameters
    ----------
    diff_image, diff_variance
        The difference (or score) image and its variance plane.
    kernel_image
        The PSF-matching kernel κ at the image centre (un-normalised).
    svar, tvar
        Typical (clipped-mean) variances of the science and the un-convolved template.
    template_matched
        True if the template was convolved with κ, False if the science was. In the latter case the variance
        computed from the input planes is divided by ``κ_sum²`` as LSST does.
    preconv_kernel
        Pre-convolution kernel of the science (score-image mode); None for a plain difference.
    psf_image
        PSF of the difference at the centre; if given, its decorrelated version is returned.
    science_variance, template_variance
        Variance planes of the science and un-convolved template on the difference's grid. If given, the new
        variance is ``V_u·mean|ĉ_u|² + V_c·mean|ĉ_c|²`` as in LSST. If omitted, ``diff_variance`` is rescaled by
        the ratio of the decorrelated to the original noise variance predicted from ``svar``, ``tvar``
        (identical for uniform variance planes; ``template_matched`` then does not rescale by ``κ_sum²``).
    complete_variance
        Convolve the input variance planes with ``c²`` instead of using Parseval means (needs the planes).
    kernel_at, origin, n_grid
        A spatially varying matching kernel (anything :func:`kernel_image_at` accepts) and the parent
        coordinates of pixel (0, 0). The filter stays the centre one, but the convolved image's variance
        factor ``mean|K̂(x, y) φ̂|²`` is evaluated with the *local* kernel on an ``n_grid``² grid and
        interpolated bilinearly: where the kernel's noise gain Σκ² differs from the centre's (a kernel that
        deconvolves part of the field), a constant factor misstates the noise there (measured: 1.5× in a
        corner). Only with the variance planes and without ``complete_variance``.
    invalid
        Pixels that hold no valid difference (EDGE, NO_DATA): their values are not used — a border of them is
        replaced by the mirrored interior, others by the background level — because the filter would spread
        whatever they hold (garbage from a convolution's border, a bad edge column) over its whole extent (a
        pre-convolution score's filter rings at the Nyquist frequency: ±2σ columns 20 px into the image were
        measured). Their output values are the filtered replacements.

    Returns
    -------
    image, variance, psf
        float32 decorrelated image and variance (non-finite input pixels restored), and the decorrelated PSF
        (unit sum) or None.
    """
    img = np.asarray(diff_image)
    var = np.asarray(diff_variance)
    if img.ndim != 2 or img.shape != var.shape:
        raise BadInputError(f"Difference image {img.shape} and variance {var.shape} must be 2-D and of one shape.")
    kappa = np.asarray(kernel_image, dtype=np.float64)
    ksum = float(kappa.sum())
    su, sc = _variances(svar, tvar, template_matched)
    if su > 0 and sc / su > 1e8:
        _log.warning("Decorrelation: convolved-image variance is %.3g times the other one; results unreliable.",
                     sc / su)
    shape = decorrelation_fft_shape(
        img.shape, kappa.shape,
        None if psf_image is None else np.shape(psf_image),
        None if preconv_kernel is None else np.shape(preconv_kernel),
    )
    k2 = _power(kappa, shape, workers, dtype=np.float32)
    phi = decorrelation_kernel_fourier(kappa, svar, tvar, shape, preconv_kernel,
                                       template_matched=template_matched, workers=workers, _kernel_power=k2)

    work, bad, mean = _prepare(img, shape, invalid)
    out = _filter(work, phi, shape, workers, img.shape)
    del work
    out += np.float32(mean)
    out = _restore(out.astype(np.float32, copy=False), img, bad)

    mu, mc = decorrelation_variance_factors(phi, kappa, shape, preconv_kernel, workers=workers, _kernel_power=k2)
    if science_variance is not None and template_variance is not None:
        v_u, v_c = (science_variance, template_variance) if template_matched else (template_variance, science_variance)
        v_u = np.asarray(v_u)
        v_c = np.asarray(v_c)
        if v_u.shape != img.shape or v_c.shape != img.shape:
            raise BadInputError(
                f"Science/template variance planes {v_u.shape}, {v_c.shape} must match the difference {img.shape}."
            )
        if complete_variance:
            p_hat = 1.0
            if preconv_kernel is not None:
                p = np.asarray(preconv_kernel, dtype=np.float64)
                p_hat = np.conj(sfft.rfft2(pad_center_origin(p / p.sum(), shape), workers=workers))
            k_hat = sfft.rfft2(pad_center_origin(kappa, shape), workers=workers)
            new_var = _complete_variance(v_u, p_hat * phi, shape, workers) + _complete_variance(
                v_c, k_hat * phi, shape, workers
            )
        else:
            new_var = v_u.astype(np.float32) * np.float32(mu)
            factor: np.ndarray | np.float32 = np.float32(mc)
            if kernel_at is not None and not isinstance(kernel_at, np.ndarray):
                factor = _local_factor_map(kappa, svar, tvar, template_matched, kernel_at, img.shape, origin,
                                           n_grid, preconv_kernel, workers, mc)
            new_var += v_c.astype(np.float32, copy=False) * factor
        if not template_matched:
            if ksum == 0:
                raise BadInputError(_ZERO_SUM_SCIENCE_KERNEL.format(where=""))
            new_var /= np.float32(ksum * ksum)
    else:
        if complete_variance:
            raise BadInputError("complete_variance=True needs science_variance and template_variance planes.")
        psum2 = 1.0
        if preconv_kernel is not None:
            p = np.asarray(preconv_kernel, dtype=np.float64)
            psum2 = float(((p / p.sum()) ** 2).sum())
        before = su * psum2 + sc * float((kappa * kappa).sum())
        ratio = (su * mu + sc * mc) / before
        new_var = (var * np.float32(ratio)).astype(np.float32)

    _keep_non_finite(new_var, var)

    psf_out = None
    if psf_image is not None:
        psf_out = decorrelate_psf(psf_image, kappa, svar, tvar, template_matched=template_matched,
                                  preconv_kernel=preconv_kernel)
    return out, new_var, psf_out


# ----------------------------------------------------------------------------------------------------------
# Spatially varying decorrelation
# ----------------------------------------------------------------------------------------------------------
def _grid_nodes(n: int, step: int) -> np.ndarray:
    """Integer node positions ``0 … n−1`` (both ends included) spaced by at most ``step``."""
    if n <= 1:
        return np.zeros(1, dtype=np.intp)
    count = max(2, math.ceil((n - 1) / max(int(step), 1)) + 1)
    return np.unique(np.round(np.linspace(0, n - 1, count)).astype(np.intp))


def _segments(nodes: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For positions ``x`` and ≥ 2 increasing ``nodes``: the interval ``j`` (nodes ``j``, ``j + 1``; the outer
    intervals extended) and the fraction ``t`` along it, the nodes' hat weights being ``1 − t`` and ``t``."""
    nodes = np.asarray(nodes, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    j = np.clip(np.searchsorted(nodes, x, side="right") - 1, 0, nodes.size - 2)
    return j, (x - nodes[j]) / (nodes[j + 1] - nodes[j])


def _tent_matrix(n: int, nodes: np.ndarray) -> np.ndarray:
    """``(n, len(nodes))`` bilinear (hat-function) weights of every pixel on the nodes; rows sum to 1."""
    w = np.zeros((n, nodes.size))
    if nodes.size == 1:
        w[:, 0] = 1.0
        return w
    j, t = _segments(nodes, np.arange(n, dtype=np.float64))
    w[np.arange(n), j] = 1.0 - t
    w[np.arange(n), j + 1] = t
    return w


def _local_value(value: Any, ignore: np.ndarray | None, yc: int, xc: int, half: int) -> float:
    """Clipped mean of a 2-D ``value`` in a window around ``(yc, xc)``, or the scalar ``value``."""
    if np.ndim(value) == 0:
        return float(value)
    ny, nx = np.shape(value)
    sl = (slice(max(0, yc - half), min(ny, yc + half + 1)), slice(max(0, xc - half), min(nx, xc + half + 1)))
    v = clipped_mean(np.asarray(value)[sl], None if ignore is None else np.asarray(ignore)[sl])
    if not np.isfinite(v):  # window fully masked: fall back to the whole plane
        v = clipped_mean(value, ignore)
    return v


@dataclass(frozen=True)
class DecorrelationNodes:
    """The grid a spatially varying decorrelation filter was built on.

    ``x`` and ``y`` are the node axes in parent pixels (increasing); node ``(i, j)`` at ``(x[j], y[i])`` holds
    the matching kernel ``kernels[i, j]`` and the local mean variances ``svar[i, j]``, ``tvar[i, j]`` of science
    and template its filter φ was computed from. Between nodes the filtered images are blended with the
    bilinear weights of :meth:`weights`, so a point source there responds with the same blend of the node
    filters (what :class:`~diffim.decorrelated_psf.DecorrelatedPsf` evaluates).
    """

    x: np.ndarray
    y: np.ndarray
    kernels: np.ndarray
    svar: np.ndarray
    tvar: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.y.size), int(self.x.size)

    def weights(self, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Bilinear weights of positions ``x, y`` (arrays, parent pixels) on the nodes: a list of up to four
        ``(i, j, w)`` arrays (node row, node column, weight), the weights summing to 1 per position. Positions
        beyond the outer nodes take the outer nodes' values, as the image blend does at its edges."""

        def axis(nodes: np.ndarray, v: np.ndarray):
            v = np.asarray(v, dtype=np.float64)
            if nodes.size == 1:
                z = np.zeros(v.shape, dtype=np.intp)
                return z, z, np.zeros(v.shape)
            k, t = _segments(nodes, v)
            return k, k + 1, np.clip(t, 0.0, 1.0)

        ia, ib, ty = axis(np.asarray(self.y, float), y)
        ja, jb, tx = axis(np.asarray(self.x, float), x)
        return [(ia, ja, (1 - ty) * (1 - tx)), (ia, jb, (1 - ty) * tx), (ib, ja, ty * (1 - tx)), (ib, jb, ty * tx)]


def spatial_decorrelation_nodes(
    kernel: Any,
    science_variance: np.ndarray | float,
    template_variance: np.ndarray | float,
    shape: tuple[int, int],
    *,
    xy0: tuple[int, int] = (0, 0),
    cell_step: int = 256,
    cell_size: int | None = None,
    science_ignore: np.ndarray | None = None,
    template_ignore: np.ndarray | None = None,
) -> DecorrelationNodes:
    """The nodes of :func:`decorrelate_spatial` for an image of ``shape``: positions spaced by at most
    ``cell_step`` (both edges included), the kernel there and the clipped-mean variances in a ``cell_size``
    window (default ``cell_step``). Arguments as in :func:`decorrelate_spatial`."""
    ny, nx = int(shape[0]), int(shape[1])
    x0, y0 = int(xy0[0]), int(xy0[1])
    nodes_y = _grid_nodes(ny, cell_step)
    nodes_x = _grid_nodes(nx, cell_step)
    half = (cell_step if cell_size is None else int(cell_size)) // 2
    kernels, sv, tv = [], np.zeros((nodes_y.size, nodes_x.size)), np.zeros((nodes_y.size, nodes_x.size))
    for i, yc in enumerate(nodes_y):
        row = []
        for j, xc in enumerate(nodes_x):
            row.append(kernel_image_at(kernel, x0 + int(xc), y0 + int(yc)))
            sv[i, j] = _local_value(science_variance, science_ignore, int(yc), int(xc), half)
            tv[i, j] = _local_value(template_variance, template_ignore, int(yc), int(xc), half)
        kernels.append(row)
    return DecorrelationNodes(x=(x0 + nodes_x).astype(np.float64), y=(y0 + nodes_y).astype(np.float64),
                              kernels=np.asarray(kernels, dtype=np.float64), svar=sv, tvar=tv)


def decorrelate_spatial(
    diff_image: np.ndarray,
    diff_variance: np.ndarray,
    kernel: Any,
    science_variance: np.ndarray | float,
    template_variance: np.ndarray | float,
    *,
    science_ignore: np.ndarray | None = None,
    template_ignore: np.ndarray | None = None,
    template_matched: bool = True,
    preconv_kernel: np.ndarray | None = None,
    psf_image: np.ndarray | Callable[[float, float], np.ndarray] | None = None,
    xy0: tuple[int, int] = (0, 0),
    cell_step: int = 256,
    cell_size: int | None = None,
    border: int | None = None,
    workers: int = 2,
    invalid: np.ndarray | None = None,
    nodes: DecorrelationNodes | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Decorrelate with a filter that follows the spatial variation of the kernel and of the noise.

    φ̂ is computed at the nodes of a grid (spacing ≤ ``cell_step``, nodes on the image edges) from the local kernel
    ``kernel_image(x, y)`` and the local clipped-mean variances of science and template in a ``cell_size`` window.
    Every rectangle between four nodes is filtered (with a ``border`` of real pixels around it, so there is no
    wrap-around) by the four corner filters, and the results are blended with bilinear weights. The output is a
    continuous function of position: no seams at rectangle boundaries.

    Parameters
    ----------
    diff_image, diff_variance
        Difference image and variance.
    kernel
        Constant kernel array or an object with ``kernel_image(x, y)`` in parent coordinates.
    science_variance, template_variance
        Variance planes (on the difference's grid) of science and un-convolved template, or scalars.
    science_ignore, template_ignore
        True where variance pixels are excluded from the local statistics (ignoreMaskPlanes).
    psf_image
        PSF of the difference (array, or callable of parent position); decorrelated at the image centre.
    xy0
        Parent position of ``diff_image[0, 0]``.
    cell_step, cell_size, border
        Node spacing, local-statistics window (default ``cell_step``) and filter border in pixels (default
        twice the kernel size, at least 16).
    invalid
        As in :func:`decorrelate`.
    nodes
        The grid from :func:`spatial_decorrelation_nodes` for these arguments, if the caller already has it
        (e.g. to build the difference's PSF from the same filters); computed here otherwise.

    Returns
    -------
    image, variance, psf
        As :func:`decorrelate`.
    """
    img = np.asarray(diff_image)
    var = np.asarray(diff_variance)
    if img.ndim != 2 or img.shape != var.shape:
        raise BadInputError(f"Difference image {img.shape} and variance {var.shape} must be 2-D and of one shape.")
    ny, nx = img.shape
    x0, y0 = int(xy0[0]), int(xy0[1])
    planes = np.ndim(science_variance) == 2 and np.ndim(template_variance) == 2
    for name, v in (("science_variance", science_variance), ("template_variance", template_variance)):
        if np.ndim(v) == 2 and np.shape(v) != img.shape:
            raise BadInputError(f"{name} of shape {np.shape(v)} must match the difference {img.shape}.")
    half = (cell_step if cell_size is None else int(cell_size)) // 2
    if nodes is None:
        nodes = spatial_decorrelation_nodes(kernel, science_variance, template_variance, img.shape, xy0=xy0,
                                            cell_step=cell_step, cell_size=cell_size,
                                            science_ignore=science_ignore, template_ignore=template_ignore)
    elif nodes.kernels.shape[:2] != nodes.shape:
        raise BadInputError(f"DecorrelationNodes: kernels {nodes.kernels.shape[:2]} do not match the grid "
                            f"{nodes.shape}.")
    nodes_y = np.round(nodes.y - y0).astype(np.intp)
    nodes_x = np.round(nodes.x - x0).astype(np.intp)

    k_centre = kernel_image_at(kernel, x0 + (nx - 1) / 2.0, y0 + (ny - 1) / 2.0)
    if border is None:
        border = max(16, 2 * max(k_centre.shape))
    b = int(border)
    span_y = int(np.diff(nodes_y).max()) + 1 if nodes_y.size > 1 else 1
    span_x = int(np.diff(nodes_x).max()) + 1 if nodes_x.size > 1 else 1
    tile = (sfft.next_fast_len(span_y + 2 * b, real=True), sfft.next_fast_len(span_x + 2 * b, real=True))

    # Per-node filters and variance factors.
    nyn, nxn = nodes_y.size, nodes_x.size
    mu = np.zeros((nyn, nxn))
    mc = np.zeros((nyn, nxn))
    ratio = np.zeros((nyn, nxn))
    inv_ksum2 = np.zeros((nyn, nxn))
    phis: dict[tuple[int, int], np.ndarray] = {}

    def node_filter(i: int, j: int) -> np.ndarray:
        if (i, j) in phis:
            return phis[(i, j)]
        yc, xc = int(nodes_y[i]), int(nodes_x[j])
        kap = nodes.kernels[i, j]
        sv, tv = float(nodes.svar[i, j]), float(nodes.tvar[i, j])
        k2 = _power(kap, tile, 1, dtype=np.float32)
        phi = decorrelation_kernel_fourier(kap, sv, tv, tile, preconv_kernel, template_matched=template_matched,
                                           _kernel_power=k2)
        a, c = decorrelation_variance_factors(phi, kap, tile, preconv_kernel, _kernel_power=k2)
        su, sc = _variances(sv, tv, template_matched)
        psum2 = 1.0
        if preconv_kernel is not None:
            p = np.asarray(preconv_kernel, dtype=np.float64)
            psum2 = float(((p / p.sum()) ** 2).sum())
        mu[i, j], mc[i, j] = a, c
        ratio[i, j] = (su * a + sc * c) / (su * psum2 + sc * float((kap * kap).sum()))
        ks = float(kap.sum())
        if ks == 0 and not template_matched:
            raise BadInputError(_ZERO_SUM_SCIENCE_KERNEL.format(where=f" at ({x0 + xc}, {y0 + yc})"))
        # 1/κ_sum² only rescales a convolved science; a zero-sum kernel on the template needs none (and must
        # not divide by zero: a degenerate fit to a blank template gives κ ≡ 0).
        inv_ksum2[i, j] = 1.0 / (ks * ks) if ks != 0 else 0.0
        phis[(i, j)] = phi.astype(np.float32)
        return phis[(i, j)]

    work, bad, mean = _prepare(img, invalid=invalid)
    padded = np.pad(work, b)
    out = np.empty((ny, nx), dtype=np.float32)
    buf = np.zeros(tile, dtype=np.float32)
    n_quads_y = max(nyn - 1, 1)
    n_quads_x = max(nxn - 1, 1)
    for qi in range(n_quads_y):
        ia, ib = (qi, qi + 1) if nyn > 1 else (0, 0)
        ya, yb = int(nodes_y[ia]), int(nodes_y[ib])
        ylast = yb + 1 if qi == n_quads_y - 1 else max(yb, ya + 1)  # rows [ya, ylast) belong to this quad
        ty = (np.arange(ya, ylast) - ya) / max(yb - ya, 1)
        for key in [k for k in phis if k[0] < ia]:  # rows of nodes no longer needed
            del phis[key]
        for qj in range(n_quads_x):
            ja, jb = (qj, qj + 1) if nxn > 1 else (0, 0)
            xa, xb = int(nodes_x[ja]), int(nodes_x[jb])
            xlast = xb + 1 if qj == n_quads_x - 1 else max(xb, xa + 1)
            tx = (np.arange(xa, xlast) - xa) / max(xb - xa, 1)
            h, w = ylast - ya + 2 * b, xlast - xa + 2 * b
            buf[...] = 0.0
            buf[:h, :w] = padded[ya : ya + h, xa : xa + w]
            spec = sfft.rfft2(buf, workers=workers)
            acc = np.zeros((ylast - ya, xlast - xa), dtype=np.float32)
            corners = ((ia, ja, 1 - ty, 1 - tx), (ia, jb, 1 - ty, tx), (ib, ja, ty, 1 - tx), (ib, jb, ty, tx))
            if nyn == 1 and nxn == 1:
                corners = corners[:1]
            for ci, cj, wy, wx in corners:
                if (nyn == 1 and ci != ia) or (nxn == 1 and cj != ja):
                    continue
                filt = sfft.irfft2(spec * node_filter(ci, cj), s=tile, workers=workers)
                acc += filt[b : b + ylast - ya, b : b + xlast - xa] * np.outer(wy, wx).astype(np.float32)
            out[ya:ylast, xa:xlast] = acc
    out += np.float32(mean)
    out = _restore(out, img, bad)

    # Variance: bilinear blend of the per-node factors (hat weights are exactly the image blending weights).
    for i in range(nyn):  # make sure every node was evaluated (degenerate 1-node axes)
        for j in range(nxn):
            if mu[i, j] == 0 and mc[i, j] == 0:
                node_filter(i, j)
    wy_full, wx_full = _tent_matrix(ny, nodes_y), _tent_matrix(nx, nodes_x)

    def blend(grid: np.ndarray) -> np.ndarray:
        return (wy_full @ grid @ wx_full.T).astype(np.float32)

    if planes:
        v_u, v_c = (science_variance, template_variance) if template_matched else (template_variance, science_variance)
        new_var = np.asarray(v_u, dtype=np.float32) * blend(mu) + np.asarray(v_c, dtype=np.float32) * blend(mc)
        if not template_matched:
            new_var *= blend(inv_ksum2)
    else:
        new_var = var.astype(np.float32) * blend(ratio)

    _keep_non_finite(new_var, var)

    psf_out = None
    if psf_image is not None:
        xc, yc = x0 + (nx - 1) / 2.0, y0 + (ny - 1) / 2.0
        p_img = psf_image(xc, yc) if callable(psf_image) else psf_image
        ic, jc = ny // 2, nx // 2
        sv = _local_value(science_variance, science_ignore, ic, jc, half)
        tv = _local_value(template_variance, template_ignore, ic, jc, half)
        psf_out = decorrelate_psf(p_img, k_centre, sv, tv, template_matched=template_matched,
                                  preconv_kernel=preconv_kernel)
    return out, new_var, psf_out
