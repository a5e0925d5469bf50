"""`compressai.losses`: the rate-distortion loss, CompressAI's arguments and defaults."""

from ..models.loss import RateDistortionLoss

__all__ = ["RateDistortionLoss"]
