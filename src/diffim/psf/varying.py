"""A spatially varying PSF: pixel basis images times a polynomial in the position.

The model (PSFEx's, and the one :func:`diffim.psf.estimate_psf` fits) is

.. math::

    P(x, y)[i, j] = \\sum_k B_k[i, j] \\, T_k(u, v), \\qquad u = (x - x_0)/s_x, \\quad v = (y - y_0)/s_y,

where the ``B_k`` are odd-sized square images sampled on the image pixel grid and centred on their middle
pixel, and the terms ``T_k`` are the monomials ``u^p v^q`` with ``p + q <= degree`` in PSFEx's order: ``u``
runs fastest, i.e. for degree 2 ``1, u, u², v, uv, v²``. ``(x, y)`` are parent pixel coordinates.
"""

from __future__ import annotations

import numpy as np

from ..errors import PsfError
from ..model.psf import Psf, register_psf_type

__all__ = ["PixelBasisPsf", "polynomial_terms", "polynomial_powers"]


def polynomial_powers(degree: int) -> list[tuple[int, int]]:
    """``(p, q)`` powers of ``u^p v^q`` for total degree ``<= degree``, in PSFEx order (``u`` fastest)."""
    if degree < 0:
        raise PsfError(f"Polynomial degree must be >= 0, got {degree}.")
    return [(p, q) for q in range(degree + 1) for p in range(degree + 1 - q)]


