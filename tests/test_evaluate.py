"""The evaluation package (compresszoo.evaluate) and pipelines/evaluate.py end to end on real
photos, and the RD math (BD-rate, BD-PSNR, Pareto front) it rests on, checked against known
values and an independent SciPy computation."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from compresszoo.evaluate import UsageError, rd
from compresszoo.evaluate.compare import (
    PUBLISHED_ZOO,
    load_reference,
    rd_position,
    rd_position_text,
)
from compresszoo.evaluate.images import read_rgb
from compresszoo.evaluate.learned import load_model
from compresszoo.evaluate.runner import Options, evaluate, tracking_uri_for

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = ROOT / "pipelines" / "evaluate.py"
FAMILY = "bmshj2018-factorized-mse"
# bmshj2018-factorized on Kodak, from the published CompressAI results
# (compresszoo/evaluate/compressai_kodak_mse.json,
# checked in test_the_reference_file_loads_and_holds_the_values_used_here)
KODAK_BPP = [0.1226, 0.1885, 0.2878, 0.4404, 0.6481, 0.9670, 1.3512, 1.8333]
KODAK_PSNR = [26.909, 28.218, 29.617, 31.277, 32.956, 35.381, 37.397, 39.621]


# ---------------------------------------------------------------------------- BD math


def test_bd_of_a_curve_against_itself_is_zero():
    c = rd.RDCurve("a", KODAK_BPP, KODAK_PSNR)
    assert rd.bd_rate(c, c) == pytest.approx(0.0, abs=1e-9)
    assert rd.bd_psnr(c, c) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("scale, expected", [(0.9, -10.0), (1.25, 25.0)])
def test_bd_rate_of_scaled_rates_at_equal_psnr_is_the_scale(scale, expected):
    test = ([scale * r for r in KODAK_BPP], KODAK_PSNR)
    assert rd.bd_rate((KODAK_BPP, KODAK_PSNR), test) == pytest.approx(expected, abs=1e-9)
    # same rates for less quality on the anchor side: BD-PSNR positive for the cheaper test curve
    assert (rd.bd_psnr((KODAK_BPP, KODAK_PSNR), test) > 0) == (scale < 1)


def test_bd_psnr_of_a_psnr_shift_is_the_shift_and_bd_rate_follows():
    shifted = (KODAK_BPP, [p + 0.5 for p in KODAK_PSNR])
    assert rd.bd_psnr((KODAK_BPP, KODAK_PSNR), shifted) == pytest.approx(0.5, abs=1e-9)
    assert rd.bd_psnr(shifted, (KODAK_BPP, KODAK_PSNR)) == pytest.approx(-0.5, abs=1e-9)
    # ~ +0.5 dB is worth roughly 8-12% of rate on this curve: BD-rate must be clearly negative
    assert -15.0 < rd.bd_rate((KODAK_BPP, KODAK_PSNR), shifted) < -5.0


def _scipy_bd(anchor, test):
    """Independent BD: SciPy's pchip, integrated numerically with quad."""
    from scipy.integrate import quad
    from scipy.interpolate import PchipInterpolator

    def integral(x, y, lo, hi):  # knots as break points: the spline is only C1 there
        knots = [k for k in x if lo < k < hi]
        return quad(PchipInterpolator(x, y), lo, hi, points=knots or None, limit=200,
                    epsabs=1e-12, epsrel=1e-12)[0]

    (ra, pa), (rt, pt) = anchor, test
    la, lt = np.log(ra), np.log(rt)
    lo, hi = max(min(pa), min(pt)), min(max(pa), max(pt))
    bd_rate = (math.exp((integral(pt, lt, lo, hi) - integral(pa, la, lo, hi)) / (hi - lo)) - 1) * 100
    lo, hi = max(la.min(), lt.min()), min(la.max(), lt.max())
    return bd_rate, (integral(lt, pt, lo, hi) - integral(la, pa, lo, hi)) / (hi - lo)


