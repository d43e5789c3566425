"""Inputs without noise or with unusable variance maps fail early with a clear message, not with NaNs.

* P4: a flat (constant or all-zero) image, or one whose variance is zero everywhere, is refused by
  ``read_exposure(..., require_noise=True)`` with a :class:`~diffim.errors.BadInputError` naming the file (by
  default it is read with a warning); noiseless images whose variance is positive somewhere still read.
* P10: variance-map values <= 0 or non-finite become ``NO_DATA`` for every map kind, and a map that is <= 0
  (almost) everywhere is refused, naming the map and ``--variance-kind``.
* P7: the decorrelation's local variance factor survives a PSF-matching kernel that is zero everywhere, and
  the filter refuses the one input for which it is undefined.
* P2: the PSF estimator's errors say what is wrong with the image (flat, too small, how many candidates).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from diffim.decorrelation import decorrelate, decorrelation_kernel_fourier
from diffim.errors import BadInputError, PsfEstimationError
from diffim.io import read_exposure, write_exposure
from diffim.model import Exposure, MaskedImage
from diffim.psf import estimate_psf

SHAPE = (64, 64)


def _plain(path: Path, data: np.ndarray, **cards: float) -> Path:
    """Write ``data`` as a plain single-HDU FITS image with header ``cards``; return the path."""
    hdu = fits.PrimaryHDU(data)
    for key, value in cards.items():
        hdu.header[key] = value
    hdu.writeto(path)
    return path


def _stars(n: int, positions: list[tuple[float, float]], sigma: float = 1.5, flux: float = 2e4) -> np.ndarray:
    """Noiseless Gaussian stars of total ``flux`` at ``(x, y)`` positions on a zero ``n × n`` background."""
    y, x = np.mgrid[:n, :n]
    img = np.zeros((n, n))
    for sx, sy in positions:
        img += flux / (2 * np.pi * sigma**2) * np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2 * sigma**2))
    return img


def _noisy_scene(n: int, positions: list[tuple[float, float]], noise: float = 10.0, seed: int = 0) -> Exposure:
    """Stars on a 100-count sky with Gaussian noise ``noise`` and the matching constant variance plane."""
    img = (100.0 + _stars(n, positions) + np.random.default_rng(seed).normal(0.0, noise, (n, n))).astype(np.float32)
    return Exposure(MaskedImage(img, None, np.full_like(img, noise**2)))


# ---------------------------------------------------------------------------------------------- P4: no noise
@pytest.mark.parametrize("value", [0.0, 1000.0])
@pytest.mark.parametrize("cards", [{}, {"GAIN": 2.0}], ids=["no-gain", "gain"])
def test_flat_image_is_refused_when_noise_is_required(tmp_path, value, cards):
    """A constant frame (fill value, blank, mask) has no stars and no noise: with a gain its modelled variance
    is even positive, but the kernel fit to it is singular (all-NaN difference), so it is refused whatever the
    variance says; the message names the file and says the image is flat."""
    path = _plain(tmp_path / "const.fits", np.full(SHAPE, value, np.float32), **cards)
    with pytest.raises(BadInputError, match=r"const\.fits: the image is flat: every valid pixel is") as ei:
        read_exposure(path, require_noise=True)
    assert "give the real image" in str(ei.value) and "\n" not in str(ei.value)


def test_flat_image_is_refused_even_with_a_variance_map(tmp_path):
    path = _plain(tmp_path / "const.fits", np.full(SHAPE, 7.0, np.float32))
    with pytest.raises(BadInputError, match="flat"):
        read_exposure(path, variance=np.full(SHAPE, 4.0, np.float32), require_noise=True)


def test_flat_with_nan_region_is_still_flat(tmp_path):
    """NaN pixels are NO_DATA, not data: a constant image with a NaN corner is flat."""
    data = np.full(SHAPE, 3.0, np.float32)
    data[:10, :10] = np.nan
    path = _plain(tmp_path / "c.fits", data)
    with pytest.raises(BadInputError, match="every valid pixel is 3"):
        read_exposure(path, require_noise=True)


def test_flat_image_reads_by_default_with_a_warning(tmp_path, caplog):
    """Without ``require_noise`` a flat frame still reads (headers, test patterns), but the log says why it
    cannot be differenced."""
    path = _plain(tmp_path / "zero.fits", np.zeros(SHAPE, np.float32))
    with caplog.at_level(logging.WARNING, logger="diffim.io.fits"):
        exp = read_exposure(path)
    assert exp.image.shape == SHAPE
    assert any("zero.fits: the image is flat" in r.getMessage() for r in caplog.records)


def test_noiseless_image_without_gain_is_refused(tmp_path):
    """Stars on a zero background without noise, variance map or gain: the modelled variance (σ_sky² = 0) is zero
    everywhere; the message says so and offers a variance map or the gain."""
    path = _plain(tmp_path / "model.fits", _stars(SHAPE[0], [(30.0, 30.0)]).astype(np.float32))
    with pytest.raises(BadInputError, match=r"model\.fits: the image shows no pixel noise") as ei:
        read_exposure(path, require_noise=True)
    assert "--science-variance" in str(ei.value) and "--gain" in str(ei.value)


def test_zero_variance_plane_is_refused(tmp_path):
    """An afw-style file whose VARIANCE plane is zero everywhere (a noisy image, so not flat)."""
    img = np.random.default_rng(1).normal(0.0, 5.0, SHAPE).astype(np.float32)
    path = tmp_path / "zv.fits"
    write_exposure(Exposure(MaskedImage(img, None, np.zeros(SHAPE, np.float32))), path)
    with pytest.raises(BadInputError, match=r"zv\.fits: its variance plane is zero at every valid pixel"):
        read_exposure(path, require_noise=True)


def test_noiseless_template_with_variance_equal_to_image_reads(tmp_path):
    """ip_diffim's synthetic template: noiseless stars on 0, variance = image (0 on the sky, > 0 on stars).
    Its zero-variance sky is data (not NO_DATA) and the image passes ``require_noise``."""
    img = _stars(SHAPE[0], [(20.0, 20.0), (44.0, 40.0)]).astype(np.float32)
    img[img < 1e-3] = 0.0  # an exactly empty sky, as in templateMI.fits
    path = tmp_path / "tmpl.fits"
    write_exposure(Exposure(MaskedImage(img, None, img.copy())), path)
    exp = read_exposure(path, require_noise=True)
    assert not exp.mask.get("NO_DATA").any()
    assert np.array_equal(exp.variance, img)


def test_noiseless_image_with_sky_pedestal_and_gain_reads(tmp_path):
    """A simulated noiseless frame with a sky pedestal and a GAIN card: the pedestal's Poisson variance is
    positive, so the frame is usable (σ_sky = 0 alone is no reason to refuse it)."""
    img = (500.0 + _stars(SHAPE[0], [(32.0, 32.0)])).astype(np.float32)
    path = _plain(tmp_path / "ped.fits", img, GAIN=2.0)
    exp = read_exposure(path, require_noise=True)
    assert np.all(exp.variance >= 250.0 - 1e-3)


def test_noisy_image_passes(tmp_path):
    img = np.random.default_rng(2).normal(100.0, 10.0, SHAPE).astype(np.float32)
    exp = read_exposure(_plain(tmp_path / "n.fits", img), require_noise=True)
    assert np.median(exp.variance) == pytest.approx(100.0, rel=0.2)


# ------------------------------------------------------------------------------------ P10: variance maps <= 0
@pytest.mark.parametrize("kind", ["variance", "weight", "sigma"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonpositive_and_nonfinite_map_values_are_no_data_for_every_kind(tmp_path, kind, dtype):
    """Map values <= 0 or NaN/inf are no noise level whatever the kind: those pixels (only those) get NO_DATA and
    the median variance; every other pixel gets the map's variance (9)."""
    raw = {"variance": 9.0, "weight": 1.0 / 9.0, "sigma": 3.0}[kind]
    vmap = np.full(SHAPE, raw, dtype)
    holes = [(1, 2), (3, 4), (5, 6), (7, 8)]
    for (y, x), v in zip(holes, [0.0, -2.0, np.nan, np.inf]):
        vmap[y, x] = v
    img = np.random.default_rng(3).normal(0.0, 3.0, SHAPE).astype(np.float32)
    path = _plain(tmp_path / "img.fits", img)
    _plain(tmp_path / "map.fits", vmap)
    exp = read_exposure(path, variance=str(tmp_path / "map.fits"), variance_kind=kind)
    nd = exp.mask.get("NO_DATA")
    assert sorted(zip(*np.nonzero(nd))) == holes
    assert np.allclose(exp.variance, 9.0)


