"""File input/output: exposures as LSST/afw-style multi-extension FITS or plain FITS images.

See :mod:`diffim.io.fits` and ``docs/io.md`` for the layout.
"""

from .fits import read_exposure, write_exposure, read_psf_file

__all__ = ["read_exposure", "write_exposure", "read_psf_file"]
