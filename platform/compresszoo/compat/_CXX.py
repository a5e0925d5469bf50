"""`compressai._CXX.pmf_to_quantized_cdf`: lists in, list out, as CompressAI's C++ binding."""

from __future__ import annotations

from ..models.entropy import pmf_to_quantized_cdf as _pmf_to_quantized_cdf

__all__ = ["pmf_to_quantized_cdf"]


def pmf_to_quantized_cdf(pmf, precision: int = 16) -> list[int]:
    """The quantized CDF of `pmf` (a sequence of floats, last entry the tail mass) as a list."""
    return _pmf_to_quantized_cdf(pmf, precision).tolist()
