"""The python_function flavor of a registered version: MLflow imports this module to load it.

`_load_pyfunc(path)` receives the version's folder (MLmodel next to model.safetensors),
checks the weights against the sha256 that its MLmodel's compresszoo flavor records and
loads them without unpickling. predict() takes a DataFrame whose `data` column holds image
files (PNG, JPEG, ...) and returns their .czoo bytes, or with params={"mode": "decode"}
takes .czoo files and returns PNGs. Requests are read with the CLI's readers and limits, so
a hostile image or file is refused (ServingInputError: a ValueError, and a 400 answer from
`mlflow models serve`) before anything sized by it is allocated.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ..registry_client import COLUMN, FLAVOR, MODES


class ServingInputError(MlflowException, ValueError):
    """A request that cannot be served (bad image, bad .czoo file, bad mode); the message
    names the row and the fix. MLflow's scoring server answers it with 400."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def encode_file(model, data: bytes, what: str = "image") -> tuple[bytes, int, int]:
    """An image file's bytes -> (.czoo bytes, height, width), read exactly as `compresszoo
    encode` reads a file (modes, 16-bit PNGs, the pixel limit checked from the header)."""
    from .. import limits
    from ..codec import encode_image
    from ..imagefiles import InputError, read_pixels, to_tensor

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ServingInputError(f"{what}: expected the bytes of an image file (PNG, JPEG, ...), "
                                f"got {type(data).__name__} of length {len(data or b'')}")
    try:
        pixels = read_pixels(bytes(data), what)
    except (InputError, limits.LimitError) as e:
        raise ServingInputError(str(e)) from None
    x = to_tensor(pixels)
    try:
        return encode_image(model, x), int(x.shape[-2]), int(x.shape[-1])
    except limits.LimitError as e:  # the padded size can cross the limit the file's size did not
        raise ServingInputError(f"{what}: {e}") from None


def decode_file(model, data: bytes, what: str = ".czoo file") -> tuple[bytes, int, int]:
    """.czoo bytes -> (PNG bytes, height, width); the header, the limits and the model's
    identity are checked before anything is decoded."""
    from ..codec import ContainerError, decode_image, read_header
    from ..imagefiles import image_bytes

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ServingInputError(f"{what}: expected the bytes of a .czoo file, got {type(data).__name__}")
    data = bytes(data)
    try:
        header = read_header(data)
        if header.batched:
            raise ServingInputError(f"{what}: a batched .czoo file ({header.num_images} images) decodes to "
                                    "several images; decode it with `compresszoo decode`")
        x_hat = decode_image(data, model)
    except ContainerError as e:  # LimitError subclasses included: all ValueErrors of the file
        raise ServingInputError(f"{what}: {e}") from None
    return image_bytes(x_hat), int(x_hat.shape[-2]), int(x_hat.shape[-1])


def _mode(params: dict | None) -> str:
    mode = (params or {}).get("mode") or MODES[0]
    if mode not in MODES:
        raise ServingInputError(f"params mode={str(mode)[:40]!r} is not one of {', '.join(MODES)}; "
                                'use {"mode": "encode"} (images -> .czoo) or {"mode": "decode"}')
    return mode


class CompressZooPyfunc:
    """What `mlflow.pyfunc.load_model` wraps: one loaded model, predict() per request."""

    def __init__(self, model):
        self.model = model

    def predict(self, model_input, params: dict | None = None):
        import pandas as pd

        mode = _mode(params)
        if not isinstance(model_input, pd.DataFrame) or COLUMN not in model_input.columns:
            raise ServingInputError(f"input must be a table with a {COLUMN!r} column of file bytes, "
                                    f"got {type(model_input).__name__}")
        fn = encode_file if mode == "encode" else decode_file
        rows = []
        for i, data in enumerate(model_input[COLUMN].tolist()):
            out, h, w = fn(self.model, data, f"row {i} ({'image' if mode == 'encode' else '.czoo file'})")
            size = len(out) if mode == "encode" else len(data)  # the compressed file's bytes
            rows.append({COLUMN: out, "height": h, "width": w, "bpp": 8 * size / (h * w)})
        return pd.DataFrame(rows, columns=[COLUMN, "height", "width", "bpp"])


def _load_pyfunc(path: str) -> CompressZooPyfunc:
    """MLflow's entry point: `path` is the downloaded version folder."""
    from mlflow.models import Model

    from ..models.io import load_weights

    root = Path(path)
    flavor = Model.load(str(root)).flavors.get(FLAVOR)
    if not flavor or not flavor.get("weights_sha256"):
        raise MlflowException(f"{root}: the MLmodel has no {FLAVOR} flavor with weights_sha256; "
                              "register the model again with compresszoo")
    name = str(flavor.get("weights", ""))
    if Path(name).name != name or not name:
        raise MlflowException(f"{root}: the MLmodel names weights file {name[:80]!r}, not a plain file name")
    expected = flavor["weights_sha256"]
    # Hash a private copy and load that copy: the bytes loaded are the bytes verified.
    with tempfile.TemporaryDirectory(prefix="compresszoo-pyfunc-") as tmp:
        private = Path(tmp) / name
        shutil.copyfile(root / name, private)
        got = hashlib.sha256(private.read_bytes()).hexdigest()
        if got != expected:
            raise MlflowException(f"{root / name}: checksum mismatch (expected {expected[:12]}, got "
                                  f"{got[:12]}); the artifact is corrupted")
        model = load_weights(private)
    return CompressZooPyfunc(model.eval())
