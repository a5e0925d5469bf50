"""The `compresszoo` command: encode, decode and inspect .czoo files.

    compresszoo encode IMG -o FILE --model CKPT.safetensors
    compresszoo decode FILE -o IMG --model CKPT.safetensors
    compresszoo info FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load_model(ref: str):
    from .models.io import load_weights

    path = Path(ref)
    if path.suffix == ".safetensors" or path.exists():
        return load_weights(path)
    from .registry_client import load_registered  # noqa: PLC0415 - registry is optional

    return load_registered(ref)


def _read_image(path: Path):
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise SystemExit(f"compresszoo: cannot read image {path}: {e}; give a PNG/JPEG file") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0


def _write_image(x, path: Path) -> None:
    import numpy as np
    from PIL import Image

    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    tmp.replace(path)


def cmd_encode(args) -> int:
    from .codec import encode_image

    model = _load_model(args.model)
    x = _read_image(Path(args.input))
    data = encode_image(model, x)
    out = Path(args.output)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    h, w = x.shape[-2:]
    print(f"{args.input} -> {out}: {len(data)} bytes, {8 * len(data) / (h * w):.4f} bpp")
    return 0


def cmd_decode(args) -> int:
    from .codec import decode_image

    model = _load_model(args.model)
    try:
        data = Path(args.input).read_bytes()
    except OSError as e:
        raise SystemExit(f"compresszoo: cannot read {args.input}: {e}") from None
    x_hat = decode_image(data, model)
    _write_image(x_hat, Path(args.output))
    print(f"{args.input} -> {args.output}: {x_hat.shape[-1]}x{x_hat.shape[-2]}")
    return 0


def cmd_info(args) -> int:
    from dataclasses import asdict

    from .codec.container import read_header

    data = Path(args.input).read_bytes()
    header = read_header(data)
    info = asdict(header)
    info["file_bytes"] = len(data)
    info["bpp"] = 8 * len(data) / (header.height * header.width * header.num_images)
    print(json.dumps(info, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="compresszoo", description="Learned image codecs of the CompressAI zoo.")
    sub = ap.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="compress an image to a .czoo file")
    enc.add_argument("input")
    enc.add_argument("-o", "--output", required=True)
    enc.add_argument("--model", required=True, help="a .safetensors checkpoint or a registry name")
    enc.set_defaults(fn=cmd_encode)
    dec = sub.add_parser("decode", help="decompress a .czoo file to an image")
    dec.add_argument("input")
    dec.add_argument("-o", "--output", required=True)
    dec.add_argument("--model", required=True, help="the checkpoint or registry name used to encode")
    dec.set_defaults(fn=cmd_decode)
    info = sub.add_parser("info", help="describe a .czoo file (no model needed)")
    info.add_argument("input")
    info.set_defaults(fn=cmd_info)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"compresszoo {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
