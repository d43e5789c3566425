"""PSFEx ``.psf`` files: reading (and writing, for tests and interchange).

A PSFEx file holds, in its ``PSF_DATA`` binary-table extension, one row with a ``PSF_MASK`` cube of
``PSFAXIS3`` basis images of ``PSFAXIS1 × PSFAXIS2`` pixels sampled every ``PSF_SAMP`` image pixels, and header
cards describing the polynomial in the image position:

* ``POLNAXIS`` (0 for a constant PSF, else 2), ``POLNAME1/2`` = ``X_IMAGE``/``Y_IMAGE`` (1-based pixel
  coordinates), ``POLZERO1/2``, ``POLSCAL1/2`` (``u = (X_IMAGE − POLZERO1)/POLSCAL1``), ``POLDEG1`` (total
  degree, one group), ``PSF_FWHM`` (image pixels), ``PSF_SAMP``.
* The basis images are ordered like the monomials ``u^p v^q`` with ``u`` running fastest
  (``1, u, u², v, uv, v²`` for degree 2) and centred on pixel ``PSFAXIS//2`` (0-based).

:func:`read_psfex` resamples each basis image from the ``PSF_SAMP`` grid onto the image pixel grid once, with
cubic-spline interpolation (the PSFEx model is already the pixel-convolved PSF, so point sampling is right),
and returns a :class:`PsfexPsf`, a :class:`~diffim.psf.varying.PixelBasisPsf` whose polynomial uses parent
coordinates.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

from ..errors import InputFileNotFoundError, PsfError
from ..model.psf import register_psf_type
from .varying import PixelBasisPsf, polynomial_powers

__all__ = ["PsfexPsf", "read_psfex", "write_psfex", "resample_basis"]


def resample_basis(basis: np.ndarray, samp: float) -> np.ndarray:
    """Resample basis images ``(n, N, N)`` sampled every ``samp`` image pixels onto the image pixel grid.

    The output is odd-sized, centred on its middle pixel, and covers the input's extent.
    """
    basis = np.asarray(basis, dtype=float)
    if samp == 1.0:
        if basis.shape[1] % 2 and basis.shape[2] % 2:
            return basis.copy()
    n, ny, nx = basis.shape
    cy, cx = ny // 2, nx // 2
    hy = int(np.floor(min(cy, ny - 1 - cy) * samp + 1e-9))
    hx = int(np.floor(min(cx, nx - 1 - cx) * samp + 1e-9))
    h = max(1, min(hx, hy))
    d = np.arange(-h, h + 1, dtype=float)
    yy, xx = np.meshgrid(cy + d / samp, cx + d / samp, indexing="ij")
    coords = np.array([yy, xx])
    out = np.empty((n, 2 * h + 1, 2 * h + 1))
    for k in range(n):
        out[k] = ndimage.map_coordinates(basis[k], coords, order=3, mode="constant", cval=0.0)
    return out


@register_psf_type
class PsfexPsf(PixelBasisPsf):
    """A PSFEx model on the image pixel grid (see the module docstring).

    Parameters are those of :class:`~diffim.psf.varying.PixelBasisPsf`, plus ``psf_fwhm`` (PSFEx's
    ``PSF_FWHM``, image pixels) and ``psf_samp`` (the original ``PSF_SAMP``), kept for reference.
    """

    psf_type = "PSFEX"

    def __init__(self, basis, degree, x_offset=0.0, y_offset=0.0, x_scale=1.0, y_scale=1.0,
                 average_position=None, psf_fwhm: float | None = None, psf_samp: float = 1.0,
                 valid_box=None) -> None:
        super().__init__(basis, degree, x_offset, y_offset, x_scale, y_scale, average_position, valid_box)
        self.psf_fwhm = None if psf_fwhm is None else float(psf_fwhm)
        self.psf_samp = float(psf_samp)

    def to_fits_hdus(self) -> list:
        hdus = super().to_fits_hdus()
        h = hdus[0].header
        if self.psf_fwhm is not None:
            h["PSF_FWHM"] = self.psf_fwhm
        h["PSF_SAMP"] = (self.psf_samp, "original PSFEx sampling (basis is resampled)")
        return hdus

    @classmethod
    def from_fits_hdus(cls, hdus: list) -> "PsfexPsf":
        args = cls._read_args(hdus)
        h = hdus[0].header
        return cls(**args, psf_fwhm=h.get("PSF_FWHM"), psf_samp=float(h.get("PSF_SAMP", 1.0)))


def read_psfex(path: str | os.PathLike, *, xy0: tuple[int, int] = (0, 0)) -> PsfexPsf:
    """Read a PSFEx ``.psf`` file.

    Parameters
    ----------
    path
        The ``.psf`` file.
    xy0
        Parent coordinates of the first pixel of the image PSFEx was run on (PSFEx positions are 1-based
        positions in that image).

    Raises
    ------
    InputFileNotFoundError
        The file does not exist.
    PsfError
        Not FITS, no ``PSF_DATA`` extension, missing cards, or a ``PSF_MASK`` inconsistent with the polynomial.
    """
    from astropy.io import fits

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputFileNotFoundError(f"{path}: PSFEx file not found; check the path.")
    try:
        with fits.open(path, memmap=False) as hdul:
            if "PSF_DATA" not in [h.name for h in hdul]:
                raise PsfError(f"{path}: no PSF_DATA extension; this is not a PSFEx .psf file.")
            hdu = hdul["PSF_DATA"]
            header = hdu.header.copy()
            cube = np.array(hdu.data["PSF_MASK"][0], dtype=float)
    except PsfError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PsfError(f"{path}: cannot read the PSFEx file ({msg}); check that it is a complete PSFEx .psf file.") from None
    return _from_header(header, cube, path, xy0)


def _from_header(header, cube: np.ndarray, path: str, xy0: tuple[int, int]) -> PsfexPsf:
    def card(key, default=None):
        if key in header:
            return header[key]
        if default is not None:
            return default
        raise PsfError(f"{path}: the PSF_DATA header lacks the {key} card; not a valid PSFEx file.")

    naxis = int(card("POLNAXIS"))
    if cube.ndim == 2:
        cube = cube[None]
    if cube.ndim != 3:
        raise PsfError(f"{path}: PSF_MASK has shape {cube.shape}; expected (n_terms, ny, nx).")
    if naxis == 0:
        degree, xo, yo, xs, ys = 0, 0.0, 0.0, 1.0, 1.0
    elif naxis == 2:
        names = (str(card("POLNAME1")).strip(), str(card("POLNAME2")).strip())
        if names != ("X_IMAGE", "Y_IMAGE") or int(card("POLNGRP", 1)) != 1:
            raise PsfError(
                f"{path}: PSFEx polynomial in {names} with {card('POLNGRP', 1)} groups is not supported; "
                "re-run PSFEx with PSFVAR_KEYS X_IMAGE,Y_IMAGE and one group."
            )
        degree = int(card("POLDEG1"))
        # u = (X_IMAGE − POLZERO1)/POLSCAL1 with X_IMAGE = x_parent − x0 + 1.
        xo = float(card("POLZERO1")) - 1.0 + xy0[0]
        yo = float(card("POLZERO2")) - 1.0 + xy0[1]
        xs, ys = float(card("POLSCAL1")), float(card("POLSCAL2"))
    else:
        raise PsfError(f"{path}: POLNAXIS={naxis} is not supported (only 0 or 2).")
    n_terms = len(polynomial_powers(degree))
    if cube.shape[0] != n_terms:
        raise PsfError(
            f"{path}: PSF_MASK has {cube.shape[0]} basis images but a degree-{degree} polynomial needs {n_terms}."
        )
    if not np.all(np.isfinite(cube)):
        raise PsfError(f"{path}: PSF_MASK contains non-finite values.")
    samp = float(card("PSF_SAMP", 1.0))
    if not (np.isfinite(samp) and samp > 0):
        raise PsfError(f"{path}: PSF_SAMP={samp} is invalid; it must be > 0.")
    basis = resample_basis(cube, samp)
    fwhm = header.get("PSF_FWHM")
    return PsfexPsf(basis, degree, xo, yo, xs, ys, psf_fwhm=fwhm, psf_samp=samp)


def write_psfex(
    path: str | os.PathLike,
    basis: np.ndarray,
    *,
    degree: int,
    polzero: tuple[float, float] = (0.0, 0.0),
    polscal: tuple[float, float] = (1.0, 1.0),
    psf_samp: float = 1.0,
    psf_fwhm: float = 0.0,
) -> None:
    """Write ``basis`` (``(n_terms, N, N)``, PSFEx order, sampled every ``psf_samp`` pixels) as a PSFEx file.

    ``polzero``/``polscal`` are in PSFEx's 1-based ``X_IMAGE``/``Y_IMAGE`` coordinates.
    """
    from astropy.io import fits

    basis = np.asarray(basis, dtype=np.float32)
    n, ny, nx = basis.shape
    col = fits.Column(name="PSF_MASK", format=f"{n * ny * nx}E", dim=f"({nx},{ny},{n})", array=basis[None])
    hdu = fits.BinTableHDU.from_columns([col], name="PSF_DATA")
    h = hdu.header
    h["LOADED"], h["ACCEPTED"], h["CHI2"] = 100, 100, 1.0
    if degree > 0:
        h["POLNAXIS"] = 2
        h["POLGRP1"], h["POLNAME1"], h["POLZERO1"], h["POLSCAL1"] = 1, "X_IMAGE", polzero[0], polscal[0]
        h["POLGRP2"], h["POLNAME2"], h["POLZERO2"], h["POLSCAL2"] = 1, "Y_IMAGE", polzero[1], polscal[1]
        h["POLNGRP"], h["POLDEG1"] = 1, degree
    else:
        h["POLNAXIS"] = 0
    h["PSF_FWHM"], h["PSF_SAMP"] = psf_fwhm, psf_samp
    h["PSFNAXIS"], h["PSFAXIS1"], h["PSFAXIS2"], h["PSFAXIS3"] = 3, nx, ny, n
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(os.fspath(path), overwrite=True)
