"""The ``diffim`` command line: ``simulate``, ``subtract``, ``run`` and ``demo``.

Exit codes
----------
0
    Success.
1
    Unexpected internal error (a bug: please report it with the traceback shown by ``--debug``).
2
    Bad input or configuration: missing/corrupt file, missing HDU, bad override, no overlap, ...
3
    The subtraction failed its quality checks (too few kernel candidates, bad residuals).
130
    Interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .errors import DiffimError

__all__ = ["main", "EXIT_OK", "EXIT_INTERNAL", "EXIT_BAD_INPUT", "EXIT_QUALITY"]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_QUALITY = 3
EXIT_INTERRUPTED = 130


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. -c subtract.name=zogy -c detection.thresholdValue=5.5 (repeatable)")
    p.add_argument("-C", "--config-file", dest="config_files", action="append", default=[], metavar="FILE",
                   help="Python config override file assigning to `config` (as written to OUTDIR/config.py; repeatable)")
    p.add_argument("--show-config", action="store_true", help="print the full config that would be used and exit")


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """Per-image companions of plain FITS inputs (passed to ``read_exposure`` for that image)."""
    g = p.add_argument_group("per-image inputs (plain FITS images from any telescope)")
    for who in ("science", "template"):
        g.add_argument(f"--{who}-variance", dest=f"{who}_variance", type=Path, default=None, metavar="FILE",
                       help=f"{who} variance, weight (1/σ²) or 1σ noise image; the kind is guessed from the file "
                            "name/header unless --variance-kind is given")
        g.add_argument(f"--{who}-mask", dest=f"{who}_mask", type=Path, default=None, metavar="FILE",
                       help=f"{who} mask image (afw MP_ planes if present, else nonzero → BAD)")
        g.add_argument(f"--{who}-psf", dest=f"{who}_psf", type=Path, default=None, metavar="FILE",
                       help=f"{who} PSF: a PSFEx .psf file or a PSF image (large images are cropped to ±10 FWHM)")
    g.add_argument("--variance-kind", dest="variance_kind", choices=("variance", "weight", "noise"), default=None,
                   help="what the --*-variance files hold (default: guessed; noise = 1σ map)")
    g.add_argument("--gain", type=float, default=None, metavar="E_PER_ADU",
                   help="gain for the variance model of both images when no variance file is given "
                        "(default: the GAIN card, else the robust sky noise)")
    g.add_argument("--read-noise", dest="read_noise", type=float, default=None, metavar="E",
                   help="read noise in electrons for the variance model (default: RDNOISE card, else 0)")
    g.add_argument("--companions", action="store_true",
                   help="use companion files named after each image when present: IMAGE.{var,weight,wht,noise,"
                        "rms,err}.fits, IMAGE.{mask,bpm}.fits, IMAGE.psf / IMAGE.WebbPSF.fits (explicit options win)")
    g.add_argument("--reset-xy0", dest="reset_xy0", action="store_true",
                   help="put both images' first pixel at (0, 0), ignoring the files' xy0 (pairs without a WCS "
                        "whose stored origins differ but whose pixels correspond, e.g. ip_diffim test images)")
    g.add_argument("--cr-repair", dest="cr_repair", choices=("auto", "yes", "no"), default="auto",
                   help="find and interpolate cosmic rays/hot pixels in the inputs (auto: only plain images "
                        "without mask planes; default auto)")


#: How an input file is named on the command line (diffim.io.fits.split_extension).
_EXT_HELP = "a FITS file; FILE[EXT] reads extension EXT (name or index) of a multi-extension file, as in DS9"


def _add_pair_check_args(p: argparse.ArgumentParser) -> None:
    """Switches for the science/template consistency checks of :func:`diffim.pipeline._check_pair`."""
    p.add_argument("--allow-band-mismatch", dest="allow_band_mismatch", action="store_true",
                   help="subtract even when the two images' BAND/FILTER cards name different bands (a warning "
                        "is logged); by default such a pair is refused with exit code 2. An image without a band "
                        "card is never refused")


def _repair_flag(args) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[getattr(args, "cr_repair", "auto")]


def _read_kwargs(args, who: str) -> dict:
    """``read_exposure`` keyword arguments for ``who`` ('science' or 'template') from the parsed options."""
    kw: dict = {}
    if getattr(args, "companions", False) and getattr(args, who, None) is not None:
        from .io.layouts import find_companions

        kw.update(find_companions(getattr(args, who)))
        if kw:
            logging.getLogger("diffim.cli").info("%s companions: %s", who, kw)
    if getattr(args, f"{who}_variance", None) is not None:
        kw.pop("variance_kind", None)
        kw["variance"] = str(getattr(args, f"{who}_variance"))
        if args.variance_kind is not None:
            kw["variance_kind"] = "sigma" if args.variance_kind == "noise" else args.variance_kind
    if getattr(args, f"{who}_mask", None) is not None:
        kw["mask"] = str(getattr(args, f"{who}_mask"))
    if getattr(args, f"{who}_psf", None) is not None:
        kw["psf"] = str(getattr(args, f"{who}_psf"))
    if getattr(args, "gain", None) is not None:
        kw["gain"] = args.gain
    if getattr(args, "read_noise", None) is not None:
        kw["read_noise"] = args.read_noise
    if getattr(args, "reset_xy0", False):
        kw["xy0"] = (0, 0)
    return kw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffim",
        description="Difference imaging for time-domain astronomy (a Python ImageDifferenceTask).",
        epilog="Exit codes: 0 ok, 1 internal error, 2 bad input/config, 3 subtraction failed quality checks.",
    )
    parser.add_argument("--version", action="version", version=f"diffim {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug messages")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate a science/template pair with known truth")
    p.add_argument("outdir", type=Path)
    p.add_argument("--size", type=int, default=1024, help="image size in pixels (square; default 1024)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--psf", default=None, help="PSF profile: gaussian, elliptical or moffat")
    p.add_argument("--template-psf", dest="template_psf", default=None,
                   help="template PSF relative to the science: sharper, broader or mixed")
    p.add_argument("--rotation", type=float, default=None, help="template WCS rotation in degrees (default none)")
    p.add_argument("--offset", type=float, nargs=2, default=None, metavar=("DX", "DY"),
                   help="template WCS offset in pixels (default none)")

    p = sub.add_parser("subtract", help="PSF-match and subtract: SCIENCE − TEMPLATE → difference exposure")
    p.add_argument("science", type=Path, help="science exposure: " + _EXT_HELP)
    p.add_argument("template", type=Path, help="template exposure: " + _EXT_HELP)
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output difference FITS file (LSST MEF); its directory must exist; an existing file is "
                        "replaced unless it is one of the inputs")
    _add_config_args(p)
    _add_input_args(p)
    _add_pair_check_args(p)

    p = sub.add_parser("run", help="the whole job: subtract, detect, measure; write images and the DIA catalogue")
    p.add_argument("science", type=Path, help="science exposure: " + _EXT_HELP)
    p.add_argument("template", type=Path, nargs="?",
                   help="template exposure (omit with --coadd-dir): " + _EXT_HELP)
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (must not exist, or use --overwrite)")
    p.add_argument("--coadd-dir", type=Path, default=None, help="build the template from the coadd patches in DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTDIR if it is the output directory of an earlier run (config.py and other "
                        "files diffim writes, nothing else); a file, a directory holding an input or any other "
                        "file is refused")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write diagnostics.png")
    _add_config_args(p)
    _add_input_args(p)
    _add_pair_check_args(p)

    p = sub.add_parser("demo", help="simulate a pair, run the whole job on it and print a summary")
    p.add_argument("outdir", type=Path, nargs="?", default=Path("demo_output"))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=1)
    from .batch.cli import add_batch_parser  # diffim batch (docs/batch.md)

    add_batch_parser(sub)
    return parser


def _setup_logging(args) -> None:
    level = logging.ERROR if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_simulate(args) -> int:
    from .sim import write_simulation

    opts = {}
    if args.psf:
        opts["psf_profile"] = args.psf
    if args.template_psf:
        opts["template_psf_mode"] = args.template_psf
    if args.rotation is not None:
        opts["wcs_rotation_deg"] = args.rotation
    if args.offset is not None:
        opts["wcs_offset_pix"] = tuple(args.offset)
    write_simulation(args.outdir, size=args.size, seed=args.seed, **opts)
    if not args.quiet:
        print(f"wrote {args.outdir}/science.fits, template.fits and the truth table")
    return EXIT_OK


def _cmd_subtract(args) -> int:
    from .pipeline import make_config, subtract_files

    config = make_config(args.overrides, args.config_files, subtract_only=True)
    if args.show_config:
        config.saveToStream(sys.stdout)
        return EXIT_OK
    res = subtract_files(args.science, args.template, args.output, config=config,
                         science_kwargs=_read_kwargs(args, "science"), template_kwargs=_read_kwargs(args, "template"),
                         repair_cosmic_rays=_repair_flag(args), allow_band_mismatch=args.allow_band_mismatch)
    if not args.quiet:
        ratio = res.metadata.get("quality", {}).get("noiseRatio", float("nan"))  # the task stores it under quality
        print(f"wrote {args.output}  (noise ratio {ratio:.3f})")
    return EXIT_OK


def _cmd_run(args) -> int:
    from .pipeline import make_config, run_files

    config = make_config(args.overrides, args.config_files)
    if args.show_config:
        config.saveToStream(sys.stdout)
        return EXIT_OK
    if args.template is None and args.coadd_dir is None:
        from .errors import BadInputError

        raise BadInputError("Give a TEMPLATE exposure or --coadd-dir DIR to build one from coadd patches.")
    t0 = time.perf_counter()
    res = run_files(args.science, args.template, args.output, config=config, coadd_dir=args.coadd_dir,
                    overwrite=args.overwrite, plot=args.plot, progress=not args.quiet,
                    science_kwargs=_read_kwargs(args, "science"), template_kwargs=_read_kwargs(args, "template"),
                    repair_cosmic_rays=_repair_flag(args), allow_band_mismatch=args.allow_band_mismatch)
    if not args.quiet:
        print(res.summary(time.perf_counter() - t0))
    return EXIT_OK


def _cmd_demo(args) -> int:
    from .pipeline import make_config, run_files
    from .sim import write_simulation

    out = args.outdir
    inputs = out / "inputs"
    t0 = time.perf_counter()
    print(f"Simulating a {args.size}×{args.size} science/template pair (seed {args.seed}) in {inputs} ...")
    write_simulation(inputs, size=args.size, seed=args.seed)
    config = make_config([], [])
    res = run_files(inputs / "science.fits", inputs / "template.fits", out / "results", config=config,
                    overwrite=True, plot=True, progress=True, truth=inputs / "truth.fits")
    print(res.summary(time.perf_counter() - t0))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffim`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    from .batch.cli import run_batch_command

    handler = {"simulate": _cmd_simulate, "subtract": _cmd_subtract, "run": _cmd_run, "demo": _cmd_demo,
               "batch": run_batch_command}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("diffim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DiffimError as exc:
        if args.debug:
            raise
        code = getattr(exc, "exit_code", EXIT_INTERNAL)
        print(f"diffim: error: {exc}", file=sys.stderr)
        return code
    except MemoryError:
        print("diffim: error: out of memory; try a smaller image or fewer workers", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:  # an unexpected failure is a bug: say so, briefly, unless --debug
        if args.debug:
            raise
        print(f"diffim: internal error: {type(exc).__name__}: {exc} (re-run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