def test_variance_map_nonpositive_everywhere_is_refused(tmp_path):
    """A negated (or sky-subtracted, or mask) image passed as a variance map: a clear error naming the map
    and --variance-kind, instead of an all-NO_DATA image and a misleading 'too few stars' later."""
    img = np.random.default_rng(4).normal(100.0, 10.0, SHAPE).astype(np.float32)
    path = _plain(tmp_path / "img.fits", img)
    _plain(tmp_path / "neg_var.fits", -np.abs(img))
    with pytest.raises(BadInputError, match=r"neg_var\.fits: 100 % of its finite values are <= 0") as ei:
        read_exposure(path, variance=str(tmp_path / "neg_var.fits"), variance_kind="variance")
    assert "--variance-kind" in str(ei.value)


def test_all_zero_weight_map_is_refused(tmp_path):
    path = _plain(tmp_path / "img.fits", np.random.default_rng(5).normal(0.0, 1.0, SHAPE).astype(np.float32))
    with pytest.raises(BadInputError, match=r"img\.fits: the variance array: 100 % .* no weight map"):
        read_exposure(path, variance=np.zeros(SHAPE, np.float32), variance_kind="weight")


def test_weight_map_with_zero_border_is_accepted(tmp_path):
    """A SWarp-like weight map with a zero-weight border (no coverage) is normal: the border is NO_DATA."""
    w = np.full(SHAPE, 0.25, np.float32)
    w[:, :20] = 0.0
    path = _plain(tmp_path / "img.fits", np.random.default_rng(6).normal(0.0, 2.0, SHAPE).astype(np.float32))
    exp = read_exposure(path, variance=w, variance_kind="weight")
    assert exp.mask.get("NO_DATA")[:, :20].all() and not exp.mask.get("NO_DATA")[:, 20:].any()


