"""How much of a science exposure a template covers (LSST ``checkTemplateIsSufficient``)."""

from __future__ import annotations

import numpy as np

from ..errors import InsufficientTemplateCoverageError

__all__ = ["template_coverage", "check_template_coverage"]


def template_coverage(science, template) -> float:
    """Fraction of the science pixels for which the template has usable data.

    A science pixel counts if it lies inside the template bbox, neither image flags it NO_DATA (LSST's modern
    definition: template NO_DATA *or* science NO_DATA is "no data") and the template value is finite. The
    denominator is the full science area, so parts of the science image outside the template bbox count as
    uncovered.
    """
    area = science.bbox.area
    if area == 0:
        return 0.0
    box = science.bbox.intersection(template.bbox)
    if box.is_empty():
        return 0.0
    t = template[box]
    s = science[box]
    good = ~(t.mask.get("NO_DATA", ignore_missing=True) | s.mask.get("NO_DATA", ignore_missing=True))
    good &= np.isfinite(t.image)
    return float(np.count_nonzero(good)) / float(area)


def check_template_coverage(science, template, required_fraction: float) -> float:
    """:func:`template_coverage`, raising :class:`InsufficientTemplateCoverageError` below ``required_fraction``."""
    frac = template_coverage(science, template)
    if frac < required_fraction:
        raise InsufficientTemplateCoverageError(
            f"The template covers {100 * frac:.1f}% of the science image, less than requiredTemplateFraction="
            f"{required_fraction:g} ({100 * required_fraction:.1f}%); supply a template that overlaps the science "
            "exposure, or lower requiredTemplateFraction."
        )
    return frac
