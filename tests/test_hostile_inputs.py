"""Hostile input to the data readers, the weights loader, the rANS API and storage.join.

Every input is built here. Inputs that would make the old code allocate gigabytes are tried
in a child process under an address-space cap (RLIMIT_AS) and a time bound, in an empty
working folder: each must end in the module's own ValueError subclass, quickly, having
written nothing.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compresszoo import storage
from compresszoo.ans import rans
from compresszoo.data.images import BadImage, ImageTooLarge, decode_rgb
from compresszoo.data.manifest import MANIFEST_NAME, Manifest, ManifestError, ShardInfo
from compresszoo.data.reader import PositionError, TrainStream
from compresszoo.limits import LimitError
from compresszoo.models import create_model
from compresszoo.models.io import WeightsError, load_weights, save_weights, weights_id
from compresszoo.models.registry import spec_of

GB = 1 << 30
# An interpreter that has imported torch already maps ~3.2 GB of address space.
TORCH_CAP, DATA_CAP = 5 * GB, int(1.5 * GB)


def run_capped(code: str, workdir: Path, *, cap: int, timeout: float = 120, env: dict | None = None) -> dict:
    """Run `code` in a child under an address-space cap; it prints one JSON line, returned here.

    The child works in `workdir`, which must still be empty afterwards.
    """
    prelude = textwrap.dedent(f"""
        import json, resource
        resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
        def peak_mb():  # this process's peak RSS (ru_maxrss would include the parent's: it survives exec)
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        def report(fn):
            try:
                fn()
                out = {{"error": None}}
            except BaseException as e:
                out = {{"error": type(e).__name__, "message": str(e),
                       "types": [c.__name__ for c in type(e).__mro__]}}
            print(json.dumps(out))
    """)
    workdir.mkdir(exist_ok=True)
    before = sorted(os.listdir(workdir))
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=workdir, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(workdir)) == before, "the child wrote files"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- images: the pixel limit is checked from the header, before decoding -------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height 8-bit RGB (valid CRCs), with a small deflate stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * width) * 64)  # the first 64 rows only
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def qoi_header_only(width: int, height: int) -> bytes:
    return b"qoif" + struct.pack(">II", width, height) + bytes([3, 0]) + b"\xfe\x00\x00\x00" * 16 + b"\x00" * 7 + b"\x01"


def bmp_header_only(width: int, height: int) -> bytes:
    """A 24-bit BMP declaring width x height with no pixel data: Pillow reads its size lazily."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + info


def test_declared_image_size_is_refused_before_decoding(tmp_path):
    (tmp_path / "png").write_bytes(png_header_only(30000, 30000))
    (tmp_path / "qoi").write_bytes(qoi_header_only(30000, 30000))
    (tmp_path / "bmp").write_bytes(bmp_header_only(9000, 9000))  # over ours, under Pillow's own cap
    for name, decoder in [("png", "spng"), ("png", "pillow"), ("qoi", None), ("bmp", None)]:
        out = run_capped(f"""
            import time
            from compresszoo.data.images import decode_rgb
            data = open({str(tmp_path / name)!r}, "rb").read()
            t0 = time.monotonic()
            report(lambda: decode_rgb(data, {decoder!r}))
            assert time.monotonic() - t0 < 2 and peak_mb() < 600, (time.monotonic() - t0, peak_mb())
        """, tmp_path / "work", cap=DATA_CAP, timeout=60)
        assert out["error"] == "ImageTooLarge", (name, decoder, out)
        assert {"BadImage", "LimitError", "ValueError"} <= set(out["types"])
        assert "COMPRESSZOO_MAX_PIXELS" in out["message"] and "limit of 67,108,864" in out["message"], out


def test_pixel_limit_is_configurable_and_keeps_bad_rows_skippable(monkeypatch):
    rgb = np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    assert np.array_equal(decode_rgb(buf.getvalue(), "spng"), rgb)
    monkeypatch.setenv("COMPRESSZOO_MAX_PIXELS", str(64 * 48 - 1))
    for decoder in ("spng", "pillow"):
        with pytest.raises(ImageTooLarge, match=r"PNG of 64x48: declared image pixels 3,072 exceeds") as e:
            decode_rgb(buf.getvalue(), decoder)
        # The sharder and the reader catch BadImage and count the row as unreadable.
        assert isinstance(e.value, BadImage) and e.value.kind == "unreadable"
    monkeypatch.setenv("COMPRESSZOO_MAX_PIXELS", str(9000 * 9000))
    with pytest.raises(BadImage) as e:  # now past the size check: refused for its missing pixels
        decode_rgb(bmp_header_only(9000, 9000))
    assert not isinstance(e.value, LimitError)