# ------------------------------------------------------------------------------------------ P7: decorrelation
def _gauss_kernel(n: int = 11, sigma: float = 1.3) -> np.ndarray:
    r = np.arange(n) - n // 2
    k = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return k / k.sum()


def test_local_variance_factor_with_zero_kernel_does_not_divide_by_zero():
    """A zero PSF-matching kernel (degenerate fit to a blank template) with a spatial kernel: the convolved
    image's variance factor is 0 everywhere (it contributes nothing), not a ZeroDivisionError."""
    rng = np.random.default_rng(7)
    diff = rng.normal(0.0, 1.0, (48, 40)).astype(np.float32)
    zero = np.zeros((11, 11))
    sv = np.full(diff.shape, 1.0, np.float32)
    tv = np.zeros(diff.shape, np.float32)
    img, var, _ = decorrelate(diff, sv + tv, zero, 1.0, 0.0, science_variance=sv, template_variance=tv,
                              kernel_at=lambda x, y: zero, workers=1)
    assert np.all(np.isfinite(img)) and np.allclose(var, 1.0, rtol=1e-5)


def test_local_variance_factor_matches_constant_kernel():
    """A 'spatial' kernel that is the same everywhere gives the constant-kernel variance (the local map is
    anchored on the image-grid factor at the centre)."""
    rng = np.random.default_rng(8)
    diff = rng.normal(0.0, 1.0, (48, 40)).astype(np.float32)
    k = 1.1 * _gauss_kernel()
    sv = np.full(diff.shape, 2.0, np.float32)
    tv = np.full(diff.shape, 3.0, np.float32)
    args = (diff, sv + tv * 1.21, k, 2.0, 3.0)
    _, v_const, _ = decorrelate(*args, science_variance=sv, template_variance=tv, workers=1)
    _, v_local, _ = decorrelate(*args, science_variance=sv, template_variance=tv, kernel_at=lambda x, y: k,
                                workers=1)
    assert np.allclose(v_local, v_const, rtol=1e-5)


