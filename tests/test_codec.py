"""Real compression with every registered architecture: round trips, container, gate, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from photos import photo, updated

from compresszoo.codec import (
    ContainerError,
    GateThresholds,
    decode_image,
    encode_image,
    read_header,
    validate_bitrate,
)
from compresszoo.codec.image import encode_with_latents
from compresszoo.models import ARCHITECTURES, create_model
from compresszoo.models.io import load_weights, save_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    return {name: updated(name) for name in ARCHITECTURES}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_round_trip_exact_latents_and_forward_match(models, name):
    model = models[name]
    x = torch.stack([photo("astronaut", 128, 192), photo("coffee", 128, 192, 100, 200)])
    out = model.compress(x, return_latents=True)
    assert len(out["strings"][0]) == 2
    dec = model.decompress(out["strings"], out["shape"])
    assert torch.equal(dec["y_hat"], out["y_hat"])  # exact latents
    with torch.no_grad():
        if name == "mbt2018":  # forward() rounds y without means; decode must equal g_s(y_hat)
            ref = model.g_s(out["y_hat"]).clamp(0, 1)
        else:
            ref = model(x)["x_hat"].clamp(0, 1)
    assert (dec["x_hat"] - ref).abs().max().item() < 1e-4



@pytest.mark.parametrize("quality,debug", [(1, False), (5, False), (3, True)],
                         ids=["q1-M192", "q5-M320", "debug"])
def test_mbt2018_decode_agrees_with_the_reference(quality, debug):
    """Our wavefront decoder recovers exactly the symbols the reference's raster decoder
    recovers from its own stream (same weights), and the decoded image agrees within float
    noise. Pixels are not compared bit for bit: oneDNN and the BLAS pick kernels (and so
    summation orders) per instruction set and thread count, so the reference's own x_hat
    moves by ~4e-7 between an AVX-512 and an AVX2 machine. Our latents must not depend on
    the thread count."""
    from compressai.models.google import JointAutoregressiveHierarchicalPriors as Ref

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(quality)
        ours = create_model("mbt2018", quality, debug=debug).eval()
        with torch.no_grad():  # spread the latents and the densities: many distinct symbols
            ours.g_a[6].weight.mul_(20.0)
            ours.entropy_bottleneck.quantiles.mul_(3.0)
        ours.update(force=True)
        ref = Ref(ours.N, ours.M).eval()
        ref.load_state_dict(ours.state_dict(), strict=True)
        ref_y = []  # the reference's decoded latents, captured at the input of its g_s
        ref.g_s.register_forward_pre_hook(lambda _m, args: ref_y.append(args[0].clone()))
        x = torch.stack([photo("astronaut", 128, 192), photo("coffee", 128, 192, 100, 200)])
        ref_x, outs = {}, {}
        with torch.no_grad():
            theirs = ref.compress(x)
            mine = ours.compress(x, return_latents=True)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                ref_x[threads] = ref.decompress(theirs["strings"], theirs["shape"])["x_hat"]
                outs[threads] = ours.decompress(mine["strings"], mine["shape"])
    finally:
        torch.set_num_threads(saved)
    assert mine["y_hat"].abs().max() > 3 and (mine["y_hat"] != mine["y_hat"].round()).any()
    for out in outs.values():
        assert torch.equal(out["y_hat"], mine["y_hat"])
    # y_hat = symbol + mean: symbols are integers, so a difference below 0.5 means every
    # decoded symbol is the same; the means themselves may differ by float noise (~1e-6).
    for y in ref_y:
        assert (y - mine["y_hat"]).abs().max().item() < 1e-3
    # 1e-4 is 1/40 of an 8-bit step; the float noise measured across CPUs is ~4e-7.
    for threads in (1, 2):
        gap = (outs[threads]["x_hat"] - ref_x[threads]).abs().max().item()
        assert gap < 1e-4, (threads, gap)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_full_size_model_round_trips_an_odd_sized_photo(name):
    torch.manual_seed(1)
    model = create_model(name, 1).eval()
    with torch.no_grad():  # a non-trivial density so tables have many bins
        model.entropy_bottleneck.quantiles.mul_(3.0)
    model.update(force=True)
    x = photo("chelsea", 75, 100, 50, 80)
    data, y_hat = encode_with_latents(model, x)
    header = read_header(data)
    assert (header.height, header.width, header.batched) == (75, 100, False)
    x_hat = decode_image(data, model)
    assert x_hat.shape == (3, 75, 100)
    from compresszoo.codec.image import decode_streams

    assert torch.equal(decode_streams(data, model)[1]["y_hat"], y_hat)


def _bytes_with_threads(name: str, threads: int, batch: int) -> str:
    code = textwrap.dedent(f"""
        import hashlib, torch, numpy as np
        from skimage import data
        torch.set_num_threads({threads})
        from compresszoo.models import create_model
        from compresszoo.codec import encode_image
        torch.manual_seed(0)
        m = create_model({name!r}, 3, debug=True).eval(); m.update(force=True)
        img = torch.from_numpy(data.astronaut()[:192, :128].copy()).permute(2, 0, 1).float() / 255
        other = torch.from_numpy(data.coffee()[:192, :128].copy()).permute(2, 0, 1).float() / 255
        x = img if {batch} == 1 else torch.stack([img, other])
        b = encode_image(m, x)
        from compresszoo.codec.container import unpack
        print(hashlib.sha256(b"".join(unpack(b)[1][0])).hexdigest())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("name", ["bmshj2018-hyperprior", "mbt2018"])
