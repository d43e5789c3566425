"""Simulated science/template pairs with known truth.

:func:`simulate_pair` renders a science exposure and a deeper template exposure of the same sky, with PSFs that
vary across the field, different flux scales, sky levels and gradients, honest Poisson-like variance planes,
saturated stars with bleed trails, a bad column, cosmic rays, and a known set of *changes*: transients,
variables, movers and (optionally) dipoles. The truth table lists every object and change.

Scene model
-----------
* Science image (counts): ``sky_s(x, y) + Σ sources ⊛ PSF_s + cosmic rays + noise``, with noise drawn from
  ``N(0, V)`` and the variance plane ``V = (sky_s + sources + cosmic rays) / gain + read_noise²`` (the noiseless
  model, so the VARIANCE plane is exactly the variance of the noise actually added).
* Template image (template counts = ``template_scale`` × science counts): ``sky_t(x, y) + scale · Σ static
  sources ⊛ PSF_t + noise``. It is ``template_depth²`` times deeper: its noise, expressed in science counts, has
  variance ``(sky_s + sources) / (gain · template_depth²)``; in template counts the VARIANCE plane is
  ``scale² ×`` that. Its sky pedestal ``sky_t`` (own level and gradient) is added on top noiselessly, like an
  imperfectly background-subtracted coadd.
* Photometric calibrations are consistent with the flux scale: ``template.photo_calib.calibration_mean =
  science_calibration / template_scale`` nJy per count, so a static star has the same nJy in both.
* Without a template WCS offset the two share one pixel grid; with ``template_offset``/``template_rotation``
  the template is rendered on its own grid (TAN WCS, same pixel scale) from the same sky, ``template_margin``
  pixels larger on every side (None: what the offset, rotated science needs, plus 16); stars and galaxies
  cover that margin at the science's density.

Options (all keyword arguments of :func:`simulate_pair`; counts are per 1024² pixels and scale with the area)
---------------------------------------------------------------------------------------------------------
PSFs
    ``psf_profile`` ('gaussian' | 'elliptical' | 'moffat'; 'elliptical' = Gaussian with science axis ratio
    0.8 varying by ±0.05 and θ = 0.5, template 0.9 and θ = -0.3), ``moffat_beta`` (3.0), ``science_fwhm`` (4.0 px at the centre),
    ``science_fwhm_coeffs`` ((0.10, 0.05): relative FWHM change per unit of ``u, v`` ∈ [-1, 1], i.e. ±15 % at
    the corners, 30 % corner to corner), ``science_axis_ratio`` (1.0), ``science_axis_ratio_coeffs`` ((0, 0)),
    ``science_theta`` (0.0 rad), ``template_psf`` ('sharper' | 'broader' | 'mixed' | 'same'),
    ``template_fwhm`` (None: 0.8 × science for 'sharper', 1.25 × for 'broader', = science centre for 'mixed'),
    ``template_fwhm_coeffs`` (None: (0.03, -0.02); (0, 0) for 'mixed'), ``template_axis_ratio`` (1.0),
    ``template_theta`` (0.0), ``psf_oversample`` (5: sub-pixel samples per side).
    'mixed' makes the template PSF constant at the science's central FWHM, so the science is sharper on the
    left half of the field and broader on the right (the science gradient is raised to ≥ 0.15 in x).
Photometry and noise
    ``gain`` (1.0), ``read_noise`` (0.0 counts), ``science_sky`` (500.0 counts), ``science_sky_gradient``
    ((20.0, -10.0): counts added at u = 1, v = 1), ``template_scale`` (0.7), ``template_depth`` (3.0: template
    noise 3× lower, 9× deeper), ``template_sky`` (200.0 template counts), ``template_sky_gradient``
    ((-15.0, 25.0)), ``science_calibration`` (20.0 nJy per count), ``background_subtracted`` (False: if True
    the sky pedestals are removed from the images after the noise is drawn; variance unchanged).
Stars and galaxies
    ``n_stars`` (750), ``star_flux_min`` (300.0), ``star_flux_max`` (3e6), ``star_alpha`` (0.75: N(>F) ∝
    F^-alpha), ``n_saturated`` (3: extra stars 2–10× the saturation flux), ``saturation`` (60000.0 counts in
    the science; the template saturates at ``template_scale ×`` that), ``bleed`` (True: bleed trails along
    columns), ``n_galaxies`` (100), ``galaxy_flux_range`` ((2000, 1e5)), ``galaxy_radius_range`` ((1.5, 6.0)
    px half-light radius), ``galaxy_dev_fraction`` (0.2: de Vaucouleurs n = 4, others exponential n = 1),
    ``star_wing_floor`` (0.02: point sources are rendered on stamps wide enough that their wings stay below
    this many science sky σ per pixel at the stamp's border; the PSF models handed to the pipeline keep their
    own size, as fitted models do. None: every source on the model's stamp, whose border cut a bright
    Moffat star's wings with a 2σ step).
Changes
    ``n_transients`` (60 isolated-ish field transients), ``n_host_transients`` (15 on galaxies),
    ``n_transient_pairs`` (3 pairs 2–4 FWHM apart), ``n_cr_transients`` (3 with a cosmic ray 1–2 FWHM away),
    ``transient_snr_range`` ((3, 100), log-uniform), ``n_variables`` (10), ``variable_snr_range`` ((5, 50)),
    ``n_movers`` (2), ``mover_snr_range`` ((10, 50)), ``mover_step_range`` ((10, 40) px between the epochs),
    ``n_dipoles`` (0), ``dipole_shift_range`` ((0.5, 2.0) px), ``dipole_flux_range`` ((5000, 50000)).
Defects
    ``n_cosmic_rays`` (20 in the science), ``cosmic_ray_flux_range`` ((1500, 20000) counts per ray),
    ``mask_cosmic_rays`` (True: set CR on the ray pixels grown by 1 px, as a pipeline's CR finder would),
    ``n_bad_columns`` (1 in the science, BAD, hot by ``bad_column_level`` = 1000 counts),
    ``no_data_border`` (0 px of NO_DATA around the science), ``template_no_data_border`` (0),
    ``no_data_value`` (nan: image and variance value of NO_DATA pixels).
Geometry
    ``wcs`` (True: TAN WCS at ``ra_dec`` (150.0, 2.0), ``pixel_scale`` 0.2″), ``template_offset`` ((0, 0) px),
    ``template_rotation`` (0.0 deg), ``template_margin`` (None: 0 on a shared grid, else offset + rotation
    reach + 16 px). ``band`` ('r'), ``science_id`` (1), ``template_id`` (2).
Aliases (:data:`OPTION_ALIASES`): ``template_psf_mode``, ``wcs_rotation_deg``, ``wcs_offset_pix``, ``psf``.

Truth table columns
-------------------
``id`` (int, row number), ``kind`` ('star', 'galaxy', 'transient', 'variable', 'mover', 'dipole',
'cosmic_ray'), ``x``, ``y`` (science parent coordinates), ``x_template``, ``y_template`` (template parent
coordinates), ``ra``, ``dec`` (deg; NaN without WCS), ``flux_science`` (science counts), ``flux_template``
(template counts), ``delta_flux`` (science − template/scale, science counts), ``snr`` (true PSF S/N of the
change, the PSF-optimal ``|delta_flux| · √(Σ PSF²) / σ_sky`` = ``|delta_flux| / √(σ²_sky / Σ PSF²)`` with
σ²_sky the science background variance and PSF the science PSF at the position (metrics.md writes the
denominator as √(σ²_sky · Σ PSF²), which is not a S/N; the optimal-filter S/N is meant); for dipoles the S/N of the shifted star's flux; 0 for static objects), ``snr_science``
(same formula with ``flux_science``), ``fwhm`` (science PSF FWHM there), ``host`` (galaxy row id or -1),
``partner`` (the other row of a mover or a transient pair, or -1), ``radius`` (galaxy half-light radius, CR
half-length, 0 otherwise), ``sersic_n``, ``axis_ratio``, ``theta`` (galaxies), ``saturated`` (bool: SAT pixel
within 2 px in either image), ``isolated`` (bool, metrics.md: no other change and no brighter star within
3 fwhm, no BAD/SAT/CR/EDGE/NO_DATA pixel of either image within 2 px), ``in_template`` (bool: inside the
template's bounding box).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DiffimValueError
from .model import Box, Exposure, Mask, MaskedImage, PhotoCalib, VisitInfo
from .model.psf import Psf
from .testing.psfs import VaryingGaussianPsf, VaryingMoffatPsf

__all__ = [
    "SimulatedPair",
    "simulate_pair",
    "write_simulation",
    "render_point_sources",
    "DEFAULT_OPTIONS",
    "OPTION_ALIASES",
    "main",
]

#: Default options of :func:`simulate_pair` (counts are per 1024² pixels; see the module docstring).
DEFAULT_OPTIONS: dict[str, Any] = dict(
    psf_profile="gaussian",
    moffat_beta=3.0,
    science_fwhm=4.0,
    science_fwhm_coeffs=(0.10, 0.05),
    science_axis_ratio=1.0,
    science_axis_ratio_coeffs=(0.0, 0.0),
    science_theta=0.0,
    template_psf="sharper",
    template_fwhm=None,
    template_fwhm_coeffs=None,
    template_axis_ratio=1.0,
    template_theta=0.0,
    psf_oversample=5,
    gain=1.0,
    read_noise=0.0,
    science_sky=500.0,
    science_sky_gradient=(20.0, -10.0),
    template_scale=0.7,
    template_depth=3.0,
    template_sky=200.0,
    template_sky_gradient=(-15.0, 25.0),
    science_calibration=20.0,
    background_subtracted=False,
    n_stars=750,
    star_flux_min=300.0,
    star_flux_max=3e6,
    star_alpha=0.75,
    n_saturated=3,
    saturation=60000.0,
    bleed=True,
    n_galaxies=100,
    galaxy_flux_range=(2000.0, 1e5),
    galaxy_radius_range=(1.5, 6.0),
    galaxy_dev_fraction=0.2,
    star_wing_floor=0.02,
    n_transients=60,
    n_host_transients=15,
    n_transient_pairs=3,
    n_cr_transients=3,
    transient_snr_range=(3.0, 100.0),
    n_variables=10,
    variable_snr_range=(5.0, 50.0),
    n_movers=2,
    mover_snr_range=(10.0, 50.0),
    mover_step_range=(10.0, 40.0),
    n_dipoles=0,
    dipole_shift_range=(0.5, 2.0),
    dipole_flux_range=(5000.0, 50000.0),
    n_cosmic_rays=20,
    cosmic_ray_flux_range=(1500.0, 20000.0),
    mask_cosmic_rays=True,
    n_bad_columns=1,
    bad_column_level=1000.0,
    no_data_border=0,
    template_no_data_border=0,
    no_data_value=float("nan"),
    wcs=True,
    ra_dec=(150.0, 2.0),
    pixel_scale=0.2,
    template_offset=(0.0, 0.0),
    template_rotation=0.0,
    template_margin=None,
    band="r",
    science_id=1,
    template_id=2,
)

#: Option names whose values are numbers of objects per 1024² pixels (scaled with the image area).
_COUNT_OPTIONS = (
    "n_stars",
    "n_saturated",
    "n_galaxies",
    "n_transients",
    "n_host_transients",
    "n_transient_pairs",
    "n_cr_transients",
    "n_variables",
    "n_movers",
    "n_dipoles",
    "n_cosmic_rays",
)

_CHANGE_KINDS = ("transient", "variable", "mover", "dipole", "cosmic_ray")
_DEFECT_PLANES = ("BAD", "SAT", "CR", "EDGE", "NO_DATA")


@dataclass
class SimulatedPair:
    """A simulated science/template pair and its truth.

    Attributes
    ----------
    science, template
        The exposures (template on its own grid if a WCS offset was requested).
    truth
        ``astropy.table.Table`` (columns in the :mod:`diffim.sim` docstring).
    science_psf, template_psf
        The true PSF models (also attached to the exposures).
    science_model
        Noiseless science image (sky + all sources + cosmic rays, before saturation), float32.
    science_static
        Noiseless science image of the *static* sky only: sky + stars and galaxies at their template brightness
        and position, with the science PSF and flux scale. ``science - science_static`` is a perfect difference.
    template_model
        Noiseless template image (before saturation).
    options
        The resolved options (after defaults and area scaling).
    """

    science: Exposure
    template: Exposure
    truth: Any
    science_psf: Psf
    template_psf: Psf
    science_model: np.ndarray | None = None
    science_static: np.ndarray | None = None
    template_model: np.ndarray | None = None
    options: dict = field(default_factory=dict)

    def perfect_difference(self) -> Exposure:
        """``science − science_static``: the difference a perfect subtraction would give (science variance)."""
        diff = self.science.copy()
        diff.image[...] = self.science.image - self.science_static
        return diff

    def write(self, outdir: str | Path) -> dict[str, Path]:
        """Write ``science.fits``, ``template.fits``, ``truth.fits``, ``truth.csv`` (+ ``truth.parquet``).

        Returns the paths written, by name.
        """
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        paths = {"science": outdir / "science.fits", "template": outdir / "template.fits"}
        from .io import write_exposure

        write_exposure(self.science, paths["science"])
        write_exposure(self.template, paths["template"])
        paths["truth_fits"] = outdir / "truth.fits"
        self.truth.write(paths["truth_fits"], overwrite=True)
        paths["truth_csv"] = outdir / "truth.csv"
        self.truth.write(paths["truth_csv"], format="ascii.csv", overwrite=True)
        try:
            import pyarrow  # noqa: F401

            paths["truth_parquet"] = outdir / "truth.parquet"
            self.truth.write(paths["truth_parquet"], format="parquet", overwrite=True)
        except ImportError:  # optional extra
            pass
        return paths


# ----------------------------------------------------------------------------------------------------------
# Rendering helpers
# ----------------------------------------------------------------------------------------------------------
#: Widest stamp (pixels) a bright source's wings are rendered to (:func:`render_point_sources`' ``wing_floor``).
MAX_WING_STAMP = 401


def _wing_stamp_sizes(psf, flux: np.ndarray, floor: float) -> np.ndarray:
    """Odd stamp size per source such that ``flux`` times the unit stamp's largest border pixel stays below
    ``floor``: the PSF's own size for most, wider ones (growing by 1.5×, at most :data:`MAX_WING_STAMP`) for the
    bright. The border is measured on the broadest profile of the PSF's box (its corners and centre)."""
    b = psf.bbox
    xs = np.array([b.x0, b.x1 - 1, b.x0, b.x1 - 1, b.center[0]], float)
    ys = np.array([b.y0, b.y0, b.y1 - 1, b.y1 - 1, b.center[1]], float)
    sizes = np.full(flux.size, psf.size, int)
    todo = np.ones(flux.size, bool)
    size = psf.size
    while todo.any():
        st = (psf if size == psf.size else psf.resized(size)).stamps(xs, ys, 0.0, 0.0)
        edge = max(float(np.abs(st[:, [0, -1], :]).max()), float(np.abs(st[:, :, [0, -1]]).max()))
        fits = np.abs(flux) * edge <= floor
        sizes[todo & fits] = size
        todo &= ~fits
        if size >= MAX_WING_STAMP:
            sizes[todo] = size
            break
        size = min(MAX_WING_STAMP, 2 * int(math.ceil(0.75 * size)) + 1)
    return sizes


