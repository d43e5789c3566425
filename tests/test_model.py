"""Tests of the data model: boxes, masks, masked-image arithmetic, exposures and the constant PSFs."""

import numpy as np
import pytest

from diffim.errors import MaskPlaneError, ShapeMismatchError
from diffim.model import Box, Exposure, GaussianPsf, ImagePsf, Mask, MaskedImage


def test_default_mask_planes_in_afw_order():
    m = Mask.zeros((3, 3))
    order = ["BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "SUSPECT", "NO_DATA"]
    assert [m.bit(n) for n in order] == list(range(9))
    assert m.array.dtype == np.int32


def test_mask_add_set_clear_and_unknown_plane():
    m = Mask.zeros((4, 4))
    bit = m.add_plane("STREAK")
    assert bit == 9
    m.set("STREAK", np.eye(4, dtype=bool))
    assert m.get("STREAK").sum() == 4
    m.clear("STREAK")
    assert not m.get("STREAK").any()
    with pytest.raises(MaskPlaneError, match="Unknown mask plane 'NOPE'"):
        m.bit("NOPE")


def test_mask_conform_maps_planes_by_name():
    a = Mask.zeros((2, 2))
    b = Mask(np.zeros((2, 2), np.int32), {"SAT": 3, "FOO": 0})
    b.array[0, 0] = 1 << 3
    b.array[1, 1] = 1
    a |= b
    assert a.get("SAT")[0, 0] and not a.get("SAT")[1, 1]
    assert a.get("FOO")[1, 1]


def test_masked_image_arithmetic_follows_afw():
    a = MaskedImage(np.full((3, 3), 2.0), variance=np.full((3, 3), 1.0))
    b = MaskedImage(np.full((3, 3), 0.5), variance=np.full((3, 3), 3.0))
    b.mask.set("SAT", np.eye(3, dtype=bool))
    d = a - b
    assert np.allclose(d.image, 1.5) and np.allclose(d.variance, 4.0)
    assert d.mask.get("SAT").sum() == 3
    s = a * 3.0
    assert np.allclose(s.image, 6.0) and np.allclose(s.variance, 9.0)
    with pytest.raises(ShapeMismatchError):
        a + MaskedImage(np.zeros((2, 2)))


def test_subexposure_is_a_view_in_parent_coordinates():
    e = Exposure(image=np.zeros((10, 20)), xy0=(100, 200), psf=GaussianPsf(2.0))
    sub = e[Box(105, 203, 4, 2)]
    assert sub.bbox == Box(105, 203, 4, 2)
    sub.image[:] = 1.0
    sub.mask.set("CR")
    assert e.image.sum() == 8 and e.mask.get("CR").sum() == 8
    assert np.shares_memory(sub.image, e.image)


def test_gaussian_psf_moments_and_subpixel_image():
    psf = GaussianPsf(1.7, sigma_minor=1.3, theta=0.4)
    ixx, iyy, ixy = psf.compute_shape()
    measured = ImagePsf(psf.compute_kernel_image()).compute_shape()
    assert np.allclose((ixx, iyy, ixy), measured, rtol=1e-3, atol=1e-3)
    img, box = psf.compute_image(10.3, 20.6)
    yy, xx = np.mgrid[box.y0 : box.y1, box.x0 : box.x1]
    assert abs((img * xx).sum() - 10.3) < 1e-3 and abs((img * yy).sum() - 20.6) < 1e-3
    assert abs(psf.fwhm() - 2.35482 * (1.7 * 1.3) ** 0.5) < 1e-3


def test_image_psf_shifted_centroid():
    psf = ImagePsf(GaussianPsf(2.0).compute_kernel_image())
    img, box = psf.compute_image(3.25, 4.6)
    yy, xx = np.mgrid[box.y0 : box.y1, box.x0 : box.x1]
    assert abs((img * xx).sum() - 3.25) < 0.02 and abs((img * yy).sum() - 4.6) < 0.02
