"""`compressai.models`: the four architectures compresszoo provides, under CompressAI's names."""

from .base import SCALES_LEVELS, SCALES_MAX, SCALES_MIN, CompressionModel, get_scale_table
from .google import (
    FactorizedPrior,
    JointAutoregressiveHierarchicalPriors,
    MeanScaleHyperprior,
    ScaleHyperprior,
)

__all__ = [
    "SCALES_LEVELS", "SCALES_MAX", "SCALES_MIN", "CompressionModel", "FactorizedPrior",
    "JointAutoregressiveHierarchicalPriors", "MeanScaleHyperprior", "ScaleHyperprior",
    "get_scale_table",
]
