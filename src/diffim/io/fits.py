"""Read and write :class:`~diffim.model.Exposure` objects as FITS files.

Two kinds of input are understood by :func:`read_exposure`:

* **LSST/afw multi-extension files** (``IMAGE``, ``MASK``, ``VARIANCE`` extensions, found by ``EXTNAME``, by
  afw's ``EXTTYPE`` card, or — for afw ``MaskedImage`` files written without names — by position 1, 2, 3), and
  any file written by :func:`write_exposure`. Mask planes are mapped **by name** through the ``MP_<name>``
  cards of the mask header; planes we do not know are registered. ``xy0`` comes from ``CRVAL1A/CRVAL2A``
  (afw's ``A`` WCS) or ``LTV1/LTV2`` (``x0 = -LTV1``).
* **Plain single-image FITS** from any telescope: the image is the primary HDU, or the first HDU with 2-D data.
  The variance comes from a separate image (``variance=``: a file path or an extension name), or is modelled
  from the gain and read noise (see :func:`read_exposure`).

The FITS layout written by :func:`write_exposure` is described in ``docs/io.md``. All WCS objects in memory map
0-based *parent* pixel coordinates to the sky; in files, as in afw, ``CRPIX`` refers to the stored array
(1-based), so ``CRPIX`` is shifted by ``xy0`` on read and back on write.

Every failure is reported as a :mod:`diffim.errors` exception with a one-line message naming the file.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from ..errors import (
    BadInputError,
    DiffimIOError,
    InputFileNotFoundError,
    MissingHduError,
    PsfError,
    ShapeMismatchError,
    WcsError,
)
from ..model.calib import NJY_AB_ZEROPOINT, PhotoCalib, VisitInfo
from ..model.exposure import Exposure, MaskedImage
from ..model.mask import DEFAULT_MASK_PLANES, Mask
from ..model.psf import ImagePsf, Psf, psf_type_registry, shift_image

__all__ = ["read_exposure", "write_exposure", "read_psf_file", "split_extension", "FORMAT_VERSION"]

log = logging.getLogger("diffim.io.fits")

#: Version of the layout written by :func:`write_exposure` (``DIFFIMV`` card of the primary header).
FORMAT_VERSION = 1

# Header cards that describe the structure of an HDU or its WCS; they are not copied into ``metadata``.
_STRUCTURAL = {
    "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT",
    "EXTNAME", "EXTTYPE", "EXTVER", "BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM", "INHERIT", "COMMENT",
    "HISTORY", "",
}
# Cards written by write_exposure from Exposure attributes (so they are not duplicated through metadata).
_OWN_CARDS = {
    "DIFFIMV", "EXPID", "BAND", "FILTER", "MJD-OBS", "EXPTIME", "AIRMASS", "VISIT", "DETECTOR", "PHOTCALM",
    "PHOTCALE", "LTV1", "LTV2", "CRVAL1A", "CRVAL2A", "CRPIX1A", "CRPIX2A", "CTYPE1A", "CTYPE2A", "CUNIT1A",
    "CUNIT2A", "NPSFHDU", "PSFHDU",
}
_ZEROPOINT_CARDS = ("MAGZP", "MAGZPT", "MAGZERO", "ZEROPT", "PHOTZP", "ZP")
_GAIN_CARDS = ("GAIN", "EGAIN", "CCDGAIN", "GAINEFF")
_READNOISE_CARDS = ("RDNOISE", "READNOIS", "RON", "READNOISE", "ENOISE")
_AFW_TYPES = ("IMAGE", "MASK", "VARIANCE")


# ----------------------------------------------------------------------------------------------------------
# Low-level helpers
# ----------------------------------------------------------------------------------------------------------
def _open(path: str | os.PathLike) -> fits.HDUList:
    """Open a FITS file (memory-mapped off: files are small enough and this avoids dangling maps)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputFileNotFoundError(f"{path}: file not found; check the path.")
    if os.path.isdir(path):
        raise BadInputError(f"{path}: is a directory, not a FITS file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
            for h in hdul:  # force reading so truncated data is detected here, with the file name
                _ = h.data
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise BadInputError(
            f"{path}: not a readable FITS file ({_one_line(exc)}); check that the file is complete and is FITS."
        ) from None
    if len(hdul) == 0:
        raise BadInputError(f"{path}: FITS file has no HDUs.")
    return hdul


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_image(hdu) -> bool:
    return isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)) and hdu.data is not None


def _hdu_names(hdul: fits.HDUList) -> list[str]:
    return [h.name or f"#{i}" for i, h in enumerate(hdul)]


def _find_hdu(hdul: fits.HDUList, key: str | int, path: str, what: str):
    """HDU by name (case-insensitive EXTNAME or EXTTYPE) or index; MissingHduError otherwise."""
    if isinstance(key, (int, np.integer)):
        if 0 <= key < len(hdul):
            return hdul[int(key)]
    else:
        want = str(key).upper()
        for h in hdul:
            if h.name.upper() == want:
                return h
        for h in hdul:
            if str(h.header.get("EXTTYPE", "")).strip().upper() == want:
                return h
    raise MissingHduError(
        f"{path}: no {what} HDU {key!r}; the file has HDUs {_hdu_names(hdul)}. Pass the right name/index."
    )


def _afw_layout(hdul: fits.HDUList) -> tuple[int, int | None, int | None] | None:
    """Indices ``(image, mask, variance)`` if ``hdul`` looks like an afw (Masked)Image/Exposure file."""
    idx: dict[str, int] = {}
    for i, h in enumerate(hdul):
        for label in (h.name.upper(), str(h.header.get("EXTTYPE", "")).strip().upper()):
            if label in _AFW_TYPES and label not in idx and _is_image(h):
                idx[label] = i
    if "IMAGE" in idx:
        return idx["IMAGE"], idx.get("MASK"), idx.get("VARIANCE")
    # afw MaskedImage written without EXTNAME: empty primary, then image, integer mask, variance.
    if (
        len(hdul) >= 4
        and hdul[0].data is None
        and all(_is_image(hdul[i]) and not hdul[i].name for i in (1, 2, 3))
        and hdul[1].data.shape == hdul[2].data.shape == hdul[3].data.shape
        and np.issubdtype(hdul[2].data.dtype, np.integer)
    ):
        return 1, 2, 3
    return None


def _image_data(hdu, path: str, what: str) -> np.ndarray:
    data = hdu.data
    if data is None:
        raise BadInputError(f"{path}: the {what} HDU {hdu.name or '(primary)'} has no data.")
    data = np.asarray(data)
    if data.ndim > 2:  # accept degenerate leading axes (e.g. NAXIS3 = 1 cubes)
        squeezed = data.reshape(data.shape[-2:]) if int(np.prod(data.shape[:-2])) == 1 else None
        if squeezed is None:
            raise BadInputError(f"{path}: the {what} HDU has shape {data.shape}; a 2-D image is needed.")
        data = squeezed
    if data.ndim != 2:
        raise BadInputError(f"{path}: the {what} HDU has shape {data.shape}; a 2-D image is needed.")
    if data.size == 0:
        raise BadInputError(f"{path}: the {what} HDU is empty (shape {data.shape}); nothing to process.")
    return data


def _as_float32(data: np.ndarray) -> np.ndarray:
    """Native-endian float32 copy (BZERO/BSCALE have already been applied by astropy)."""
    return np.ascontiguousarray(data, dtype=np.float32)


