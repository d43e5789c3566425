"""Tests of GetCoaddAsTemplateTask and patch stitching."""

from __future__ import annotations

import numpy as np
import pytest

from diffim.errors import BadInputError, InputFileNotFoundError, NoOverlapError, WcsError
from diffim.model import Box, Exposure, GaussianPsf, PhotoCalib
from diffim.tasks.get_template import GetCoaddAsTemplateConfig, GetCoaddAsTemplateTask, find_coadd_files
from diffim.warp import stitch_masked_images, template_coverage, warp_exposure
from diffim.warp.synthetic import make_tan_wcs, random_sky_positions, render_stars


def _tract(rng, n=400):
    """A noisy star field on a 'tract' grid rotated by 0.35° relative to the science grid."""
    wt = make_tan_wcs((n / 2 + 3.3, n / 2 - 2.1), rotation_deg=0.35)
    box = Box(0, 0, n, n)
    ra, dec = random_sky_positions(wt, box, 150, rng)
    psf = GaussianPsf(2.0, size=25)
    img, _, _ = render_stars(box, wt, ra, dec, rng.uniform(200, 5000, ra.size), psf)
    img += rng.normal(0, 1.0, img.shape)
    return Exposure(image=img, variance=np.ones((n, n)), wcs=wt, psf=psf, band="r",
                    photo_calib=PhotoCalib(57.5))


def _patches(tract, overlap=40):
    """Four overlapping quadrants (views sharing the tract WCS in parent coordinates)."""
    n = tract.width
    h = n // 2
    boxes = [Box.from_corners(x0, y0, x1, y1) for (x0, x1) in ((0, h + overlap), (h - overlap, n))
             for (y0, y1) in ((0, h + overlap), (h - overlap, n))]
    return [tract[b].copy() for b in boxes]


def _science(n=240, offset=(80, 80)):
    ws = make_tan_wcs((200 - offset[0], 200 - offset[1]))  # science centre near the tract centre
    return Exposure(image=np.zeros((n, n)), variance=np.ones((n, n)), wcs=ws, band="r")


def test_four_patches_equal_one_large_image():
    """A template stitched from 4 overlapping patches equals the warp of the single large image: every
    destination pixel's Lanczos footprint lies wholly inside at least one patch (overlap 80 px ≫ 6 px), and
    overlapping patches of one coadd hold identical pixels, so the weighted mean returns them exactly —
    equality to float32 rounding (1e-5 of the noise σ = 1) everywhere, not just within the noise."""
    rng = np.random.default_rng(21)
    tract = _tract(rng)
    sci = _science()
    task = GetCoaddAsTemplateTask()
    res = task.run(sci, coaddExposures=_patches(tract))
    bbox = sci.bbox.grown(20)
    single = warp_exposure(tract, sci.wcs, bbox)
    t = res.exposure
    assert t.bbox == bbox and t.wcs is sci.wcs
    assert len(res.patches) == 4 and res.coverage == pytest.approx(1.0)
    nd = t.mask.get("NO_DATA")
    np.testing.assert_array_equal(nd, single.mask.get("NO_DATA"))
    np.testing.assert_allclose(t.image[~nd], single.image[~nd], atol=1e-5, rtol=0)
    np.testing.assert_allclose(t.variance[~nd], single.variance[~nd], rtol=1e-5)
    assert t.band == "r" and t.photo_calib.calibration_mean == 57.5 and t.psf is not None
    assert task.metadata["numPatches"] == 4


