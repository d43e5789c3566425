"""Linear PSF-model photometry at fixed positions, vectorised over sources (cf. meas_base ``PsfFlux``).

For each position the PSF image ``P`` (unit sum, shifted to the sub-pixel position) is fitted to the data ``D``
by unweighted linear least squares: ``flux = ΣPD/ΣP²``, ``err = √(ΣP²V)/ΣP²``. The same function serves the
difference image (``psfFlux``) and forced photometry on the science and template (``scienceFlux``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..model.psf import Psf
from ._stamps import chunks, gather_stamps, psf_image_stack

__all__ = ["PsfFluxResult", "psf_flux"]


@dataclass
class PsfFluxResult:
    """Per-source PSF-flux results (arrays of shape ``(n,)``); also readable as ``result["flux"]``.

    Attributes
    ----------
    flux, flux_err
        Instrumental flux and its 1σ error (image units × pixels).
    area
        Effective area ``(ΣP)²/ΣP²`` of the fitted PSF, pixels.
    chi2
        ``Σ(D − flux·P)²/V`` over the fitted pixels.
    npix
        Number of pixels fitted.
    flag, flag_edge, flag_noGoodPixels
        General failure; PSF box clipped by the image edge; no usable pixel.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    area: np.ndarray
    chi2: np.ndarray
    npix: np.ndarray
    flag: np.ndarray
    flag_edge: np.ndarray
    flag_noGoodPixels: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return getattr(self, name)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def as_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.keys()}


def psf_flux(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray | None,
    psf: Psf,
    x: np.ndarray,
    y: np.ndarray,
    bad_mask: int = 0,
    *,
    xy0: tuple[int, int] = (0, 0),
) -> PsfFluxResult:
    """Fit the PSF amplitude at many fixed positions.

    Parameters
    ----------
    image, variance
        2-D arrays ``[y, x]``; the variance in image units squared.
    mask
        Integer mask array of the same shape, or None.
    psf
        PSF model of ``image`` (evaluated at each position if it varies).
    x, y
        Parent pixel positions (scalars or arrays of shape ``(n,)``).
    bad_mask
        Bit mask of planes whose pixels are excluded from the fit (LSST ``badMaskPlanes``, default none).
    xy0
        Parent coordinates of ``image[0, 0]``.

    Returns
    -------
    PsfFluxResult
        Arrays of shape ``(n,)``. Failed sources have NaN flux and ``flag`` set; nothing raises per source.

    Notes
    -----
    Fit region = PSF bbox ∩ image bbox, minus ``bad_mask`` pixels and pixels with non-finite data or
    variance (LSST would return a non-finite result; dropping them keeps the estimate usable). A clipped
    PSF bbox sets ``flag`` and ``flag_edge`` but is still measured with the clipped (not renormalised) PSF,
    as meas_base does. The estimate is unbiased for any fixed ``P``; it is optimal for sky-limited noise.
    """
    mask = getattr(mask, "array", mask)  # a diffim Mask or a plain integer array
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    n = len(x)
    out = PsfFluxResult(
        flux=np.full(n, np.nan),
        flux_err=np.full(n, np.nan),
        area=np.full(n, np.nan),
        chi2=np.full(n, np.nan),
        npix=np.zeros(n, dtype=np.int64),
        flag=np.zeros(n, dtype=bool),
        flag_edge=np.zeros(n, dtype=bool),
        flag_noGoodPixels=np.zeros(n, dtype=bool),
    )
    if n == 0:
        return out
    finite_pos = np.isfinite(x) & np.isfinite(y)
    out.flag[~finite_pos] = True
    out.flag_noGoodPixels[~finite_pos] = True
    idx_all = np.nonzero(finite_pos)[0]
    if len(idx_all) == 0:
        return out
    # The PSF stamp size is known after evaluating one image; budget chunks on it.
    probe, _, _ = psf_image_stack(psf, x[idx_all[:1]], y[idx_all[:1]])
    per = probe.shape[1] * probe.shape[2]
    for sl in chunks(len(idx_all), per):
        idx = idx_all[sl]
        p, bx0, by0 = psf_image_stack(psf, x[idx], y[idx])
        ny, nx = p.shape[1:]
        lx0, ly0 = bx0 - xy0[0], by0 - xy0[1]
        d, inside = gather_stamps(image, lx0, ly0, ny, nx, fill=0)
        v, _ = gather_stamps(variance, lx0, ly0, ny, nx, fill=0)
        d = d.astype(float)
        v = v.astype(float)
        good = inside & np.isfinite(d) & np.isfinite(v)
        if mask is not None and bad_mask:
            m, _ = gather_stamps(mask, lx0, ly0, ny, nx, fill=0)
            good &= (m & bad_mask) == 0
        edge = ~inside.all(axis=(1, 2))
        pg = np.where(good, p, 0.0)
        d = np.where(good, d, 0.0)
        v = np.where(good, v, 0.0)
        npix = good.sum(axis=(1, 2))
        sp = pg.sum(axis=(1, 2))
        spp = (pg * pg).sum(axis=(1, 2))
        spd = (pg * d).sum(axis=(1, 2))
        sppv = (pg * pg * v).sum(axis=(1, 2))
        ok = (npix > 0) & (spp > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            flux = np.where(ok, spd / spp, np.nan)
            err = np.where(ok, np.sqrt(sppv) / spp, np.nan)
            area = np.where(ok, sp * sp / spp, np.nan)
            resid = d - flux[:, None, None] * pg
            use = good & (v > 0)
            chi2 = np.where(use, resid * resid / np.where(v > 0, v, 1.0), 0.0).sum(axis=(1, 2))
        chi2 = np.where(ok, chi2, np.nan)
        bad_result = ~(np.isfinite(flux) & np.isfinite(err))
        out.flux[idx] = flux
        out.flux_err[idx] = err
        out.area[idx] = area
        out.chi2[idx] = chi2
        out.npix[idx] = npix
        out.flag_edge[idx] = edge
        out.flag_noGoodPixels[idx] = ~ok
        out.flag[idx] = edge | ~ok | bad_result
    return out
