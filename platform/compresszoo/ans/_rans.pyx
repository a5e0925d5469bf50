# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled rANS kernels: 64-bit state, 32-bit words, 16-bit CDFs, 4-bit bypass escape.

Byte-compatible with CompressAI's `compressai.ans`. compresszoo.ans.rans validates
inputs; tables must pass check_tables before encode/decode, which then check every
index and stream position themselves and return error codes instead of crashing.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize

cdef extern from *:
    """
    #define CZ_RANS_L (1ull << 31)
    """
    const uint64_t CZ_RANS_L

cdef enum:
    PRECISION = 16
    PROB_MASK = 0xFFFF
    BYPASS_BITS = 4
    BYPASS_MASK = 15
    # An int32 needs at most 8 four-bit chunks; a larger count means a corrupt stream.
    MAX_CHUNKS = 8
    GUIDE_SHIFT = 8  # 65536 >> 8 = 256 guide buckets per table
    GUIDE_SIZE = 256
    NO_ESCAPE = -1  # _escape(): the value is inside its table
    NOT_CODABLE = -2  # _escape(): too far outside for 32 bits

cdef enum:
    ERR_INDEX = 1  # an index outside [0, n_tables)
    ERR_RANGE = 2  # symbol - offset too far outside the table for 8 bypass chunks
    ERR_TRUNCATED = 3  # the decoder ran past the last word
    ERR_CORRUPT = 4  # an impossible bypass count or value
    ERR_MEMORY = 5

# The same codes for the Python wrapper, which turns them into messages.
ERRORS = {ERR_INDEX: "index", ERR_RANGE: "range", ERR_TRUNCATED: "truncated",
          ERR_CORRUPT: "corrupt"}

ctypedef struct OutBuf:
    uint32_t *base  # the stream is written backwards from base + cap
    uint32_t *ptr
    Py_ssize_t cap


cdef inline int _grow(OutBuf *out) noexcept nogil:
    """Double the buffer, keeping the written tail at its end."""
    cdef Py_ssize_t used = out.cap - (out.ptr - out.base)
    cdef Py_ssize_t cap = out.cap * 2 + 16
    cdef uint32_t *base = <uint32_t *> malloc(cap * sizeof(uint32_t))
    if base == NULL:
        return ERR_MEMORY
    memcpy(base + cap - used, out.ptr, used * sizeof(uint32_t))
    free(out.base)
    out.base = base
    out.cap = cap
    out.ptr = base + cap - used
    return 0