def _header_float(header, keys, path: str, what: str) -> float | None:
    for key in keys:
        if key in header:
            try:
                val = float(header[key])
            except (TypeError, ValueError):
                raise BadInputError(f"{path}: header card {key}={header[key]!r} is not a number ({what}).") from None
            return val
    return None


# ----------------------------------------------------------------------------------------------------------
# xy0 and WCS
# ----------------------------------------------------------------------------------------------------------
def _read_xy0(header) -> tuple[int, int]:
    if "CRVAL1A" in header and "CRVAL2A" in header and str(header.get("CTYPE1A", "LINEAR")).strip() == "LINEAR":
        return int(round(float(header["CRVAL1A"]))), int(round(float(header["CRVAL2A"])))
    if "LTV1" in header or "LTV2" in header:
        # IRAF's logical→physical offset is an xy0 only for an unrotated, unscaled integer shift (a cutout);
        # registration software also writes fractional LTV with a rotation LTM, which is not an origin.
        try:
            ltv = (float(header.get("LTV1", 0.0)), float(header.get("LTV2", 0.0)))
            ltm = [float(header.get(k, d)) for k, d in (("LTM1_1", 1.0), ("LTM2_2", 1.0), ("LTM1_2", 0.0), ("LTM2_1", 0.0))]
        except (TypeError, ValueError):
            return 0, 0
        if ltm == [1.0, 1.0, 0.0, 0.0] and all(v == round(v) for v in ltv):
            return int(-ltv[0]), int(-ltv[1])
    return 0, 0


def _read_wcs(header, xy0: tuple[int, int], path: str) -> WCS | None:
    """Celestial WCS of ``header`` mapping 0-based parent pixels to the sky, or None if there is none."""
    has_linear = any(k in header for k in ("CD1_1", "CD2_2", "PC1_1", "CDELT1"))
    if not has_linear or "CRVAL1" not in header:
        return None
    h = header.copy()
    for key in list(h.keys()):
        # Drop the afw xy0 'A' WCS and other alternates; they are not sky coordinates.
        if len(key) > 1 and key[-1] == "A" and key[:-1].rstrip("0123456789_").upper() in ("CRVAL", "CRPIX", "CTYPE", "CUNIT", "CDELT", "CD", "PC"):
            del h[key]
    ctype1 = str(h.get("CTYPE1", "")).strip()
    ctype2 = str(h.get("CTYPE2", "")).strip()
    if not ctype1 and not ctype2:
        # The LSST alert stamps (and some old headers) carry CD/PC matrices without CTYPE: assume TAN.
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
        h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
    elif not (ctype1.startswith(("RA", "GLON", "ELON")) or ctype2.startswith(("DEC", "GLAT", "ELAT"))):
        return None  # a linear/physical WCS, not celestial
    # SIP coefficients without A_ORDER (seen next to TPV) confuse wcslib: drop the unusable ones.
    if "A_ORDER" not in h:
        for key in [k for k in h.keys() if k[:2] in ("A_", "B_") or k[:3] in ("AP_", "BP_")]:
            del h[key]
    for key in ("CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CD1_1", "CD1_2", "CD2_1", "CD2_2", "PC1_1", "PC1_2",
                "PC2_1", "PC2_2", "CDELT1", "CDELT2"):
        if key not in h:
            continue
        try:
            value = float(h[key])
        except Exception:  # astropy raises VerifyError for unparsable values such as NaN
            value = float("nan")
        if not math.isfinite(value):
            raise WcsError(f"{path}: the WCS has non-finite or unparsable {key}; fix or remove the WCS cards.")
        h[key] = value
    try:
        crpix1 = float(h.get("CRPIX1", 0.0)) + xy0[0]
        crpix2 = float(h.get("CRPIX2", 0.0)) + xy0[1]
        h["CRPIX1"], h["CRPIX2"] = crpix1, crpix2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(h, naxis=2, relax=True, fix=True)
    except Exception as exc:  # astropy raises many types for bad WCS headers
        raise WcsError(f"{path}: cannot interpret the WCS ({_one_line(exc)}); fix or remove the WCS cards.") from None
    _check_wcs(wcs, path)
    return wcs


def _check_wcs(wcs: WCS, path: str) -> None:
    w = wcs.wcs
    mat = w.cd if w.has_cd() else w.get_pc() * w.cdelt[:, None]
    vals = np.concatenate([np.ravel(mat), np.ravel(w.crval), np.ravel(w.crpix)])
    if not np.all(np.isfinite(vals)):
        raise WcsError(f"{path}: the WCS has non-finite CRVAL/CRPIX/CD values; fix or remove the WCS cards.")
    if abs(np.linalg.det(mat)) == 0:
        raise WcsError(f"{path}: the WCS matrix is singular; fix or remove the WCS cards.")


