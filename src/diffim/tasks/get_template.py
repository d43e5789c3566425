"""GetCoaddAsTemplateTask: build a template for a science exposure from coadd patch exposures.

LSST looks patches up in a sky map through the Butler. diffim takes the patches as files in a directory (or a
list of exposures / paths): every ``<coaddName>Coadd_*.fits`` in ``coaddDir`` — or, when no file matches that
pattern, every ``*.fits`` there. Each patch must carry a WCS. The patches overlapping the science footprint
(grown by ``templateBorderSize``) are warped onto the science WCS and pixel grid and stitched with LSST's
modern weighting (:mod:`diffim.warp.stitch`), so the template is returned **on the science grid** (the old
LSST task returned it in the coadd frame and warped later; the modern GetTemplateTask returns it warped, as
here). Pixels no patch covers are NaN with mask NO_DATA. The template PSF is a
:class:`~diffim.warp.psf.StitchedPsf`: at each position, the warped PSF of a patch that has data there.
"""

from __future__ import annotations

import glob
import os

import lsst.pex.config as pexConfig
import numpy as np

from ..errors import BadInputError, InputFileNotFoundError, NoOverlapError, WcsError
from ..model.exposure import Exposure
from ..warp.coverage import template_coverage
from ..warp.psf import StitchedPsf
from ..warp.stitch import stitch_masked_images
from ..warp.warper import check_overlap, warp_exposure
from .base import Struct, Task, timeMethod
from .register import WarperConfig

__all__ = ["GetCoaddAsTemplateConfig", "GetCoaddAsTemplateTask", "find_coadd_files"]


class GetCoaddAsTemplateConfig(pexConfig.Config):
    """Configuration for GetCoaddAsTemplateTask (LSST names and defaults)."""

    templateBorderSize = pexConfig.Field(dtype=int, default=20, doc="Number of pixels to grow the requested template image to account for warping")
    coaddName = pexConfig.Field(dtype=str, default="deep", doc="coadd name: typically one of 'deep', 'goodSeeing', or 'dcr'")
    warpType = pexConfig.Field(dtype=str, default="direct", doc="Warp type of the coadd template: one of 'direct' or 'psfMatched'")
    numSubfilters = pexConfig.Field(dtype=int, default=3, doc="Number of subfilters in the DcrCoadd. Used only if ``coaddName``='dcr'")
    effectiveWavelength = pexConfig.Field(dtype=float, optional=True, default=None, doc="Effective wavelength of the filter. Used only if ``coaddName``='dcr'")
    bandwidth = pexConfig.Field(dtype=float, optional=True, default=None, doc="Bandwidth of the physical filter. Used only if ``coaddName``='dcr'")
    warp = pexConfig.ConfigField(dtype=WarperConfig, doc="Warper configuration (diffim: warping happens here)")


def find_coadd_files(coadd_dir: str, coadd_name: str = "deep") -> list[str]:
    """Patch files in ``coadd_dir``: ``<coaddName>Coadd_*.fits`` (``.fits.gz``/``.fits.fz`` too), else ``*.fits``."""
    if not os.path.isdir(coadd_dir):
        raise InputFileNotFoundError(f"Coadd directory {coadd_dir!r} does not exist.")
    pats = [f"{coadd_name}Coadd_*.fits", f"{coadd_name}Coadd_*.fits.gz", f"{coadd_name}Coadd_*.fits.fz"]
    files = sorted({f for p in pats for f in glob.glob(os.path.join(coadd_dir, p))})
    if not files:
        files = sorted({f for p in ("*.fits", "*.fits.gz", "*.fits.fz") for f in glob.glob(os.path.join(coadd_dir, p))})
    if not files:
        raise InputFileNotFoundError(
            f"No coadd patches in {coadd_dir!r}: expected files named {coadd_name}Coadd_*.fits (or any *.fits)."
        )
    return files


