"""Stitch several (warped) exposures on one pixel grid into a single template.

Weighting follows LSST's modern ``GetTemplateTask`` (§9.5 of the algorithm notes): a pixel is *good* in an
input if its image is finite, its variance finite and > 0 and it is not NO_DATA; its weight is
``w = V^(−1/2)``; the result is ``I = ΣwI / Σw`` and ``V = ΣwV / Σw`` (the same weights for both, so in an
overlap of patches of one coadd — identical pixels — the result is exactly those pixels, and the variance
is the per-input variance, not an inverse-variance combination that would pretend the copies are
independent). Masks of good pixels are OR-ed. Where no input is good: image NaN, variance +inf, mask
NO_DATA (afw's warping convention; LSST's modern merge writes 0/0 there, but NO_DATA is set either way).
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeMismatchError
from ..model.exposure import MaskedImage
from ..model.mask import Mask

__all__ = ["stitch_masked_images"]


def stitch_masked_images(images: list[MaskedImage]) -> MaskedImage:
    """Weighted merge of masked images sharing one bbox (see the module docstring)."""
    if not images:
        raise ShapeMismatchError("Nothing to stitch: no images given.")
    bbox = images[0].bbox
    for mi in images[1:]:
        if mi.bbox != bbox:
            raise ShapeMismatchError(f"Images to stitch must share one bbox; got {bbox} and {mi.bbox}.")
    shape = bbox.shape
    acc_i = np.zeros(shape, dtype=np.float64)
    acc_v = np.zeros(shape, dtype=np.float64)
    acc_w = np.zeros(shape, dtype=np.float64)
    out_mask = Mask.zeros(shape, dict(images[0].mask.planes))
    no_data_bit = out_mask.add_plane("NO_DATA")
    for mi in images:
        nd = mi.mask.get("NO_DATA", ignore_missing=True)
        good = np.isfinite(mi.image) & np.isfinite(mi.variance) & (mi.variance > 0) & ~nd
        w = np.zeros(shape)
        w[good] = 1.0 / np.sqrt(mi.variance[good].astype(np.float64))
        acc_i[good] += w[good] * mi.image[good]
        acc_v[good] += w[good] * mi.variance[good]
        acc_w += w
        arr = out_mask.conform(mi.mask)
        out_mask.array[good] |= arr[good]
    have = acc_w > 0
    img = np.full(shape, np.nan, dtype=np.float32)
    var = np.full(shape, np.inf, dtype=np.float32)
    img[have] = acc_i[have] / acc_w[have]
    var[have] = acc_v[have] / acc_w[have]
    out_mask.array[~have] = np.int32(1 << no_data_bit)
    out_mask.array[have] &= np.int32(~(1 << no_data_bit))
    return MaskedImage(img, out_mask, var, bbox.xy0)
