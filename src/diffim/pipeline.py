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

from .errors import BadInputError, DiffimError, DiffimIOError
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

        from .tasks.base import short_config_message

        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"Invalid configuration: {short_config_message(exc)}") from None
    return config


_UNREPAIRED_PLANES = ("NO_DATA", "SAT")  # the only planes read_exposure sets on a plain image by itself


def prepare_exposure(exposure, *, label: str, repair_cosmic_rays: bool | None = None):
    """Make a read exposure usable: estimate a PSF if it has none, then (plain images) repair cosmic rays.

    ``repair_cosmic_rays``: find pixels sharper than the PSF (cosmic rays, hot pixels;
    :func:`diffim.psf.repair.find_cosmic_rays`), set ``CR`` and ``INTRP`` on them and interpolate over
    them, as LSST's calexps are before they reach the difference task. ``None`` (default) repairs only an
    exposure whose mask carries nothing but ``NO_DATA``/``SAT`` — a plain FITS frame nobody has cleaned;
    afw/diffim files with their own mask planes are left alone.

    A failed PSF estimation is re-raised as the same class with ``label`` in front of its message and, at the
    end, the option that supplies a PSF model for that image (``--science-psf``/``--template-psf``, chosen by
    the first word of ``label``).
    """
    if exposure.psf is None:
        from .psf import estimate_psf

        log.info("%s has no PSF model: estimating one from its stars", label)
        try:
            exposure.psf = estimate_psf(exposure)
        except DiffimError as exc:
            raise _psf_failure(exc, label) from exc
    if repair_cosmic_rays is None:
        other = exposure.mask.array & ~np.int32(exposure.mask.bitmask(_UNREPAIRED_PLANES, ignore_missing=True))
        repair_cosmic_rays = not bool(other.any())
    if repair_cosmic_rays:
        _repair_cosmic_rays(exposure, label)
        exposure._cr_repaired = True  # lets _share_repairs know both frames went through the same step
    return exposure


def _psf_failure(exc: DiffimError, label: str) -> DiffimError:
    """``exc`` (a failed PSF estimation) re-made with the image's ``label`` in front and the way out at the end.

    Parameters
    ----------
    exc
        The error :func:`diffim.psf.estimate_psf` raised; its class is kept so callers catching it still do.
    label
        ``"science PATH"`` or ``"template PATH"`` (:func:`_read_pair`); its first word picks the option to name.

    Returns
    -------
    DiffimError
        An exception of the same class as ``exc``, or ``exc`` itself when that class cannot be built from a
        message alone.
    """
    words = label.split()
    side = words[0].lower() if words else ""
    option = f"--{side}-psf" if side in ("science", "template") else "--science-psf/--template-psf"
    if len(words) < 2:  # no file: an in-memory exposure (the Rubin adapter), where no CLI option applies
        advice = "or attach a PSF model to the exposure"
    else:
        advice = f"or give a PSF model with {option} FILE"
    # The estimator's own wording belongs to diffim.psf; only its trailing full stop is dropped so the
    # advice reads as one sentence.
    text = str(exc).strip().rstrip(".")
    # The estimator's generic advice becomes the concrete option (said once, not twice).
    generic = "; provide a PSF model for this image"
    if text.endswith(generic):
        text = text[: -len(generic)]
    try:
        return type(exc)(f"{label}: {text}; {advice}")
    except TypeError:  # an error class with a different constructor: keep the original rather than fail here
        return exc


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


#: Every name :func:`run_files` can write into its output directory; ``--overwrite`` replaces only a directory
#: holding nothing else (and holding ``config.py``, which every run writes), so a mistyped ``-o`` cannot
#: delete the user's own files.
OUTPUT_NAMES = frozenset({
    "difference.fits", "score.fits", "matched.fits", "warped.fits", "diaSources.parquet", "diaSources.fits",
    "config.py", "metadata.json", "diagnostics.png",
})

