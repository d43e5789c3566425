"""Footprints and peaks: the detection products that measurement consumes.

A :class:`Footprint` is a set of pixels (a boolean ``spans`` array over its parent-coordinate ``bbox``) with
an ordered list of :class:`Peak` s, as afw's ``Footprint``/``PeakRecord``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .model.box import Box

__all__ = ["Peak", "Footprint"]


@dataclass
class Peak:
    """A local extremum of the detection image.

    ``x, y`` are integer parent pixel positions; ``value`` the (smoothed) detection-image value there
    (negative for negative peaks); ``significance`` = polarity × value / σ (positive for both polarities).
    """

    x: int
    y: int
    value: float
    significance: float = float("nan")
    is_negative: bool = False


@dataclass
class Footprint:
    """A connected set of pixels with its peaks.

    Parameters
    ----------
    bbox
        Parent-coordinate bounding box of the pixels.
    spans
        Boolean array of shape ``bbox.shape``: True for pixels in the footprint.
    peaks
        Peaks ordered as the producer defines (detection: decreasing value; merged dipoles: positive first).
    is_negative
        True if the footprint came only from the negative polarity.
    """

    bbox: Box
    spans: np.ndarray
    peaks: list[Peak] = field(default_factory=list)
    is_negative: bool = False
    from_positive: bool = False
    from_negative: bool = False

    @property
    def area(self) -> int:
        return int(self.spans.sum())

    def pixel_coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Parent ``(x, y)`` integer coordinates of the footprint pixels."""
        iy, ix = np.nonzero(self.spans)
        return ix + self.bbox.x0, iy + self.bbox.y0

    def centroid(self) -> tuple[float, float]:
        """Unweighted centroid of the footprint pixels."""
        x, y = self.pixel_coords()
        return float(x.mean()), float(y.mean())

    def contains(self, x: float, y: float) -> bool:
        ix, iy = int(round(x)), int(round(y))
        if not self.bbox.contains_point(ix, iy):
            return False
        return bool(self.spans[iy - self.bbox.y0, ix - self.bbox.x0])