@pytest.mark.parametrize("seed", range(4))
def test_bd_matches_scipy_pchip_and_quad(seed):
    rng = np.random.default_rng(seed)

    def random_curve(n, r0, p0):
        rates = r0 * np.cumprod(rng.uniform(1.2, 2.0, n))
        return rates, p0 + np.cumsum(rng.uniform(0.3, 3.0, n))  # uneven, sometimes kinked

    anchor = random_curve(int(rng.integers(4, 9)), 0.05, 24.0)
    test = random_curve(int(rng.integers(2, 7)), 0.08, 25.5)  # partial overlap, 2 points included
    want_rate, want_psnr = _scipy_bd(anchor, test)
    assert rd.bd_rate(anchor, test) == pytest.approx(want_rate, rel=1e-7, abs=1e-7)
    assert rd.bd_psnr(anchor, test) == pytest.approx(want_psnr, rel=1e-7, abs=1e-7)


def test_pchip_integral_matches_scipy_exactly_on_partial_segments():
    from scipy.interpolate import PchipInterpolator

    x, y = np.log(KODAK_BPP), np.array(KODAK_PSNR)
    lo, hi = x[1] + 0.13, x[6] - 0.07
    assert rd.pchip_integral(x, y, lo, hi) == pytest.approx(PchipInterpolator(x, y).integrate(lo, hi), rel=1e-12)
    mid = 0.3 * x[2] + 0.7 * x[3]
    assert rd.pchip_eval(x, y, mid) == pytest.approx(float(PchipInterpolator(x, y)(mid)), rel=1e-12)
    assert rd.rate_at_quality((KODAK_BPP, KODAK_PSNR), 32.0) == pytest.approx(
        math.exp(float(PchipInterpolator(y, x)(32.0))), rel=1e-12)


@pytest.mark.parametrize("rate, psnr, message", [
    ([0.5], [30.0], "at least 2 points"),
    ([0.2, 0.4, 0.8], [30.0, 29.0, 33.0], "not monotone"),
    ([0.2, 0.2, 0.8], [30.0, 31.0, 33.0], "not monotone"),
    ([0.0, 0.4], [30.0, 31.0], "> 0"),
    ([0.2, float("nan")], [30.0, 31.0], "non-finite"),
    ([0.2, 0.4], [30.0], "one quality per rate"),
])
def test_bad_curves_are_rejected_with_a_reason(rate, psnr, message):
    with pytest.raises(ValueError, match=message):
        rd.RDCurve("bad", rate, psnr)


def test_curves_that_do_not_overlap_have_no_bd():
    low, high = ([0.1, 0.2], [20.0, 22.0]), ([0.3, 0.6], [30.0, 33.0])
    with pytest.raises(ValueError, match="do not overlap in quality"):
        rd.bd_rate(low, high)
    with pytest.raises(ValueError, match="do not overlap in log-rate"):
        rd.bd_psnr(low, high)
    s = rd.bd_summary(rd.RDCurve("low", *low), rd.RDCurve("high", *high))
    assert s["bd_rate_percent"] is None and "do not overlap" in s["error"] and s["anchor"] == "low"


def test_points_in_any_order_give_the_same_curve():
    c = rd.RDCurve("a", KODAK_BPP[::-1], KODAK_PSNR[::-1])
    assert list(c.rate) == KODAK_BPP and list(c.quality) == KODAK_PSNR


def test_pareto_front_keeps_the_least_rate_for_each_quality():
    points = [
        {"cfg": "a", "bpp": 0.30, "psnr": 30.0},
        {"cfg": "b", "bpp": 0.25, "psnr": 30.5},  # beats a: fewer bits, more quality
        {"cfg": "c", "bpp": 0.50, "psnr": 32.0},
        {"cfg": "d", "bpp": 0.50, "psnr": 31.0},  # same rate as c, less quality
        {"cfg": "e", "bpp": 0.10, "psnr": 27.0},
        {"cfg": "f", "bpp": 0.90, "psnr": 31.9},  # more bits than c for less quality
        {"cfg": "g", "bpp": 1.20, "psnr": 35.0},
    ]
    front = rd.pareto_front(points)
    assert [p["cfg"] for p in front] == ["e", "b", "c", "g"]
    curve, dominated = rd.curve_from_points("sweep", points)
    assert curve.rate == (0.10, 0.25, 0.50, 1.20) and {p["cfg"] for p in dominated} == {"a", "d", "f"}
    assert rd.pareto_front([(2.0, 1.0), (1.0, 2.0)], rate=0, quality=1) == [(1.0, 2.0)]
    with pytest.raises(ValueError, match="point 1"):
        rd.pareto_front([{"bpp": 0.1, "psnr": 20.0}, {"bpp": 0.2}])


