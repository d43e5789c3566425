"""Test and simulation helpers: analytic spatially varying PSFs (:mod:`diffim.testing.psfs`)."""

from .psfs import AnalyticVaryingPsf, MoffatPsf, VaryingGaussianPsf, VaryingMoffatPsf, moffat_alpha

__all__ = ["AnalyticVaryingPsf", "VaryingGaussianPsf", "VaryingMoffatPsf", "MoffatPsf", "moffat_alpha"]
