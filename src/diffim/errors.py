"""The diffim exception hierarchy.

Every exception raised on purpose by diffim derives from :class:`DiffimError` *and* from the builtin that
matches its meaning (``ValueError``, ``FileNotFoundError``, ...), so callers may catch either. Messages name
the problem, the offending values and what to do about it. All classes are picklable (they cross process
boundaries in batch mode).
"""

from __future__ import annotations

__all__ = [
    "DiffimError",
    "DiffimValueError",
    "DiffimIOError",
    "InputFileNotFoundError",
    "BadInputError",
    "MissingHduError",
    "ShapeMismatchError",
    "MaskPlaneError",
    "PsfError",
    "MissingPsfError",
    "WcsError",
    "NoOverlapError",
    "InsufficientTemplateCoverageError",
    "InsufficientKernelCandidatesError",
    "NoKernelCandidatesError",
    "PsfEstimationError",
    "SubtractionQualityError",
    "ConfigError",
]


class DiffimError(RuntimeError):
    """Base class of every error diffim raises on purpose."""

    #: Exit code used by the ``diffim`` command line when this error ends a run.
    exit_code = 1

    def __reduce__(self):
        return (self.__class__, self.args)


class DiffimValueError(DiffimError, ValueError):
    """An argument or input has an invalid value."""

    exit_code = 2


class ConfigError(DiffimValueError):
    """A configuration is invalid (bad override, inconsistent switches)."""


class DiffimIOError(DiffimError, OSError):
    """A file could not be read or written."""

    exit_code = 2

    def __str__(self) -> str:  # OSError's __str__ would reformat single-argument messages oddly
        return str(self.args[0]) if self.args else ""


class InputFileNotFoundError(DiffimIOError, FileNotFoundError):
    """An input file does not exist."""


class BadInputError(DiffimValueError):
    """An input file or array is unusable (corrupt FITS, non-finite WCS, empty image, ...)."""


class MissingHduError(BadInputError, KeyError):
    """A required FITS extension is missing."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(BadInputError):
    """Arrays that must have the same shape do not."""


class MaskPlaneError(DiffimValueError, KeyError):
    """A mask plane name is unknown, or no bit is left for a new plane."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PsfError(DiffimValueError):
    """A PSF model cannot be read, built or evaluated."""


class MissingPsfError(PsfError):
    """An exposure has no PSF model where one is required."""


class PsfEstimationError(PsfError):
    """Too few usable stars to estimate a PSF model."""


class WcsError(DiffimValueError):
    """A WCS is missing, non-finite or inconsistent."""


class NoOverlapError(DiffimValueError):
    """Two images do not overlap on the sky or on the pixel grid."""


class InsufficientTemplateCoverageError(NoOverlapError):
    """The template covers less of the science image than ``requiredTemplateFraction``."""


class InsufficientKernelCandidatesError(DiffimError):
    """Too few usable stars to fit a PSF-matching kernel."""

    exit_code = 3


class NoKernelCandidatesError(InsufficientKernelCandidatesError):
    """Every kernel candidate was rejected while solving for the spatial kernel."""


class SubtractionQualityError(DiffimError):
    """The difference image failed its quality checks."""

    exit_code = 3


class ExceedsMaxVarianceScaleError(DiffimError):
    """The variance-plane correction factor exceeds ``ScaleVarianceConfig.limit`` (LSST
    ``ExceedsMaxVarianceScaleError``)."""

    exit_code = 3


__all__.append("ExceedsMaxVarianceScaleError")