# ---------------------------------------------------------------------------- image policy


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_image_policy_rgb_palette_alpha_gray_corrupt(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(read_rgb(_save(tmp_path / "rgb.png", rgb))[0], rgb)
    opaque = np.dstack([rgb, np.full((20, 30), 255, np.uint8)])
    array, note = read_rgb(_save(tmp_path / "opaque.png", opaque))
    assert np.array_equal(array, rgb) and "alpha" in note
    seethrough = opaque.copy()
    seethrough[0, 0, 3] = 10
    with pytest.raises(ValueError, match="transparency"):
        read_rgb(_save(tmp_path / "seethrough.png", seethrough))
    with pytest.raises(ValueError, match="grayscale"):
        read_rgb(_save(tmp_path / "gray.png", rgb[..., 0]))
    Image.fromarray(rgb).quantize(16).save(tmp_path / "palette.png")
    assert read_rgb(tmp_path / "palette.png")[0].shape == (20, 30, 3)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    with pytest.raises(ValueError, match="CMYK"):
        read_rgb(tmp_path / "cmyk.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(ValueError, match="unreadable"):
        read_rgb(tmp_path / "broken.png")


# ---------------------------------------------------------------------------- model refs


def test_registry_reference_without_registry_client_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "compresszoo.registry_client", None)  # import fails
    with pytest.raises(UsageError, match="registry_client.*checkpoint"):
        load_model("bmshj2018-factorized-mse-q3@champion", "sqlite:////tmp/none.db")
    with pytest.raises(UsageError, match="MLFLOW_TRACKING_URI"):
        load_model("bmshj2018-factorized-mse-q3@champion", None)


def test_registry_reference_goes_to_load_registered(monkeypatch):
    from compresszoo.models import create_model

    calls = []
    fake = types.ModuleType("compresszoo.registry_client")

    def load_registered(ref, tracking_uri=None):
        calls.append((ref, tracking_uri))
        m = create_model("bmshj2018-hyperprior", 2, debug=True)
        m.update(force=True)
        return m

    fake.load_registered = load_registered
    monkeypatch.setitem(sys.modules, "compresszoo.registry_client", fake)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # the URI must come from the argument
    loaded = load_model("mine=bmshj2018-hyperprior-mse-q2:3", "sqlite:////srv/mlflow.db")
    assert calls == [("bmshj2018-hyperprior-mse-q2:3", "sqlite:////srv/mlflow.db")]
    assert loaded.source == "registry" and loaded.family == "mine" and loaded.spec["quality"] == 2


# ---------------------------------------------------------------------------- end to end

CROPS = {"astronaut.png": ("astronaut", 0, 140), "coffee.png": ("coffee", 100, 200),
         "chelsea.png": ("chelsea", 60, 100)}
H, W = 176, 192  # > 160 px a side, so MS-SSIM is measured too


def block_mean_model(quality: int, step: float):
    """A debug factorized model with hand-set weights: 4x4 block means of R, G, B, quantized
    with `step`, its entropy model fitted to them. Random weights give ~5 dB, a range no JPEG
    setting reaches; this one gives ~23-26 dB, so BD-rate against JPEG has a common range."""
    torch.manual_seed(quality)
    m = create_debug(quality)
    convs = [layer for layer in m.g_a if isinstance(layer, torch.nn.Conv2d)]
    deconvs = [layer for layer in m.g_s if isinstance(layer, torch.nn.ConvTranspose2d)]
    with torch.no_grad():
        for gdn in [layer for layer in (*m.g_a, *m.g_s) if hasattr(layer, "gamma")]:  # identity
            gdn.gamma.copy_(gdn.gamma_reparam.init(torch.zeros_like(gdn.gamma)))
            gdn.beta.copy_(gdn.beta_reparam.init(torch.ones_like(gdn.beta)))
        for layer in convs + deconvs:
            layer.weight.zero_()
            layer.bias.zero_()
        for c in range(3):  # g_a: two 2x2 means, then space-to-depth twice (3 -> 12 -> 48 channels)
            convs[0].weight[c, c, 2:4, 2:4] = 0.25
            convs[1].weight[c, c, 2:4, 2:4] = 0.25
            deconvs[2].weight[c, c, 2:4, 2:4] = 1.0  # g_s: depth-to-space twice, then upsample
            deconvs[3].weight[c, c, 2:4, 2:4] = 1.0
        for a in range(2):
            for b in range(2):
                for c in range(3):
                    convs[2].weight[4 * c + 2 * a + b, c, 2 + a, 2 + b] = 1.0
                    deconvs[1].weight[4 * c + 2 * a + b, c, 2 + a, 2 + b] = 1.0
                for k in range(12):
                    convs[3].weight[4 * k + 2 * a + b, k, 2 + a, 2 + b] = 1.0 / step
                    deconvs[0].weight[4 * k + 2 * a + b, k, 2 + a, 2 + b] = step
        convs[3].bias.fill_(-0.5 / step)
        deconvs[0].bias.fill_(0.5)
        y = m.g_a(torch.stack([photo(*v) for v in CROPS.values()]))
    eb = m.entropy_bottleneck
    with torch.no_grad():  # start the quantiles at the data's range; the aux loss refines them
        per_channel = y.transpose(0, 1).flatten(1)
        eb.quantiles.copy_(torch.stack([per_channel.min(1).values - 1, per_channel.median(1).values,
                                        per_channel.max(1).values + 1], dim=1)[:, None, :])
    opt = torch.optim.Adam([p for n, p in eb.named_parameters() if n != "quantiles"], lr=2e-2)
    aux = torch.optim.Adam([eb.quantiles], lr=0.5)
    eb.train()
    for _ in range(120):
        _, likelihoods = eb(y)
        opt.zero_grad()
        (-torch.log2(likelihoods).sum() / y.numel()).backward()
        opt.step()
        aux.zero_grad()
        eb.loss().backward()
        aux.step()
    with torch.no_grad():  # as the brief's checkpoints: quantiles nudged, tables rebuilt
        eb.quantiles.add_(0.01 * torch.randn_like(eb.quantiles))
    m.eval().update(force=True)
    return m


def create_debug(quality: int):
    from compresszoo.models import create_model

    return create_model("bmshj2018-factorized", quality, debug=True, N=12, M=48)


def photo(name: str, top: int, left: int) -> torch.Tensor:
    from skimage import data

    img = getattr(data, name)()[top:top + H, left:left + W]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One evaluation of two checkpoints and two codecs; the models are built (and re-encoded
    by tests) on one thread, like the evaluation's subprocess, and the thread count restored."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _evaluate_once(tmp_path_factory)
    finally:
        torch.set_num_threads(saved)


def _evaluate_once(tmp_path_factory) -> dict:
    from PIL import Image

    from compresszoo.models.io import save_weights

    root = tmp_path_factory.mktemp("evaluate")
    images = root / "images"
    images.mkdir()
    for fname, args in CROPS.items():
        rgb = (photo(*args).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(rgb).save(images / fname)
    (images / "corrupt.png").write_bytes((images / "coffee.png").read_bytes()[:300])  # truncated
    Image.fromarray(np.full((H, W), 128, np.uint8)).save(images / "gray.png")
    (images / "README.txt").write_text("not an image")
    ckpts = []
    for quality, step in ((1, 1 / 6), (8, 1 / 255)):
        ckpts.append(root / f"q{quality}.safetensors")
        save_weights(block_mean_model(quality, step), ckpts[-1])
    reference = root / "reference.json"  # the shared file's layout, in a range these models reach
    reference.write_text(json.dumps({"dataset": "Kodak (24 images, 768x512)", "metric": "mse", "results": {
        "bmshj2018-factorized": {"quality": [1, 2, 3], "bpp": [0.3, 0.6, 1.2], "psnr": [22.0, 25.0, 28.0]}}}))
    out = root / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESSZOO_MLFLOW_ARTIFACTS": str(root / "artifacts")}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, str(EVALUATE), "--images", str(images), "--model", str(ckpts[0]),
           "--model", str(ckpts[1]), "--codecs", "jpeg,webp", "--reference", str(reference),
           "--out", str(out), "--mlflow", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"root": root, "out": out, "proc": proc, "ckpts": ckpts, "images": images,
            "report": json.loads((out / "report.json").read_text())}


def test_rd_table_and_plot_exist_with_real_numbers(run):
    import csv

    out, report = run["out"], run["report"]
    assert report["schema"] == "compresszoo.evaluate/1"
    for name in ("rd_table.csv", "rd_images.csv", "report.md"):
        assert (out / name).stat().st_size > 100
    for name in ("rd_psnr.png", "rd_ms_ssim.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "rd_table.csv").open()))
    assert {(r["curve"], r["setting"]) for r in rows} >= {(FAMILY, "q1"), (FAMILY, "q8"),
                                                          ("jpeg", "quality=50"), ("webp", "quality=50")}
    assert len(rows) == len(report["points"]) == 2 + 12 + 12
    for r in rows:
        assert float(r["bpp"]) > 0 and 15 < float(r["psnr"]) < 60, r
        assert 0 < float(r["ms_ssim"]) <= 1 and float(r["encode_seconds"]) > 0, r
    for p in report["points"]:
        for img in p["images"]:  # bpp is the size of a real file over the image's pixels
            assert img["bpp"] == pytest.approx(8 * img["bytes"] / (H * W))
    q1, q8 = (next(p for p in report["points"] if p["setting"] == s) for s in ("q1", "q8"))
    assert q1["bpp"] < q8["bpp"] and q1["psnr"] < q8["psnr"]
    assert 0 < q1["payload_bpp"] < q1["bpp"]  # the container header is counted in bpp


def test_reported_sizes_are_the_files_the_coders_write(run):
    """Re-encode here and compare byte counts: the report holds real coding, not estimates."""
    from PIL import Image

    from compresszoo.codec import decode_image, encode_image
    from compresszoo.models.io import load_weights

    points = {(p["curve"], p["setting"]): {i["image"]: i for i in p["images"]} for p in run["report"]["points"]}
    rgb = np.asarray(Image.open(run["images"] / "chelsea.png").convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=50, optimize=True)
    assert points[("jpeg", "quality=50")]["chelsea.png"]["bytes"] == len(buf.getvalue())
    model = load_weights(run["ckpts"][1])
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255
    data = encode_image(model, x)
    row = points[(FAMILY, "q8")]["chelsea.png"]
    assert row["bytes"] == len(data)
    dec = (decode_image(data, model) * 255).round().permute(1, 2, 0).numpy()
    assert row["psnr"] == pytest.approx(10 * math.log10(255**2 / np.mean((dec - rgb) ** 2)), abs=1e-6)


def test_bd_rate_against_jpeg_and_reference_is_finite(run):
    report = run["report"]
    bd = {(b["test"], b["anchor"]): b for b in report["bd"]}
    vs_jpeg = bd[(FAMILY, "jpeg")]
    assert vs_jpeg["error"] is None and math.isfinite(vs_jpeg["bd_rate_percent"])
    assert math.isfinite(vs_jpeg["bd_psnr_db"]) and vs_jpeg["psnr_overlap_db"][1] > vs_jpeg["psnr_overlap_db"][0]
    assert (FAMILY, "webp") in bd and ("webp", "jpeg") in bd
    assert bd[("webp", "jpeg")]["bd_rate_percent"] < 0  # WebP beats JPEG, as everywhere
    vs_ref = bd[(FAMILY, f"reference:{FAMILY}")]
    assert vs_ref["rate_measure"] == "payload_bpp" and math.isfinite(vs_ref["bd_rate_percent"])
    assert report["reference"]["comparable"] is False and "not Kodak" in report["reference"]["note"]
    assert "BD-rate bmshj2018-factorized-mse vs jpeg: " in run["proc"].stdout
    assert FAMILY in report["curves"] and report["curves"]["jpeg"]["kind"] == "codec"


def test_corrupt_and_gray_files_are_named_and_the_rest_evaluated(run):
    report, proc = run["report"], run["proc"]
    skipped = {s["name"]: s["reason"] for s in report["images"]["skipped"]}
    assert set(skipped) == {"corrupt.png", "gray.png"}
    assert "unreadable" in skipped["corrupt.png"] and "grayscale" in skipped["gray.png"]
    assert report["images"]["ignored"] == ["README.txt"]
    assert [i["name"] for i in report["images"]["evaluated"]] == sorted(CROPS)
    for p in report["points"]:
        assert sorted(i["image"] for i in p["images"]) == sorted(CROPS) and p["error"] is None
    assert "corrupt.png" in proc.stdout and "gray.png" in proc.stdout
    md = (run["out"] / "report.md").read_text()
    assert "`corrupt.png`" in md and "`gray.png`" in md


def test_mlflow_run_has_the_table_and_plots(run):
    logged = {p.name for p in (run["root"] / "artifacts").glob("*/artifacts/*")}
    assert {"report.json", "rd_table.csv", "report.md", "rd_psnr.png"} <= logged
    assert not (run["root"] / "mlruns").exists()  # nothing went to MLflow's implicit default


def test_a_bad_model_fails_with_one_line_from_a_bare_checkout(run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, str(EVALUATE), "--images", str(run["images"]), "--model",
                           str(tmp_path / "missing.safetensors"), "--codecs", "jpeg", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "missing.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_mlflow_needs_an_explicit_uri_and_codecs_must_exist(run, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = {"images": run["images"], "models": [str(run["ckpts"][0])]}
    with pytest.raises(UsageError, match="--tracking-uri or set MLFLOW_TRACKING_URI"):
        evaluate(Options(**base, mlflow=True))
    with pytest.raises(UsageError, match="unknown codec 'bpg'"):
        evaluate(Options(**base, codecs="jpeg,bpg"))


def test_mlflow_is_touched_only_when_asked_for(run, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    ckpt, registered = str(run["ckpts"][0]), "bmshj2018-factorized-mse-q3@champion"
    assert tracking_uri_for(Options(run["images"], models=[ckpt])) is None
    # a registry reference reads the project's default registry, ./mlflow.db, made absolute
    assert tracking_uri_for(Options(run["images"], models=[ckpt, registered])) == \
        f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_uri_for(Options(run["images"], tracking_uri="sqlite:///x.db")) == f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/env.db")
    assert tracking_uri_for(Options(run["images"], models=[registered], mlflow=True)) == "sqlite:////srv/env.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # evaluating a checkpoint in-process: the report is written, and no MLflow store appears
    messages = []
    report = evaluate(Options(run["images"], models=[ckpt], codecs="none", out=tmp_path / "out"), messages.append)
    assert [p["setting"] for p in report["points"]] == ["q1"] and report["bd"] == []
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["points"][0]["psnr"] == report["points"][0]["psnr"]  # JSON keeps floats exactly
    assert any("skipping corrupt.png" in m for m in messages)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_the_reference_file_loads_and_holds_the_values_used_here():
    """The repo's one copy of the published results (package data, read by model cards); the
    BD tests above use its bmshj2018-factorized curve, rounded."""
    path = PUBLISHED_ZOO
    published = json.loads(path.read_text())["results"]["bmshj2018-factorized"]
    assert [round(v, 4) for v in published["bpp"]] == KODAK_BPP
    assert [round(v, 3) for v in published["psnr"]] == KODAK_PSNR
    curves, meta = load_reference(path)
    assert set(curves) == {f"reference:{a}-mse" for a in
                           ("bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean", "mbt2018")}
    assert "Kodak" in meta["dataset"]
    # the published zoo ranks as the papers say: mbt2018 needs fewer bits than factorized
    assert rd.bd_rate(curves["reference:bmshj2018-factorized-mse"], curves["reference:mbt2018-mse"]) < -20


def test_rd_position_against_the_published_zoo_says_when_it_compares():
    published = json.loads(PUBLISHED_ZOO.read_text())["results"]["bmshj2018-hyperprior"]
    kodak = [(512, 768)] * 20 + [(768, 512)] * 4
    bpp, psnr = published["bpp"][2], published["psnr"][2]  # quality 3: the zoo's N=128, M=192
    at = dict(architecture="bmshj2018-hyperprior", metric="mse", quality=3, N=128, M=192, image_shapes=kodak)
    same = rd_position(payload_bpp=bpp, psnr=psnr, **at)
    assert same["comparable"] and same["not_comparable"] == []
    assert same["published"] == {"bpp": bpp, "psnr": psnr}
    # the published point itself: no difference (pchip passes through its nodes; log/exp rounding)
    assert abs(same["psnr_delta_db_at_equal_bpp"]) < 1e-9 and abs(same["bpp_delta_percent_at_equal_psnr"]) < 1e-7
    better = rd_position(payload_bpp=bpp, psnr=psnr + 0.5, **at)  # +0.5 dB at the same rate
    assert abs(better["psnr_delta_db_at_equal_bpp"] - 0.5) < 1e-9 and better["bpp_delta_percent_at_equal_psnr"] < 0
    assert "+0.50 dB at equal bpp" in rd_position_text(better)

    smoke = rd_position(architecture="bmshj2018-hyperprior", metric="mse", quality=8, N=8, M=12,
                        payload_bpp=0.14, psnr=24.0, image_shapes=[(64, 64)] * 2)
    assert not smoke["comparable"] and smoke["psnr_delta_db_at_equal_bpp"] is None
    assert smoke["published"] == {"bpp": published["bpp"][7], "psnr": published["psnr"][7]}
    text = rd_position_text(smoke)
    assert text.startswith("Not comparable with the published zoo")
    assert "N=8, M=12 is not the zoo's N=192, M=320 at quality 8" in text and "not the 24 Kodak images" in text
    ms = rd_position(**{**at, "metric": "ms-ssim"}, payload_bpp=bpp, psnr=psnr)
    assert not ms["comparable"] and ms["published"] is None
    assert "no published ms-ssim curve for bmshj2018-hyperprior" in rd_position_text(ms)


def _point(curve: str, kind: str, setting: str, bpp: float, psnr: float, ms_ssim: float) -> dict:
    return {"curve": curve, "kind": kind, "setting": setting, "error": None, "bpp": bpp, "payload_bpp": bpp,
            "psnr": psnr, "ms_ssim": ms_ssim, "ms_ssim_db": rd.ms_ssim_db(ms_ssim)}


def test_ms_ssim_bd_rate_compares_the_ms_ssim_curves():
    """A model that reaches JPEG's MS-SSIM with 20% fewer bits, but 1 dB less PSNR at JPEG's
    rates: BD-rate on MS-SSIM is -20% (exact for rates scaled at equal quality); on PSNR it is
    not, so the two columns cannot be swapped or computed from one curve."""
    from compresszoo.evaluate.compare import compare

    ms = [0.90, 0.93, 0.95, 0.97, 0.98]
    rates = [0.2, 0.35, 0.6, 1.0, 1.6]
    psnr = [27.0, 29.0, 31.0, 33.5, 36.0]
    points = [_point("jpeg", "codec", f"quality={i}", r, p, m) for i, (r, p, m) in enumerate(zip(rates, psnr, ms))]
    points += [_point("mine", "model", f"q{i}", 0.8 * r, p - 1.0, m) for i, (r, p, m) in enumerate(zip(rates, psnr, ms))]
    row = next(b for b in compare(points, {}).bd if (b["test"], b["anchor"]) == ("mine", "jpeg"))
    assert row["bd_rate_ms_ssim_percent"] == pytest.approx(-20.0, abs=1e-9)
    assert row["bd_ms_ssim_db"] > 0
    want = rd.bd_rate((rates, psnr), ([0.8 * r for r in rates], [p - 1.0 for p in psnr]))
    assert row["bd_rate_percent"] == pytest.approx(want, rel=1e-12) and want > -20.0 + 5


def test_ms_ssim_bd_rate_is_in_the_end_to_end_report(run):
    bd = {(b["test"], b["anchor"]): b for b in run["report"]["bd"]}
    for key in ((FAMILY, "jpeg"), ("webp", "jpeg")):
        assert math.isfinite(bd[key]["bd_rate_ms_ssim_percent"]) and math.isfinite(bd[key]["bd_ms_ssim_db"]), key
        assert bd[key]["bd_rate_ms_ssim_percent"] != bd[key]["bd_rate_percent"], key
    assert bd[("webp", "jpeg")]["bd_rate_ms_ssim_percent"] < 0  # WebP beats JPEG on MS-SSIM too
