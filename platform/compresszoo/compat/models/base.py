"""`compressai.models.base`: the base class and the default scale table."""

from ...models.architectures import CompressionModel
from ...models.entropy import SCALES_LEVELS, SCALES_MAX, SCALES_MIN, get_scale_table

__all__ = ["SCALES_LEVELS", "SCALES_MAX", "SCALES_MIN", "CompressionModel", "get_scale_table"]
