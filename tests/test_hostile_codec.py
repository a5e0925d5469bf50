"""Hostile input for the .czoo container, the image codec and the `compresszoo` CLI.

Every input is built here (crafted headers with valid CRCs and the real weights id,
crafted PNG headers, 16-bit and float images); nothing binary is checked in. Decoding
runs in child processes under an address-space cap, so an input that makes the decoder
allocate gigabytes fails the test instead of the machine, and every case is timed.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from compresszoo.codec import encode_image
from compresszoo.models import create_model
from compresszoo.models.io import save_weights
from compresszoo.models.loss import psnr

ROOT = Path(__file__).resolve().parents[1]
# torch maps ~3.2 GB of address space on import; 5 GB leaves ~1.8 GB for real work, far
# below the 3.6-12.9 GB the crafted sizes asked for before they were checked.
MEM_CAP = 5 << 30
FAIL_FAST_S = 2.0  # a refused header is refused before any work; seconds are generous here
CONTROL = "\x1b[2J\x1b[H\x1b]0;pwned\x07OK: decoded fine\r\n"


def photo(name: str, h: int, w: int) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)()[:h, :w])


def as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255.0


def czoo(fields: dict | None = None, *, text: str | bytes | None = None, payload: bytes = b"") -> bytes:
    """A .czoo file with any header: built by hand (not by pack, which refuses bad fields),
    with a valid CRC so the parser has to look at the header itself."""
    head = text if text is not None else json.dumps(fields, separators=(",", ":"))
    head = head.encode() if isinstance(head, str) else head
    body = struct.pack("<4sBI", b"CZOO", 1, len(head)) + head + payload
    return body + struct.pack("<I", zlib.crc32(body))


def split(data: bytes) -> tuple[dict, bytes]:
    (head_len,) = struct.unpack_from("<I", data, 5)
    return json.loads(data[9:9 + head_len]), data[9 + head_len:-4]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("bmshj2018-hyperprior", 3, debug=True).eval()
    m.update(force=True)
    return m


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "debug.safetensors"
    save_weights(model, path)
    return path


@pytest.fixture(scope="module")
def real(model) -> bytes:
    """A real format-1 file: the crafted JSON headers below start from its header."""
    from czoo_v1 import encode_v1

    return encode_v1(model, as_tensor(photo("astronaut", 64, 64)))


def crafted_cases(real: bytes) -> dict[str, tuple[bytes, str, str]]:
    """name -> (file, stage that must refuse it: 'header' or 'model', message pattern)."""
    base, payload = split(real)
    n = len(payload)
    y, z = base["stream_lengths"][0]

    def header(**changes):
        return czoo({**base, **changes}, payload=payload)

    def text(json_text: str, body: bytes = payload):
        return czoo(text=json_text, payload=body)

    dumped = json.dumps({**base, "stream_lengths": "@"}, separators=(",", ":"))
    nest = 30000  # within the 64 kB header limit; deep enough for a RecursionError
    limit = r"COMPRESSZOO_MAX_PIXELS"
    return {
        # item 1: sizes checked before anything is allocated (valid CRC, real weights id)
        "32768x32768": (header(height=32768, width=32768, latent_shape=[512, 512]), "header", limit),
        "65536x65536": (header(height=65536, width=65536, latent_shape=[1024, 1024]), "header", limit),
        "1x2**26 (padding multiplies it by 64)": (header(height=1, width=1 << 26, latent_shape=[1, 1 << 20]),
                                                  "header", limit),
        "2**63 height": (header(height=2**63), "header", limit),
        "2**63 stream length": (header(stream_lengths=[[2**63, 0]]), "header", "add up"),
        "header over MAX_HEADER_BYTES": (text(dumped.replace('"@"', json.dumps(base["stream_lengths"]))
                                              + " " * 70000), "header", "COMPRESSZOO_MAX_HEADER_BYTES"),
        "N over MAX_CHANNELS": (header(N=10**6), "header", "COMPRESSZOO_MAX_CHANNELS"),
        # item 11: any parse failure, however deep, is a ContainerError
        "Infinity lengths": (text(dumped.replace('"@"', "[[Infinity,0]]")), "header", "non-number"),
        "NaN quality": (text(dumped.replace('"quality":3', '"quality":NaN')), "header", "non-number"),
        "deep nesting": (text(dumped.replace('"@"', "[" * nest + "]" * nest)), "header", "unreadable header"),
        "5000-digit number": (text(dumped.replace('"@"', "[[" + "9" * 5000 + "]]")), "header", "unreadable"),
        "not UTF-8": (text(b'{"architecture":"\xff\xfe"}'), "header", "unreadable header"),
        "not an object": (text("[1,2,3]"), "header", "JSON object"),
        "duplicate field": (text(dumped.replace('"@"', json.dumps([[y, z]]))[:-1] + ',"height":9999}'),
                            "header", "repeats"),
        "unknown field": (header(extra=1), "header", "unknown 'extra'"),
        "missing field": (czoo({k: v for k, v in base.items() if k != "metric"}, payload=payload),
                          "header", "missing metric$"),
        "height 70.5": (header(height=70.5), "header", "height must be an integer"),
        "height 64.0": (header(height=64.0), "header", "height must be an integer"),
        "height true": (header(height=True), "header", "height must be an integer"),
        "height 0": (header(height=0), "header", "height must be at least 1"),
        "quality '3'": (header(quality="3"), "header", "quality must be an integer"),
        "batched 'yes'": (header(batched="yes"), "header", "batched must be true or false"),
        "latent_shape null": (header(latent_shape=None), "header", "latent_shape"),
        "latent_shape floats": (header(latent_shape=[1.0, 1.0]), "header", "latent_shape"),
        "latent_shape 3-d": (header(latent_shape=[1, 1, 1]), "header", "latent_shape"),
        "stream length as string": (header(stream_lengths=[[str(y), z]]), "header", "non-negative integers"),
        "stream length true": (header(stream_lengths=[[True, n - 1]]), "header", "non-negative integers"),
        "negative lengths": (header(stream_lengths=[[-5, n + 5]]), "header", "non-negative integers"),
        "ragged streams": (czoo({**base, "batched": True, "stream_lengths": [[y, z], [0]]}, payload=payload),
                           "header", "same number of streams"),
        "lengths do not add up": (header(stream_lengths=[[y, z + 1]]), "header", "add up"),
        # item 17: an empty stream list says so (not "latent shape ... (expected the same)")
        "zero images": (czoo({**base, "stream_lengths": []}), "header", "no images"),
        # item 10: batched=false with two images
        "two images, batched false": (czoo({**base, "stream_lengths": [[y, z], [y, z]]}, payload=payload * 2),
                                      "header", "batched=false but lists 2 images"),
        # item 13: file text is escaped in messages
        "control characters": (header(architecture=CONTROL), "header", "architecture must be a name"),
        "control characters in a key": (header(**{CONTROL: 1}), "header", "unknown"),
        # checked against the model: a well-formed header that does not fit it
        "latent shape for another size": (header(latent_shape=[3, 3]), "model", "latent shape \\[3, 3\\]"),
        "one stream for a hyperprior": (header(stream_lengths=[[n]]), "model", "1 stream\\(s\\) per image"),
        "another model": (header(metric="ms-ssim"), "model", "encoded with"),
    }


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    from compresszoo.codec import decode_image, read_header
    from compresszoo.codec.container import ContainerError
    from compresszoo.limits import LimitError
    from compresszoo.models.io import load_weights

    model = load_weights(sys.argv[1])
    results = {{}}
    for name, hexed in json.load(open(sys.argv[2])).items():
        data, row = bytes.fromhex(hexed), {{}}
        for stage, fn in (("header", read_header), ("model", lambda d: decode_image(d, model))):
            start = time.perf_counter()
            try:
                out = fn(data)
                row[stage] = {{"ok": True, "shape": list(getattr(out, "shape", []))}}
            except BaseException as e:  # the parent asserts the type: record whatever came out
                row[stage] = {{"type": type(e).__name__, "container": isinstance(e, ContainerError),
                              "limit": isinstance(e, LimitError), "message": str(e)}}
            row[stage]["seconds"] = time.perf_counter() - start
        results[name] = row
    print(json.dumps(results))
""").format(cap=MEM_CAP)


