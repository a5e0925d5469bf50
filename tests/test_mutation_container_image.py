"""The .czoo container and the image codec, field by field, in process (mutation testing,
benchmarks/mutation.py, counts only in-process kills): format-2 files built here byte by byte
from the layout the module docstring documents, with a recomputed CRC so the checks behind it
are reached; format-1 headers written by hand; each refusal with the message that names what
is wrong. The container tests need no model (the streams are opaque bytes to it)."""

from __future__ import annotations

import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch

from compresszoo import limits
from compresszoo.codec import container as C
from compresszoo.codec.container import (
    ContainerError,
    ContainerLimitError,
    Header,
    pack,
    read_header,
    unpack,
)
from compresszoo.codec.image import (
    _order_kw,
    check_model,
    decode_image,
    decode_streams,
    encode_image,
    encode_with_latents,
    pad,
)

FP = "0123456789abcdef"  # a weights id; format 2 keeps its first 8 hex digits
ARCH = ("bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean", "mbt2018")


def leb128(n: int) -> bytes:
    """Unsigned LEB128, written independently of the module under test."""
    out = b""
    while n >= 0x80:
        out += bytes([(n & 0x7F) | 0x80])
        n >>= 7
    return out + bytes([n])


def crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def v2(flags: int = 1, model: int = 0x12, *, nm: tuple | None = None, fp: bytes = bytes.fromhex(FP[:8]),
       h: int = 64, w: int = 96, count: int | None = None, lengths=(), payload: bytes = b"") -> bytes:
    """A format-2 body (no CRC) from the documented layout; raw varint fields as bytes."""
    def field(v):
        return v if isinstance(v, bytes) else leb128(v)

    body = b"CZ\x02" + bytes([flags, model])
    if nm is not None:
        body += field(nm[0]) + field(nm[1])
    body += fp + field(h) + field(w)
    if count is not None:
        body += field(count)
    return body + b"".join(field(n) for n in lengths) + payload


def hdr(arch="bmshj2018-hyperprior", metric="mse", quality=3, N=128, M=192, *, h=64, w=96, batched=False,
        shape=None, lengths=None, version=2, portable=True, order="wavefront", weights=FP) -> Header:
    per = 1 if arch == "bmshj2018-factorized" else 2
    ds = 16 if arch == "bmshj2018-factorized" else 64
    shape = [-(-h // 64) * 64 // ds, -(-w // 64) * 64 // ds] if shape is None else shape
    lengths = [[3, 4][:per]] if lengths is None else lengths
    return Header(arch, metric, quality, N, M, weights, h, w, batched, shape, lengths, version=version,
                  portable=portable, order=order)


def streams_for(header: Header) -> list[list[bytes]]:
    return [[bytes([65 + 7 * i + j]) * n for j, n in enumerate(img)] for i, img in enumerate(header.stream_lengths)]


def refused(data, pattern: str | None, fn=unpack, kind=ContainerError):
    with pytest.raises(kind, match=pattern) as err:
        fn(data)
    return err.value


# ------------------------------------------------------------ helpers: show, pixels, orders


def test_show_cuts_escapes_and_survives_deep_nesting():
    assert C.show("a" * 40) == "'" + "a" * 40 + "'"  # 42 characters: the limit plus quotes
    assert C.show("a" * 41) == "'" + "a" * 40 + "'"  # a long string is cut before it is quoted
    assert C.show("\x1b[2J") == "'\\x1b[2J'" and C.show("é") == "'\\xe9'"
    assert C.show(12345) == "12345" and C.show(None) == "None"
    assert C.show(list(range(20))) == ascii(list(range(20)))[:40] + "..."
    assert C.show([0] * 13) == ascii([0] * 13)  # 39 characters: kept whole
    assert C.show("abcdef", limit=3) == "'abc'"
    assert C.show([10, 20, 30], limit=5) == "[10, ..."
    assert C.show([1, 2, 3, 4, 5], limit=13) == "[1, 2, 3, 4, 5]"  # 15 = limit + 2: whole
    assert C.show([1, 2, 3, 4, 55], limit=13) == "[1, 2, 3, 4, ..."  # 16 = limit + 3: cut
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    assert C.show(nested) == "<deeply nested value>"


def test_padded_pixels_and_the_pixel_check(monkeypatch):
    assert C.padded_pixels(1, 1) == 64 * 64
    assert C.padded_pixels(64, 64) == 64 * 64
    assert C.padded_pixels(65, 129, 3) == 128 * 192 * 3
    assert C.padded_pixels(200, 1, 2) == 256 * 64 * 2
    monkeypatch.setenv("COMPRESSZOO_MAX_PIXELS", str(2 * 128 * 64))
    C.check_pixels(65, 64, 2, "here")  # exactly the limit
    with pytest.raises(limits.LimitError) as err:
        C.check_pixels(65, 64, 3, "the source")
    assert str(err.value) == ("the source (3 image(s) of 65x64, padded to multiples of 64): declared image "
                              "pixels 24,576 exceeds the limit of 16,384 (raise it with COMPRESSZOO_MAX_PIXELS=<n>)")


def test_streams_latent_shapes_and_file_orders():
    assert [C.streams_per_image(a) for a in ARCH] == [1, 2, 2, 2]
    assert C.latent_shape("bmshj2018-factorized", 65, 64) == [8, 4]
    assert C.latent_shape("bmshj2018-hyperprior", 65, 200) == [2, 4]
    assert C.latent_shape("mbt2018", 1, 129) == [1, 3]
    assert [C.file_order(a, "raster") for a in ARCH] == ["wavefront"] * 3 + ["raster"]
    assert [C.file_order(a, "wavefront") for a in ARCH] == ["wavefront"] * 4
    with pytest.raises(ValueError, match=r"^unknown coding order 'zigzag'; valid: wavefront, raster$"):
        C.file_order("mbt2018", "zigzag")


def test_header_model_text_and_image_count():
    h = hdr(lengths=[[1, 2], [3, 4], [5, 6]], batched=True)
    assert h.num_images == 3
    assert h.model_text() == "bmshj2018-hyperprior mse q3 (N=128, M=192, weights 0123456789abcdef)"


# ------------------------------------------------------------------------ varints


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**28 - 1, 2**28, 2**35 - 1])
def test_varints_round_trip_at_every_width(n):
    enc = C._varint(n)
    assert enc == leb128(n)
    assert C._read_varint(b"\xff" + enc + b"\x07", 1, "x") == (n, 1 + len(enc))


