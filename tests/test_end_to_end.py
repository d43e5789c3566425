"""ImageDifferenceTask end to end on simulated scenes with known truth (figures of ../shared/design/metrics.md).

The default tests run one 768² scene; the slow ones run the issue's three 2048² scenes (≥ 300 transients in
all, on galaxies too, saturated stars with bleed trails) and assert the "Done when" figures. A wrong kernel,
variance, PSF or photometry breaks at least one of: noise ratio, star χ², completeness, false rate, flux bias,
pull width.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffim import metrics
from diffim.sim import simulate_pair
from diffim.tasks.image_difference import ImageDifferenceConfig, ImageDifferenceTask


def _run(pair, **overrides):
    cfg = ImageDifferenceConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    task = ImageDifferenceTask(config=cfg)
    res = task.run(exposure=pair.science.copy(), templateExposure=pair.template.copy())
    fwhm = pair.science.psf.fwhm()
    ev = metrics.evaluate(res.subtractedExposure, res.diaSources, pair.truth, fwhm,
                          flux_unit_scale=res.subtractedExposure.photo_calib)
    return res, ev, task


@pytest.fixture(scope="module")
def small_run():
    pair = simulate_pair(size=768, seed=5)
    return pair, *_run(pair)


def test_small_scene_figures(small_run):
    """768² scene: noise ratio and star χ² at the noise floor, every bright transient found, few false."""
    pair, res, ev, task = small_run
    assert abs(ev["noise_ratio"] - 1.0) < 0.03, ev
    assert ev["star_chi2_p95"] <= 1.3, ev
    assert ev["completeness_snr7"] >= 0.95, ev
    assert ev["false_per_mpix"] <= 3.0, ev  # < 2 false sources on 0.6 Mpix; the 2048² test asserts ≤ 1/Mpix
    assert abs(ev["flux_bias"]) < 0.02, ev
    assert 0.8 < ev["pull_std"] < 1.2, ev


def test_catalogue_and_metadata(small_run):
    pair, res, ev, task = small_run
    cat = res.diaSources
    for col in ("diaSourceId", "x", "y", "ra", "dec", "psfFlux", "psfFluxErr", "apFlux", "scienceFlux",
                "isNegative", "isDipole", "snr", "pixelFlags_edge"):
        assert col in cat.colnames, col
    assert cat.meta["FLUXUNIT"] == "nJy"
    assert len(np.unique(cat["diaSourceId"])) == len(cat)
    md = task.metadata
    for stage in ("subtract", "decorrelate", "detection", "measurement", "forcedMeasurement"):
        assert stage in md["stageWallTime"]
    assert md["counts"]["nDiaSources"] == len(cat)
    assert abs(md["quality"]["noiseRatio"] - 1.0) < 0.05
    # Negative changes (variables fading) come out negative.
    assert cat["isNegative"].sum() >= 1


def test_difference_psf_varies_like_the_science_psf(small_run):
    """The decorrelated difference keeps a spatially varying PSF (its width follows the science PSF)."""
    pair, res, ev, task = small_run
    d, s = res.subtractedExposure.psf, pair.science.psf
    b = pair.science.bbox
    lo, hi = (b.x0 + 50, b.y0 + 50), (b.x1 - 50, b.y1 - 50)
    ratio_d = d.fwhm(*hi) / d.fwhm(*lo)
    ratio_s = s.fwhm(*hi) / s.fwhm(*lo)
    assert ratio_s > 1.05
    assert abs(ratio_d - ratio_s) < 0.03


def _three_scenes():
    """The issue's three 2048² scenes (seeds and options fixed; ~336 transients each)."""
    return [dict(seed=31), dict(seed=32, psf_profile="moffat"), dict(seed=33, n_saturated=30)]


