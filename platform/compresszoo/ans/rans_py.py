"""Slow pure-Python twin of compresszoo.ans.rans, written for reading, not speed.

Tests use it as a second oracle: same arguments, same bytes, same ValueErrors.
"""

from __future__ import annotations

import bisect

import numpy as np

PRECISION = 16
RANS_L = 1 << 31
BYPASS_BITS = 4
BYPASS_MAX = (1 << BYPASS_BITS) - 1
MAX_CHUNKS = 8  # enough for any 32-bit raw value
MASK32 = (1 << 32) - 1


def _rows(cdfs, cdf_lengths, offsets):
    lengths = [int(v) for v in np.asarray(cdf_lengths).reshape(-1)]
    offs = [int(v) for v in np.asarray(offsets).reshape(-1)]
    rows = [[int(v) for v in np.asarray(r).reshape(-1)[:n]] for r, n in zip(cdfs, lengths)]
    if not len(rows) == len(lengths) == len(offs) == len(cdfs):
        raise ValueError("cdfs/cdf_lengths/offsets: one entry per table")
    for k, (row, n) in enumerate(zip(rows, lengths)):
        ok = 2 <= n == len(row) and row[0] == 0 and row[-1] == 1 << PRECISION
        if not ok or any(b <= a for a, b in zip(row, row[1:])):
            raise ValueError(f"cdfs: row {k} is not a valid 16-bit CDF")
    return rows, offs


def _escape(value: int, max_value: int) -> list[int]:
    """Chunks pushed after the escape bin: count, then raw value low chunk first."""
    raw = -2 * value - 1 if value < 0 else 2 * (value - max_value)
    if raw > MASK32:
        raise ValueError("symbols: value too far outside its table")
    chunks = []
    while raw >> (BYPASS_BITS * len(chunks)):
        chunks.append((raw >> (BYPASS_BITS * len(chunks))) & BYPASS_MAX)
    count = len(chunks)
    head = [BYPASS_MAX] * (count // BYPASS_MAX) + [count % BYPASS_MAX]
    return head + chunks


def encode(symbols, indexes, cdfs, cdf_lengths, offsets) -> bytes:
    rows, offs = _rows(cdfs, cdf_lengths, offsets)
    symbols = [int(v) for v in np.asarray(symbols).reshape(-1)]
    indexes = [int(v) for v in np.asarray(indexes).reshape(-1)]
    if len(symbols) != len(indexes):
        raise ValueError("symbols/indexes: one index per symbol")
    pending = []  # (start, freq) or (chunk, None) for a 4-bit bypass chunk
    for sym, t in zip(symbols, indexes):
        if not 0 <= t < len(rows):
            raise ValueError(f"indexes: {t} names no cdfs row")
        row, max_value = rows[t], len(rows[t]) - 2
        value = sym - offs[t]
        escaped = value < 0 or value >= max_value
        chunks = _escape(value, max_value) if escaped else []
        value = max_value if escaped else value
        pending.append((row[value], row[value + 1] - row[value]))
        pending.extend((c, None) for c in chunks)

    x, words = RANS_L, []  # words are produced last-first
    for start, freq in reversed(pending):
        bits = PRECISION if freq is not None else BYPASS_BITS
        limit = ((RANS_L >> PRECISION) << 32) * (
            freq if freq is not None else 1 << (PRECISION - bits)
        )
        if x >= limit:
            words.append(x & MASK32)
            x >>= 32
        if freq is None:
            x = (x << BYPASS_BITS) | start
        else:
            x = ((x // freq) << PRECISION) + x % freq + start
    words += [x >> 32, x & MASK32]
    return np.array(words[::-1], dtype="<u4").tobytes()


def decode(data, indexes, cdfs, cdf_lengths, offsets) -> np.ndarray:
    rows, offs = _rows(cdfs, cdf_lengths, offsets)
    data = bytes(data)
    if len(data) < 8 or len(data) % 4:
        raise ValueError("data: not a whole number of 32-bit words")
    words = [int(w) for w in np.frombuffer(data, dtype="<u4")]
    x, pos = words[0] | words[1] << 32, 2

    def renorm(x):
        nonlocal pos
        if x < RANS_L:
            if pos >= len(words):
                raise ValueError("data: truncated")
            x = (x << 32) | words[pos]
            pos += 1
        return x

    def get_bits():
        nonlocal x
        val = x & BYPASS_MAX
        x = renorm(x >> BYPASS_BITS)
        return val

    out = []
    for t in (int(v) for v in np.asarray(indexes).reshape(-1)):
        if not 0 <= t < len(rows):
            raise ValueError(f"indexes: {t} names no cdfs row")
        row, max_value = rows[t], len(rows[t]) - 2
        cf = x & ((1 << PRECISION) - 1)
        s = min(bisect.bisect_right(row, cf) - 1, max_value)  # row[s] <= cf < row[s + 1]
        x = renorm((row[s + 1] - row[s]) * (x >> PRECISION) + cf - row[s])
        value = s
        if s == max_value:
            count = get_bits()
            if count > MAX_CHUNKS:
                raise ValueError("data: corrupt bypass count")
            raw = sum(get_bits() << (BYPASS_BITS * j) for j in range(count))
            value = -(raw >> 1) - 1 if raw & 1 else (raw >> 1) + max_value
        value += offs[t]
        if not -(2**31) <= value < 2**31:
            raise ValueError("data: corrupt bypass value")
        out.append(value)
    if x != RANS_L or pos != len(words):
        raise ValueError("data: stream did not end cleanly")
    return np.array(out, dtype=np.int32)
