"""Model weights on disk: safetensors plus the zoo spec as metadata (no pickled code).

Loading never unpickles: a checkpoint from anywhere cannot run code on load. Nor does it
allocate from what the file declares: the spec is checked against the registry (and
limits.MAX_CHANNELS) and every tensor name and shape in the file's header against the model
that spec builds, on the meta device, before the model is built for real or a byte is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ..limits import MAX_HEADER_BYTES, LimitError
from .registry import build, spec_from_dict, spec_of

FORMAT = "compresszoo.weights/1"
WEIGHTS_FILE = "model.safetensors"  # the weights inside a checkpoint folder or a registry version
# Keys of checkpoints from before EntropyBottleneck used ParameterLists (see entropy.py).
_LEGACY = re.compile(r"(^|\.)_(matrix|bias|factor)(\d+)$")
_LEGACY_NEW = {"matrix": "matrices", "bias": "biases", "factor": "factors"}


class WeightsError(ValueError):
    """A weights file that is not a valid compresszoo checkpoint; the message names the file."""


class WeightsLimitError(WeightsError, LimitError):
    """A weights file whose spec declares more than a configured limit allows."""


def weights_id(model: torch.nn.Module) -> str:
    """A short content hash of every parameter and buffer (CDF tables included)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_weights(model: torch.nn.Module, path: str | os.PathLike, extra: dict | None = None) -> str:
    """Write model weights atomically (tmp file + rename); returns the weights id."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wid = weights_id(model)
    meta = {"format": FORMAT, "spec": json.dumps(spec_of(model).to_dict()), "weights_id": wid}
    if extra:
        meta["extra"] = json.dumps(extra)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from ..storage import staged_file

    with staged_file(path) as tmp:  # a unique temporary name, renamed over the target
        save_file(tensors, tmp, metadata=meta)
    return wid


def read_metadata(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights(path: str | os.PathLike, map_location: str = "cpu") -> torch.nn.Module:
    """Build the model named in the file's metadata and load its weights (strict).

    Raises WeightsError naming the file for anything that is not a compresszoo checkpoint
    of a registered architecture with the shapes its spec implies.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; give a .safetensors file written by compresszoo")
    hint = "expected a .safetensors file saved by compresszoo"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: not a safetensors file
        raise WeightsError(f"{path} is not a compresszoo weights file ({type(e).__name__}: {e}); {hint}") from None
    text = meta.get("spec")
    if not isinstance(text, str):
        raise WeightsError(f"{path} is not a compresszoo weights file (no 'spec' in its metadata); {hint}")
    try:
        MAX_HEADER_BYTES.check(len(text.encode()), f"{path}: spec metadata")
        spec = spec_from_dict(json.loads(text))
    except LimitError as e:
        raise WeightsLimitError(f"{path}: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise WeightsError(f"{path}: invalid model spec in its metadata ({e}); {hint}") from None
    _check_tensors(path, spec, shapes)
    model = build(spec)
    try:
        model.load_state_dict(load_file(str(path), device=map_location), strict=True)
    except RuntimeError as e:  # whatever the header check cannot see; one line, not a traceback
        raise WeightsError(f"{path}: weights do not fit {spec.registry_name}: {str(e).splitlines()[0]}") from None
    return model.eval()


def _check_tensors(path: Path, spec, found: dict) -> None:
    """Compare tensor names and shapes in the file header with the model the spec builds.

    dtypes are not compared: load_state_dict converts them, within the file's own size.
    """
    with torch.device("meta"):  # shapes only: no memory, whatever N and M are
        model = build(spec)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    # Entropy-model buffers sized by update() (CDF tables, scale table) take the file's size.
    resizable = {f"{prefix}.{name}".lstrip(".") for prefix, module in model.named_modules()
                 for name in getattr(module, "_resizable_buffers", ())}
    found = {_LEGACY.sub(lambda m: f"{m[1]}{_LEGACY_NEW[m[2]]}.{m[3]}", k): v for k, v in found.items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise WeightsError(
            f"{path}: tensors do not match {spec.registry_name}: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}; the file's spec does not describe its weights"
        )
    for key, shape in expected.items():
        got_shape = found[key]
        if key in resizable:  # bounded by the file's own size
            if len(got_shape) > 2:
                raise WeightsError(f"{path}: tensor {key} has {len(got_shape)} dimensions; a CDF table has at most 2")
            continue
        if got_shape != shape:
            raise WeightsError(
                f"{path}: tensor {key} has shape {list(got_shape)}, {spec.registry_name} needs {list(shape)}"
            )


def _few(keys: list[str]) -> str:
    return "none" if not keys else ", ".join(repr(k) for k in keys[:5]) + (f" (+{len(keys) - 5})" if len(keys) > 5 else "")
