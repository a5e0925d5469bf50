"""`compressai.ops`: the bound, the non-negative parametrizer and the straight-through round."""

from __future__ import annotations

from torch import Tensor

from ..models.layers import LowerBound, NonNegativeParametrizer

__all__ = ["LowerBound", "NonNegativeParametrizer", "quantize_ste"]


def quantize_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity gradient backward (straight-through estimator)."""
    return (x.round() - x).detach() + x