cdef inline int _put(uint64_t *state, OutBuf *out, uint32_t start, uint32_t freq) noexcept nogil:
    """Encode one symbol of a 16-bit CDF (ryg's Rans64EncPut)."""
    cdef uint64_t x = state[0]
    # Renormalize so the new state stays below 2^63: ((L >> 16) << 32) * freq.
    if x >= ((CZ_RANS_L >> PRECISION) << 32) * freq:
        if out.ptr == out.base and _grow(out):
            return ERR_MEMORY
        out.ptr -= 1
        out.ptr[0] = <uint32_t> x
        x >>= 32
    state[0] = ((x // freq) << PRECISION) + (x % freq) + start
    return 0


cdef inline int _put_bits(uint64_t *state, OutBuf *out, uint32_t val) noexcept nogil:
    """Encode 4 raw bits (the reference's Rans64EncPutBits with nbits = 4)."""
    cdef uint64_t x = state[0]
    if x >= ((CZ_RANS_L >> PRECISION) << 32) * (1u << (PRECISION - BYPASS_BITS)):
        if out.ptr == out.base and _grow(out):
            return ERR_MEMORY
        out.ptr -= 1
        out.ptr[0] = <uint32_t> x
        x >>= 32
    state[0] = (x << BYPASS_BITS) | val
    return 0


cdef inline int _n_chunks(uint64_t raw) noexcept nogil:
    cdef int n = 0
    while (raw >> (BYPASS_BITS * n)) != 0:
        n += 1
    return n


cdef inline int _escape(int64_t *value, int32_t maxv, uint64_t *raw) noexcept nogil:
    """A value outside [0, maxv) goes to the tail bin: sets *raw (zigzag distance), sets
    *value = maxv and returns its number of bypass chunks (0 or more). Returns NO_ESCAPE
    when the value is in range and NOT_CODABLE when it is too far out for 32 bits."""
    if value[0] >= 0 and value[0] < maxv:
        return NO_ESCAPE
    if value[0] < 0:
        raw[0] = <uint64_t> (-2 * value[0] - 1)
    else:
        raw[0] = <uint64_t> (2 * (value[0] - maxv))
    if raw[0] > 0xFFFFFFFFu:
        return NOT_CODABLE
    value[0] = maxv
    return _n_chunks(raw[0])


cdef object _finish_out(OutBuf *out, uint64_t state):
    """Flush the state (two words, low first) and return the stream as bytes."""
    cdef object result
    while out.ptr - out.base < 2:
        if _grow(out):
            free(out.base)
            raise MemoryError("rANS output buffer")
    out.ptr -= 2
    out.ptr[0] = <uint32_t> state
    out.ptr[1] = <uint32_t> (state >> 32)
    result = PyBytes_FromStringAndSize(
        <char *> out.ptr, (out.cap - (out.ptr - out.base)) * sizeof(uint32_t))
    free(out.base)
    return result


cdef int _init_out(OutBuf *out, Py_ssize_t n) noexcept nogil:
    out.cap = n // 4 + 64
    out.base = <uint32_t *> malloc(out.cap * sizeof(uint32_t))
    if out.base == NULL:
        return ERR_MEMORY
    out.ptr = out.base + out.cap
    return 0


def check_tables(const int32_t[:, ::1] cdfs, const int32_t[::1] lengths):
    """Return (row, reason) of the first invalid CDF row, or (-1, 0) if all are valid.

    reason: 1 length < 2, 2 length > row width, 3 cdf[0] != 0,
    4 not strictly increasing, 5 last value != 65536.
    """
    cdef Py_ssize_t r, j, width = cdfs.shape[1], bad = -1
    cdef int32_t n
    cdef int reason = 0
    if lengths.shape[0] != cdfs.shape[0]:
        raise ValueError("check_tables: one length per CDF row")
    with nogil:
        for r in range(cdfs.shape[0]):
            n = lengths[r]
            if n < 2:
                reason = 1
            elif n > width:
                reason = 2
            elif cdfs[r, 0] != 0:
                reason = 3
            else:
                for j in range(1, n):
                    if cdfs[r, j] <= cdfs[r, j - 1]:
                        reason = 4
                        break
                if reason == 0 and cdfs[r, n - 1] != (1 << PRECISION):
                    reason = 5
            if reason:
                bad = r
                break
    return (bad, reason)


def encode(const int32_t[::1] symbols, const int32_t[::1] indexes,
           const int32_t[:, ::1] cdfs, const int32_t[::1] lengths,
           const int32_t[::1] offsets):
    """One-shot encode; returns (error, position, bytes or None).

    Walks the symbols backwards, emitting each symbol's bypass chunks before its
    CDF symbol, which is what the reference's buffered flush produces.
    """
    cdef Py_ssize_t n = symbols.shape[0], ntab = cdfs.shape[0], i = 0
    cdef OutBuf out
    cdef uint64_t state = CZ_RANS_L, raw
    cdef int64_t value
    cdef int32_t t, maxv, nb, j
    cdef int err = 0
    cdef const int32_t *row
    if indexes.shape[0] != n or lengths.shape[0] != ntab or offsets.shape[0] != ntab:
        raise ValueError("encode: array sizes disagree")
    if _init_out(&out, n):
        raise MemoryError("rANS output buffer")
    with nogil:
        for i in range(n - 1, -1, -1):
            t = indexes[i]
            if t < 0 or t >= ntab:
                err = ERR_INDEX
                break
            row = &cdfs[t, 0]
            maxv = lengths[t] - 2
            value = <int64_t> symbols[i] - offsets[t]
            nb = _escape(&value, maxv, &raw)
            if nb == NOT_CODABLE:
                err = ERR_RANGE
                break
            if nb != NO_ESCAPE:
                for j in range(nb - 1, -1, -1):
                    err |= _put_bits(&state, &out, (raw >> (BYPASS_BITS * j)) & BYPASS_MASK)
                # nb <= 8 < 15, so the chunk count is always a single chunk.
                err |= _put_bits(&state, &out, nb)
                if err:
                    break
            err = _put(&state, &out, row[value], row[value + 1] - row[value])
            if err:
                break
    if err:
        free(out.base)
        if err == ERR_MEMORY:
            raise MemoryError("rANS output buffer")
        return (err, i, None)
    return (0, n, _finish_out(&out, state))


def buffer_symbols(const int32_t[::1] symbols, const int32_t[::1] indexes,
                   const int32_t[:, ::1] cdfs, const int32_t[::1] lengths,
                   const int32_t[::1] offsets, Py_ssize_t first,
                   uint16_t[::1] starts, uint32_t[::1] freqs, uint8_t[::1] bypass,
                   Py_ssize_t size):
    """Append symbols[first:] as (start, freq, bypass) entries at `size`.

    Stops early when fewer than 10 free entries remain (a symbol takes at most
    1 + 1 + 8); returns (error, next symbol, new size) so the caller can grow
    the buffers and resume.
    """
    cdef Py_ssize_t n = symbols.shape[0], ntab = cdfs.shape[0], cap = starts.shape[0]
    cdef Py_ssize_t i = first
    cdef uint64_t raw
    cdef int64_t value
    cdef int32_t t, maxv, nb, j
    cdef int err = 0
    cdef const int32_t *row
    if (indexes.shape[0] != n or lengths.shape[0] != ntab or offsets.shape[0] != ntab
            or freqs.shape[0] != cap or bypass.shape[0] != cap):
        raise ValueError("buffer_symbols: array sizes disagree")
    with nogil:
        while i < n and size + 2 + MAX_CHUNKS <= cap:
            t = indexes[i]
            if t < 0 or t >= ntab:
                err = ERR_INDEX
                break
            row = &cdfs[t, 0]
            maxv = lengths[t] - 2
            value = <int64_t> symbols[i] - offsets[t]
            nb = _escape(&value, maxv, &raw)
            if nb == NOT_CODABLE:
                err = ERR_RANGE
                break
            starts[size] = <uint16_t> row[value]
            freqs[size] = <uint32_t> (row[value + 1] - row[value])
            bypass[size] = 0
            size += 1
            if nb != NO_ESCAPE:
                starts[size] = <uint16_t> nb
                freqs[size] = 1
                bypass[size] = 1
                size += 1
                for j in range(nb):
                    starts[size] = <uint16_t> ((raw >> (BYPASS_BITS * j)) & BYPASS_MASK)
                    freqs[size] = 1
                    bypass[size] = 1
                    size += 1
            i += 1
    return (err, i, size)


def flush_symbols(const uint16_t[::1] starts, const uint32_t[::1] freqs,
                  const uint8_t[::1] bypass, Py_ssize_t size):
    """Encode buffered entries [0, size) last to first; returns the stream bytes."""
    cdef OutBuf out
    cdef uint64_t state = CZ_RANS_L
    cdef Py_ssize_t k
    cdef int err = 0
    if size < 0 or size > starts.shape[0] or size > freqs.shape[0] or size > bypass.shape[0]:
        raise ValueError("flush_symbols: size outside the buffers")
    if _init_out(&out, size):
        raise MemoryError("rANS output buffer")
    with nogil:
        for k in range(size - 1, -1, -1):
            if bypass[k]:
                err = _put_bits(&state, &out, starts[k] & BYPASS_MASK)
            elif freqs[k] == 0 or starts[k] + freqs[k] > (1u << PRECISION):
                err = ERR_RANGE
            else:
                err = _put(&state, &out, starts[k], freqs[k])
            if err:
                break
    if err:
        free(out.base)
        if err == ERR_MEMORY:
            raise MemoryError("rANS output buffer")
        raise ValueError("flush_symbols: invalid buffered entry")
    return _finish_out(&out, state)


cdef inline int _get_bits(uint64_t *state, const uint32_t *words, Py_ssize_t nwords,
                          Py_ssize_t *pos, uint32_t *val) noexcept nogil:
    cdef uint64_t x = state[0]
    val[0] = <uint32_t> (x & BYPASS_MASK)
    x >>= BYPASS_BITS
    if x < CZ_RANS_L:
        if pos[0] >= nwords:
            return ERR_TRUNCATED
        x = (x << 32) | words[pos[0]]
        pos[0] += 1
    state[0] = x
    return 0


def decode(const uint32_t[::1] words, Py_ssize_t pos, uint64_t state,
           const int32_t[::1] indexes, const int32_t[:, ::1] cdfs,
           const int32_t[::1] lengths, const int32_t[::1] offsets, int32_t[::1] out):
    """Decode len(indexes) symbols into out, starting at word `pos` with `state`.

    Tables must have passed check_tables. Returns (error, symbol position, pos, state);
    on error the caller discards pos and state.
    """
    cdef Py_ssize_t n = indexes.shape[0], ntab = cdfs.shape[0], nwords = words.shape[0]
    cdef Py_ssize_t width = cdfs.shape[1], i = 0, b, k
    cdef uint64_t x = state, raw
    cdef uint32_t cf, start, freq, chunk, nb
    cdef int32_t t, maxv, s, lo, hi, mid, j
    cdef int64_t value
    cdef int err = 0
    cdef const int32_t *row
    cdef const uint32_t *wp
    cdef uint16_t *guide = NULL
    cdef bint use_guide
    if out.shape[0] != n or lengths.shape[0] != ntab or offsets.shape[0] != ntab:
        raise ValueError("decode: array sizes disagree")
    if nwords < 2 or pos < 2 or pos > nwords:
        raise ValueError("decode: a stream has at least 2 words and pos is in [2, len]")
    # A 256-bucket guide per table turns the symbol search into one lookup plus
    # a short scan; it only pays for itself when there are many symbols per table.
    wp = &words[0]
    use_guide = n >= 64 * ntab
    if use_guide:
        guide = <uint16_t *> malloc(ntab * GUIDE_SIZE * sizeof(uint16_t))
        if guide == NULL:
            raise MemoryError("rANS guide table")
        with nogil:
            for t in range(ntab):
                row = &cdfs[t, 0]
                s = 0
                for b in range(GUIDE_SIZE):
                    while row[s + 1] <= (b << GUIDE_SHIFT):
                        s += 1
                    guide[t * GUIDE_SIZE + b] = <uint16_t> s
    with nogil:
        for i in range(n):
            t = indexes[i]
            if t < 0 or t >= ntab:
                err = ERR_INDEX
                break
            row = &cdfs[t, 0]
            maxv = lengths[t] - 2
            cf = <uint32_t> (x & PROB_MASK)
            # Find s with row[s] <= cf < row[s + 1]; row ends at 65536 > cf.
            if use_guide:
                s = guide[t * GUIDE_SIZE + (cf >> GUIDE_SHIFT)]
                while <uint32_t> row[s + 1] <= cf:
                    s += 1
            else:
                lo = 0
                hi = maxv + 1
                while hi - lo > 1:
                    mid = (lo + hi) >> 1
                    if <uint32_t> row[mid] <= cf:
                        lo = mid
                    else:
                        hi = mid
                s = lo
            start = <uint32_t> row[s]
            freq = <uint32_t> row[s + 1] - start
            x = freq * (x >> PRECISION) + (x & PROB_MASK) - start
            if x < CZ_RANS_L:
                if pos >= nwords:
                    err = ERR_TRUNCATED
                    break
                x = (x << 32) | wp[pos]
                pos += 1
            if s == maxv:
                err = _get_bits(&x, wp, nwords, &pos, &nb)
                if err:
                    break
                if nb > MAX_CHUNKS:
                    err = ERR_CORRUPT
                    break
                raw = 0
                for j in range(<int32_t> nb):
                    err = _get_bits(&x, wp, nwords, &pos, &chunk)
                    if err:
                        break
                    raw |= (<uint64_t> chunk) << (BYPASS_BITS * j)
                if err:
                    break
                if raw & 1:
                    value = -<int64_t> (raw >> 1) - 1
                else:
                    value = <int64_t> (raw >> 1) + maxv
            else:
                value = s
            value += offsets[t]
            if value < -2147483648 or value > 2147483647:
                err = ERR_CORRUPT
                break
            out[i] = <int32_t> value
    free(guide)
    if err:
        return (err, i, pos, state)
    return (0, n, pos, x)