def polynomial_terms(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    """Design matrix ``(n_points, n_terms)`` of the monomials of :func:`polynomial_powers` at ``(u, v)``."""
    u = np.atleast_1d(np.asarray(u, dtype=float))
    v = np.atleast_1d(np.asarray(v, dtype=float))
    up = [np.ones_like(u)]
    vp = [np.ones_like(v)]
    for _ in range(degree):
        up.append(up[-1] * u)
        vp.append(vp[-1] * v)
    return np.stack([up[p] * vp[q] for p, q in polynomial_powers(degree)], axis=-1)


@register_psf_type
class PixelBasisPsf(Psf):
    """Spatially varying PSF: pixel basis images × polynomial in ``(x, y)`` (see the module docstring).

    Parameters
    ----------
    basis
        Array ``(n_terms, ny, nx)`` with odd ``ny``, ``nx``; ``n_terms = (degree + 1)(degree + 2)/2``.
    degree
        Total polynomial degree.
    x_offset, y_offset, x_scale, y_scale
        Position normalisation ``u = (x - x_offset)/x_scale``, ``v = (y - y_offset)/y_scale`` (parent pixels).
    average_position
        Where the model is best constrained (default: ``(x_offset, y_offset)``).
    valid_box
        ``(x_min, y_min, x_max, y_max)``: the region the polynomial was fitted on (its stars' extent). Positions
        outside are clamped to it, so the model holds its edge value there instead of extrapolating: a
        degree-2 polynomial fitted to stars on half of an image (the other half blank in one exposure) gave
        a 3-px PSF 5–10 px wide on the other half, and the kernel basis sized from it ruined the subtraction
        where the data were good. ``None`` (default, and models read from PSFEx files) evaluates everywhere.
    """

    psf_type = "PIXELBASIS"

    def __init__(
        self,
        basis: np.ndarray,
        degree: int,
        x_offset: float = 0.0,
        y_offset: float = 0.0,
        x_scale: float = 1.0,
        y_scale: float = 1.0,
        average_position: tuple[float, float] | None = None,
        valid_box: tuple[float, float, float, float] | None = None,
    ) -> None:
        super().__init__(average_position if average_position is not None else (x_offset, y_offset))
        if valid_box is not None:
            valid_box = tuple(float(v) for v in valid_box)
            if len(valid_box) != 4 or not all(np.isfinite(valid_box)) or valid_box[0] > valid_box[2] \
                    or valid_box[1] > valid_box[3]:
                raise PsfError(f"PixelBasisPsf valid_box must be finite (x_min, y_min, x_max, y_max), got {valid_box}.")
        self.valid_box = valid_box
        basis = np.array(basis, dtype=float)
        if basis.ndim == 2:
            basis = basis[None]
        n_terms = len(polynomial_powers(int(degree)))
        if basis.ndim != 3 or basis.shape[0] != n_terms:
            raise PsfError(
                f"PixelBasisPsf of degree {degree} needs {n_terms} basis images, got an array of shape {basis.shape}."
            )
        if basis.shape[1] % 2 == 0 or basis.shape[2] % 2 == 0:
            raise PsfError(f"PixelBasisPsf basis images must be odd-sized, got {basis.shape[1:]}.")
        if not np.all(np.isfinite(basis)):
            raise PsfError("PixelBasisPsf basis images contain non-finite values.")
        for name, val in (("x_scale", x_scale), ("y_scale", y_scale)):
            if not (np.isfinite(val) and val != 0):
                raise PsfError(f"PixelBasisPsf {name} must be finite and non-zero, got {val}.")
        self.basis = basis
        self.degree = int(degree)
        self.x_offset, self.y_offset = float(x_offset), float(y_offset)
        self.x_scale, self.y_scale = float(x_scale), float(y_scale)

    @property
    def n_terms(self) -> int:
        return self.basis.shape[0]

    def coefficients(self, x, y) -> np.ndarray:
        """Polynomial terms ``(n_points, n_terms)`` at parent positions (clamped to ``valid_box`` if set)."""
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        if self.valid_box is not None:
            x0, y0, x1, y1 = self.valid_box
            x, y = np.clip(x, x0, x1), np.clip(y, y0, y1)
        u = (x - self.x_offset) / self.x_scale
        v = (y - self.y_offset) / self.y_scale
        return polynomial_terms(u, v, self.degree)

    def _kernel_image(self, x: float, y: float) -> np.ndarray:
        c = self.coefficients(x, y)[0]
        return np.tensordot(c, self.basis, axes=1)

    def kernel_images(self, x, y) -> np.ndarray:
        """Un-normalised kernel images at many positions at once, shape ``(n, ny, nx)``."""
        return np.tensordot(self.coefficients(x, y), self.basis, axes=1)

    # -- persistence --------------------------------------------------------------------------------------
    def _header_cards(self, header) -> None:
        header["PSFTYPE"] = self.psf_type
        header["POLDEG"] = (self.degree, "total degree of the polynomial in (x, y)")
        header["XOFFSET"] = (self.x_offset, "u = (x - XOFFSET) / XSCALE, parent pixels")
        header["YOFFSET"] = (self.y_offset, "v = (y - YOFFSET) / YSCALE, parent pixels")
        header["XSCALE"] = self.x_scale
        header["YSCALE"] = self.y_scale
        header["AVGPOSX"], header["AVGPOSY"] = self.average_position
        if self.valid_box is not None:
            for key, val in zip(("VALXMIN", "VALYMIN", "VALXMAX", "VALYMAX"), self.valid_box):
                header[key] = (val, "model clamped to its fitted region (parent px)")

    def to_fits_hdus(self) -> list:
        from astropy.io import fits

        hdu = fits.ImageHDU(self.basis, name="PSF")
        self._header_cards(hdu.header)
        return [hdu]

    @staticmethod
    def _read_args(hdus: list) -> dict:
        h = hdus[0].header
        try:
            return dict(
                basis=np.asarray(hdus[0].data, dtype=float),
                degree=int(h["POLDEG"]),
                x_offset=float(h["XOFFSET"]),
                y_offset=float(h["YOFFSET"]),
                x_scale=float(h["XSCALE"]),
                y_scale=float(h["YSCALE"]),
                average_position=(float(h["AVGPOSX"]), float(h["AVGPOSY"])) if "AVGPOSX" in h else None,
                valid_box=(tuple(float(h[k]) for k in ("VALXMIN", "VALYMIN", "VALXMAX", "VALYMAX"))
                           if "VALXMIN" in h else None),
            )
        except KeyError as exc:
            raise PsfError(f"PSF HDU of type {h.get('PSFTYPE')} lacks the {exc.args[0]} card.") from None

    @classmethod
    def from_fits_hdus(cls, hdus: list) -> "PixelBasisPsf":
        return cls(**cls._read_args(hdus))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(degree={self.degree}, shape={self.basis.shape[1:]})"
