"""Tests of source detection (diffim.detection and SourceDetectionTask) on simulated scenes with known truth.

Scenes are white Gaussian noise plus Gaussian-PSF sources drawn with ``GaussianPsf.compute_image``. For a
Gaussian PSF of σ the smoothing kernel is the matched filter, so the significance of a source in the smoothed
image is its optimal PSF S/N, ``flux·Σ g·p / (σ_n √Σ g²)``; :func:`_flux_for_snr` inverts that with the same
discrete sums, independently of the code under test.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import ndimage

from diffim import Exposure, GaussianPsf
from diffim.detection import (
    circle_stencil,
    detect_footprints,
    footprints_to_mask,
    gaussian_kernel_1d,
    manhattan_stencil,
    merge_footprints,
    smoothing_kernel_width,
)
from diffim.errors import MissingPsfError
from diffim.tasks.detection import SourceDetectionConfig, SourceDetectionTask

SIGMA = 2.0  # PSF σ in pixels: kernel width 15, border 7, nGrow = int(2.4·2 + 0.5) = 5


def _psf_stamp(x: float, y: float, sigma: float = SIGMA):
    return GaussianPsf(sigma).compute_image(x, y)


def _flux_for_snr(snr: float, noise: float = 1.0, sigma: float = SIGMA) -> float:
    """Flux of a source centred on a pixel whose smoothed-image significance is ``snr`` (discrete sums)."""
    kw = smoothing_kernel_width(sigma)
    g1 = gaussian_kernel_1d(sigma, kw)
    g = np.outer(g1, g1)
    psf, _ = _psf_stamp(0.0, 0.0, sigma)
    h, hp = kw // 2, psf.shape[0] // 2
    # Σ g·p over the overlap of the two centred stamps.
    m = min(h, hp)
    overlap = float((g[h - m : h + m + 1, h - m : h + m + 1] * psf[hp - m : hp + m + 1, hp - m : hp + m + 1]).sum())
    return snr * noise * math.sqrt(float((g * g).sum())) / overlap


def _scene(shape, sources, noise=1.0, seed=0, sigma=SIGMA, xy0=(0, 0)):
    """Image, variance of white noise (σ = ``noise``) plus ``sources`` = [(x, y, flux)] in parent coords."""
    rng = np.random.default_rng(seed)
    img = (rng.standard_normal(shape) * noise).astype(np.float32) if noise > 0 else np.zeros(shape, np.float32)
    for x, y, flux in sources:
        stamp, box = _psf_stamp(x, y, sigma)
        box = box.shifted(-xy0[0], -xy0[1])
        img[box.slices()] += (flux * stamp).astype(np.float32)
    var = np.full(shape, noise**2 if noise > 0 else 1.0, dtype=np.float32)
    return img, var


def _exposure(img, var, sigma=SIGMA, xy0=(0, 0)):
    return Exposure(image=img, variance=var, psf=GaussianPsf(sigma), xy0=xy0)


def _diffim_task(**overrides) -> SourceDetectionTask:
    cfg = SourceDetectionConfig()
    cfg.thresholdPolarity = "both"
    cfg.reEstimateBackground = False
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return SourceDetectionTask(cfg)


def _nearest_peak(footprints, x, y):
    best, dist = None, np.inf
    for fp in footprints:
        for p in fp.peaks:
            d = math.hypot(p.x - x, p.y - y)
            if d < dist:
                best, dist = (fp, p), d
    return best, dist


# ----------------------------------------------------------------------------------------------------------
def test_positive_and_negative_sources_found_at_true_positions():
    """Six positive and six negative S/N 15–40 sources, well separated, on a 256² noise image.

    Each must give exactly one footprint of its polarity whose first/only peak is within 1 px of the truth
    (the peak is the integer pixel of the smoothed maximum; sub-pixel offsets ≤ 0.5 px plus noise ≪ 1 px at
    S/N ≥ 15), with a significance within 4 of the true S/N (1σ noise + a few % loss off pixel centre).
    Expected noise false positives at 5σ on 256² are ~0.02, so no other footprint may appear.
    """
    rng = np.random.default_rng(11)
    grid = [(40 + 60 * i + rng.uniform(-0.5, 0.5), 40 + 60 * j + rng.uniform(-0.5, 0.5))
            for i in range(4) for j in range(3)]
    snrs = rng.uniform(15, 40, len(grid))
    signs = np.array([1, -1] * 6)
    sources = [(x, y, s * _flux_for_snr(v)) for (x, y), v, s in zip(grid, snrs, signs)]
    img, var = _scene((256, 256), sources, seed=1)
    pos, neg, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "both")
    assert len(pos) == 6 and len(neg) == 6
    for (x, y, flux), snr, sign in zip(sources, snrs, signs):
        (fp, peak), d = _nearest_peak(pos if sign > 0 else neg, x, y)
        assert d <= 1.0
        assert fp.is_negative == (sign < 0) and peak.is_negative == (sign < 0)
        assert len(fp.peaks) == 1
        assert abs(peak.significance - snr) < 4.0
        assert np.sign(peak.value) == sign
        assert fp.contains(x, y)


def test_threshold_is_on_smoothed_significance_noiseless():
    """Noise-free image, variance 1: peak significance must equal Σk·I/√(Σk²·V) exactly (float32 rounding),
    so a source at S/N 5.05 is detected and one at 4.95 is not. A wrong variance filter (Σk·V instead of
    Σk²·V) would put the significance off by a factor √(4πσ²) ≈ 7 and fail both."""
    img, var = _scene((128, 128), [(40, 40, _flux_for_snr(5.05)), (90, 90, _flux_for_snr(4.95)),
                                  (40, 90, _flux_for_snr(6.0))], noise=0.0)
    pos, neg, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "both")
    assert neg == []
    assert len(pos) == 2
    sig = sorted(p.significance for fp in pos for p in fp.peaks)
    np.testing.assert_allclose(sig, [5.05, 6.0], rtol=1e-4)
    xy = sorted((p.x, p.y) for fp in pos for p in fp.peaks)
    assert xy == [(40, 40), (40, 90)]


def test_value_threshold():
    """thresholdType='value': pixels with I_s ≥ t. The smoothed peak value of a noiseless source sits between
    0.9× and 1.1× thresholds: detected at the lower, not at the higher."""
    flux = _flux_for_snr(10.0)
    img, var = _scene((96, 96), [(48, 48, flux)], noise=0.0)
    pos, _, sm, _ = detect_footprints(img, var, None, SIGMA, 1.0, "positive", threshold_type="value")
    peak_value = pos[0].peaks[0].value
    assert peak_value == pytest.approx(float(np.nanmax(sm)))
    assert len(detect_footprints(img, var, None, SIGMA, 0.9 * peak_value, "positive", threshold_type="value")[0]) == 1
    assert len(detect_footprints(img, var, None, SIGMA, 1.1 * peak_value, "positive", threshold_type="value")[0]) == 0


def test_noise_only_false_positives_match_gaussian_field_theory():
    """1024² white noise. The smoothed field is Gaussian with correlation exp(−r²/4σ²); the expected number
    of excursion sets above u (Euler-characteristic density, Adler 1981) is
    A·λ/(2π)^{3/2}·u·exp(−u²/2) with λ = 1/(2σ²). At u = 5 that is 0.16 per polarity: at most 2 footprints
    (P(N ≥ 3) < 0.4 %). At u = 3 (no growth) it is ≈ 277 per polarity; the count must be within ±25 %
    (Poisson σ ≈ 6 %, EC approximation and discreteness ≈ 10 %). A mis-normalised variance moves the
    effective threshold and changes these counts by large factors."""
    img, var = _scene((1024, 1024), [], seed=5)
    pos, neg, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "both")
    assert len(pos) + len(neg) <= 2
    lam = 1.0 / (2 * SIGMA**2)
    area = (1024 - 14) ** 2
    expected = area * lam / (2 * np.pi) ** 1.5 * 3.0 * np.exp(-4.5)
    pos3, neg3, _, _ = detect_footprints(img, var, None, SIGMA, 3.0, "both", n_sigma_to_grow=0.0)
    for n in (len(pos3), len(neg3)):
        assert 0.75 * expected < n < 1.25 * expected, (n, expected)


def test_two_sources_three_fwhm_apart_give_two_peaks():
    """Two S/N 40 and 30 sources 3 FWHM (14.1 px) apart: after growth they share one footprint, which must
    carry both peaks (brighter first, each within 1 px of its truth); a transient with a cosmic ray (single
    hot pixel) 6 px away also gives two peaks."""
    fwhm = 2.35482 * SIGMA
    x1, y1 = 60.2, 64.0
    x2, y2 = x1 + 3 * fwhm, 64.3
    img, var = _scene((128, 160), [(x1, y1, _flux_for_snr(40)), (x2, y2, _flux_for_snr(30))], seed=3)
    img[100, 40] += 100.0  # cosmic ray (smoothed S/N ≈ 29) next to a transient
    stamp, box = _psf_stamp(46.0, 100.0)
    img[box.slices()] += _flux_for_snr(25) * stamp
    pos, neg, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "positive")
    assert neg == []
    (fp, p1), d1 = _nearest_peak(pos, x1, y1)
    (fp2, p2), d2 = _nearest_peak(pos, x2, y2)
    assert fp is fp2 and d1 <= 1 and d2 <= 1
    assert len(fp.peaks) == 2 and fp.peaks[0] is p1 and fp.peaks[1] is p2
    (fcr, pcr), dcr = _nearest_peak(pos, 40, 100)
    (ftr, ptr), dtr = _nearest_peak(pos, 46, 100)
    assert fcr is ftr and dcr <= 1 and dtr <= 1 and pcr is not ptr


def test_peaks_sorted_by_decreasing_value_for_both_polarities():
    """LSST orders peaks by decreasing value for both polarities: in a negative footprint the most negative
    peak is last."""
    fwhm = 2.35482 * SIGMA
    img, var = _scene((96, 128), [(40, 48, -_flux_for_snr(20)), (40 + 3 * fwhm, 48, -_flux_for_snr(50))], noise=0.0)
    _, neg, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "negative")
    assert len(neg) == 1 and len(neg[0].peaks) == 2
    values = [p.value for p in neg[0].peaks]
    assert values[0] > values[1] and values[1] < 0
    assert abs(neg[0].peaks[1].x - (40 + 3 * fwhm)) <= 1


def test_dipole_merges_into_one_footprint_positive_peak_first():
    """A dipole (positive and negative S/N 30 lobes 5 px apart) is detected as one positive and one negative
    footprint; merge_footprints(grow=2) unites them into one footprint flagged from_positive and
    from_negative (not is_negative) with the positive peak first and the negative peak last. An isolated
    negative source stays alone and is flagged is_negative."""
    src = [(50.0, 50.0, _flux_for_snr(30)), (55.0, 50.0, -_flux_for_snr(30)), (50.0, 100.0, -_flux_for_snr(20))]
    img, var = _scene((150, 110), src, seed=4)
    pos, neg, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "both")
    assert len(pos) == 1 and len(neg) == 2
    merged = merge_footprints(pos, neg, grow=2, shape=img.shape)
    assert len(merged) == 2
    dipole = next(fp for fp in merged if fp.from_positive)
    lone = next(fp for fp in merged if not fp.from_positive)
    assert dipole.from_negative and not dipole.is_negative
    assert not dipole.peaks[0].is_negative and dipole.peaks[-1].is_negative
    assert abs(dipole.peaks[0].x - 50) <= 1 and abs(dipole.peaks[-1].x - 55) <= 1
    assert lone.is_negative and lone.from_negative and all(p.is_negative for p in lone.peaks)
    # The merged footprint is the union of the inputs grown by the MANHATTAN(2) stencil.
    grown = footprints_to_mask(pos + neg[:0], img.shape)
    grown = ndimage.binary_dilation(footprints_to_mask(pos, img.shape), structure=manhattan_stencil(2))
    grown |= ndimage.binary_dilation(footprints_to_mask([n for n in neg if n.bbox.y0 < 80], img.shape),
                                     structure=manhattan_stencil(2))
    np.testing.assert_array_equal(footprints_to_mask([dipole], img.shape), grown)


def test_growth_radius_circle_and_manhattan():
    """Grown footprints equal the original ones dilated by nGrow = int(2.4σ + 0.5) = 5 with a disk
    (dx² + dy² ≤ 25) or, with isotropicGrow=False, a diamond (|dx| + |dy| ≤ 5), built here with
    scipy.ndimage.binary_dilation; DETECTED equals their union."""
    img, var = _scene((96, 96), [(40.3, 47.8, _flux_for_snr(25))], seed=8)
    for iso, stencil in ((True, circle_stencil(5)), (False, manhattan_stencil(5))):
        orig, _, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "positive", return_original=True,
                                          isotropic_grow=iso)
        grown, _, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "positive", isotropic_grow=iso)
        assert len(orig) == len(grown) == 1
        expect = ndimage.binary_dilation(footprints_to_mask(orig, img.shape), structure=stencil)
        np.testing.assert_array_equal(footprints_to_mask(grown, img.shape), expect)
        assert grown[0].area > orig[0].area
    d = np.arange(-5, 6)
    assert circle_stencil(5).sum() == (d[None, :] ** 2 + d[:, None] ** 2 <= 25).sum() == 81
    task = _diffim_task()
    exp = _exposure(img.copy(), var)
    res = task.run(exp)
    assert task.metadata["nGrow"] == 5
    np.testing.assert_array_equal(exp.mask.get("DETECTED"), footprints_to_mask(res.positive, img.shape))


def test_task_mask_planes_edge_detected_negative_and_clear():
    """The task sets EDGE on the border of width kw//2 = 7 of the input mask (and nowhere else), DETECTED on
    positive and DETECTED_NEGATIVE on negative grown footprints, and clears stale DETECTED bits first."""
    img, var = _scene((100, 120), [(30, 40, _flux_for_snr(20)), (80, 60, -_flux_for_snr(20))], seed=2)
    exp = _exposure(img, var)
    exp.mask.set("DETECTED", np.pad(np.ones((5, 5), bool), ((0, 95), (60, 55))))  # stale bits at y<5, x 60..64
    task = _diffim_task()
    res = task.run(exp)
    edge = exp.mask.get("EDGE")
    expect = np.ones(img.shape, bool)
    expect[7:-7, 7:-7] = False
    np.testing.assert_array_equal(edge, expect)
    assert task.metadata["smoothingKernelWidth"] == 15 and task.metadata["sigma"] == pytest.approx(2.0)
    det, detn = exp.mask.get("DETECTED"), exp.mask.get("DETECTED_NEGATIVE")
    np.testing.assert_array_equal(det, footprints_to_mask(res.positive, img.shape))
    np.testing.assert_array_equal(detn, footprints_to_mask(res.negative, img.shape))
    assert det[40, 30] and detn[60, 80] and not det[60, 80] and not detn[40, 30]
    assert not det[:5, 60:65].any()
    # Without smoothing there is no kernel border and no EDGE.
    exp2 = _exposure(img, var)
    _diffim_task().run(exp2, doSmooth=False)
    assert not exp2.mask.get("EDGE").any()


def test_task_struct_xy0_order_and_psf_sigma():
    """run() on an exposure at xy0 = (1000, 2000): peaks in parent coordinates, sources = negatives then
    positives, counts, σ from the PSF determinant radius (2.5 here); without a PSF → MissingPsfError."""
    xy0 = (1000, 2000)
    sig = 2.5
    src = [(1030.0, 2040.0, _flux_for_snr(20, sigma=sig)), (1070.0, 2030.0, -_flux_for_snr(20, sigma=sig)),
           (1050.0, 2080.0, -_flux_for_snr(20, sigma=sig))]
    img, var = _scene((120, 100), src, seed=6, sigma=sig, xy0=xy0)
    exp = _exposure(img, var, sigma=sig, xy0=xy0)
    task = _diffim_task()
    res = task.run(exp)
    assert (res.numPos, res.numNeg) == (1, 2)
    assert [fp.is_negative for fp in res.sources] == [True, True, False]
    assert res.sources[2] is res.positive[0]
    for x, y, _ in src:
        assert _nearest_peak(res.sources, x, y)[1] <= 1
    assert task.metadata["sigma"] == pytest.approx(sig, rel=1e-3)
    assert res.sources[0].bbox.x0 >= 1000 and res.sources[0].bbox.y0 >= 2000
    with pytest.raises(MissingPsfError):
        _diffim_task().run(Exposure(image=img, variance=var, xy0=xy0))
    # An explicit sigma needs no PSF.
    res2 = _diffim_task().run(Exposure(image=img, variance=var, xy0=xy0), sigma=sig)
    assert (res2.numPos, res2.numNeg) == (1, 2)


def test_exclude_mask_planes_and_stats_mask():
    """excludeMaskPlanes leaves masked pixels out of detection (they add nothing to the smoothed image and
    variance, and are not detected on); statsMask keeps masked pixels out of the clipped σ of the 'stdev'
    threshold.

    Scene: left quarter noise σ=1 with an S/N 20 source; the rest noise σ=50 flagged BAD. With
    thresholdType='stdev', statsMask containing BAD and excludeMaskPlanes=['BAD'], exactly the source is found
    (σ_clip is that of the σ=1 part). Without BAD in statsMask, σ_clip is dominated by the σ=50 part and the
    source is lost. A garbage BAD pixel on a source makes no detection of its own when BAD is excluded, and the
    source is still found from its good pixels.
    """
    img, var = _scene((128, 256), [(32, 64, _flux_for_snr(20))], seed=9)
    rng = np.random.default_rng(10)
    img[:, 64:] = rng.standard_normal((128, 192)) * 50
    var[:, 64:] = 2500
    exp = _exposure(img, var)
    exp.mask.set("BAD", np.pad(np.ones((128, 192), bool), ((0, 0), (64, 0))))
    task = _diffim_task(thresholdType="stdev", excludeMaskPlanes=["BAD"])
    res = task.run(exp.copy())
    assert res.numNeg == 0 and res.numPos == 1
    assert _nearest_peak(res.positive, 32, 64)[1] <= 1
    task = _diffim_task(thresholdType="stdev", statsMask=[])
    res = task.run(exp.copy())
    assert not any(fp.contains(32, 64) for fp in res.sources)

    img2, var2 = _scene((96, 96), [(48, 48, _flux_for_snr(30))], seed=12)
    img2[48, 48] = -1e6  # a dead pixel in the core
    exp2 = _exposure(img2, var2)
    exp2.mask.set("BAD", np.pad(np.ones((1, 1), bool), ((48, 47), (48, 47))))
    plain = _diffim_task().run(exp2.copy())
    assert plain.numNeg == 1 and plain.numPos == 0  # the garbage wins and hides the source
    res = _diffim_task(excludeMaskPlanes=["BAD"]).run(exp2.copy())
    assert res.numNeg == 0 and res.numPos == 1
    assert _nearest_peak(res.positive, 48, 48)[1] <= 1.5


def test_excluded_bad_column_does_not_swallow_a_neighbouring_source():
    """A bad column of garbage (a ±1000 wave, flagged BAD) 5 px from an S/N 15 source: with BAD excluded the source
    is one detection at its own position and the column makes none; smoothed as data, the column forms
    column-long footprints of both signs (measured on a 2048² scene: transients up to 7 px from a bad column
    were merged into its footprint and centroided onto it)."""
    img, var = _scene((128, 128), [(69, 64, _flux_for_snr(15))], seed=21)
    img[:, 64] = 1000.0 * np.sin(2 * np.pi * np.arange(128) / 40.0)
    exp = _exposure(img, var)
    col = np.zeros((128, 128), bool)
    col[:, 64] = True
    exp.mask.set("BAD", col)
    res = _diffim_task(excludeMaskPlanes=["BAD"]).run(exp.copy())
    assert res.numNeg == 0 and res.numPos == 1
    assert _nearest_peak(res.positive, 69, 64)[1] <= 1.5
    smoothed_as_data = _diffim_task().run(exp.copy())
    assert smoothed_as_data.numNeg >= 1 and smoothed_as_data.numPos >= 1


def test_min_pixels_and_include_threshold_multiplier():
    """minPixels drops small footprints (a faint S/N 5.5 source has a few pixels above 5σ); the multiplier
    keeps only footprints with a pixel above t × multiplier (S/N 30 kept, S/N 8 dropped at 5 × 2)."""
    img, var = _scene((96, 160), [(30, 48, _flux_for_snr(5.5)), (80, 48, _flux_for_snr(8)),
                                  (130, 48, _flux_for_snr(30))], noise=0.0)
    pos, _, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "positive", n_sigma_to_grow=0.0)
    areas = sorted(fp.area for fp in pos)
    assert len(pos) == 3
    pos_min, _, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "positive", min_pixels=areas[0] + 1,
                                         n_sigma_to_grow=0.0)
    assert len(pos_min) == 2
    pos_mult, _, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "positive", include_threshold_multiplier=2.0)
    assert len(pos_mult) == 1 and abs(pos_mult[0].peaks[0].x - 130) <= 1


def test_combined_grow_merges_touching_footprints():
    """Two sources whose 5σ footprints are separate but whose grown footprints overlap: combinedGrow=True
    gives one footprint with both peaks; combinedGrow=False two overlapping grown footprints."""
    img, var = _scene((80, 120), [(45, 40, _flux_for_snr(12)), (59, 40, _flux_for_snr(12))], noise=0.0)
    orig, _, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "positive", return_original=True)
    assert len(orig) == 2
    comb, _, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "positive")
    sep, _, _, _ = detect_footprints(img, var, None, SIGMA, 5.0, "positive", combined_grow=False)
    assert len(comb) == 1 and len(comb[0].peaks) == 2
    assert len(sep) == 2
    np.testing.assert_array_equal(footprints_to_mask(comb, img.shape), footprints_to_mask(sep, img.shape))


def test_nan_and_zero_variance_pixels_are_never_detected():
    """NaN image pixels and zero-variance (no-data) regions must not produce footprints."""
    img, var = _scene((96, 96), [(30, 30, _flux_for_snr(20))], seed=13)
    img[60:70, 60:70] = np.nan
    img[10:20, 70:90] = 0.0
    var[10:20, 70:90] = 0.0
    pos, neg, sm, _ = detect_footprints(img, var, None, SIGMA, 5.0, "both")
    assert len(pos) == 1 and len(neg) == 0


@pytest.mark.slow
def test_detection_timing_2048():
    """Timing print for a 2048² difference with ~500 sources (no timed assertion; see bench/)."""
    rng = np.random.default_rng(0)
    n = 500
    src = [(x, y, s * _flux_for_snr(v)) for x, y, v, s in zip(rng.uniform(20, 2028, n), rng.uniform(20, 2028, n),
                                                             rng.uniform(6, 100, n), rng.choice([-1, 1], n))]
    img, var = _scene((2048, 2048), src, seed=1)
    task = _diffim_task()
    exp = _exposure(img, var)
    task.run(exp)  # warm-up (thread pool, page faults)
    t0 = time.perf_counter()
    res = task.run(_exposure(img, var))
    dt = time.perf_counter() - t0
    print(f"\n2048² detection: {dt:.3f} s, {res.numPos} positive and {res.numNeg} negative footprints")
    assert res.numPos + res.numNeg > 0.8 * n


def test_detection_on_simulated_perfect_difference():
    """diffim.sim 512² pair, perfect difference (science − noiseless static sky, true science variance and
    varying PSF). Every transient/variable/mover with |S/N| > 8 must have a peak within 0.5 FWHM (the 5σ
    detection probability at S/N 8 is > 99.8 %); footprints with no truth object (any kind, cosmic rays
    included) within 2 FWHM are false detections, expected ≈ 0.04 on 512² at 5σ: at most 1 allowed."""
    sim = pytest.importorskip("diffim.sim")
    pair = sim.simulate_pair(size=512, seed=3)
    diff = pair.perfect_difference()
    res = _diffim_task().run(diff)
    fwhm = diff.psf.fwhm(*diff.psf_position())
    truth = pair.truth
    peaks = np.array([(p.x, p.y) for fp in res.sources for p in fp.peaks], float)
    changing = np.isin(np.asarray(truth["kind"]), ["transient", "variable", "mover"]) & (np.abs(truth["snr"]) > 8)
    assert changing.sum() >= 10
    for row in truth[changing]:
        assert np.hypot(peaks[:, 0] - row["x"], peaks[:, 1] - row["y"]).min() <= 0.5 * fwhm
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    false = 0
    for fp in res.sources:
        p = fp.peaks[0]
        if np.hypot(tx - p.x, ty - p.y).min() > 2 * fwhm:
            false += 1
    assert false <= 1


def test_reestimate_background_subtracts_a_pedestal():
    """LSST defaults, and reEstimateBackground=True (the LSST default, off for difference images): a pedestal
    of +0.05 (0.35σ of the smoothed noise, noise σ = 1) is removed from the exposure in place after
    detection: the mean of the undetected pixels becomes ≈ 0 (|mean| < 0.015; its error is 0.004 on 256²),
    and both sources are still found."""
    task = SourceDetectionTask()
    cfg = task.config
    assert (cfg.thresholdValue, cfg.thresholdType, cfg.thresholdPolarity) == (5.0, "pixel_stdev", "positive")
    assert cfg.nSigmaToGrow == 2.4
    assert (cfg.minPixels, cfg.isotropicGrow, cfg.combinedGrow, cfg.nSigmaForKernel) == (1, True, True, 7.0)
    assert list(cfg.statsMask) == ["BAD", "SAT", "EDGE", "NO_DATA"] and list(cfg.excludeMaskPlanes) == []
    assert cfg.reEstimateBackground and not cfg.returnOriginalFootprints and cfg.includeThresholdMultiplier == 1.0
    img, var = _scene((256, 256), [(40, 40, _flux_for_snr(30)), (190, 180, _flux_for_snr(30))], seed=14)
    img += 0.05
    exp = _exposure(img, var)
    res = task.run(exp)
    assert res.numPos == 2 and res.numNeg == 0 and res.background is not None
    free = ~exp.mask.get(["DETECTED", "EDGE"])
    assert abs(float(exp.image[free].mean())) < 0.015


def test_smoothing_kernel_width_and_mask_smearing():
    """kw = (int(7σ + 0.5)//2)·2 + 1 as LSST (σ = 1 → 7, 2 → 15, 2.4 → 17, 2.8 → 21); the
    smoothed image equals a direct 2-D correlation with the normalised Gaussian in the interior and is NaN on
    the border; the smoothed mask is the OR of the bits over the kw × kw box (brute force here)."""
    from diffim.detection import correlate_separable, smear_mask, smooth_for_detection

    assert [smoothing_kernel_width(s) for s in (1.0, 2.0, 2.4, 2.8)] == [7, 15, 17, 21]
    rng = np.random.default_rng(15)
    img = rng.standard_normal((40, 50)).astype(np.float32)
    mask = np.zeros((40, 50), np.int32)
    mask[5, 7] = 1
    mask[30, 40] = 4
    mask[31, 41] = 16
    sm = smooth_for_detection(img, np.ones_like(img), mask, 1.0)
    k = gaussian_kernel_1d(1.0, 7)
    direct = ndimage.correlate(img.astype(float), np.outer(k, k), mode="constant")
    np.testing.assert_allclose(sm.image[3:-3, 3:-3], direct[3:-3, 3:-3], rtol=1e-5, atol=1e-6)
    assert np.isnan(sm.image[:3]).all() and np.isnan(sm.image[:, -3:]).all()
    np.testing.assert_allclose(sm.variance[3:-3, 3:-3], (k**2).sum() ** 2, rtol=1e-5)
    brute = np.zeros_like(mask)
    for y in range(40):
        for x in range(50):
            brute[y, x] = np.bitwise_or.reduce(mask[max(0, y - 3) : y + 4, max(0, x - 3) : x + 4], axis=None)
    np.testing.assert_array_equal(sm.mask, brute)
    np.testing.assert_array_equal(smear_mask(mask, 7), brute)
    tall = rng.standard_normal((300, 30)).astype(np.float32)  # tall enough for the two-thread row split
    out = correlate_separable(tall, k, threads=2)
    direct = ndimage.correlate(tall.astype(float), np.outer(k, k), mode="constant")
    np.testing.assert_allclose(out[3:-3, 3:-3], direct[3:-3, 3:-3], rtol=1e-5, atol=1e-6)
