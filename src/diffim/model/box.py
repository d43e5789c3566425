"""Integer pixel boxes in LSST "parent" coordinates.

A pixel ``(i, j)`` of an array whose origin is ``xy0 = (x0, y0)`` sits at parent position ``x = x0 + j``,
``y = y0 + i``; pixel centres are at integer positions. Boxes are half-open: ``[x0, x0 + width)``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Box"]


@dataclass(frozen=True)
class Box:
    """An integer pixel box ``[x0, x0 + width) × [y0, y0 + height)`` in parent coordinates."""

    x0: int
    y0: int
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("x0", "y0", "width", "height"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.width < 0 or self.height < 0:
            raise ValueError(f"Box size must be non-negative, got width={self.width}, height={self.height}")

    @classmethod
    def from_shape(cls, shape: tuple[int, int], xy0: tuple[int, int] = (0, 0)) -> "Box":
        """Box of an array of ``shape = (ny, nx)`` whose first pixel is at ``xy0 = (x0, y0)``."""
        return cls(xy0[0], xy0[1], shape[1], shape[0])

    @classmethod
    def from_corners(cls, x0: int, y0: int, x1: int, y1: int) -> "Box":
        """Box from its inclusive minimum ``(x0, y0)`` and exclusive maximum ``(x1, y1)`` corners."""
        return cls(x0, y0, max(0, x1 - x0), max(0, y1 - y0))

    @property
    def x1(self) -> int:
        """Exclusive maximum x (``x0 + width``)."""
        return self.x0 + self.width

    @property
    def y1(self) -> int:
        """Exclusive maximum y (``y0 + height``)."""
        return self.y0 + self.height

    @property
    def shape(self) -> tuple[int, int]:
        """Array shape ``(ny, nx)``."""
        return (self.height, self.width)

    @property
    def xy0(self) -> tuple[int, int]:
        return (self.x0, self.y0)

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(x, y)`` of the box in parent pixel coordinates (LSST ``Box2D.getCenter``)."""
        return (self.x0 + (self.width - 1) / 2.0, self.y0 + (self.height - 1) / 2.0)

    def is_empty(self) -> bool:
        return self.width == 0 or self.height == 0

    def contains(self, other: "Box") -> bool:
        """True if ``other`` lies entirely inside this box."""
        return (
            other.x0 >= self.x0 and other.y0 >= self.y0 and other.x1 <= self.x1 and other.y1 <= self.y1
        )

    def contains_point(self, x: float, y: float) -> bool:
        """True if the pixel nearest ``(x, y)`` lies in the box."""
        ix, iy = int(round(x)), int(round(y))
        return self.x0 <= ix < self.x1 and self.y0 <= iy < self.y1

    def intersection(self, other: "Box") -> "Box":
        """Overlap of two boxes (possibly empty)."""
        return Box.from_corners(
            max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1), min(self.y1, other.y1)
        )

    def grown(self, n: int) -> "Box":
        """Box grown by ``n`` pixels on every side (shrunk if ``n < 0``)."""
        return Box.from_corners(self.x0 - n, self.y0 - n, self.x1 + n, self.y1 + n)

    def shifted(self, dx: int, dy: int) -> "Box":
        return Box(self.x0 + dx, self.y0 + dy, self.width, self.height)

    def slices(self, origin: tuple[int, int] | "Box" = (0, 0)) -> tuple[slice, slice]:
        """Array slices ``(rows, cols)`` selecting this box from an array whose first pixel is at ``origin``."""
        if isinstance(origin, Box):
            origin = origin.xy0
        ox, oy = origin
        return (slice(self.y0 - oy, self.y1 - oy), slice(self.x0 - ox, self.x1 - ox))

    @classmethod
    def centered(cls, x: float, y: float, half_width: int, half_height: int | None = None) -> "Box":
        """Box of size ``2*half_width + 1`` centred on the pixel nearest ``(x, y)``."""
        hh = half_width if half_height is None else half_height
        ix, iy = int(round(x)), int(round(y))
        return cls(ix - half_width, iy - hh, 2 * half_width + 1, 2 * hh + 1)
