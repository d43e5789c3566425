"""Tests of sky sources (diffim.sky_sources and SkyObjectsTask): empty-sky circles that avoid detections, bad
pixels and each other, reproducible for a seed, placed along LSST's scrambled Halton sequence."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import qmc

from diffim import Exposure, GaussianPsf, Mask
from diffim.detection import circle_stencil, footprints_to_mask
from diffim.sky_sources import generate_sky_sources, sky_source_positions
from diffim.tasks.sky_objects import SkyObjectsConfig, SkyObjectsTask


def _busy_mask(shape=(300, 400), seed=0) -> Mask:
    """A mask with DETECTED disks, a DETECTED_NEGATIVE block, a BAD column band and a NO_DATA corner."""
    rng = np.random.default_rng(seed)
    mask = Mask.zeros(shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    det = np.zeros(shape, bool)
    for x, y, r in zip(rng.uniform(0, shape[1], 25), rng.uniform(0, shape[0], 25), rng.uniform(3, 12, 25)):
        det |= (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    mask.set("DETECTED", det)
    neg = np.zeros(shape, bool)
    neg[50:90, 200:260] = True
    mask.set("DETECTED_NEGATIVE", neg)
    bad = np.zeros(shape, bool)
    bad[:, 300:310] = True
    mask.set("BAD", bad)
    nodata = np.zeros(shape, bool)
    nodata[250:, :60] = True
    mask.set("NO_DATA", nodata)
    return mask


def test_sky_sources_avoid_masked_pixels_and_never_overlap():
    """Every sky footprint is a radius-8 circle (CIRCLE stencil) with one peak of value 0 at its centre, lies
    inside the image shrunk by int(r)+1, touches no DETECTED / DETECTED_NEGATIVE / BAD / NO_DATA pixel, and no
    two share a pixel (sum of areas = area of the union). EDGE is not avoided by default."""
    mask = _busy_mask()
    mask.set("EDGE", np.pad(np.ones((1, 1), bool), ((150, 149), (200, 199))))  # not in avoidMask
    task = SkyObjectsTask()
    fps = task.run(mask, seed=1234)
    assert 20 <= len(fps) <= 100
    assert task.metadata["sky_footprint_count"] == len(fps)
    avoid = mask.get(["DETECTED", "DETECTED_NEGATIVE", "BAD", "NO_DATA"])
    union = footprints_to_mask(fps, mask.shape)
    assert not (union & avoid).any()
    assert sum(fp.area for fp in fps) == union.sum()
    circle = circle_stencil(8)
    for fp in fps:
        np.testing.assert_array_equal(fp.spans, circle)
        (p,) = fp.peaks
        assert p.value == 0.0 and (p.x, p.y) == (fp.bbox.x0 + 8, fp.bbox.y0 + 8)
        assert 9 <= p.x <= 400 - 1 - 9 and 9 <= p.y <= 300 - 1 - 9


def test_sky_sources_reproducible_for_a_seed_and_follow_halton():
    """Same seed → identical sky sources; another seed → different ones. With nothing to avoid, the first
    positions are the scrambled Halton(d=2, seed) points scaled to the inclusive box [r+1, size−r−2] and
    truncated (LSST's placement), skipping those within the exclusion zone of earlier ones."""
    mask = Mask.zeros((200, 250))
    a = SkyObjectsTask().run(mask, seed=7)
    b = SkyObjectsTask().run(mask, seed=7)
    c = SkyObjectsTask().run(mask, seed=8)
    pa = [(f.peaks[0].x, f.peaks[0].y) for f in a]
    assert pa == [(f.peaks[0].x, f.peaks[0].y) for f in b]
    assert pa != [(f.peaks[0].x, f.peaks[0].y) for f in c]
    sample = qmc.Halton(d=2, seed=7).random(500)
    sample = (sample * [249 - 9 - 9, 199 - 9 - 9] + [9, 9]).astype(int)
    assert pa[0] == tuple(sample[0])
    assert set(pa) <= {tuple(s) for s in sample}
    # Accepted positions keep more than 2r + ... apart: the circle grown by r is avoided afterwards.
    xy = np.array(pa, float)
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    d[np.diag_indices(len(xy))] = np.inf
    assert d.min() > 16


def test_sky_objects_config_and_xy0():
    """nSources, sourceRadius, nTrialSources and growMask are honoured; an Exposure's xy0 shifts the
    footprints to parent coordinates."""
    cfg = SkyObjectsConfig()
    assert list(cfg.avoidMask) == ["DETECTED", "DETECTED_NEGATIVE", "BAD", "NO_DATA"]
    assert (cfg.growMask, cfg.sourceRadius, cfg.nSources, cfg.nTrialSources, cfg.nTrialSourcesMultiplier) == (
        0, 8, 100, None, 5)
    cfg.nSources = 10
    cfg.sourceRadius = 5
    exp = Exposure(image=np.zeros((150, 160), np.float32), xy0=(500, 700), psf=GaussianPsf(2.0))
    fps = SkyObjectsTask(cfg).run(exp, seed=3)
    assert len(fps) == 10
    for fp in fps:
        assert fp.spans.shape == (11, 11)
        assert 506 <= fp.peaks[0].x <= 500 + 159 - 6 and 706 <= fp.peaks[0].y <= 700 + 149 - 6
    cfg2 = SkyObjectsConfig()
    cfg2.nTrialSources = 3
    assert len(SkyObjectsTask(cfg2).run(Mask.zeros((300, 300)), seed=1)) == 3

    # growMask: sky circles keep growMask pixels away from avoided pixels.
    mask = _busy_mask(seed=4)
    cfg3 = SkyObjectsConfig()
    cfg3.growMask = 4
    fps = SkyObjectsTask(cfg3).run(mask, seed=11)
    assert len(fps) > 0
    from scipy import ndimage

    avoid = mask.get(["DETECTED", "DETECTED_NEGATIVE", "BAD", "NO_DATA"])
    grown = ndimage.binary_dilation(avoid, structure=circle_stencil(4))
    assert not (footprints_to_mask(fps, mask.shape) & grown).any()


def test_sky_sources_full_mask_and_tiny_image():
    """No room: an all-DETECTED mask or an image smaller than a sky source gives no sky sources, no error."""
    m = Mask.zeros((100, 100))
    m.set("DETECTED")
    assert SkyObjectsTask().run(m, seed=1) == []
    assert generate_sky_sources(np.zeros((10, 10), bool), radius=8) == []
    xs, ys = sky_source_positions((10, 10), 8, 50, seed=1)
    assert xs.size == 0 and ys.size == 0


@pytest.mark.parametrize("seed", [0, 2**40 + 5])
def test_large_seeds_accepted(seed):
    """Exposure ids are large integers; they seed the Halton sequence directly."""
    assert len(generate_sky_sources(np.zeros((120, 120), bool), n_sources=5, seed=seed)) == 5