def test_bytes_do_not_depend_on_batch_or_threads(name):
    digests = {(t, b): _bytes_with_threads(name, t, b) for t in (1, 2) for b in (1, 2)}
    assert len(set(digests.values())) == 1, digests


def test_container_refuses_other_models_and_corruption(models):
    model = models["bmshj2018-hyperprior"]
    x = photo()
    data = encode_image(model, x)
    other = updated("bmshj2018-hyperprior", seed=7)
    with pytest.raises(ContainerError, match=r"encoded with bmshj2018-hyperprior mse q3.*decoder was given"):
        decode_image(data, other)
    with pytest.raises(ContainerError, match="encoded with"):
        decode_image(data, models["mbt2018-mean"])
    with pytest.raises(ContainerError, match="bad magic"):
        decode_image(b"\x89PNG\r\n\x1a\n" + data[8:], model)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with pytest.raises(ContainerError, match="checksum"):
        decode_image(bytes(flipped), model)
    with pytest.raises(ContainerError):
        decode_image(data[:-5], model)
    bumped = bytearray(data)
    bumped[2] = 9  # b"CZ", then the format version
    with pytest.raises(ContainerError, match="version 9"):
        decode_image(bytes(bumped), model)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        encode_image(model, torch.rand(1, 64, 64))


