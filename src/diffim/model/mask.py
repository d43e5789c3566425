"""Integer bit-plane masks with named planes, in afw's order.

The default planes and bits follow afw: BAD 0, SAT 1, INTRP 2, CR 3, EDGE 4, DETECTED 5, DETECTED_NEGATIVE 6,
SUSPECT 7, NO_DATA 8. More planes are registered by name with :meth:`Mask.add_plane`. Sub-masks share their
plane dictionary with their parent, so a plane added through a view is known to the whole mask.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import MaskPlaneError, ShapeMismatchError

__all__ = ["Mask", "DEFAULT_MASK_PLANES", "MAX_MASK_PLANES"]

DEFAULT_MASK_PLANES: dict[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
}

#: int32 masks hold 31 usable bits (bit 31 is the sign bit, which afw also leaves alone).
MAX_MASK_PLANES = 31


class Mask:
    """A 2-D int32 bit-plane mask with named planes.

    Parameters
    ----------
    array
        Integer array of shape ``(ny, nx)``; converted to int32 (no copy if it already is int32).
    planes
        Mapping of plane name to bit number. Defaults to a copy of :data:`DEFAULT_MASK_PLANES`.
    """

    __slots__ = ("array", "planes")

    def __init__(self, array: np.ndarray, planes: dict[str, int] | None = None) -> None:
        array = np.asarray(array)
        if array.ndim != 2:
            raise ShapeMismatchError(f"A mask must be 2-D, got an array of shape {array.shape}.")
        if array.dtype != np.int32:
            array = array.astype(np.int32)
        self.array = array
        self.planes = dict(DEFAULT_MASK_PLANES) if planes is None else planes

    @classmethod
    def zeros(cls, shape: tuple[int, int], planes: dict[str, int] | None = None) -> "Mask":
        return cls(np.zeros(shape, dtype=np.int32), None if planes is None else dict(planes))

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape

    def copy(self) -> "Mask":
        """Deep copy (array and plane dictionary)."""
        return Mask(self.array.copy(), dict(self.planes))

    def __getitem__(self, key) -> "Mask":
        """A view of part of the mask sharing this mask's planes."""
        return Mask(self.array[key], self.planes)

    # -- planes ---------------------------------------------------------------------------------------------
    def add_plane(self, name: str) -> int:
        """Register a plane (if new) and return its bit number."""
        if name in self.planes:
            return self.planes[name]
        used = set(self.planes.values())
        for bit in range(MAX_MASK_PLANES):
            if bit not in used:
                self.planes[name] = bit
                return bit
        raise MaskPlaneError(
            f"Cannot add mask plane {name!r}: all {MAX_MASK_PLANES} bits are in use ({sorted(self.planes)})."
        )

    def has_plane(self, name: str) -> bool:
        return name in self.planes

    def bit(self, name: str) -> int:
        """Bit number of plane ``name``; :class:`MaskPlaneError` if unknown."""
        try:
            return self.planes[name]
        except KeyError:
            raise MaskPlaneError(
                f"Unknown mask plane {name!r}; known planes are {sorted(self.planes)}. "
                "Register it with Mask.add_plane() first."
            ) from None

    def bitmask(self, names: str | Iterable[str], *, ignore_missing: bool = False) -> int:
        """OR of the bit values of the named planes (``ignore_missing`` skips unknown names)."""
        if isinstance(names, str):
            names = [names]
        value = 0
        for name in names:
            if ignore_missing and name not in self.planes:
                continue
            value |= 1 << self.bit(name)
        return value

    def get(self, names: str | Iterable[str], *, ignore_missing: bool = False) -> np.ndarray:
        """Boolean array: True where any of the named planes is set."""
        return (self.array & self.bitmask(names, ignore_missing=ignore_missing)) != 0

    def set(self, name: str, where: np.ndarray | None = None) -> None:
        """Set plane ``name`` (registering it if needed) where ``where`` is True (everywhere if None)."""
        value = np.int32(1 << self.add_plane(name))
        if where is None:
            self.array |= value
        else:
            self.array[where] |= value

    def clear(self, names: str | Iterable[str] | None = None, where: np.ndarray | None = None) -> None:
        """Clear the named planes (all planes if None) where ``where`` is True (everywhere if None)."""
        if names is None:
            value = -1
        else:
            value = self.bitmask(names, ignore_missing=True)
        keep = np.int32(~value)
        if where is None:
            self.array &= keep
        else:
            self.array[where] &= keep

    def plane_names(self, value: int) -> list[str]:
        """Names of the planes set in the integer ``value``."""
        return [n for n, b in sorted(self.planes.items(), key=lambda kv: kv[1]) if value & (1 << b)]

    def conform(self, other: "Mask") -> np.ndarray:
        """``other``'s array re-expressed in this mask's bit numbering (planes are matched by name).

        Planes known to ``other`` but not to ``self`` are added to ``self``.
        """
        if other.planes == self.planes or all(self.planes.get(n) == b for n, b in other.planes.items()):
            return other.array
        out = np.zeros(other.shape, dtype=np.int32)
        for name, bit in other.planes.items():
            mine = self.add_plane(name)
            out |= ((other.array >> bit) & 1).astype(np.int32) << mine
        return out

    def __ior__(self, other: "Mask | np.ndarray") -> "Mask":
        arr = self.conform(other) if isinstance(other, Mask) else np.asarray(other, dtype=np.int32)
        if arr.shape != self.shape:
            raise ShapeMismatchError(f"Cannot OR masks of shapes {self.shape} and {arr.shape}.")
        self.array |= arr
        return self

    def __or__(self, other: "Mask") -> "Mask":
        out = self.copy()
        out |= other
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return self.planes == other.planes and np.array_equal(self.array, other.array)

    def __repr__(self) -> str:
        return f"Mask(shape={self.shape}, planes={sorted(self.planes, key=self.planes.get)})"
