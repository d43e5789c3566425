"""``diffim batch PAIRS -o OUTROOT``: the command-line face of :func:`diffim.batch.run_batch`.

Wire into ``diffim.cli``: ``add_batch_parser(sub)`` in ``build_parser`` and ``"batch": run_batch_command`` in
``main``'s handler table. Exit code 0 when every pair is done (or was already), `EXIT_PAIRS_FAILED` when at
least one pair failed (the others still ran; see the manifest), and the usual diffim codes (2 bad input,
130 interrupted) when the batch itself could not run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_batch_parser", "run_batch_command", "EXIT_PAIRS_FAILED"]

#: Exit code of ``diffim batch`` when some pairs failed.
EXIT_PAIRS_FAILED = 4


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``batch`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "batch",
        help="run many science/template pairs (resumable; local processes or Dask)",
        description="Run `diffim run` on every pair of a CSV or YAML list (columns science, template, optional "
                    "id) into OUTROOT/<id>/. A re-run skips pairs already done with the same config. "
                    f"Exit code {EXIT_PAIRS_FAILED} if any pair failed.",
    )
    p.add_argument("pairs", type=Path, help="pair list: CSV with a header science,template[,id] or YAML")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTROOT",
                   help="root output directory (one sub-directory per pair, plus manifest.json)")
    p.add_argument("--executor", choices=("local", "dask", "serial"), default=None,
                   help="local process pool (default), Dask, or serial (in this process, for debugging)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="pairs run at once (default: CPU count; with --scheduler: the cluster's threads)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="address of a running Dask scheduler, e.g. tcp://host:8786 (implies --executor dask)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="FFT/BLAS threads per worker (default 1)")
    p.add_argument("--redo", action="store_true", help="re-run pairs already done with the same config")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write diagnostics.png")
    p.add_argument("--max-tasks-per-child", type=_positive_int, default=None, metavar="N",
                   help="replace each local worker process after N pairs (default: reuse)")
    g = p.add_argument_group("inputs (plain FITS images; per-pair files go in the list's science_variance, "
                             "science_mask, science_psf, template_variance, template_mask, template_psf columns)")
    g.add_argument("--companions", action="store_true",
                   help="use companion files named after each image when present (as `diffim run --companions`)")
    g.add_argument("--variance-kind", dest="variance_kind", choices=("variance", "weight", "noise"), default=None,
                   help="what the *_variance files hold (default: guessed; noise = 1σ map)")
    g.add_argument("--gain", type=float, default=None, metavar="E_PER_ADU", help="gain for the variance model")
    g.add_argument("--read-noise", dest="read_noise", type=float, default=None, metavar="E",
                   help="read noise in electrons for the variance model")
    g.add_argument("--reset-xy0", dest="reset_xy0", action="store_true",
                   help="put both images' first pixel at (0, 0), ignoring the files' xy0")
    g.add_argument("--cr-repair", dest="cr_repair", choices=("auto", "yes", "no"), default="auto",
                   help="cosmic-ray/hot-pixel repair of the inputs (auto: plain images without mask planes)")
    g.add_argument("--allow-band-mismatch", dest="allow_band_mismatch", action="store_true",
                   help="subtract pairs whose BAND/FILTER cards differ (with a warning) instead of failing them")
    p.add_argument("-c", "--config", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for `diffim run` (repeatable)")
    p.add_argument("-C", "--config-file", dest="config_files", action="append", default=[], metavar="FILE",
                   help="Python config override file, as for `diffim run` (repeatable)")
    p.add_argument("--show-config", action="store_true", help="print the full config that would be used and exit")
    # For tests of the batch machinery: replace the per-pair function (MODULE:FUNCTION, picklable).
    p.add_argument("--test-worker", dest="test_worker", default=None, help=argparse.SUPPRESS)
    return p


def _read_options(args) -> dict:
    """Batch-wide input options (``run_batch(read_options=...)``) from the parsed arguments."""
    kind = getattr(args, "variance_kind", None)
    return {
        "companions": bool(getattr(args, "companions", False)),
        "variance_kind": "sigma" if kind == "noise" else kind,
        "gain": getattr(args, "gain", None),
        "read_noise": getattr(args, "read_noise", None),
        "reset_xy0": bool(getattr(args, "reset_xy0", False)),
        "repair_cosmic_rays": {"auto": None, "yes": True, "no": False}[getattr(args, "cr_repair", "auto") or "auto"],
        "allow_band_mismatch": bool(getattr(args, "allow_band_mismatch", False)),
    }


def run_batch_command(args) -> int:
    """Run ``diffim batch`` from parsed arguments; returns the exit code."""
    import sys

    from ..pipeline import make_config
    from .runner import config_text, run_batch

    worker = None
    if getattr(args, "test_worker", None):
        import importlib

        modname, _, funcname = args.test_worker.partition(":")
        worker = getattr(importlib.import_module(modname), funcname)
    try:
        config = make_config(args.overrides, args.config_files)
    except ImportError:
        if worker is None:
            raise
        config = "\n".join(["# stand-in config for a test worker", *args.overrides]) + "\n"
    if getattr(args, "show_config", False):
        print(config_text(config), end="")
        return 0
    quiet = getattr(args, "quiet", False)
    result = run_batch(
        args.pairs, config, args.output,
        executor=args.executor, workers=args.workers, scheduler=args.scheduler, threads=args.threads,
        redo=args.redo, plot=args.plot, max_tasks_per_child=args.max_tasks_per_child, progress=not quiet,
        worker=worker, read_options=_read_options(args),
    )
    if not quiet or not result.ok:
        print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else EXIT_PAIRS_FAILED


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m diffim.batch.cli``) until ``diffim batch`` is wired into diffim.cli."""
    import logging
    import sys

    from ..errors import DiffimError

    parser = argparse.ArgumentParser(prog="diffim")
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_batch_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run_batch_command(args)
    except KeyboardInterrupt:
        print("diffim: interrupted", file=sys.stderr)
        return 130
    except DiffimError as exc:
        print(f"diffim: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