#: ``read_exposure`` keywords whose value may be a companion file of an input image.
_COMPANION_KEYS = ("variance", "mask", "psf")


def _input_paths(science_path, template_path, science_kwargs=None, template_kwargs=None,
                 coadd_dir=None) -> list[Path]:
    """The files and directories a run reads: both images, their companion files, the coadd directory.

    Companion keyword values that are not existing paths (HDU names such as ``"SCI_VAR"``, arrays, ``Psf``
    objects) are left out: they name nothing on disk that an output could clobber.
    """
    from .io.fits import split_extension

    # 'file.fits[EXT]' reads (and an output could clobber) file.fits.
    paths = [Path(split_extension(p)[0]) for p in (science_path, template_path, coadd_dir) if p is not None]
    for kw in (science_kwargs, template_kwargs):
        for key in _COMPANION_KEYS:
            value = (kw or {}).get(key)
            if isinstance(value, (str, os.PathLike)):
                file = split_extension(value)[0]
                if os.path.exists(file):
                    paths.append(Path(file))
    return paths


def _is_within(path: Path, root: Path) -> bool:
    """True if ``path`` is ``root`` or lies below it, comparing both the absolute and the resolved
    (symbolic links followed) spellings so neither ``..`` nor a link hides the overlap."""
    for p, r in ((Path(os.path.abspath(path)), Path(os.path.abspath(root))), (path.resolve(), root.resolve())):
        if p == r or r in p.parents:
            return True
    return False


def _same_file(a, b) -> bool:
    """True if paths ``a`` and ``b`` name one file (hard links included when both exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare the spellings
        return Path(a).resolve() == Path(b).resolve()


def _same_source(path_a, kwargs_a, path_b, kwargs_b) -> bool:
    """True if two inputs read the same HDU of the same file (``'file.fits[EXT]'`` or ``hdu=`` alike)."""
    from .io.fits import split_extension

    file_a, ext_a = split_extension(path_a)
    file_b, ext_b = split_extension(path_b)
    hdu_a = ext_a if ext_a is not None else (kwargs_a or {}).get("hdu")
    hdu_b = ext_b if ext_b is not None else (kwargs_b or {}).get("hdu")
    return _same_file(file_a, file_b) and hdu_a == hdu_b


def _check_outdir(outdir: Path, *, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse an output directory that :func:`run_files` must not create or replace.

    Parameters
    ----------
    outdir
        The ``-o`` directory.
    overwrite
        ``--overwrite``: an existing ``outdir`` may be replaced, but only when it is a directory an earlier run
        wrote (names in `OUTPUT_NAMES`, ``config.py`` among them, or empty) and holds none of ``inputs``.
    inputs
        What the run reads (:func:`_input_paths`).

    Raises
    ------
    DiffimIOError
        If ``outdir`` exists and may not be replaced; the message names what is in the way.
    """
    if not os.path.lexists(outdir):
        return
    if not outdir.is_dir():
        what = "an existing file, not a directory"
        if overwrite:
            raise DiffimIOError(
                f"Output {outdir} is {what}; --overwrite replaces only an output directory of an earlier "
                "`diffim run`. Choose another -o."
            )
        raise DiffimIOError(f"Output {outdir} is {what}; choose another -o (a directory to create).")
    if not overwrite:
        raise DiffimIOError(f"Output directory {outdir} already exists; choose another -o or pass --overwrite.")
    for path in inputs:
        if _is_within(path, outdir):
            raise DiffimIOError(
                f"Output directory {outdir} holds the input {path}, which --overwrite would delete; choose an -o "
                "outside the inputs' directories."
            )
    entries = sorted(os.listdir(outdir))
    foreign = [name for name in entries if name not in OUTPUT_NAMES or not (outdir / name).is_file()]
    if foreign:
        raise DiffimIOError(
            f"Output directory {outdir} holds {foreign[0]!r}, which diffim did not write; --overwrite replaces "
            "only an output directory of an earlier `diffim run`. Choose another -o or remove the directory "
            "yourself."
        )
    if entries and "config.py" not in entries:
        raise DiffimIOError(
            f"Output directory {outdir} has no config.py, so it is not the output of an earlier `diffim run`; "
            "choose another -o or remove the directory yourself."
        )