def test_varint_refusals_name_the_field():
    with pytest.raises(ContainerError, match=r"^truncated or corrupted file: the header ends inside the thing$"):
        C._read_varint(b"\x80\x80", 0, "the thing")
    with pytest.raises(ContainerError, match="ends inside the thing"):
        C._read_varint(b"\x05", 1, "the thing")
    with pytest.raises(ContainerError, match=r"^corrupted file: the thing is not minimally encoded$"):
        C._read_varint(b"\x81\x00", 0, "the thing")
    with pytest.raises(ContainerError, match=r"^corrupted file: the thing is longer than 5 bytes$"):
        C._read_varint(leb128(2**35) + b"\x00", 0, "the thing")
    assert C._read_varint(b"\x80\x01", 0, "x") == (128, 2)


# ------------------------------------------------------------------------ format 2: writing


def test_pack_writes_the_documented_bytes():
    h = hdr()  # hyperprior q3 mse, zoo channels, portable, one image
    assert pack(h, streams_for(h)) == crc(v2(1, 0x12, lengths=[3], payload=b"AAABBBB"))
    h = hdr("bmshj2018-factorized", quality=1, portable=False, h=1, w=1, lengths=[[5]])
    assert pack(h, streams_for(h)) == crc(v2(0, 0x00, h=1, w=1, payload=b"AAAAA"))
    h = hdr("mbt2018", "ms-ssim", 8, N=5, M=300, h=200, w=1, batched=True, order="raster",
            lengths=[[1, 2], [3, 0]])
    want = v2(2 | 4 | 8 | 1, 0x3F, nm=(5, 300), h=200, w=1, count=2, lengths=[1, 2, 3], payload=b"ABBHHH")
    assert pack(h, streams_for(h)) == crc(want)
    h = hdr("mbt2018-mean", "mse", 5, N=192, M=320, batched=True, lengths=[[2, 1]])  # zoo channels at q5
    assert pack(h, streams_for(h)) == crc(v2(3, 0x24, count=1, lengths=[2], payload=b"AAB"))
    h = hdr("mbt2018", quality=4, N=192, M=192)
    assert pack(h, streams_for(h)) == crc(v2(1, 0x33, lengths=[3], payload=b"AAABBBB"))


@pytest.mark.parametrize("header", [
    hdr(),
    hdr("bmshj2018-factorized", "ms-ssim", 8, N=192, M=320, h=1000, w=3, portable=False, lengths=[[0]]),
    hdr("mbt2018", "ms-ssim", 2, N=7, M=9, batched=True, order="raster", lengths=[[0, 0], [1, 200], [130, 0]]),
    hdr("mbt2018-mean", quality=6, N=192, M=320, batched=True, lengths=[[4, 5]]),
], ids=["hyperprior", "factorized", "mbt2018-batch", "mean-batch-of-one"])
def test_format_2_round_trips_every_field_and_stream(header):
    streams = streams_for(header)
    data = pack(header, streams)
    got, got_streams = unpack(data)
    assert got == Header(**{**header.__dict__, "weights_id": FP[:8]})
    assert [type(n) for n in got.latent_shape] == [int, int]  # not 4.0: `compresszoo info` prints it
    assert got_streams == streams
    assert read_header(data) == got
    assert unpack(bytearray(data)) == (got, streams) and unpack(memoryview(data)) == (got, streams)


def test_the_smallest_format_2_file_is_15_bytes():
    h = hdr("bmshj2018-factorized", h=1, w=1, lengths=[[0]])
    data = pack(h, [[b""]])
    assert len(data) == 15
    assert unpack(data)[1] == [[b""]]
    refused(crc(data[:10]), r"^truncated file: shorter than the smallest format-2 header$")
    refused(b"CZ", "shorter than the smallest format-2 header")
    refused(b"CZ\x02" + bytes(11), "shorter than the smallest format-2 header", fn=read_header)


@pytest.mark.parametrize("change,pattern", [
    (dict(arch="bmshj2018"), r"^format 2 cannot name bmshj2018 mse q3$"),
    (dict(metric="psnr"), r"^format 2 cannot name bmshj2018-hyperprior psnr q3$"),
    (dict(quality=0), "cannot name .* q0"),
    (dict(quality=9, N=1, M=1), "cannot name .* q9"),
    (dict(lengths=[]), r"^a file holds one image, or a batch of at least one$"),
    (dict(lengths=[[1, 1], [1, 1]]), "a file holds one image"),
    (dict(lengths=[[1]]), r"^bmshj2018-hyperprior writes 2 stream\(s\) per image$"),
    (dict(arch="bmshj2018-factorized", lengths=[[1, 1]]), r"^bmshj2018-factorized writes 1 stream\(s\) per image$"),
    (dict(shape=[1, 1]), r"^latent shape \[1, 1\] does not follow from a 64x96 image$"),
    (dict(shape=(1, 2)), None),  # a tuple names the same shape
    (dict(order="raster"), r"^a bmshj2018-hyperprior file records order 'wavefront' \(it has no context model\)$"),
    (dict(order="spiral"), "unknown coding order 'spiral'"),
    (dict(N=1025), "COMPRESSZOO_MAX_CHANNELS"),  # the reader would refuse it: never written
    (dict(h=8193, w=8192, shape=[129, 128]), "COMPRESSZOO_MAX_PIXELS"),
])
def test_pack2_refuses_what_format_2_cannot_hold(change, pattern):
    h = hdr(**change)
    streams = streams_for(h)
    if pattern is None:
        assert unpack(pack(h, streams))[1] == streams
        return
    with pytest.raises(ValueError, match=pattern):
        pack(h, streams)


