"""ImageDifferenceTask as a Rubin ``PipelineTask``: run diffim with ``pipetask run`` or ``bps submit``.

Dataset types (``{coaddName}`` defaults to ``deep``, ``{fakesType}`` to the empty string), all with dimensions
``instrument, visit, detector``:

=======================  ===============================================  ================  =============
connection               dataset type                                     storage class     when
=======================  ===============================================  ================  =============
``exposure``             ``calexp``                                       DiffimExposure    always
``template``             ``{coaddName}Diff_templateExp``                  DiffimExposure    always
``inputSources``         ``src``                                          ArrowAstropy      doSelectSources or doUseRegister
``subtractedExposure``   ``{fakesType}{coaddName}Diff_differenceExp``     DiffimExposure    doWriteSubtractedExp
``diaSources``           ``{fakesType}{coaddName}Diff_diaSrc``            ArrowAstropy      doDetection and doWriteSources
``scoreExposure``        ``{fakesType}{coaddName}Diff_scoreExp``          DiffimExposure    doWriteScoreExp
``warpedExposure``       ``{fakesType}{coaddName}Diff_warpedExp``         DiffimExposure    doWriteWarpedExp
``matchedExposure``      ``{fakesType}{coaddName}Diff_matchedExp``        DiffimExposure    doWriteMatchedExp
=======================  ===============================================  ================  =============

``DiffimExposure`` is diffim's multi-extension FITS exposure (``diffim.rubin.formatters``); the repository must
know it (``diffim.rubin.repo.seed_config``). ``ArrowAstropy`` is daf_butler's astropy-Table-as-Parquet class.
The template is an exposure per visit and detector (for example a coadd already cut out and warped, as
LSST's ``GetTemplateTask`` makes); diffim warps it onto the science grid if it is not already there.

The config is ``ImageDifferenceConfig`` itself (every field, same defaults) plus the PipelineTask fields, so
``pipetask run -c imageDifference:subtract.name=zogy`` works as ``diffim run -c subtract.name=zogy`` does.
The pixels are computed by exactly the code ``diffim run`` uses.
"""

from __future__ import annotations

import math
from typing import Any

import lsst.pipe.base as pipeBase
import lsst.pipe.base.connectionTypes as cT

from ..tasks.image_difference import ImageDifferenceConfig
from . import STORAGE_CLASS

__all__ = ["ImageDifferencePipelineConnections", "ImageDifferencePipelineConfig", "ImageDifferencePipelineTask"]

_DIMS = ("instrument", "visit", "detector")


class ImageDifferencePipelineConnections(
    pipeBase.PipelineTaskConnections,
    dimensions=_DIMS,
    defaultTemplates={"coaddName": "deep", "fakesType": ""},
):
    """Inputs and outputs of :class:`ImageDifferencePipelineTask` (optional ones are removed by config)."""

    exposure = cT.Input(
        doc="Input science exposure to subtract from.",
        name="calexp", storageClass=STORAGE_CLASS, dimensions=_DIMS,
    )
    template = cT.Input(
        doc="Template exposure for this visit and detector (warped onto the science grid if needed).",
        name="{coaddName}Diff_templateExp", storageClass=STORAGE_CLASS, dimensions=_DIMS,
    )
    inputSources = cT.Input(
        doc="Sources measured on the science exposure (table with x, y and a flux column); used for kernel "
            "candidates (doSelectSources) and registration (doUseRegister).",
        name="src", storageClass="ArrowAstropy", dimensions=_DIMS,
    )
    subtractedExposure = cT.Output(
        doc="Output difference image.",
        name="{fakesType}{coaddName}Diff_differenceExp", storageClass=STORAGE_CLASS, dimensions=_DIMS,
    )
    diaSources = cT.Output(
        doc="Detected and measured DIA sources (APDB DiaSource column names).",
        name="{fakesType}{coaddName}Diff_diaSrc", storageClass="ArrowAstropy", dimensions=_DIMS,
    )
    scoreExposure = cT.Output(
        doc="AL likelihood or ZOGY score image.",
        name="{fakesType}{coaddName}Diff_scoreExp", storageClass=STORAGE_CLASS, dimensions=_DIMS,
    )
    warpedExposure = cT.Output(
        doc="Template warped onto the science grid.",
        name="{fakesType}{coaddName}Diff_warpedExp", storageClass=STORAGE_CLASS, dimensions=_DIMS,
    )
    matchedExposure = cT.Output(
        doc="Warped and PSF-matched template.",
        name="{fakesType}{coaddName}Diff_matchedExp", storageClass=STORAGE_CLASS, dimensions=_DIMS,
    )

    def __init__(self, *, config=None):
        super().__init__(config=config)
        if config is None:
            return
        if not (config.doSelectSources or config.doUseRegister):
            del self.inputSources
        if not config.doWriteSubtractedExp:
            del self.subtractedExposure
        if not (config.doDetection and config.doWriteSources):
            del self.diaSources
        if not config.doWriteScoreExp:
            del self.scoreExposure
        if not config.doWriteWarpedExp:
            del self.warpedExposure
        if not config.doWriteMatchedExp:
            del self.matchedExposure


