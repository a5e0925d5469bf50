"""Real test images and ready-to-code models shared by the test files: crops of
scikit-image's photographs as float tensors, and models with their CDF tables built."""

from __future__ import annotations

import numpy as np
import torch

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
