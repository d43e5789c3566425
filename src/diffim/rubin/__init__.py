"""Rubin middleware adapters (the ``[rubin]`` extra; Python >= 3.12).

* :mod:`diffim.rubin.pipeline_task` — ``ImageDifferencePipelineTask``: ImageDifferenceTask as a
  ``lsst.pipe.base.PipelineTask`` with real connections, runnable by ``pipetask run`` and ``bps submit``.
* :mod:`diffim.rubin.formatters` — the ``DiffimExposure`` storage class's formatter (diffim's LSST-style
  multi-extension FITS, exactly what ``diffim run`` writes).
* :mod:`diffim.rubin.repo` — create a butler repository that knows that storage class, register a minimal
  instrument and ingest science/template pairs (``python -m diffim.rubin.repo``).

Nothing here is imported by the core package: ``import lsst.pipe.base`` costs 1.5 s and pulls in all of
daf_butler. See ``docs/rubin.md``.
"""

from __future__ import annotations

import sys

__all__ = ["STORAGE_CLASS", "require_rubin"]

#: Name of the butler storage class of diffim exposures.
STORAGE_CLASS = "DiffimExposure"


def require_rubin() -> None:
    """Raise a clear ImportError if the Rubin middleware cannot be used here."""
    if sys.version_info < (3, 12):
        raise ImportError("diffim.rubin needs Python >= 3.12 (the current lsst-pipe-base does); "
                          f"this is {sys.version.split()[0]}.")
    try:
        import lsst.daf.butler  # noqa: F401
        import lsst.pipe.base  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"diffim.rubin needs the Rubin middleware ({exc.name} is missing): "
                          "pip install 'diffim[rubin]'") from None