def decode_in_child(ckpt: Path, files: dict[str, bytes], tmp_path: Path) -> dict:
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({k: v.hex() for k, v in files.items()}))
    out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(cases)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_crafted_headers_fail_fast_with_container_errors(ckpt, real, model, tmp_path):
    cases = crafted_cases(real)
    batch = encode_image(model, torch.stack([as_tensor(photo("astronaut", 64, 64)),
                                             as_tensor(photo("coffee", 64, 64))]))
    results = decode_in_child(ckpt, {**{k: v[0] for k, v in cases.items()}, "valid": real, "batch": batch},
                              tmp_path)
    assert results["valid"]["model"]["shape"] == [3, 64, 64]  # the checks refuse nothing real
    assert results["batch"]["model"]["shape"] == [2, 3, 64, 64]
    for name, (_, stage, pattern) in cases.items():
        row = results[name]
        stages = ("header", "model") if stage == "header" else ("model",)
        if stage == "model":
            assert row["header"].get("ok"), (name, row["header"])
        for s in stages:
            got = row[s]
            assert got.get("container"), (name, s, got)  # a ContainerError, not e.g. MemoryError
            assert re.search(pattern, got["message"]), (name, s, got["message"])
            assert got["message"].isprintable() and "\x1b" not in got["message"], (name, got["message"])
            assert got["seconds"] < FAIL_FAST_S, (name, s, got["seconds"])
        if "MAX_" in pattern:
            assert row["header"]["limit"], (name, row["header"])  # also a limits.LimitError
    assert "latent shape" not in results["zero images"]["model"]["message"]


