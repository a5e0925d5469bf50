"""Format-1 .czoo files as compresszoo wrote them before format 2: a JSON header and the
float-path streams. Tests use them to check that old files keep decoding."""

from __future__ import annotations

import torch

from compresszoo.codec.container import Header, pack
from compresszoo.codec.image import pad
from compresszoo.models.io import weights_id
from compresszoo.models.registry import spec_of


def encode_v1(model, image: torch.Tensor) -> bytes:
    """One image (3, H, W) in [0, 1] -> a format-1 file (float entropy parameters)."""
    out = model.compress(pad(image[None].float()), portable=False)
    streams = [[s[0] for s in out["strings"]]]
    spec = spec_of(model)
    header = Header(spec.architecture, spec.metric, spec.quality, spec.N, spec.M, weights_id(model),
                    int(image.shape[-2]), int(image.shape[-1]), False, [int(n) for n in out["shape"]],
                    [[len(s) for s in streams[0]]], version=1, portable=False)
    return pack(header, streams)
