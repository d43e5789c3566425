"""Masked images and exposures.

:class:`MaskedImage` holds image (float32), :class:`~diffim.model.mask.Mask` (int32 bit planes) and variance
(float32) on one pixel grid whose first pixel sits at ``xy0`` in parent coordinates. Arithmetic follows afw:
``a ± b`` adds variances and ORs masks; ``a * c`` scales the variance by ``c²``.

:class:`Exposure` adds the PSF, WCS (astropy, mapping 0-based **parent** pixel coordinates to the sky),
photometric calibration, band, visit information, aperture-correction map and header metadata. Indexing either
with a :class:`~diffim.model.box.Box` (parent coordinates) returns a view, not a copy.
"""

from __future__ import annotations

import copy as _copy
from typing import Any

import numpy as np

from ..errors import BadInputError, ShapeMismatchError
from .box import Box
from .calib import PhotoCalib, VisitInfo
from .mask import Mask
from .psf import Psf

__all__ = ["MaskedImage", "Exposure"]


class MaskedImage:
    """Image, mask and variance planes on one pixel grid.

    Parameters
    ----------
    image
        2-D array, converted to float32 (no copy if already float32).
    mask
        :class:`Mask` or integer array (default: all zero, default planes).
    variance
        2-D array, converted to float32 (default: zeros).
    xy0
        Parent coordinates ``(x0, y0)`` of pixel ``[0, 0]``.
    """

    __slots__ = ("image", "mask", "variance", "xy0")

    def __init__(
        self,
        image: np.ndarray,
        mask: Mask | np.ndarray | None = None,
        variance: np.ndarray | None = None,
        xy0: tuple[int, int] = (0, 0),
    ) -> None:
        image = np.asarray(image)
        if image.ndim != 2:
            raise ShapeMismatchError(f"An image must be 2-D, got an array of shape {image.shape}.")
        if image.dtype != np.float32:
            image = image.astype(np.float32)
        if mask is None:
            mask = Mask.zeros(image.shape)
        elif not isinstance(mask, Mask):
            mask = Mask(mask)
        if variance is None:
            variance = np.zeros(image.shape, dtype=np.float32)
        else:
            variance = np.asarray(variance)
            if variance.dtype != np.float32:
                variance = variance.astype(np.float32)
        if mask.shape != image.shape or variance.shape != image.shape:
            raise ShapeMismatchError(
                f"Image {image.shape}, mask {mask.shape} and variance {variance.shape} must have the same shape."
            )
        self.image = image
        self.mask = mask
        self.variance = variance
        self.xy0 = (int(xy0[0]), int(xy0[1]))

    # -- geometry -----------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    @property
    def bbox(self) -> Box:
        """Parent-coordinate bounding box."""
        return Box.from_shape(self.image.shape, self.xy0)

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def height(self) -> int:
        return self.image.shape[0]

    def _slices(self, box: Box) -> tuple[slice, slice]:
        if not self.bbox.contains(box):
            raise BadInputError(f"Box {box} is not contained in the image's bounding box {self.bbox}.")
        return box.slices(self.xy0)

    def __getitem__(self, box: Box) -> "MaskedImage":
        """View of the part inside ``box`` (parent coordinates)."""
        if not isinstance(box, Box):
            raise TypeError("Index a MaskedImage with a diffim Box in parent coordinates.")
        s = self._slices(box)
        return MaskedImage(self.image[s], self.mask[s], self.variance[s], box.xy0)

    def __setitem__(self, box: Box, other: "MaskedImage") -> None:
        s = self._slices(box)
        self.image[s] = other.image
        self.mask.array[s] = self.mask.conform(other.mask)
        self.variance[s] = other.variance

    def copy(self) -> "MaskedImage":
        return MaskedImage(self.image.copy(), self.mask.copy(), self.variance.copy(), self.xy0)

    def pixel_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Parent ``(x, y)`` coordinates of every pixel, each of shape ``(ny, nx)``."""
        ny, nx = self.shape
        y, x = np.mgrid[self.xy0[1] : self.xy0[1] + ny, self.xy0[0] : self.xy0[0] + nx]
        return x, y

    # -- afw arithmetic -----------------------------------------------------------------------------------
    def _check_other(self, other: "MaskedImage") -> None:
        if other.shape != self.shape:
            raise ShapeMismatchError(f"Cannot combine masked images of shapes {self.shape} and {other.shape}.")

    def __iadd__(self, other):
        if isinstance(other, MaskedImage):
            self._check_other(other)
            self.image += other.image
            self.variance += other.variance
            self.mask |= other.mask
        else:
            self.image += np.float32(other) if np.isscalar(other) else np.asarray(other, dtype=np.float32)
        return self

    def __isub__(self, other):
        if isinstance(other, MaskedImage):
            self._check_other(other)
            self.image -= other.image
            self.variance += other.variance
            self.mask |= other.mask
        else:
            self.image -= np.float32(other) if np.isscalar(other) else np.asarray(other, dtype=np.float32)
        return self

    def __imul__(self, c):
        c = np.asarray(c, dtype=np.float32)
        self.image *= c
        self.variance *= c * c
        return self

    def __itruediv__(self, c):
        c = np.asarray(c, dtype=np.float32)
        self.image /= c
        self.variance /= c * c
        return self

    def __add__(self, other):
        out = self.copy()
        out += other
        return out

    def __sub__(self, other):
        out = self.copy()
        out -= other
        return out

    def __mul__(self, c):
        out = self.copy()
        out *= c
        return out

    __rmul__ = __mul__

    def __truediv__(self, c):
        out = self.copy()
        out /= c
        return out

    def __repr__(self) -> str:
        return f"MaskedImage(bbox={self.bbox})"


class Exposure:
    """A :class:`MaskedImage` with the metadata needed for difference imaging.

    Parameters
    ----------
    masked_image
        The pixels. Alternatively pass ``image=`` (and optionally ``mask=``, ``variance=``, ``xy0=``).
    psf
        PSF model (:class:`~diffim.model.psf.Psf`) or None.
    wcs
        ``astropy.wcs.WCS`` mapping 0-based *parent* pixel coordinates to the sky, or None.
    photo_calib
        :class:`PhotoCalib` (nJy per count), or None.
    band
        Filter/band label (e.g. ``"r"``), or None.
    visit_info
        :class:`VisitInfo`.
    metadata
        Header cards (``dict`` or ``astropy.io.fits.Header``) carried along.
    ap_corr_map
        Mapping of flux-algorithm field names (``"base_PsfFlux_instFlux"``, ``..._instFluxErr``) to callables
        ``f(x, y) -> correction``; None if not known.
    id
        Integer exposure id (used to seed sky sources and number DIA sources).
    """

    def __init__(
        self,
        masked_image: MaskedImage | None = None,
        *,
        image: np.ndarray | None = None,
        mask: Mask | np.ndarray | None = None,
        variance: np.ndarray | None = None,
        xy0: tuple[int, int] = (0, 0),
        psf: Psf | None = None,
        wcs: Any = None,
        photo_calib: PhotoCalib | None = None,
        band: str | None = None,
        visit_info: VisitInfo | None = None,
        metadata: Any = None,
        ap_corr_map: dict | None = None,
        id: int | None = None,
    ) -> None:
        if masked_image is None:
            if image is None:
                raise BadInputError("Exposure needs a masked_image or an image array.")
            masked_image = MaskedImage(image, mask, variance, xy0)
        self.masked_image = masked_image
        self.psf = psf
        self.wcs = wcs
        self.photo_calib = photo_calib
        self.band = band
        self.visit_info = visit_info if visit_info is not None else VisitInfo()
        self.metadata = {} if metadata is None else metadata
        self.ap_corr_map = ap_corr_map
        self.id = id

    # -- plane access -------------------------------------------------------------------------------------
    @property
    def image(self) -> np.ndarray:
        return self.masked_image.image

    @image.setter
    def image(self, value: np.ndarray) -> None:
        self.masked_image.image[...] = value

    @property
    def mask(self) -> Mask:
        return self.masked_image.mask

    @property
    def variance(self) -> np.ndarray:
        return self.masked_image.variance

    @variance.setter
    def variance(self, value: np.ndarray) -> None:
        self.masked_image.variance[...] = value

    @property
    def xy0(self) -> tuple[int, int]:
        return self.masked_image.xy0

    @property
    def bbox(self) -> Box:
        return self.masked_image.bbox

    @property
    def shape(self) -> tuple[int, int]:
        return self.masked_image.shape

    @property
    def width(self) -> int:
        return self.masked_image.width

    @property
    def height(self) -> int:
        return self.masked_image.height

    # -- sub-exposures and copies -------------------------------------------------------------------------
    def _with(self, masked_image: MaskedImage) -> "Exposure":
        return Exposure(
            masked_image,
            psf=self.psf,
            wcs=self.wcs,
            photo_calib=self.photo_calib,
            band=self.band,
            visit_info=self.visit_info,
            metadata=self.metadata,
            ap_corr_map=self.ap_corr_map,
            id=self.id,
        )

    def __getitem__(self, box: Box) -> "Exposure":
        """View of the part inside ``box`` (parent coordinates); metadata objects are shared."""
        return self._with(self.masked_image[box])

    def subset(self, box: Box) -> "Exposure":
        """Same as ``exposure[box]``."""
        return self[box]

    def copy(self, deep: bool = True) -> "Exposure":
        """Copy of the pixels (``deep``) with copies of the mutable metadata; PSF and WCS objects are shared."""
        mi = self.masked_image.copy() if deep else self.masked_image
        out = self._with(mi)
        out.metadata = _copy.copy(self.metadata)
        out.visit_info = _copy.copy(self.visit_info)
        out.ap_corr_map = None if self.ap_corr_map is None else dict(self.ap_corr_map)
        return out

    clone = copy

    # -- conveniences -------------------------------------------------------------------------------------
    def psf_position(self) -> tuple[float, float]:
        """Where to evaluate "the" PSF: the model's average position if set, else the bbox centre."""
        if self.psf is not None and self.psf._average_position is not None:
            return self.psf.average_position
        return self.bbox.center

    def require_psf(self) -> Psf:
        """The PSF, or :class:`~diffim.errors.MissingPsfError` if there is none."""
        from ..errors import MissingPsfError

        if self.psf is None:
            raise MissingPsfError(
                "The exposure has no PSF model. Attach one (exposure.psf = GaussianPsf(...)) or estimate it with "
                "diffim.psf.estimate_psf(exposure)."
            )
        return self.psf

    def pixel_to_sky(self, x, y):
        """``(ra, dec)`` in degrees of parent pixel positions."""
        from ..errors import WcsError

        if self.wcs is None:
            raise WcsError("The exposure has no WCS.")
        ra, dec = self.wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        return ra, dec

    def sky_to_pixel(self, ra, dec):
        """Parent pixel ``(x, y)`` of sky positions in degrees."""
        from ..errors import WcsError

        if self.wcs is None:
            raise WcsError("The exposure has no WCS.")
        x, y = self.wcs.all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
        return x, y

    def pixel_scale(self) -> float | None:
        """Pixel scale in arcsec at the bbox centre, or None without a WCS."""
        if self.wcs is None:
            return None
        x, y = self.bbox.center
        ra, dec = self.pixel_to_sky([x, x + 1, x], [y, y, y + 1])
        from astropy.coordinates import SkyCoord
        import astropy.units as u

        c = SkyCoord(ra * u.deg, dec * u.deg)
        dx = c[0].separation(c[1]).arcsec
        dy = c[0].separation(c[2]).arcsec
        return float(np.sqrt(dx * dy))

    def __repr__(self) -> str:
        return f"Exposure(bbox={self.bbox}, band={self.band!r}, psf={self.psf!r})"