def test_encode_refuses_what_decode_would_refuse(model, monkeypatch):
    with pytest.raises(ValueError, match="empty"):
        encode_image(model, torch.rand(0, 3, 64, 64))
    monkeypatch.setenv("COMPRESSZOO_MAX_PIXELS", str(64 * 64))
    with pytest.raises(ValueError, match="COMPRESSZOO_MAX_PIXELS"):
        encode_image(model, torch.rand(2, 3, 64, 64))  # two images: twice the limit


# ---------------------------------------------------------------- the CLI ---------------

CLI = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({MEM_CAP}, {MEM_CAP})); "
       "sys.argv[0] = 'compresszoo'; runpy.run_module('compresszoo.cli', run_name='__main__')")


def cli(*args, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT / "platform"), **(env or {}))
    full.pop("MLFLOW_TRACKING_URI", None)  # the default store: ./mlflow.db in cwd
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=full, timeout=timeout)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def assert_one_line_failure(result: subprocess.CompletedProcess, pattern: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].isprintable() and "\x1b" not in lines[0], lines[0]
    assert re.search(pattern, lines[0]), lines[0]


def png_header_only(width: int, height: int) -> bytes:
    """A 60-byte PNG whose IHDR declares width x height (8-bit RGB) and whose data is empty."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def workdir(tmp_path, ckpt, real) -> Path:
    from PIL import Image

    Image.fromarray(photo("astronaut", 64, 64)).save(tmp_path / "photo.png")
    (tmp_path / "f.czoo").write_bytes(real)
    (tmp_path / "czoo.png").write_bytes(real)  # a .czoo file under an image's name
    (tmp_path / "model.safetensors").write_bytes(ckpt.read_bytes())
    (tmp_path / "folder").mkdir()
    (tmp_path / "big.png").write_bytes(png_header_only(40000, 40000))  # 1.6 G pixels
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    for name, (data, _, _) in crafted_cases(real).items():
        (tmp_path / (re.sub(r"\W+", "_", name) + ".czoo")).write_bytes(data)
    return tmp_path


CLI_CASES = {
    # item 9: never overwrites its own input (same path, another spelling, a hard link)
    "encode onto its input": (["encode", "photo.png", "-o", "photo.png", "--model", "model.safetensors"],
                              "is the input"),
    "encode onto its input, other spelling": (["encode", "photo.png", "-o", "folder/../photo.png",
                                               "--model", "model.safetensors"], "is the input"),
    "encode onto the model": (["encode", "photo.png", "-o", "model.safetensors", "--model",
                               "model.safetensors"], "is the input"),
    "decode onto its input": (["decode", "czoo.png", "-o", "czoo.png", "--model", "model.safetensors"],
                              "is the input"),
    "decode onto its input png": (["decode", "f.czoo", "-o", "photo.png", "--model", "model.safetensors"],
                                  None),  # allowed: photo.png is not an input of decode
    # item 12
    "decode to .tif? no: .xyz": (["decode", "f.czoo", "-o", "out.xyz", "--model", "model.safetensors"],
                                 "unsupported output extension '.xyz'"),
    "decode to a directory": (["decode", "f.czoo", "-o", "folder", "--model", "model.safetensors"],
                              "is a directory"),
    "encode to a directory": (["encode", "photo.png", "-o", "folder", "--model", "model.safetensors"],
                              "is a directory"),
    "encode to a missing folder": (["encode", "photo.png", "-o", "nowhere/f.czoo", "--model",
                                    "model.safetensors"], "does not exist"),
    "image over Pillow's bomb limit": (["encode", "big.png", "-o", "big.czoo", "--model", "model.safetensors"],
                                       "COMPRESSZOO_MAX_PIXELS"),
    "unreadable image": (["encode", "garbage.png", "-o", "g.czoo", "--model", "model.safetensors"],
                         "cannot read image garbage.png"),
    "missing image": (["encode", "nothing.png", "-o", "g.czoo", "--model", "model.safetensors"],
                      "no such file"),
    "missing option": (["decode", "f.czoo"], "required: -o"),
    "info on zero images": (["info", "zero_images.czoo"], "no images"),
    "info on Infinity lengths": (["info", "Infinity_lengths.czoo"], "non-number"),
    "info on deep nesting": (["info", "deep_nesting.czoo"], "unreadable header"),
    "info on control characters": (["info", "control_characters.czoo"], "architecture must be a name"),
    "info on a folder": (["info", "folder"], "not a regular file"),
    "decode 32768x32768": (["decode", "32768x32768.czoo", "-o", "out.png", "--model", "model.safetensors"],
                           "COMPRESSZOO_MAX_PIXELS"),
    "decode two images, batched false": (["decode", "two_images_batched_false.czoo", "-o", "out.png",
                                          "--model", "model.safetensors"], "batched=false"),
    "decode with another model's file": (["decode", "another_model.czoo", "-o", "out.png", "--model",
                                          "model.safetensors"], "encoded with"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_with_one_line_and_leaves_nothing(workdir, case):
    args, pattern = CLI_CASES[case]
    before = tree(workdir)
    result = cli(*args, cwd=workdir)
    if pattern is None:  # the control case: the refusals above are not refusing everything
        assert result.returncode == 0, result.stderr
        return
    assert_one_line_failure(result, pattern)
    assert tree(workdir) == before  # nothing written, nothing replaced, no temporary left


def test_cli_hard_link_to_input_is_refused(workdir):
    os.link(workdir / "photo.png", workdir / "alias.png")
    before = tree(workdir)
    result = cli("encode", "photo.png", "-o", "alias.png", "--model", "model.safetensors", cwd=workdir)
    assert_one_line_failure(result, "is the input")
    assert tree(workdir) == before


def test_cli_pixel_limit_comes_from_the_environment(workdir):
    before = tree(workdir)
    small = cli("encode", "photo.png", "-o", "p.czoo", "--model", "model.safetensors", cwd=workdir,
                env={"COMPRESSZOO_MAX_PIXELS": "4000"})
    assert_one_line_failure(small, r"4,096 exceeds the limit of 4,000 \(raise it with COMPRESSZOO_MAX_PIXELS")
    assert tree(workdir) == before


def test_cli_unknown_registry_model_is_one_line_and_creates_no_database(workdir):
    before = tree(workdir)
    result = cli("encode", "photo.png", "-o", "p.czoo", "--model", "no-such-model@champion", cwd=workdir)
    assert_one_line_failure(result, "no-such-model")
    assert tree(workdir) == before and not (workdir / "mlflow.db").exists()


def test_cli_decodes_a_batched_file_to_one_image_each(workdir, model):
    from PIL import Image

    from compresszoo.codec import decode_image

    x = torch.stack([as_tensor(photo("astronaut", 64, 96)), as_tensor(photo("coffee", 64, 96))])
    data = encode_image(model, x)
    (workdir / "batch.czoo").write_bytes(data)
    result = cli("decode", "batch.czoo", "-o", "out.png", "--model", "model.safetensors", cwd=workdir)
    assert result.returncode == 0, result.stderr
    expected = (decode_image(data, model).clamp(0, 1) * 255).round()
    for i in range(2):
        got = torch.from_numpy(np.array(Image.open(workdir / f"out_{i}.png"))).permute(2, 0, 1).float()
        # same weights, same decoder; thread counts may move a value across a rounding edge
        assert (got - expected[i]).abs().max().item() <= 1.0
    assert not (workdir / "out.png").exists()
    info = cli("info", "batch.czoo", cwd=workdir)
    assert info.returncode == 0 and json.loads(info.stdout)["batched"] is True


@pytest.fixture(scope="module")
def sensitive_ckpt(tmp_path_factory) -> Path:
    """A debug model whose output follows its input: random weights decode every input to
    nearly the same gray, which would hide a conversion that whitens the image."""
    torch.manual_seed(0)
    m = create_model("bmshj2018-hyperprior", 3, debug=True).eval()
    with torch.no_grad():
        m.g_a[6].weight.mul_(20.0)
        m.g_s[-1].weight.mul_(30.0)
        m.entropy_bottleneck.quantiles.mul_(3.0)
    m.update(force=True)
    path = tmp_path_factory.mktemp("sensitive") / "m.safetensors"
    save_weights(m, path)
    return path


def round_trip(model, img8: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> the decoded image in 8-bit levels, as the CLI writes it."""
    from compresszoo.codec import decode_image

    x_hat = decode_image(encode_image(model, as_tensor(img8)), model)
    return (x_hat.clamp(0, 1).permute(1, 2, 0) * 255.0 + 0.5).floor()