def test_pack_checks_lengths_and_format_1_options():
    h = hdr()
    with pytest.raises(ValueError, match=r"^stream lengths in the header do not match the streams$"):
        pack(h, [[b"AAA", b"BBB"]])
    for change, text in ((dict(version=1), "format 1 with portable=True, order=wavefront"),
                         (dict(version=1, portable=False, order="raster"), "format 1 with portable=False, order=raster"),
                         (dict(version=3, portable=False), "format 3 with portable=False, order=wavefront")):
        with pytest.raises(ValueError, match=r"^cannot write " + text + "$"):
            pack(hdr(**change), streams_for(h))


# ------------------------------------------------------------------------ format 2: reading


def test_every_flag_and_model_code_reads_back():
    for flags in range(16):
        model = (3 << 4) | (1 << 3) | 6  # mbt2018 ms-ssim q7
        nm = (3, 4) if flags & 4 else None
        count = 2 if flags & 2 else None
        n_len = 3 if flags & 2 else 1
        h, s = unpack(crc(v2(flags, model, nm=nm, count=count, lengths=[1] * n_len, payload=b"x" * (n_len + 1))))
        assert (h.portable, h.batched, h.order) == (bool(flags & 1), bool(flags & 2),
                                                    "raster" if flags & 8 else "wavefront")
        assert (h.architecture, h.metric, h.quality, h.N, h.M) == ("mbt2018", "ms-ssim", 7) + ((3, 4) if flags & 4 else (192, 320))
        assert h.version == 2 and h.num_images == (2 if flags & 2 else 1)
    for code, arch in enumerate(ARCH):
        for q in range(1, 9):
            h = read_header(crc(v2(0, (code << 4) | (q - 1), lengths=[0])))
            assert (h.architecture, h.metric, h.quality) == (arch, "mse", q)
            assert (h.N, h.M) == C._zoo(arch, q)


@pytest.mark.parametrize("flags,model", [(0x10, 0x12), (0x20, 0x12), (0x40, 0x12), (0x80, 0x12),
                                         (0x01, 0x52), (0x01, 0x92)])
def test_reserved_bits_are_refused(flags, model):
    refused(crc(v2(flags, model, lengths=[1], payload=b"ab")), r"^corrupted file: reserved header bits are set$",
            fn=read_header)


def test_the_raster_bit_is_refused_without_a_context_model():
    for code, arch in enumerate(ARCH[:3]):
        refused(crc(v2(8, code << 4, lengths=[0])),
                rf"^corrupted file: the raster-order bit is set for {arch}, which has no context model$")


def test_channel_fields_are_checked(monkeypatch):
    ok = read_header(crc(v2(4, 0x12, nm=(1, 1024), lengths=[0])))
    assert (ok.N, ok.M) == (1, 1024)
    refused(crc(v2(4, 0x12, nm=(0, 5), lengths=[0])), r"^corrupted file: N must be at least 1, got 0$")
    refused(crc(v2(4, 0x12, nm=(5, 0), lengths=[0])), r"^corrupted file: M must be at least 1, got 0$")
    for nm, name in (((1025, 5), "N"), ((5, 1025), "M")):
        err = refused(crc(v2(4, 0x12, nm=nm, lengths=[0])), None, kind=ContainerLimitError)
        assert isinstance(err, limits.LimitError)
        assert str(err) == (f"corrupted or foreign file: header field {name}: declared channel count 1,025 "
                            "exceeds the limit of 1,024 (raise it with COMPRESSZOO_MAX_CHANNELS=<n>)")
    refused(crc(v2(4, 0x12, nm=(b"\x81\x00", 5), lengths=[0])), r"^corrupted file: N is not minimally encoded$")
    refused(crc(v2(4, 0x12, nm=(5, b"\x80\x00"), lengths=[0])), r"^corrupted file: M is not minimally encoded$")


def test_header_ends_inside_each_field(monkeypatch):
    # without the CRC (read_header does not check it) each field can be the last bytes of the file
    monkeypatch.setenv("COMPRESSZOO_MAX_CHANNELS", str(2**30))
    big = 2**28  # a 5-byte varint
    head = v2(4, 0x12, nm=(big, big), fp=b"", h=b"", w=b"")
    assert len(head) == 15
    refused(head, r"^truncated or corrupted file: the header ends inside the weights fingerprint$", fn=read_header)
    refused(head + b"\x01\x02\x03", "ends inside the weights fingerprint", fn=read_header)
    refused(head + b"\x01\x02\x03\x04", r"^truncated or corrupted file: the header ends inside the image height$",
            fn=read_header)
    small = v2(4, 0x12, nm=(1, 1), h=b"\x80\x80\x80\x80", w=b"")
    refused(small, "ends inside the image height$", fn=read_header)
    refused(v2(4, 0x12, nm=(1, 1), h=1, w=b"\x80\x80\x80"), "ends inside the image width$", fn=read_header)
    refused(v2(6, 0x12, nm=(1, 1), h=1, w=1, count=b"\x80\x80"), "ends inside the image count$", fn=read_header)
    refused(v2(6, 0x12, nm=(1, 1), h=1, w=1, count=2, lengths=[3, b"\x80"]), "ends inside stream length 1$",
            fn=read_header)
    refused(v2(4, 0x12, nm=(1, 1), h=1, w=1, lengths=[b"\x80\x80\x80"]), "ends inside stream length 0$",
            fn=read_header)


