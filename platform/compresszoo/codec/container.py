"""The .czoo file: a versioned, checksummed container for compressed images.

Layout: MAGIC (4 bytes) | version (u8) | header length (u32 LE) | header (UTF-8 JSON)
| payload (the rANS streams, image-major) | CRC-32 of everything before it (u32 LE).
The header names the model (architecture, metric, quality, N, M, weights id), the
original and latent sizes and every stream's length, so a file can be checked and
described without the model, and decoding with another model is refused.

Files come from other people, so parsing is strict: every header field is checked for
type and range, the declared image size against limits.MAX_PIXELS and the header size
against limits.MAX_HEADER_BYTES before anything is allocated, and any failure, however
deep, is a ContainerError. Text taken from a file is escaped before it goes into a message.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import asdict, dataclass, fields

from .. import limits

MAGIC = b"CZOO"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")
_CRC = struct.Struct("<I")
#: encoders pad images to a multiple of this (every zoo model's total stride divides it)
PAD_MULTIPLE = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_WEIGHTS_ID = re.compile(r"[0-9a-f]{8,64}")
_MAX_QUALITY = 255  # loose sanity bound; the exact quality is checked against the model
_MAX_STREAMS = 2  # streams per image: y (factorized), y and z (hyperpriors)


class ContainerError(ValueError):
    """The bytes are not a valid compresszoo file (foreign, corrupted or truncated)."""


class ContainerLimitError(ContainerError, limits.LimitError):
    """A file declares more than a configured limit allows (both error types catch it)."""


@dataclass
class Header:
    architecture: str
    metric: str
    quality: int
    N: int
    M: int
    weights_id: str
    height: int
    width: int
    batched: bool
    latent_shape: list  # the shape passed to model.decompress (z for hyperpriors, y otherwise)
    stream_lengths: list  # [image][stream] byte lengths

    @property
    def num_images(self) -> int:
        return len(self.stream_lengths)

    def model_text(self) -> str:
        return (f"{self.architecture} {self.metric} q{self.quality} (N={self.N}, M={self.M}, "
                f"weights {self.weights_id})")


_FIELD_NAMES = tuple(f.name for f in fields(Header))


def show(value, limit: int = 40) -> str:
    """`value` as short printable ASCII: file text never reaches a terminal raw."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    try:
        text = ascii(value)
    except RecursionError:
        return "<deeply nested value>"
    return text if len(text) <= limit + 2 else text[:limit] + "..."


def padded_pixels(height: int, width: int, count: int = 1) -> int:
    """Pixels a decoder holds for `count` images of height x width (padded to PAD_MULTIPLE)."""
    def up(n: int) -> int:
        return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE

    return up(height) * up(width) * count


def check_pixels(height: int, width: int, count: int, source: str) -> None:
    """Raise limits.LimitError if `count` padded images of height x width exceed MAX_PIXELS."""
    limits.MAX_PIXELS.check(padded_pixels(height, width, count),
                            f"{source} ({count} image(s) of {height}x{width}, padded to multiples "
                            f"of {PAD_MULTIPLE})")


def pack(header: Header, streams: list[list[bytes]]) -> bytes:
    _check_fields(asdict(header))  # never write a file that read_header would refuse
    if [[len(s) for s in img] for img in streams] != header.stream_lengths:
        raise ValueError("stream lengths in the header do not match the streams")
    head = json.dumps(asdict(header), separators=(",", ":"), sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, VERSION, len(head)) + head + b"".join(b"".join(img) for img in streams)
    return body + _CRC.pack(zlib.crc32(body))


def read_header(data: bytes) -> Header:
    """Parse and check the header only (no checksum over the payload)."""
    return _parse(data, verify=False)[0]


def unpack(data: bytes) -> tuple[Header, list[list[bytes]]]:
    """Check magic, version, checksum and lengths; return the header and the streams."""
    return _parse(data, verify=True)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a size


def _int(fields_: dict, name: str, low: int, high: int | None = None) -> int:
    v = fields_[name]
    if not _is_int(v):
        raise ContainerError(f"corrupted file: header field {name} must be an integer, got {show(v)}")
    if v < low or (high is not None and v > high):
        bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise ContainerError(f"corrupted file: header field {name} must be {bound}, got {show(v)}")
    return v


def _name(fields_: dict, name: str, pattern: re.Pattern) -> str:
    v = fields_[name]
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise ContainerError(f"corrupted file: header field {name} must be a name matching "
                             f"{pattern.pattern}, got {show(v)}")
    return v


