"""A real miniature of Vimeo90K: the official folder layout filled with 448x256 crops of the
photographs scikit-image ships, shifted a few pixels per frame so consecutive frames look like motion.

Used by tests and the demo; the sharder and reader handle it exactly like the real dataset.
ensure_smoke_data() makes and shards it once under a work folder (the smoke preset's data).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from compresszoo import storage
from compresszoo.data.manifest import manifest_uri
from compresszoo.data.shards import prepare
from compresszoo.data.vimeo import TUPLETS, list_name

WIDTH, HEIGHT = 448, 256
MAX_STEP = 3  # pixels per frame in x and y
# RGB photographs bundled inside the scikit-image wheel (no download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina", "immunohistochemistry")


def _photos() -> list[np.ndarray]:
    try:
        import skimage.data
    except ImportError:
        raise ImportError("the miniature needs scikit-image's sample photographs: pip install scikit-image") from None
    photos = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        photos.append(np.ascontiguousarray(img[..., :3]))
    return photos


def _sequence(photo: np.ndarray, frames: int, rng: np.random.Generator) -> list[np.ndarray]:
    margin = MAX_STEP * (frames - 1)
    h, w = photo.shape[:2]
    scale = max(1.0, (WIDTH + margin + 1) / w, (HEIGHT + margin + 1) / h)
    if scale > 1.0:  # a photo too small for the moving window: enlarge it
        im = Image.fromarray(photo).resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        photo = np.asarray(im)
        h, w = photo.shape[:2]
    dx, dy = (int(v) for v in rng.integers(-MAX_STEP, MAX_STEP + 1, size=2))
    # Start where the whole path stays inside the photo.
    x0 = int(rng.integers(max(0, -dx * (frames - 1)), w - WIDTH - max(0, dx * (frames - 1)) + 1))
    y0 = int(rng.integers(max(0, -dy * (frames - 1)), h - HEIGHT - max(0, dy * (frames - 1)) + 1))
    return [photo[y0 + dy * t : y0 + dy * t + HEIGHT, x0 + dx * t : x0 + dx * t + WIDTH] for t in range(frames)]


def make_miniature(dst: str, *, sequences: int = 8, test_sequences: int = 2, tuplet: str = "sep", seed: int = 0) -> str:
    """Write a Vimeo90K-format folder at `dst` (local or s3://): sequences/NNNNN/NNNN/imK.png
    plus {tuplet}_trainlist.txt and {tuplet}_testlist.txt. Returns `dst`.
    """
    if tuplet not in TUPLETS:
        raise ValueError(f"tuplet={tuplet!r}; expected one of {', '.join(TUPLETS)}")
    if not 0 < test_sequences < sequences:
        raise ValueError(f"test_sequences={test_sequences} must be between 1 and sequences-1={sequences - 1}")
    rng = np.random.default_rng(seed)
    photos = _photos()
    ids = [f"{i // 4 + 1:05d}/{i % 4 + 1:04d}" for i in range(sequences)]
    for i, seq in enumerate(ids):
        for t, frame in enumerate(_sequence(photos[i % len(photos)], TUPLETS[tuplet], rng), 1):
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="PNG")
            storage.write_bytes(storage.join(dst, "sequences", seq, f"im{t}.png"), buf.getvalue())
    train, test = ids[: sequences - test_sequences], ids[sequences - test_sequences :]
    storage.write_bytes(storage.join(dst, list_name(tuplet, "train")), ("\n".join(train) + "\n").encode())
    storage.write_bytes(storage.join(dst, list_name(tuplet, "test")), ("\n".join(test) + "\n").encode())
    return dst


def ensure_smoke_data(workdir: str | os.PathLike) -> str:
    """Make and shard the miniature dataset under `workdir` once; return the shard folder.
    A rerun finds the manifest and does nothing (a half-made one resumes in prepare())."""
    shards = storage.join(workdir, "vimeo90k-mini-shards")
    if storage.exists(manifest_uri(shards)):
        return shards
    src = storage.join(workdir, "vimeo90k-mini")
    if not storage.exists(storage.join(src, list_name("sep", "train"))):
        make_miniature(src)
    prepare(src, shards)
    return shards