def test_filter_is_refused_when_undefined():
    """σ²_u = 0 and a kernel summing to 0: φ̂(0) = 0/0. A named error, not NaNs and a RuntimeWarning."""
    k = np.zeros((5, 5))
    k[2, 1], k[2, 3] = 1.0, -1.0
    with pytest.raises(BadInputError, match="Decorrelation is undefined"):
        decorrelation_kernel_fourier(k, 0.0, 1.0, (32, 32), workers=1)


# ------------------------------------------------------------------------------------- P2: PSF estimation
def test_psf_of_flat_image_says_flat():
    img = np.full(SHAPE, 1000.0, np.float32)
    exp = Exposure(MaskedImage(img, None, np.zeros_like(img)))
    with pytest.raises(PsfEstimationError, match="Cannot estimate a PSF: the image is flat"):
        estimate_psf(exp)


def test_psf_of_tiny_image_says_too_small():
    exp = _noisy_scene(20, [])
    with pytest.raises(PsfEstimationError, match=r"no peak above 10.0σ anywhere.*\(20×20 px\) is too small"):
        estimate_psf(exp)


def test_psf_with_too_few_stars_counts_candidates():
    """Two stars: the message counts the candidates and suggests a PSF model (the CLI has no option for the
    S/N limit, so the old advice 'lower signal_to_noise_min/threshold' is gone); 128 px is not 'too small'."""
    with pytest.raises(PsfEstimationError) as ei:
        estimate_psf(_noisy_scene(128, [(40.0, 40.0), (90.0, 80.0)]))
    msg = str(ei.value)
    assert msg.startswith("Only 2 usable stars (need 3) among 2 candidates above 10.0σ")
    assert msg.endswith("provide a PSF model for this image.")
    assert "signal_to_noise_min" not in msg and "too small" not in msg


def test_psf_with_stars_near_the_edges_mentions_masked_regions():
    stars = [(64.0, 64.0), (11.0, 40.0), (40.0, 11.0), (117.0, 80.0), (80.0, 117.0)]
    with pytest.raises(PsfEstimationError, match=r"Only 1 of 5 usable stars are far enough from the image edges.*"
                                                 r"masked \(NO_DATA\) regions"):
        estimate_psf(_noisy_scene(128, stars))


def test_spatial_decorrelation_with_zero_kernel_does_not_divide_by_zero():
    """The grid version: a zero kernel on the template gives the science's variance (1/κ_sum² is only used when
    the science was convolved); on the science it is a named error, not a ZeroDivisionError."""
    from diffim.decorrelation import decorrelate_spatial

    diff = np.random.default_rng(9).normal(0.0, 1.0, (40, 40)).astype(np.float32)
    zero = np.zeros((7, 7))
    sv = np.ones(diff.shape, np.float32)
    tv = np.zeros(diff.shape, np.float32)
    img, var, _ = decorrelate_spatial(diff, sv, zero, sv, tv, cell_step=20, workers=1)
    assert np.all(np.isfinite(img)) and np.allclose(var, 1.0, rtol=1e-5)
    with pytest.raises(BadInputError, match="sums to 0"):
        decorrelate_spatial(diff, sv, zero, tv, sv, template_matched=False, cell_step=20, workers=1)
