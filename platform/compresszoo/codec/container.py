"""The .czoo file: a versioned, checksummed container for compressed images.

Format 2 (written today), binary, ~20 bytes over the payload for one image:
    b"CZ" | version 2 (u8) | flags (u8: 1 portable, 2 batched, 4 channels present, 8 raster)
    | model (u8: bits 0-2 quality - 1, bit 3 metric, bits 4-5 architecture)
    | [N, M as varints, only where they differ from the zoo table]
    | weights fingerprint (4 bytes: the first 8 hex digits of the weights id)
    | height, width (varints) | [image count (varint), batched files only]
    | every stream's length as a varint except the last one, which the file size implies
    | payload (the rANS streams, image-major) | CRC-32 of everything before it (u32 LE)
The latent shape follows from the image size and the architecture. "portable" says the
entropy parameters were computed on the exact fixed-point path (models/portable.py); "raster"
that mbt2018's y streams are in CompressAI's raster order (models/raster.py) rather than the
default wavefront order. Files without the bit (all files before it existed) are wavefront;
the bit is refused on the other architectures: without a context model both orders are the
same streams, and their files record the default.

Format 1 (read only, written by earlier versions): MAGIC b"CZOO" | version 1 (u8) | header
length (u32 LE) | header (UTF-8 JSON) | payload | CRC-32; always the float path.

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
from dataclasses import dataclass, fields

from .. import limits

MAGIC = b"CZOO"  # format 1
MAGIC2 = b"CZ"
VERSION = 2
VERSIONS = (1, 2)
_PREFIX = struct.Struct("<4sBI")
_CRC = struct.Struct("<I")
#: encoders pad images to a multiple of this (every zoo model's total stride divides it)
PAD_MULTIPLE = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_WEIGHTS_ID = re.compile(r"[0-9a-f]{8,64}")
_MAX_QUALITY = 255  # loose sanity bound; the exact quality is checked against the model
_MAX_STREAMS = 2  # streams per image: y (factorized), y and z (hyperpriors)
# Format 2 codes: fixed forever (a new architecture takes the next free code).
ARCH_CODES = ("bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean", "mbt2018")
METRIC_CODES = ("mse", "ms-ssim")
FLAG_PORTABLE, FLAG_BATCHED, FLAG_CHANNELS, FLAG_RASTER = 1, 2, 4, 8
#: mbt2018's coding orders as the file names them: the default wavefront, or CompressAI's raster
ORDERS = ("wavefront", "raster")
ORDERED_ARCHITECTURES = ("mbt2018",)  # the architectures with a context model
FINGERPRINT_HEX = 8
_MAX_VARINT_BYTES = 5  # 35 bits: any length or side a limit lets through


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
    version: int = VERSION
    portable: bool = True  # entropy parameters from the exact path (format 1: always False)
    order: str = "wavefront"  # mbt2018's y stream order (format 1: always wavefront)

    @property
    def num_images(self) -> int:
        return len(self.stream_lengths)

    def model_text(self) -> str:
        return (f"{self.architecture} {self.metric} q{self.quality} (N={self.N}, M={self.M}, "
                f"weights {self.weights_id})")


_FIELD_NAMES = tuple(f.name for f in fields(Header) if f.name not in ("version", "portable", "order"))  # format 1


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
    """The file for `header` and its streams, in the header's format version."""
    if [[len(s) for s in img] for img in streams] != header.stream_lengths:
        raise ValueError("stream lengths in the header do not match the streams")
    if header.version == 2:
        return _pack2(header, streams)
    if header.version != 1 or header.portable or header.order != "wavefront":
        raise ValueError(f"cannot write format {header.version} with portable={header.portable}, "
                         f"order={header.order}")
    _check_fields({k: getattr(header, k) for k in _FIELD_NAMES})  # never write what read_header refuses
    head = json.dumps({k: getattr(header, k) for k in _FIELD_NAMES}, separators=(",", ":"), sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, 1, len(head)) + head + b"".join(b"".join(img) for img in streams)
    return body + _CRC.pack(zlib.crc32(body))


