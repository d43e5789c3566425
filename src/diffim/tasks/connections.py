"""Connections of ImageDifferenceTask as a PipelineTask: the dataset types it reads and writes.

Without the Rubin middleware this is a plain pex_config Config holding the dataset type names (the
``lsst.pipe.base.config.Connections`` of the seed page); the Rubin adapter (``diffim.rubin``) builds real
``PipelineTaskConnections`` from these names.
"""

from __future__ import annotations

import lsst.pex.config as pexConfig

__all__ = ["Connections"]


class Connections(pexConfig.Config):
    """Dataset type names of the ImageDifferenceTask inputs and outputs (``{coaddName}`` is substituted)."""

    exposure = pexConfig.Field(dtype=str, default="calexp", doc="Input science exposure to subtract from.")
    skyMap = pexConfig.Field(dtype=str, default="skyMap", doc="Input definition of geometry/bbox and projection/wcs for template exposures.")
    coaddExposures = pexConfig.Field(dtype=str, default="{coaddName}Coadd", doc="Input template coadd patches to match and subtract from the exposure.")
    dcrCoadds = pexConfig.Field(dtype=str, default="dcrCoadd", doc="Input DCR template coadds.")
    inputSources = pexConfig.Field(dtype=str, default="src", doc="Sources measured on the science exposure; used for kernel selection.")
    finalizedPsfApCorrCatalog = pexConfig.Field(dtype=str, default="finalized_psf_ap_corr_catalog", doc="Per-visit finalized PSF models and aperture correction maps.")
    subtractedExposure = pexConfig.Field(dtype=str, default="{fakesType}{coaddName}Diff_differenceExp", doc="Output difference image.")
    scoreExposure = pexConfig.Field(dtype=str, default="{fakesType}{coaddName}Diff_scoreExp", doc="Output AL likelihood or ZOGY score image.")
    warpedExposure = pexConfig.Field(dtype=str, default="{fakesType}{coaddName}Diff_warpedExp", doc="Warped template used to create the difference image.")
    matchedExposure = pexConfig.Field(dtype=str, default="{fakesType}{coaddName}Diff_matchedExp", doc="Warped and PSF-matched template.")
    diaSources = pexConfig.Field(dtype=str, default="{fakesType}{coaddName}Diff_diaSrc", doc="Output detected DIA sources.")
    coaddName = pexConfig.Field(dtype=str, default="deep", doc="Template name used in dataset type names.")
    fakesType = pexConfig.Field(dtype=str, default="", doc="Prefix for fake-injection runs.")
