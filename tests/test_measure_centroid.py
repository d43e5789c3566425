"""SDSS-style centroids: accuracy, honest errors, negative sources and failure flags."""

from __future__ import annotations

import numpy as np

from diffim.footprint import Footprint, Peak
from diffim.model import Box, GaussianPsf
from diffim.measure.centroid import sdss_centroid


def _scene(psf, flux, sky_sigma, n_side=15, spacing=30, seed=0, sign=1.0):
    rng = np.random.RandomState(seed)
    size = (n_side + 2) * spacing
    g = spacing * (1.5 + np.arange(n_side))
    x, y = np.meshgrid(g, g)
    x = x.ravel() + rng.uniform(-0.5, 0.5, x.size)
    y = y.ravel() + rng.uniform(-0.5, 0.5, y.size)
    img = np.zeros((size, size))
    for xi, yi in zip(x, y):
        im, box = psf.compute_image(xi, yi)
        img[box.slices()] += sign * flux * im
    img += rng.normal(0, sky_sigma, img.shape)
    return img, np.full(img.shape, sky_sigma**2), x, y


def test_centroid_high_snr_accurate():
    """At S/N ~ 1000 the centroid of an elliptical Gaussian is within 0.05 px of truth (the Gaussian
    interpolation is exact for Gaussians, a parabolic one would be biased by up to ~0.05 px); errors ~1e-3 px."""
    psf = GaussianPsf(2.2, sigma_minor=1.6, theta=0.6)
    img, var, x, y = _scene(psf, 1e5, 3.0)
    res = sdss_centroid(img, var, psf, np.round(x), np.round(y))
    assert not res.flag.any()
    assert np.max(np.hypot(res.x - x, res.y - y)) < 0.05
    assert np.all(res.x_err < 0.01)


def test_centroid_errors_are_honest():
    """S/N ≈ 40: 225 sources; the std of (x − truth)/xErr must be 1 ± 0.15 (σ of a std over 225 is ≈ 0.05),
    which fails if the smoothed-pixel correlations (PSF autocorrelation) were ignored (factor ~2)."""
    psf = GaussianPsf(2.0)
    img, var, x, y = _scene(psf, 1500.0, 5.0, seed=1)
    res = sdss_centroid(img, var, psf, np.round(x), np.round(y))
    ok = ~res.flag
    assert ok.sum() > 200
    for d, e in ((res.x - x, res.x_err), (res.y - y, res.y_err)):
        pull = d[ok] / e[ok]
        assert abs(np.std(pull) - 1.0) < 0.15
        assert abs(np.mean(pull)) < 0.2


def test_centroid_negative_sources():
    """Negative sources measured with negative=True land on the truth; measured as positive they fail."""
    psf = GaussianPsf(2.0)
    img, var, x, y = _scene(psf, 3e4, 3.0, n_side=5, seed=2, sign=-1.0)
    res = sdss_centroid(img, var, psf, np.round(x), np.round(y), negative=True)
    assert not res.flag.any()
    assert np.max(np.hypot(res.x - x, res.y - y)) < 0.05
    wrong = sdss_centroid(img, var, psf, np.round(x), np.round(y), negative=False)
    assert wrong.flag.all()


def test_centroid_flags_edge_and_reset():
    """A source at the image edge sets flag_edge; blank sky has no maximum (reset to the peak);
    a footprint that excludes the fitted centroid resets to the peak."""
    psf = GaussianPsf(2.0)
    img = np.zeros((60, 60))
    for xi, yi in ((2.3, 30.0), (30.4, 30.0)):
        im, box = psf.compute_image(xi, yi)
        cl = box.intersection(Box(0, 0, 60, 60))
        img[cl.slices()] += 1e4 * im[cl.slices(box)]
    var = np.ones_like(img)
    res = sdss_centroid(img, var, psf, [2, 30, 50], [30, 30, 50])
    assert res.flag_edge[0] and res.flag[0]
    assert not res.flag[1] and abs(res.x[1] - 30.4) < 0.01
    assert res.flag_resetToPeak[2] and res.x[2] == 50 and res.y[2] == 50
    spans = np.zeros((3, 1), bool)
    spans[:, 0] = True
    fp = Footprint(Box(29, 29, 1, 3), spans, [Peak(29, 30, 1.0)])
    res2 = sdss_centroid(img, var, psf, [30], [30], footprints=[fp])
    assert res2.flag_resetToPeak[0] and res2.x[0] == 30.0