def cli_round_trip(src: str, ckpt: Path, cwd: Path) -> torch.Tensor:
    from PIL import Image

    for step in (("encode", src, "-o", f"{src}.czoo"), ("decode", f"{src}.czoo", "-o", f"{src}.out.png")):
        result = cli(*step, "--model", ckpt, cwd=cwd)
        assert result.returncode == 0, result.stderr
    return torch.from_numpy(np.array(Image.open(cwd / f"{src}.out.png"))).float()


def test_cli_16_bit_pngs_round_trip_like_their_8_bit_conversion(tmp_path, sensitive_ckpt):
    """16-bit gray (was 99% white) and 48-bit RGB: the CLI's round trip of the 16-bit file is
    close to the round trip of its 8-bit conversion (rounded, gray replicated to RGB) and far
    from that of a white image (so a whitened input cannot pass)."""
    import imagecodecs

    from compresszoo.models.io import load_weights

    model = load_weights(sensitive_ckpt)
    rng = np.random.default_rng(0)
    for name, img8 in (("gray", photo("camera", 128, 128)), ("rgb", photo("astronaut", 128, 128))):
        img16 = img8.astype(np.uint16) * 257 + rng.integers(0, 257, img8.shape, dtype=np.uint16)
        (tmp_path / f"{name}16.png").write_bytes(imagecodecs.png_encode(img16))
        ref8 = np.round(img16 / 257.0).astype(np.uint8)  # v * 255 / 65535, rounded
        ref8 = np.repeat(ref8[..., None], 3, axis=2) if ref8.ndim == 2 else ref8
        got = cli_round_trip(f"{name}16.png", sensitive_ckpt, tmp_path)
        expected, white = round_trip(model, ref8), round_trip(model, np.full_like(ref8, 255))
        # 30 dB: the 16-bit input differs from its 8-bit conversion by < 1/2 level, which moves
        # a few latents across a rounding edge; a white (clipped) input scores ~11 dB.
        close, far = psnr(got, expected, 255.0), psnr(white, expected, 255.0)
        assert close > 30.0 and far < 20.0, (name, close, far)


