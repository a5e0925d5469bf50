"""The compact .czoo format 2: its overhead, format-1 compatibility, and hostile headers
(rebuilt with a valid CRC, so the parser itself has to refuse them)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from czoo_v1 import encode_v1
from photos import photo as _photo
from photos import updated

from compresszoo.codec import ContainerError, decode_image, encode_image, read_header
from compresszoo.codec.container import FINGERPRINT_HEX, unpack
from compresszoo.codec.image import decode_streams, encode_with_latents
from compresszoo.limits import LimitError
from compresszoo.models import ARCHITECTURES
from compresszoo.models.io import save_weights, weights_id

MAX_OVERHEAD = 24  # bytes over the payload for one image, model identity and checksum included


def photo(name: str = "astronaut", h: int = 64, w: int = 96) -> torch.Tensor:
    return _photo(name, h, w)


@pytest.fixture(scope="module")
def models():
    return {name: updated(name) for name in ARCHITECTURES}


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_overhead_is_at_most_24_bytes(models, name):
    for model in (models[name], updated(name, 1, debug=False)):  # debug channels are written; zoo ones not
        data = encode_image(model, photo())
        header = read_header(data)
        payload = sum(map(sum, header.stream_lengths))
        assert (header.version, header.portable, header.batched) == (2, True, False)
        assert len(data) - payload <= MAX_OVERHEAD, (name, model.N, len(data) - payload)
    assert weights_id(models[name]).startswith(read_header(encode_image(models[name], photo())).weights_id)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_format_2_round_trip_is_exact_and_batches_work(models, name):
    model = models[name]
    x = torch.stack([photo("astronaut"), photo("coffee")])
    data, y_hat = encode_with_latents(model, x)
    header, out = decode_streams(data, model)
    assert header.num_images == 2 and header.batched
    assert torch.equal(out["y_hat"], y_hat)
    assert decode_image(data, model).shape == (2, 3, 64, 96)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_format_1_files_still_decode_on_the_float_path(models, name):
    model = models[name]
    x = photo("chelsea", 70, 90)
    old = encode_v1(model, x)
    header = read_header(old)
    assert (header.version, header.portable) == (1, False)
    x_hat = decode_image(old, model)
    padded = torch.nn.functional.pad(x[None], (0, 38, 0, 58), mode="replicate")
    c = model.compress(padded, portable=False)
    want = model.decompress(c["strings"], c["shape"], portable=False)["x_hat"][0, :, :70, :90]
    assert torch.equal(x_hat, want)
    # the same image in format 2 is smaller: the JSON header is gone
    assert len(encode_image(model, x)) < len(old) - 150


def test_crafted_headers_are_refused_cleanly(models):
    model = models["mbt2018-mean"]
    good = encode_image(model, photo())
    body = good[:-4]
    zoo = updated("bmshj2018-hyperprior", 1, debug=False)
    cases = {
        "reserved flag bit": body[:3] + bytes([body[3] | 0x40]) + body[4:],
        "reserved model bits": body[:4] + bytes([body[4] | 0x80]) + body[5:],
        "non-minimal varint": body[:5 + 2 + 4] + b"\xc0\x00" + body[5 + 2 + 4 + 1:],
        "varint runs forever": body[:5 + 2 + 4] + b"\xff" * 12,
        "zero channels": body[:5] + b"\x00\x0c" + body[7:],
        "huge channels": body[:5] + b"\xff\xff\x03\x0c" + body[7:],
        "zero height": body[:5 + 2 + 4] + b"\x00" + body[5 + 2 + 4 + 1:],
        "lengths past the end": body[:-30],
        "empty": b"",
        "magic only": b"CZ\x02",
    }
    for name, crafted in cases.items():
        with pytest.raises(ContainerError) as caught:
            decode_image(with_crc(crafted), model)
        assert "corrupt" in str(caught.value) or "truncated" in str(caught.value) or "limit" in str(caught.value) \
            or "not a compresszoo file" in str(caught.value), (name, caught.value)
    # oversized declarations: refused by the limit, before anything is allocated
    h = encode_image(zoo, photo())[:-4]
    fp = 5 + 4  # zoo channels: no N/M varints
    huge = h[:fp] + b"\x80\x80\x80\x08" + b"\x80\x80\x80\x08" + h[fp + 2:]  # 2**24 x 2**24
    with pytest.raises(LimitError, match="COMPRESSZOO_MAX_PIXELS"):
        read_header(with_crc(huge))
    many = bytearray(h)
    many[3] |= 2  # batched, then an image count of 2**28 after the sizes
    many = bytes(many[:fp + 2]) + b"\x80\x80\x80\x80\x01" + bytes(many[fp + 2:])
    with pytest.raises(LimitError, match="COMPRESSZOO_MAX_PIXELS"):
        read_header(with_crc(many))


def test_every_header_corruption_is_a_clean_error_in_a_child(tmp_path, models):
    """Every truncation and every single-bit flip of the header, with the CRC rebuilt: a clean
    ContainerError or a successful decode, within a memory cap, never anything else."""
    model = models["mbt2018"]
    ckpt = tmp_path / "m.safetensors"
    save_weights(model, ckpt)
    good = encode_image(model, photo("rocket", 64, 64))
    (tmp_path / "good.czoo").write_bytes(good)
    header_bytes = 5 + 2 + FINGERPRINT_HEX // 2 + 2 + 1  # flags, N/M, fingerprint, sizes, a length
    script = textwrap.dedent(f"""
        import json, resource, struct, zlib
        resource.setrlimit(resource.RLIMIT_AS, (5 << 30, 5 << 30))
        from compresszoo.models.io import load_weights
        from compresszoo.codec import decode_image
        from compresszoo.codec.container import ContainerError
        model = load_weights({str(ckpt)!r})
        good = open({str(tmp_path / 'good.czoo')!r}, 'rb').read()
        body = good[:-4]
        cases = [body[:n] for n in range({header_bytes} + 1)]
        cases += [body[:i] + bytes([body[i] ^ (1 << b)]) + body[i + 1:] for i in range({header_bytes}) for b in range(8)]
        counts = {{"ok": 0, "container_error": 0}}
        for c in cases:
            try:
                decode_image(c + struct.pack("<I", zlib.crc32(c)), model)
                counts["ok"] += 1
            except ContainerError:
                counts["container_error"] += 1
        print(json.dumps(counts))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["container_error"] >= header_bytes * 4, counts


def test_info_reports_file_and_payload_bytes(tmp_path, models):
    data = encode_image(models["bmshj2018-hyperprior"], photo())
    path = tmp_path / "x.czoo"
    path.write_bytes(data)
    out = subprocess.run([sys.executable, "-m", "compresszoo.cli", "info", str(path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    header, streams = unpack(data)
    assert info["file_bytes"] == len(data)
    assert info["payload_bytes"] == sum(len(s) for img in streams for s in img)
    assert (info["version"], info["portable"], info["architecture"]) == (2, True, "bmshj2018-hyperprior")