# ---- weights files: spec and tensor shapes checked before the model is built ----------------


def debug_weights(tmp_path: Path, **spec_changes) -> tuple[Path, dict]:
    """A real debug model's tensors, with its metadata spec changed as given."""
    from safetensors.torch import save_file

    model = create_model("mbt2018", quality=1, debug=True)
    spec = {**spec_of(model).to_dict(), **spec_changes}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"w{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(tensors, str(path), metadata={"format": "compresszoo.weights/1", "spec": json.dumps(spec)})
    return path, tensors


def raw_safetensors(path: Path, spec, tensors: dict | None = None) -> Path:
    """A safetensors file with any metadata spec (a string as is, else JSON) and small tensors."""
    from safetensors.torch import save_file

    text = spec if isinstance(spec, str) else json.dumps(spec)
    save_file(tensors or {"x": torch.zeros(1)}, str(path), metadata={"format": "compresszoo.weights/1", "spec": text})
    return path


def test_weights_spec_declaring_huge_channels_allocates_nothing(tmp_path):
    spec = spec_of(create_model("mbt2018", quality=1, debug=True)).to_dict()
    over = raw_safetensors(tmp_path / "over.safetensors", {**spec, "N": 1500, "M": 1500})
    within = raw_safetensors(tmp_path / "within.safetensors", {**spec, "N": 1024, "M": 1024})
    assert over.stat().st_size < 400
    good = tmp_path / "good.safetensors"
    save_weights(create_model("mbt2018", quality=1, debug=True), good)
    out = run_capped(f"""
        import time
        from compresszoo.models.io import load_weights
        load_weights({str(good)!r})  # warms up torch's meta device (a one-time import)
        results, base = [], peak_mb()
        for path in ({str(over)!r}, {str(within)!r}):
            t0 = time.monotonic()
            report(lambda: load_weights(path))
            assert time.monotonic() - t0 < 10, time.monotonic() - t0
        # mbt2018 at N=M=1024 is ~1.4 GB of float32: none of it may be allocated.
        assert peak_mb() - base < 100, (base, peak_mb())
    """, tmp_path / "work", cap=TORCH_CAP, timeout=180)
    assert out["error"] == "WeightsError", out  # the last one: within the channel limit, wrong tensors
    assert str(within) in out["message"] and "tensors do not match" in out["message"]
    with pytest.raises(WeightsError, match=r"spec N: declared channel count 1,500 exceeds the limit of 1,024 "
                                           r"\(raise it with COMPRESSZOO_MAX_CHANNELS=<n>\)") as e:
        load_weights(over)
    assert isinstance(e.value, LimitError) and str(over) in str(e.value)


