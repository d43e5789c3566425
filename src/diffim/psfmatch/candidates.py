"""Kernel candidates: selection of star stamps and the spatial cell set that rations them (spec §2.4–2.5)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..model.box import Box
from ..model.exposure import MaskedImage

__all__ = [
    "KernelCandidate",
    "SpatialCellSet",
    "detect_kernel_sources",
    "make_kernel_candidates",
    "UNKNOWN",
    "GOOD",
    "BAD",
    "DEFAULT_CANDIDATE_BAD_PLANES",
]

UNKNOWN, GOOD, BAD = "UNKNOWN", "GOOD", "BAD"

#: A candidate stamp with any of these bits set in either image is rejected.
DEFAULT_CANDIDATE_BAD_PLANES = ("NO_DATA", "EDGE", "SAT", "BAD", "CR")


@dataclass
class KernelCandidate:
    """One star stamp used to constrain the kernel.

    Attributes
    ----------
    x, y
        Parent position of the source (spatial functions are evaluated here).
    box
        Stamp box (side ``2·kernelSize + 1``) in parent coordinates.
    rating
        Sort key within a cell (larger first): the source flux or S/N.
    status
        ``"UNKNOWN"``, ``"GOOD"`` or ``"BAD"``.
    """

    x: float
    y: float
    box: Box
    rating: float
    id: int = 0
    status: str = UNKNOWN
    kernel_sum: float = math.nan
    background: float = 0.0
    chi2: float = math.nan
    residual_mean: float = math.nan
    residual_std: float = math.nan
    reason: str = ""
    coefficients: np.ndarray | None = field(default=None, repr=False)


def detect_kernel_sources(
    mi: MaskedImage,
    psf_sigma: float,
    *,
    threshold: float = 10.0,
    bad_mask_planes=DEFAULT_CANDIDATE_BAD_PLANES,
    max_sources: int = 5000,
) -> np.ndarray:
    """A small private detector for kernel stars: bright local maxima of the PSF-smoothed image.

    The image (median background removed, bad pixels set to it) is smoothed with a Gaussian of the PSF σ; peaks
    whose smoothed S/N (noise from the robust pixel scatter × ``1/(2√π σ)``) exceeds ``threshold`` are returned
    as an ``(n, 3)`` array of ``x, y, flux`` (flux = smoothed peak × 4πσ², exact for a Gaussian star), brightest
    first.
    """
    img = np.asarray(mi.image, dtype=np.float32)
    bits = mi.mask.bitmask([p for p in bad_mask_planes if mi.mask.has_plane(p)])
    good = np.isfinite(img)
    if bits:
        good &= (mi.mask.array & bits) == 0
    sample = img[good]
    if sample.size < 10:
        return np.empty((0, 3))
    if sample.size > 2_000_000:
        sample = sample[:: sample.size // 2_000_000 + 1]
    med = float(np.median(sample))
    noise = 1.4826 * float(np.median(np.abs(sample - med)))
    if not noise > 0:
        noise = float(np.std(sample)) or 1.0
    # Gaussian smoothing (±3σ, zero outside the image) as the strip-blocked separable filter of the detection
    # code on a zero-padded copy: several times cheaper than ndimage.gaussian_filter on a large image.
    from ..detection import correlate_separable, local_maxima

    r = int(3.0 * float(psf_sigma) + 0.5)
    ny, nx = img.shape
    work = np.zeros((ny + 2 * r, nx + 2 * r), dtype=np.float32)
    np.subtract(img, np.float32(med), out=work[r : r + ny, r : r + nx])
    work[r : r + ny, r : r + nx][~good] = 0.0
    u = np.arange(-r, r + 1, dtype=float)
    k = np.exp(-0.5 * (u / float(psf_sigma)) ** 2)
    sm = correlate_separable(work, k / k.sum(), threads=2)[r : r + ny, r : r + nx]
    del work
    snoise = noise / (2.0 * math.sqrt(math.pi) * psf_sigma)
    above = sm > threshold * snoise
    if not above.any():
        return np.empty((0, 3))
    # Local maxima of the 3×3 neighbourhood, tested only at the above-threshold pixels instead of
    # max-filtering the whole image.
    iy, ix = np.nonzero(above)
    is_peak = local_maxima(sm, iy, ix)
    iy, ix = iy[is_peak], ix[is_peak]
    flux = sm[iy, ix] * 4.0 * math.pi * psf_sigma**2
    order = np.argsort(-flux)[:max_sources]
    return np.column_stack([ix[order] + mi.xy0[0], iy[order] + mi.xy0[1], flux[order]]).astype(float)


def make_kernel_candidates(
    sources,
    science: MaskedImage,
    template: MaskedImage,
    kernel_size: int,
    *,
    bad_mask_planes=DEFAULT_CANDIDATE_BAD_PLANES,
    region: Box | None = None,
    max_candidates: int = 1000,
) -> tuple[list[KernelCandidate], dict]:
    """Turn ``(x, y, flux)`` rows into candidates with stamps of side ``2·kernel_size + 1``.

    A source is rejected if its stamp leaves ``region`` (default: the science bbox ∩ template bbox) or if any
    pixel of the stamp has a ``bad_mask_planes`` bit in either image or a non-finite value. The brightest
    ``max_candidates`` (≤ 0: all) survivors are kept. Returns the candidates and rejection counts.
    """
    src = np.asarray(sources, dtype=float).reshape(-1, 3) if len(sources) else np.empty((0, 3))
    region = science.bbox.intersection(template.bbox) if region is None else region
    half = int(kernel_size)
    counts = {"input": len(src), "outside": 0, "masked": 0, "nonfinite": 0}
    sbits = science.mask.bitmask([p for p in bad_mask_planes if science.mask.has_plane(p)])
    tbits = template.mask.bitmask([p for p in bad_mask_planes if template.mask.has_plane(p)])
    out: list[KernelCandidate] = []
    for i in np.argsort(-src[:, 2], kind="stable"):
        x, y, flux = src[i]
        if not (np.isfinite(x) and np.isfinite(y)):
            counts["outside"] += 1
            continue
        box = Box.centered(x, y, half)
        if not region.contains(box):
            counts["outside"] += 1
            continue
        ss, ts = box.slices(science.xy0), box.slices(template.xy0)
        if (sbits and (science.mask.array[ss] & sbits).any()) or (tbits and (template.mask.array[ts] & tbits).any()):
            counts["masked"] += 1
            continue
        if not (np.isfinite(science.image[ss]).all() and np.isfinite(template.image[ts]).all()
                and np.isfinite(science.variance[ss]).all() and np.isfinite(template.variance[ts]).all()):
            counts["nonfinite"] += 1
            continue
        out.append(KernelCandidate(float(x), float(y), box, float(flux), id=int(i)))
        if 0 < max_candidates <= len(out):
            break
    counts["kept"] = len(out)
    return out, counts


class SpatialCellSet:
    """Cells of ``size_x × size_y`` pixels over ``bbox``; the last row/column of cells reaches the bbox edge.

    Candidates sit in the cell that contains their centre, sorted by decreasing rating. :meth:`visit` yields, per
    cell, the first ``n`` candidates that are not BAD (n ≤ 0: all of them).
    """

    def __init__(self, bbox: Box, size_x: int = 128, size_y: int = 128) -> None:
        self.bbox = bbox
        self.nx = max(1, math.ceil(bbox.width / size_x))
        self.ny = max(1, math.ceil(bbox.height / size_y))
        self.size_x, self.size_y = size_x, size_y
        self.cells: list[list[KernelCandidate]] = [[] for _ in range(self.nx * self.ny)]

    def insert(self, cand: KernelCandidate) -> None:
        ix = min(int((round(cand.x) - self.bbox.x0) // self.size_x), self.nx - 1)
        iy = min(int((round(cand.y) - self.bbox.y0) // self.size_y), self.ny - 1)
        if ix < 0 or iy < 0 or round(cand.x) >= self.bbox.x1 or round(cand.y) >= self.bbox.y1:
            raise ValueError(f"Candidate at ({cand.x:.1f}, {cand.y:.1f}) is outside the cell set {self.bbox}.")
        cell = self.cells[iy * self.nx + ix]
        cell.append(cand)
        cell.sort(key=lambda c: -c.rating)

    def visit(self, n: int) -> list[KernelCandidate]:
        """The candidates a visit with ``nMaxPerCell = n`` would see (non-BAD, rating order)."""
        out = []
        for cell in self.cells:
            k = 0
            for c in cell:
                if c.status == BAD:
                    continue
                out.append(c)
                k += 1
                if 0 < n <= k:
                    break
        return out

    def all_candidates(self) -> list[KernelCandidate]:
        return [c for cell in self.cells for c in cell]

    def n_nonempty(self, n: int) -> int:
        """Number of cells that still have a non-BAD candidate."""
        return sum(any(c.status != BAD for c in cell) for cell in self.cells)
