"""How many threads diffim's FFTs and BLAS calls may use, set from the environment.

Batch runs put one pair in each worker process; two processes each running two FFT threads on a 2-core
machine would fight for the cores. Modules that call :mod:`scipy.fft` should therefore ask
:func:`fft_workers` for their ``workers=`` argument instead of hard-coding one. It honours the
``DIFFIM_FFT_WORKERS`` environment variable, which :mod:`diffim.batch` sets to 1 in its workers.

:func:`limit_threads` is what a batch worker calls before running a pair: it sets the variable, caps
BLAS/OpenMP pools through ``threadpoolctl`` when that is installed, and updates the FFT-thread constants of
modules that still keep their own (a stand-in until they call :func:`fft_workers`).
"""

from __future__ import annotations

import os

__all__ = ["fft_workers", "blas_threads", "limit_threads", "DEFAULT_FFT_WORKERS", "ENV_FFT_WORKERS"]

#: Environment variable read by :func:`fft_workers`.
ENV_FFT_WORKERS = "DIFFIM_FFT_WORKERS"

#: FFT threads used when the variable is unset: two, but never more than the CPUs this process may use.
DEFAULT_FFT_WORKERS = 2

#: Environment variables that size the thread pools of OpenMP, OpenBLAS, MKL and Apple Accelerate.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                   "NUMEXPR_NUM_THREADS")


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def fft_workers(default: int | None = None) -> int:
    """Number of threads for ``scipy.fft`` calls (``workers=``).

    Parameters
    ----------
    default : `int`, optional
        Value when ``DIFFIM_FFT_WORKERS`` is unset or invalid; `DEFAULT_FFT_WORKERS` capped at the CPUs
        available to this process if not given.

    Returns
    -------
    workers : `int`
        A positive thread count (``DIFFIM_FFT_WORKERS=0`` or a negative value means "all available CPUs").
    """
    raw = os.environ.get(ENV_FFT_WORKERS, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = None
        if n is not None:
            return n if n > 0 else _available_cpus()
    if default is not None:
        return max(1, int(default))
    return min(DEFAULT_FFT_WORKERS, _available_cpus())


def blas_threads(n: int):
    """Context manager limiting BLAS to ``n`` threads (``threadpoolctl`` if installed, else a no-op).

    Code that wants more than one BLAS thread should pass :func:`fft_workers` (the process's thread budget, 1 in
    a batch worker) rather than the machine's CPU count.
    """
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=max(1, int(n)), user_api="blas")
    except Exception:  # threadpoolctl is optional
        import contextlib

        return contextlib.nullcontext()


# Modules that keep a module-level FFT thread count (attribute names), updated by limit_threads.
_MODULE_CONSTANTS = (("diffim.convolve", "_WORKERS"), ("diffim.zogy", "FFT_WORKERS"))
# Lazily created module-level thread pools (None until first use), pre-created with n threads.
_THREAD_POOLS = (("diffim.detection", "_POOL"),)
# Functions whose ``workers`` keyword default is a hard-coded thread count.
_FUNCTION_DEFAULTS = (("diffim.decorrelation", ("decorrelation_kernel_fourier", "decorrelation_variance_factors",
                                                 "decorrelate", "decorrelate_spatial")),)


def _set_function_default(func, name: str, value: int) -> None:
    """Change the default of keyword ``name`` of ``func`` (positional-or-keyword or keyword-only)."""
    code = getattr(func, "__code__", None)
    if code is None:
        return
    kwdefaults = func.__kwdefaults__
    if kwdefaults and name in kwdefaults:
        kwdefaults[name] = value
        return
    defaults = func.__defaults__
    if not defaults:
        return
    positional = code.co_varnames[: code.co_argcount]
    if name in positional:
        idx = positional.index(name) - (len(positional) - len(defaults))
        if idx >= 0:
            new = list(defaults)
            new[idx] = value
            func.__defaults__ = tuple(new)


def limit_threads(n: int = 1) -> None:
    """Make this process use at most ``n`` threads for FFTs, BLAS and OpenMP.

    Environment variables only reach thread pools that have not started yet, so pools of libraries already
    imported are capped through ``threadpoolctl`` (if installed), and diffim modules that keep their own
    FFT thread count are updated in place.
    """
    n = max(1, int(n))
    os.environ[ENV_FFT_WORKERS] = str(n)
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)
    except Exception:  # threadpoolctl missing or a pool it cannot control: the env variables still apply
        pass
    import importlib

    for modname, attr in _MODULE_CONSTANTS:
        try:
            mod = importlib.import_module(modname)
        except Exception:  # that area is not installed/importable: nothing to cap
            continue
        if isinstance(getattr(mod, attr, None), int):
            setattr(mod, attr, n)
    for modname, attr in _THREAD_POOLS:
        try:
            mod = importlib.import_module(modname)
        except Exception:
            continue
        if hasattr(mod, attr) and getattr(mod, attr) is None:
            from concurrent.futures import ThreadPoolExecutor

            setattr(mod, attr, ThreadPoolExecutor(max_workers=n, thread_name_prefix="diffim-limited"))
    for modname, names in _FUNCTION_DEFAULTS:
        try:
            mod = importlib.import_module(modname)
        except Exception:
            continue
        for fname in names:
            func = getattr(mod, fname, None)
            if func is not None:
                _set_function_default(func, "workers", n)
