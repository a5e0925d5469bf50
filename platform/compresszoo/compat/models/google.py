"""`compressai.models.google`: Balle et al. 2018 and Minnen et al. 2018 (the zoo's four)."""

from ...models.architectures import (
    FactorizedPrior,
    JointAutoregressiveHierarchicalPriors,
    MeanScaleHyperprior,
    ScaleHyperprior,
)
from .base import SCALES_LEVELS, SCALES_MAX, SCALES_MIN, CompressionModel, get_scale_table

__all__ = [
    "SCALES_LEVELS", "SCALES_MAX", "SCALES_MIN", "CompressionModel", "FactorizedPrior",
    "JointAutoregressiveHierarchicalPriors", "MeanScaleHyperprior", "ScaleHyperprior",
    "get_scale_table",
]