def render_point_sources(
    shape: tuple[int, int],
    psf: Psf,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    xy0: tuple[int, int] = (0, 0),
    wing_floor: float | None = None,
) -> np.ndarray:
    """Sum of point sources ``flux · PSF(x, y)`` on an image of ``shape`` whose first pixel is at ``xy0``.

    Each source is the PSF evaluated at its own sub-pixel position (``psf.compute_image``; the analytic PSFs of
    :mod:`diffim.testing.psfs` are evaluated in vectorised batches). Stamps falling partly off the image are
    clipped. Returns a float64 array.

    With ``wing_floor`` (image units; analytic PSFs only) a source whose wings would still exceed it per pixel
    at the border of the PSF's stamp is rendered on a wider one (:func:`_wing_stamp_sizes`). A star's light does
    not end at a model's stamp: a Moffat stamp holds 99.5 % of it, and a 7·10⁶-count star cut there has a
    40-count (2σ) step at its border — at a different radius in two images of different seeing, a ring no
    matching kernel can reproduce.
    """
    ny, nx = shape
    x = np.asarray(x, float).ravel()
    y = np.asarray(y, float).ravel()
    flux = np.asarray(flux, float).ravel()
    out = np.zeros(ny * nx)
    if x.size == 0:
        return out.reshape(shape)
    if wing_floor is not None and hasattr(psf, "resized") and hasattr(psf, "stamps"):
        sizes = _wing_stamp_sizes(psf, flux, float(wing_floor))
        img = np.zeros(shape)
        for size in np.unique(sizes):
            sel = sizes == size
            img += render_point_sources(shape, psf if size == psf.size else psf.resized(int(size)),
                                        x[sel], y[sel], flux[sel], xy0)
        return img
    if hasattr(psf, "stamps"):
        h = psf.size // 2
        off = np.arange(-h, h + 1)
        batch = max(1, int(2e6 // (psf.size * psf.size)))
        for i0 in range(0, x.size, batch):
            sl = slice(i0, i0 + batch)
            st = psf.stamps(x[sl], y[sl]) * flux[sl, None, None]
            ix = np.floor(x[sl] + 0.5).astype(int) - xy0[0]
            iy = np.floor(y[sl] + 0.5).astype(int) - xy0[1]
            cols = ix[:, None, None] + off[None, None, :]
            rows = iy[:, None, None] + off[None, :, None]
            cols, rows = np.broadcast_arrays(cols, rows)
            ok = (cols >= 0) & (cols < nx) & (rows >= 0) & (rows < ny)
            out += np.bincount((rows[ok] * nx + cols[ok]), weights=st[ok], minlength=ny * nx)
        return out.reshape(shape)
    img = out.reshape(shape)
    full = Box(xy0[0], xy0[1], nx, ny)
    for xi, yi, fi in zip(x, y, flux):
        stamp, box = psf.compute_image(xi, yi)
        inter = box.intersection(full)
        if inter.is_empty():
            continue
        img[inter.slices(full)] += fi * stamp[inter.slices(box)]
    return img


def _sersic_b(n: float) -> float:
    """b_n such that the Sersic half-light radius encloses half the light (Ciotti & Bertin 1999 expansion)."""
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n * n)


def _sersic_sharp(dx: float, dy: float, h: int, r_e: float, n: float, q: float, theta: float, oversample: int) -> np.ndarray:
    """Pixel-integrated Sersic profile on a ``(2h+1)²`` stamp centred ``(dx, dy)`` from its middle pixel.

    Pixels are sampled at their centres except the central 7×7 (where the profile curves on sub-pixel scales,
    a cusp for n = 4), which are averaged over ``oversample²`` (×2 for n > 2) sub-samples.
    """
    c, s = math.cos(theta), math.sin(theta)
    bn = _sersic_b(n)

    def prof(u, v):
        xp = u * c + v * s
        yp = -u * s + v * c
        # Area-preserving elliptical radius: r_e is the geometric-mean half-light radius.
        r = np.sqrt(xp * xp * q + yp * yp / q)
        out = np.exp(-bn * ((r / r_e) ** (1.0 / n) - 1.0))
        out[r > 5.0 * r_e] = 0.0
        return out

    g = np.arange(-h, h + 1, dtype=float)
    img = prof(g[None, :] - dx, g[:, None] - dy)
    cc = min(3, h)
    o = oversample * (2 if n > 2 else 1)
    sub = (np.arange(o) + 0.5) / o - 0.5
    gc = (np.arange(-cc, cc + 1)[:, None] + sub[None, :]).ravel()
    core = prof(gc[None, :] - dx, gc[:, None] - dy).reshape(2 * cc + 1, o, 2 * cc + 1, o).mean(axis=(1, 3))
    img[h - cc : h + cc + 1, h - cc : h + cc + 1] = core
    return img


def _convolve_same(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Linear convolution of ``image`` with an odd, centred ``kernel``, cropped to ``image``'s shape (FFT).

    (scipy.fft rather than scipy.signal: the latter costs seconds to import.)
    """
    from scipy import fft

    ny, nx = image.shape
    ky, kx = kernel.shape
    shape = (fft.next_fast_len(ny + ky - 1, real=True), fft.next_fast_len(nx + kx - 1, real=True))
    full = fft.irfft2(fft.rfft2(image, shape) * fft.rfft2(kernel, shape), shape)
    return full[ky // 2 : ky // 2 + ny, kx // 2 : kx // 2 + nx]


def _galaxy_stamp(
    dx: float, dy: float, r_e: float, n: float, q: float, theta: float, psf_kernel: np.ndarray, oversample: int = 5
) -> np.ndarray:
    """Unit-sum Sersic galaxy centred ``(dx, dy)`` from the stamp centre, convolved with ``psf_kernel``.

    The sharp profile (:func:`_sersic_sharp`, truncated at 5 r_e) is FFT-convolved with the (centred, odd) PSF
    kernel image; the result is normalised to unit sum so the truth flux is exactly what is rendered.
    """
    hk = psf_kernel.shape[0] // 2
    hg = int(math.ceil(5.0 * r_e / math.sqrt(q))) + 1
    h = hg + hk
    sharp = _sersic_sharp(dx, dy, h, r_e, n, q, theta, oversample)
    conv = _convolve_same(sharp, psf_kernel)
    conv = np.clip(conv, 0, None)
    return conv / conv.sum()


def _add_stamp(image: np.ndarray, stamp: np.ndarray, ix: int, iy: int, xy0=(0, 0)) -> None:
    """Add an odd stamp centred on parent pixel ``(ix, iy)``, clipped to the image."""
    h = stamp.shape[0] // 2
    full = Box(xy0[0], xy0[1], image.shape[1], image.shape[0])
    box = Box(ix - h, iy - h, stamp.shape[1], stamp.shape[0])
    inter = box.intersection(full)
    if not inter.is_empty():
        image[inter.slices(full)] += stamp[inter.slices(box)]


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n))


def _sky(shape, level: float, gradient: tuple[float, float], xy0=(0, 0)) -> np.ndarray:
    ny, nx = shape
    u = (np.arange(nx) + xy0[0] - (nx - 1) / 2.0) / (nx / 2.0)
    v = (np.arange(ny) + xy0[1] - (ny - 1) / 2.0) / (ny / 2.0)
    return level + gradient[0] * u[None, :] + gradient[1] * v[:, None]


def _make_wcs(shape, ra_dec, pixel_scale, rotation_deg=0.0, crpix_shift=(0.0, 0.0)):
    """TAN WCS whose 0-based pixel ``centre + crpix_shift`` is at ``ra_dec``; rotation about that point."""
    from astropy.wcs import WCS

    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(ra_dec)
    w.wcs.crpix = [(nx - 1) / 2.0 + 1.0 + crpix_shift[0], (ny - 1) / 2.0 + 1.0 + crpix_shift[1]]
    s = pixel_scale / 3600.0
    t = math.radians(rotation_deg)
    # East left (RA increases to -x), north up; rotation turns the pixel axes on the sky.
    w.wcs.cd = np.array([[-s * math.cos(t), s * math.sin(t)], [s * math.sin(t), s * math.cos(t)]])
    w.wcs.radesys = "ICRS"
    return w


def _bleed(image: np.ndarray, sat: np.ndarray, level: float) -> None:
    """Spread the charge above ``level`` along columns (bleed trails); mark every clipped pixel in ``sat``."""
    over = image > level
    if not over.any():
        return
    cols = np.unique(np.nonzero(over)[1])
    ny = image.shape[0]
    for c in cols:
        col = image[:, c]
        rows = np.nonzero(col > level)[0]
        # Group contiguous runs of saturated rows; each run spills its excess up and down the column.
        splits = np.nonzero(np.diff(rows) > 1)[0] + 1
        for run in np.split(rows, splits):
            excess = float((col[run] - level).sum())
            extra = int(math.ceil(excess / level / 2.0))
            lo = max(0, run[0] - extra)
            hi = min(ny, run[-1] + 1 + extra)
            col[lo:hi] = np.maximum(col[lo:hi], level)
            sat[lo:hi, c] = True


# ----------------------------------------------------------------------------------------------------------
# The simulator
# ----------------------------------------------------------------------------------------------------------
#: Alternative option names accepted for convenience (the ``diffim simulate`` command line uses some of them).
OPTION_ALIASES: dict[str, str] = {
    "template_psf_mode": "template_psf",
    "wcs_rotation_deg": "template_rotation",
    "wcs_offset_pix": "template_offset",
    "template_wcs_rotation": "template_rotation",
    "template_wcs_offset": "template_offset",
    "psf": "psf_profile",
}


def _min_science_sky_variance(opt: dict) -> float:
    """Smallest per-pixel variance of the science background over the image (counts²): the sky level less its
    full gradient (the linear ramp's lowest corner), over the gain, plus the read noise."""
    sky_min = opt["science_sky"] - abs(opt["science_sky_gradient"][0]) - abs(opt["science_sky_gradient"][1])
    return sky_min / opt["gain"] + opt["read_noise"] ** 2


def _resolve_options(size: int, options: dict) -> dict:
    options = dict(options)
    for alias, name in OPTION_ALIASES.items():
        if alias in options:
            if name in options:
                raise DiffimValueError(f"Options {alias!r} and {name!r} are the same; give only one.")
            options[name] = options.pop(alias)
    if options.get("psf_profile") == "elliptical":
        # Shorthand: an elliptical Gaussian science PSF whose ellipticity also varies over the field.
        options["psf_profile"] = "gaussian"
        options.setdefault("science_axis_ratio", 0.8)
        options.setdefault("science_axis_ratio_coeffs", (0.05, -0.05))
        options.setdefault("science_theta", 0.5)
        options.setdefault("template_axis_ratio", 0.9)
        options.setdefault("template_theta", -0.3)
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise DiffimValueError(
            f"Unknown simulate_pair option(s) {sorted(unknown)}; known options are listed in diffim.sim.DEFAULT_OPTIONS."
        )
    opt = dict(DEFAULT_OPTIONS)
    area = (size / 1024.0) ** 2
    for k in _COUNT_OPTIONS:
        if k not in options:
            opt[k] = int(round(DEFAULT_OPTIONS[k] * area))
    opt.update(options)
    if opt["psf_profile"] not in ("gaussian", "moffat"):
        raise DiffimValueError(f"psf_profile must be 'gaussian', 'elliptical' or 'moffat', got {opt['psf_profile']!r}.")
    if not _min_science_sky_variance(opt) > 0:
        raise DiffimValueError(
            f"The science background variance must be > 0 everywhere (science_sky={opt['science_sky']}, gradient "
            f"{tuple(opt['science_sky_gradient'])}, read_noise={opt['read_noise']}): S/N-defined fluxes need noise."
        )
    wf = opt["star_wing_floor"]
    if wf is not None and not (isinstance(wf, (int, float)) and math.isfinite(wf) and wf > 0):
        raise DiffimValueError(f"star_wing_floor must be a number > 0 (science sky σ per pixel) or None, got {wf!r}.")
    if not (opt["gain"] > 0 and opt["template_scale"] > 0 and opt["template_depth"] > 0):
        raise DiffimValueError("gain, template_scale and template_depth must be > 0.")
    if opt["template_psf"] not in ("sharper", "broader", "mixed", "same"):
        raise DiffimValueError(
            f"template_psf must be 'sharper', 'broader', 'mixed' or 'same', got {opt['template_psf']!r}."
        )
    return opt


def _make_psfs(opt: dict, sci_box: Box, tmpl_box: Box) -> tuple[Psf, Psf]:
    cls = VaryingGaussianPsf if opt["psf_profile"] == "gaussian" else VaryingMoffatPsf
    f_s = float(opt["science_fwhm"])
    c_s = tuple(opt["science_fwhm_coeffs"])
    mode = opt["template_psf"]
    if mode == "mixed":
        c_s = (max(abs(c_s[0]) if c_s else 0.0, 0.15),) + tuple(c_s[1:])
    f_t = opt["template_fwhm"]
    c_t = opt["template_fwhm_coeffs"]
    if f_t is None:
        f_t = {"sharper": 0.8, "broader": 1.25, "mixed": 1.0, "same": 1.0}[mode] * f_s
    if c_t is None:
        c_t = {"mixed": (0.0, 0.0), "same": c_s}.get(mode, (0.03, -0.02))
    common = dict(beta=opt["moffat_beta"], oversample=opt["psf_oversample"])
    sci = cls(
        f_s,
        c_s,
        axis_ratio=opt["science_axis_ratio"],
        axis_ratio_coeffs=tuple(opt["science_axis_ratio_coeffs"]),
        theta=opt["science_theta"],
        bbox=sci_box,
        **common,
    )
    tmpl = cls(
        f_t,
        tuple(c_t),
        axis_ratio=opt["template_axis_ratio"],
        theta=opt["template_theta"],
        bbox=tmpl_box,
        **common,
    )
    return sci, tmpl


def simulate_pair(size: int = 1024, seed: int = 0, **options: Any) -> SimulatedPair:
    """Simulate a science/template pair with known truth.

    Parameters
    ----------
    size
        Width and height of the science image in pixels.
    seed
        Seed of the ``numpy.random.Generator``; the same seed and options give identical outputs.
    **options
        Scene options (see the module docstring and :data:`DEFAULT_OPTIONS`). Object counts default to the
        per-1024² values scaled by the image area.

    Returns
    -------
    SimulatedPair
    """
    from astropy.table import Table

    size = int(size)
    if size < 64:
        raise DiffimValueError(f"simulate_pair needs size >= 64 pixels, got {size}.")
    opt = _resolve_options(size, options)
    rng = np.random.default_rng(seed)
    shape = (size, size)
    sci_box = Box(0, 0, size, size)

    # ---- geometry: the template grid and the pixel mapping science → template ---------------------------
    offset = tuple(float(v) for v in opt["template_offset"])
    rot = float(opt["template_rotation"])
    own_grid = offset != (0.0, 0.0) or rot != 0.0
    margin = opt["template_margin"]
    if margin is None:
        # The science rotated by `rot` about its centre spans (size / 2)(|cos| + |sin|) either side of it.
        c, s_ = abs(math.cos(math.radians(rot))), abs(math.sin(math.radians(rot)))
        reach = 0.5 * size * (c + s_ - 1.0) + math.hypot(*offset)
        margin = 0 if not own_grid else int(math.ceil(reach)) + 16
    margin = int(margin)
    tsize = size + 2 * margin
    tmpl_box = Box(0, 0, tsize, tsize)
    wcs_s = wcs_t = None
    if opt["wcs"] or own_grid:
        wcs_s = _make_wcs(shape, opt["ra_dec"], opt["pixel_scale"])
        # The template's pixel (centre_t + offset) sees the science centre; its axes are rotated by `rot`.
        wcs_t = _make_wcs((tsize, tsize), opt["ra_dec"], opt["pixel_scale"], rot, offset) if own_grid else wcs_s

    def to_template(x, y):
        x = np.asarray(x, float)
        y = np.asarray(y, float)
        if not own_grid:
            return x + 0.0, y + 0.0
        ra, dec = wcs_s.all_pix2world(x, y, 0)
        return tuple(np.asarray(a, float) for a in wcs_t.all_world2pix(ra, dec, 0))

    sci_psf, tmpl_psf = _make_psfs(opt, sci_box, tmpl_box)
    scale = float(opt["template_scale"])
    gain = float(opt["gain"])

    # Region where objects are placed: the science image, grown to include the template's margin.
    pad = margin + 8
    lo_xy, hi_xy = -pad, size - 1 + pad

    def uniform_xy(n, inner=0.0):
        return rng.uniform(lo_xy + inner, hi_xy - inner, n), rng.uniform(lo_xy + inner, hi_xy - inner, n)

    # Science background variance (counts²) and Σ PSF² at positions, for S/N ↔ flux conversions.
    sky_s = _sky(shape, opt["science_sky"], opt["science_sky_gradient"])

    def sky_var_at(x, y):
        u = (np.clip(x, 0, size - 1) - (size - 1) / 2.0) / (size / 2.0)
        v = (np.clip(y, 0, size - 1) - (size - 1) / 2.0) / (size / 2.0)
        sky = opt["science_sky"] + opt["science_sky_gradient"][0] * u + opt["science_sky_gradient"][1] * v
        return sky / gain + opt["read_noise"] ** 2

    def psf_noise(x, y):
        """√(σ²_sky / Σ PSF²): the 1-σ error of a PSF-fit flux on the science background."""
        x = np.atleast_1d(np.asarray(x, float))
        y = np.atleast_1d(np.asarray(y, float))
        if x.size == 0:
            return np.zeros(0)
        if hasattr(sci_psf, "stamps"):
            st = sci_psf.stamps(np.clip(x, 0, size - 1), np.clip(y, 0, size - 1))
            s2 = (st**2).sum(axis=(1, 2))
        else:
            s2 = np.array([(sci_psf.compute_image(a, b)[0] ** 2).sum() for a, b in zip(x, y)])
        return np.sqrt(sky_var_at(x, y) / s2)

    rows: list[dict] = []

    def add_row(kind, x, y, fs, ft, **extra):
        r = dict(kind=kind, x=float(x), y=float(y), flux_science=float(fs), flux_template=float(ft))
        r.update(extra)
        rows.append(r)
        return len(rows) - 1

    # Stars and galaxies are placed over the grown region at the density their counts give the science (a
    # larger template grid must not thin out the science's sky).
    spread = ((hi_xy - lo_xy) / (size - 1 + 16.0)) ** 2

    # ---- static stars ------------------------------------------------------------------------------------
    n_stars = int(round(int(opt["n_stars"]) * spread))
    sx, sy = uniform_xy(n_stars)
    a = float(opt["star_alpha"])
    fmin, fmax = float(opt["star_flux_min"]), float(opt["star_flux_max"])
    # Inverse CDF of a Pareto law N(>F) ∝ F^-a truncated at fmax.
    umax = 1.0 - (fmin / fmax) ** a
    sflux = fmin * (1.0 - rng.uniform(0, umax, n_stars)) ** (-1.0 / a)
    # Saturation flux: the flux whose peak pixel (plus sky) reaches the saturation level at the centre.
    peak_frac = float(sci_psf.compute_kernel_image().max())
    sat_flux = (opt["saturation"] - opt["science_sky"]) / peak_frac
    n_sat = int(opt["n_saturated"])
    e_sat = min(40.0, size / 4.0)
    qx, qy = rng.uniform(e_sat, size - e_sat, n_sat), rng.uniform(e_sat, size - e_sat, n_sat)
    qflux = sat_flux * rng.uniform(2.0, 10.0, n_sat)
    sx, sy, sflux = np.concatenate([sx, qx]), np.concatenate([sy, qy]), np.concatenate([sflux, qflux])
    for i in range(sx.size):
        add_row("star", sx[i], sy[i], sflux[i], sflux[i] * scale)

    # ---- galaxies ---------------------------------------------------------------------------------------
    n_gal = int(round(int(opt["n_galaxies"]) * spread))
    gx, gy = uniform_xy(n_gal, inner=4)
    gflux = _log_uniform(rng, *opt["galaxy_flux_range"], n_gal)
    grad = _log_uniform(rng, *opt["galaxy_radius_range"], n_gal)
    gn = np.where(rng.uniform(size=n_gal) < opt["galaxy_dev_fraction"], 4.0, 1.0)
    gq = rng.uniform(0.35, 1.0, n_gal)
    gth = rng.uniform(0, np.pi, n_gal)
    gal_rows = []
    for i in range(n_gal):
        gal_rows.append(
            add_row("galaxy", gx[i], gy[i], gflux[i], gflux[i] * scale, radius=grad[i], sersic_n=gn[i], axis_ratio=gq[i], theta=gth[i])
        )

    # ---- changes ----------------------------------------------------------------------------------------
    fw0 = float(opt["science_fwhm"])
    bright_x, bright_y, bright_f = sx, sy, sflux

    def clear_of_stars(x, y, f, radius):
        d2 = (bright_x - x) ** 2 + (bright_y - y) ** 2
        return not np.any((d2 < radius * radius) & (bright_f > f))

    def draw_field_positions(n, flux, edge=12.0, radius=4.0 * fw0):
        edge = min(edge, size / 4.0)  # small images: keep a usable range
        xs, ys = np.empty(n), np.empty(n)
        for i in range(n):
            for _ in range(50):  # rejection sampling; keeps most field transients isolated
                x, y = rng.uniform(edge, size - 1 - edge, 2)
                if clear_of_stars(x, y, flux[i], radius):
                    break
            xs[i], ys[i] = x, y
        return xs, ys

    snr_lo, snr_hi = opt["transient_snr_range"]
    noise0 = float(psf_noise([size / 2.0], [size / 2.0])[0])
    # Field transients.
    n_tr = int(opt["n_transients"])
    snr = _log_uniform(rng, snr_lo, snr_hi, n_tr)
    # Field transients avoid stars brighter than themselves (flux estimated with the central noise).
    tx, ty = draw_field_positions(n_tr, snr * noise0)
    tflux = snr * psf_noise(tx, ty)
    for i in range(n_tr):
        add_row("transient", tx[i], ty[i], tflux[i], 0.0)
    # Transients on galaxies (within ~1 r_e of the centre), hosts chosen among galaxies inside the image.
    inside = [r for r in gal_rows if 16 <= rows[r]["x"] <= size - 17 and 16 <= rows[r]["y"] <= size - 17]
    n_ht = int(opt["n_host_transients"]) if inside else 0
    if n_ht:
        hosts = rng.choice(inside, n_ht, replace=n_ht > len(inside))
        snr = _log_uniform(rng, snr_lo, snr_hi, n_ht)
        rr = rng.uniform(0, 1, n_ht) * np.array([rows[h]["radius"] for h in hosts])
        ph = rng.uniform(0, 2 * np.pi, n_ht)
        hx = np.array([rows[h]["x"] for h in hosts]) + rr * np.cos(ph)
        hy = np.array([rows[h]["y"] for h in hosts]) + rr * np.sin(ph)
        hflux = snr * psf_noise(hx, hy)
        for i in range(n_ht):
            add_row("transient", hx[i], hy[i], hflux[i], 0.0, host=int(hosts[i]))
    # Close pairs of transients, 2–4 FWHM apart.
    n_pairs = int(opt["n_transient_pairs"])
    if n_pairs:
        s1 = _log_uniform(rng, 10.0, snr_hi, n_pairs)
        s2 = _log_uniform(rng, 10.0, snr_hi, n_pairs)
        px, py = draw_field_positions(n_pairs, np.minimum(s1, s2) * noise0, edge=30.0, radius=7.0 * fw0)
        sep = rng.uniform(2.0, 4.0, n_pairs) * fw0
        ph = rng.uniform(0, 2 * np.pi, n_pairs)
        qx2, qy2 = px + sep * np.cos(ph), py + sep * np.sin(ph)
        f1, f2 = s1 * psf_noise(px, py), s2 * psf_noise(qx2, qy2)
        for i in range(n_pairs):
            r1 = add_row("transient", px[i], py[i], f1[i], 0.0)
            r2 = add_row("transient", qx2[i], qy2[i], f2[i], 0.0, partner=r1)
            rows[r1]["partner"] = r2
    # Transients with a cosmic ray next to them (the rays themselves are placed with the other rays below).
    n_crt = int(opt["n_cr_transients"])
    crt_rows = []
    if n_crt:
        snr = _log_uniform(rng, 7.0, snr_hi, n_crt)
        cx_, cy_ = draw_field_positions(n_crt, snr * noise0, edge=30.0)
        cf = snr * psf_noise(cx_, cy_)
        for i in range(n_crt):
            crt_rows.append(add_row("transient", cx_[i], cy_[i], cf[i], 0.0))

    # Variables: stars whose science flux differs from the template's by ±S/N·noise.
    n_var = int(opt["n_variables"])
    if n_var:
        vflux_t = _log_uniform(rng, 2000.0, 50000.0, n_var)
        vx, vy = draw_field_positions(n_var, vflux_t * 2, edge=16.0)
        vsnr = _log_uniform(rng, *opt["variable_snr_range"], n_var)
        sign = np.where(np.arange(n_var) % 2 == 0, 1.0, -1.0)  # both signs, alternating
        dflux = sign * vsnr * psf_noise(vx, vy)
        # A fading variable cannot drop below zero: keep at least 20 % of its template flux.
        dflux = np.maximum(dflux, -0.8 * vflux_t)
        for i in range(n_var):
            add_row("variable", vx[i], vy[i], vflux_t[i] + dflux[i], vflux_t[i] * scale)

    # Movers: a point source at A in the science and at B in the template (two rows, partners).
    n_mov = int(opt["n_movers"])
    if n_mov:
        msnr = _log_uniform(rng, *opt["mover_snr_range"], n_mov)
        mx, my = draw_field_positions(n_mov, msnr * noise0, edge=60.0)
        step = rng.uniform(*opt["mover_step_range"], n_mov)
        ph = rng.uniform(0, 2 * np.pi, n_mov)
        bx, by = mx + step * np.cos(ph), my + step * np.sin(ph)
        mflux = msnr * psf_noise(mx, my)
        for i in range(n_mov):
            ra_ = add_row("mover", mx[i], my[i], mflux[i], 0.0)
            rb_ = add_row("mover", bx[i], by[i], 0.0, mflux[i] * scale, partner=ra_)
            rows[ra_]["partner"] = rb_

    # Dipoles: a star whose science position is shifted by 0.5–2 px from its template position.
    n_dip = int(opt["n_dipoles"])
    dip_tx = dip_ty = np.zeros(0)
    if n_dip:
        dflux = _log_uniform(rng, *opt["dipole_flux_range"], n_dip)
        dx_, dy_ = draw_field_positions(n_dip, dflux * 2, edge=20.0)
        shift = rng.uniform(*opt["dipole_shift_range"], n_dip)
        ph = rng.uniform(0, 2 * np.pi, n_dip)
        dip_tx, dip_ty = dx_ - shift * np.cos(ph), dy_ - shift * np.sin(ph)  # template-epoch position (sci coords)
        for i in range(n_dip):
            add_row("dipole", dx_[i], dy_[i], dflux[i], dflux[i] * scale, shift=shift[i])

    # Cosmic rays (science only): short 1-px-wide tracks; some next to the "CR transients".
    n_cr = int(opt["n_cosmic_rays"])
    crx, cry = rng.uniform(5, size - 6, n_cr), rng.uniform(5, size - 6, n_cr)
    for i, r in enumerate(crt_rows[:n_cr]):
        d = rng.uniform(1.0, 2.0) * fw0
        ph = rng.uniform(0, 2 * np.pi)
        crx[i] = np.clip(rows[r]["x"] + d * math.cos(ph), 5, size - 6)
        cry[i] = np.clip(rows[r]["y"] + d * math.sin(ph), 5, size - 6)
    crlen = rng.uniform(1.0, 8.0, n_cr)
    crang = rng.uniform(0, np.pi, n_cr)
    crflux = rng.uniform(*opt["cosmic_ray_flux_range"], n_cr)
    for i in range(n_cr):
        add_row("cosmic_ray", crx[i], cry[i], crflux[i], 0.0, radius=crlen[i] / 2.0, theta=crang[i])

    # ---- truth table skeleton ---------------------------------------------------------------------------
    nrow = len(rows)
    kind = np.array([r["kind"] for r in rows])
    X = np.array([r["x"] for r in rows])
    Y = np.array([r["y"] for r in rows])
    FS = np.array([r["flux_science"] for r in rows])
    FT = np.array([r["flux_template"] for r in rows])
    XT, YT = to_template(X, Y)
    if n_dip:
        # Dipoles' template positions are their shifted positions.
        sel = np.nonzero(kind == "dipole")[0]
        XT[sel], YT[sel] = to_template(dip_tx, dip_ty)

    # ---- render the science -----------------------------------------------------------------------------
    is_pt = np.isin(kind, ["star", "transient", "variable", "mover", "dipole"])
    sci_pt = is_pt & (FS > 0)
    # Per-pixel level below which the wings may be cut (science counts; template counts: × scale, so that a
    # static star's stamp reaches as far in both images).
    floor = None
    if opt["star_wing_floor"] is not None:
        floor = float(opt["star_wing_floor"]) * math.sqrt(_min_science_sky_variance(opt))
    stars_img = render_point_sources(shape, sci_psf, X[sci_pt], Y[sci_pt], FS[sci_pt], wing_floor=floor)
    # Static scene as seen by the science (template brightness and positions, science PSF and scale).
    st_pt = is_pt & (FT > 0) & (kind != "mover")
    xs_st, ys_st = X[st_pt].copy(), Y[st_pt].copy()
    if n_dip:
        dsel = kind[st_pt] == "dipole"
        xs_st[dsel], ys_st[dsel] = dip_tx, dip_ty
    static_pts = render_point_sources(shape, sci_psf, xs_st, ys_st, FT[st_pt] / scale, wing_floor=floor)

    gal_img_s = np.zeros(shape)
    gal_img_t = np.zeros((tsize, tsize))
    rot_rad = math.radians(rot)
    for r in gal_rows:
        g = rows[r]
        xg, yg = g["x"], g["y"]
        if -30 < xg < size + 30 and -30 < yg < size + 30:
            k = sci_psf.compute_kernel_image(min(max(xg, 0), size - 1), min(max(yg, 0), size - 1))
            ix, iy = int(math.floor(xg + 0.5)), int(math.floor(yg + 0.5))
            st = _galaxy_stamp(xg - ix, yg - iy, g["radius"], g["sersic_n"], g["axis_ratio"], g["theta"], k)
            _add_stamp(gal_img_s, g["flux_science"] * st, ix, iy)
        xt, yt = XT[r], YT[r]
        if -30 < xt < tsize + 30 and -30 < yt < tsize + 30:
            k = tmpl_psf.compute_kernel_image(min(max(xt, 0), tsize - 1), min(max(yt, 0), tsize - 1))
            ix, iy = int(math.floor(xt + 0.5)), int(math.floor(yt + 0.5))
            # The template's pixel axes are turned by +rot on the sky, so a direction at angle θ in science
            # pixels is at θ − rot in template pixels.
            st = _galaxy_stamp(xt - ix, yt - iy, g["radius"], g["sersic_n"], g["axis_ratio"], g["theta"] - rot_rad, k)
            _add_stamp(gal_img_t, g["flux_template"] * st, ix, iy)

    cr_img = np.zeros(shape)
    cr_pix = np.zeros(shape, bool)
    for i in np.nonzero(kind == "cosmic_ray")[0]:
        L = 2 * rows[i]["radius"]
        th = rows[i]["theta"]
        npt = max(2, int(math.ceil(L * 4)) + 1)
        t = np.linspace(-L / 2, L / 2, npt)
        px = np.floor(X[i] + t * math.cos(th) + 0.5).astype(int)
        py = np.floor(Y[i] + t * math.sin(th) + 0.5).astype(int)
        ok = (px >= 0) & (px < size) & (py >= 0) & (py < size)
        np.add.at(cr_img, (py[ok], px[ok]), FS[i] / npt)
        cr_pix[py[ok], px[ok]] = True

    sci_model = sky_s + stars_img + gal_img_s + cr_img
    sci_static = sky_s + static_pts + gal_img_s
    sci_var = sci_model / gain + opt["read_noise"] ** 2
    sci_img = sci_model + rng.standard_normal(shape) * np.sqrt(sci_var)
    sci_mask = Mask.zeros(shape)
    sat = np.zeros(shape, bool)
    if opt["bleed"]:
        _bleed(sci_img, sat, opt["saturation"])
    sat |= sci_img >= opt["saturation"]
    sci_img = np.minimum(sci_img, opt["saturation"])
    sci_mask.set("SAT", sat)
    if opt["mask_cosmic_rays"] and cr_pix.any():
        from scipy.ndimage import binary_dilation

        sci_mask.set("CR", binary_dilation(cr_pix, np.ones((3, 3), bool)))
    bad_cols = rng.integers(20, size - 20, int(opt["n_bad_columns"]))
    for c in bad_cols:
        sci_img[:, c] += opt["bad_column_level"]
        bad = np.zeros(shape, bool)
        bad[:, c] = True
        sci_mask.set("BAD", bad)
    if opt["background_subtracted"]:
        sci_img -= sky_s
        sci_static = sci_static - sky_s
        sci_model = sci_model - sky_s
    b = int(opt["no_data_border"])
    if b > 0:
        nd = np.ones(shape, bool)
        nd[b:-b, b:-b] = False
        sci_mask.set("NO_DATA", nd)
        sci_img[nd] = opt["no_data_value"]
        sci_var[nd] = opt["no_data_value"]

    # ---- render the template ----------------------------------------------------------------------------
    tshape = (tsize, tsize)
    t_pt = is_pt & (FT > 0)
    tstars = render_point_sources(tshape, tmpl_psf, XT[t_pt], YT[t_pt], FT[t_pt],
                                  wing_floor=None if floor is None else floor * scale)
    tsrc = tstars + gal_img_t
    sky_t = _sky(tshape, opt["template_sky"], opt["template_sky_gradient"])
    # Science sky seen on the template grid (for the template's noise level): same level and gradient,
    # evaluated at the science position of each template pixel (linear, so the mapping is exact).
    if own_grid:
        ty_, tx_ = np.mgrid[:tsize, :tsize].astype(float)
        ra, dec = wcs_t.all_pix2world(tx_.ravel(), ty_.ravel(), 0)
        xs_, ys_ = wcs_s.all_world2pix(ra, dec, 0)
        u = (xs_ - (size - 1) / 2.0) / (size / 2.0)
        v = (ys_ - (size - 1) / 2.0) / (size / 2.0)
        sky_s_on_t = (opt["science_sky"] + opt["science_sky_gradient"][0] * u + opt["science_sky_gradient"][1] * v).reshape(tshape)
    else:
        sky_s_on_t = sky_s
    depth2 = float(opt["template_depth"]) ** 2
    # Variance in science counts of a depth²-times-longer exposure, rescaled to template counts.
    tmpl_var = scale * scale * ((sky_s_on_t + tsrc / scale) / (gain * depth2) + opt["read_noise"] ** 2 / depth2)
    tmpl_model = sky_t + tsrc
    tmpl_img = tmpl_model + rng.standard_normal(tshape) * np.sqrt(tmpl_var)
    tmpl_mask = Mask.zeros(tshape)
    tsat = np.zeros(tshape, bool)
    tlevel = opt["saturation"] * scale
    if opt["bleed"]:
        _bleed(tmpl_img, tsat, tlevel)
    tsat |= tmpl_img >= tlevel
    tmpl_img = np.minimum(tmpl_img, tlevel)
    tmpl_mask.set("SAT", tsat)
    if opt["background_subtracted"]:
        tmpl_img -= sky_t
        tmpl_model = tmpl_model - sky_t
    b = int(opt["template_no_data_border"])
    if b > 0:
        nd = np.ones(tshape, bool)
        nd[b:-b, b:-b] = False
        tmpl_mask.set("NO_DATA", nd)
        tmpl_img[nd] = opt["no_data_value"]
        tmpl_var[nd] = opt["no_data_value"]

    # ---- exposures --------------------------------------------------------------------------------------
    calib_s = float(opt["science_calibration"])
    science = Exposure(
        MaskedImage(sci_img.astype(np.float32), sci_mask, sci_var.astype(np.float32)),
        psf=sci_psf,
        wcs=wcs_s,
        photo_calib=PhotoCalib(calib_s),
        band=opt["band"],
        visit_info=VisitInfo(mjd=60000.5, exposure_time=30.0, visit=int(opt["science_id"])),
        metadata={"SIMSEED": int(seed), "SIMSIZE": size, "GAIN": gain, "SATURATE": float(opt["saturation"])},
        id=int(opt["science_id"]),
    )
    template = Exposure(
        MaskedImage(tmpl_img.astype(np.float32), tmpl_mask, tmpl_var.astype(np.float32)),
        psf=tmpl_psf,
        wcs=wcs_t,
        photo_calib=PhotoCalib(calib_s / scale),
        band=opt["band"],
        visit_info=VisitInfo(mjd=59000.5, exposure_time=30.0 * depth2),
        metadata={"SIMSEED": int(seed), "SATURATE": float(tlevel)},
        id=int(opt["template_id"]),
    )

    # ---- truth table ------------------------------------------------------------------------------------
    def col(name, default, dtype=float):
        return np.array([r.get(name, default) for r in rows], dtype=dtype)

    delta = FS - FT / scale
    inside_s = (X >= -0.5) & (X < size - 0.5) & (Y >= -0.5) & (Y < size - 0.5)
    noise = psf_noise(X, Y)
    snr_change = np.abs(delta) / noise
    snr_change[np.isin(kind, ["star", "galaxy"])] = 0.0
    dip = kind == "dipole"
    snr_change[dip] = FS[dip] / noise[dip]
    snr_change[kind == "cosmic_ray"] = FS[kind == "cosmic_ray"] / noise[kind == "cosmic_ray"]
    fwhm_local = sci_psf.fwhm_at(np.clip(X, 0, size - 1), np.clip(Y, 0, size - 1)) if hasattr(sci_psf, "fwhm_at") else np.full(nrow, sci_psf.fwhm())
    if wcs_s is not None:
        ra, dec = wcs_s.all_pix2world(X, Y, 0)
    else:
        ra = dec = np.full(nrow, np.nan)
    in_t = (XT >= -0.5) & (XT < tsize - 0.5) & (YT >= -0.5) & (YT < tsize - 0.5)

    # Defect flags near each object, in both images (2-px box, i.e. 5×5 pixels).
    from scipy.ndimage import maximum_filter

    def near_defect(mask: Mask, xx, yy, planes, half=2):
        bits = mask.bitmask(list(planes), ignore_missing=True)
        m = maximum_filter((mask.array & bits) != 0, size=2 * half + 1, mode="constant", cval=False)
        ix = np.floor(np.asarray(xx) + 0.5).astype(int)
        iy = np.floor(np.asarray(yy) + 0.5).astype(int)
        ok = (ix >= 0) & (ix < m.shape[1]) & (iy >= 0) & (iy < m.shape[0])
        out = np.ones(ix.shape, bool)  # off the image counts as "near an edge"
        out[ok] = m[iy[ok], ix[ok]]
        return out

    saturated = near_defect(sci_mask, X, Y, ["SAT"]) | (near_defect(tmpl_mask, XT, YT, ["SAT"]) & in_t)
    saturated &= np.isin(kind, ["star", "galaxy", "variable", "dipole", "transient", "mover"])
    defect = near_defect(sci_mask, X, Y, _DEFECT_PLANES) | near_defect(tmpl_mask, XT, YT, _DEFECT_PLANES)
    # Cosmic rays are defects themselves; for them only the other planes matter.
    defect_cr = near_defect(sci_mask, X, Y, ["BAD", "SAT", "EDGE", "NO_DATA"]) | near_defect(tmpl_mask, XT, YT, _DEFECT_PLANES)
    defect = np.where(kind == "cosmic_ray", defect_cr, defect)
    isolated = _isolation(kind, X, Y, FS, FT / scale, delta, fwhm_local) & ~defect

    truth = Table()
    truth["id"] = np.arange(nrow, dtype=np.int64)
    truth["kind"] = kind.astype("U10")
    truth["x"], truth["y"] = X, Y
    truth["x_template"], truth["y_template"] = XT, YT
    truth["ra"], truth["dec"] = np.asarray(ra, float), np.asarray(dec, float)
    truth["flux_science"], truth["flux_template"], truth["delta_flux"] = FS, FT, delta
    truth["snr"], truth["snr_science"] = snr_change, FS / noise
    truth["fwhm"] = np.asarray(fwhm_local, float)
    truth["host"] = col("host", -1, np.int64)
    truth["partner"] = col("partner", -1, np.int64)
    truth["radius"] = col("radius", 0.0)
    truth["sersic_n"] = col("sersic_n", 0.0)
    truth["axis_ratio"] = col("axis_ratio", 1.0)
    truth["theta"] = col("theta", 0.0)
    truth["shift"] = col("shift", 0.0)
    truth["saturated"] = saturated
    truth["isolated"] = isolated
    truth["in_template"] = in_t
    # Keep the objects whose science position is on the science image (others only shaped its edges).
    partner = col("partner", -1, np.int64)
    keep = inside_s | ((kind == "mover") & (partner >= 0) & inside_s[np.clip(partner, 0, None)])
    truth = truth[keep]
    old_to_new = -np.ones(nrow, np.int64)
    old_to_new[np.nonzero(keep)[0]] = np.arange(keep.sum())
    for name in ("host", "partner"):
        v = np.asarray(truth[name])
        truth[name] = np.where(v >= 0, old_to_new[np.clip(v, 0, None)], -1)
    truth["id"] = np.arange(len(truth), dtype=np.int64)
    truth.meta.update(
        # Short upper-case keys: they become FITS header cards in truth.fits.
        {"SEED": int(seed), "SIZE": size, "TSCALE": scale, "SCIFWHM": fw0, "SATFLUX": float(sat_flux)}
    )

    return SimulatedPair(
        science=science,
        template=template,
        truth=truth,
        science_psf=sci_psf,
        template_psf=tmpl_psf,
        science_model=sci_model.astype(np.float32),
        science_static=sci_static.astype(np.float32),
        template_model=tmpl_model.astype(np.float32),
        options=opt,
    )


def _isolation(kind, x, y, fs, ft_sci, delta, fwhm) -> np.ndarray:
    """metrics.md isolation without the mask part: no other change, no brighter star within 3 fwhm."""
    from scipy.spatial import cKDTree

    n = len(kind)
    out = np.ones(n, bool)
    change = np.isin(kind, _CHANGE_KINDS)
    star = np.isin(kind, ["star", "variable", "dipole"])
    brightness = np.where(kind == "cosmic_ray", fs, np.abs(delta))
    brightness = np.where(np.isin(kind, ["star"]), fs, brightness)
    star_flux = np.maximum(fs, ft_sci)
    pts = np.column_stack([x, y])
    tree = cKDTree(pts)
    rmax = 3.0 * float(np.max(fwhm)) if n else 0.0
    for i, nbrs in enumerate(tree.query_ball_point(pts, rmax)):
        r = 3.0 * fwhm[i]
        for j in nbrs:
            if j == i:
                continue
            d = math.hypot(x[j] - x[i], y[j] - y[i])
            if d >= r:
                continue
            if change[j] or (star[j] and star_flux[j] > brightness[i]):
                out[i] = False
                break
    return out


def write_simulation(outdir: str | Path, size: int = 1024, seed: int = 0, **options: Any) -> SimulatedPair:
    """Simulate a pair (:func:`simulate_pair`) and write it to ``outdir``; returns the pair."""
    pair = simulate_pair(size=size, seed=seed, **options)
    pair.write(outdir)
    return pair


def main(argv: list[str] | None = None) -> int:
    """``python -m diffim.sim OUTDIR [--size N] [--seed S] [--option name=value ...]``."""
    import argparse
    import ast

    p = argparse.ArgumentParser(prog="diffim-sim", description="Write a simulated science/template pair with truth.")
    p.add_argument("outdir")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", "-o", action="append", default=[], metavar="NAME=VALUE", help="scene option (repeatable)")
    args = p.parse_args(argv)
    opts = {}
    for item in args.option:
        name, _, value = item.partition("=")
        try:
            opts[name.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[name.strip()] = value
    write_simulation(args.outdir, size=args.size, seed=args.seed, **opts)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