@pytest.mark.slow
def test_2048_scenes_done_when_figures():
    """Issue 5: completeness ≥ 98 % (isolated, S/N ≥ 7), ≥ 90 % on galaxies, ≤ 1 false/Mpix, |flux bias|
    < 1 % (S/N ≥ 15), pull std 1 ± 0.1 — pooled over three 2048² scenes (pull widths averaged); issue 4: noise
    ratio 1 ± 0.03 and star χ² p95 ≤ 1.3 in each."""
    n_found = n_iso = n_gal_found = n_gal = n_false = 0
    area = 0.0
    biases, pulls = [], []
    for opts in _three_scenes():
        pair = simulate_pair(size=2048, **opts)
        res, ev, task = _run(pair)
        assert abs(ev["noise_ratio"] - 1.0) < 0.03, (opts, ev)
        assert ev["star_chi2_p95"] <= 1.3, (opts, ev)
        n_iso += ev["n_snr7"]
        n_found += round(ev["completeness_snr7"] * ev["n_snr7"])
        n_gal += ev["n_galaxy"]
        n_gal_found += round(ev["completeness_galaxy"] * ev["n_galaxy"])
        n_false += ev["n_false"]
        e = 6 * ev["fwhm"]
        area += (2048 - 2 * e) ** 2
        biases.append(ev["flux_bias"])
        pulls.append(ev["pull_std"])
    assert n_found / n_iso >= 0.98, (n_found, n_iso)
    assert n_gal_found / n_gal >= 0.90, (n_gal_found, n_gal)
    assert n_false / area * 1e6 <= 1.0, (n_false, area)
    assert all(abs(b) < 0.01 for b in biases), biases
    # Each scene's robust pull width has a ~0.06 sampling error (~220 transients), and one of these scenes
    # gives 1.14 even on its *perfect* difference (science − noiseless static sky); the three are averaged.
    assert abs(np.mean(pulls) - 1.0) < 0.1, pulls


def test_sky_sources_are_measured_like_the_rest():
    """doSkySources: the sky sources' PSF fluxes are pure noise, so flux/error has mean 0 ± 0.1 and std 1 ± 0.1
    (over 400 of them: the standard error of the std is ~0.035); they are flagged and not counted as DIA sources."""
    pair = simulate_pair(size=1024, seed=8)
    cfg = ImageDifferenceConfig()
    cfg.doSkySources = True
    cfg.skySources.nSources = 400
    task = ImageDifferenceTask(config=cfg)
    res = task.run(exposure=pair.science.copy(), templateExposure=pair.template.copy())
    cat = res.diaSources
    sky = np.asarray(cat["sky_source"], bool)
    assert sky.sum() >= 300
    pull = np.asarray(cat["psfFlux"], float)[sky] / np.asarray(cat["psfFluxErr"], float)[sky]
    pull = pull[np.isfinite(pull)]
    assert abs(pull.mean()) < 0.1, pull.mean()
    assert abs(pull.std() - 1.0) < 0.1, pull.std()
    assert task.metadata["counts"]["nSkySources"] == sky.sum()
    assert task.metadata["counts"]["nDiaSources"] == (~sky).sum()


@pytest.mark.parametrize("template_psf, expect_template", [("sharper", True), ("broader", False)])
def test_automatic_convolution_direction(template_psf, expect_template):
    """subtract.al.mode="auto" convolves the sharper image: the template when it is sharper, the science when
    the template is broader (then convolving the template would need a deconvolution and the noise ratio and
    star residuals show it)."""
    from diffim.pipeline import make_config

    pair = simulate_pair(size=512, seed=13, template_psf=template_psf)
    task = ImageDifferenceTask(config=make_config(["subtract.al.mode=auto"]))
    res = task.run(exposure=pair.science.copy(), templateExposure=pair.template.copy())
    assert task.metadata["convolveTemplateAuto"] is expect_template
    assert task.metadata["subtract"]["convolvedExposure"] == ("Template" if expect_template else "Science")
    ev = metrics.evaluate(res.subtractedExposure, res.diaSources, pair.truth, pair.science.psf.fwhm(),
                          flux_unit_scale=res.subtractedExposure.photo_calib)
    assert abs(ev["noise_ratio"] - 1.0) < 0.05, ev
    assert ev["star_chi2_p95"] < 1.5, ev
