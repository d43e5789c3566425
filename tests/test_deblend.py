"""Per-peak DIA sources: two changes in one footprint are two sources; noise wiggles on one source are not."""

import numpy as np

from diffim.deblend import split_footprints
from diffim.footprint import Footprint, Peak
from diffim.model import Box, GaussianPsf


def _scene(positions, fluxes, sigma=2.0, shape=(64, 96)):
    img = np.zeros(shape)
    psf = GaussianPsf(sigma)
    for (x, y), f in zip(positions, fluxes):
        stamp, box = psf.compute_image(x, y)
        img[box.slices()] += f * stamp
    return img


def _footprint(img, peaks, negative=False):
    box = Box(0, 0, img.shape[1], img.shape[0])
    return Footprint(box, np.ones(img.shape, bool), peaks, is_negative=negative)


def test_two_separated_sources_become_two():
    img = _scene([(30, 32), (50, 32)], [1.0, 0.6])  # 10σ apart: a deep saddle between them
    snr = img / img.max() * 50
    peaks = [Peak(30, 32, snr[32, 30], snr[32, 30]), Peak(50, 32, snr[32, 50], snr[32, 50])]
    children, parents = split_footprints([_footprint(img, peaks)], snr, min_separation=4.7, min_significance=5)
    assert len(children) == 2 and list(parents) == [0, 0]
    assert {(c.peaks[0].x, c.peaks[0].y) for c in children} == {(30, 32), (50, 32)}


def test_wiggle_without_saddle_stays_one_source():
    img = _scene([(40, 32)], [1.0])
    snr = img / img.max() * 50
    # A spurious local maximum on the wing: no dip between it and the main peak.
    peaks = [Peak(40, 32, snr[32, 40], snr[32, 40]), Peak(44, 32, snr[32, 44], snr[32, 44])]
    children, _ = split_footprints([_footprint(img, peaks)], snr, min_separation=2.0, min_significance=5)
    assert len(children) == 1
    assert (children[0].peaks[0].x, children[0].peaks[0].y) == (40, 32)


def test_faint_peak_below_threshold_is_not_a_source():
    img = _scene([(30, 32), (60, 32)], [1.0, 0.05])
    snr = img / img.max() * 50  # the second peak has significance 2.5
    peaks = [Peak(30, 32, snr[32, 30], snr[32, 30]), Peak(60, 32, snr[32, 60], snr[32, 60])]
    children, _ = split_footprints([_footprint(img, peaks)], snr, min_separation=4.7, min_significance=5)
    assert len(children) == 1


def test_far_apart_opposite_lobes_split_close_ones_stay_a_dipole():
    pos = _scene([(30, 32)], [1.0]) - _scene([(33, 32)], [1.0])  # 3-px dipole
    snr = pos / np.abs(pos).max() * 30
    peaks = [Peak(29, 32, snr[32, 29], 30), Peak(34, 32, snr[32, 34], 30, is_negative=True)]
    fp = _footprint(pos, peaks)
    children, _ = split_footprints([fp], snr, max_dipole_separation=10.0)
    assert len(children) == 1 and len(children[0].peaks) == 2
    mover = _scene([(20, 32)], [1.0]) - _scene([(70, 32)], [1.0])  # 50 px apart: a fast mover
    snr = mover / np.abs(mover).max() * 30
    peaks = [Peak(20, 32, snr[32, 20], 30), Peak(70, 32, snr[32, 70], 30, is_negative=True)]
    children, _ = split_footprints([_footprint(mover, peaks)], snr, max_dipole_separation=10.0)
    assert len(children) == 2
    assert sorted(c.is_negative for c in children) == [False, True]


def test_transient_beside_a_dipole_is_its_own_source():
    """A bright star's dipole residual and a transient 16 px away (a saddle of ~0 between them) share one
    merged footprint: the dipole stays one source (both lobes) and the transient becomes a second one
    (it used to be swallowed, as a footprint with peaks of both signs was never split)."""
    img = _scene([(30, 32), (50, 40)], [1.0, 0.4]) - _scene([(33, 32)], [1.0])
    snr = img / np.abs(img).max() * 60
    peaks = [Peak(29, 32, snr[32, 29], snr[32, 29]), Peak(50, 40, snr[40, 50], snr[40, 50]),
             Peak(34, 32, snr[32, 34], snr[32, 34], is_negative=True)]
    children, parents = split_footprints([_footprint(img, peaks)], snr, min_separation=4.7, min_significance=5,
                                         max_dipole_separation=10.0)
    assert len(children) == 2 and list(parents) == [0, 0]
    dipole = next(c for c in children if len(c.peaks) > 1)
    assert {p.is_negative for p in dipole.peaks} == {False, True}
    single = next(c for c in children if len(c.peaks) == 1)
    assert (single.peaks[0].x, single.peaks[0].y) == (50, 40) and not single.is_negative
    # A wiggle on the dipole's own positive lobe (no saddle) is not split off.
    peaks_w = peaks[:1] + [Peak(27, 32, snr[32, 27], snr[32, 27])] + peaks[2:]
    children, _ = split_footprints([_footprint(img, peaks_w)], snr, min_separation=1.0, min_significance=5,
                                   max_dipole_separation=10.0)
    assert len(children) == 1
