"""Every behavioural switch of ImageDifferenceConfig, flipped on one shared simulated pair, with its effect.

One 512² pair (``simulate_pair(size=512, seed=SEED, template_depth=1, n_dipoles=3)``: a template as deep as the
science so that the AL convolution visibly correlates the difference noise, and three dipoles for the merge and
dipole switches) is simulated once per module. Runs are cached by name so that each configuration is processed
once. To keep the file fast, the switches that act *after* the subtraction are flipped on runs that re-use the
default run's difference image through ``doSubtract=False`` (which is itself the test of that switch), and the
switches that act *before* detection are flipped on subtraction-only runs (``doDetection=False``).

Each test compares the flipped run against the default run and asserts the documented difference with a margin
that a no-op switch would fail (the statistical argument is given where a statistic is used).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from diffim.errors import BadInputError, ConfigError, InsufficientTemplateCoverageError
from diffim.sim import simulate_pair
from diffim.tasks.image_difference import ImageDifferenceConfig, ImageDifferenceTask

SEED = 11
PAIR_OPTIONS = dict(template_depth=1.0, n_dipoles=3)

_RUNS: dict = {}


class _Stop(Exception):
    """Raised by a stubbed step to end a run once the behaviour under test has happened."""


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def make_config(**overrides) -> ImageDifferenceConfig:
    """Default config with overrides; keys may be dotted (``subtract__name`` or ``"subtract.name"``)."""
    config = ImageDifferenceConfig()
    for key, value in overrides.items():
        path = key.replace("__", ".").split(".")
        obj = config
        for part in path[:-1]:
            obj = getattr(obj, part)
        if path[-1] == "name" and path[:-1] == ["subtract"]:
            config.subtract.name = value
        else:
            setattr(obj, path[-1], value)
    return config


SUBTRACT_ONLY = dict(doDetection=False, doMeasurement=False, doMerge=False, doSkySources=False)
# The default star selector (S/N > 50, widths within 0.15 px of the mode) keeps only ~10 stars of a 512² field
# whose PSF FWHM varies by 10 %; these switches need kernel candidates from it, so loosen it to keep ~30.
RELAXED_SELECTOR = {"sourceSelector.signalToNoiseMin": 20.0, "sourceSelector.widthStdAllowed": 0.4}


def run_task(pair, subtracted=None, science=None, template=None, **overrides):
    """Run ImageDifferenceTask on copies of the pair; returns (task, result)."""
    config = make_config(**overrides)
    task = ImageDifferenceTask(config=config)
    science = pair.science.copy() if science is None else science
    template = pair.template.copy() if template is None else template
    result = task.run(exposure=science, templateExposure=template, subtractedExposure=subtracted)
    return task, result


def cached_run(pair, name, **overrides):
    if name not in _RUNS:
        _RUNS[name] = run_task(pair, **overrides)
    return _RUNS[name]


def detect_run(pair, name, default_run, **overrides):
    """Detection + measurement on a copy of the default run's difference (``doSubtract=False``)."""
    if name not in _RUNS:
        diff = default_run[1].subtractedExposure.copy()
        _RUNS[name] = run_task(pair, subtracted=diff, doSubtract=False, **overrides)
    return _RUNS[name]


