"""rANS entropy coding of integer symbols under quantized CDF tables.

A NumPy interface over the compiled kernels in `_rans` (imported at first use),
byte-compatible with CompressAI's `compressai.ans`.

Arguments, as in the reference's ``encode_with_indexes``: ``symbols`` and
``indexes`` are 1-D (flattened) int32; symbol ``i`` is coded with CDF row
``indexes[i]`` of ``cdfs`` (2-D int32, one row per table, padded), whose first
``cdf_lengths[row]`` entries run strictly upwards from 0 to 65536; symbol value
``v`` maps to bin ``v - offsets[row]``, and values outside the table's
``cdf_lengths[row] - 2`` regular bins go through the last bin plus 4-bit bypass
chunks.
"""

from __future__ import annotations

import importlib

import numpy as np

PRECISION = 16
_BUILD_HINT = (
    "compresszoo's rANS extension is not built; run `pip install -e .` or "
    "`python setup.py build_ext --inplace` in the repo"
)
_ext_module = None


def _ext():
    """The compiled module, imported once; one ImportError if it is missing."""
    global _ext_module
    if _ext_module is None:
        try:
            _ext_module = importlib.import_module("compresszoo.ans._rans")
        except ImportError as exc:
            raise ImportError(f"{_BUILD_HINT} (import said: {exc})") from None
    return _ext_module


# --------------------------------------------------------------------------- inputs


def _int32_1d(value, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int32)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected integers, got dtype {arr.dtype}; pass an int32 array")
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise ValueError(f"{name}: has non-integer values; round before coding")
    if arr.dtype != np.int32:
        lo, hi = arr.min(), arr.max()
        if lo < -(2**31) or hi >= 2**31:
            raise ValueError(f"{name}: values {lo}..{hi} do not fit int32; clamp or offset them")
        arr = arr.astype(np.int32)
    return np.ascontiguousarray(arr.reshape(-1))


def pad_cdfs(rows) -> np.ndarray:
    """Stack CDF rows of unequal length into one zero-padded 2-D int32 array.

    Each row is checked as a 2-D `cdfs` array is (integers that fit int32, same ValueError),
    so a ragged list is never silently truncated or wrapped on assignment.
    """
    rows = [_cdf_row(r, i) for i, r in enumerate(rows)]
    width = max((len(r) for r in rows), default=0)
    out = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _cdf_row(row, i: int) -> np.ndarray:
    try:
        arr = np.asarray(row)
    except ValueError:  # a row that is itself ragged
        raise ValueError(f"cdfs: row {i} is not a flat sequence of integers") from None
    return _cdf_values(arr.reshape(-1))


def _cdf_values(table: np.ndarray) -> np.ndarray:
    """`table` as int32, or the ValueError every cdfs input gets for non-int32 values."""
    if table.size and table.dtype != np.int32:
        if table.dtype.kind not in "iu" or table.min() < -(2**31) or table.max() >= 2**31:
            raise ValueError(f"cdfs: expected int32 values, got dtype {table.dtype}")
    return table.astype(np.int32, copy=False)


def _tables(cdfs, cdf_lengths, offsets):
    """Validate the tables once per call; returns contiguous int32 arrays."""
    try:
        table = np.asarray(cdfs)
    except ValueError:  # ragged nested lists
        table = pad_cdfs(cdfs)
    if table.dtype == object:
        table = pad_cdfs(cdfs)
    if table.ndim != 2:
        raise ValueError(
            f"cdfs: expected a 2-D array (one padded row per table), got shape {table.shape}; "
            "stack the rows with compresszoo.ans.rans.pad_cdfs"
        )
    table = np.ascontiguousarray(_cdf_values(table))
    lengths = _int32_1d(cdf_lengths, "cdf_lengths")
    offs = _int32_1d(offsets, "offsets")
    n = table.shape[0]
    if lengths.shape[0] != n or offs.shape[0] != n:
        raise ValueError(
            f"cdf_lengths/offsets: need one entry per cdfs row ({n}), got "
            f"{lengths.shape[0]} and {offs.shape[0]}"
        )
    row, reason = _ext().check_tables(table, lengths)
    if row >= 0:
        what = {
            1: f"length {lengths[row]} < 2 (a table needs at least one bin plus the escape bin)",
            2: f"length {lengths[row]} exceeds the row width {table.shape[1]}",
            3: "does not start at 0",
            4: "is not strictly increasing (every bin needs a nonzero frequency)",
            5: f"does not end at {1 << PRECISION} (16-bit precision)",
        }[reason]
        raise ValueError(
            f"cdfs: row {row} {what}; rebuild the quantized CDF tables (model.update())"
        )
    return table, lengths, offs


def _indexes(indexes, n_tables: int) -> np.ndarray:
    idx = _int32_1d(indexes, "indexes")
    if idx.size and (idx.min() < 0 or idx.max() >= n_tables):
        raise ValueError(
            f"indexes: values {idx.min()}..{idx.max()} outside [0, {n_tables}); "
            "every index must name a row of cdfs"
        )
    return idx


def _coding_error(code: int, position: int, what: str) -> ValueError:
    kind = _ext().ERRORS.get(code, "unknown")
    if kind == "range":
        return ValueError(
            f"symbols: value at position {position} is more than 2^31 bins outside its table; "
            "clamp the symbols"
        )
    if kind == "index":
        return ValueError(f"indexes: position {position} names no cdfs row")
    return ValueError(
        f"{what}: stream is {kind} at symbol {position}; the data is damaged "
        "or was coded with other tables/indexes"
    )


