"""A stand-in per-pair worker for testing the batch machinery without running the pipeline.

``fake_worker`` behaves like :func:`diffim.pipeline.run_files` as seen from the outside: it reads nothing but
checks that the input files exist, sleeps ``DIFFIM_FAKE_SECONDS`` (default 0.2) to mimic work, and writes
``difference.fits``, ``config.py`` and ``metadata.json`` into a temporary sibling directory that is renamed
into place at the end (atomic, like the real path).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

__all__ = ["fake_worker"]


def fake_worker(science: str, template: str | None, outdir: str, *, config_text: str, plot: bool = True,
                **read_kwargs) -> None:
    import numpy as np
    from astropy.io import fits

    from ..errors import InputFileNotFoundError

    for p in (science, template):
        if p is not None and not Path(p).is_file():
            raise InputFileNotFoundError(f"Input file {p} does not exist.")
    if "crash" in Path(science).name:  # lets tests kill a worker process the hard way
        os._exit(9)
    if "interrupt" in Path(science).name:  # ... or press Ctrl-C
        raise KeyboardInterrupt
    out = Path(outdir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        time.sleep(float(os.environ.get("DIFFIM_FAKE_SECONDS", "0.2")))
        data = fits.getdata(science).astype(np.float32) if science.endswith(".fits") else np.zeros((8, 8), np.float32)
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, name="IMAGE")]).writeto(tmp / "difference.fits")
        (tmp / "config.py").write_text(config_text)
        with open(tmp / "metadata.json", "w") as fh:
            json.dump({"counts": {"nDiaSources": int(data.size % 7), "nPositive": 1, "nNegative": 0},
                       "inputs": {"science": science, "template": template}, "read_kwargs": read_kwargs}, fh)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