def test_patches_from_directory(tmp_path):
    """Patch files named deepCoadd_*.fits are found and read; other FITS files are ignored while deepCoadd_*
    files exist; with none of those, any *.fits is used."""
    from diffim.io import write_exposure

    rng = np.random.default_rng(22)
    tract = _tract(rng)
    for i, p in enumerate(_patches(tract)):
        write_exposure(p, tmp_path / f"deepCoadd_{i}.fits")
    write_exposure(_science(), tmp_path / "unrelated.fits")
    files = find_coadd_files(str(tmp_path), "deep")
    assert len(files) == 4 and all("deepCoadd_" in f for f in files)
    sci = _science()
    res = GetCoaddAsTemplateTask().run(sci, coaddDir=str(tmp_path))
    single = warp_exposure(tract, sci.wcs, sci.bbox.grown(20))
    nd = res.exposure.mask.get("NO_DATA")
    np.testing.assert_allclose(res.exposure.image[~nd], single.image[~nd], atol=1e-4)
    other = tmp_path / "other"
    other.mkdir()
    write_exposure(tract, other / "template.fits")
    assert find_coadd_files(str(other), "deep") == [str(other / "template.fits")]
    with pytest.raises(InputFileNotFoundError):
        find_coadd_files(str(tmp_path / "nope"))


def test_partial_coverage_and_no_data():
    """Science hanging off the tract: uncovered pixels are NO_DATA/NaN; coverage is the covered fraction."""
    rng = np.random.default_rng(23)
    tract = _tract(rng)
    sci = _science(n=200, offset=(-100, 0))  # science x from ≈ 300 to 500 on a 400-px tract: ≈ half covered
    res = GetCoaddAsTemplateTask().run(sci, coaddExposures=_patches(tract))
    assert 0.4 < res.coverage < 0.55
    assert res.coverage == pytest.approx(template_coverage(sci, res.exposure))
    nd = res.exposure.mask.get("NO_DATA")
    assert np.all(np.isnan(res.exposure.image[nd])) and np.all(np.isfinite(res.exposure.image[~nd]))


def test_template_errors():
    rng = np.random.default_rng(24)
    tract = _tract(rng, n=120)
    task = GetCoaddAsTemplateTask()
    far = Exposure(image=np.zeros((50, 50)), wcs=make_tan_wcs((25, 25), crval=(151.0, 2.0)), band="r")
    with pytest.raises(NoOverlapError, match="overlaps"):
        task.run(far, coaddExposures=[tract])
    sci = Exposure(image=np.zeros((50, 50)), wcs=make_tan_wcs((25, 25)), band="r")
    g = tract.copy()
    g.band = "g"
    with pytest.raises(BadInputError, match="different bands"):
        task.run(sci, coaddExposures=[tract, g])
    gsci = Exposure(image=np.zeros((50, 50)), wcs=make_tan_wcs((25, 25)), band="g")
    with pytest.raises(BadInputError, match="science exposure is 'g'"):
        task.run(gsci, coaddExposures=[tract])
    nowcs = tract.copy()
    nowcs.wcs = None
    with pytest.raises(WcsError, match="no WCS"):
        task.run(sci, coaddExposures=[nowcs])
    zp = tract.copy()
    zp.photo_calib = PhotoCalib(10.0)
    with pytest.raises(BadInputError, match="photometric calibrations"):
        task.run(sci, coaddExposures=[tract, zp])
    with pytest.raises(BadInputError, match="coaddDir or coaddExposures"):
        task.run(sci)


def test_stitch_weighting():
    """LSST's modern weights w = V^(-1/2): I = ΣwI/Σw, V = ΣwV/Σw; NO_DATA where no input is good."""
    from diffim.model import MaskedImage

    a = MaskedImage(np.full((2, 3), 1.0), variance=np.full((2, 3), 1.0))
    b = MaskedImage(np.full((2, 3), 4.0), variance=np.full((2, 3), 4.0))
    b.image[0, 0] = np.nan
    a.image[1, 2] = np.nan
    b.image[1, 2] = np.nan
    out = stitch_masked_images([a, b])
    # weights 1 and 1/2: I = (1 + 2)/1.5 = 2, V = (1 + 2)/1.5 = 2
    assert out.image[0, 1] == pytest.approx(2.0) and out.variance[0, 1] == pytest.approx(2.0)
    assert out.image[0, 0] == pytest.approx(1.0) and out.variance[0, 0] == pytest.approx(1.0)
    assert out.mask.get("NO_DATA")[1, 2] and np.isnan(out.image[1, 2])
    assert out.mask.get("NO_DATA").sum() == 1