class GetCoaddAsTemplateTask(Task):
    """Assemble a template on the science grid from coadd patches."""

    ConfigClass = GetCoaddAsTemplateConfig
    _DefaultName = "getTemplate"

    def _load(self, item) -> tuple[Exposure, str]:
        if isinstance(item, Exposure):
            return item, f"exposure#{id(item)}"
        from ..io import read_exposure

        return read_exposure(str(item)), os.path.basename(str(item))

    @timeMethod
    def run(self, exposure: Exposure, coaddDir: str | None = None, coaddExposures=None, **kwargs) -> Struct:
        """Template for ``exposure``.

        Parameters
        ----------
        exposure
            The science exposure (needs a WCS).
        coaddDir
            Directory of patch files (see the module docstring).
        coaddExposures
            Alternatively, a list of :class:`Exposure` objects or file paths.

        Returns
        -------
        Struct
            ``exposure`` (template on ``exposure.bbox`` grown by ``templateBorderSize``, science WCS),
            ``sources`` (None), ``coverage`` (fraction of science pixels covered), ``patches`` (names used).

        Raises
        ------
        WcsError
            The science exposure or a patch has no WCS.
        NoOverlapError
            No patch overlaps the science exposure.
        BadInputError
            Patches of different bands or photometric calibrations, or of a band other than the science's.
        """
        cfg = self.config
        if exposure.wcs is None:
            raise WcsError("GetCoaddAsTemplateTask needs a science exposure with a WCS to find its coadd patches.")
        if coaddExposures is None:
            if coaddDir is None:
                raise BadInputError("GetCoaddAsTemplateTask needs coaddDir or coaddExposures.")
            coaddExposures = find_coadd_files(coaddDir, cfg.coaddName)
        items = list(coaddExposures)
        if not items:
            raise NoOverlapError("No coadd patches were given.")
        bbox = exposure.bbox.grown(cfg.templateBorderSize)
        used, names, warped = [], [], []
        bands, calibs = set(), []
        for item in items:
            patch, name = self._load(item)
            if patch.wcs is None:
                raise WcsError(f"Coadd patch {name} has no WCS; every patch needs one to be warped onto the science.")
            if check_overlap(patch, exposure.wcs, bbox) == 0.0:
                self.log.debug("Patch %s does not overlap the science exposure.", name)
                continue
            if patch.band is not None:
                bands.add(patch.band)
            if patch.photo_calib is not None:
                calibs.append(patch.photo_calib.calibration_mean)
            used.append(patch)
            names.append(name)
        if not used:
            raise NoOverlapError(
                f"None of the {len(items)} coadd patches overlaps the science exposure {exposure.bbox}; "
                "check the WCSs or supply the right patches."
            )
        if len(bands) > 1:
            raise BadInputError(f"Coadd patches have different bands {sorted(bands)}; use patches of one band.")
        if bands and exposure.band is not None and exposure.band not in bands:
            raise BadInputError(
                f"Coadd patches are in band {bands.pop()!r} but the science exposure is {exposure.band!r}."
            )
        if calibs and (max(calibs) - min(calibs)) > 1e-6 * abs(max(calibs)):
            raise BadInputError(
                f"Coadd patches have different photometric calibrations ({min(calibs):g} … {max(calibs):g} nJy/count);"
                " rescale them to one zero point first."
            )
        w = cfg.warp
        for patch in used:
            warped.append(warp_exposure(patch, exposure.wcs, bbox, kernel=w.warpingKernelName,
                                        interp_length=w.interpLength))
        mi = stitch_masked_images([e.masked_image for e in warped])
        # Calibration and metadata from the patch covering most of the science exposure; the PSF at each
        # position from the patch that has data there (LSST: a CoaddPsf of all patches).
        covered = [~e.mask.get("NO_DATA") for e in warped]
        best = int(np.argmax([np.count_nonzero(c) for c in covered]))
        ref = warped[best]
        with_psf = [(e.psf, c) for e, c in zip(warped, covered) if e.psf is not None]
        psf = None
        if len(with_psf) == 1:
            psf = with_psf[0][0]
        elif with_psf:
            psf = StitchedPsf([p for p, _ in with_psf], [c for _, c in with_psf], bbox.xy0,
                              average_position=exposure.bbox.center)
        template = Exposure(mi, psf=psf, wcs=exposure.wcs, photo_calib=ref.photo_calib,
                            band=ref.band if ref.band is not None else exposure.band,
                            visit_info=used[best].visit_info, metadata=dict(used[best].metadata)
                            if isinstance(used[best].metadata, dict) else used[best].metadata.copy())
        frac = template_coverage(exposure, template)
        self.metadata["numPatches"] = len(used)
        self.metadata["templateCoveragePercent"] = 100.0 * frac
        self.log.info("Template from %d patch(es) covers %.1f%% of the science exposure.", len(used), 100 * frac)
        return Struct(exposure=template, sources=None, coverage=frac, patches=names)
