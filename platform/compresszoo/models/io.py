"""Model weights on disk: safetensors plus the zoo spec as metadata (no pickled code).

Loading never unpickles: a checkpoint from anywhere cannot run code on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .registry import ModelSpec, build, spec_of

FORMAT = "compresszoo.weights/1"
WEIGHTS_FILE = "model.safetensors"  # the weights inside a checkpoint folder or a registry version


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
    """Build the model named in the file's metadata and load its weights (strict)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; give a .safetensors file written by compresszoo")
    try:
        meta = read_metadata(path)
        spec = ModelSpec(**json.loads(meta["spec"]))
    except Exception as e:  # noqa: BLE001 - any parse failure means "not our file"
        raise ValueError(f"{path} is not a compresszoo weights file ({e}); "
                         "expected a .safetensors file saved by compresszoo") from None
    model = build(spec)
    model.load_state_dict(load_file(str(path), device=map_location), strict=True)
    return model.eval()
