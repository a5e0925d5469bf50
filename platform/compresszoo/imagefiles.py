"""Image files <-> the float tensors the codec takes: one reader and one writer for the CLI,
the servers and user code.

    from compresszoo import read_image, write_image
    x = read_image("photo.png")            # (3, H, W) float32 in [0, 1], what encode_image takes
    write_image(decode_image(data, model), "out.png")

Files may be hostile: the size is checked against limits.MAX_PIXELS from the header before
the pixels are decoded, and every failure is an InputError (a ValueError) or a
limits.LimitError naming the file and the fix. 16-bit PNGs (gray or color) are read from all
16 bits and float images from their [0, 1] values; gray is replicated to RGB, alpha dropped.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

#: image formats written, by file extension (no extension: PNG)
OUTPUT_FORMATS = {"": "PNG", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP",
                  ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

Source = str | os.PathLike | bytes


class InputError(ValueError):
    """A refused input (file, image, command line); the message names it and what to do instead."""


def _head(source: Source, n: int) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:n])
    with open(source, "rb") as f:
        return f.read(n)


def _png_bit_depth(source: Source) -> int | None:
    head = _head(source, 29)
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and len(head) == 29:
        return head[24]
    return None


def _pixels(im, source: Source, what: str):
    """(H, W, C) float array in [0, 1] from an opened image, converting every supported mode."""
    import numpy as np

    mode = im.mode
    if im.format == "PNG" and _png_bit_depth(source) == 16:
        import imagecodecs  # Pillow cuts 16-bit color PNGs to 8 bits; libpng keeps all 16

        data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
        arr = imagecodecs.png_decode(data)
        if arr.dtype != np.uint16 or arr.shape[:2] != (im.height, im.width):
            raise InputError(f"{what}: the 16-bit PNG decodes to {arr.dtype} {arr.shape}, "
                             f"not its header's {im.width}x{im.height}")
        arr = arr[..., None] if arr.ndim == 2 else arr
        return arr[..., :1 if arr.shape[-1] < 3 else 3].astype(np.float32) / 65535.0  # drop alpha
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32)[..., None] / 65535.0
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise InputError(f"{what} is a float image with values outside [0, 1] (or NaN/inf); "
                             "rescale it to [0, 1] or save it as an 8- or 16-bit image")
        return arr[..., None]
    if mode == "I":
        raise InputError(f"{what} is a 32-bit integer image; save it as an 8- or 16-bit image")
    if any(";16" in str(t[3]) for t in im.tile):  # t[3]: the decoder args, raw mode first
        raise InputError(f"{what}: 16-bit-per-channel color {im.format} images are not supported "
                         "(Pillow would cut them to 8 bits); save it as a 16-bit PNG")
    return np.asarray(im.convert("RGB")).astype(np.float32) / 255.0


def read_pixels(source: Source, what: str | None = None):
    """(H, W, 1 or 3) float32 array in [0, 1] from an image file (a path, or the file's bytes);
    the size is checked from the header before decoding. Cheap: torch is not imported."""
    from PIL import Image

    from . import limits
    from .codec.container import check_pixels

    is_bytes = isinstance(source, (bytes, bytearray))
    what = what or ("image" if is_bytes else f"image {source}")
    if not is_bytes and not Path(source).is_file():
        raise InputError(f"cannot read {what}: no such file; give a PNG/JPEG file")
    opened = io.BytesIO(bytes(source)) if is_bytes else source
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # limits.MAX_PIXELS decides below, with its env variable
    try:
        with Image.open(opened) as im:
            check_pixels(im.height, im.width, 1, what)
            return _pixels(im, source, what)
    except (InputError, limits.LimitError):
        raise
    except Image.DecompressionBombError as e:
        raise limits.LimitError(f"{what} is too large ({e}); raise COMPRESSZOO_MAX_PIXELS") from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many types for malformed files
        detail = str(e).replace(f" {opened!r}", "")  # not Pillow's <_io.BytesIO object at 0x...>
        raise InputError(f"cannot read {what}: {type(e).__name__}: {detail}; give a PNG/JPEG file") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_tensor(pixels):
    """(H, W, 1 or 3) array -> (3, H, W) float tensor (gray replicated to RGB)."""
    import torch  # imported only once the cheap checks have passed: it takes seconds

    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def read_image(source: Source):
    """An image file (path or bytes) -> (3, H, W) float32 tensor in [0, 1], the shape
    encode_image takes for one image (torch.stack several for a batched file)."""
    return to_tensor(read_pixels(source))


def output_format(path: str | os.PathLike) -> str:
    """The image format written for `path`'s extension (PNG without one)."""
    suffix = Path(path).suffix
    fmt = OUTPUT_FORMATS.get(suffix.lower())
    if fmt is None:
        raise InputError(f"unsupported output extension {suffix!r} for {path}; use one of "
                         f"{', '.join(sorted(k for k in OUTPUT_FORMATS if k))}")
    return fmt


def save_image(x, dest, fmt: str) -> None:
    """Write a (3, H, W) tensor, clamped to [0, 1] and rounded to 8 bits, to a path or a
    binary file object in `fmt` (a Pillow format name)."""
    import numpy as np
    from PIL import Image

    arr = (x.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(arr).save(dest, format=fmt)


def image_bytes(x, fmt: str = "PNG") -> bytes:
    """A (3, H, W) tensor as the bytes of an image file (PNG by default)."""
    buf = io.BytesIO()
    save_image(x, buf, fmt)
    return buf.getvalue()


def write_image(x, path: str | os.PathLike) -> None:
    """Write one decoded image (3, H, W), or (1, 3, H, W), atomically to `path`; the format
    follows the extension (.png, .jpg, .bmp, .tif, .ppm; none: PNG), 8 bits per channel."""
    from . import storage

    fmt = output_format(path)
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise InputError(f"write_image takes one RGB image (3, H, W), got shape {tuple(x.shape)}; "
                         "write a batch one image at a time")
    with storage.staged_file(os.path.abspath(path)) as tmp:  # absolute: a local path, never a URI
        save_image(x, tmp, fmt)
