"""`compressai.layers`: the layers compresszoo's four architectures are built from."""

from ..models.layers import GDN, MaskedConv2d

__all__ = ["GDN", "MaskedConv2d"]
