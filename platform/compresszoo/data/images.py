"""Decode one encoded frame into an RGB array, or say precisely why it cannot be used.

Decoding dominates the cost of a training crop. Shards store frames as QOI by default
(lossless; a 448x256 Vimeo frame decodes in ~0.8 ms against ~2.8 ms for libspng and ~4.4 ms
for Pillow on its PNG), through `imagecodecs`. For PNG, libspng (imagecodecs) is used when
present and Pillow otherwise; tests check both give the same pixels. Choose with
COMPRESSZOO_PNG_DECODER=auto|spng|pillow (auto: spng when installed). torchvision's
decode_png is not used: its libpng error handler ends the whole process on some corrupt
IDAT streams, and a Ray worker that dies on bad data is worse than a slow one.

Every decoder reads the declared size first (the PNG IHDR, the QOI header, Pillow's lazy
size) and refuses more than limits.MAX_PIXELS (COMPRESSZOO_MAX_PIXELS) before it allocates.
"""

from __future__ import annotations

import functools
import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from compresszoo.limits import MAX_PIXELS, LimitError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QOI_MAGIC = b"qoif"
_QOI_HEADER = 14
_QOI_END = b"\x00" * 7 + b"\x01"
_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}


class BadImage(ValueError):
    """A frame that is not usable; `kind` is 'unreadable' or 'not_rgb'."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


class ImageTooLarge(BadImage, LimitError):
    """A frame whose declared size exceeds limits.MAX_PIXELS: a BadImage ('unreadable', so the
    sharder and the reader skip and count it) that is also a LimitError."""

    def __init__(self, reason: str):
        super().__init__("unreadable", reason)


def _check_pixels(width: int, height: int, what: str) -> None:
    """Refuse a declared size over the pixel limit, before anything is decoded."""
    try:
        MAX_PIXELS.check(width * height, f"{what} of {width}x{height}")
    except LimitError as e:
        raise ImageTooLarge(str(e)) from None


@functools.cache
def png_decoder() -> str:
    """'spng' or 'pillow': the PNG decoder this process uses."""
    choice = os.environ.get("COMPRESSZOO_PNG_DECODER", "auto")
    if choice not in ("auto", "spng", "pillow"):
        raise ValueError(f"COMPRESSZOO_PNG_DECODER={choice!r}; expected auto, spng or pillow")
    if choice == "pillow":
        return "pillow"
    try:
        import imagecodecs

        imagecodecs.spng_decode  # noqa: B018  (a build without libspng lacks it)
        return "spng"
    except (ImportError, AttributeError):
        if choice == "spng":
            raise ImportError(
                "COMPRESSZOO_PNG_DECODER=spng needs the imagecodecs package: pip install imagecodecs"
            ) from None
        return "pillow"


def decode_rgb(data: bytes, decoder: str | None = None) -> np.ndarray:
    """Decode encoded image bytes into an (H, W, 3) uint8 array; raise BadImage otherwise.

    A PNG must be 8-bit truecolor and a QOI image 3-channel (decided from the header, so
    every decoder agrees); other formats go through Pillow and must decode to mode RGB.
    """
    if data[:4] == QOI_MAGIC:
        return _decode_qoi(data)
    decoder = decoder or png_decoder()
    if data[:8] == PNG_SIGNATURE and len(data) >= 29 and data[12:16] == b"IHDR":
        depth, color = data[24], data[25]
        if (depth, color) != (8, 2):
            raise BadImage("not_rgb", f"PNG {_COLOR_TYPES.get(color, color)} {depth}-bit, expected 8-bit RGB")
        _check_pixels(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), "PNG")
        if decoder == "spng":
            return _decode_spng(data)
    return _decode_pillow(data)


def _decode_spng(data: bytes) -> np.ndarray:
    import imagecodecs

    try:
        img = imagecodecs.spng_decode(data)
    except Exception as e:  # SpngError and friends on corrupt data
        raise BadImage("unreadable", f"{type(e).__name__}: {e}") from None
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise BadImage("not_rgb", f"decoded to {img.shape} {img.dtype}, expected (H, W, 3) uint8")
    return img


def _decode_pillow(data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_pixels(*im.size, f"{im.format or 'image'}")  # the size is parsed lazily: nothing decoded yet
            im.load()
            if im.mode != "RGB":
                raise BadImage("not_rgb", f"mode {im.mode}, expected RGB")
            return np.asarray(im)
    except BadImage:  # ImageTooLarge included
        raise
    except Image.DecompressionBombError as e:  # Pillow's own cap, met only if ours was raised past it
        raise ImageTooLarge(f"{e} (Pillow's limit, PIL.Image.MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:  # its message names a memory address: not reproducible
        raise BadImage("unreadable", "not a recognized image format") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad data
        raise BadImage("unreadable", f"{type(e).__name__}: {e}") from None


def _imagecodecs(what: str):
    try:
        import imagecodecs
    except ImportError:
        raise ImportError(
            f"{what} needs the imagecodecs package: pip install imagecodecs "
            "(or shard with --codec png to store the source PNG bytes)"
        ) from None
    return imagecodecs


def _decode_qoi(data: bytes) -> np.ndarray:
    if len(data) < _QOI_HEADER:
        raise BadImage("unreadable", f"QOI data of {len(data)} bytes is shorter than its header")
    width, height = int.from_bytes(data[4:8], "big"), int.from_bytes(data[8:12], "big")
    if data[12] != 3:
        raise BadImage("not_rgb", f"QOI with {data[12]} channels, expected 3 (RGB)")
    _check_pixels(width, height, "QOI")
    if not data.endswith(_QOI_END):  # the decoder itself fills a truncated stream silently
        raise BadImage("unreadable", "QOI data is truncated (no end marker)")
    codecs = _imagecodecs("decoding a QOI frame")
    try:
        img = codecs.qoi_decode(data)
    except Exception as e:  # QoiError on malformed data
        raise BadImage("unreadable", f"{type(e).__name__}: {e}") from None
    if img.shape != (height, width, 3) or img.dtype != np.uint8:
        raise BadImage("unreadable", f"QOI decoded to {img.shape} {img.dtype}, header says {width}x{height} RGB")
    return img


def encode_qoi(img: np.ndarray) -> bytes:
    """Lossless QOI bytes of an (H, W, 3) uint8 image, checked by decoding them back."""
    codecs = _imagecodecs("storing frames as QOI")
    data = bytes(codecs.qoi_encode(np.ascontiguousarray(img)))
    if not np.array_equal(_decode_qoi(data), img):
        raise RuntimeError("QOI round trip changed the pixels: imagecodecs' QOI codec is broken here; "
                           "shard with --codec png")
    return data