@pytest.mark.parametrize("h,w,count,text", [(0, 96, None, "1 image(s) of 0x96"), (64, 0, None, "1 image(s) of 64x0"),
                                             (64, 96, 0, "0 image(s) of 64x96")])
def test_sizes_must_be_positive(h, w, count, text):
    flags = 3 if count is not None else 1
    refused(crc(v2(flags, 0x12, h=h, w=w, count=count, lengths=[1], payload=b"ab")),
            rf"^corrupted file: {re.escape(text)}; sizes must be positive$")


def test_declared_sizes_are_checked_against_the_pixel_limit_first(monkeypatch):
    edge = read_header(crc(v2(3, 0x12, h=8192, w=4096, count=2, lengths=[1, 1, 1], payload=b"abcd")))
    assert (edge.height, edge.width, edge.num_images) == (8192, 4096, 2)
    one = read_header(crc(v2(1, 0x12, h=1, w=1, lengths=[1], payload=b"ab")))
    assert (one.height, one.width, one.latent_shape) == (1, 1, [1, 1])
    for flags, h, w, count, what in ((1, 8193, 8192, None, "1 image(s) of 8193x8192"),
                                     (3, 8192, 4096, 3, "3 image(s) of 8192x4096"),
                                     (3, 2**34, 2**34, 2**34, "17179869184 image(s) of 17179869184x17179869184")):
        # no stream lengths: the limit is checked before they are read
        err = refused(crc(v2(flags, 0x12, h=h, w=w, count=count)), None, fn=read_header, kind=ContainerLimitError)
        assert isinstance(err, limits.LimitError)
        assert str(err).startswith(f"the file's header ({what}, padded to multiples of 64): declared image pixels ")
        assert str(err).endswith("(raise it with COMPRESSZOO_MAX_PIXELS=<n>)")
    monkeypatch.setenv("COMPRESSZOO_MAX_PIXELS", str(64 * 64))
    refused(crc(v2(1, 0x12, h=65, w=1, lengths=[1], payload=b"ab")), "COMPRESSZOO_MAX_PIXELS", fn=read_header)


def test_stream_lengths_must_fit_the_file():
    good = v2(3, 0x12, count=2, lengths=[1, 2, 3], payload=b"abcdefg")
    h, s = unpack(crc(good))
    assert h.stream_lengths == [[1, 2], [3, 1]] and s == [[b"a", b"bc"], [b"def", b"g"]]
    h, s = unpack(crc(good[:-1]))
    assert h.stream_lengths == [[1, 2], [3, 0]] and s == [[b"a", b"bc"], [b"def", b""]]
    refused(crc(good[:-2]), r"^truncated or corrupted file: stream lengths add up to more than the file holds$")
    refused(crc(v2(3, 0x12, count=2, lengths=[1, 200, 3], payload=b"abcdefg")), "add up to more")
    # the header itself runs into the checksum
    refused(v2(1, 0x12, nm=None, lengths=[b"\x81\x01"]) + b"\x01\x02", "add up to more", fn=read_header)


def test_the_checksum_is_checked_by_unpack_only():
    data = bytearray(pack(hdr(), streams_for(hdr())))
    data[-7] ^= 1  # a payload byte
    refused(bytes(data), r"^corrupted file: checksum mismatch \(the bytes changed after encoding\)$")
    assert read_header(bytes(data)).stream_lengths == [[3, 4]]
    data[-7] ^= 1
    data[-1] ^= 0x80  # the checksum itself
    refused(bytes(data), "checksum mismatch")


# ------------------------------------------------------------------------ the dispatcher


def test_what_is_not_a_compresszoo_file():
    refused("CZ\x02", r"^expected bytes, got str$")
    refused([1, 2], r"^expected bytes, got list$", fn=read_header)
    refused(crc(b"CZ\x03" + bytes(20)), r"^unsupported format version 3; this compresszoo reads versions 1, 2$")
    refused(crc(b"CZ\x01" + bytes(20)), "unsupported format version 1;")
    refused(crc(b"CZOO\x02" + bytes(20)), r"^unsupported format version 2; this compresszoo reads versions 1, 2$")
    bad = r"^not a compresszoo file \(bad magic\); it must start with b'CZ'$"
    refused(b"\x89PNG\r\n\x1a\n" + bytes(20), bad)
    refused(b"C", bad)
    refused(b"", bad, fn=read_header)
    refused(crc(b"CXOO\x01" + bytes(8)), bad)
    refused(crc(b"CZOO\x01" + bytes(3)), bad)  # 12 bytes: shorter than any format-1 file
    refused(crc(b"CZOO\x01" + bytes(4)), r"^corrupted file: unreadable header \(JSONDecodeError\)$")


# ------------------------------------------------------------------------ format 1

BASE = {"architecture": "bmshj2018-hyperprior", "metric": "mse", "quality": 3, "N": 128, "M": 192,
        "weights_id": FP, "height": 64, "width": 96, "batched": False, "latent_shape": [1, 2],
        "stream_lengths": [[3, 4]]}


def v1(fields=None, *, text: str | bytes | None = None, payload: bytes = b"AAABBBB", head_len=None) -> bytes:
    head = json.dumps(BASE if fields is None else fields) if text is None else text
    head = head.encode() if isinstance(head, str) else head
    n = len(head) if head_len is None else head_len
    return crc(b"CZOO\x01" + struct.pack("<I", n) + head + payload)


