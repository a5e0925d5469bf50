"""Reading a folder of pictures to evaluate on: RGB as is, palette converted, fully opaque
alpha dropped; transparency, grayscale, other modes and unreadable files are named and skipped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..limits import MAX_PIXELS
from . import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pnm", ".avif"}
KODAK_SHAPES = {(512, 768), (768, 512)}
_GRAY_MODES = ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F")


@dataclass
class Picture:
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8
    note: str = ""

    @property
    def pixels(self) -> int:
        return int(self.rgb.shape[0] * self.rgb.shape[1])


@dataclass
class Folder:
    """A folder's usable pictures, the image files skipped (with reasons) and the non-image files."""

    path: Path
    pictures: list[Picture]
    skipped: list[dict]
    ignored: list[str]

    def looks_like_kodak(self) -> bool:
        return looks_like_kodak(self.pictures)


def read_rgb(path: Path) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 and a note on any conversion; ValueError saying why it is unusable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            # Image.open reads only the header: check the declared size before decoding.
            MAX_PIXELS.check(im.width * im.height, str(path))
            im.load()
            return _as_rgb(im)
    except ValueError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, struct.error, ... on bad files
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from None


def _as_rgb(im) -> tuple[np.ndarray, str]:
    mode, note = im.mode, ""
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        note = "palette image converted to RGB"
    if im.mode == "RGBA":
        lo, _ = im.getchannel("A").getextrema()
        if lo < 255:
            raise ValueError(f"has transparency (mode {mode}); the codecs compared here code "
                             "RGB only: flatten it onto a background to evaluate it")
        im, note = im.convert("RGB"), "fully opaque alpha channel dropped"
    if im.mode in _GRAY_MODES:
        raise ValueError(f"grayscale (mode {mode}); the models code 3-channel RGB: convert it "
                         "to RGB to evaluate it")
    if im.mode != "RGB":
        raise ValueError(f"mode {mode}, not RGB; convert it to RGB to evaluate it")
    return np.array(im, dtype=np.uint8), note


def load_folder(folder: Path) -> Folder:
    """The image files directly in `folder` (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--images {folder}: not a folder; give a folder of PNG/JPEG images")
    pictures, skipped, ignored = [], [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append(path.name)
            continue
        try:
            rgb, note = read_rgb(path)
        except ValueError as e:
            skipped.append({"name": path.name, "reason": str(e)})
            continue
        pictures.append(Picture(path.name, rgb, note))
    return Folder(folder, pictures, skipped, ignored)


def looks_like_kodak(pictures: list[Picture]) -> bool:
    return len(pictures) == 24 and all(p.rgb.shape[:2] in KODAK_SHAPES for p in pictures)