def test_config_defaults():
    c = GetCoaddAsTemplateConfig()
    assert (c.templateBorderSize, c.coaddName, c.warpType) == (20, "deep", "direct")


def test_patch_holes_filled_by_overlapping_patch():
    """A patch with a NaN/NO_DATA hole (as real coadd edges have): where another patch covers the hole the
    stitched template equals the single-image warp there; the hole never leaks NaN or NO_DATA into it."""
    rng = np.random.default_rng(25)
    tract = _tract(rng)
    patches = _patches(tract)
    hole = Box(170, 170, 60, 60)  # inside the overlap of all four quadrants (160..240)
    p0 = patches[0]
    sub = p0[hole.intersection(p0.bbox)]
    sub.image[...] = np.nan
    sub.mask.set("NO_DATA")
    sci = _science()
    res = GetCoaddAsTemplateTask().run(sci, coaddExposures=patches)
    single = warp_exposure(tract, sci.wcs, sci.bbox.grown(20))
    nd = res.exposure.mask.get("NO_DATA")
    np.testing.assert_array_equal(nd, single.mask.get("NO_DATA"))
    np.testing.assert_allclose(res.exposure.image[~nd], single.image[~nd], atol=1e-5)


def test_small_patch_inside_large_science_is_found():
    """A patch much smaller than the science footprint (no sample of the science grid need land in it) still
    counts as overlapping and fills its part of the template."""
    from diffim.warp.warper import check_overlap

    rng = np.random.default_rng(26)
    tract = _tract(rng, n=400)
    small = tract[Box(195, 195, 12, 12)].copy()
    sci = _science(n=240)
    assert check_overlap(small, sci.wcs, sci.bbox.grown(20)) > 0
    res = GetCoaddAsTemplateTask().run(sci, coaddExposures=[small])
    assert 0 < res.coverage < 0.01


def test_big_source_small_destination_uses_a_cutout():
    """Warping a large image onto a small box gives the same pixels as warping onto the large box and cutting
    (the warper only touches the reachable part of the source)."""
    rng = np.random.default_rng(27)
    tract = _tract(rng, n=400)
    ws = make_tan_wcs((200.0, 200.0))
    big = warp_exposure(tract, ws, Box(0, 0, 400, 400))
    small_box = Box(150, 170, 40, 30)
    small = warp_exposure(tract, ws, small_box)
    np.testing.assert_allclose(small.image, big[small_box].image, atol=1e-4)
    np.testing.assert_array_equal(small.mask.array, big[small_box].mask.array)


def test_stitched_psf_follows_the_patch_with_data():
    """Patches with different PSFs (σ = 1.6 left, 2.4 right, no overlap): the template PSF at a position is
    the warped PSF of the patch covering it; FITS persistence writes an ImagePsf snapshot."""
    from diffim.model.psf import ImagePsf
    from diffim.warp.psf import StitchedPsf

    rng = np.random.default_rng(28)
    tract = _tract(rng, n=400)
    left = tract[Box(0, 0, 200, 400)].copy()
    right = tract[Box(200, 0, 200, 400)].copy()
    left.psf, right.psf = GaussianPsf(1.6), GaussianPsf(2.4)
    sci = _science(n=240)  # science x ≈ 80..320 in tract pixels: straddles the boundary at 200
    res = GetCoaddAsTemplateTask().run(sci, coaddExposures=[left, right])
    psf = res.exposure.psf
    assert isinstance(psf, StitchedPsf)
    assert psf.sigma(20.0, 120.0) == pytest.approx(1.6, rel=0.02)
    assert psf.sigma(220.0, 120.0) == pytest.approx(2.4, rel=0.02)
    # Inside the NO_DATA seam between the patches (and beyond the template): the nearest patch's PSF.
    assert psf.sigma(-50.0, 120.0) == pytest.approx(1.6, rel=0.02)
    assert psf.sigma(400.0, 120.0) == pytest.approx(2.4, rel=0.02)
    back = ImagePsf.from_fits_hdus(psf.to_fits_hdus())
    np.testing.assert_allclose(back.compute_kernel_image(), psf.compute_kernel_image(), atol=1e-12)