def test_format_1_is_written_and_read():
    h = hdr(version=1, portable=False)
    data = pack(h, streams_for(h))
    (n,) = struct.unpack_from("<I", data, 5)
    head = data[9:9 + n]
    assert data[:5] == b"CZOO\x01" and data[9 + n:-4] == b"AAABBBB" and data[-4:] == crc(data[:-4])[-4:]
    assert json.loads(head) == BASE and b" " not in head  # compact JSON
    assert list(json.loads(head)) == sorted(BASE)  # with sorted keys, as earlier versions wrote it
    assert unpack(data) == (h, [[b"AAA", b"BBBB"]])
    got = read_header(v1())
    assert got == h and (got.version, got.portable, got.order) == (1, False, "wavefront")
    two = v1({**BASE, "batched": True, "stream_lengths": [[1, 2], [0, 3]]}, payload=b"abcdef")
    assert unpack(two)[1] == [[b"a", b"bc"], [b"", b"def"]]
    batch = hdr(version=1, portable=False, batched=True, lengths=[[1, 2], [0, 3]])
    assert unpack(pack(batch, streams_for(batch))) == (batch, streams_for(batch))  # images back to back
    with pytest.raises(ContainerError, match="quality must be in"):
        pack(hdr(version=1, portable=False, quality=0), streams_for(h))


def test_format_1_framing_is_checked(monkeypatch):
    data = v1()
    refused(v1(head_len=len(json.dumps(BASE)) + 12), r"^truncated or corrupted file: header length runs past the end$")
    refused(data[:-5] + data[-4:], r"^corrupted file: checksum mismatch")
    assert read_header(data[:-1] + bytes([data[-1] ^ 1])).stream_lengths == [[3, 4]]
    refused(v1(payload=b"AAABBBBC"), r"^truncated or corrupted file: stream lengths do not add up to the file size$")
    refused(v1(payload=b"AAABBB"), "do not add up to the file size")
    n = len(json.dumps(BASE))
    monkeypatch.setenv("COMPRESSZOO_MAX_HEADER_BYTES", str(n))
    assert unpack(data)[0].height == 64  # exactly the limit
    monkeypatch.setenv("COMPRESSZOO_MAX_HEADER_BYTES", str(n - 1))
    err = refused(data, None, kind=ContainerLimitError)
    assert isinstance(err, limits.LimitError)
    assert str(err) == (f".czoo header: header bytes {n:,} exceeds the limit of {n - 1:,} "
                        "(raise it with COMPRESSZOO_MAX_HEADER_BYTES=<n>)")


def test_format_1_header_length_edge():
    # the header may end exactly where the checksum starts (no payload): then the lengths are 0
    fields = {**BASE, "stream_lengths": [[0, 0]]}
    head = json.dumps(fields).encode()
    data = crc(b"CZOO\x01" + struct.pack("<I", len(head)) + head)
    assert unpack(data)[1] == [[b"", b""]]
    data = crc(b"CZOO\x01" + struct.pack("<I", len(head) + 1) + head)
    refused(data, "header length runs past the end")


@pytest.mark.parametrize("text,pattern", [
    ('{"a":1,"a":2}', r"^corrupted file: the header repeats a field name$"),
    ('{"quality":NaN}', r"^corrupted file: the header holds the non-number 'NaN'$"),
    ('[[Infinity]]', "non-number 'Infinity'"),
    ("[" * 30_000 + "]" * 30_000, r"^corrupted file: unreadable header \(RecursionError\)$"),
    (b'{"a":"\xff"}', r"^corrupted file: unreadable header \(UnicodeDecodeError\)$"),
    ('{"a":', r"unreadable header \(JSONDecodeError\)$"),
    ("[" + "9" * 5000 + "]", r"unreadable header \(ValueError\)$"),
    ("[1,2,3]", r"^corrupted file: the header must be a JSON object, got list$"),
    ('"x"', "must be a JSON object, got str$"),
])
def test_unreadable_format_1_headers(text, pattern):
    refused(v1(text=text, payload=b""), pattern, fn=read_header)


def _f1(**changes):
    return {**BASE, **changes}


