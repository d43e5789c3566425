"""One-call helpers for file paths: what the ``diffim`` command runs.

:func:`run_files` reads two exposures, runs :class:`~diffim.tasks.image_difference.ImageDifferenceTask`
and writes every output into a directory that appears only when the run succeeded (outputs are assembled
in a temporary sibling directory and renamed into place).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError, DiffimIOError
from .tasks.base import apply_config_overrides

__all__ = ["make_config", "run_files", "subtract_files", "RunResult", "prepare_exposure"]

log = logging.getLogger("diffim.pipeline")


def make_config(overrides=(), files=(), *, subtract_only: bool = False):
    """Default :class:`ImageDifferenceConfig` with override files (``-C``) and ``key=value`` strings (``-c``)."""
    from .tasks.image_difference import ImageDifferenceConfig

    config = ImageDifferenceConfig()
    if subtract_only:
        config.doDetection = False
        config.doMeasurement = False
        config.doMerge = False
        config.doSkySources = False
        config.doForcedMeasurement = False
        config.doScaleDiffimVariance = False
    apply_config_overrides(config, overrides, files)
    try:
        config.validate()
    except Exception as exc:
        from .errors import ConfigError

        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"Invalid configuration: {exc}") from None
    return config


_UNREPAIRED_PLANES = ("NO_DATA", "SAT")  # the only planes read_exposure sets on a plain image by itself


def prepare_exposure(exposure, *, label: str, repair_cosmic_rays: bool | None = None):
    """Make a read exposure usable: estimate a PSF if it has none, then (plain images) repair cosmic rays.

    ``repair_cosmic_rays``: find pixels sharper than the PSF (cosmic rays, hot pixels;
    :func:`diffim.psf.repair.find_cosmic_rays`), set ``CR`` and ``INTRP`` on them and interpolate over
    them, as LSST's calexps are before they reach the difference task. ``None`` (default) repairs only an
    exposure whose mask carries nothing but ``NO_DATA``/``SAT`` — a plain FITS frame nobody has cleaned;
    afw/diffim files with their own mask planes are left alone.
    """
    if exposure.psf is None:
        from .psf import estimate_psf

        log.info("%s has no PSF model: estimating one from its stars", label)
        exposure.psf = estimate_psf(exposure)
    if repair_cosmic_rays is None:
        other = exposure.mask.array & ~np.int32(exposure.mask.bitmask(_UNREPAIRED_PLANES, ignore_missing=True))
        repair_cosmic_rays = not bool(other.any())
    if repair_cosmic_rays:
        _repair_cosmic_rays(exposure, label)
        exposure._cr_repaired = True  # lets _share_repairs know both frames went through the same step
    return exposure


def _repair_cosmic_rays(exposure, label: str) -> None:
    from scipy import ndimage

    from .psf.estimate import background_map
    from .psf.repair import find_cosmic_rays, interpolate_pixels

    try:
        sigma = float(exposure.psf.sigma(*exposure.psf_position()))
    except Exception:  # a PSF without a usable width: no repair rather than a wrong one
        log.warning("%s: PSF width unavailable; cosmic rays not repaired.", label)
        return
    invalid = exposure.mask.get(("NO_DATA", "SAT", "BAD"), ignore_missing=True)
    image = exposure.image
    bkg = background_map(image, invalid, cell=64)
    cr = find_cosmic_rays(image, exposure.variance, sigma, background=bkg, bad=invalid)
    if not cr.any():
        return
    image[...] = interpolate_pixels(image, cr, sigma, invalid=invalid)
    exposure.mask.set("CR", cr)
    exposure.mask.set("INTRP", cr)
    n_lab = int(ndimage.label(cr)[1])
    log.info("%s: %d cosmic rays / hot pixels (%d pixels) interpolated (CR, INTRP).", label, n_lab, int(cr.sum()))


@dataclass
class RunResult:
    """What :func:`run_files` produced: output paths, the task's result Struct, metadata and figures."""

    outdir: Path
    files: dict[str, Path] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    result: Any = None

    def summary(self, elapsed: float | None = None) -> str:
        md = self.metadata
        lines = [f"diffim finished: outputs in {self.outdir}"]
        counts = md.get("counts", {})
        if counts:
            lines.append(
                "  DIA sources: {n} ({pos} positive, {neg} negative, {dip} dipoles)".format(
                    n=counts.get("nDiaSources", 0), pos=counts.get("nPositive", 0),
                    neg=counts.get("nNegative", 0), dip=counts.get("nDipoles", 0))
            )
        q = md.get("quality", {})
        if "noiseRatio" in q:
            lines.append(f"  noise ratio (robust std of difference/σ on empty sky): {q['noiseRatio']:.3f}")
        if "truth" in md:
            t = md["truth"]
            lines.append("  against truth: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in t.items()))
        if elapsed is not None:
            lines.append(f"  wall time: {elapsed:.1f} s")
        for name in ("difference", "diaSources_parquet", "diaSources_fits", "diagnostics"):
            if name in self.files:
                lines.append(f"  {name}: {self.files[name]}")
        return "\n".join(lines)


def _atomic_outdir(outdir: Path, overwrite: bool) -> Path:
    outdir = Path(outdir)
    if outdir.exists() and not overwrite:
        raise DiffimIOError(f"Output directory {outdir} already exists; choose another -o or pass --overwrite.")
    parent = outdir.parent if str(outdir.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.tmp-", dir=parent))
    except OSError as exc:
        raise DiffimIOError(f"Cannot create the output directory next to {outdir}: {exc.strerror}.") from None
    return tmp


def _commit_outdir(tmp: Path, outdir: Path) -> None:
    if outdir.exists():
        old = outdir.with_name(f".{outdir.name}.old-{os.getpid()}")
        os.replace(outdir, old)
        os.replace(tmp, outdir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, outdir)


def _read_pair(science_path, template_path, science_kwargs=None, template_kwargs=None, repair_cosmic_rays=None):
    """Read (and prepare) both exposures; ``*_kwargs`` are passed to :func:`diffim.io.read_exposure`
    (``variance=``, ``variance_kind=``, ``mask=``, ``psf=``, ``gain=``, ``read_noise=``, ``hdu=``)."""
    science = prepare_exposure(_read_one(science_path, science_kwargs),
                               label=f"science {science_path}", repair_cosmic_rays=repair_cosmic_rays)
    template = None
    if template_path is not None:
        template = prepare_exposure(_read_one(template_path, template_kwargs),
                                    label=f"template {template_path}", repair_cosmic_rays=repair_cosmic_rays)
        _share_repairs(science, template)
    return science, template


def _read_one(path, kwargs):
    """``read_exposure(path, **kwargs)``; an extra ``xy0=(x0, y0)`` replaces the file's pixel origin (for
    files without a WCS whose stored xy0 is not a shared pixel grid, e.g. ip_diffim's scienceMI/templateMI)."""
    from .io import read_exposure

    kw = dict(kwargs or {})
    xy0 = kw.pop("xy0", None)
    exposure = read_exposure(path, **kw)
    if xy0 is not None:
        if exposure.wcs is not None:
            raise BadInputError(f"{path}: has a WCS; its xy0 cannot be overridden (the WCS would shift too).")
        exposure.masked_image.xy0 = (int(xy0[0]), int(xy0[1]))
    return exposure


def _same_grid(a, b) -> bool:
    if a.image.shape != b.image.shape or tuple(a.xy0) != tuple(b.xy0):
        return False
    if a.wcs is None or b.wcs is None:
        return True
    ny, nx = a.image.shape
    xs, ys = np.array([0.0, nx - 1.0, 0.0, nx - 1.0]), np.array([0.0, 0.0, ny - 1.0, ny - 1.0])
    try:
        px, py = b.wcs.world_to_pixel(a.wcs.pixel_to_world(xs + a.xy0[0], ys + a.xy0[1]))
    except Exception:
        return False
    return bool(np.all(np.hypot(np.asarray(px) - xs - a.xy0[0], np.asarray(py) - ys - a.xy0[1]) < 0.5))


def _share_repairs(science, template) -> None:
    """Interpolate both images over the union of their repaired pixels when they share a pixel grid.

    Hot pixels sit at the same detector pixel in both frames, but a registered (resampled) frame smears
    them so that only the other frame's copy passes the sharpness test; a pixel repaired in one image and
    left alone in the other would itself become a difference-image source.
    """
    if not (getattr(science, "_cr_repaired", False) and getattr(template, "_cr_repaired", False)):
        return
    if not _same_grid(science, template):
        return
    from .psf.repair import interpolate_pixels

    union = science.mask.get("CR") | template.mask.get("CR")
    for exp in (science, template):
        if not (union & ~exp.mask.get("CR")).any():
            continue
        try:
            sigma = float(exp.psf.sigma(*exp.psf_position()))
        except Exception:
            continue
        invalid = exp.mask.get(("NO_DATA", "SAT", "BAD"), ignore_missing=True)
        fix = union & ~invalid
        exp.image[...] = interpolate_pixels(exp.image, fix, sigma, invalid=invalid)
        exp.mask.set("CR", fix)
        exp.mask.set("INTRP", fix)


def subtract_files(science_path, template_path, output, *, config=None, science_kwargs=None,
                   template_kwargs=None, repair_cosmic_rays=None) -> RunResult:
    """PSF-match and subtract two exposure files; write the difference exposure to ``output`` (atomic).

    ``science_kwargs``/``template_kwargs`` are keyword arguments of :func:`diffim.io.read_exposure` for each
    file (per-image companions: ``variance=``, ``variance_kind=``, ``mask=``, ``psf=``, ``gain=``, ...).
    """
    from .io import write_exposure
    from .tasks.image_difference import ImageDifferenceTask

    config = config if config is not None else make_config(subtract_only=True)
    science, template = _read_pair(science_path, template_path, science_kwargs, template_kwargs, repair_cosmic_rays)
    task = ImageDifferenceTask(config=config)
    res = task.run(exposure=science, templateExposure=template)
    write_exposure(res.subtractedExposure, output)
    md = task.metadata.to_plain()
    return RunResult(outdir=Path(output).parent, files={"difference": Path(output)}, metadata=md, result=res)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def run_files(science_path, template_path, outdir, *, config=None, coadd_dir=None, overwrite=False,
              plot=True, progress=True, truth=None, science_kwargs=None, template_kwargs=None,
              repair_cosmic_rays=None) -> RunResult:
    """Run the whole ImageDifferenceTask on two files and write all outputs into ``outdir``.

    Outputs (per the ``doWrite*`` switches): ``difference.fits``, ``diaSources.parquet`` and ``.fits``,
    ``score.fits``, ``matched.fits``, ``warped.fits``, ``config.py``, ``metadata.json`` and
    ``diagnostics.png``. Nothing is left behind if the run fails.

    ``science_kwargs``/``template_kwargs`` are keyword arguments of :func:`diffim.io.read_exposure` for each
    file: per-image companions such as ``variance=`` (a variance, weight or 1σ noise image; ``variance_kind=``),
    ``mask=``, ``psf=`` (PSFEx ``.psf`` file or PSF image), ``gain=`` and ``read_noise=``, and ``xy0=(x0, y0)``
    to replace the pixel origin of a file without a WCS.
    ``repair_cosmic_rays``: see :func:`prepare_exposure` (default: plain images without mask planes only).
    """
    from .io import write_exposure
    from .tasks.image_difference import ImageDifferenceTask

    config = config if config is not None else make_config()
    outdir = Path(outdir)
    t_start = time.perf_counter()
    science, template = _read_pair(science_path, template_path, science_kwargs, template_kwargs, repair_cosmic_rays)
    if template is None and coadd_dir is None:
        raise BadInputError("No template: give a template exposure or a coadd directory.")
    tmp = _atomic_outdir(outdir, overwrite)
    try:
        task = ImageDifferenceTask(config=config, progress=progress)
        res = task.run(exposure=science, templateExposure=template, coaddDir=coadd_dir)
        files: dict[str, Path] = {}
        if config.doWriteSubtractedExp and res.subtractedExposure is not None:
            write_exposure(res.subtractedExposure, tmp / "difference.fits")
            files["difference"] = outdir / "difference.fits"
        if config.doWriteScoreExp and getattr(res, "scoreExposure", None) is not None:
            write_exposure(res.scoreExposure, tmp / "score.fits")
            files["score"] = outdir / "score.fits"
        if config.doWriteMatchedExp and getattr(res, "matchedExposure", None) is not None:
            write_exposure(res.matchedExposure, tmp / "matched.fits")
            files["matched"] = outdir / "matched.fits"
        if config.doWriteWarpedExp and getattr(res, "warpedExposure", None) is not None:
            write_exposure(res.warpedExposure, tmp / "warped.fits")
            files["warped"] = outdir / "warped.fits"
        if config.doWriteSources and res.diaSources is not None:
            from .catalog import write_catalog

            written = write_catalog(res.diaSources, tmp / "diaSources")
            for p in written:
                files[f"diaSources_{Path(p).suffix.lstrip('.')}"] = outdir / Path(p).name
        config.save(str(tmp / "config.py"))
        files["config"] = outdir / "config.py"
        md = task.metadata.to_plain()
        md["inputs"] = {"science": str(science_path), "template": str(template_path) if template_path else None,
                        "coaddDir": str(coadd_dir) if coadd_dir else None,
                        "scienceOptions": {k: str(v) for k, v in dict(science_kwargs or {}).items()},
                        "templateOptions": {k: str(v) for k, v in dict(template_kwargs or {}).items()}}
        if truth is not None:
            md["truth"] = _truth_figures(res, truth)
        md["wallTimeTotal"] = time.perf_counter() - t_start
        if plot:
            try:
                from .plots import write_diagnostics

                write_diagnostics(tmp / "diagnostics.png", science=science, template=res.warpedExposure or template,
                                  result=res, task=task)
                files["diagnostics"] = outdir / "diagnostics.png"
            except ImportError as exc:
                log.warning("diagnostics.png skipped: %s (install diffim[plot])", exc)
        if config.saveMetadata:  # LSST persists the task metadata only when saveMetadata is set
            with open(tmp / "metadata.json", "w") as fh:
                json.dump(_jsonable(md), fh, indent=2, sort_keys=True)
            files["metadata"] = outdir / "metadata.json"
        _commit_outdir(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RunResult(outdir=outdir, files=files, metadata=md, result=res)


def _truth_figures(res, truth_path) -> dict:
    """Figures of metrics.md against a simulator truth table (for ``diffim demo``)."""
    from astropy.table import Table

    from . import metrics

    truth = Table.read(truth_path)
    diff = res.subtractedExposure
    fwhm = diff.psf.fwhm() if diff.psf is not None else 4.0
    cat = res.diaSources
    scale = 1.0
    pc = res.subtractedExposure.photo_calib
    if pc is not None and cat is not None and cat.meta.get("flux_unit", "nJy") == "nJy":
        scale = 1.0 / pc.calibration_mean
    figs = metrics.evaluate(diff, cat, truth, fwhm, flux_unit_scale=scale)
    keep = ("noise_ratio", "star_chi2_p95", "completeness_snr7", "false_per_mpix", "flux_bias", "pull_std")
    return {k: figs[k] for k in keep if k in figs}