def test_read_image_keeps_16_bits_and_refuses_out_of_range_floats(tmp_path):
    import imagecodecs
    from PIL import Image

    from compresszoo.imagefiles import InputError as CliError
    from compresszoo.imagefiles import read_pixels as _read_image

    # 48-bit RGB whose signal is all in the low byte: cutting to 8 bits gives black
    low = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint16)
    (tmp_path / "low.png").write_bytes(imagecodecs.png_encode(low))
    np.testing.assert_allclose(_read_image(tmp_path / "low.png"), low / 65535.0, rtol=0, atol=1e-7)
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(ramp).save(tmp_path / "ramp.tif")
    np.testing.assert_array_equal(_read_image(tmp_path / "ramp.tif")[..., 0], ramp)
    Image.fromarray(ramp * 300).save(tmp_path / "hdr.tif")
    with pytest.raises(CliError, match=r"outside \[0, 1\]"):
        _read_image(tmp_path / "hdr.tif")


def test_cli_float_image_round_trips(tmp_path, sensitive_ckpt):
    """A float (mode F) image in [0, 1] is encoded from its values (it was clipped to 0/1)."""
    from PIL import Image

    from compresszoo.models.io import load_weights

    gray = photo("camera", 128, 128)
    Image.fromarray(gray.astype(np.float32) / 255.0).save(tmp_path / "f.tif")
    got = cli_round_trip("f.tif", sensitive_ckpt, tmp_path)
    expected = round_trip(load_weights(sensitive_ckpt), np.repeat(gray[..., None], 3, axis=2))
    assert psnr(got, expected, 255.0) > 30.0  # same pixels; only float noise between processes
