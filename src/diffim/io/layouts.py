"""Companion files of plain FITS images: variance/weight/noise maps, masks and PSFs found by file name.

Survey and reduction software rarely put the variance, mask and PSF in the image file. They write *companion*
files next to it, named after the image: SWarp's ``image.weight.fits``, JWST-style ``image.noise.fits``/
``image.err.fits``, SExtractor/PSFEx's ``image.psf``, WebbPSF models saved as ``image.WebbPSF.fits``, bad
pixel masks ``image.mask.fits``/``image.bpm.fits`` ... :func:`find_companions` looks for them and returns the
keyword arguments of :func:`diffim.io.read_exposure` that use them (``diffim run --companions`` does this for
both images).

A companion is the image's name with its FITS extension (``.fits``, ``.fit``, ``.fts``, optionally ``.gz``/
``.fz``) replaced by one of the suffixes below; the first existing file of each kind wins, in the order listed.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["COMPANION_SUFFIXES", "find_companions", "image_stem"]

#: ``kind → [(suffix, read_exposure keyword arguments implied by that suffix), ...]`` in priority order.
COMPANION_SUFFIXES: dict[str, list[tuple[str, dict]]] = {
    "variance": [
        (".var.fits", {"variance_kind": "variance"}),
        (".variance.fits", {"variance_kind": "variance"}),
        (".weight.fits", {"variance_kind": "weight"}),
        (".wht.fits", {"variance_kind": "weight"}),
        (".ivar.fits", {"variance_kind": "weight"}),
        (".noise.fits", {"variance_kind": "sigma"}),
        (".rms.fits", {"variance_kind": "sigma"}),
        (".err.fits", {"variance_kind": "sigma"}),
        (".sigma.fits", {"variance_kind": "sigma"}),
    ],
    "mask": [(".mask.fits", {}), (".bpm.fits", {}), (".flag.fits", {}), (".flags.fits", {})],
    "psf": [(".psf", {}), (".psf.fits", {}), (".WebbPSF.fits", {}), (".webbpsf.fits", {})],
}

_FITS_EXTENSIONS = (".fits", ".fit", ".fts")
_COMPRESSION = (".gz", ".fz", ".bz2")


def image_stem(path: str | os.PathLike) -> Path:
    """``path`` without its FITS extension (and compression suffix): ``a/b.fits.gz`` → ``a/b``."""
    p = Path(path)
    name = p.name
    for comp in _COMPRESSION:
        if name.lower().endswith(comp):
            name = name[: -len(comp)]
            break
    for ext in _FITS_EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return p.with_name(name)


def find_companions(path: str | os.PathLike, kinds: tuple[str, ...] = ("variance", "mask", "psf")) -> dict:
    """``read_exposure`` keyword arguments for the companion files of the image ``path`` that exist.

    Returns e.g. ``{"variance": ".../x.noise.fits", "variance_kind": "sigma", "psf": ".../x.WebbPSF.fits"}``;
    an empty dict when there is none. A companion that is the image itself is ignored.
    """
    stem = image_stem(path)
    own = Path(path).resolve() if Path(path).exists() else None
    out: dict = {}
    for kind in kinds:
        for suffix, extra in COMPANION_SUFFIXES.get(kind, []):
            cand = stem.with_name(stem.name + suffix)
            if cand.is_file() and (own is None or cand.resolve() != own):
                out[kind] = str(cand)
                out.update(extra)
                break
    return out