def lag1_correlation(exposure) -> float:
    """Correlation coefficient of horizontally adjacent D/σ values on empty sky."""
    bad = exposure.mask.get(["NO_DATA", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "SAT", "CR", "BAD"],
                            ignore_missing=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(bad, np.nan, exposure.image / np.sqrt(exposure.variance))
    a, b = z[:, :-1], z[:, 1:]
    ok = np.isfinite(a) & np.isfinite(b)
    a = a[ok] - a[ok].mean()
    b = b[ok] - b[ok].mean()
    return float((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean()))


def noise_ratio(task) -> float:
    return task.metadata.to_plain()["quality"]["noiseRatio"]


def col(table, name):
    return np.asarray(table[name])


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    return simulate_pair(size=512, seed=SEED, **PAIR_OPTIONS)


@pytest.fixture(scope="module")
def default_run(pair):
    """The default configuration on the pair (full pipeline)."""
    return cached_run(pair, "default")


@pytest.fixture(scope="module")
def detect_default(pair, default_run):
    """Default detection/measurement on the default difference, given through doSubtract=False."""
    return detect_run(pair, "detect_default", default_run)


@pytest.fixture(scope="module")
def no_decorr_run(pair):
    return cached_run(pair, "no_decorr", doDecorrelation=False, **SUBTRACT_ONLY)


@pytest.fixture(scope="module")
def score_run(pair):
    return cached_run(pair, "score", useScoreImageDetection=True)


def test_default_run_is_sane(default_run, pair):
    """The baseline every switch is compared with: white noise of unit ratio and the planted dipoles found."""
    task, res = default_run
    assert 0.95 < noise_ratio(task) < 1.08
    cat = res.diaSources
    assert len(cat) > 20
    assert col(cat, "isDipole").sum() >= 2


# ---------------------------------------------------------------------------------------------------------------
# validate()
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(doSubtract=False, **SUBTRACT_ONLY),
        dict(doDetection=False),  # doMeasurement/doMerge still True
        dict(doDetection=False, doMeasurement=False, doMerge=False, doSkySources=True),
        dict(doUseRegister=True),
        dict(doScaleTemplateVariance=True),  # with the default doScaleDiffimVariance=True
        dict(subtract__name="zogy", doWriteMatchedExp=True),
        dict(subtract__name="zogy", doAddMetrics=True),
        dict(subtract__name="zogy", doSelectSources=True),
        dict(subtract__name="zogy", useScoreImageDetection=True, useGaussianForPreConvolution=True),
        dict(useScoreImageDetection=True, convolveTemplate=False),
        dict(doWriteScoreExp=True),
        dict(useGaussianForPreConvolution=True),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_validate_rules_raise_config_error(overrides):
    """Each forbidden combination of lsst_algorithms.md §1.1 fails validate() (and the task constructor)."""
    config = make_config(**overrides)
    with pytest.raises(ConfigError):
        config.validate()
    with pytest.raises(ConfigError):
        ImageDifferenceTask(config=config)


def test_validate_accepts_zogy_with_default_decorrelation():
    """Deviation (docs/deviations.md): -c subtract.name=zogy just works, doDecorrelation is ignored for ZOGY."""
    make_config(subtract__name="zogy").validate()


# ---------------------------------------------------------------------------------------------------------------
# subtraction-block switches
# ---------------------------------------------------------------------------------------------------------------
def test_doDecorrelation(default_run, no_decorr_run, pair):
    """Decorrelation whitens the difference and changes its PSF.

    With a template as deep as the science, the AL-convolved template noise correlates neighbouring difference
    pixels (lag-1 ρ ≈ 0.05); decorrelation removes most of it. The standard error of ρ on ~2·10⁵ pixels is
    ~0.002, so a change > 0.02 is ≫ noise. The decorrelated PSF is φ ⊗ PSF_sci: measurably sharper (§3).
    """
    dtask, dres = default_run
    ntask, nres = no_decorr_run
    rho_dec = lag1_correlation(dres.subtractedExposure)
    rho_raw = lag1_correlation(nres.subtractedExposure)
    assert rho_raw > 0.03
    assert rho_raw - rho_dec > 0.02
    pos = pair.science.psf_position()
    fwhm_dec = dres.subtractedExposure.psf.fwhm(*pos)
    fwhm_raw = nres.subtractedExposure.psf.fwhm(*pos)
    assert fwhm_raw == pytest.approx(pair.science.psf.fwhm(*pos), rel=0.01)  # the science PSF
    assert fwhm_raw - fwhm_dec > 0.1
    assert "decorrelate" in dtask.metadata["stageWallTime"]
    assert "decorrelate" not in ntask.metadata["stageWallTime"]


def test_doDetection_false_returns_no_catalogue(no_decorr_run, default_run):
    """doDetection=False: the difference is made but nothing is detected or measured."""
    task, res = no_decorr_run
    assert res.subtractedExposure is not None
    assert res.diaSources is None
    assert "detection" not in task.metadata["stageWallTime"]
    assert default_run[1].diaSources is not None


def test_doSpatiallyVarying(pair, default_run):
    """Decorrelation on a grid of positions: a different (position-dependent) difference, still white."""
    task, res = cached_run(pair, "spatial", doSpatiallyVarying=True, **SUBTRACT_ONLY)
    d0 = default_run[1].subtractedExposure.image
    d1 = res.subtractedExposure.image
    ok = np.isfinite(d0) & np.isfinite(d1)
    assert not np.allclose(d0[ok], d1[ok], rtol=0, atol=1e-3)
    assert abs(noise_ratio(task) - 1.0) < 0.05
    assert lag1_correlation(res.subtractedExposure) < 0.03
    # its PSF model blends the same grid of filters (not the centre filter everywhere)
    nodes = res.subtractedExposure.psf.nodes
    assert nodes is not None and nodes.kernels.shape[:2] == nodes.shape


def test_convolveTemplate_false_convolves_the_science(pair, default_run):
    """convolveTemplate=False: the science is the convolved image (metadata), the difference keeps unit noise."""
    task, res = cached_run(pair, "convolve_science", convolveTemplate=False, **SUBTRACT_ONLY)
    md = task.metadata.to_plain()
    assert md["subtract"]["convolvedExposure"] == "Science"
    assert default_run[0].metadata.to_plain()["subtract"]["convolvedExposure"] == "Template"
    assert abs(noise_ratio(task) - 1.0) < 0.06
    # The matched image is the science convolved to the (sharper) template PSF, and the difference takes the
    # template PSF; by default the template is matched to the science PSF.
    pos = pair.science.psf_position()
    fwhm_t, fwhm_s = pair.template.psf.fwhm(*pos), pair.science.psf.fwhm(*pos)
    assert fwhm_s - fwhm_t > 0.5
    assert res.matchedExposure.psf.fwhm(*pos) == pytest.approx(fwhm_t, rel=0.02)
    assert default_run[1].matchedExposure.psf.fwhm(*pos) == pytest.approx(fwhm_s, rel=0.02)
    assert abs(np.nanmedian(res.matchedExposure.image) - np.nanmedian(pair.science.image)) < 5.0


def test_subtract_zogy(pair):
    """subtract.name=zogy: ZOGY difference (no matched template, no AL decorrelation), white, with a score."""
    task, res = cached_run(pair, "zogy", subtract__name="zogy", useScoreImageDetection=True, **SUBTRACT_ONLY)
    md = task.metadata.to_plain()
    assert md["psfMatchingAlgorithm"] == "zogy"
    assert res.matchedExposure is None
    assert "decorrelate" not in md["stageWallTime"]
    assert abs(noise_ratio(task) - 1.0) < 0.05
    assert res.scoreExposure is not None


def test_useScoreImageDetection(score_run, default_run):
    """Detection runs, unsmoothed, on the AL likelihood image; the regular difference is still made."""
    task, res = score_run
    md = task.metadata.to_plain()
    assert res.scoreExposure is not None
    assert res.subtractedExposure is not None
    assert md["detection"]["doSmooth"] is False
    assert default_run[0].metadata.to_plain()["detection"]["doSmooth"] is True
    assert "scoreImage" in md["stageWallTime"]
    assert len(res.diaSources) > 10
    # The score image is the PSF-filtered difference: its pixels are strongly correlated.
    assert lag1_correlation(res.scoreExposure) > 0.5


def test_useGaussianForPreConvolution(pair, score_run):
    """The score image is pre-convolved with a Gaussian of the PSF's σ instead of the PSF model.

    The simulated PSF is a spatially varying Gaussian, so the two score images must be close (correlation > 0.99)
    yet not identical.
    """
    task, res = cached_run(pair, "score_gauss", useScoreImageDetection=True, useGaussianForPreConvolution=True,
                           **SUBTRACT_ONLY)
    s0 = score_run[1].scoreExposure.image
    s1 = res.scoreExposure.image
    ok = np.isfinite(s0) & np.isfinite(s1)
    assert not np.array_equal(s0[ok], s1[ok])
    assert np.corrcoef(s0[ok], s1[ok])[0, 1] > 0.99


def test_doScaleTemplateVariance(pair):
    """The template variance is rescaled (in place, before matching) by the factor stored in metadata."""
    template = pair.template.copy()
    task, res = run_task(pair, template=template, doScaleTemplateVariance=True, doScaleDiffimVariance=False,
                         **SUBTRACT_ONLY)
    md = task.metadata.to_plain()
    factor = md["scaleTemplateVarianceFactor"]
    assert "scaleDiffimVarianceFactor" not in md
    assert np.isfinite(factor) and factor > 0
    ok = np.isfinite(pair.template.variance) & (pair.template.variance > 0)
    np.testing.assert_allclose(res.warpedExposure.variance[ok], factor * pair.template.variance[ok], rtol=1e-4)


def test_doSelectSources_doAddMetrics_control_sample(pair, default_run):
    """doSelectSources: kernel candidates come from the star selector, with every controlStepSize-th star (after
    a controlRandomSeed shuffle) held back as control sample; doAddMetrics: kernel-QA metrics of both samples."""
    task, res = cached_run(pair, "select", doSelectSources=True, doAddMetrics=True, **RELAXED_SELECTOR,
                           **SUBTRACT_ONLY)
    md = task.metadata.to_plain()
    nk, nc = md["nKernelSources"], md["nControlSources"]
    assert nk > 5 and nc > 0
    assert nc == -(-(nk + nc) // 5)  # every 5th (controlStepSize) of the shuffled selection
    assert len(res.kernelSources) == nk and len(res.controlSources) == nc
    assert md["subtract"]["nKernelCandidates"] <= nk
    kx = set(np.round(np.asarray(res.kernelSources["x"], float), 3))
    cx = set(np.round(np.asarray(res.controlSources["x"], float), 3))
    assert not kx & cx
    for label in ("kernel", "control"):
        assert any(k.startswith(f"{label}_") for k in md), md.keys()
    assert not any(k.startswith("control_") for k in default_run[0].metadata.to_plain())
    assert res.subtractedExposure is not None and abs(noise_ratio(task) - 1) < 0.06


def test_doAddMetrics_without_selected_sources(pair):
    """doAddMetrics alone (no doSelectSources): the metrics are of the subtraction's own kernel candidates,
    and there is no control sample to report (it crashed on the candidates' type, and reported the kernel
    candidates again as the 'control' sample)."""
    task, res = cached_run(pair, "metrics_only", doAddMetrics=True, **SUBTRACT_ONLY)
    md = task.metadata.to_plain()
    assert md["kernel_n"] >= 3 and np.isfinite(md["kernel_chi2_MEDIAN"])
    assert 0.5 < md["kernel_chi2_MEDIAN"] < 2.0  # kernel stars of a good subtraction: unit χ² per pixel
    assert not any(k.startswith("control_") for k in md)


def test_controlStepSize_and_controlRandomSeed(pair):
    """The control sample is every Nth star of a seeded shuffle: N sets its size, the seed which stars."""
    science = pair.science

    def split(step, seed, select=None):
        task = ImageDifferenceTask(config=make_config(doSelectSources=True, controlStepSize=step,
                                                      controlRandomSeed=seed))
        return task._select_kernel_sources(science, select)

    k5, c5, select = split(5, 10)
    k3, c3, _ = split(3, 10, select)
    _, c5b, _ = split(5, 99, select)
    n = len(k5) + len(c5)
    assert len(k3) + len(c3) == n
    assert len(c5) == -(-n // 5) and len(c3) == -(-n // 3)
    assert set(np.asarray(c5["x"])) != set(np.asarray(c5b["x"]))
    k5again, c5again, _ = split(5, 10, select)
    assert set(np.asarray(c5again["x"])) == set(np.asarray(c5["x"]))


def _misregistered_template(pair, shift=(1.6, -1.2)):
    """The template with its WCS reference pixel moved by ``shift`` pixels (a WCS error of ~2 px)."""
    t = pair.template.copy()
    w = t.wcs.deepcopy()
    w.wcs.crpix = w.wcs.crpix + np.asarray(shift)
    t.wcs = w
    return t


def test_doUseRegister_doDebugRegister_templateSipOrder(pair, monkeypatch):
    """doUseRegister re-fits the template WCS from matched sources (TAN-SIP of order templateSipOrder) before
    warping, which undoes a 2-px WCS error; doDebugRegister stores the match diagnostics in metadata."""
    fitted = {}
    from diffim.tasks.register import RegisterTask

    orig = RegisterTask.run

    def spy(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        fitted["wcs"] = out.wcs
        fitted["sipOrder"] = kwargs.get("sipOrder")
        return out

    monkeypatch.setattr(RegisterTask, "run", spy)
    bad = _misregistered_template(pair)
    task, res = run_task(pair, template=bad, doUseRegister=True, doSelectSources=True, doDebugRegister=True,
                         templateSipOrder=3, **RELAXED_SELECTOR, **SUBTRACT_ONLY)
    md = task.metadata.to_plain()
    assert fitted["sipOrder"] == 3
    assert md["registerMatches"] >= 10
    assert isinstance(md.get("registerDebug"), dict) and md["registerDebug"]
    # The fitted WCS puts the template's stars where the science WCS says they are: the 2-px error is reduced
    # to < 0.25 px (the centroid noise of ~20 faint matched stars and a 3rd-order SIP allow ~0.1 px).
    stars = pair.truth[(pair.truth["kind"] == "star") & (pair.truth["flux_template"] > 5e3)]

    def wcs_error(wcs):
        ra, dec = wcs.all_pix2world(np.asarray(stars["x_template"]), np.asarray(stars["y_template"]), 0)
        sx, sy = pair.science.sky_to_pixel(ra, dec)
        return float(np.median(np.hypot(sx - np.asarray(stars["x"]), sy - np.asarray(stars["y"]))))

    assert wcs_error(bad.wcs) > 1.5
    assert wcs_error(fitted["wcs"]) < 0.25
    # The warped template lands on the true template pixels; without registration it is ~2 px off.
    task0, res0 = run_task(pair, template=_misregistered_template(pair), **SUBTRACT_ONLY)
    assert "registerMatches" not in task0.metadata.to_plain()
    sel = stars[np.asarray(stars["isolated"], bool) & ~np.asarray(stars["saturated"], bool)
                & (stars["x"] > 10) & (stars["x"] < 500) & (stars["y"] > 10) & (stars["y"] < 500)]
    yy, xx = np.mgrid[-3:4, -3:4]

    def shift(warped):
        """Median distance between star centroids (7×7 first moments) in ``warped`` and the true template."""
        d = []
        for x, y in zip(np.rint(sel["x"]).astype(int), np.rint(sel["y"]).astype(int)):
            c = []
            for img in (warped.image, pair.template.image):
                st = img[y - 3:y + 4, x - 3:x + 4].astype(float)
                st = st - np.nanmedian(img[y - 12:y + 13, x - 12:x + 13])
                c.append(((st * xx).sum() / st.sum(), (st * yy).sum() / st.sum()))
            d.append(np.hypot(c[0][0] - c[1][0], c[0][1] - c[1][1]))
        return float(np.nanmedian(d))

    assert shift(res0.warpedExposure) > 1.0
    assert shift(res.warpedExposure) < 0.25
    assert abs(noise_ratio(task) - 1.0) < 0.1


def test_doAddCalexpBackground(pair, default_run):
    """The calexp background image is added to the science before processing (only when switched on)."""
    bg = np.full(pair.science.shape, 123.0, dtype=np.float32)
    for flag in (True, False):
        science = pair.science.copy()
        task = ImageDifferenceTask(config=make_config(doSubtract=False, doAddCalexpBackground=flag,
                                                      doMeasurement=False, doForcedMeasurement=False))
        task.run(exposure=science, subtractedExposure=default_run[1].subtractedExposure.copy(),
                 calexpBackgroundExposure=bg)
        expected = pair.science.image + (123.0 if flag else 0.0)
        np.testing.assert_allclose(science.image, expected, rtol=0, atol=1e-2)


def test_requiredTemplateFraction(pair, monkeypatch):
    """A template covering ~45 % of the science is refused below requiredTemplateFraction, accepted above."""
    template = pair.template.copy()
    nx = template.width
    template.image[:, : int(0.55 * nx)] = np.nan
    template.mask.array[:, : int(0.55 * nx)] |= template.mask.bitmask(["NO_DATA"])
    with pytest.raises(InsufficientTemplateCoverageError):
        run_task(pair, template=template.copy(), requiredTemplateFraction=0.5, **SUBTRACT_ONLY)

    # With a lower threshold the task goes on to subtract (stopped there: the point is the coverage check).
    from diffim.tasks.image_psf_match import ImagePsfMatchTask

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(ImagePsfMatchTask, "subtractExposures", stop)
    config = make_config(requiredTemplateFraction=0.4, **SUBTRACT_ONLY)
    task = ImageDifferenceTask(config=config)
    with pytest.raises(_Stop):
        task.run(exposure=pair.science.copy(), templateExposure=template.copy())
    assert task.metadata["templateCoveragePercent"] == pytest.approx(45.0, abs=1.0)
    task0 = ImageDifferenceTask(config=make_config(requiredTemplateFraction=0.0, **SUBTRACT_ONLY))
    almost_empty = pair.template.copy()
    almost_empty.image[:, 5:] = np.nan
    almost_empty.mask.array[:, 5:] |= almost_empty.mask.bitmask(["NO_DATA"])
    with pytest.raises(_Stop):  # 0 = always attempt
        task0.run(exposure=pair.science.copy(), templateExposure=almost_empty)


def test_coaddName_selects_the_template_patches(pair, tmp_path, monkeypatch):
    """With a coadd directory, the template is built from the <coaddName>Coadd_*.fits patches."""
    from diffim.io import write_exposure
    from diffim.tasks.image_psf_match import ImagePsfMatchTask

    write_exposure(pair.template, tmp_path / "deepCoadd_0.fits")
    half = pair.template.copy()
    half.image[:, : pair.template.width // 2] = np.nan
    half.mask.array[:, : pair.template.width // 2] |= half.mask.bitmask(["NO_DATA"])
    write_exposure(half, tmp_path / "goodSeeingCoadd_0.fits")

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(ImagePsfMatchTask, "subtractExposures", stop)
    coverage = {}
    for name in ("deep", "goodSeeing"):
        task = ImageDifferenceTask(config=make_config(coaddName=name, **SUBTRACT_ONLY))
        with pytest.raises(_Stop):
            task.run(exposure=pair.science.copy(), coaddDir=str(tmp_path))
        coverage[name] = task.metadata["templateCoveragePercent"]
    assert coverage["deep"] > 99.0
    assert coverage["goodSeeing"] == pytest.approx(50.0, abs=2.0)


# ---------------------------------------------------------------------------------------------------------------
# detection-block switches (on the default difference, given with doSubtract=False)
# ---------------------------------------------------------------------------------------------------------------
def test_doSubtract_false_uses_the_given_difference(detect_default, default_run, pair):
    """doSubtract=False: no subtraction, the given difference is detected and measured (deviation from LSST,
    where the argument was overwritten); without a difference it is a BadInputError."""
    task, res = detect_default
    md = task.metadata.to_plain()
    assert res.subtractRes is None and res.warpedExposure is None
    assert "subtract" not in md["stageWallTime"]
    # Same sources, up to one or two at the threshold: the static-star residual variance (doStarResidualVariance)
    # takes its static model from the template side, which a run without subtraction does not have (it falls
    # back to the science, with the residual scatter stored in the difference's metadata).
    given, default = res.diaSources, default_run[1].diaSources
    assert abs(len(given) - len(default)) <= 2
    d = np.hypot(np.asarray(given["x"])[:, None] - np.asarray(default["x"])[None, :],
                 np.asarray(given["y"])[:, None] - np.asarray(default["y"])[None, :])
    assert (d.min(axis=1) < 1.0).sum() >= len(default) - 2
    with pytest.raises(BadInputError):
        ImageDifferenceTask(config=make_config(doSubtract=False)).run(exposure=pair.science.copy())


def test_doSkySources(pair, default_run, detect_default):
    """Sky sources: extra rows flagged sky_source=True, placed away from detections, measured like the rest."""
    task, res = detect_run(pair, "sky", default_run, doSkySources=True)
    cat = res.diaSources
    sky = col(cat, "sky_source").astype(bool)
    n_sky = task.config.skySources.nSources
    assert sky.sum() >= 0.8 * n_sky
    assert (~sky).sum() == len(detect_default[1].diaSources)
    assert not col(detect_default[1].diaSources, "sky_source").any()
    assert task.metadata.to_plain()["counts"]["nSkySources"] == sky.sum()
    # Empty sky: the PSF fluxes of sky sources scatter around 0 with unit pulls (mean pull within 4/√N).
    pull = col(cat, "psfFlux")[sky] / col(cat, "psfFluxErr")[sky]
    pull = pull[np.isfinite(pull)]
    assert abs(np.mean(pull)) < 4.0 / np.sqrt(pull.size) + 0.1


def test_doMerge_false_keeps_dipole_lobes_separate(pair, default_run, detect_default):
    """Without merging, the positive and negative lobes of each planted dipole are separate sources."""
    task, res = detect_run(pair, "nomerge", default_run, doMerge=False)
    merged = detect_default[1].diaSources
    cat = res.diaSources
    dip = pair.truth[pair.truth["kind"] == "dipole"]
    assert len(dip) == 3

    def near(table, x, y, r=6.0):
        return np.hypot(col(table, "x") - x, col(table, "y") - y) < r

    n_split = 0
    for row in dip:
        m_unmerged = near(cat, row["x"], row["y"])
        m_merged = near(merged, row["x"], row["y"])
        if col(merged, "isDipole")[m_merged].any():
            assert col(cat, "isNegative")[m_unmerged].any() and (~col(cat, "isNegative")[m_unmerged]).any()
            assert not col(cat, "isDipole")[m_unmerged].any()
            n_split += 1
    assert n_split >= 2
    assert col(cat, "isNegative").sum() > col(merged, "isNegative").sum()


def test_growFootprint(pair, default_run):
    """Footprints are grown by growFootprint before merging: larger growth merges more footprints together."""
    counts = {}
    for grow in (0, 2, 12):
        task, res = detect_run(pair, f"grow{grow}", default_run, growFootprint=grow, doMeasurement=False,
                               doForcedMeasurement=False)
        counts[grow] = task.metadata["nMergedFootprints"]
    assert counts[0] >= counts[2] > counts[12]


def test_doMeasurement_false(pair, default_run, detect_default):
    """Without measurement the catalogue holds positions only: no PSF fluxes, shapes or dipole fits."""
    task, res = detect_run(pair, "nomeas", default_run, doMeasurement=False, doForcedMeasurement=False)
    cat = res.diaSources
    assert len(cat) == len(detect_default[1].diaSources)
    for name in ("psfFlux", "apFlux", "ixx", "dipoleMeanFlux"):
        assert name not in cat.colnames or np.all(np.isnan(col(cat, name).astype(float)))
        assert np.isfinite(col(detect_default[1].diaSources, name).astype(float)).any()
    assert "measurement" not in task.metadata["stageWallTime"]


def test_doDipoleFitting_false(pair, default_run, detect_default):
    """Without the dipole fit no source is classified a dipole and the dipole columns stay empty."""
    task, res = detect_run(pair, "nodipole", default_run, doDipoleFitting=False)
    cat = res.diaSources
    base = detect_default[1].diaSources
    assert col(base, "isDipole").sum() >= 2
    assert not col(cat, "isDipole").any()
    assert np.all(np.isnan(col(cat, "dipoleMeanFlux").astype(float)))
    assert np.isfinite(col(cat, "psfFlux").astype(float)).mean() > 0.9


def test_doApCorr(pair, default_run, detect_default):
    """doApCorr: PSF fluxes are multiplied by the aperture correction measured on the science stars."""
    task, res = detect_run(pair, "noapcorr", default_run, doApCorr=False)
    base = detect_default[1].diaSources
    cat = res.diaSources
    apc = col(base, "psfFlux_apCorr").astype(float)
    assert np.isfinite(apc).all() and np.all(apc > 0)
    assert "psfFlux_apCorr" not in cat.colnames or np.all(np.isnan(col(cat, "psfFlux_apCorr").astype(float)))
    ratio = col(base, "psfFlux").astype(float) / col(cat, "psfFlux").astype(float)
    ok = np.isfinite(ratio)
    np.testing.assert_allclose(ratio[ok], apc[ok], rtol=1e-5)
    assert "apCorrValue" in default_run[0].metadata.to_plain()  # measured on the science stars


def test_doForcedMeasurement(pair, default_run, detect_default):
    """Forced PSF photometry of the science at each DIA source: scienceFlux ≈ true science flux for stars."""
    task, res = detect_run(pair, "noforced", default_run, doForcedMeasurement=False)
    cat = res.diaSources
    base = detect_default[1].diaSources
    assert "scienceFlux" not in cat.colnames or np.all(np.isnan(col(cat, "scienceFlux").astype(float)))
    sf = col(base, "scienceFlux").astype(float)
    assert np.isfinite(sf).mean() > 0.9
    # Bright isolated hostless transients (S/N > 20): the forced science flux (nJy) is their true science flux;
    # the median ratio of ≥ 3 of them is within 10 % (per-object errors ≤ 5 %, an unmodelled neighbour aside).
    truth = pair.truth
    kinds = np.array([k.decode() if isinstance(k, bytes) else str(k) for k in truth["kind"]])
    sel = truth[(kinds == "transient") & (np.asarray(truth["host"]) < 0) & np.asarray(truth["isolated"], bool)
                & (np.asarray(truth["snr"]) > 20)]
    calib = pair.science.photo_calib.calibration_mean
    ratios = []
    for row in sel:
        d = np.hypot(col(base, "x") - row["x"], col(base, "y") - row["y"])
        j = int(np.argmin(d))
        if d[j] < 2.0:
            ratios.append(sf[j] / (row["flux_science"] * calib))
    assert len(ratios) >= 3
    assert abs(np.median(ratios) - 1.0) < 0.1
    assert "forcedMeasurement" not in task.metadata["stageWallTime"]


def test_doMatchSources_and_diaSourceMatchRadius(pair, default_run, tmp_path):
    """DIA sources are matched to science sources (srcMatchId) and reference objects (refMatchId) within
    diaSourceMatchRadius arcseconds; a tiny radius matches (almost) nothing."""
    from astropy.table import Table

    truth = pair.truth
    stars = truth[(truth["kind"] == "star") | (truth["kind"] == "variable")]
    ref = Table({"id": np.arange(len(stars)) + 1000, "ra": stars["ra"], "dec": stars["dec"]})
    ref_path = tmp_path / "ref.csv"
    ref.write(ref_path, format="ascii.csv")
    diff = default_run[1].subtractedExposure
    results = {}
    for radius in (0.5, 1e-4):
        config = make_config(doSubtract=False, doMatchSources=True, diaSourceMatchRadius=radius,
                             doMeasurement=False, doForcedMeasurement=False)
        config.refObjLoader.filename = str(ref_path)
        task = ImageDifferenceTask(config=config)
        results[radius] = task.run(exposure=pair.science.copy(), subtractedExposure=diff.copy()).diaSources
    wide, tiny = results[0.5], results[1e-4]
    n_src = (col(wide, "srcMatchId") >= 0).sum()
    n_ref = (col(wide, "refMatchId") >= 0).sum()
    # Variable stars change flux on top of a science star and a reference object.
    var = truth[truth["kind"] == "variable"]
    assert n_src >= 3 and n_ref >= 3
    assert (col(tiny, "srcMatchId") >= 0).sum() < n_src and (col(tiny, "refMatchId") >= 0).sum() < n_ref
    matched_ref = set(col(wide, "refMatchId")[col(wide, "refMatchId") >= 0])
    assert matched_ref <= set(ref["id"])
    assert len(var) > 0
    assert "srcMatchId" not in default_run[1].diaSources.colnames


def test_doScaleDiffimVariance(pair, default_run):
    """A difference whose variance plane is 2x too large is rescaled by ~1/2 (factor in metadata)."""
    factors = {}
    for flag in (True, False):
        diff = default_run[1].subtractedExposure.copy()
        v0 = diff.variance.copy()
        diff.variance *= 2.0
        task = ImageDifferenceTask(config=make_config(doSubtract=False, doScaleDiffimVariance=flag,
                                                      doMeasurement=False, doForcedMeasurement=False))
        res = task.run(exposure=pair.science.copy(), subtractedExposure=diff)
        md = task.metadata.to_plain()
        ok = np.isfinite(v0) & (v0 > 0)
        if flag:
            factors[flag] = md["scaleDiffimVarianceFactor"]
            assert md["scaleDiffimVarianceFactor"] == pytest.approx(0.5, rel=0.03)
            np.testing.assert_allclose(res.subtractedExposure.variance[ok], 2.0 * factors[flag] * v0[ok], rtol=1e-4)
        else:
            assert "scaleDiffimVarianceFactor" not in md
            np.testing.assert_allclose(res.subtractedExposure.variance[ok], 2.0 * v0[ok], rtol=1e-6)


def test_doPreConvolve_is_deprecated_and_has_no_effect(pair, default_run, detect_default):
    """doPreConvolve (superseded by useScoreImageDetection): setting it warns (FutureWarning) and changes nothing."""
    config = ImageDifferenceConfig()
    with pytest.warns(FutureWarning, match="doPreConvolve"):
        config.doPreConvolve = True
    diff = default_run[1].subtractedExposure.copy()
    cfg = make_config(doSubtract=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cfg.doPreConvolve = True
    res = ImageDifferenceTask(config=cfg).run(exposure=pair.science.copy(), subtractedExposure=diff)
    base = detect_default[1].diaSources
    assert len(res.diaSources) == len(base)
    np.testing.assert_array_equal(col(res.diaSources, "x"), col(base, "x"))
    np.testing.assert_array_equal(col(res.diaSources, "psfFlux"), col(base, "psfFlux"))


# ---------------------------------------------------------------------------------------------------------------
# output switches (run_files)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_files(pair, tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    pair.write(d)
    return d / "science.fits", d / "template.fits"


_ALWAYS = {"config.py", "metadata.json"}
_SOURCES = {"diaSources.parquet", "diaSources.fits"}


@pytest.mark.parametrize(
    "switches, expected",
    [
        (dict(), {"difference.fits"} | _SOURCES | _ALWAYS),
        (dict(doWriteSubtractedExp=False, doWriteSources=False), _ALWAYS),
        (dict(doWriteMatchedExp=True, doWriteWarpedExp=True, doWriteScoreExp=True, useScoreImageDetection=True),
         {"difference.fits", "matched.fits", "warped.fits", "score.fits"} | _SOURCES | _ALWAYS),
        (dict(saveMetadata=False), {"difference.fits", "config.py"} | _SOURCES),
    ],
    ids=["defaults", "no-difference-no-sources", "matched-warped-score", "no-metadata"],
)
def test_doWrite_switches_control_run_files_outputs(pair_files, score_run, switches, expected, tmp_path, monkeypatch):
    """run_files writes exactly the images/catalogues its doWrite* switches ask for, config.py always and
    metadata.json when saveMetadata (diagnostics.png is off here: plot=False).

    The task's run() is replaced by the cached score-mode result (which has every image) so that only the
    writing logic is exercised here; tests/test_cli.py runs the real thing end to end.
    """
    from diffim.io import read_exposure
    from diffim.pipeline import run_files

    cached = score_run[1]
    monkeypatch.setattr(ImageDifferenceTask, "run", lambda self, **kwargs: cached)
    config = make_config(**switches)
    out = tmp_path / "out"
    result = run_files(*pair_files, out, config=config, plot=False, progress=False)
    written = {p.name for p in out.iterdir()}
    assert written == expected
    assert {p.name for p in result.files.values()} == expected
    if "score.fits" in expected:
        np.testing.assert_array_equal(read_exposure(out / "score.fits").image, cached.scoreExposure.image)
        np.testing.assert_array_equal(read_exposure(out / "matched.fits").image, cached.matchedExposure.image)
        np.testing.assert_array_equal(read_exposure(out / "warped.fits").image, cached.warpedExposure.image)


def test_doApplyFinalizedPsf(pair, default_run, detect_default):
    """The visit's final PSF (and ap-corr map) replace the science's before processing: here a Gaussian 1.5x too
    wide, so the forced PSF photometry of the science (a matched filter normalised to the model) of a point source
    is biased by 2m²/(s²+m²) = 1.385 for model/true widths m/s = 1.5. Without the switch the given PSF is
    ignored; with it and no PSF, BadInputError."""
    from diffim.model.psf import GaussianPsf

    wide = GaussianPsf(1.5 * pair.science.psf.fwhm(*pair.science.psf_position()) / 2.35482, size=41)
    apcorr = {"marker": 1.0}
    results = {}
    for flag in (True, False):
        science = pair.science.copy()
        task = ImageDifferenceTask(config=make_config(doSubtract=False, doApplyFinalizedPsf=flag))
        res = task.run(exposure=science, subtractedExposure=default_run[1].subtractedExposure.copy(),
                       finalizedPsf=wide, finalizedApCorrMap=apcorr)
        assert (science.psf is wide) == flag and (science.ap_corr_map is apcorr) == flag
        results[flag] = col(res.diaSources, "scienceFlux").astype(float)
    base = col(detect_default[1].diaSources, "scienceFlux").astype(float)
    bright = np.isfinite(base) & (base > np.nanpercentile(base, 75))
    assert np.median(results[True][bright] / base[bright]) == pytest.approx(2 * 1.5**2 / (1 + 1.5**2), abs=0.1)
    np.testing.assert_allclose(results[False][bright], base[bright], rtol=1e-6)
    with pytest.raises(BadInputError, match="finalizedPsf"):
        ImageDifferenceTask(config=make_config(doSubtract=False, doApplyFinalizedPsf=True)).run(
            exposure=pair.science.copy(), subtractedExposure=default_run[1].subtractedExposure.copy())
@pytest.fixture(scope="module")
def reference_catalog(pair, tmp_path_factory):
    """A reference catalogue of the simulated stars and variables: every 3rd star of an extreme g−r colour
    (alternately 2.0 and −0.5, outside DiaCatalogSourceSelector's [−0.1, 1.2]), the others g−r = 0.5;
    truth variables flagged ``variable``; the faintest half of the stars left out (to show kernelSourcesFromRef)."""
    from astropy.table import Table

    truth = pair.truth
    is_star = truth["kind"] == "star"
    keep = (is_star & (truth["flux_science"] > np.median(truth["flux_science"][is_star]))) | (truth["kind"] == "variable")
    t = truth[keep]
    r_mag = 25.0 - 2.5 * np.log10(np.maximum(np.asarray(t["flux_science"], float), 1.0))
    gr = np.full(len(t), 0.5)
    gr[0::6] = 2.0
    gr[3::6] = -0.5
    ref = Table({"id": np.arange(len(t)) + 5000, "ra": t["ra"], "dec": t["dec"], "r_mag": r_mag, "g_mag": r_mag + gr,
                 "variable": np.asarray(t["kind"] == "variable").astype(np.int16)})
    path = tmp_path_factory.mktemp("ref") / "ref.fits"
    ref.write(path)
    return path, ref


def _split_with_reference(pair, ref_path, **overrides):
    config = make_config(doSelectSources=True, **RELAXED_SELECTOR, **overrides)
    config.refObjLoader.filename = str(ref_path)
    task = ImageDifferenceTask(config=config)
    kernel, control, select = task._select_kernel_sources(pair.science, _SELECT.get("select"))
    _SELECT["select"] = select
    return task, kernel, control


_SELECT: dict = {}


def _ref_rows(pair, ref, table):
    """Reference row of each table row (nearest within 1″) or -1."""
    sx, sy = pair.science.sky_to_pixel(np.asarray(ref["ra"], float), np.asarray(ref["dec"], float))
    tx, ty = np.asarray(table["x"], float), np.asarray(table["y"], float)
    d = np.hypot(tx[:, None] - sx[None, :], ty[:, None] - sy[None, :])
    j = np.argmin(d, axis=1) if len(table) else np.zeros(0, int)
    return np.where(d[np.arange(len(table)), j] < 5.0, j, -1) if len(table) else j


def test_kernelSourcesFromRef(pair, reference_catalog):
    """kernelSourcesFromRef: only stars with a reference-catalogue counterpart are kernel (and control) sources."""
    path, ref = reference_catalog
    _, k0, c0 = _split_with_reference(pair, path)
    task, k1, c1 = _split_with_reference(pair, path, kernelSourcesFromRef=True)
    assert np.all(_ref_rows(pair, ref, k1) >= 0) and np.all(_ref_rows(pair, ref, c1) >= 0)
    assert (_ref_rows(pair, ref, k0) < 0).any()  # without it, unmatched (faint) stars are used too
    assert len(k1) + len(c1) < len(k0) + len(c0)
    assert task.metadata["nKernelSourcesFromRef"] == len(k1) + len(c1)


def test_doSelectDcrCatalog(pair, reference_catalog):
    """Sources matched to reference stars of extreme g−r colour join the control sample, not the kernel fit."""
    path, ref = reference_catalog
    _, k0, c0 = _split_with_reference(pair, path)
    task, k1, c1 = _split_with_reference(pair, path, doSelectDcrCatalog=True)
    gr = np.asarray(ref["g_mag"] - ref["r_mag"], float)
    extreme = (gr < -0.1) | (gr > 1.2)
    rk, rc = _ref_rows(pair, ref, k1), _ref_rows(pair, ref, c1)
    assert not extreme[rk[rk >= 0]].any()
    n_extreme = int(extreme[rc[rc >= 0]].sum())
    assert n_extreme == task.metadata["nDcrControlSources"] > 3
    assert len(c1) > len(c0)
    r0 = _ref_rows(pair, ref, k0)
    assert extreme[r0[r0 >= 0]].any()  # by default extreme-colour stars are fitted


def test_doSelectVariableCatalog(pair, reference_catalog):
    """Sources matched to reference objects flagged variable join the control sample."""
    path, ref = reference_catalog
    task, k1, c1 = _split_with_reference(pair, path, doSelectVariableCatalog=True)
    var = np.asarray(ref["variable"], bool)
    rk, rc = _ref_rows(pair, ref, k1), _ref_rows(pair, ref, c1)
    assert not var[rk[rk >= 0]].any()
    assert var[rc[rc >= 0]].sum() == task.metadata["nVariableControlSources"] >= 1


def test_reference_switches_need_a_reference_catalogue(pair):
    """Without refObjLoader.filename the reference-based selections fail with a ConfigError."""
    task = ImageDifferenceTask(config=make_config(doSelectSources=True, doSelectDcrCatalog=True))
    with pytest.raises(ConfigError, match="refObjLoader.filename"):
        task._select_kernel_sources(pair.science, _SELECT.get("select"))


def test_doSelectSources_default_selector_gives_a_good_difference(pair):
    """The default selector keeps ~8 stars of this 512² field (S/N ≥ 50, widthStdAllowed=0.15): too few for a
    spatially varying kernel, so the task falls back to its own kernel candidates (and says so)."""
    task, res = cached_run(pair, "select_default_selector", doSelectSources=True, **SUBTRACT_ONLY)
    assert task.metadata.get("kernelSourceFallback") is True
    assert abs(noise_ratio(task) - 1.0) < 0.1


def test_config_fields_doc_covers_every_field_and_names_real_tests():
    """docs/config_fields.md has a row for every config field and subtask, and every test it names exists."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "config_fields.md").read_text()
    rows = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M))
    assert rows == set(ImageDifferenceConfig._fields)
    sources = {"S": (root / "tests" / "test_switches.py").read_text(),
               "C": (root / "tests" / "test_cli.py").read_text()}
    named = re.findall(r"`([SC])::(test_\w+)", text)
    assert len(named) > 40
    for prefix, name in named:
        assert f"def {name}(" in sources[prefix], f"{prefix}::{name} named in config_fields.md does not exist"
    for path, name in re.findall(r"`(tests/test_\w+\.py)::(test_\w+)", text):
        assert f"def {name}(" in (root / path).read_text(), f"{path}::{name}"


def test_deconvolving_direction_is_warned_about(caplog):
    """convolveTemplate=True with a template broader than the science in both axes is a deconvolution: the run
    goes on (LSST's default behaviour) but says so, with the ways out, and records it in the metadata; the
    automatic mode and the natural direction say nothing."""
    import logging

    pair = simulate_pair(size=256, seed=3, template_psf="broader")
    for overrides, warned in (({}, True), ({"convolveTemplate": False}, False),
                              ({"subtract.active.mode": "auto"}, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            task, _ = run_task(pair, **SUBTRACT_ONLY, **overrides)
        said = any("deconvolution" in r.getMessage() for r in caplog.records)
        assert said is warned, overrides
        assert task.metadata.get("convolutionDeconvolves", False) is warned
