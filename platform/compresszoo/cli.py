"""The `compresszoo` command: encode, decode and inspect .czoo files.

    compresszoo encode IMG -o FILE --model CKPT.safetensors
    compresszoo decode FILE -o IMG [--model CKPT.safetensors]   # default: found in the registry
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

from .imagefiles import (
    OUTPUT_FORMATS,
    InputError,
    output_format,
    read_pixels,
    save_image,
    to_tensor,
)

_MAX_MESSAGE = 1000

#: a refused command line or input: the image helpers' error, so one type is caught everywhere
CliError = InputError


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


def registry_name_of(header) -> str:
    """The registry name a file's model is published under (lambda is not part of it)."""
    from .models.registry import ModelSpec

    return ModelSpec(header.architecture, header.quality, header.metric, header.N, header.M, 0.0).registry_name


def _registered_weights_id(client, version, uri: str) -> str | None:
    """The weights id of a registered version: its MLmodel's compresszoo flavor (a small
    download), else, for versions from before MLmodel files, the verified weights' metadata.
    Only a hint for choosing the version: decoding recomputes the id of the weights it loads."""
    import tempfile

    import mlflow.artifacts
    import yaml

    from . import registry_client
    from .models.io import read_metadata

    with tempfile.TemporaryDirectory(prefix="compresszoo-find-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{version.source}/MLmodel",
                                                        dst_path=tmp, tracking_uri=uri)
            flavor = (yaml.safe_load(Path(local).read_text()) or {}).get("flavors", {}).get("compresszoo", {})
            if flavor.get("weights_id"):
                return str(flavor["weights_id"])
        except Exception:  # noqa: BLE001 - no MLmodel (an older version): read the weights below
            pass
    path = registry_client.download(f"{version.name}:{version.version}", uri)
    return read_metadata(path).get("weights_id")


def find_registered(header, tracking_uri: str | None = None) -> str:
    """NAME:VERSION of the registered version whose model wrote a file with `header`: the
    registry name follows from the architecture, metric, quality, N and M the file records,
    and the version from the weights fingerprint. Prefers the champion among equal weights."""
    from . import registry_client
    from .tracking import client as tracking_client
    from .tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri or "")
    name = registry_name_of(header)
    fix = "give --model (the checkpoint or registry reference used to encode)"
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):].split("?", 1)[0]):
        raise CliError(f"the file was encoded with {header.model_text()}, and there is no registry at {uri} "
                       f"to find it in; set MLFLOW_TRACKING_URI or {fix}")
    client = tracking_client(uri)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
        champion = None if not versions else client.get_registered_model(name).aliases.get(
            registry_client.CHAMPION)
    except Exception as e:
        raise registry_client.RegistryError(
            f"finding {name} for the file: the MLflow registry at {uri} is unreachable or failing "
            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); {fix}") from e
    found: dict[str, list[str]] = {}  # full weights id -> versions
    for v in versions:
        wid = _registered_weights_id(client, v, uri)
        if wid and wid[:len(header.weights_id)] == header.weights_id:
            found.setdefault(wid, []).append(str(v.version))
    if not found:
        raise CliError(f"no registered version of {name} in {uri} has the weights the file was encoded "
                       f"with ({header.model_text()}; {len(versions)} version(s) checked); {fix}")
    if len(found) > 1:
        listed = "; ".join(f"weights {w}: versions {', '.join(vs)}" for w, vs in sorted(found.items()))
        raise CliError(f"the file's weights fingerprint {header.weights_id} matches different weights in "
                       f"{name} ({listed}); give --model {name}:VERSION")
    (matches,) = found.values()
    chosen = str(champion) if str(champion) in matches else max(matches, key=int)
    return f"{name}:{chosen}"


def batch_outputs(out: Path, count: int) -> list[Path]:
    """The files a batched decode writes: out_0.png, out_1.png, ..."""
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def cmd_encode(args) -> int:
    from . import storage

    src, out = Path(args.input), Path(args.output)
    _check_output(out, [src, *_model_inputs(args.model)])
    pixels = read_pixels(src)  # before the (slow) model load: a bad image fails fast
    from .codec import encode_image

    x = to_tensor(pixels)
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
    fmt = output_format(out)
    data = _read_file(src)
    header = read_header(data)  # a foreign or corrupt file fails before the model loads
    outputs = batch_outputs(out, header.num_images) if header.batched else [out]
    ref = args.model
    for path in outputs:
        _check_output(path, [src, *_model_inputs(ref)] if ref else [src])
    if not ref:
        ref = find_registered(header)
        print(f"{args.input}: encoded with {header.model_text()}; using the registered {ref}")
    from .codec import decode_image

    model = _load_model(ref)
    x_hat = decode_image(data, model)
    images = x_hat if header.batched else x_hat[None]
    with contextlib.ExitStack() as stack:  # all renamed on success, all removed on failure
        staged = [stack.enter_context(storage.staged_file(os.path.abspath(p))) for p in outputs]
        for img, tmp in zip(images, staged):
            save_image(img, tmp, fmt)
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
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one-line output only
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
    dec.add_argument("--model", help="the checkpoint or registry name used to encode (default: the "
                     "registered version the file's model identity and weights fingerprint name, "
                     "looked up in MLFLOW_TRACKING_URI)")
    dec.set_defaults(fn=cmd_decode)
    info = sub.add_parser("info", help="describe a .czoo file (no model needed)")
    info.add_argument("input")
    info.set_defaults(fn=cmd_info)
    from .importer import add_import_parser  # torch, MLflow: only once the parser is built

    add_import_parser(sub)
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
