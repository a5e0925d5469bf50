"""Real test images and ready-to-code models shared by the test files: crops of
scikit-image's photographs as float tensors, and models with their CDF tables built."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from compresszoo.models import create_model


def photo(name: str = "astronaut", h: int = 256, w: int = 256, top: int = 0, left: int = 0) -> torch.Tensor:
    """A (3, h, w) crop of a scikit-image photograph, float in [0, 1]."""
    from skimage import data

    img = getattr(data, name)()[top:top + h, left:left + w]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0


def updated(name: str, quality: int = 3, debug: bool = True, seed: int = 0):
    """A seeded model in eval mode with its tables built (update)."""
    torch.manual_seed(seed)
    m = create_model(name, quality, debug=debug).eval()
    m.update(force=True)
    return m


def png_bytes(arr: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as the bytes of a PNG file."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 array as the codec's (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def kill_matching(marker: str) -> None:
    """Stop what a killed run may leave: processes naming this test's own Ray temp folder."""
    import contextlib

    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)
