"""`compressai.entropy_models`: compresszoo's entropy models, which carry CompressAI's names.

Gaussian mixtures and the variable-rate models are not part of compresszoo.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.entropy import EntropyBottleneck, EntropyModel, GaussianConditional
from ..models.entropy import pmf_to_quantized_cdf as _pmf_to_quantized_cdf

__all__ = ["EntropyBottleneck", "EntropyModel", "GaussianConditional", "pmf_to_quantized_cdf"]


def pmf_to_quantized_cdf(pmf: Tensor, precision: int = 16) -> Tensor:
    """CompressAI's tensor form: an int32 tensor holding the quantized CDF of `pmf`."""
    return torch.tensor(_pmf_to_quantized_cdf(pmf.tolist(), precision), dtype=torch.int32)
