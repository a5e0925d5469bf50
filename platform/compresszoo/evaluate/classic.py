"""The classic reference codecs (JPEG, WebP, AVIF through Pillow; JPEG XL through imagecodecs),
their quality sweeps, and picking the ones asked for and usable here."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import UsageError


@dataclass(frozen=True)
class ClassicCodec:
    name: str
    qualities: tuple[int, ...]
    encode: Callable[[np.ndarray, int], bytes]
    decode: Callable[[bytes], np.ndarray]
    #: None when usable here, else what is missing and how to get it
    missing: Callable[[], str | None]
    settings: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"qualities": list(self.qualities), **self.settings, "library": self.library()}

    def library(self) -> str:
        if self.name == "jxl":
            import imagecodecs

            return f"imagecodecs {imagecodecs.__version__} (libjxl)"
        import PIL

        return f"Pillow {PIL.__version__}"


def _pillow_codec(name: str, fmt: str, feature: str, qualities: tuple[int, ...], **options) -> ClassicCodec:
    def encode(rgb: np.ndarray, q: int) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt, quality=q, **options)
        return buf.getvalue()

    def decode(data: bytes) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))

    def missing() -> str | None:
        from PIL import __version__, features

        try:
            ok = features.check(feature)
        except ValueError:  # a Pillow that does not know the feature at all
            ok = False
        return None if ok else (f"this Pillow ({__version__}) has no {fmt} encoder; "
                                f"install a Pillow built with {feature} (AVIF: Pillow >= 11.3)")

    return ClassicCodec(name, qualities, encode, decode, missing, {"format": fmt, **options})


def _jxl_codec(qualities: tuple[int, ...]) -> ClassicCodec:
    def encode(rgb: np.ndarray, q: int) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.jpegxl_encode(np.ascontiguousarray(rgb), level=q))

    def decode(data: bytes) -> np.ndarray:
        import imagecodecs

        return np.asarray(imagecodecs.jpegxl_decode(data))

    def missing() -> str | None:
        try:
            import imagecodecs
        except ImportError:
            return "JPEG XL needs the imagecodecs package: pip install imagecodecs"
        return None if imagecodecs.JPEGXL.available else "this imagecodecs build has no JPEG XL codec"

    return ClassicCodec("jxl", qualities, encode, decode, missing,
                        {"format": "JPEG XL", "quality": "libjxl quality (distance from quality), effort 7"})


_SWEEP = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
#: the classic codecs, in plot order; qualities span roughly 0.1-3 bpp on photographs
CODECS: dict[str, ClassicCodec] = {
    c.name: c for c in (
        _pillow_codec("jpeg", "JPEG", "jpg", (2, *_SWEEP), optimize=True),  # 4:2:0, optimal Huffman
        _pillow_codec("webp", "WEBP", "webp", (0, *_SWEEP), method=6),
        _pillow_codec("avif", "AVIF", "avif", (0, *_SWEEP), speed=6),
        _jxl_codec((1, *_SWEEP)),
    )
}


def pick_codecs(spec: str) -> tuple[list[ClassicCodec], list[str]]:
    """(codecs to run, notes on unavailable ones). 'auto': every one usable here; 'none': none."""
    spec = spec.strip().lower()
    if spec == "none":
        return [], []
    if spec == "auto":
        chosen, notes = [], []
        for c in CODECS.values():
            why = c.missing()
            if why:
                notes.append(f"{c.name} not run: {why}")
            else:
                chosen.append(c)
        return chosen, notes
    chosen = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        if name not in CODECS:
            raise UsageError(f"--codecs: unknown codec {name!r}; known: {', '.join(CODECS)}, or auto / none")
        why = CODECS[name].missing()
        if why:
            raise UsageError(f"--codecs {name}: {why}; or leave it out of --codecs")
        chosen.append(CODECS[name])
    return chosen, []
