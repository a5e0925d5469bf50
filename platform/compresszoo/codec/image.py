"""Images <-> .czoo bytes with a zoo model: padding, batching, model identity checks.

Decoding checks everything a file declares against the model (identity, latent shape,
streams per image) after the container has checked types and limits, so nothing is
allocated from a size the file alone decided.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.io import weights_id
from ..models.registry import spec_of
from .container import (
    PAD_MULTIPLE,
    ContainerError,
    Header,
    check_pixels,
    file_order,
    pack,
    streams_per_image,
    unpack,
)


def _as_batch(image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a float tensor in [0, 1], got {type(image).__name__}")
    if image.dim() == 3:
        image, batched = image[None], False
    elif image.dim() == 4:
        batched = True
    else:
        raise ValueError(f"image must have shape (3, H, W) or (N, 3, H, W), got {tuple(image.shape)}")
    if image.shape[1] != 3:
        raise ValueError(f"image must have 3 (RGB) channels, got {image.shape[1]}; convert it to RGB first")
    if not image.is_floating_point():
        raise ValueError(f"image must be float in [0, 1], got {image.dtype}; divide uint8 images by 255")
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}; give at least one image of at least 1x1 pixels")
    # A file the decoder would refuse must not be written.
    check_pixels(int(image.shape[2]), int(image.shape[3]), int(image.shape[0]), "image to encode")
    return image.float(), batched


def pad(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Replicate-pad right/bottom to a multiple of the model's total stride."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def encode_image(model, image: torch.Tensor, *, order: str = "wavefront") -> bytes:
    """Compress an image (3, H, W) or batch (N, 3, H, W) in [0, 1] to container bytes.

    order: mbt2018's y stream order, "wavefront" (fast, the default) or "raster"
    (CompressAI's order, slow like CompressAI); the file records it. The other architectures
    have no context model: both orders are the same streams, and the file says wavefront."""
    return encode_with_latents(model, image, order=order)[0]


def _order_kw(order: str) -> dict:
    """The order keyword for compress/decompress, given only when it is not the default, so
    models (and subclasses) whose methods predate it still code wavefront files."""
    return {} if order == "wavefront" else {"order": order}


def encode_with_latents(model, image: torch.Tensor, *, order: str = "wavefront") -> tuple[bytes, torch.Tensor]:
    """Container bytes plus the encoder-side quantized latents (for exactness checks)."""
    order = file_order(spec_of(model).architecture, order)
    x, batched = _as_batch(image)
    # One image at a time: an image's bytes must not depend on what it was batched with.
    # The portable path: the entropy parameters are exact, so the file decodes anywhere.
    parts = [model.compress(pad(x[i:i + 1]), return_latents=True, portable=True, **_order_kw(order))
             for i in range(x.shape[0])]
    out = {"strings": [[s for p in parts for s in p["strings"][j]] for j in range(len(parts[0]["strings"]))],
           "shape": parts[0]["shape"]}
    return _pack(model, x, batched, out, order), torch.cat([p["y_hat"] for p in parts])


def _pack(model, x: torch.Tensor, batched: bool, out: dict, order: str) -> bytes:
    spec = spec_of(model)
    streams = [[out["strings"][j][i] for j in range(len(out["strings"]))] for i in range(x.shape[0])]
    header = Header(spec.architecture, spec.metric, spec.quality, spec.N, spec.M, weights_id(model),
                    int(x.shape[-2]), int(x.shape[-1]), batched, [int(s) for s in out["shape"]],
                    [[len(s) for s in img] for img in streams], version=2, portable=True, order=order)
    return pack(header, streams)


def check_model(header: Header, model) -> None:
    """Refuse a model other than the encoder's: spec, and the weights id (a format-2 file
    keeps its first 8 hex digits as a fingerprint)."""
    spec = spec_of(model)
    wid = weights_id(model)
    mine = Header(spec.architecture, spec.metric, spec.quality, spec.N, spec.M,
                  wid[:len(header.weights_id)], 1, 1, False, [], [])
    if mine.model_text() != header.model_text():
        mine.weights_id = wid
        raise ContainerError(f"this file was encoded with {header.model_text()}, "
                             f"but the decoder was given {mine.model_text()}; decode with the same model")


def decode_streams(data: bytes, model) -> tuple[Header, dict]:
    header, streams = unpack(data)  # types, ranges, sizes and limits checked here
    check_model(header, model)
    expected = [-(-n // PAD_MULTIPLE) * PAD_MULTIPLE // model.downsampling_factor
                for n in (header.height, header.width)]
    if list(header.latent_shape) != expected:
        raise ContainerError(f"corrupted file: latent shape {header.latent_shape} does not match "
                             f"a {header.height}x{header.width} image (expected {expected})")
    want = streams_per_image(spec_of(model).architecture)
    if len(streams[0]) != want:
        raise ContainerError(f"corrupted file: {len(streams[0])} stream(s) per image, but "
                             f"{header.architecture} writes {want}")
    strings = [[img[j] for img in streams] for j in range(want)]
    try:
        out = model.decompress(strings, torch.Size(header.latent_shape), portable=header.portable,
                               **_order_kw(header.order))
    except ValueError as e:
        raise ContainerError(f"corrupted file: the streams do not decode ({e})") from None
    return header, out


def decode_image(data: bytes, model) -> torch.Tensor:
    """Container bytes -> image (3, H, W) or batch (N, 3, H, W), as encoded."""
    header, out = decode_streams(data, model)
    x_hat = out["x_hat"][..., : header.height, : header.width]
    return x_hat if header.batched else x_hat[0]