def _wcs_cards(wcs: WCS, xy0: tuple[int, int]) -> fits.Header:
    """Header cards of ``wcs`` for an array whose first pixel is ``xy0`` (CRPIX relative to the array)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = wcs.to_header(relax=True)
    h["CRPIX1"] = wcs.wcs.crpix[0] - xy0[0]
    h["CRPIX2"] = wcs.wcs.crpix[1] - xy0[1]
    for key in ("DATE-OBS", "MJD-OBS", "DATEREF", "MJDREF"):
        h.remove(key, ignore_missing=True, remove_all=True)
    return h


def _xy0_cards(header: fits.Header, xy0: tuple[int, int]) -> None:
    """afw's cards: the 'A' WCS giving parent coordinates, and IRAF's LTV."""
    header["CRPIX1A"], header["CRPIX2A"] = 1.0, 1.0
    header["CRVAL1A"], header["CRVAL2A"] = xy0[0], xy0[1]
    header["CTYPE1A"], header["CTYPE2A"] = "LINEAR", "LINEAR"
    header["CUNIT1A"], header["CUNIT2A"] = "PIXEL", "PIXEL"
    header["LTV1"], header["LTV2"] = -xy0[0], -xy0[1]


# ----------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------
def _mask_planes_from_header(header) -> dict[str, int]:
    planes = {}
    for key, val in header.items():
        if key.startswith("MP_") and len(key) > 3:
            try:
                planes[key[3:]] = int(val)
            except (TypeError, ValueError):
                continue
    return planes


def _read_mask(hdu, path: str, shape: tuple[int, int]) -> Mask:
    data = _image_data(hdu, path, "mask")
    if data.shape != shape:
        raise ShapeMismatchError(f"{path}: mask shape {data.shape} differs from image shape {shape}.")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise BadInputError(f"{path}: the MASK HDU holds non-integer values; it cannot be a bit mask.")
    raw = np.asarray(data).astype(np.int64)
    file_planes = _mask_planes_from_header(hdu.header) or dict(DEFAULT_MASK_PLANES)
    out = Mask.zeros(shape)
    used = 0
    for name, bit in sorted(file_planes.items(), key=lambda kv: kv[1]):
        if not 0 <= bit < 63:
            continue
        used |= 1 << bit
        sel = (raw >> bit) & 1
        if sel.any() or name not in out.planes:
            out.array |= (sel.astype(np.int32) << out.add_plane(name)).astype(np.int32)
    stray = int(np.bitwise_or.reduce(raw.ravel() & ~used)) if raw.size else 0
    if stray:
        log.warning("%s: mask bits %s have no MP_ name card; they are dropped.", path, bin(stray))
    return out


# ----------------------------------------------------------------------------------------------------------
# PSF
# ----------------------------------------------------------------------------------------------------------
def _psf_from_image(data: np.ndarray, source: str) -> ImagePsf:
    k = np.asarray(data, dtype=float)
    if k.ndim != 2 or k.size == 0:
        raise PsfError(f"{source}: a PSF image must be 2-D, got shape {k.shape}.")
    if not np.all(np.isfinite(k)):
        raise PsfError(f"{source}: the PSF image contains non-finite values.")
    # Even-sized images are centred between pixels: pad to odd and shift by half a pixel onto the centre.
    dx = 0.5 if k.shape[1] % 2 == 0 else 0.0
    dy = 0.5 if k.shape[0] % 2 == 0 else 0.0
    if dx or dy:
        k = np.pad(k, ((0, int(dy > 0)), (0, int(dx > 0))))
        k = shift_image(k, dx, dy)
    if k.sum() == 0:
        raise PsfError(f"{source}: the PSF image sums to zero.")
    k = _crop_psf_image(k, source)
    return ImagePsf(k)


def _crop_psf_image(k: np.ndarray, source: str) -> np.ndarray:
    """Crop a PSF image much larger than its core (e.g. WebbPSF's 205×205 models of a 2.5-px PSF).

    An image whose half-width exceeds ``ceil(10 FWHM)`` is cropped about its centre pixel to the half-width
    ``h`` where the encircled energy in the ``(2h+1)²`` box reaches 99.5 % of the image total, clipped to
    ``[ceil(3 FWHM), ceil(10 FWHM)]``. Smaller images are returned unchanged. The FWHM is measured from the
    half-maximum area, ``2√(A/π)``. Huge kernels only slow every PSF-sized stamp (photometry, dipole fits,
    decorrelation) while the far wings carry a few per cent of the light that no diffim step can use.
    """
    peak = float(k.max())
    if not peak > 0:
        return k
    fwhm = 2.0 * math.sqrt(float((k >= 0.5 * peak).sum()) / math.pi)
    hmax = int(math.ceil(10.0 * fwhm))
    cy, cx = k.shape[0] // 2, k.shape[1] // 2
    if min(cy, cx) <= hmax:
        return k
    total = float(k.sum())
    yy, xx = np.indices(k.shape)
    cheb = np.maximum(np.abs(yy - cy), np.abs(xx - cx)).ravel()
    ee = np.cumsum(np.bincount(cheb, weights=k.ravel())) / total
    h_ee = int(np.argmax(ee >= 0.995)) if np.any(ee >= 0.995) else min(cy, cx)
    h = int(np.clip(h_ee, math.ceil(3.0 * fwhm), hmax))
    log.info("%s: PSF image %dx%d cropped to %dx%d (FWHM %.2f px; %.1f %% of its light kept).",
             source, k.shape[1], k.shape[0], 2 * h + 1, 2 * h + 1, fwhm, 100.0 * ee[min(h, ee.size - 1)])
    return k[cy - h : cy + h + 1, cx - h : cx + h + 1]


def _psf_from_hdus(hdul: fits.HDUList, start: int, path: str) -> Psf:
    """PSF persisted from HDU ``start`` on (``PSFTYPE`` card), or an :class:`ImagePsf` of a bare image."""
    first = hdul[start]
    ptype = first.header.get("PSFTYPE")
    if ptype is None:
        if not _is_image(first):
            raise PsfError(f"{path}: HDU {first.name or start} holds neither a PSF image nor a PSFTYPE card.")
        return _psf_from_image(first.data, f"{path}[{first.name or start}]")
    registry = psf_type_registry()
    if ptype not in registry:
        _import_psf_types()
        registry = psf_type_registry()
    if ptype not in registry:
        raise PsfError(f"{path}: unknown PSFTYPE {ptype!r}; known types are {sorted(registry)}.")
    n = int(first.header.get("NPSFHDU", 1))
    hdus = list(hdul[start : start + n])
    try:
        return registry[ptype].from_fits_hdus(hdus)
    except PsfError as exc:
        raise PsfError(f"{path}: cannot read the {ptype} PSF: {exc}") from None
    except Exception as exc:
        raise PsfError(f"{path}: cannot read the {ptype} PSF ({_one_line(exc)}); the PSF HDU is corrupt.") from None


def _import_psf_types() -> None:
    """Import the modules that register the spatially varying PSF classes."""
    import importlib

    for name in ("diffim.psf", "diffim.decorrelated_psf", "diffim.testing.psfs", "diffim.warp.psf", "diffim.zogy"):
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover - partial installs
            pass


def read_psf_file(path: str | os.PathLike, hdu: str | int | None = None) -> Psf:
    """Read a PSF from its own file: a PSFEx ``.psf`` file, a diffim PSF HDU, or a bare PSF image.

    Parameters
    ----------
    path
        File name.
    hdu
        Extension holding the PSF (default: the first HDU with a ``PSFTYPE`` card, PSFEx's ``PSF_DATA`` table,
        or the first image HDU).
    """
    path, hdu = _path_and_hdu(path, hdu)
    with _open(path) as hdul:
        if hdu is not None:
            h = _find_hdu(hdul, hdu, path, "PSF")
            return _psf_from_hdus(hdul, hdul.index(h), path)
        for i, h in enumerate(hdul):
            if "PSFTYPE" in h.header:
                return _psf_from_hdus(hdul, i, path)
        if any(h.name == "PSF_DATA" for h in hdul):
            from ..psf.psfex import read_psfex

            return read_psfex(path)
        for i, h in enumerate(hdul):
            if _is_image(h):
                return _psf_from_hdus(hdul, i, path)
    raise PsfError(f"{path}: no PSF found (no PSFTYPE card, PSF_DATA table or image HDU).")


def _resolve_psf(psf, hdul: fits.HDUList, path: str, image_index: int) -> Psf | None:
    if psf is None:
        for i, h in enumerate(hdul):
            if i != image_index and "PSFTYPE" in h.header:
                return _psf_from_hdus(hdul, i, path)
        return None
    if isinstance(psf, Psf):
        return psf
    if isinstance(psf, (int, np.integer)):
        h = _find_hdu(hdul, int(psf), path, "PSF")
        return _psf_from_hdus(hdul, hdul.index(h), path)
    if isinstance(psf, (str, os.PathLike)):
        name = os.fspath(psf)
        if split_extension(name)[1] is not None or _looks_like_path(name, hdul):
            return read_psf_file(name)
        h = _find_hdu(hdul, name, path, "PSF")
        return _psf_from_hdus(hdul, hdul.index(h), path)
    raise PsfError(f"psf= must be a Psf, an HDU name/index or a file path, got {type(psf).__name__}.")


_EXTENSION_SUFFIX = re.compile(r"^(?P<file>.+)\[(?P<ext>[^\[\]]+)\]$")


def split_extension(path: str | os.PathLike) -> tuple[str, str | int | None]:
    """``'file.fits[SCI]'`` → ``('file.fits', 'SCI')``, ``'file.fits[2]'`` → ``('file.fits', 2)``.

    The extension suffix of CFITSIO, DS9 and IRAF names one HDU of a multi-extension file (a CCD of a mosaic
    frame, the template stamp of an alert). A name without one, or a file that exists under the name as
    written (brackets and all), is returned whole with ``None``.
    """
    name = os.fspath(path)
    m = _EXTENSION_SUFFIX.match(name)
    if m is None or os.path.exists(name):
        return name, None
    ext = m["ext"].strip()
    return m["file"], int(ext) if ext.isdigit() else ext


def _path_and_hdu(path: str | os.PathLike, hdu: str | int | None) -> tuple[str, str | int | None]:
    """The file and HDU a ``path`` (maybe ``'file.fits[EXT]'``) and an ``hdu=`` argument ask for together."""
    path, ext = split_extension(path)
    if ext is None:
        return path, hdu
    if hdu is not None and hdu != ext:
        raise BadInputError(f"{path}: extension [{ext}] in the name and hdu={hdu!r} disagree; give one.")
    return path, ext


def _looks_like_path(name: str, hdul: fits.HDUList) -> bool:
    """A string argument names a file (rather than an extension) if it is not an extension name of ``hdul``."""
    if any(h.name.upper() == name.upper() for h in hdul):
        return False
    return os.path.exists(name) or os.sep in name or "." in name


# ----------------------------------------------------------------------------------------------------------
# Variance for plain images
# ----------------------------------------------------------------------------------------------------------
_KIND_WORDS = {
    "weight": ("WEIGHT", "WHT", "IVAR", "INVVAR", "INVERSEVARIANCE", "WT"),
    "sigma": ("NOISE", "SIGMA", "ERR", "ERROR", "RMS", "STD", "STDDEV", "UNC", "STDDEVUNCERTAINTY"),
    "variance": ("VAR", "VARIANCE", "VARIANCEUNCERTAINTY"),
}


def _infer_variance_kind(label: str, header) -> str:
    """``'variance'``, ``'weight'`` (1/var) or ``'sigma'`` (√var) from UTYPE/EXTNAME/file name words."""
    utype = str(header.get("UTYPE", "")).replace(" ", "").upper()
    for kind, words in _KIND_WORDS.items():
        if utype and utype in words:
            return kind
    text = (label + " " + str(header.get("EXTNAME", "")) + " " + str(header.get("BUNIT", ""))).upper()
    tokens = [t for t in "".join(c if c.isalnum() else " " for c in text).split() if t]
    for kind in ("weight", "sigma"):
        if any(t in _KIND_WORDS[kind] or any(t.startswith(w) for w in _KIND_WORDS[kind] if len(w) > 3) for t in tokens):
            return kind
    return "variance"


def _variance_from_kind(data: np.ndarray, kind: str) -> np.ndarray:
    """Variance (image units²) from a ``'variance'``, ``'weight'`` (1/var) or ``'sigma'`` (√var) map.

    Values that are not a noise level — ≤ 0 or non-finite, whatever the kind — become ``inf`` so that
    :func:`read_exposure` marks them ``NO_DATA``: weight 0 is the usual "no coverage" of a weight map, and a
    variance or σ of 0 (or below) is a defect of the map, never a pixel with infinite signal-to-noise.
    A float32 variance map stays float32 (no float64 copy of a large plane).
    """
    d = np.asarray(data)
    if not (kind == "variance" and d.dtype == np.float32):
        d = d.astype(np.float64, copy=False)
    usable = np.isfinite(d) & (d > 0)
    inf = d.dtype.type(np.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if kind == "variance":
            return np.where(usable, d, inf)
        if kind == "weight":
            return np.where(usable, 1.0 / np.where(usable, d, 1.0), inf)
        if kind == "sigma":
            return np.where(usable, d * d, inf)
    raise BadInputError(f"variance_kind must be 'variance', 'weight' or 'sigma', got {kind!r}.")


#: A variance/weight/σ map of which no more than this fraction of the finite values is > 0 is rejected as a
#: whole (see :func:`_check_variance_map`) instead of turning (nearly) the whole image into ``NO_DATA``.
_MIN_USABLE_VARIANCE_FRACTION = 0.01

#: How the kinds are called on the command line (``--variance-kind``), for messages.
_CLI_KIND = {"variance": "variance", "weight": "weight", "sigma": "noise"}


def _check_variance_map(data: np.ndarray, kind: str, source: str) -> None:
    """Raise :class:`BadInputError` if (nearly) all finite values of a variance/weight/σ map are ≤ 0.

    Such a map cannot be what it is read as (every kind must be > 0 where there is data): typically the wrong
    ``variance_kind``, or an image, a mask or a sky-subtracted frame passed as the variance. Without this check
    every pixel would silently become ``NO_DATA`` and the failure would surface much later, e.g. as too few
    usable stars. An all-NaN map is left to the all-non-finite check of :func:`read_exposure`.
    """
    d = np.asarray(data)
    finite = np.isfinite(d)
    n_finite = int(finite.sum())
    if n_finite == 0:
        return
    n_usable = int((finite & (d > 0)).sum())
    if n_usable > _MIN_USABLE_VARIANCE_FRACTION * n_finite:
        if n_usable < n_finite:  # e.g. the zero-weight border of a SWarp weight map: normal, but say so
            log.info("%s: %d pixels with %s <= 0 marked NO_DATA.", source, n_finite - n_usable, kind)
        return
    lo = float(np.min(d, where=finite, initial=np.inf))
    hi = float(np.max(d, where=finite, initial=-np.inf))
    frac = 100.0 * (n_finite - n_usable) / n_finite
    raise BadInputError(
        f"{source}: {frac:.4g} % of its finite values are <= 0 (range {lo:g} to {hi:g}), so it is no {kind} map "
        f"(a {kind} must be > 0 where there is data); check the file and its kind (read as --variance-kind "
        f"{_CLI_KIND.get(kind, kind)}): a sigma map needs --variance-kind noise, a weight map --variance-kind "
        "weight, and an image or a mask is no variance map."
    )


def _check_noise(image: np.ndarray, variance: np.ndarray, valid: np.ndarray, path: str, kind_used: str,
                 sigma_sky: float | None, require: bool) -> None:
    """Reject (``require``) or report an image that carries no measurable noise.

    Two cases, both fatal for a difference image:

    * the image is **flat** — every valid pixel holds one value (a fill value, a blank frame, a mask). It has
      neither stars nor noise, so a PSF-matching kernel fitted to it is singular (an all-NaN difference was
      measured for a flat template even with a positive variance from a gain);
    * its **variance is zero at every valid pixel** (modelled from an image without pixel noise and without a
      gain, or a zero variance plane): σ = 0 divides in the kernel fit and the decorrelation.

    A noiseless image is fine as long as its variance is not zero everywhere: ip_diffim's synthetic template
    has variance = image (0 on the empty sky, > 0 on the stars), and a noiseless image with a sky pedestal and
    a gain gets the pedestal's Poisson variance.

    Parameters
    ----------
    image, variance
        Image and variance planes as read (before non-finite pixels are filled).
    valid
        Pixels that hold data (finite image and variance, not ``NO_DATA``).
    path
        File name for the message.
    kind_used
        Where the variance came from: ``'model'`` (from the image and the gain), or the kind of a map/plane.
    sigma_sky
        Robust pixel σ measured by the variance model (None if the variance was read).
    require
        Raise :class:`BadInputError` if True; else log a warning (a flat frame can still be read for its
        header or used as a test pattern).
    """
    if not valid.any():
        return  # nothing valid at all: other checks (all-NaN image, coverage) speak for that
    lo = float(np.min(image, where=valid, initial=np.inf))
    hi = float(np.max(image, where=valid, initial=-np.inf))
    if lo == hi:
        msg = (
            f"{path}: the image is flat: every valid pixel is {lo:g}, so it holds no stars and no noise (a fill "
            "value, a blank frame or a mask?); give the real image."
        )
    elif not bool(np.any(variance > 0, where=valid)):
        if kind_used == "model":
            sig = "" if sigma_sky is None else f" (robust pixel sigma {sigma_sky:g})"
            what = f"the image shows no pixel noise{sig}, so its modelled variance is zero everywhere"
        else:
            what = f"its {kind_used} plane is zero at every valid pixel"
        msg = (
            f"{path}: {what}; a difference needs the image's noise: give a variance map (variance=, "
            "--science-variance/--template-variance) or the gain (GAIN card, --gain)."
        )
    else:
        return
    if require:
        raise BadInputError(msg)
    log.warning("%s", msg)


def _robust_sigma(image: np.ndarray) -> float:
    """Per-pixel noise σ of an image: the larger of two robust estimates.

    * the MAD of differences of horizontal neighbours / √2, insensitive to smooth structure but biased low
      by ``√(1 − ρ)`` when neighbouring pixels are correlated with coefficient ρ — and real images often are:
      resampled (SWarp, drizzle) frames and stacks of kernel-matched exposures (the DECam stacks of
      ``decam_sfft_decorr`` have ρ ≈ 0.5, so the differences give 5.7 ADU where the pixels scatter by 8.4);
    * the MAD of the pixels about a smooth background (medians of 64-pixel cells, interpolated), which
      measures the per-pixel scatter that the variance plane must describe whatever the correlations.
    """
    d = np.diff(image, axis=1)
    d = d[np.isfinite(d)]
    if d.size < 10:
        return 0.0
    if d.size > 2_000_000:  # a regular subsample is plenty for a robust scale
        d = d[:: d.size // 1_000_000]
    sigma_diff = float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))
    from ..psf.estimate import background_map  # lazy: psf imports nothing from io, but keep io light

    finite = np.isfinite(image)
    img = np.asarray(image, dtype=np.float32)
    r = (img - background_map(img, ~finite, cell=64))[finite]
    if r.size > 2_000_000:
        r = r[:: r.size // 1_000_000]
    sigma_pix = float(1.4826 * np.median(np.abs(r - np.median(r))))
    return max(sigma_diff, sigma_pix) if math.isfinite(sigma_pix) else sigma_diff


def model_variance(
    image: np.ndarray, gain: float | None, read_noise: float | None = None
) -> tuple[np.ndarray, dict[str, float]]:
    """Variance (image units²) of a plain image from the gain, read noise and the image itself.

    ``var = max(image − sky, 0)/gain + max(sky/gain + (rn/gain)², σ_sky²)`` where ``sky`` is the median of the
    finite pixels and ``σ_sky`` the robust pixel-to-pixel noise (MAD of neighbour differences / √2). The
    ``max`` keeps the sky term honest for sky-subtracted images, whose counts no longer show the Poisson
    sky; for raw images the two agree. Without a gain, ``var = σ_sky²`` everywhere.

    An image without pixel noise (flat, or noiseless without a sky pedestal) gets ``σ_sky = 0`` and, without a
    gain, zero variance everywhere; the model returns it as such and :func:`read_exposure` decides (its
    ``require_noise``) whether that is an error.
    """
    finite = np.isfinite(image)
    sky = float(np.median(image[finite])) if finite.any() else 0.0
    sigma_sky = _robust_sigma(image)  # differences touching a non-finite pixel are dropped inside
    info = {"sky": sky, "sigmaSky": sigma_sky}
    if gain is None:
        return np.full(image.shape, sigma_sky**2, dtype=np.float64), info
    rn = 0.0 if read_noise is None else float(read_noise)
    sky_var = max(max(sky, 0.0) / gain + (rn / gain) ** 2, sigma_sky**2)
    var = np.clip(np.where(finite, image, sky) - sky, 0, None) / gain + sky_var
    info.update(gain=gain, readNoise=rn, skyVariance=sky_var)
    return var, info


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------
def _external_or_hdu(arg, hdul: fits.HDUList, path: str, what: str):
    """``(data, header, label, source)`` for a ``variance=``/``mask=`` argument: array, file path or extension
    name. ``label`` feeds the variance-kind inference; ``source`` names the input in messages."""
    if isinstance(arg, np.ndarray):
        return arg, fits.Header(), what, f"{path}: the {what} array"
    if isinstance(arg, (int, np.integer)):
        h = _find_hdu(hdul, int(arg), path, what)
        return _image_data(h, path, what), h.header, h.name, f"{path}[{h.name or int(arg)}]"
    name = os.fspath(arg)
    file, ext = split_extension(name)
    if ext is not None or _looks_like_path(name, hdul):
        with _open(file) as other:
            if ext is not None:  # 'file.fits[EXT]': that extension
                h = _find_hdu(other, ext, file, what)
                label = h.name or os.path.basename(file)
            else:  # a file: its first image HDU
                h = next((h for h in other if _is_image(h)), None)
                if h is None:
                    raise BadInputError(f"{name}: no image data found for the {what}.")
                label = os.path.basename(name)
            return _image_data(h, file, what).copy(), h.header.copy(), label, name
    h = _find_hdu(hdul, name, path, what)
    return _image_data(h, path, what), h.header, h.name, f"{path}[{h.name}]"


def _check_positive(value, name: str, path: str) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BadInputError(f"{path}: {name}={value!r} is not a number; pass a positive value.") from None
    if not math.isfinite(v) or v <= 0:
        raise BadInputError(f"{path}: {name}={value!r} is invalid; it must be a finite number > 0 (e-/ADU).")
    return v


def _visit_info(headers) -> VisitInfo:
    def get(*keys):
        for hdr in headers:
            for k in keys:
                if k in hdr and hdr[k] not in (None, ""):
                    return hdr[k]
        return None

    mjd = get("MJD-OBS", "MJD_OBS", "MJD")
    if mjd is None:
        date = get("DATE-OBS", "DATE-BEG")
        if date is not None:
            try:
                from astropy.time import Time

                mjd = Time(str(date), scale="utc").mjd
            except Exception:  # unparseable dates are simply unknown
                mjd = None

    def num(v, cast=float):
        try:
            return None if v is None else cast(v)
        except (TypeError, ValueError):
            return None

    return VisitInfo(
        mjd=num(mjd),
        exposure_time=num(get("EXPTIME", "EXPOSURE", "ITIME")),
        airmass=num(get("AIRMASS", "SECZ")),
        visit=num(get("VISIT", "EXPNUM"), int),
        detector=num(get("DETECTOR", "CCDNUM"), int),
    )


def _photo_calib(headers) -> PhotoCalib | None:
    for hdr in headers:
        if "PHOTCALM" in hdr:
            return PhotoCalib(float(hdr["PHOTCALM"]), float(hdr.get("PHOTCALE", 0.0)))
    for hdr in headers:
        if str(hdr.get("BUNIT", "")).strip().lower() == "njy":
            return PhotoCalib(1.0)
    for hdr in headers:
        if "FLUXMAG0" in hdr and float(hdr["FLUXMAG0"]) > 0:  # old afw Calib: counts of a 0-mag source
            return PhotoCalib(3631e9 / float(hdr["FLUXMAG0"]))
        for key in _ZEROPOINT_CARDS:
            if key in hdr:
                try:
                    zp = float(hdr[key])
                except (TypeError, ValueError):
                    continue
                if math.isfinite(zp):
                    return PhotoCalib(10 ** ((NJY_AB_ZEROPOINT - zp) / 2.5))
    return None


def _metadata(header) -> fits.Header:
    md = fits.Header()
    for card in header.cards:
        key = card.keyword
        if key in _STRUCTURAL or key in _OWN_CARDS:
            continue
        try:
            md.append(card, end=True)
        except Exception:  # malformed cards are not worth failing a read for
            continue
    return md


def _ap_corr_map(hdul: fits.HDUList) -> dict | None:
    """Aperture corrections from the ``APCORR`` table: floats, and Chebyshev ``ApCorrModel`` objects."""
    if "APCORR" not in [h.name for h in hdul]:
        return None
    tab = hdul["APCORR"].data
    cols = tab.columns.names
    out: dict = {}
    for i, name in enumerate(tab["NAME"]):
        name = str(name).strip()
        order = int(tab["ORDER"][i]) if "ORDER" in cols else -1
        if order < 0:
            out[name] = float(tab["VALUE"][i])
            continue
        from ..measure.apcorr import ApCorrModel  # only needed for polynomial models
        from ..model.box import Box

        n = order + 1
        coeffs = np.atleast_1d(np.asarray(tab["COEFFS"][i], dtype=float))[: n * n].reshape(n, n)
        bbox = Box(int(tab["BBOX"][i][0]), int(tab["BBOX"][i][1]), int(tab["BBOX"][i][2]), int(tab["BBOX"][i][3]))
        out[name] = ApCorrModel(coeffs, bbox)
    return out


def read_exposure(
    path: str | os.PathLike,
    *,
    hdu: str | int | None = None,
    variance: str | int | os.PathLike | np.ndarray | None = None,
    mask: str | int | os.PathLike | np.ndarray | None = None,
    gain: float | None = None,
    read_noise: float | None = None,
    psf: Psf | str | int | os.PathLike | None = None,
    variance_kind: str | None = None,
    require_noise: bool = False,
) -> Exposure:
    """Read an exposure from an LSST/afw multi-extension FITS file or a plain FITS image.

    Parameters
    ----------
    path
        FITS file; ``'file.fits[EXT]'`` (an extension name or index in brackets, as CFITSIO and DS9 take it)
        reads that extension, as ``hdu=EXT`` does.
    hdu
        Extension (name or index) of the image. Default: the ``IMAGE`` extension of afw-style files, else the
        primary HDU if it has data, else the first image extension.
    variance
        Where the variance comes from: an extension name/index of the same file, another file's path, or an
        array. How it is interpreted is ``variance_kind``; if that is None it is inferred from the ``UTYPE``
        card (``VarianceUncertainty``, ``StdDevUncertainty``, ``InverseVariance``) or from words in the
        extension/file name and ``BUNIT``: *weight/wht/ivar* → a weight map, ``var = 1/w`` (``w <= 0`` → no
        data); *noise/err/sigma/rms/std/unc* → a 1σ map, ``var = σ²``; anything else → variance. Default:
        the ``VARIANCE`` extension of afw-style files, else modelled from ``gain`` and ``read_noise`` (see
        :func:`model_variance`: ``var = max(image − sky, 0)/gain + max(sky/gain + (rn/gain)², σ_sky²)``,
        ``sky`` the median of the image, ``σ_sky`` its robust pixel noise).
    mask
        Extension name/index, file path or integer array of a mask. For afw-style masks the plane names come
        from the ``MP_<name>`` cards; any other mask is read as *nonzero → BAD*. Default: the ``MASK``
        extension of afw-style files, else none.
    gain
        e-/ADU for the variance model (default: the ``GAIN`` card; without any gain, the variance is the
        constant robust sky variance). Must be finite and > 0.
    read_noise
        Read noise in electrons (default: the ``RDNOISE``/``READNOIS`` card, else 0).
    psf
        A :class:`~diffim.model.psf.Psf`, an extension name/index holding a PSF (a diffim PSF with a
        ``PSFTYPE`` card, or a bare PSF image such as the LSST alert stamps' ``SCI_PSF``, read as an
        :class:`~diffim.model.psf.ImagePsf`), or a file path (PSFEx ``.psf`` file or PSF image). Default: the
        PSF persisted by :func:`write_exposure` if any.
    variance_kind
        ``'variance'``, ``'weight'`` or ``'sigma'`` to override the inference above. Whatever the kind, map
        values ≤ 0 or non-finite are no noise level: those pixels get ``NO_DATA``; a map that is ≤ 0 (almost)
        everywhere raises :class:`~diffim.errors.BadInputError` (wrong kind or wrong file).
    require_noise
        Raise :class:`~diffim.errors.BadInputError` if the image cannot be differenced for lack of noise: it is
        flat (every valid pixel holds one value: a fill value, a blank frame, a mask), or its variance is zero
        at every valid pixel (no variance map or gain for an image without pixel noise, or a zero variance
        plane). Default False, where such an image is read with a logged warning (e.g. for its header, or as
        a test pattern); callers that go on to subtract the image should pass True. A noiseless image whose
        variance is positive somewhere (ip_diffim's synthetic template: variance = image) passes.

    Returns
    -------
    Exposure
        float32 image and variance, int32 mask. Non-finite image or variance pixels, and pixels with
        non-positive weight, get the ``NO_DATA`` plane, image value 0 and the median finite variance, so that
        no NaN or infinity reaches FFTs and sums; algorithms must honour ``NO_DATA``. For plain images, pixels
        at or above the ``SATURATE`` card get ``SAT``.

    Raises
    ------
    InputFileNotFoundError
        ``path`` (or a ``variance``/``mask``/``psf`` file) does not exist.
    BadInputError
        Not FITS, truncated, empty or all-NaN image, invalid gain, a variance map ≤ 0 (almost) everywhere, or
        (with ``require_noise``) a flat image or a zero variance.
    MissingHduError
        A requested extension is not in the file.
    ShapeMismatchError
        Image, variance and mask shapes differ.
    WcsError
        The WCS cards cannot be interpreted or are non-finite.
    PsfError
        The PSF cannot be read.
    """
    path, hdu = _path_and_hdu(path, hdu)
    with _open(path) as hdul:
        layout = _afw_layout(hdul) if hdu is None else None
        if hdu is not None:
            img_hdu = _find_hdu(hdul, hdu, path, "image")
        elif layout is not None:
            img_hdu = hdul[layout[0]]
        else:
            img_hdu = next((h for h in hdul if _is_image(h)), None)
            if img_hdu is None:
                raise MissingHduError(f"{path}: no image HDU with data; the file has HDUs {_hdu_names(hdul)}.")
        image_index = hdul.index(img_hdu)
        raw = _image_data(img_hdu, path, "image")
        image = _as_float32(raw)
        shape = image.shape
        primary = hdul[0].header
        headers = [img_hdu.header, primary] if image_index != 0 else [primary]

        # -- variance
        kind_used = None
        var_info: dict[str, float] = {}
        if variance is None and layout is not None and layout[2] is not None:
            vdata = _image_data(hdul[layout[2]], path, "variance")
            var = np.asarray(vdata, dtype=np.float64) if vdata.dtype != np.float32 else vdata
            kind_used = "variance"
        elif variance is not None:
            vdata, vheader, label, vsource = _external_or_hdu(variance, hdul, path, "variance")
            kind_used = variance_kind or _infer_variance_kind(str(label), vheader)
            if kind_used in _CLI_KIND:  # an unknown kind is reported by _variance_from_kind
                _check_variance_map(vdata, kind_used, vsource)
            # values <= 0 / non-finite -> inf -> NO_DATA below. Not done for afw VARIANCE planes (above): LSST
            # writes 0 for noiseless pixels (ip_diffim's synthetic template), which are valid data.
            var = _variance_from_kind(vdata, kind_used)
        else:
            g = _check_positive(gain, "gain", path) if gain is not None else None
            if g is None:
                g = _header_float(img_hdu.header, _GAIN_CARDS, path, "gain")
                if g is None and image_index != 0:
                    g = _header_float(primary, _GAIN_CARDS, path, "gain")
                if g is not None:
                    g = _check_positive(g, "GAIN card", path)
            rn = read_noise
            if rn is None:
                rn = _header_float(img_hdu.header, _READNOISE_CARDS, path, "read noise")
            if rn is not None and (not math.isfinite(float(rn)) or float(rn) < 0):
                raise BadInputError(f"{path}: read noise {rn!r} is invalid; it must be a finite number >= 0 (e-).")
            var, var_info = model_variance(np.asarray(image, dtype=np.float64), g, rn)
            kind_used = "model"
        var = np.asarray(var)
        if var.ndim != 2 or var.shape != shape:
            raise ShapeMismatchError(f"{path}: variance shape {var.shape} differs from image shape {shape}.")
        variance32 = _as_float32(var) if var.dtype != np.float32 else np.ascontiguousarray(var, dtype=np.float32)

        # -- mask
        if mask is None and layout is not None and layout[1] is not None:
            mask_obj = _read_mask(hdul[layout[1]], path, shape)
        elif mask is not None:
            mdata, mheader, _, _ = _external_or_hdu(mask, hdul, path, "mask")
            if np.asarray(mdata).shape != shape:
                raise ShapeMismatchError(
                    f"{path}: mask shape {np.asarray(mdata).shape} differs from image shape {shape}; "
                    "pass a mask made for this image."
                )
            if _mask_planes_from_header(mheader):
                mask_obj = _read_mask(fits.ImageHDU(np.asarray(mdata), header=mheader), path, shape)
            else:
                mask_obj = Mask.zeros(shape)
                mask_obj.set("BAD", np.asarray(mdata) != 0)
        else:
            mask_obj = Mask.zeros(shape)

        # -- non-finite pixels and saturation
        bad = ~np.isfinite(image) | ~np.isfinite(variance32)
        if bad.all():
            raise BadInputError(f"{path}: every image (or variance) pixel is NaN or infinite; nothing to process.")
        # -- an image without noise (flat, or zero variance) cannot be differenced: raise or warn
        valid = ~bad & ~mask_obj.get("NO_DATA", ignore_missing=True)
        _check_noise(image, variance32, valid, path, kind_used, var_info.get("sigmaSky"), require_noise)
        if bad.any():
            fill = float(np.median(variance32[~bad]))
            image = np.where(bad, np.float32(0), image)
            variance32 = np.where(bad, np.float32(fill), variance32)
            mask_obj.set("NO_DATA", bad)
        if layout is None:
            sat = _header_float(img_hdu.header, ("SATURATE", "SATLEVEL"), path, "saturation")
            if sat is None and np.issubdtype(raw.dtype, np.integer):
                # No SATURATE card: an integer image at its type's ceiling (65535 for uint16) has clipped.
                sat = float(np.iinfo(raw.dtype).max)
            if sat is not None and math.isfinite(sat):
                mask_obj.set("SAT", (image >= sat) & ~bad)
            fill_border = _constant_border(np.where(bad, np.nan, image) if bad.any() else image) & ~bad
            if fill_border.any():
                # Registration/cutout fill: a border row or column holding one value throughout has no data.
                log.info("%s: %d constant border pixels (registration fill) marked NO_DATA.", path,
                         int(fill_border.sum()))
                mask_obj.set("NO_DATA", fill_border)

        xy0 = _read_xy0(img_hdu.header)
        wcs = _read_wcs(img_hdu.header, xy0, path)
        resolved_psf = _resolve_psf(psf, hdul, path, image_index)
        band = None
        for hdr in headers:
            for key in ("BAND", "FILTER", "FILTER1"):
                if hdr.get(key) not in (None, ""):
                    band = str(hdr[key]).strip()
                    # DECam-style 'i DECam SDSS c0003 7835.0 1470.0': the band is the leading letter.
                    first = band.split()[0] if band.split() else band
                    if key != "BAND" and len(first) == 1 and " " in band:
                        band = first
                    break
            if band:
                break
        exp_id = primary.get("EXPID")
        metadata = _metadata(primary)
        if image_index != 0:
            for card in _metadata(img_hdu.header).cards:
                if card.keyword not in metadata and not _is_wcs_key(card.keyword):
                    metadata.append(card, end=True)
        if kind_used == "model":
            for k, v in var_info.items():
                metadata[f"HIERARCH DIFFIM VARMODEL {k.upper()}"] = v
        try:
            ap_corr = _ap_corr_map(hdul)
        except Exception as exc:
            log.warning("%s: cannot read the APCORR table (%s); ignoring it.", path, _one_line(exc))
            ap_corr = None
        visit = _visit_info(headers)
        calib = _photo_calib(headers)

    mi = MaskedImage(image, mask_obj, variance32, xy0)
    return Exposure(
        mi,
        psf=resolved_psf,
        wcs=wcs,
        photo_calib=calib,
        band=band,
        visit_info=visit,
        metadata=metadata,
        ap_corr_map=ap_corr,
        id=int(exp_id) if exp_id is not None else None,
    )


def _constant_border(image: np.ndarray, max_depth: int = 64) -> np.ndarray:
    """Pixels of border rows/columns that hold a single value throughout (fill from registration or padding),
    peeled from each side inwards while the next row/column is constant too (at most ``max_depth`` deep).
    Nothing is flagged when what remains inside is constant as well (a flat image is data, not fill)."""
    out = np.zeros(image.shape, dtype=bool)
    ny, nx = image.shape
    if ny < 3 or nx < 3:
        return out
    y0, y1, x0, x1 = 0, ny, 0, nx
    changed = True
    while changed:
        changed = False
        if y1 - y0 > 2 and y0 < max_depth and np.all(image[y0, x0:x1] == image[y0, x0]):
            out[y0, :] = True
            y0 += 1
            changed = True
        if y1 - y0 > 2 and ny - y1 < max_depth and np.all(image[y1 - 1, x0:x1] == image[y1 - 1, x0]):
            out[y1 - 1, :] = True
            y1 -= 1
            changed = True
        if x1 - x0 > 2 and x0 < max_depth and np.all(image[y0:y1, x0] == image[y0, x0]):
            out[:, x0] = True
            x0 += 1
            changed = True
        if x1 - x0 > 2 and nx - x1 < max_depth and np.all(image[y0:y1, x1 - 1] == image[y0, x1 - 1]):
            out[:, x1 - 1] = True
            x1 -= 1
            changed = True
    interior = image[y0:y1, x0:x1]
    finite = interior[np.isfinite(interior)]
    if finite.size == 0 or np.all(finite == finite[0]):
        return np.zeros(image.shape, dtype=bool)  # a constant image (a test pattern) is data, not fill
    return out


def _is_wcs_key(key: str) -> bool:
    k = key.rstrip("0123456789_A").upper()
    return k in {
        "CRPIX", "CRVAL", "CTYPE", "CUNIT", "CDELT", "CD", "PC", "PV", "WCSAXES", "LONPOLE", "LATPOLE", "RADESYS",
        "EQUINOX", "A", "B", "AP", "BP", "A_ORDER", "B_ORDER", "AP_ORDER", "BP_ORDER", "WCSNAME", "MJDREF", "CROTA",
    } or key.startswith(("A_", "B_", "AP_", "BP_", "PV"))


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------
def _set_card(header: fits.Header, key: str, value, comment: str = "") -> None:
    if value is None:
        return
    if len(key) > 8 and not key.startswith("HIERARCH "):
        key = "HIERARCH " + key
    header[key] = (value, comment) if comment else value


def _ap_corr_hdu(ap_corr_map: Mapping[str, Any] | None):
    """``APCORR`` table of the serialisable corrections: numbers and Chebyshev models (``coefficients``,
    ``bbox``, as :class:`diffim.measure.apcorr.ApCorrModel`); anything else is skipped with a warning."""
    if not ap_corr_map:
        return None
    rows = []  # (name, value, order, bbox, coeffs)
    for name, val in ap_corr_map.items():
        if isinstance(val, (int, float, np.integer, np.floating)) and not isinstance(val, bool):
            rows.append((str(name), float(val), -1, (0, 0, 0, 0), np.zeros(1)))
        elif hasattr(val, "coefficients") and hasattr(val, "bbox") and type(val).__name__ == "ApCorrModel":
            c = np.atleast_2d(np.asarray(val.coefficients, dtype=float))
            b = val.bbox
            rows.append((str(name), float(c[0, 0]), c.shape[0] - 1, (b.x0, b.y0, b.width, b.height), c.ravel()))
        else:
            log.warning("Aperture correction %r is a %s, which cannot be written to FITS; skipped.", name, type(val).__name__)
    if not rows:
        return None
    width = max(len(r[0]) for r in rows)
    ncoef = max(r[4].size for r in rows)
    coeffs = np.zeros((len(rows), ncoef))
    for i, r in enumerate(rows):
        coeffs[i, : r[4].size] = r[4]
    cols = [
        fits.Column("NAME", f"{width}A", array=np.array([r[0] for r in rows])),
        fits.Column("VALUE", "D", array=np.array([r[1] for r in rows])),
        fits.Column("ORDER", "J", array=np.array([r[2] for r in rows])),
        fits.Column("BBOX", "4J", array=np.array([r[3] for r in rows])),
        fits.Column("COEFFS", f"{ncoef}D", array=coeffs),
    ]
    return fits.BinTableHDU.from_columns(cols, name="APCORR")


def _build_hdul(exposure: Exposure) -> fits.HDUList:
    primary = fits.PrimaryHDU()
    ph = primary.header
    md = exposure.metadata
    if md:
        items = md.cards if isinstance(md, fits.Header) else [(k, v) for k, v in dict(md).items()]
        for item in items:
            key, value = (item.keyword, item.value) if isinstance(item, fits.Card) else item
            key = str(key)
            if key in _STRUCTURAL or key in _OWN_CARDS or _is_wcs_key(key):
                continue
            if isinstance(value, (np.integer, np.floating, np.bool_)):
                value = value.item()
            if not isinstance(value, (str, int, float, bool)):
                continue
            if isinstance(value, str) and not value.isascii():
                continue
            try:
                _set_card(ph, key, value)
            except (ValueError, TypeError):
                log.warning("Metadata card %r=%r cannot be written to FITS; skipped.", key, value)
    _set_card(ph, "DIFFIMV", FORMAT_VERSION, "diffim FITS layout version")
    _set_card(ph, "EXPID", exposure.id, "exposure id")
    if exposure.band:
        _set_card(ph, "BAND", str(exposure.band), "band / filter label")
        _set_card(ph, "FILTER", str(exposure.band), "band / filter label")
    vi = exposure.visit_info
    if vi is not None:
        _set_card(ph, "MJD-OBS", vi.mjd, "observation start, MJD")
        _set_card(ph, "EXPTIME", vi.exposure_time, "exposure time (s)")
        _set_card(ph, "AIRMASS", vi.airmass)
        _set_card(ph, "VISIT", vi.visit)
        _set_card(ph, "DETECTOR", vi.detector)
    pc = exposure.photo_calib
    if pc is not None:
        _set_card(ph, "PHOTCALM", float(pc.calibration_mean), "PhotoCalib mean: nJy per count")
        _set_card(ph, "PHOTCALE", float(pc.calibration_err), "PhotoCalib error: nJy per count")
        _set_card(ph, "MAGZP", float(pc.zero_point), "AB magnitude of one count")

    xy0 = exposure.xy0
    wcs_h = _wcs_cards(exposure.wcs, xy0) if exposure.wcs is not None else fits.Header()
    mask = exposure.mask
    hdus: list = [primary]
    for name, data in (("IMAGE", exposure.image), ("MASK", mask.array), ("VARIANCE", exposure.variance)):
        dtype = np.int32 if name == "MASK" else np.float32
        h = fits.ImageHDU(np.ascontiguousarray(data, dtype=dtype), name=name)
        h.header["EXTTYPE"] = name
        h.header.extend(wcs_h.cards, end=True)
        _xy0_cards(h.header, xy0)
        if name == "MASK":
            for plane, bit in sorted(mask.planes.items(), key=lambda kv: kv[1]):
                _set_card(h.header, f"MP_{plane}", int(bit))
        hdus.append(h)
    if exposure.psf is not None:
        try:
            psf_hdus = exposure.psf.to_fits_hdus()
        except PsfError as exc:
            log.warning("PSF not written: %s", exc)
            psf_hdus = []
        if psf_hdus:
            psf_hdus[0].header["NPSFHDU"] = (len(psf_hdus), "number of HDUs of this PSF")
            hdus.extend(psf_hdus)
    ap = _ap_corr_hdu(exposure.ap_corr_map)
    if ap is not None:
        hdus.append(ap)
    return fits.HDUList(hdus)


def write_exposure(exposure: Exposure, path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Write an exposure as an afw-compatible multi-extension FITS file, atomically.

    The layout (``PRIMARY`` with visit/calibration cards, ``IMAGE``/``MASK``/``VARIANCE`` with WCS, ``MP_``
    plane cards and xy0 cards, then the PSF HDUs and an ``APCORR`` table) is described in ``docs/io.md``.
    The file is written uncompressed to a temporary file in the same directory and moved into place with
    :func:`os.replace`, so a reader never sees a partial file and a failed write leaves nothing behind.

    Raises
    ------
    DiffimIOError
        The directory does not exist or is not writable, or ``path`` exists and ``overwrite`` is False.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise DiffimIOError(f"{path}: directory {directory} does not exist; create it first.")
    if os.path.exists(path) and not overwrite:
        raise DiffimIOError(f"{path}: file exists and overwrite=False; remove it or pass overwrite=True.")
    hdul = _build_hdul(exposure)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", suffix=".fits", dir=directory)
    except OSError as exc:
        raise DiffimIOError(f"{path}: cannot write in {directory} ({exc.strerror}); check permissions.") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hdul.writeto(fh, output_verify="silentfix")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise DiffimIOError(f"{path}: write failed ({exc.strerror or _one_line(exc)}); nothing was written.") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