def _zoo(architecture: str, quality: int) -> tuple[int, int]:
    from ..models.registry import ARCHITECTURES

    return ARCHITECTURES[architecture].channels[quality - 1]


def _downsampling(architecture: str) -> int:
    from ..models.registry import ARCHITECTURES

    return ARCHITECTURES[architecture].builder.downsampling_factor


def streams_per_image(architecture: str) -> int:
    """y only for the factorized prior; y and z for the hyperprior models."""
    return 1 if architecture == "bmshj2018-factorized" else 2


def latent_shape(architecture: str, height: int, width: int) -> list[int]:
    """What model.decompress takes for an image of height x width (padded to PAD_MULTIPLE)."""
    ds = _downsampling(architecture)
    return [-(-n // PAD_MULTIPLE) * PAD_MULTIPLE // ds for n in (height, width)]


def file_order(architecture: str, order: str) -> str:
    """The order a file of `architecture` records for streams coded in `order`: the order
    itself for mbt2018; for the others both orders are the same bytes, recorded as the
    default, so one content has one file."""
    if order not in ORDERS:
        raise ValueError(f"unknown coding order {order!r}; valid: {', '.join(ORDERS)}")
    return order if architecture in ORDERED_ARCHITECTURES else "wavefront"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise ContainerError(f"truncated or corrupted file: the header ends inside {what}")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and not byte:  # one value, one encoding: no redundant trailing zero groups
                raise ContainerError(f"corrupted file: {what} is not minimally encoded")
            return value, pos + i + 1
    raise ContainerError(f"corrupted file: {what} is longer than {_MAX_VARINT_BYTES} bytes")


def _pack2(h: Header, streams: list[list[bytes]]) -> bytes:
    if h.architecture not in ARCH_CODES or h.metric not in METRIC_CODES or not 1 <= h.quality <= 8:
        raise ValueError(f"format 2 cannot name {h.architecture} {h.metric} q{h.quality}")
    if not streams or (not h.batched and len(streams) != 1):
        raise ValueError("a file holds one image, or a batch of at least one")
    if any(len(img) != streams_per_image(h.architecture) for img in streams):
        raise ValueError(f"{h.architecture} writes {streams_per_image(h.architecture)} stream(s) per image")
    if list(h.latent_shape) != latent_shape(h.architecture, h.height, h.width):
        raise ValueError(f"latent shape {h.latent_shape} does not follow from a {h.height}x{h.width} image")
    if h.order != file_order(h.architecture, h.order):
        raise ValueError(f"a {h.architecture} file records order 'wavefront' (it has no context model)")
    channels = (h.N, h.M) != _zoo(h.architecture, h.quality)
    flags = (FLAG_PORTABLE if h.portable else 0) | (FLAG_BATCHED if h.batched else 0) | (FLAG_CHANNELS if channels else 0)
    flags |= FLAG_RASTER if h.order == "raster" else 0
    model = (h.quality - 1) | (METRIC_CODES.index(h.metric) << 3) | (ARCH_CODES.index(h.architecture) << 4)
    head = bytearray(MAGIC2 + bytes([2, flags, model]))
    if channels:
        head += _varint(h.N) + _varint(h.M)
    head += bytes.fromhex(h.weights_id[:FINGERPRINT_HEX]) + _varint(h.height) + _varint(h.width)
    if h.batched:
        head += _varint(len(streams))
    lengths = [len(s) for img in streams for s in img]
    for n in lengths[:-1]:
        head += _varint(n)
    body = bytes(head) + b"".join(b"".join(img) for img in streams)
    data = body + _CRC.pack(zlib.crc32(body))
    _parse2(data, verify=True)  # never write what the reader refuses
    return data


def _parse2(data: bytes, verify: bool) -> tuple[Header, list[list[bytes]]]:
    if len(data) < 3 + 2 + 4 + 2 + _CRC.size:
        raise ContainerError("truncated file: shorter than the smallest format-2 header")
    flags, model = data[3], data[4]
    if flags & ~(FLAG_PORTABLE | FLAG_BATCHED | FLAG_CHANNELS | FLAG_RASTER) or model & 0xC0:
        raise ContainerError("corrupted file: reserved header bits are set")
    architecture = ARCH_CODES[(model >> 4) & 3]
    order = "raster" if flags & FLAG_RASTER else "wavefront"
    if order == "raster" and architecture not in ORDERED_ARCHITECTURES:
        raise ContainerError(f"corrupted file: the raster-order bit is set for {architecture}, "
                             "which has no context model")
    metric = METRIC_CODES[(model >> 3) & 1]
    quality = (model & 7) + 1
    pos = 5
    if flags & FLAG_CHANNELS:
        n, pos = _read_varint(data, pos, "N")
        m, pos = _read_varint(data, pos, "M")
        for name, v in (("N", n), ("M", m)):
            if v < 1:
                raise ContainerError(f"corrupted file: {name} must be at least 1, got {v}")
            try:
                limits.MAX_CHANNELS.check(v, f"header field {name}")
            except limits.LimitError as e:
                raise ContainerLimitError(f"corrupted or foreign file: {e}") from None
    else:
        n, m = _zoo(architecture, quality)
    if pos + 4 > len(data):
        raise ContainerError("truncated or corrupted file: the header ends inside the weights fingerprint")
    fingerprint = data[pos:pos + 4].hex()
    pos += 4
    height, pos = _read_varint(data, pos, "the image height")
    width, pos = _read_varint(data, pos, "the image width")
    count = 1
    if flags & FLAG_BATCHED:
        count, pos = _read_varint(data, pos, "the image count")
    if min(height, width, count) < 1:
        raise ContainerError(f"corrupted file: {count} image(s) of {height}x{width}; sizes must be positive")
    try:  # before anything sized by the header is built
        check_pixels(height, width, count, "the file's header")
    except limits.LimitError as e:
        raise ContainerLimitError(str(e)) from None
    per_image = streams_per_image(architecture)
    payload_end = len(data) - _CRC.size
    lengths = []
    for i in range(count * per_image - 1):  # bounded: count is within the pixel limit
        n_i, pos = _read_varint(data, pos, f"stream length {i}")
        lengths.append(n_i)
    last = payload_end - pos - sum(lengths)
    if pos > payload_end or last < 0:
        raise ContainerError("truncated or corrupted file: stream lengths add up to more than the file holds")
    lengths.append(last)
    if verify:
        (crc,) = _CRC.unpack_from(data, payload_end)
        if zlib.crc32(data[:payload_end]) != crc:
            raise ContainerError("corrupted file: checksum mismatch (the bytes changed after encoding)")
    grouped = [lengths[i * per_image:(i + 1) * per_image] for i in range(count)]
    header = Header(architecture, metric, quality, n, m, fingerprint, height, width, bool(flags & FLAG_BATCHED),
                    latent_shape(architecture, height, width), grouped, version=2,
                    portable=bool(flags & FLAG_PORTABLE), order=order)
    return header, _split_streams(data, pos, grouped)


def _split_streams(data: bytes, start: int, lengths: list[list[int]]) -> list[list[bytes]]:
    """The payload cut into [image][stream] byte strings (lengths already checked)."""
    streams, pos = [], start
    for img in lengths:
        row = []
        for n in img:
            row.append(data[pos:pos + n])
            pos += n
        streams.append(row)
    return streams


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
    return Header(**{k: f[k] for k in _FIELD_NAMES}, version=1, portable=False)


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
    if data[:2] == MAGIC2 and data[2:4] != b"OO":
        if len(data) > 2 and data[2] != 2:
            raise ContainerError(f"unsupported format version {data[2]}; this compresszoo reads versions "
                                 f"{', '.join(map(str, VERSIONS))}")
        return _parse2(data, verify)
    if len(data) < _PREFIX.size + _CRC.size or data[:4] != MAGIC:
        raise ContainerError("not a compresszoo file (bad magic); it must start with b'CZ'")
    _, version, head_len = _PREFIX.unpack_from(data)
    if version != 1:
        raise ContainerError(f"unsupported format version {version}; this compresszoo reads versions "
                             f"{', '.join(map(str, VERSIONS))}")
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
    return header, _split_streams(data, start, lengths)