def _check_fields(f) -> Header:
    """Type and range of every field; the declared sizes against the limits."""
    if not isinstance(f, dict):
        raise ContainerError(f"corrupted file: the header must be a JSON object, got {type(f).__name__}")
    missing = [k for k in _FIELD_NAMES if k not in f]
    extra = sorted(show(k) for k in f if k not in _FIELD_NAMES)[:5]
    if missing or extra:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
                   ([f"unknown {', '.join(extra)}"] if extra else [])
        raise ContainerError(f"corrupted file: header fields {'; '.join(problems)}")
    _name(f, "architecture", _NAME)
    _name(f, "metric", _NAME)
    _name(f, "weights_id", _WEIGHTS_ID)
    _int(f, "quality", 1, _MAX_QUALITY)
    for ch in ("N", "M"):
        _int(f, ch, 1)
        try:
            limits.MAX_CHANNELS.check(f[ch], f"header field {ch}")
        except limits.LimitError as e:
            raise ContainerLimitError(f"corrupted or foreign file: {e}") from None
    height, width = _int(f, "height", 1), _int(f, "width", 1)
    if not isinstance(f["batched"], bool):
        raise ContainerError(f"corrupted file: header field batched must be true or false, got {show(f['batched'])}")
    shape = f["latent_shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(n) and n > 0 for n in shape)):
        raise ContainerError(f"corrupted file: header field latent_shape must be two positive integers, "
                             f"got {show(shape)}")
    lengths = f["stream_lengths"]
    if not (isinstance(lengths, list) and all(isinstance(img, list) for img in lengths)):
        raise ContainerError(f"corrupted file: header field stream_lengths must be a list of lists of "
                             f"byte lengths, got {show(lengths)}")
    if not lengths:
        raise ContainerError("corrupted file: the header lists no images (stream_lengths is empty)")
    per_image = len(lengths[0])
    if not 1 <= per_image <= _MAX_STREAMS or any(len(img) != per_image for img in lengths):
        raise ContainerError(f"corrupted file: every image must have the same number of streams "
                             f"(1 to {_MAX_STREAMS}), got {show([len(img) for img in lengths])}")
    if not all(_is_int(n) and n >= 0 for img in lengths for n in img):
        bad = next(n for img in lengths for n in img if not (_is_int(n) and n >= 0))
        raise ContainerError(f"corrupted file: stream lengths must be non-negative integers, got {show(bad)}")
    if not f["batched"] and len(lengths) != 1:
        raise ContainerError(f"corrupted file: the header says batched=false but lists {len(lengths)} "
                             "images; a single-image file holds exactly one")
    try:
        check_pixels(height, width, len(lengths), "the file's header")
    except limits.LimitError as e:
        raise ContainerLimitError(str(e)) from None
    return Header(**{k: f[k] for k in _FIELD_NAMES})


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ContainerError("corrupted file: the header repeats a field name")
    return dict(pairs)


def _no_constant(name: str):
    raise ContainerError(f"corrupted file: the header holds the non-number {show(name)}")


def _parse(data, verify: bool):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ContainerError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _PREFIX.size + _CRC.size or data[:4] != MAGIC:
        raise ContainerError("not a compresszoo file (bad magic); it must start with b'CZOO'")
    _, version, head_len = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise ContainerError(f"unsupported format version {version}; this compresszoo reads version {VERSION}")
    if _PREFIX.size + head_len + _CRC.size > len(data):
        raise ContainerError("truncated or corrupted file: header length runs past the end")
    try:
        limits.MAX_HEADER_BYTES.check(head_len, ".czoo header")
    except limits.LimitError as e:
        raise ContainerLimitError(str(e)) from None
    if verify:
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(data[: -_CRC.size]) != crc:
            raise ContainerError("corrupted file: checksum mismatch (the bytes changed after encoding)")
    try:
        raw = json.loads(data[_PREFIX.size:_PREFIX.size + head_len].decode("utf-8"),
                         object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ContainerError:
        raise
    except (ValueError, RecursionError, MemoryError) as e:  # bad UTF-8/JSON, nesting, huge numbers
        raise ContainerError(f"corrupted file: unreadable header ({type(e).__name__})") from None
    header = _check_fields(raw)
    lengths = header.stream_lengths
    start = _PREFIX.size + head_len
    if start + sum(map(sum, lengths)) + _CRC.size != len(data):
        raise ContainerError("truncated or corrupted file: stream lengths do not add up to the file size")
    streams, pos = [], start
    for img in lengths:
        row = []
        for n in img:
            row.append(data[pos:pos + n])
            pos += n
        streams.append(row)
    return header, streams
