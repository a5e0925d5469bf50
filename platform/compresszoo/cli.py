"""The `compresszoo` command: encode, decode and inspect .czoo files.

    compresszoo encode IMG -o FILE --model CKPT.safetensors
    compresszoo decode FILE -o IMG --model CKPT.safetensors
    compresszoo info FILE

Inputs may be hostile. Every failure is one line on stderr and a non-zero exit (2 for a
refused input, 1 for an internal error), never a traceback; outputs are written atomically
(storage.write_bytes / staged_file), so a failed command leaves nothing behind; a command
never writes over one of its inputs. Images are checked against limits.MAX_PIXELS from
their header before their pixels are decoded. 16-bit PNGs (gray or color) are encoded from
all 16 bits and float images from their [0, 1] values; gray is replicated to RGB.
A batched file (written by encode_image from an (N, 3, H, W) tensor) decodes to one image
per entry: `-o out.png` writes out_0.png, out_1.png, ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
from pathlib import Path

#: decode output formats by file extension (no extension: PNG)
OUTPUT_FORMATS = {"": "PNG", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP",
                  ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_MESSAGE = 1000


class CliError(ValueError):
    """A refused command line or input; the message says what to do instead."""


def one_line(text: str, limit: int = _MAX_MESSAGE) -> str:
    """`text` with every non-printable character escaped, so it is one safe terminal line."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


def _is_same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # also catches hard links and symlinks
    return os.path.realpath(a) == os.path.realpath(b)


def _check_output(out: Path, inputs: list[Path]) -> None:
    """Refuse an output that is a folder, has no folder, or is one of the inputs."""
    if out.is_dir():
        raise CliError(f"output {out} is a directory; give a file name inside it")
    if not out.absolute().parent.is_dir():
        raise CliError(f"the folder of output {out} does not exist; create it first")
    for src in inputs:
        if _is_same_file(out, src):
            raise CliError(f"output {out} is the input {src}; give another output name "
                           "(compresszoo never writes over its input)")


def _model_inputs(ref: str) -> list[Path]:
    path = Path(ref)
    return [path] if path.exists() else []


