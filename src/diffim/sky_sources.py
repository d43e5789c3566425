"""Sky sources: circular apertures on empty sky, used to measure the noise of the difference image.

Re-implements the modern ``SkyObjectsTask`` algorithm: trial centres from a scrambled 2-D Halton sequence
(``scipy.stats.qmc.Halton(d=2, seed=seed)``) over the image shrunk by ``int(r) + 1``, truncated to integers; a
trial is accepted if its circle (CIRCLE stencil of radius ``int(r)``) touches no avoided pixel; each accepted
circle, dilated by ``int(r)``, is then added to the avoided pixels, so sky sources never overlap.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import qmc

from .detection import _dilate, circle_stencil
from .footprint import Footprint, Peak
from .model.box import Box

__all__ = ["sky_source_positions", "generate_sky_sources"]


def sky_source_positions(shape: tuple[int, int], radius: float, n_trial: int, seed: int,
                         xy0: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Integer trial centres ``(x, y)`` (parent coordinates) from the scrambled Halton sequence.

    The sampled box is the image box shrunk by ``int(radius) + 1``; its inclusive corners ``[min, max]`` are
    mapped from the unit square and truncated with ``astype(int)``, as LSST does.
    """
    border = int(radius) + 1
    x_min, y_min = xy0[0] + border, xy0[1] + border
    x_max, y_max = xy0[0] + shape[1] - 1 - border, xy0[1] + shape[0] - 1 - border
    if n_trial <= 0 or x_max < x_min or y_max < y_min:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    sample = qmc.Halton(d=2, seed=seed).random(int(n_trial))
    sample *= [x_max - x_min, y_max - y_min]
    sample += [x_min, y_min]
    xy = sample.astype(int)
    return xy[:, 0], xy[:, 1]


def generate_sky_sources(
    avoid: np.ndarray,
    n_sources: int = 100,
    radius: float = 8,
    n_trial: int | None = None,
    seed: int = 0,
    *,
    grow_mask: int = 0,
    xy0: tuple[int, int] = (0, 0),
    allow_overlap: bool = False,
) -> list[Footprint]:
    """Place up to ``n_sources`` circular footprints on pixels free of ``avoid``.

    Parameters
    ----------
    avoid
        Boolean map (image shape) of pixels a sky source must not touch (detections, bad pixels, no data).
    n_sources
        Number of sky sources wanted.
    radius
        Circle radius in pixels (``int(radius)`` is used for the stencil).
    n_trial
        Number of Halton trial positions (default ``5 × n_sources``).
    seed
        Seed of the scrambled Halton sequence (LSST uses the exposure id): same seed, same sky sources.
    grow_mask
        Dilate ``avoid`` by this many pixels first (CIRCLE stencil).
    xy0
        Parent coordinates of ``avoid[0, 0]``.
    allow_overlap
        The old (≤ 2023) behaviour: accepted circles are not added to ``avoid``.

    Returns
    -------
    list of Footprint
        Circles with one peak each at the centre (value 0), in Halton order.
    """
    avoid = np.asarray(avoid, dtype=bool)
    r = int(radius)
    n_trial = 5 * n_sources if n_trial is None else int(n_trial)
    if grow_mask > 0:
        avoid = _dilate(avoid, int(grow_mask), True)[grow_mask:-grow_mask, grow_mask:-grow_mask]
    else:
        avoid = avoid.copy()
    xs, ys = sky_source_positions(avoid.shape, radius, n_trial, seed, xy0)
    circle = circle_stencil(r)
    keep_out = _dilate(circle, r, True)  # the circle grown by r: what an accepted source adds to ``avoid``
    ny, nx = avoid.shape
    out: list[Footprint] = []
    for x, y in zip(xs.tolist(), ys.tolist()):
        if len(out) >= n_sources:
            break
        ix, iy = x - xy0[0], y - xy0[1]
        if np.any(avoid[iy - r : iy + r + 1, ix - r : ix + r + 1] & circle):
            continue
        out.append(Footprint(Box(x - r, y - r, 2 * r + 1, 2 * r + 1), circle.copy(), [Peak(x, y, 0.0, 0.0)]))
        if not allow_overlap:
            R = 2 * r
            y0, y1, x0, x1 = iy - R, iy + R + 1, ix - R, ix + R + 1
            cy0, cy1, cx0, cx1 = max(0, y0), min(ny, y1), max(0, x0), min(nx, x1)
            avoid[cy0:cy1, cx0:cx1] |= keep_out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    return out
