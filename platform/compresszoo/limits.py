"""Size limits for untrusted input, in one place: every decoder checks a declared size here
before it allocates anything. Each limit has a documented default and an environment
variable that raises (or lowers) it; a refused input raises LimitError naming both."""

from __future__ import annotations

import os
from dataclasses import dataclass


class LimitError(ValueError):
    """An input declares more than a configured limit allows."""


@dataclass(frozen=True)
class Limit:
    name: str
    env: str
    default: int
    what: str

    def value(self) -> int:
        raw = os.environ.get(self.env, "")
        if not raw:
            return self.default
        try:
            value = int(raw)
        except ValueError:
            raise LimitError(f"{self.env}={raw!r} is not an integer; unset it or give a number") from None
        if value <= 0:
            raise LimitError(f"{self.env}={raw!r} must be positive")
        return value

    def check(self, amount: int, source: str) -> int:
        """Return `amount` if it is within the limit, else raise LimitError naming the source."""
        limit = self.value()
        if amount > limit:
            raise LimitError(f"{source}: {self.what} {amount:,} exceeds the limit of {limit:,} "
                             f"(raise it with {self.env}=<n>)")
        return amount


# 8192 x 8192: four times a Vimeo90K-sized 4K frame and ~0.8 GB as float32 RGB.
MAX_PIXELS = Limit("max_pixels", "COMPRESSZOO_MAX_PIXELS", 8192 * 8192, "declared image pixels")
# The zoo's widest model has 320 channels; 1024 leaves room for tuned (N, M) sweeps.
MAX_CHANNELS = Limit("max_channels", "COMPRESSZOO_MAX_CHANNELS", 1024, "declared channel count")
# A .czoo header is tens of bytes; a manifest or a spec a few kB.
MAX_HEADER_BYTES = Limit("max_header_bytes", "COMPRESSZOO_MAX_HEADER_BYTES", 1 << 16, "header bytes")
# A saved reader position (resume cursor) is a few kB even for thousands of shards.
MAX_POSITION_BYTES = Limit("max_position_bytes", "COMPRESSZOO_MAX_POSITION_BYTES", 1 << 20,
                           "saved data position bytes")

ALL = (MAX_PIXELS, MAX_CHANNELS, MAX_HEADER_BYTES, MAX_POSITION_BYTES)
