"""The whole job on the real image pairs of ``../shared/data`` (slow; skipped when the data are absent).

Each pair is run once per module by :func:`diffim.pipeline.run_files` into a temporary directory with the
options written in ``docs/real_data.md`` (the same as the ``diffim run`` command lines there), then

* every output file must exist (difference, catalogue as Parquet and FITS, config, metadata, diagnostics);
* the figures of ``docs/real_data.md`` are measured and asserted (figures are printed: ``pytest -s``).

Definitions shared by the tests
-------------------------------
robust std
    ``IQR / 1.349`` (the σ of a Gaussian with that inter-quartile range; insensitive to the ≲ 1 % of pixels
    on residuals).
noise ratio
    robust std of ``difference / √variance`` on pixels that are unmasked (no BAD/SAT/EDGE/NO_DATA) and not
    DETECTED/DETECTED_NEGATIVE. A correct variance plane gives 1; 10 % off is a clear failure.
false detections per megapixel (null pair)
    DIA sources whose rounded centroid pixel is not BAD/SAT/EDGE/NO_DATA and which lie more than 6 FWHM
    from the image edge, divided by the area inside that border in units of 10⁶ pixels.

The data are used in place and never copied (the GOTO crop is GPL-3.0).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(os.environ.get("DIFFIM_REAL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data directory {DATA} not present"),
]

BAD_PLANES = ("BAD", "SAT", "EDGE", "NO_DATA")
OUTPUTS = ("difference.fits", "diaSources.parquet", "diaSources.fits", "config.py", "metadata.json",
           "diagnostics.png")

NIRCAM = DATA / "jwst_nircam_a2744"
NIRCAM_SCI = NIRCAM / "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp"
NIRCAM_REF = NIRCAM / "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp"
DECAM = DATA / "decam_sfft_decorr" / "reference_outputs"
PROPER = DATA / "properimage_bosquealegre_eso085"
GOTO = DATA / "goto_virgo_t20_crop"
LSSTSYN = DATA / "lsst_ipdiffim_hotpants_synthetic"


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def robust_std(values: np.ndarray) -> float:
    q25, q75 = np.percentile(np.asarray(values, dtype=float), [25, 75])
    return float((q75 - q25) / 1.349)


def _need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        pytest.skip(f"missing real-data files: {missing}")


def _run(tmp_path_factory, name, science, template, overrides=(), science_kwargs=None, template_kwargs=None):
    """run_files into a fresh directory; returns (outdir, RunResult, wall seconds)."""
    import time

    from diffim.pipeline import make_config, run_files

    out = tmp_path_factory.mktemp(name) / "results"
    config = make_config(list(overrides))
    t0 = time.perf_counter()
    res = run_files(science, template, out, config=config, plot=True, progress=False,
                    science_kwargs=science_kwargs, template_kwargs=template_kwargs)
    return out, res, time.perf_counter() - t0


def _check_outputs(out: Path) -> None:
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing from {out}"


def _difference(out: Path):
    from diffim.io import read_exposure

    return read_exposure(out / "difference.fits")


def _snr_and_masks(diff, border: int = 0):
    snr = diff.image.astype(np.float64) / np.sqrt(diff.variance.astype(np.float64))
    bad = diff.mask.get(BAD_PLANES, ignore_missing=True)
    detected = diff.mask.get(("DETECTED", "DETECTED_NEGATIVE"), ignore_missing=True)
    valid = ~bad & np.isfinite(snr)
    if border:
        valid[:border] = valid[-border:] = False
        valid[:, :border] = valid[:, -border:] = False
    return snr, valid, detected


def noise_ratio(diff) -> float:
    """Robust std of D/σ on unmasked, undetected pixels (module docstring)."""
    snr, valid, detected = _snr_and_masks(diff)
    return robust_std(snr[valid & ~detected])


def _catalog(out: Path):
    from astropy.table import Table

    return Table.read(out / "diaSources.fits")


def _report(name: str, figures: dict) -> None:
    print(f"\n[real data] {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in figures.items()))


# ----------------------------------------------------------------------------------------------------------
# JWST NIRCam (Abell 2744): noise maps and WebbPSF models
# ----------------------------------------------------------------------------------------------------------
NIRCAM_BORDER = 11  # SFFT's SNR map is zero within ~11 px of the edge; both maps lose the same border


def count_blobs(snr: np.ndarray, valid: np.ndarray, threshold: float = 8.0, merge: int = 5) -> int:
    """Residual blobs: connected regions (8-connectivity) of valid pixels with |S/N| > ``threshold``, after
    dilating by ``merge`` pixels (2 FWHM of NIRCam F200W) so the fragments of one residual count once."""
    from scipy import ndimage

    hot = (np.abs(snr) > threshold) & valid
    if merge:
        hot = ndimage.binary_dilation(hot, iterations=merge)
    return int(ndimage.label(hot, structure=np.ones((3, 3), bool))[1])


@pytest.fixture(scope="module")
def nircam_run(tmp_path_factory):
    _need(NIRCAM_SCI.with_suffix(".fits"), NIRCAM_REF.with_suffix(".fits"))
    sci_kw = {"variance": str(NIRCAM_SCI) + ".noise.fits", "psf": str(NIRCAM_SCI) + ".WebbPSF.fits"}
    ref_kw = {"variance": str(NIRCAM_REF) + ".noise.fits", "psf": str(NIRCAM_REF) + ".WebbPSF.fits"}
    return _run(tmp_path_factory, "nircam", str(NIRCAM_SCI) + ".fits", str(NIRCAM_REF) + ".fits",
                overrides=["detection.thresholdType=stdev"], science_kwargs=sci_kw, template_kwargs=ref_kw)


def _nircam_figures(out):
    from astropy.io import fits

    diff = _difference(out)
    snr, valid, _ = _snr_and_masks(diff, NIRCAM_BORDER)
    ours_std = robust_std(snr[valid & (np.abs(snr) < 5)])
    ref = fits.getdata(NIRCAM / "reference_outputs" / (NIRCAM_SCI.name + ".crossConvd.sfftdiff.DeCorrelated.SNR.fits"))
    ref = np.asarray(ref, dtype=np.float64)
    rvalid = np.isfinite(ref) & (ref != 0)
    rvalid[:NIRCAM_BORDER] = rvalid[-NIRCAM_BORDER:] = False
    rvalid[:, :NIRCAM_BORDER] = rvalid[:, -NIRCAM_BORDER:] = False
    return {
        "snr_std": ours_std,
        "sfft_snr_std": robust_std(ref[rvalid & (np.abs(ref) < 5)]),
        "blobs": count_blobs(snr, valid),
        "sfft_blobs": count_blobs(ref, rvalid),
        "noise_ratio": noise_ratio(diff),
    }


def test_nircam_runs_and_noise_is_unit(nircam_run):
    """With the 1σ noise maps and WebbPSF models, the difference's S/N on background pixels (|S/N| < 5,
    11-px border excluded) has robust std 1 ± 0.05: the variance plane describes the difference's pixel
    noise to 5 % (a variance off by 10 % moves it by 5 %)."""
    out, res, wall = nircam_run
    _check_outputs(out)
    figs = _nircam_figures(out)
    figs.update(n_dia=len(_catalog(out)), wall_s=wall)
    _report("nircam", figs)
    assert abs(figs["snr_std"] - 1.0) <= 0.05
    assert abs(figs["noise_ratio"] - 1.0) <= 0.05


def test_nircam_residual_blobs_not_more_than_sfft(nircam_run):
    """|S/N| > 8 residual blobs (count_blobs, same border and merging for both maps): ours ≤ SFFT's (4 and 4).

    Before the template-noise correction of the AL fit there were 8: the kernel, shrunk towards a smoothing one
    by the template's own noise (both frames are about equally deep), left 8–10σ residuals on four compact
    sources (docs/real_data.md)."""
    out, _, _ = nircam_run
    figs = _nircam_figures(out)
    assert figs["blobs"] <= figs["sfft_blobs"]


# ----------------------------------------------------------------------------------------------------------
# DECam stacks (sky-subtracted, few stars) against SFFT's decorrelated difference
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decam_run(tmp_path_factory):
    _need(DECAM / "Stack-DEC-OBS04.fits", DECAM / "Stack-DEC-OBS18.fits", DECAM / "FinalDifference.DeCorr.fits")
    return _run(tmp_path_factory, "decam", DECAM / "Stack-DEC-OBS04.fits", DECAM / "Stack-DEC-OBS18.fits",
                overrides=["detection.thresholdType=stdev"])


def decam_star_residuals(diff_image: np.ndarray, stars, fwhm: float, border: int = 16) -> list[float]:
    """Per star: rms of ``D/σ_bg`` over the box of half-width ``⌈1.5 FWHM⌉`` centred on the star, where
    ``σ_bg`` is the robust std of that difference over the image minus a ``border``-pixel frame (stars
    cover < 2 % of the 256² stack, so σ_bg is the background noise). 1 means the star left nothing."""
    h = math.ceil(1.5 * fwhm)
    inner = diff_image[border:-border, border:-border]
    s = robust_std(inner)
    return [float(np.sqrt(np.mean((diff_image[y - h : y + h + 1, x - h : x + h + 1] / s) ** 2))) for x, y in stars]


def _decam_bright_stars(fwhm: float):
    """Bright unsaturated stars of the science stack: peaks of the PSF-smoothed image above 100σ, at least
    16 px from the edges (six stars in this stack)."""
    from astropy.io import fits

    from diffim.psf.estimate import find_peaks

    sci = np.asarray(fits.getdata(DECAM / "Stack-DEC-OBS04.fits"), dtype=np.float32)
    noise = robust_std(sci)
    rows, cols, _ = find_peaks(sci, noise, fwhm / 2.3548, threshold=100.0)
    b = 16
    keep = (rows >= b) & (rows < sci.shape[0] - b) & (cols >= b) & (cols < sci.shape[1] - b)
    return list(zip(cols[keep].tolist(), rows[keep].tolist()))


def test_decam_star_residuals_no_worse_than_sfft(decam_run):
    """Bright-star residuals of our difference vs SFFT's decorrelated difference (FinalDifference.DeCorr),
    each in units of its own background σ (decam_star_residuals). Both the mean and the median over the
    bright stars must be no worse than SFFT's. The FWHM is the science header's (5.23 px)."""
    from astropy.io import fits

    out, res, wall = decam_run
    _check_outputs(out)
    fwhm = float(fits.getheader(DECAM / "Stack-DEC-OBS04.fits")["FWHM"])
    stars = _decam_bright_stars(fwhm)
    assert len(stars) >= 3
    diff = _difference(out)
    ours = decam_star_residuals(diff.image.astype(np.float64), stars, fwhm)
    sfft = decam_star_residuals(np.asarray(fits.getdata(DECAM / "FinalDifference.DeCorr.fits"), float), stars, fwhm)
    figs = {"n_stars": len(stars), "ours_mean": float(np.mean(ours)), "sfft_mean": float(np.mean(sfft)),
            "ours_median": float(np.median(ours)), "sfft_median": float(np.median(sfft)),
            "noise_ratio": noise_ratio(diff), "n_dia": len(_catalog(out)), "wall_s": wall}
    _report("decam", figs)
    assert figs["ours_mean"] <= figs["sfft_mean"]
    assert figs["ours_median"] <= figs["sfft_median"]
    assert abs(figs["noise_ratio"] - 1.0) <= 0.1


# ----------------------------------------------------------------------------------------------------------
# properimage null pair (74 s apart): false detections
# ----------------------------------------------------------------------------------------------------------
PROPER_GAIN = 1.4  # sky/σ_sky² = 8140/5780 ADU: the pedestal taken as Poisson (preflash); see docs/real_data.md


@pytest.fixture(scope="module")
def proper_run(tmp_path_factory):
    a, b = PROPER / "aligned_eso085-030-004.fit", PROPER / "aligned_eso085-030-005.fit"
    _need(a, b)
    return _run(tmp_path_factory, "properimage", a, b, science_kwargs={"gain": PROPER_GAIN},
                template_kwargs={"gain": PROPER_GAIN})


def false_per_mpix(diff, catalog) -> tuple[int, float]:
    """(count, count per 10⁶ px) of false DIA sources as ``metrics.md`` defines them, with nothing true in the
    scene: sky sources dropped; not within 6 FWHM of the edge; no BAD/SAT/CR/EDGE/NO_DATA pixel in the
    5 × 5 box (:func:`diffim.metrics.false_detection_flags` with an empty truth table)."""
    from astropy.table import Table

    from diffim.metrics import false_detection_flags

    fwhm = float(diff.psf.fwhm())
    truth = Table({"kind": np.array([], dtype="U16"), "x": np.array([], float), "y": np.array([], float)})
    cat = catalog
    if "sky_source" in cat.colnames:
        cat = cat[~np.asarray(cat["sky_source"], bool)]
    _, false = false_detection_flags(cat, truth, fwhm, diff)
    ny, nx = diff.image.shape
    b = 6.0 * fwhm
    area = (nx - 2 * b) * (ny - 2 * b) / 1e6
    return int(false.sum()), float(false.sum() / area)


def test_properimage_null_pair_runs(proper_run):
    """The null pair runs end to end with a unit noise ratio and writes every output."""
    out, res, wall = proper_run
    _check_outputs(out)
    diff = _difference(out)
    n, per = false_per_mpix(diff, _catalog(out))
    figs = {"false": n, "false_per_mpix": per, "noise_ratio": noise_ratio(diff), "n_dia": len(_catalog(out)),
            "wall_s": wall}
    _report("properimage", figs)
    assert abs(figs["noise_ratio"] - 1.0) <= 0.1


@pytest.mark.parametrize("overrides, most", [
    (("subtract.name=zogy", "useScoreImageDetection=True"), 0),
    (("useScoreImageDetection=True",), 1),
])
def test_properimage_score_detection_false_detections(tmp_path_factory, overrides, most):
    """Score-image detection on the null pair (issue 7).

    ZOGY's S_corr had 23 false detections (36 / Mpix), the tip-tilt dipoles of bright stars; with the static-star
    terms fitted on D and applied to S through S_R, 1; with the residual profile (what those terms leave, measured
    on the stars: ``doStarResidualProfile``), 0. The AL pre-convolution score had 10: 6 striped columns near the
    left edge (the decorrelation filter spread a garbage edge column of the science) and 4 bright-star
    residuals, then 5: ±8–15σ lobes 5–8 px from the four brightest unsaturated stars (peaks at 70–85 % of
    saturation), neither a shift nor a width change, that the residual profile now covers. The one left is a
    −5.05σ peak at (273.6, 481.9) that is in the data: −4.9σ in the raw difference's PSF-matched filter (robust
    noise), a noise dip in the science under a faint excess in the template; ZOGY's S_corr has it at −4.85σ,
    the PSF-smoothed AL difference at −5.07σ (not detected there: D's PSF-smoothed S/N scatters 1.034×, a
    significant excess whose factor detection applies). The score's own S/N scatters 1.0015× (tolerance 1.016):
    its variance plane, scaled by doScaleDiffimVariance on the score itself, is right, and at 4σ its count is
    the noise floor (next test). Pure noise gives ≈ 0.2 such peaks on this pair: every 5σ detector is on its
    edge."""
    a, b = PROPER / "aligned_eso085-030-004.fit", PROPER / "aligned_eso085-030-005.fit"
    _need(a, b)
    out, _, _ = _run(tmp_path_factory, "properimage_score", a, b, overrides=overrides,
                     science_kwargs={"gain": PROPER_GAIN}, template_kwargs={"gain": PROPER_GAIN})
    n, per = false_per_mpix(_difference(out), _catalog(out))
    print(f"properimage score detection {overrides}: {n} false ({per:.1f} / Mpix)")
    assert n <= most


def test_properimage_false_detections_per_mpix(proper_run):
    """Issue 5/6/7 target for the null pair: ≤ 1 false detection per megapixel (metrics.md definition), i.e.
    none on its 0.64 Mpix interior. Before the static-star residual variance, the likelihood-ratio ray finder
    and the significance test of the correlated-noise factor there were 6 (9.4 / Mpix): four tip-tilt dipoles
    on S/N ≈ 1000 stars, a ray smeared by the registration and a 5.05σ noise peak (detected because the
    registered frame's noise is 3 % correlated)."""
    out, _, _ = proper_run
    md = json.loads((out / "metadata.json").read_text())
    n, per = false_per_mpix(_difference(out), _catalog(out))
    assert per <= 1.0, n
    # The mechanism, not luck: the tip-tilt scatter was resolved (0.02–0.03 px measured on ≈ 100 stars).
    assert 0.01 < md["starResidualShiftSigma"] < 0.05 and md["starResidualNStars"] >= 50


@pytest.mark.parametrize("overrides", [(), ("subtract.name=zogy", "useScoreImageDetection=True"),
                                       ("useScoreImageDetection=True",)],
                         ids=["al", "zogy_score", "al_score"])
def test_properimage_false_detections_at_4_sigma_are_the_noise_floor(tmp_path_factory, overrides):
    """Detected at 4σ, the null pair's false detections number what pure noise gives for its PSF
    (:func:`diffim.metrics.noise_detection_rate` on the counted area), within 3 Poisson σ.

    At 5σ a correct pipeline expects ≈ 0.2 noise detections on this pair's 0.47-Mpix counted area (0.42 / Mpix
    for σ ≈ 1.3 px), too few to tell anything; at 4σ ≈ 17, and the count is steep in the threshold: with the
    detection σ 10 % too small or too large (the threshold moved to 3.6σ or 4.4σ) AL gives 73 or 4, both
    outside the bounds; systematic residuals add to it. Measured: AL 18 (16.3 expected), ZOGY S_corr 21
    (17.8), AL pre-convolution score 17 (16.3)."""
    from diffim.metrics import counted_area, noise_detection_rate

    a, b = PROPER / "aligned_eso085-030-004.fit", PROPER / "aligned_eso085-030-005.fit"
    _need(a, b)
    out, _, _ = _run(tmp_path_factory, "properimage_4sigma", a, b,
                     overrides=(*overrides, "detection.thresholdValue=4.0"),
                     science_kwargs={"gain": PROPER_GAIN}, template_kwargs={"gain": PROPER_GAIN})
    diff = _difference(out)
    n, _ = false_per_mpix(diff, _catalog(out))
    rate, err = noise_detection_rate(float(diff.psf.sigma()), 4.0, n_mpix=32)
    expected = rate * counted_area(diff, float(diff.psf.fwhm())) / 1e6
    print(f"properimage at 4σ {overrides}: {n} false, pure noise {expected:.1f} (rate {rate:.1f} ± {err:.1f} / Mpix)")
    assert abs(n - expected) <= 3.0 * math.sqrt(expected), (n, expected)


def test_properimage_template_half_blank(tmp_path_factory, tmp_path):
    """The null pair with the template's right half NaN (a template partly off the field): the valid half
    subtracts as the whole pair does. The template PSF, fitted on the left half's stars, was extrapolated
    over the blank half; the AL basis sized from it (σ 2.6–10 px instead of 0.4–1.6) left 130 DIA sources,
    with exit 0. Then 12 (the whole pair: 13), 1 counted false (the −5σ feature of the null-pair tests); with
    the bright-star halo model 9 (the whole pair: 12), 0 false."""
    from astropy.io import fits

    a, b = PROPER / "aligned_eso085-030-004.fit", PROPER / "aligned_eso085-030-005.fit"
    _need(a, b)
    with fits.open(b) as hdul:
        data = hdul[0].data.astype(np.float32)
        header = hdul[0].header.copy()
    data[:, data.shape[1] // 2:] = np.nan
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    header["SATURATE"] = 65535  # as float32 the frame no longer says that its 65535s are saturated
    half = tmp_path / "template_half.fits"
    fits.PrimaryHDU(data, header=header).writeto(half)
    out, _, _ = _run(tmp_path_factory, "properimage_half", a, half,
                     science_kwargs={"gain": PROPER_GAIN}, template_kwargs={"gain": PROPER_GAIN})
    diff = _difference(out)
    n, _ = false_per_mpix(diff, _catalog(out))
    print(f"properimage, template half blank: {len(_catalog(out))} DIA sources, {n} false")
    assert abs(noise_ratio(diff) - 1.0) <= 0.1
    assert len(_catalog(out)) <= 20 and n <= 1


# ----------------------------------------------------------------------------------------------------------
# GOTO crop and LSST ip_diffim synthetic: run, outputs, noise ratio
# ----------------------------------------------------------------------------------------------------------
def test_goto_crop_runs(tmp_path_factory):
    """GOTO pair (no gain, variance, mask or PSF; saturated stars): the run completes, every output is
    written and the noise ratio is within 10 % of 1. Data are GPL-3.0: read in place only."""
    a, b = GOTO / "goto_1_crop.fits", GOTO / "goto_2_crop.fits"
    _need(a, b)
    out, res, wall = _run(tmp_path_factory, "goto", a, b)
    _check_outputs(out)
    diff = _difference(out)
    figs = {"noise_ratio": noise_ratio(diff), "n_dia": len(_catalog(out)), "wall_s": wall}
    _report("goto", figs)
    assert abs(figs["noise_ratio"] - 1.0) <= 0.1
    md = json.loads((out / "metadata.json").read_text())
    assert md["counts"]["nDiaSources"] == figs["n_dia"]


def test_lsst_synthetic_runs(tmp_path_factory):
    """ip_diffim's synthetic pair (noiseless template whose variance plane equals the image, 9 stars): the
    run completes with a unit noise ratio and no DIA source — template and science stars have the same
    flux (1e4), so any detection would be a subtraction residual. The files' xy0 differ (9 vs 24) although
    their pixels correspond (upstream resets both), hence ``xy0=(0, 0)``; a 19-px kernel as upstream."""
    a, b = LSSTSYN / "scienceMI.fits", LSSTSYN / "templateMI.fits"
    _need(a, b)
    out, res, wall = _run(
        tmp_path_factory, "lsstsyn", a, b,
        overrides=["subtract.active.kernel.active.scaleByFwhm=False", "subtract.active.kernel.active.kernelSize=19",
                   "subtract.active.restrictKernelEdgeSources=False"],
        science_kwargs={"xy0": (0, 0)}, template_kwargs={"xy0": (0, 0)},
    )
    _check_outputs(out)
    diff = _difference(out)
    figs = {"noise_ratio": noise_ratio(diff), "n_dia": len(_catalog(out)), "wall_s": wall}
    _report("lsst_synthetic", figs)
    assert abs(figs["noise_ratio"] - 1.0) <= 0.1
    assert figs["n_dia"] == 0
