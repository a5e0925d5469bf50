"""`compressai.ans` names over compresszoo's rANS coder (compresszoo.ans.rans).

The bytes are CompressAI's: a stream from either library decodes in the other. What differs
is the native API it wraps: there, RansEncoder is the buffered encoder and RansDecoder takes
its stream in the constructor; here the three classes have CompressAI's shapes.
"""

from __future__ import annotations

from ..ans import rans

__all__ = ["BufferedRansEncoder", "RansDecoder", "RansEncoder"]


class RansEncoder:
    """One-shot encoder: encode_with_indexes(...) returns the whole stream."""

    def encode_with_indexes(self, symbols, indexes, cdfs, cdfs_sizes, offsets) -> bytes:
        return rans.encode(symbols, indexes, cdfs, cdfs_sizes, offsets)


class BufferedRansEncoder:
    """Collect symbols over several encode_with_indexes calls; flush() returns the stream."""

    def __init__(self):
        self._encoder = rans.RansEncoder()

    def encode_with_indexes(self, symbols, indexes, cdfs, cdfs_sizes, offsets) -> None:
        self._encoder.encode_with_indexes(symbols, indexes, cdfs, cdfs_sizes, offsets)

    def flush(self) -> bytes:
        return self._encoder.flush()


class RansDecoder:
    """decode_with_indexes(stream, ...) decodes a whole stream; set_stream(stream) then
    decode_stream(...) any number of times decodes one in pieces. Both return lists of int."""

    def __init__(self):
        self._stream: rans.RansDecoder | None = None

    def decode_with_indexes(self, encoded, indexes, cdfs, cdfs_sizes, offsets) -> list[int]:
        return rans.decode(_as_bytes(encoded), indexes, cdfs, cdfs_sizes, offsets).tolist()

    def set_stream(self, encoded) -> None:
        self._stream = rans.RansDecoder(_as_bytes(encoded))

    def decode_stream(self, indexes, cdfs, cdfs_sizes, offsets) -> list[int]:
        if self._stream is None:
            raise ValueError("decode_stream: no stream; call set_stream(encoded) first")
        return self._stream.decode(indexes, cdfs, cdfs_sizes, offsets).tolist()


def _as_bytes(encoded) -> bytes:
    # CompressAI's binding also takes str (pybind11 converts it); keep that for old callers.
    return encoded.encode("latin-1") if isinstance(encoded, str) else encoded