def test_container_fuzz_in_child_process(tmp_path, models):
    model = models["mbt2018"]
    ckpt = tmp_path / "m.safetensors"
    save_weights(model, ckpt)
    good = encode_image(model, photo("rocket", 128, 128))
    (tmp_path / "good.czoo").write_bytes(good)
    script = textwrap.dedent(f"""
        import json, random
        from compresszoo.models.io import load_weights
        from compresszoo.codec import decode_image
        from compresszoo.codec.container import ContainerError
        model = load_weights({str(ckpt)!r})
        good = open({str(tmp_path / 'good.czoo')!r}, 'rb').read()
        rng = random.Random(0)
        counts = {{"ok": 0, "value_error": 0}}
        assert decode_image(good, model).shape == (3, 128, 128)
        for i in range(3000):
            kind = i % 3
            if kind == 0:
                b = bytearray(good)
                for _ in range(rng.randint(1, 8)):
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif kind == 1:
                b = good[:rng.randrange(len(good))]
            else:
                b = (good[:9] if rng.random() < 0.5 else b"") + bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
            try:
                decode_image(bytes(b), model)
                counts["ok"] += 1
            except ValueError:
                counts["value_error"] += 1
        print(json.dumps(counts))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["value_error"] >= 2990  # corruption is caught (a flip could hit nothing)
    assert sum(counts.values()) == 3000


def test_gate_passes_exact_model_and_reports_everything(models):
    model = models["bmshj2018-factorized"]
    report = validate_bitrate(model, [photo("astronaut"), photo("coffee", 256, 320)])
    assert report["passed"], report["reason"]
    json.dumps(report)  # JSON-serializable
    row = report["images"][0]
    for key in ("estimated_bpp", "real_bpp", "payload_bpp", "relative_gap", "exact", "psnr",
                "ms_ssim", "encode_seconds", "decode_seconds"):
        assert row[key] is not None, key
    assert row["real_bpp"] > row["payload_bpp"] > 0
    assert abs(report["overall"]["relative_gap"]) <= 0.03


def test_gate_fails_inexact_decode_with_the_reason(models):
    class Drifting(type(models["bmshj2018-hyperprior"])):
        """Decoder whose scale prediction drifts from the encoder's: decode is inexact."""

        drift = False

        def _coding_params(self, z_hat, portable):
            scales, means = super()._coding_params(z_hat, portable)
            return (scales * 3.0 if self.drift else scales), means

        def decompress(self, strings, shape, portable=False):
            self.drift = True
            try:
                return super().decompress(strings, shape, portable=portable)
            finally:
                self.drift = False

    torch.manual_seed(0)
    model = Drifting(8, 12)
    model.meta = models["bmshj2018-hyperprior"].meta
    model.load_state_dict(models["bmshj2018-hyperprior"].state_dict())
    report = validate_bitrate(model.eval(), [photo()])
    assert not report["passed"]
    assert "not exact" in report["reason"] or "decode failed" in report["reason"]


def test_gate_fails_without_tables_and_on_stale_tables():
    torch.manual_seed(0)
    fresh = create_model("bmshj2018-factorized", 3, debug=True).eval()  # update() never called
    report = validate_bitrate(fresh, [photo()])
    assert not report["passed"] and "update()" in report["reason"]
    stale = updated("bmshj2018-factorized")
    with torch.no_grad():  # the density moves after the tables were built
        for b in stale.entropy_bottleneck.biases:
            b.add_(2.0)
    report = validate_bitrate(stale, [photo()])
    assert not report["passed"] and "bitrate gap" in report["reason"]
    small = validate_bitrate(updated("bmshj2018-factorized"), [photo(h=128, w=128)])
    assert not small["passed"] and "at least 256x256" in small["reason"]
    loose = validate_bitrate(updated("bmshj2018-factorized"), [photo(h=128, w=128)],
                             GateThresholds(min_side=128, max_relative_gap=0.5))
    assert loose["passed"], loose["reason"]


def test_cli_encode_info_decode(tmp_path, models):
    from PIL import Image

    model = models["mbt2018-mean"]
    ckpt = tmp_path / "model.safetensors"
    save_weights(model, ckpt)
    assert load_weights(ckpt).meta == model.meta
    src = tmp_path / "in.png"
    Image.fromarray((photo("coffee", 100, 150).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(src)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "platform"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "compresszoo.cli", *a], capture_output=True,  # noqa: E731
                                    text=True, env=env, timeout=300)
    enc = run("encode", str(src), "-o", str(tmp_path / "f.czoo"), "--model", str(ckpt))
    assert enc.returncode == 0, enc.stderr
    info = run("info", str(tmp_path / "f.czoo"))
    assert info.returncode == 0 and json.loads(info.stdout)["architecture"] == "mbt2018-mean"
    dec = run("decode", str(tmp_path / "f.czoo"), "-o", str(tmp_path / "out.png"), "--model", str(ckpt))
    assert dec.returncode == 0, dec.stderr
    assert Image.open(tmp_path / "out.png").size == (150, 100)
    bad = run("decode", str(src), "-o", str(tmp_path / "x.png"), "--model", str(ckpt))
    assert bad.returncode == 2 and "bad magic" in bad.stderr