def _read_file(path: Path) -> bytes:
    """A regular file's bytes (a FIFO or a device such as /dev/zero could block or never end)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CliError(f"{path} is not a regular file; give a .czoo file")
        return path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"cannot read {path}: no such file") from None


def _load_model(ref: str):
    from .models.io import load_weights

    path = Path(ref)
    if path.suffix == ".safetensors" or path.exists():
        return load_weights(path)
    from .registry_client import load_registered  # noqa: PLC0415 - registry is optional

    return load_registered(ref)


def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(29)
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and len(head) == 29:
        return head[24]
    return None


def _pixels(im, path: Path):
    """(H, W, C) float array in [0, 1] from an opened image, converting every supported mode."""
    import numpy as np

    mode = im.mode
    if im.format == "PNG" and _png_bit_depth(path) == 16:
        import imagecodecs  # Pillow cuts 16-bit color PNGs to 8 bits; libpng keeps all 16

        arr = imagecodecs.png_decode(path.read_bytes())
        if arr.dtype != np.uint16 or arr.shape[:2] != (im.height, im.width):
            raise CliError(f"{path}: the 16-bit PNG decodes to {arr.dtype} {arr.shape}, "
                           f"not its header's {im.width}x{im.height}")
        arr = arr[..., None] if arr.ndim == 2 else arr
        return arr[..., :1 if arr.shape[-1] < 3 else 3].astype(np.float32) / 65535.0  # drop alpha
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32)[..., None] / 65535.0
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise CliError(f"{path} is a float image with values outside [0, 1] (or NaN/inf); "
                           "rescale it to [0, 1] or save it as an 8- or 16-bit image")
        return arr[..., None]
    if mode == "I":
        raise CliError(f"{path} is a 32-bit integer image; save it as an 8- or 16-bit image")
    if any(";16" in str(t[3]) for t in im.tile):  # t[3]: the decoder args, raw mode first
        raise CliError(f"{path}: 16-bit-per-channel color {im.format} images are not supported "
                       "(Pillow would cut them to 8 bits); save it as a 16-bit PNG")
    return np.asarray(im.convert("RGB")).astype(np.float32) / 255.0


def _read_image(path: Path):
    """(H, W, 1 or 3) float array in [0, 1]; the size is checked from the header before decoding."""
    from PIL import Image

    from . import limits
    from .codec.container import check_pixels

    if not path.is_file():
        raise CliError(f"cannot read image {path}: no such file; give a PNG/JPEG file")
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # limits.MAX_PIXELS decides below, with its env variable
    try:
        with Image.open(path) as im:
            check_pixels(im.height, im.width, 1, f"image {path}")
            rgb = _pixels(im, path)
    except (CliError, limits.LimitError):
        raise
    except Image.DecompressionBombError as e:
        raise limits.LimitError(f"image {path} is too large ({e}); raise COMPRESSZOO_MAX_PIXELS") from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many types for malformed files
        raise CliError(f"cannot read image {path}: {type(e).__name__}: {e}; give a PNG/JPEG file") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    return rgb


def _as_tensor(pixels):
    import torch  # imported only once the cheap checks have passed: it takes seconds

    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x  # gray -> RGB


def _output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CliError(f"unsupported output extension {path.suffix!r} for {path}; use one of "
                       f"{', '.join(sorted(k for k in OUTPUT_FORMATS if k))}")
    return fmt


def _save_image(x, path: str, fmt: str) -> None:
    import numpy as np
    from PIL import Image

    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def batch_outputs(out: Path, count: int) -> list[Path]:
    """The files a batched decode writes: out_0.png, out_1.png, ..."""
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def cmd_encode(args) -> int:
    from . import storage

    src, out = Path(args.input), Path(args.output)
    _check_output(out, [src, *_model_inputs(args.model)])
    pixels = _read_image(src)  # before the (slow) model load: a bad image fails fast
    from .codec import encode_image

    x = _as_tensor(pixels)
    model = _load_model(args.model)
    data = encode_image(model, x)
    storage.write_bytes(os.path.abspath(out), data)  # absolute: a local path, never a URI
    h, w = x.shape[-2:]
    print(f"{args.input} -> {out}: {len(data)} bytes, {8 * len(data) / (h * w):.4f} bpp")
    return 0


def cmd_decode(args) -> int:
    from . import storage
    from .codec.container import read_header

    src, out = Path(args.input), Path(args.output)
    fmt = _output_format(out)
    data = _read_file(src)
    header = read_header(data)  # a foreign or corrupt file fails before the model loads
    outputs = batch_outputs(out, header.num_images) if header.batched else [out]
    for path in outputs:
        _check_output(path, [src, *_model_inputs(args.model)])
    from .codec import decode_image

    model = _load_model(args.model)
    x_hat = decode_image(data, model)
    images = x_hat if header.batched else x_hat[None]
    with contextlib.ExitStack() as stack:  # all renamed on success, all removed on failure
        staged = [stack.enter_context(storage.staged_file(os.path.abspath(p))) for p in outputs]
        for img, tmp in zip(images, staged):
            _save_image(img, tmp, fmt)
    names = str(outputs[0]) if len(outputs) == 1 else f"{outputs[0]} .. {outputs[-1]}"
    print(f"{args.input} -> {names}: {len(outputs)} image(s) of {x_hat.shape[-1]}x{x_hat.shape[-2]}")
    return 0


def cmd_info(args) -> int:
    from dataclasses import asdict

    from .codec.container import read_header

    data = _read_file(Path(args.input))
    header = read_header(data)
    info = asdict(header)
    info["file_bytes"] = len(data)
    info["payload_bytes"] = sum(map(sum, header.stream_lengths))
    pixels = header.height * header.width * header.num_images
    info["bpp"] = 8 * len(data) / pixels if pixels else None
    print(json.dumps(info, indent=2))  # ensure_ascii: header text is escaped
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"{self.prog}: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="compresszoo", description="Learned image codecs of the CompressAI zoo.")
    sub = ap.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="compress an image to a .czoo file")
    enc.add_argument("input")
    enc.add_argument("-o", "--output", required=True)
    enc.add_argument("--model", required=True, help="a .safetensors checkpoint or a registry name")
    enc.set_defaults(fn=cmd_encode)
    dec = sub.add_parser("decode", help="decompress a .czoo file to an image (batched: one per image)")
    dec.add_argument("input")
    dec.add_argument("-o", "--output", required=True,
                     help=f"the image to write ({', '.join(sorted(k for k in OUTPUT_FORMATS if k))}); "
                          "a batched file writes NAME_0.EXT, NAME_1.EXT, ...")
    dec.add_argument("--model", required=True, help="the checkpoint or registry name used to encode")
    dec.set_defaults(fn=cmd_decode)
    info = sub.add_parser("info", help="describe a .czoo file (no model needed)")
    info.add_argument("input")
    info.set_defaults(fn=cmd_info)
    args = ap.parse_args(argv)
    prefix = f"compresszoo {args.command}"
    try:
        return args.fn(args)
    # ValueError covers ContainerError, LimitError and CliError; RuntimeError the registry's
    # RegistryError and a checkpoint whose tensors do not fit its model.
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        print(f"{prefix}: {one_line(str(e))}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prefix}: out of memory; lower COMPRESSZOO_MAX_PIXELS or use a machine with more memory",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug must still not print a traceback of hostile input
        print(f"{prefix}: internal error {type(e).__name__}: {one_line(str(e))}; please report it",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
