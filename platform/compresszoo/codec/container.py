"""The .czoo file: a versioned, checksummed container for compressed images.

Layout: MAGIC (4 bytes) | version (u8) | header length (u32 LE) | header (UTF-8 JSON)
| payload (the rANS streams, image-major) | CRC-32 of everything before it (u32 LE).
The header names the model (architecture, metric, quality, N, M, weights id), the
original and latent sizes and every stream's length, so a file can be checked and
described without the model, and decoding with another model is refused.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass

MAGIC = b"CZOO"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")
_CRC = struct.Struct("<I")
MAX_HEADER = 1 << 20


class ContainerError(ValueError):
    """The bytes are not a valid compresszoo file (foreign, corrupted or truncated)."""


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


def pack(header: Header, streams: list[list[bytes]]) -> bytes:
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


def _parse(data, verify: bool):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ContainerError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _PREFIX.size + _CRC.size or data[:4] != MAGIC:
        raise ContainerError("not a compresszoo file (bad magic); it must start with b'CZOO'")
    _, version, head_len = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise ContainerError(f"unsupported format version {version}; this compresszoo reads version {VERSION}")
    if head_len > MAX_HEADER or _PREFIX.size + head_len + _CRC.size > len(data):
        raise ContainerError("truncated or corrupted file: header length runs past the end")
    if verify:
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(data[: -_CRC.size]) != crc:
            raise ContainerError("corrupted file: checksum mismatch (the bytes changed after encoding)")
    try:
        fields = json.loads(data[_PREFIX.size:_PREFIX.size + head_len].decode())
        header = Header(**fields)
        lengths = [[int(n) for n in img] for img in header.stream_lengths]
        if any(n < 0 for img in lengths for n in img) or header.height <= 0 or header.width <= 0:
            raise ValueError("negative length or size")
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise ContainerError(f"corrupted file: unreadable header ({e})") from None
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
