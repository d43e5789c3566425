"""Pixel flags from mask planes (cf. meas_base ``PixelFlags``).

For each mask plane: ``<name>`` if any footprint pixel has it ("anywhere"), ``<name>Center`` if any pixel of
the 3×3 box around the centroid has it, ``<name>CenterAll`` if all of them do. ``offimage`` (and ``edge``) when
the centroid is off the image. Names are meas_base's (``base_PixelFlags_flag_<name>``; APDB ``pixelFlags_<name>``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..footprint import Footprint
from ._stamps import gather_stamps

__all__ = ["PIXEL_FLAG_PLANES", "pixel_flags", "pixel_flag_names"]

#: Mask plane → flag name, as meas_base names them. Planes absent from a mask are skipped (flags False).
PIXEL_FLAG_PLANES: dict[str, str] = {
    "EDGE": "edge",
    "INTRP": "interpolated",
    "SAT": "saturated",
    "CR": "cr",
    "BAD": "bad",
    "SUSPECT": "suspect",
    "NO_DATA": "nodata",
    "STREAK": "streak",
    "INJECTED": "injected",
    "INJECTED_TEMPLATE": "injected_template",
    "HIGH_VARIANCE": "high_variance",
    "SAT_TEMPLATE": "saturated_template",
    "SPIKE": "spike",
}


def pixel_flag_names(planes: Mapping[str, str] = PIXEL_FLAG_PLANES) -> list[str]:
    """Every flag name :func:`pixel_flags` returns, in order (without prefix)."""
    names = ["offimage"]
    for name in planes.values():
        names += [name, name + "Center", name + "CenterAll"]
    return names


def pixel_flags(
    mask: np.ndarray,
    mask_planes: Mapping[str, int],
    x: np.ndarray,
    y: np.ndarray,
    footprints: Sequence[Footprint | None] | None = None,
    *,
    xy0: tuple[int, int] = (0, 0),
    planes: Mapping[str, str] = PIXEL_FLAG_PLANES,
) -> dict[str, np.ndarray]:
    """Pixel flags for many sources.

    Parameters
    ----------
    mask
        Integer mask array ``[y, x]``.
    mask_planes
        Plane name → bit number of ``mask`` (``Mask.planes``).
    x, y
        Centroids (parent coordinates); non-finite centroids count as off the image.
    footprints
        One footprint (or None) per source for the "anywhere" flags; without it the anywhere flags use the
        3×3 centre box only.
    xy0
        Parent coordinates of ``mask[0, 0]``.
    planes
        Mask plane → flag name mapping (default :data:`PIXEL_FLAG_PLANES`).

    Returns
    -------
    dict
        Flag name (see :func:`pixel_flag_names`) → boolean array of shape ``(n,)``.
    """
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    n = len(x)
    h, w = mask.shape
    finite = np.isfinite(x) & np.isfinite(y)
    ix = np.where(finite, np.floor(np.where(finite, x, 0) + 0.5), -10**6).astype(np.int64) - xy0[0]
    iy = np.where(finite, np.floor(np.where(finite, y, 0) + 0.5), -10**6).astype(np.int64) - xy0[1]
    offimage = ~finite | (ix < 0) | (ix >= w) | (iy < 0) | (iy >= h)
    box, inside = gather_stamps(mask, ix - 1, iy - 1, 3, 3, fill=0)
    box = box.reshape(n, 9).astype(np.int64)
    inside = inside.reshape(n, 9)
    center_or = np.bitwise_or.reduce(np.where(inside, box, 0), axis=1)
    center_and = np.bitwise_and.reduce(np.where(inside, box, -1), axis=1)
    center_and = np.where(inside.any(axis=1), center_and, 0)
    anywhere = center_or.copy()
    if footprints is not None:
        for i, fp in enumerate(footprints):
            if fp is None:
                continue
            b = fp.bbox
            # Clip the footprint box to the mask (footprints may hang over the edge).
            x0, y0 = max(b.x0 - xy0[0], 0), max(b.y0 - xy0[1], 0)
            x1, y1 = min(b.x1 - xy0[0], w), min(b.y1 - xy0[1], h)
            if x1 <= x0 or y1 <= y0:
                continue
            sp = fp.spans[y0 - (b.y0 - xy0[1]) : y1 - (b.y0 - xy0[1]), x0 - (b.x0 - xy0[0]) : x1 - (b.x0 - xy0[0])]
            vals = mask[y0:y1, x0:x1][sp]
            if vals.size:
                anywhere[i] |= int(np.bitwise_or.reduce(vals.astype(np.int64)))
    out: dict[str, np.ndarray] = {"offimage": offimage}
    for plane, name in planes.items():
        if plane not in mask_planes:
            out[name] = np.zeros(n, bool)
            out[name + "Center"] = np.zeros(n, bool)
            out[name + "CenterAll"] = np.zeros(n, bool)
            continue
        bit = np.int64(1) << np.int64(mask_planes[plane])
        out[name] = (anywhere & bit) != 0
        out[name + "Center"] = (center_or & bit) != 0
        out[name + "CenterAll"] = ((center_and & bit) != 0) & inside.all(axis=1)
    if "edge" in out:
        out["edge"] = out["edge"] | offimage
    return out
