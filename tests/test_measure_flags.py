"""Pixel flags: one source per mask plane, placed on that kind of pixel (centre, whole 3×3, footprint only)."""

from __future__ import annotations

import numpy as np
import pytest

from diffim.footprint import Footprint, Peak
from diffim.model import Box, Exposure, GaussianPsf, Mask
from diffim.measure.flags import pixel_flag_names, pixel_flags
from diffim.measure.single_frame import measure_dia_sources

PLANES = [("EDGE", "edge"), ("INTRP", "interpolated"), ("SAT", "saturated"), ("CR", "cr"), ("BAD", "bad"),
          ("SUSPECT", "suspect"), ("NO_DATA", "nodata")]


def _disc_footprint(x, y, r=6):
    box = Box(x - r, y - r, 2 * r + 1, 2 * r + 1)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return Footprint(box, xx**2 + yy**2 <= r * r, [Peak(x, y, 1.0)])


@pytest.mark.parametrize("plane,name", PLANES)
def test_pixel_flag_per_plane(plane, name):
    """Sources at (20,20): plane on the centre pixel; (50,20): on all 3×3; (20,50): only 4 px away, inside the
    footprint; (50,50): clean. Expected: name / nameCenter / nameCenterAll = (T,T,F), (T,T,T), (T,F,F), (F,F,F);
    no other plane's flag is set."""
    mask = Mask.zeros((80, 80))
    where = np.zeros((80, 80), bool)
    where[20, 20] = True
    where[19:22, 49:52] = True
    where[50, 24] = True
    mask.set(plane, where)
    xs = np.array([20.0, 50.0, 20.0, 50.0])
    ys = np.array([20.0, 20.0, 50.0, 50.0])
    fps = [_disc_footprint(int(a), int(b)) for a, b in zip(xs, ys)]
    f = pixel_flags(mask.array, mask.planes, xs, ys, fps)
    assert set(f) == set(pixel_flag_names())
    np.testing.assert_array_equal(f[name], [True, True, True, False])
    np.testing.assert_array_equal(f[name + "Center"], [True, True, False, False])
    np.testing.assert_array_equal(f[name + "CenterAll"], [False, True, False, False])
    for other in pixel_flag_names():
        if not other.startswith(name) and other != "offimage":
            assert not f[other].any(), other
    assert not f["offimage"].any()


def test_offimage_sets_edge_and_unknown_planes_are_false():
    """A centroid off the mask (or NaN) sets offimage and edge; planes the mask lacks (STREAK) give False."""
    mask = Mask.zeros((30, 30))
    f = pixel_flags(mask.array, mask.planes, [-3.0, 10.0, np.nan], [10.0, 10.0, 4.0], xy0=(0, 0))
    np.testing.assert_array_equal(f["offimage"], [True, False, True])
    np.testing.assert_array_equal(f["edge"], [True, False, True])
    assert not f["streak"].any()
    # xy0 is honoured: the same parent position on a shifted mask is on the image.
    f2 = pixel_flags(mask.array, mask.planes, [105.0], [210.0], xy0=(100, 200))
    assert not f2["offimage"][0]


def test_saturated_source_through_measure_dia_sources():
    """A real source whose core is SAT-masked gets pixelFlags_saturated(Center) in the measured columns."""
    psf = GaussianPsf(2.0)
    img = np.zeros((64, 64), np.float32)
    for x in (20.0, 44.0):
        im, box = psf.compute_image(x, 32.0)
        img[box.slices()] += (5e4 * im).astype(np.float32)
    exp = Exposure(image=img, variance=np.ones_like(img), psf=psf)
    exp.mask.set("SAT", (np.abs(np.arange(64)[None, :] - 20) <= 1) & (np.abs(np.arange(64)[:, None] - 32) <= 1))
    cols = measure_dia_sources(exp, [_disc_footprint(20, 32), _disc_footprint(44, 32)])
    np.testing.assert_array_equal(cols["pixelFlags_saturated"], [True, False])
    np.testing.assert_array_equal(cols["pixelFlags_saturatedCenter"], [True, False])
    np.testing.assert_array_equal(cols["pixelFlags_saturatedCenterAll"], [True, False])
