"""PSF models beyond the constant ones of :mod:`diffim.model.psf`, and PSF estimation.

* :class:`PixelBasisPsf` — pixel basis images × polynomial in ``(x, y)`` (the PSFEx model);
* :func:`read_psfex` / :class:`PsfexPsf` — PSFEx ``.psf`` files;
* :func:`estimate_psf` — detect stars, select them by size and fit a :class:`PixelBasisPsf`;
* :func:`object_size_star_selector` — LSST's ObjectSizeStarSelector as a pure function.
"""

from .varying import PixelBasisPsf, polynomial_terms, polynomial_powers

__all__ = ["PixelBasisPsf", "polynomial_terms", "polynomial_powers"]

try:  # modules written in later steps
    from .psfex import PsfexPsf, read_psfex  # noqa: F401

    __all__ += ["PsfexPsf", "read_psfex"]
except ImportError:  # pragma: no cover
    pass
try:
    from .star_selector import object_size_star_selector  # noqa: F401
    from .estimate import estimate_psf  # noqa: F401

    __all__ += ["object_size_star_selector", "estimate_psf"]
except ImportError:  # pragma: no cover
    pass
