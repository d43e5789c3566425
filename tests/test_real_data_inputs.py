"""Fast checks of the real-data input path on small synthetic files (no real data needed).

They cover what the real pairs needed: per-image companions on the command line (``--science-variance``,
``--companions``, ...), cropping of huge PSF images, the modelled sky σ of correlated noise, saturation and
fill borders of raw integer frames, cosmic-ray/hot-pixel repair, and the xy0 override.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits


def _write(path, data, **cards):
    hdu = fits.PrimaryHDU(data)
    for k, v in cards.items():
        hdu.header[k] = v
    hdu.writeto(path, overwrite=True)
    return path


def _gauss(shape, x0, y0, sigma, flux):
    y, x = np.indices(shape, dtype=float)
    return flux / (2 * math.pi * sigma**2) * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))


def test_cli_companion_options_reach_read_exposure(tmp_path):
    """Every per-image option maps to the read_exposure keyword it names, per image, and 'noise' → 'sigma'."""
    from diffim.cli import _read_kwargs, build_parser

    args = build_parser().parse_args([
        "run", "s.fits", "t.fits", "-o", str(tmp_path / "o"),
        "--science-variance", "s.noise.fits", "--template-variance", "t.wht.fits", "--variance-kind", "noise",
        "--science-mask", "s.bpm.fits", "--template-psf", "t.psf", "--gain", "2.5", "--read-noise", "4",
        "--reset-xy0",
    ])
    sk, tk = _read_kwargs(args, "science"), _read_kwargs(args, "template")
    assert sk == {"variance": "s.noise.fits", "variance_kind": "sigma", "mask": "s.bpm.fits", "gain": 2.5,
                  "read_noise": 4.0, "xy0": (0, 0)}
    assert tk == {"variance": "t.wht.fits", "variance_kind": "sigma", "psf": "t.psf", "gain": 2.5,
                  "read_noise": 4.0, "xy0": (0, 0)}
    args = build_parser().parse_args(["subtract", "s.fits", "t.fits", "-o", "d.fits"])
    assert _read_kwargs(args, "science") == {} and _read_kwargs(args, "template") == {}


def test_find_companions_by_name(tmp_path):
    """x.noise.fits → σ map, x.WebbPSF.fits → PSF, x.bpm.fits → mask; priorities and absent kinds."""
    from diffim.io.layouts import find_companions, image_stem

    img = _write(tmp_path / "x.fits", np.zeros((4, 4), np.float32))
    assert find_companions(img) == {}
    for name in ("x.noise.fits", "x.WebbPSF.fits", "x.bpm.fits", "x.weight.fits"):
        _write(tmp_path / name, np.ones((4, 4), np.float32))
    got = find_companions(img)
    assert got["variance"].endswith("x.weight.fits") and got["variance_kind"] == "weight"  # weight before noise
    assert got["psf"].endswith("x.WebbPSF.fits") and got["mask"].endswith("x.bpm.fits")
    assert image_stem("a/b.fits.gz").name == "b" and image_stem("a/b.fit").name == "b"


def test_huge_psf_image_is_cropped(tmp_path):
    """A 205² PSF image of a FWHM-2.5 core with 4 % of its light in wide wings is cropped to ±ceil(10 FWHM)
    (the EE-99.5 % box is larger), and the core is unchanged up to the renormalisation; a 41² image of a
    FWHM-4 PSF (half-width 20 < 40) is left alone."""
    from diffim.io import read_psf_file

    core = _gauss((205, 205), 102, 102, 2.5 / 2.3548, 0.96) + _gauss((205, 205), 102, 102, 30.0, 0.04)
    _write(tmp_path / "big.fits", core)
    psf = read_psf_file(tmp_path / "big.fits")
    h = math.ceil(10 * 2.0 * math.sqrt(((core >= core.max() / 2).sum()) / math.pi))
    assert psf.kernel.shape == (2 * h + 1, 2 * h + 1) and psf.kernel.shape[0] < 80
    c = h
    ratio = psf.kernel[c, c] / (core[102, 102] / core.sum())
    assert 1.0 < ratio < 1.06  # renormalised after losing a few per cent of wing light
    small = _gauss((41, 41), 20, 20, 4.0 / 2.3548, 1.0)
    _write(tmp_path / "small.fits", small)
    assert read_psf_file(tmp_path / "small.fits").kernel.shape == (41, 41)


def test_modelled_sigma_of_correlated_noise(tmp_path):
    """Noise smoothed so that neighbours correlate (ρ ≈ 0.5): the neighbour-difference MAD alone would give
    σ√(1−ρ) ≈ 0.7σ; the variance model must report the per-pixel σ to 5 %."""
    from scipy import ndimage

    from diffim.io import read_exposure

    rng = np.random.default_rng(5)
    white = rng.normal(0, 1, (300, 300))
    corr = ndimage.uniform_filter(white, 2, mode="wrap")
    corr *= 20.0 / corr.std()
    _write(tmp_path / "c.fits", corr.astype(np.float32))
    exp = read_exposure(tmp_path / "c.fits")
    assert np.sqrt(np.median(exp.variance)) == pytest.approx(20.0, rel=0.05)


def test_raw_uint16_ceiling_is_saturated_and_fill_border_is_no_data(tmp_path):
    """uint16 (BZERO) frame without SATURATE: pixels at 65535 get SAT; a constant registration-fill column
    at x = 0 and row at the top get NO_DATA; a constant image is not 'fill'."""
    from diffim.io import read_exposure

    rng = np.random.default_rng(6)
    data = rng.normal(8000, 50, (60, 80)).round()
    data[30, 40] = 65535
    data[:, 0] = 8138
    data[-1, :] = 8138
    _write(tmp_path / "raw.fits", data.astype(np.uint16))
    with fits.open(tmp_path / "raw.fits") as h:
        assert h[0].header["BZERO"] == 32768
    exp = read_exposure(tmp_path / "raw.fits")
    assert exp.mask.get("SAT")[30, 40] and exp.mask.get("SAT").sum() == 1
    nd = exp.mask.get("NO_DATA")
    assert nd[:, 0].all() and nd[-1, :].all() and nd.sum() == 60 + 80 - 1
    _write(tmp_path / "flat.fits", np.full((10, 10), 7, np.uint16))
    assert not read_exposure(tmp_path / "flat.fits").mask.get("NO_DATA").any()


def test_cosmic_ray_repair_spares_stars():
    """Single hot pixels and a 2-px ray are found and interpolated; the cores of Gaussian stars (σ = 1.3 px,
    peaks 50–2000σ) are never flagged, however bright."""
    from diffim.psf.repair import find_cosmic_rays, interpolate_pixels

    rng = np.random.default_rng(7)
    shape = (120, 120)
    truth = np.zeros(shape)
    for i, (x, y) in enumerate([(20.3, 20.7), (60.0, 60.0), (100.5, 30.2), (30.8, 95.4)]):
        truth += _gauss(shape, x, y, 1.3, 10.0 ** (4 + i * 0.5))
    img = truth + rng.normal(0, 10, shape)
    img[50, 90] += 3000
    img[80, 20] += 800
    img[10, 60:62] += 1500
    cr = find_cosmic_rays(img, np.full(shape, 100.0), 1.3, grow=0)
    assert cr[50, 90] and cr[80, 20] and cr[10, 60:62].any()
    stars = truth > 50
    assert not (cr & stars).any()
    fixed = interpolate_pixels(img, find_cosmic_rays(img, np.full(shape, 100.0), 1.3), 1.3)
    assert abs(fixed[50, 90]) < 50 and abs(fixed[80, 20]) < 50


def test_smeared_cosmic_rays_found_by_likelihood_ratio():
    """Rays of 10–16 σ per pixel spread by a registration's bilinear resampling over 2×2 or 2×3 pixels pass the
    neighbour test's noise allowance, but fit a 0.5-px profile far better than the PSF (Δχ² ≫ 25): found.
    150 PSF-shaped sources with S/N 6–40 (a PSF source has Δχ² ≈ −s²(1 − ρ²) < −15 here) are never flagged,
    nor are bright stars."""
    from diffim.psf.repair import find_cosmic_rays, sharp_sources

    rng = np.random.default_rng(21)
    shape = (400, 400)
    sigma_psf, noise = 1.3, 10.0
    truth = np.zeros(shape)
    # PSF-optimal S/N of a Gaussian source: flux / (noise · √(4π) σ).
    snr_unit = noise * math.sqrt(4 * math.pi) * sigma_psf
    centres = rng.uniform(12, 388, size=(160, 2))
    snrs = np.concatenate([rng.uniform(6, 40, 150), rng.uniform(200, 2000, 10)])
    for (x, y), snr in zip(centres, snrs):
        truth += _gauss(shape, x, y, sigma_psf, snr * snr_unit)
    img = truth + rng.normal(0, noise, shape)
    rays = []
    for k in range(12):
        while True:
            x, y = rng.integers(15, 385, 2)
            if np.hypot(centres[:, 0] - x, centres[:, 1] - y).min() > 10:
                break
        peak = rng.uniform(10, 16) * noise * 2.2  # ≈ 10–16 σ per pixel after the smear below
        fx, fy = rng.uniform(0.3, 0.7, 2)
        ray = np.zeros((3, 3))
        ray[0, 0] = peak
        if k % 2:  # a 2-px track along x before resampling
            ray[0, 1] = peak
        # Bilinear resampling by (fx, fy): each pixel's charge shared among four.
        sm = (ray * (1 - fx) * (1 - fy) + np.roll(ray, 1, 1) * fx * (1 - fy) + np.roll(ray, 1, 0) * (1 - fx) * fy
              + np.roll(np.roll(ray, 1, 0), 1, 1) * fx * fy)
        img[y : y + 3, x : x + 3] += sm
        rays.append((x, y))
    var = np.full(shape, noise**2)
    stars = np.zeros(shape, bool)  # each source's pixels above 2 % of its peak
    for x, y in centres:
        g = _gauss(shape, x, y, sigma_psf, 1.0)
        stars |= g > 0.02 * g.max()
    sharp = sharp_sources(img, var, sigma_psf)
    found = [bool(sharp[y : y + 3, x : x + 3].any()) for x, y in rays]
    assert all(found), found
    assert not (sharp & stars).any()
    old = find_cosmic_rays(img, var, sigma_psf, grow=0, delta_chi2=None)
    new = find_cosmic_rays(img, var, sigma_psf, grow=0)
    n_old = sum(bool(old[y : y + 3, x : x + 3].any()) for x, y in rays)
    n_new = sum(bool(new[y : y + 3, x : x + 3].any()) for x, y in rays)
    assert n_new == len(rays) and n_old < len(rays)  # the likelihood-ratio test is what finds the faint ones
    assert not (new & stars).any()


def test_xy0_override_for_files_without_wcs(tmp_path):
    """xy0=(0, 0) in the per-image options replaces the file's origin (ip_diffim's pair stores 9 and 24)."""
    from diffim.pipeline import _read_one

    hdu = fits.PrimaryHDU(np.zeros((8, 8), np.float32))
    hdu.header["LTV1"], hdu.header["LTV2"] = -9.0, -24.0
    hdu.writeto(tmp_path / "o.fits")
    from diffim.io import read_exposure

    assert read_exposure(tmp_path / "o.fits").xy0 == (9, 24)
    assert _read_one(tmp_path / "o.fits", {"xy0": (0, 0)}).xy0 == (0, 0)