@pytest.mark.parametrize("fields,pattern", [
    ({k: v for k, v in BASE.items() if k not in ("metric", "N")}, r"^corrupted file: header fields missing metric, N$"),
    (_f1(extra=1), r"^corrupted file: header fields unknown 'extra'$"),
    ({**{k: v for k, v in BASE.items() if k != "M"}, "z": 1, "b": 2},
     r"^corrupted file: header fields missing M; unknown 'b', 'z'$"),
    (_f1(**{f"k{i}": i for i in range(7)}), r"unknown 'k0', 'k1', 'k2', 'k3', 'k4'$"),
    (_f1(architecture="\x1b[2J"), r"^corrupted file: header field architecture must be a name matching "
                                  r"\[A-Za-z0-9\]\[A-Za-z0-9\._-\]\{0,63\}, got '\\x1b\[2J'$"),
    (_f1(architecture="a" * 65), "architecture must be a name"),
    (_f1(architecture=7), "architecture must be a name matching .*, got 7$"),
    (_f1(metric="-mse"), "metric must be a name"),
    (_f1(weights_id="0123456"), r"weights_id must be a name matching \[0-9a-f\]\{8,64\}, got '0123456'$"),
    (_f1(weights_id="0123456789ABCDEF"), "weights_id must be a name"),
    (_f1(quality=0), r"^corrupted file: header field quality must be in \[1, 255\], got 0$"),
    (_f1(quality=256), r"quality must be in \[1, 255\], got 256$"),
    (_f1(quality="3"), r"^corrupted file: header field quality must be an integer, got '3'$"),
    (_f1(quality=True), "quality must be an integer, got True$"),
    (_f1(N=0), r"^corrupted file: header field N must be at least 1, got 0$"),
    (_f1(M=0), "header field M must be at least 1, got 0$"),
    (_f1(height=0), "header field height must be at least 1, got 0$"),
    (_f1(width=0), "header field width must be at least 1, got 0$"),
    (_f1(width=1.5), "header field width must be an integer, got 1.5$"),
    (_f1(batched=1), r"^corrupted file: header field batched must be true or false, got 1$"),
    (_f1(latent_shape=[1, 0]), r"^corrupted file: header field latent_shape must be two positive integers, "
                               r"got \[1, 0\]$"),
    (_f1(latent_shape=[1, True]), "latent_shape must be two positive integers"),
    (_f1(latent_shape=[1, 2, 3]), "latent_shape must be two"),
    (_f1(latent_shape=[1]), "latent_shape must be two"),
    (_f1(latent_shape=(1, 2)), None),  # JSON has no tuple: this is a list on the way back
    (_f1(latent_shape="ab"), "latent_shape must be two"),
    (_f1(stream_lengths="@"), r"^corrupted file: header field stream_lengths must be a list of lists of byte "
                              r"lengths, got '@'$"),
    (_f1(stream_lengths=[[3, 4], 7]), "stream_lengths must be a list of lists"),
    (_f1(stream_lengths=[]), r"^corrupted file: the header lists no images \(stream_lengths is empty\)$"),
    (_f1(stream_lengths=[[]]), r"^corrupted file: every image must have the same number of streams "
                               r"\(1 to 2\), got \[0\]$"),
    (_f1(stream_lengths=[[1, 2, 4]]), r"same number of streams \(1 to 2\), got \[3\]$"),
    (_f1(batched=True, stream_lengths=[[3, 4], [0]]), r"same number of streams \(1 to 2\), got \[2, 1\]$"),
    (_f1(stream_lengths=[[-1, 8]]), r"^corrupted file: stream lengths must be non-negative integers, got -1$"),
    (_f1(stream_lengths=[[3, "4"]]), "non-negative integers, got '4'$"),
    (_f1(stream_lengths=[[3, False]]), "non-negative integers, got False$"),
    (_f1(stream_lengths=[[0, -1]]), "non-negative integers, got -1$"),  # 0 is a valid length
    (_f1(stream_lengths=[[3, 4], [0, 0]]), r"^corrupted file: the header says batched=false but lists 2 images; "
                                           "a single-image file holds exactly one$"),
    (_f1(stream_lengths=[[7]]), None),  # one stream per image: the factorized prior
    (_f1(quality=255, N=1, M=1024, height=1, width=1), None),
])
def test_each_format_1_field_is_checked(fields, pattern):
    data = v1(fields)
    if pattern is None:
        got = unpack(data)[0]
        assert got == Header(**json.loads(json.dumps(fields)), version=1, portable=False)
        return
    refused(data, pattern, fn=read_header, kind=ContainerError)


def test_format_1_limits(monkeypatch):
    for ch in ("N", "M"):
        err = refused(v1(_f1(**{ch: 1025})), None, fn=read_header, kind=ContainerLimitError)
        assert str(err) == (f"corrupted or foreign file: header field {ch}: declared channel count 1,025 exceeds "
                            "the limit of 1,024 (raise it with COMPRESSZOO_MAX_CHANNELS=<n>)")
    err = refused(v1(_f1(height=8193, width=8192)), None, fn=read_header, kind=ContainerLimitError)
    assert isinstance(err, limits.LimitError)
    assert str(err).startswith("the file's header (1 image(s) of 8193x8192, padded to multiples of 64): ")
    monkeypatch.setenv("COMPRESSZOO_MAX_PIXELS", str(2 * 64 * 128))
    two = _f1(batched=True, stream_lengths=[[3, 4], [0, 0]])
    assert read_header(v1(two)).num_images == 2  # 2 x 64x128 padded: the limit exactly
    err = refused(v1({**two, "stream_lengths": [[3, 4], [0, 0], [0, 0]]}), None, fn=read_header, kind=ContainerLimitError)
    assert "(3 image(s) of 64x96" in str(err)


# ------------------------------------------------------------------------ the image codec (image.py)

@pytest.fixture(scope="module")
def zoo():
    """Debug-sized models (N=8, M=12): a hyperprior, the same with other weights, the
    factorized prior (one stream per image) and mbt2018 (a context model: two orders). Their
    weights are scaled so the latents follow the input (random weights code every image alike)."""
    from compresszoo.models import create_model

    def sensitive(name: str, seed: int = 0):
        torch.manual_seed(seed)
        m = create_model(name, 3, debug=True).eval()
        with torch.no_grad():
            m.g_a[6].weight.mul_(20.0)
            m.g_s[-1].weight.mul_(30.0)
            m.entropy_bottleneck.quantiles.mul_(3.0)
        m.update(force=True)
        return m

    return {"hyper": sensitive("bmshj2018-hyperprior"), "other": sensitive("bmshj2018-hyperprior", 1),
            "fact": sensitive("bmshj2018-factorized"), "mbt": sensitive("mbt2018")}


def picture(h: int = 20, w: int = 30, name: str = "astronaut") -> torch.Tensor:
    from photos import photo

    return photo(name, h, w)