class ImageDifferencePipelineConfig(
    pipeBase.PipelineTaskConfig, ImageDifferenceConfig, pipelineConnections=ImageDifferencePipelineConnections
):
    """Every :class:`~diffim.tasks.image_difference.ImageDifferenceConfig` field plus the PipelineTask ones.

    ``connections`` is the PipelineTask's (dataset type names); the plain config's connection-name holder
    of the same name is replaced by it.
    """


def _prepare_pair(science, template):
    """The input preparation ``diffim run`` applies after reading the files (PSF estimation for exposures
    without one, cosmic-ray repair of plain images, shared repairs on a common grid), so that both paths
    subtract the same pixels."""
    from .. import pipeline

    prepare_pair = getattr(pipeline, "prepare_pair", None)
    if prepare_pair is not None:
        return prepare_pair(science, template)
    science = pipeline.prepare_exposure(science, label="science")
    template = pipeline.prepare_exposure(template, label="template")
    share = getattr(pipeline, "_share_repairs", None)  # stand-in until pipeline exposes prepare_pair
    if share is not None:
        share(science, template)
    return science, template


def _plain_metadata(value: Any) -> Any:
    """What TaskMetadata can hold: nested dicts of finite numbers, strings and booleans (others dropped)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            pv = _plain_metadata(v)
            if pv is not None and str(k) and "." not in str(k):
                out[str(k)] = pv
        return out or None
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class ImageDifferencePipelineTask(pipeBase.PipelineTask):
    """Subtract a template from a science exposure, detect and measure DIA sources (diffim's algorithms)."""

    ConfigClass = ImageDifferencePipelineConfig
    _DefaultName = "imageDifference"
    # Log as "imageDifference", not "diffim.imageDifference": pipetask's default INFO level covers lsst.*
    # and task loggers without a module prefix, so the task's messages reach the <label>_log dataset.
    _add_module_logger_prefix = False

    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        inputs = butlerQC.get(inputRefs)
        outputs = self.run(**inputs)
        # Put only what was made: an output the algorithm did not produce (no score image, say) is simply
        # absent, which the middleware allows.
        for name, ref in outputRefs:
            value = getattr(outputs, name, None)
            if value is not None:
                butlerQC.put(value, ref)

    def run(self, exposure, template, inputSources=None) -> pipeBase.Struct:
        """Run diffim's ImageDifferenceTask exactly as ``diffim run`` does.

        Parameters
        ----------
        exposure, template : `diffim.model.Exposure`
            Science and template exposures (a PSF is estimated for an exposure without one).
        inputSources : `astropy.table.Table`, optional
            Science sources for kernel selection / registration.

        Returns
        -------
        result : `lsst.pipe.base.Struct`
            ``subtractedExposure``, ``diaSources``, ``scoreExposure``, ``warpedExposure``, ``matchedExposure``.
        """
        from ..tasks.image_difference import ImageDifferenceTask

        science, template = _prepare_pair(exposure, template)
        task = ImageDifferenceTask(config=self.config)
        res = task.run(exposure=science, templateExposure=template, selectSources=inputSources)
        try:
            md = _plain_metadata(task.metadata.to_plain())
            if md:
                self.metadata["diffim"] = pipeBase.TaskMetadata.from_dict(md)
        except Exception as exc:  # provenance only: never fail a quantum over it
            self.log.warning("Could not record diffim metadata: %s", exc)
        return pipeBase.Struct(
            subtractedExposure=res.subtractedExposure,
            diaSources=res.diaSources,
            scoreExposure=getattr(res, "scoreExposure", None),
            warpedExposure=getattr(res, "warpedExposure", None),
            matchedExposure=getattr(res, "matchedExposure", None),
        )
