"""Butler formatter for diffim exposures: the same multi-extension FITS files ``diffim run`` writes.

Register it in a repository's ``butler.yaml`` (``diffim.rubin.repo.seed_config`` does this)::

    storageClasses:
      DiffimExposure:
        pytype: diffim.model.Exposure
    datastore:
      formatters:
        DiffimExposure: diffim.rubin.formatters.DiffimExposureFormatter
"""

from __future__ import annotations

from typing import Any

from lsst.daf.butler import FormatterV2
from lsst.resources import ResourcePath

__all__ = ["DiffimExposureFormatter"]


class DiffimExposureFormatter(FormatterV2):
    """Read and write `diffim.model.Exposure` with :func:`diffim.io.read_exposure`/`write_exposure`."""

    default_extension = ".fits"
    supported_extensions = frozenset({".fits", ".fits.gz", ".fz"})
    can_read_from_local_file = True

    def read_from_local_file(self, path: str, component: str | None = None, expected_size: int = -1) -> Any:
        from ..io import read_exposure

        return read_exposure(path)

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        from ..io import write_exposure

        write_exposure(in_memory_dataset, uri.ospath)