def test_encode_refuses_what_is_not_an_rgb_float_image(zoo, monkeypatch):
    m = zoo["hyper"]
    with pytest.raises(TypeError, match=r"^image must be a float tensor in \[0, 1\], got ndarray$"):
        encode_image(m, np.zeros((3, 8, 8), np.float32))
    shape = r"^image must have shape \(3, H, W\) or \(N, 3, H, W\), got "
    for bad, text in ((torch.rand(8, 8), r"\(8, 8\)$"), (torch.rand(1, 1, 3, 8, 8), r"\(1, 1, 3, 8, 8\)$")):
        with pytest.raises(ValueError, match=shape + text):
            encode_image(m, bad)
    for bad, n in ((torch.rand(4, 8, 8), 4), (torch.rand(2, 1, 8, 8), 1)):
        with pytest.raises(ValueError, match=rf"^image must have 3 \(RGB\) channels, got {n}; convert it to RGB first$"):
            encode_image(m, bad)
    with pytest.raises(ValueError, match=r"^image must be float in \[0, 1\], got torch.uint8; divide uint8 images by 255$"):
        encode_image(m, torch.zeros(3, 8, 8, dtype=torch.uint8))
    for bad, text in ((torch.rand(0, 3, 8, 8), "(0, 3, 8, 8)"), (torch.rand(3, 0, 8), "(1, 3, 0, 8)"),
                      (torch.rand(3, 8, 0), "(1, 3, 8, 0)")):
        with pytest.raises(ValueError, match=rf"^image is empty: shape {re.escape(text)}; give at least one image "
                                             r"of at least 1x1 pixels$"):
            encode_image(m, bad)
    monkeypatch.setenv("COMPRESSZOO_MAX_PIXELS", str(2 * 64 * 64))
    with pytest.raises(limits.LimitError, match=r"^image to encode \(1 image\(s\) of 129x1, padded to multiples of 64\)"):
        encode_image(m, torch.rand(3, 129, 1))
    with pytest.raises(limits.LimitError, match=r"^image to encode \(3 image\(s\) of 1x64, padded"):
        encode_image(m, torch.rand(3, 3, 1, 64))
    assert read_header(encode_image(m, torch.rand(2, 3, 1, 64))).num_images == 2  # the limit exactly


def test_pad_replicates_the_last_row_and_column():
    x = torch.arange(2 * 3 * 65 * 70, dtype=torch.float32).reshape(2, 3, 65, 70)
    p = pad(x)
    assert p.shape == (2, 3, 128, 128)
    assert torch.equal(p[..., :65, :70], x)
    assert torch.equal(p[..., 65:, :70], x[..., 64:65, :].expand(2, 3, 63, 70))
    assert torch.equal(p[..., :65, 70:], x[..., :, 69:70].expand(2, 3, 65, 58))
    assert pad(x[..., :64, :]).shape == (2, 3, 64, 128) and pad(x[..., :64]).shape == (2, 3, 128, 64)
    whole = x[..., :64, :64]
    assert pad(x, 5) is x and pad(whole) is whole  # nothing to pad: the same tensor back
    assert pad(x, 13).shape == (2, 3, 65, 78)
    assert torch.equal(pad(x[0]), p[0])  # one image (3, H, W) as well


def test_order_keyword_only_when_not_the_default():
    assert _order_kw("wavefront") == {} and _order_kw("raster") == {"order": "raster"}


def test_encoded_header_names_the_model_and_the_image(zoo):
    from compresszoo.models.io import weights_id
    from compresszoo.models.registry import spec_of

    for key in ("hyper", "fact"):
        m = zoo[key]
        spec = spec_of(m)
        x = picture(20, 70)
        data, y_hat = encode_with_latents(m, x.double())  # any float dtype: coded as float32
        assert data == encode_image(m, x)
        h, streams = unpack(data)
        assert (h.architecture, h.metric, h.quality, h.N, h.M) == (spec.architecture, spec.metric, spec.quality,
                                                                  spec.N, spec.M)
        assert h.weights_id == weights_id(m)[:8]
        assert (h.height, h.width, h.batched, h.version, h.portable, h.order) == (20, 70, False, 2, True, "wavefront")
        assert h.latent_shape == C.latent_shape(spec.architecture, 20, 70)
        assert h.stream_lengths == [[len(s) for s in img] for img in streams]
        assert len(streams[0]) == C.streams_per_image(spec.architecture)
        header, out = decode_streams(data, m)
        assert header == h and torch.equal(out["y_hat"], y_hat)
        assert decode_image(data, m).shape == (3, 20, 70)
    one = encode_image(zoo["hyper"], x[None])
    assert read_header(one).batched and decode_image(one, zoo["hyper"]).shape == (1, 3, 20, 70)


def test_decoded_image_is_the_top_left_crop(zoo):
    m = zoo["hyper"]
    x = picture(20, 70)
    small = decode_image(encode_image(m, x), m)
    full = decode_image(encode_image(m, pad(x[None])[0]), m)  # the same padded pixels, not cropped
    assert full.shape == (3, 64, 128) and torch.equal(small, full[:, :20, :70])


def test_a_batch_codes_each_image_as_if_alone(zoo):
    m = zoo["mbt"]
    a, b = picture(20, 30), picture(20, 30, "coffee")
    data, y_hat = encode_with_latents(m, torch.stack([a, b]))
    h, streams = unpack(data)
    singles = [encode_with_latents(m, img) for img in (a, b)]
    assert h.batched and h.num_images == 2 and streams == [unpack(d)[1][0] for d, _ in singles]
    assert torch.equal(y_hat, torch.cat([y for _, y in singles]))
    assert torch.equal(decode_streams(data, m)[1]["y_hat"], y_hat)  # the decoder's latents, exactly
    assert not torch.equal(singles[0][1], singles[1][1])
    x_hat = decode_image(data, m)
    assert x_hat.shape == (2, 3, 20, 30)
    # The latents above are exact; the pixels come from g_s run on a batch of 2 against a batch
    # of 1, where oneDNN may pick other kernels (float summation order): equal up to float noise
    # of [0, 1] pixels, far below one 8-bit level (0.004).
    torch.testing.assert_close(x_hat[1], decode_image(singles[1][0], m), rtol=0, atol=1e-5)