@pytest.mark.parametrize("change,match", [
    ({"architecture": "resnet50"}, "unknown architecture 'resnet50'"),
    ({"architecture": 3}, "unknown architecture 3"),
    ({"N": 8.5}, "N=8.5 is not a positive integer"),
    ({"M": True}, "M=True is not a positive integer"),
    ({"N": 0}, "N=0 is not a positive integer"),
    ({"metric": "../../evil"}, "unknown metric '../../evil'"),
    ({"quality": 0}, "quality 0 is not an integer in 1..8"),
    ({"quality": "3"}, "quality '3' is not an integer"),
    ({"lmbda": float("nan")}, "lmbda=nan is not a positive finite number"),
    ({"lmbda": "0.1"}, "lmbda='0.1' is not"),
    ({"extra": 1}, "spec fields: unknown 'extra'; expected architecture, quality"),
    ({"N": 12, "M": 8}, "tensor .* has shape .*needs"),  # a valid spec that does not fit the tensors
])
def test_weights_spec_is_validated_against_the_registry(tmp_path, change, match):
    path, _ = debug_weights(tmp_path, **change)
    with pytest.raises(WeightsError, match=match) as e:
        load_weights(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_weights_tensors_must_match_the_spec(tmp_path):
    for update in (False, True):  # valid files still load, CDF tables (sized by update()) or not
        model = create_model("bmshj2018-hyperprior", quality=2, debug=True)
        if update:
            model.update(force=True)
        wid = save_weights(model, tmp_path / f"m{update}.safetensors")
        assert weights_id(load_weights(tmp_path / f"m{update}.safetensors")) == wid
    model = create_model("mbt2018", quality=1, debug=True)
    spec = spec_of(model).to_dict()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    name = "g_a.0.weight"
    cases = {
        "shape": ({**tensors, name: torch.zeros(3, 3, 5, 5)}, rf"tensor {name} has shape \[3, 3, 5, 5\], .* needs"),
        "missing": ({k: v for k, v in tensors.items() if k != name}, rf"missing '{name}'"),
        "extra": ({**tensors, "evil": torch.zeros(1)}, "unexpected 'evil'"),
    }
    for label, (ts, match) in cases.items():
        path = raw_safetensors(tmp_path / f"{label}.safetensors", spec, ts)
        with pytest.raises(WeightsError, match=match):
            load_weights(path)
    for label, text in {"not-json": "{", "list": "[1]", "deep": "[" * 30000 + "]" * 30000,
                        "huge": json.dumps({**spec, "pad": "x" * (1 << 17)})}.items():
        path = raw_safetensors(tmp_path / f"{label}.safetensors", text, tensors)
        with pytest.raises(WeightsError, match=str(path)):
            load_weights(path)
    # A CDF table (sized by the file, not the spec) declaring 40 GB in a 200-byte file.
    header = json.dumps({"__metadata__": {"spec": json.dumps(spec)}, "entropy_bottleneck._quantized_cdf":
                         {"dtype": "I32", "shape": [100000, 100000], "data_offsets": [0, 4]}}).encode()
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    for path in (liar, junk):
        with pytest.raises(WeightsError, match=f"{path} is not a compresszoo weights file"):
            load_weights(path)


# ---- the reader's saved position: bounded decompression, strict fields ------------------------


def tiny_dataset(root: Path, fragments: int = 12) -> str:
    """A manifest with one shard of `fragments` row groups; constructing a stream reads only its size."""
    root.mkdir()
    (root / "train-0.parquet").write_bytes(b"\0" * 100)
    Manifest(str(root), [ShardInfo("train-0.parquet", "train", 2 * fragments, 100, "0" * 64, (2,) * fragments)]).save()
    return str(root)


def zlib_bomb(size: int) -> str:
    """base64(zlib(size zero bytes)), compressed in chunks: ~1000x smaller than `size`."""
    z, out, chunk = zlib.compressobj(9), [], b"\0" * (16 << 20)
    for _ in range(size // len(chunk)):
        out.append(z.compress(chunk))
    return base64.b64encode(b"".join(out) + z.flush()).decode()


def test_saved_position_bomb_is_refused_without_inflating(tmp_path):
    dst = tiny_dataset(tmp_path / "ds")
    good = TrainStream(dst, batch_size=1).position()
    cases = {  # 1 GiB: its text is over the size limit; 256 MiB: under it, but inflates past 2 bytes
        "1 GiB": ("PositionLimitError", "COMPRESSZOO_MAX_POSITION_BYTES"),
        "256 MiB": ("PositionError", "inflates to more than the 2 bytes 12 fragments need"),
    }
    for (label, (error, match)), size in zip(cases.items(), (GB, 256 << 20)):
        (tmp_path / "position.json").write_text(json.dumps({**good, "consumed": zlib_bomb(size)}))
        out = run_capped(f"""
            import time
            from compresszoo.data.reader import TrainStream
            position = json.load(open({str(tmp_path / "position.json")!r}))
            base, t0 = peak_mb(), time.monotonic()
            report(lambda: TrainStream({dst!r}, batch_size=1, position=position))
            assert time.monotonic() - t0 < 5 and peak_mb() - base < 50, (time.monotonic() - t0, base, peak_mb())
        """, tmp_path / "work", cap=DATA_CAP, timeout=60)
        assert out["error"] == error and {"PositionError", "ValueError"} <= set(out["types"]), (label, out)
        assert match in out["message"] and "'consumed'" in out["message"], (label, out)


def test_saved_position_fields_are_checked(tmp_path):
    dst = tiny_dataset(tmp_path / "ds")
    good = TrainStream(dst, batch_size=1).position()
    assert TrainStream(dst, batch_size=1, position=good).epoch == 0  # a valid one still restores
    bad = [
        ("x", "pass position\\(\\)"), ([], "non-empty list"), ([None], "is NoneType"),
        ({**good, "version": True}, "version True"), ({**good, "epoch": "1"}, "'epoch' is '1'"),
        ({**good, "epoch": -1}, "'epoch' is -1"), ({**good, "epoch": 2**70}, "'epoch' is"),
        ({**good, "epoch": 1.0}, "'epoch' is 1.0"), ({**good, "seed": 0.0}, "'seed' is 0.0"),
        ({**good, "fragments": 0}, "'fragments' is 0"), ({**good, "rank": 1}, "'rank' is 1"),
        ({**good, "world_size": None}, "'world_size' is None"), ({**good, "consumed": 5}, "'consumed' is 5"),
        ({**good, "consumed": "!!"}, "not base64 zlib"),
        ({**good, "consumed": base64.b64encode(zlib.compress(b"\0" * 3)).decode()}, "inflates to more than"),
        ({**good, "consumed": base64.b64encode(zlib.compress(b"\0")).decode()}, "holds 1 bytes; 12 fragments need 2"),
        ({**good, "consumed": base64.b64encode(zlib.compress(b"\0\0")[:-3]).decode()}, "truncated"),
        ({**good, "next": "x"}, "'next' is 'x'"),
    ]
    for position, match in bad:
        with pytest.raises(PositionError, match=match):
            TrainStream(dst, batch_size=1, position=position)
    with pytest.raises(ValueError, match="seed 7; this stream uses seed 0"):
        TrainStream(dst, batch_size=1, position={**good, "seed": 7})


# ---- the manifest: any structural fault is a ManifestError naming the file -------------------


def test_malformed_manifest_is_a_manifest_error(tmp_path):
    dst = tiny_dataset(tmp_path / "ds")
    path = os.path.join(dst, MANIFEST_NAME)
    doc = json.loads(open(path).read())
    shard = doc["shards"][0]
    variants = {
        "list": [doc], "string": "x", "deep": None,
        "version-float": {**doc, "format_version": 2.0},
        "shards-dict": {**doc, "shards": {"a": 1}}, "shard-list": {**doc, "shards": [[1]]},
        "no-path": {**doc, "shards": [{k: v for k, v in shard.items() if k != "path"}]},
        "rows-str": {**doc, "shards": [{**shard, "rows": "24"}]},
        "rows-bool": {**doc, "shards": [{**shard, "rows": True}]},
        "groups-float": {**doc, "shards": [{**shard, "row_groups": [1.5] * 16}]},
        "groups-sum": {**doc, "shards": [{**shard, "row_groups": [2, 2]}]},
        "groups-null": {**doc, "shards": [{**shard, "row_groups": None}]},
        "path-abs": {**doc, "shards": [{**shard, "path": "/etc/passwd"}]},
        "path-up": {**doc, "shards": [{**shard, "path": "../x.parquet"}]},
        "codec": {**doc, "codec": 5}, "no-codec": {k: v for k, v in doc.items() if k != "codec"},
        "source": {**doc, "source": []}, "tuplet": {**doc, "tuplet": None},
    }
    for label, value in variants.items():
        text = "[" * 100000 + "]" * 100000 if label == "deep" else json.dumps(value)
        storage.write_bytes(path, text.encode())
        with pytest.raises(ManifestError, match=f"^{path}: ") as e:
            Manifest.load(dst)
        assert "\n" not in str(e.value), label


# ---- the rANS API: ragged lists are refused exactly as arrays are ----------------------------


@pytest.mark.parametrize("value", [2**31, 2**40, 2**63, 2**64, 1.5, -(2**31) - 1])
def test_rans_ragged_lists_refuse_what_arrays_refuse(value):
    with pytest.raises(ValueError) as from_array:  # 2**64 makes NumPy hold Python ints (dtype object)
        rans.encode([0], [0], np.asarray([[0, value, 65536]]), [3], [0])
    with pytest.raises(ValueError) as from_list:
        rans.encode([0], [0], [[0, value, 65536], [0, 65536]], [3, 2], [0, 0])
    assert str(from_list.value) == str(from_array.value)
    assert str(from_list.value).startswith("cdfs: expected int32 values")
    with pytest.raises(ValueError, match="cdfs: expected int32"):
        rans.pad_cdfs([[0, 65536], [0, value, 65536]])
    # In range, a ragged list codes exactly as the padded array does.
    rows = [[0, 20000, 65536], [0, 65536]]
    assert rans.encode([1, 0], [0, 1], rows, [3, 2], [0, 0]) == \
        rans.encode([1, 0], [0, 1], rans.pad_cdfs(rows), [3, 2], [0, 0])


# ---- storage.join stays under its base -------------------------------------------------------


@pytest.mark.parametrize("base", ["s3://bucket/ds", "/data/ds", "relative/ds"])
def test_join_refuses_absolute_and_parent_parts(base):
    assert storage.join(base, "train", "a.parquet").endswith("ds/train/a.parquet")
    assert storage.join(base, "train/a.parquet").endswith("ds/train/a.parquet")
    for part in ("/etc/passwd", "..", "a/../../b", "../x", "s3://other/key"):
        with pytest.raises(ValueError, match=f"path part {part!r} is absolute or climbs"):
            storage.join(base, "ok", part)