def _atomic_outdir(outdir: Path) -> Path:
    """A new temporary directory next to ``outdir`` in which the outputs are assembled (created with its
    parents as needed)."""
    outdir = Path(outdir)
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


def _check_output_file(output, inputs: list[Path]) -> None:
    """Refuse a ``diffim subtract`` output that cannot or must not be written, before any work is done.

    Raises
    ------
    DiffimIOError
        If ``output`` is one of ``inputs``, is a directory, or its directory is missing or not writable.
    """
    output = Path(output)
    for path in inputs:
        if _same_file(output, path):
            raise DiffimIOError(
                f"Output {output} is the input {path}; writing the difference there would destroy it. "
                "Choose another -o."
            )
    if output.is_dir():
        raise DiffimIOError(f"Output {output} is a directory; give a file name, e.g. -o {output / 'difference.fits'}.")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise DiffimIOError(f"{output}: directory {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DiffimIOError(f"{output}: directory {parent} is not writable; choose another -o.")


def _read_pair(science_path, template_path, science_kwargs=None, template_kwargs=None, repair_cosmic_rays=None,
               *, allow_band_mismatch: bool = False):
    """Read (and prepare) both exposures; ``*_kwargs`` are passed to :func:`diffim.io.read_exposure`
    (``variance=``, ``variance_kind=``, ``mask=``, ``psf=``, ``gain=``, ``read_noise=``, ``hdu=``).

    Both files are read and compared (:func:`_check_pair`) before either is prepared, so a pair that cannot
    give a difference fails before the slow PSF estimation and cosmic-ray repair.
    """
    if template_path is not None and _same_source(science_path, science_kwargs, template_path, template_kwargs):
        # Different HDUs of one file are a legitimate pair (e.g. alert stamps); the same HDU twice is not.
        raise BadInputError(
            f"Science {science_path} and template {template_path} are the same file: there is nothing to "
            "subtract. Give a template taken at another epoch."
        )
    # A flat image (a fill value, a blank frame) or one without any noise cannot be PSF-matched: refused on
    # reading rather than ending in an all-NaN difference.
    science = _read_one(science_path, {"require_noise": True, **(science_kwargs or {})})
    template = None
    if template_path is not None:
        template = _read_one(template_path, {"require_noise": True, **(template_kwargs or {})})
        _check_pair(science, template, science_path, template_path, allow_band_mismatch=allow_band_mismatch)
    science = prepare_exposure(science, label=f"science {science_path}", repair_cosmic_rays=repair_cosmic_rays)
    if template is not None:
        template = prepare_exposure(template, label=f"template {template_path}",
                                    repair_cosmic_rays=repair_cosmic_rays)
        _share_repairs(science, template)
    return science, template


def _check_pair(science, template, science_path, template_path, *, allow_band_mismatch: bool = False) -> None:
    """Refuse a science/template pair whose difference would mean nothing.

    Parameters
    ----------
    science, template
        The exposures as read, before any preparation (PSF estimation, cosmic-ray repair changes pixels).
    science_path, template_path
        Their files, for the messages.
    allow_band_mismatch
        Log a warning instead of raising when the bands differ (``--allow-band-mismatch``).

    Raises
    ------
    BadInputError
        If the two images are pixel-for-pixel identical (NaN pixels compare equal), or if both carry a band
        and the bands differ (case and surrounding blanks ignored) while ``allow_band_mismatch`` is False.
    """
    if np.array_equal(science.image, template.image, equal_nan=True):
        raise BadInputError(
            f"Science {science_path} and template {template_path} have identical pixels: there is nothing to "
            "subtract. Give a template taken at another epoch."
        )
    sci_band = str(science.band or "").strip()
    tpl_band = str(template.band or "").strip()
    # A missing band says nothing about the filter (plain frames often lack the card), so only two
    # different labels count as a mismatch.
    if sci_band and tpl_band and sci_band.casefold() != tpl_band.casefold():
        text = (f"Science {science_path} is in band {sci_band!r} but template {template_path} is in band "
                f"{tpl_band!r}")
        if not allow_band_mismatch:
            raise BadInputError(f"{text}; a difference across bands leaves every star as a residual. Use a "
                                "template of the same band, or pass --allow-band-mismatch to subtract anyway.")
        log.warning("%s; subtracting anyway (--allow-band-mismatch).", text)


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
                   template_kwargs=None, repair_cosmic_rays=None, allow_band_mismatch: bool = False) -> RunResult:
    """PSF-match and subtract two exposure files; write the difference exposure to ``output`` (atomic).

    ``science_kwargs``/``template_kwargs`` are keyword arguments of :func:`diffim.io.read_exposure` for each
    file (per-image companions: ``variance=``, ``variance_kind=``, ``mask=``, ``psf=``, ``gain=``, ...).
    An existing ``output`` is replaced unless it is one of the inputs; its directory must exist (both are
    checked before anything is read). Images in different bands are refused unless ``allow_band_mismatch``;
    identical images always are (:func:`_check_pair`).
    """
    from .io import write_exposure
    from .tasks.image_difference import ImageDifferenceTask

    _check_output_file(output, _input_paths(science_path, template_path, science_kwargs, template_kwargs))
    config = config if config is not None else make_config(subtract_only=True)
    science, template = _read_pair(science_path, template_path, science_kwargs, template_kwargs, repair_cosmic_rays,
                                   allow_band_mismatch=allow_band_mismatch)
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
              repair_cosmic_rays=None, allow_band_mismatch: bool = False) -> RunResult:
    """Run the whole ImageDifferenceTask on two files and write all outputs into ``outdir``.

    Outputs (per the ``doWrite*`` switches): ``difference.fits``, ``diaSources.parquet`` and ``.fits``,
    ``score.fits``, ``matched.fits``, ``warped.fits``, ``config.py``, ``metadata.json`` and
    ``diagnostics.png``. Nothing is left behind if the run fails.

    ``science_kwargs``/``template_kwargs`` are keyword arguments of :func:`diffim.io.read_exposure` for each
    file: per-image companions such as ``variance=`` (a variance, weight or 1σ noise image; ``variance_kind=``),
    ``mask=``, ``psf=`` (PSFEx ``.psf`` file or PSF image), ``gain=`` and ``read_noise=``, and ``xy0=(x0, y0)``
    to replace the pixel origin of a file without a WCS.
    ``repair_cosmic_rays``: see :func:`prepare_exposure` (default: plain images without mask planes only).
    ``overwrite`` replaces an existing ``outdir`` only if an earlier run wrote it and it holds none of the
    inputs (:func:`_check_outdir`, checked before anything is read). Images in different bands are refused
    unless ``allow_band_mismatch``; identical images always are (:func:`_check_pair`).
    """
    from .io import write_exposure
    from .tasks.image_difference import ImageDifferenceTask

    config = config if config is not None else make_config()
    outdir = Path(outdir)
    inputs = _input_paths(science_path, template_path, science_kwargs, template_kwargs, coadd_dir)
    _check_outdir(outdir, overwrite=overwrite, inputs=inputs)
    t_start = time.perf_counter()
    science, template = _read_pair(science_path, template_path, science_kwargs, template_kwargs, repair_cosmic_rays,
                                   allow_band_mismatch=allow_band_mismatch)
    if template is None and coadd_dir is None:
        raise BadInputError("No template: give a template exposure or a coadd directory.")
    tmp = _atomic_outdir(outdir)
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
        # Again, now: the run took a while, and something may have appeared at outdir since the first check.
        _check_outdir(outdir, overwrite=overwrite, inputs=inputs)
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