def _encoder_inputs(symbols, indexes, cdfs, cdf_lengths, offsets):
    """Checked int32 arrays for the encoder: (symbols, indexes, cdfs, lengths, offsets)."""
    table, lengths, offs = _tables(cdfs, cdf_lengths, offsets)
    syms = _int32_1d(symbols, "symbols")
    idx = _indexes(indexes, table.shape[0])
    if syms.shape != idx.shape:
        raise ValueError(
            f"symbols/indexes: sizes differ ({syms.size} vs {idx.size}); one index per symbol"
        )
    return syms, idx, table, lengths, offs


# --------------------------------------------------------------------------- one shot


def encode(symbols, indexes, cdfs, cdf_lengths, offsets) -> bytes:
    """rANS-encode `symbols`, each under CDF row `indexes[i]`; returns the stream."""
    syms, idx, table, lengths, offs = _encoder_inputs(symbols, indexes, cdfs, cdf_lengths, offsets)
    err, pos, data = _ext().encode(syms, idx, table, lengths, offs)
    if err:
        raise _coding_error(err, pos, "encode")
    return data


def decode(data, indexes, cdfs, cdf_lengths, offsets) -> np.ndarray:
    """Decode one symbol per index from `data`; the stream must end exactly there."""
    dec = RansDecoder(data)
    out = dec.decode(indexes, cdfs, cdf_lengths, offsets)
    dec.finish()
    return out


# --------------------------------------------------------------------------- streaming


class RansEncoder:
    """Buffered encoder: append symbols in any number of calls, then flush() once.

    rANS codes backwards, so symbols are buffered as (start, freq, bypass) entries
    and coded last-to-first at flush; the bytes equal one encode() of all symbols.
    """

    def __init__(self, capacity: int = 1024):
        capacity = max(int(capacity), 16)
        self._starts = np.empty(capacity, dtype=np.uint16)
        self._freqs = np.empty(capacity, dtype=np.uint32)
        self._bypass = np.empty(capacity, dtype=np.uint8)
        self._size = 0

    def _grow(self, need: int, keep: int) -> None:
        cap = max(need, 2 * self._starts.shape[0])
        for name in ("_starts", "_freqs", "_bypass"):
            old = getattr(self, name)
            new = np.empty(cap, dtype=old.dtype)
            new[:keep] = old[:keep]
            setattr(self, name, new)

    def encode_with_indexes(self, symbols, indexes, cdfs, cdf_lengths, offsets) -> None:
        syms, idx, table, lengths, offs = _encoder_inputs(symbols, indexes, cdfs, cdf_lengths, offsets)
        ext = _ext()
        size, first = self._size, 0
        while True:
            # A symbol takes 1 entry, or 2-10 when it escapes; grow for the common case.
            if self._starts.shape[0] < size + (syms.size - first) + 16:
                self._grow(size + (syms.size - first) + 16, size)
            err, first, size = ext.buffer_symbols(
                syms,
                idx,
                table,
                lengths,
                offs,
                first,
                self._starts,
                self._freqs,
                self._bypass,
                size,
            )
            if err:  # nothing is committed: the encoder stays as it was
                raise _coding_error(err, first, "encode")
            if first == syms.size:
                break
        self._size = size

    def flush(self) -> bytes:
        """Code everything buffered so far and empty the buffer."""
        data = _ext().flush_symbols(self._starts, self._freqs, self._bypass, self._size)
        self._size = 0
        return data


class RansDecoder:
    """Incremental decoder over one stream: decode() any number of times, then finish()."""

    def __init__(self, data):
        try:
            raw = bytes(memoryview(data))
        except TypeError:
            raise ValueError(
                f"data: expected bytes, got {type(data).__name__}; pass the encoder's output"
            ) from None
        if len(raw) < 8 or len(raw) % 4:
            raise ValueError(
                f"data: a rANS stream is a whole number of 4-byte words, at least 2; got "
                f"{len(raw)} bytes (truncated or not a stream)"
            )
        words = np.frombuffer(raw, dtype="<u4")
        self._words = np.ascontiguousarray(words, dtype=np.uint32)
        self._state = int(self._words[0]) | (int(self._words[1]) << 32)
        self._pos = 2

    def decode(self, indexes, cdfs, cdf_lengths, offsets) -> np.ndarray:
        """Decode one symbol per index (int32); the stream's position advances."""
        table, lengths, offs = _tables(cdfs, cdf_lengths, offsets)
        idx = _indexes(indexes, table.shape[0])
        out = np.empty(idx.shape[0], dtype=np.int32)
        err, at, pos, state = _ext().decode(
            self._words, self._pos, self._state, idx, table, lengths, offs, out
        )
        if err:
            raise _coding_error(err, at, "data")
        self._pos, self._state = pos, state
        return out

    def finish(self) -> None:
        """Check the stream ended exactly: initial state restored, every word read."""
        left = self._words.shape[0] - self._pos
        if self._state != 1 << 31 or left:
            raise ValueError(
                f"data: stream did not end cleanly ({left} words left, final state "
                f"{self._state:#x}); it is damaged or was decoded with other tables/indexes"
            )