def test_the_file_records_the_coding_order(zoo):
    m = zoo["mbt"]
    x = picture(64, 128)  # large enough for the two orders to give other streams
    raster, y_raster = encode_with_latents(m, x, order="raster")
    assert encode_image(m, x, order="raster") == raster
    assert unpack(raster)[1] != unpack(encode_image(m, x))[1]
    assert read_header(raster).order == "raster" and read_header(encode_image(m, x)).order == "wavefront"
    header, out = decode_streams(raster, m)
    assert header.order == "raster" and torch.equal(out["y_hat"], y_raster)
    hyper = encode_image(zoo["hyper"], x, order="raster")
    assert hyper == encode_image(zoo["hyper"], x) and read_header(hyper).order == "wavefront"
    with pytest.raises(ValueError, match="unknown coding order 'zigzag'"):
        encode_image(zoo["hyper"], x, order="zigzag")


def test_another_model_is_refused_naming_both(zoo):
    from compresszoo.models.io import weights_id

    data = encode_image(zoo["hyper"], picture())
    theirs, mine = weights_id(zoo["hyper"]), weights_id(zoo["other"])
    assert theirs[:8] != mine[:8]
    text = "bmshj2018-hyperprior mse q3 (N=8, M=12, weights {})"
    with pytest.raises(ContainerError) as err:
        decode_image(data, zoo["other"])
    assert str(err.value) == (f"this file was encoded with {text.format(theirs[:8])}, but the decoder was given "
                              f"{text.format(mine)}; decode with the same model")
    with pytest.raises(ContainerError, match="encoded with bmshj2018-factorized mse q3"):
        decode_image(encode_image(zoo["fact"], picture()), zoo["hyper"])
    check_model(read_header(data), zoo["hyper"])  # the model that wrote it


def _v1_file(model, x: torch.Tensor, **changes) -> bytes:
    from czoo_v1 import encode_v1

    data = encode_v1(model, x)
    header, streams = unpack(data)
    fields = {k: getattr(header, k) for k in C._FIELD_NAMES}
    fields.update(changes)
    payload = b"".join(s for img in streams for s in img)
    if "stream_lengths" in changes:
        payload = payload[:sum(map(sum, changes["stream_lengths"]))]
    return v1(fields, payload=payload)


def test_format_1_files_decode_on_the_float_path_and_are_checked_against_the_model(zoo):
    m = zoo["hyper"]
    x = picture(20, 70)
    data = _v1_file(m, x)
    h = read_header(data)
    assert (h.version, h.portable, h.latent_shape) == (1, False, [1, 2])
    check_model(h, m)  # the full weights id
    header, out = decode_streams(data, m)
    ref = m.compress(pad(x[None]), portable=False, return_latents=True)
    assert torch.equal(out["y_hat"], ref["y_hat"])
    assert torch.equal(decode_image(data, m), m.decompress(ref["strings"], ref["shape"])["x_hat"][0, :, :20, :70])
    with pytest.raises(ContainerError, match=r"weights [0-9a-f]{16}\), but the decoder was given .* weights "):
        decode_image(data, zoo["other"])
    with pytest.raises(ContainerError, match=r"^corrupted file: latent shape \[2, 1\] does not match a 20x70 image "
                                             r"\(expected \[1, 2\]\)$"):
        decode_image(_v1_file(m, x, latent_shape=[2, 1]), m)
    y, z = h.stream_lengths[0]
    with pytest.raises(ContainerError, match=r"^corrupted file: 1 stream\(s\) per image, but bmshj2018-hyperprior "
                                             r"writes 2$"):
        decode_image(_v1_file(m, x, stream_lengths=[[y + z]]), m)
    f = zoo["fact"]
    fact = _v1_file(f, picture(20, 30))
    assert read_header(fact).latent_shape == [4, 4] and decode_image(fact, f).shape == (3, 20, 30)


def test_streams_that_do_not_decode_are_a_container_error(zoo):
    m = zoo["hyper"]
    h, streams = unpack(encode_image(m, picture()))
    y, z = streams[0]
    from compresszoo.models.io import weights_id

    bad = Header(**{**h.__dict__, "weights_id": weights_id(m), "stream_lengths": [[len(y), 2]]})
    with pytest.raises(ContainerError, match=r"^corrupted file: the streams do not decode \(data: .*truncated"):
        decode_image(pack(bad, [[y, z[:2]]]), m)


def test_three_bytes_name_their_version():
    refused(b"CZ\x03", r"^unsupported format version 3;", fn=read_header)
    refused(b"CZ\x02", "shorter than the smallest format-2 header", fn=read_header)


def test_info_reports_every_header_field(tmp_path, capsys, monkeypatch):
    """`compresszoo info` (in process): the header's fields, the file and payload sizes, bpp."""
    from compresszoo.cli import main

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # main() sets it: undone after the test

    h = hdr("mbt2018", "ms-ssim", 8, N=5, M=300, h=200, w=1, batched=True, order="raster", portable=False,
            lengths=[[1, 2], [3, 0]])
    data = pack(h, streams_for(h))
    (tmp_path / "f.czoo").write_bytes(data)
    assert main(["info", str(tmp_path / "f.czoo")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [type(n) for n in info["latent_shape"]] == [int, int]
    assert info == {"architecture": "mbt2018", "metric": "ms-ssim", "quality": 8, "N": 5, "M": 300,
                    "weights_id": FP[:8], "height": 200, "width": 1, "batched": True, "latent_shape": [4, 1],
                    "stream_lengths": [[1, 2], [3, 0]], "version": 2, "portable": False, "order": "raster",
                    "file_bytes": len(data), "payload_bytes": 6, "bpp": 8 * len(data) / 400}
