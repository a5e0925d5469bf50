"""Files decode on any machine: the portability matrix, in child processes.

Full-size models of all four architectures (q1, and a quality with M=320) code two real photos
on one configuration and are decoded on others (thread counts, oneDNN on/off and limited to
SSE4.1, float64 float layers, float results perturbed by a few ulps, bf16 autocast as a
stand-in for a GPU, float64 sums in another order). The portable path's decoded latents must
be identical everywhere; the same matrix shows the float path failing where the arithmetic
changes, so the test can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from photos import photo

from compresszoo.models import ARCHITECTURES, create_model
from compresszoo.models.io import save_weights

HERE = Path(__file__).resolve().parent
# (architecture, quality): q1 (M=192) and the first quality with M=320
MODELS = [(a, 1) for a in ARCHITECTURES] + [(a, 5 if a.startswith("mbt2018") else 6) for a in ARCHITECTURES]
ENCODERS = {"base": {}, "bf16": {"bf16": True}}
DECODERS = {
    "base": {}, "threads1": {"threads": 1}, "threads4": {"threads": 4}, "no-mkldnn": {"mkldnn": False},
    "sse41": {}, "float64": {"float64": True},  # sse41: ONEDNN_MAX_CPU_ISA=SSE41 in its own process
    "ulps": {"ulps": 4}, "bf16": {"bf16": True}, "float64-reordered": {"shuffle": True},
}
GAUSSIAN = [a for a in ARCHITECTURES if a != "bmshj2018-factorized"]


def run_child(spec: dict, path: Path, env: dict | None = None) -> dict:
    path.write_text(json.dumps(spec))
    out = subprocess.run([sys.executable, str(HERE / "portable_child.py"), str(path)],
                         env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(spec["out"], weights_only=True)


def spread(m) -> None:
    """Random weights put every scale at the table's 0.11 floor; real models do not. Spread
    the latents, the hyper densities and the scales (one log-uniform bias per channel)."""
    with torch.no_grad():
        m.g_a[6].weight.mul_(20.0)
        m.entropy_bottleneck.quantiles.mul_(3.0)
        if hasattr(m, "h_s"):  # the layer whose first M outputs are the scales
            last = m.entropy_parameters[-1] if hasattr(m, "entropy_parameters") else m.h_s[4]
            last.bias[:m.M] = torch.empty(m.M).uniform_(-2.0, 4.0).exp()


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("portable")
    weights = {}
    for arch, q in MODELS:
        torch.manual_seed(q)
        m = create_model(arch, q).eval()
        spread(m)
        m.update(force=True)
        save_weights(m, tmp / f"{arch}-q{q}.safetensors")
        weights[f"{arch}-q{q}"] = str(tmp / f"{arch}-q{q}.safetensors")
    x = torch.stack([photo("astronaut", 64, 128, 40, 180), photo("coffee", 64, 128, 100, 200)])
    torch.save({"x": x}, tmp / "x.pt")
    encoded = run_child({"mode": "encode", "configs": ENCODERS, "weights": weights, "data": str(tmp / "x.pt"),
                         "out": str(tmp / "enc.pt")}, tmp / "enc.json")
    for enc, out in encoded.items():
        torch.save(out, tmp / f"enc-{enc}.pt")

    def decode(job):
        enc, configs, env = job
        out = run_child({"mode": "decode", "configs": configs, "weights": weights, "data": str(tmp / f"enc-{enc}.pt"),
                         "out": str(tmp / f"dec-{enc}-{len(env)}.pt")}, tmp / f"dec-{enc}-{len(env)}.json", env)
        return {(enc, dec): res for dec, res in out.items()}

    in_process = {k: v for k, v in DECODERS.items() if k != "sse41"}
    jobs = [("base", in_process, {}), ("base", {"sse41": {}}, {"ONEDNN_MAX_CPU_ISA": "SSE41"}),
            ("bf16", {k: DECODERS[k] for k in ("base", "bf16", "threads1")}, {})]
    decoded = {}
    with ThreadPoolExecutor(2) as pool:
        for part in pool.map(decode, jobs):
            decoded.update(part)
    return weights, encoded, decoded


def test_the_models_use_many_table_entries(matrix):
    """The matrix means something only if the scales spread over the table."""
    from compresszoo.models.io import load_weights

    weights, _, _ = matrix
    x = photo("astronaut", 128, 192)[None]
    for arch, q in MODELS:
        if arch not in GAUSSIAN:
            continue
        m = load_weights(weights[f"{arch}-q{q}"])
        with torch.no_grad():
            y = m.g_a(x)
            z_hat = m.entropy_bottleneck(m.h_a(y if arch.startswith("mbt") else y.abs()), training=False)[0]
            params = m.h_s(z_hat)
            if arch == "mbt2018":
                params = m.entropy_parameters(torch.cat((params, m.context_prediction(y.round())), 1))
            scales = params.chunk(2, 1)[0] if arch.startswith("mbt") else params
        used = m.gaussian_conditional.build_indexes(scales).unique().numel()
        assert used >= 8, (arch, q, used)


@pytest.mark.parametrize("model", [f"{a}-q{q}" for a, q in MODELS])
def test_portable_latents_are_identical_on_every_configuration(matrix, model):
    _, _, decoded = matrix
    key = f"{model}|1"
    for enc in ENCODERS:
        ref = decoded[(enc, "base")][key]
        assert isinstance(ref, torch.Tensor), (enc, ref)
        for (e, dec), out in decoded.items():
            if e == enc:
                assert isinstance(out[key], torch.Tensor), (enc, dec, out[key])
                assert torch.equal(out[key], ref), (enc, dec, (out[key] - ref).abs().max().item())


def test_the_float_path_fails_where_the_arithmetic_changes(matrix):
    """Today's float path, same files and configurations: decoding under bf16 (and for the
    models with means, under a 4-ulp perturbation) desynchronises or moves the latents."""
    _, _, decoded = matrix

    def differs(enc, dec, key):
        ref, out = decoded[(enc, "base")][key], decoded[(enc, dec)][key]
        return isinstance(out, str) or not torch.equal(out, ref)

    for arch, q in MODELS:
        key = f"{arch}-q{q}|0"
        if arch in GAUSSIAN:
            assert differs("base", "bf16", key), key
        if arch.startswith("mbt2018"):
            assert differs("base", "ulps", key), key
    # bf16-encoded files (a GPU encoder) do not decode on the CPU as on the encoder's side
    for arch, q in MODELS:
        if arch in GAUSSIAN:
            key = f"{arch}-q{q}|0"
            own, cpu = decoded[("bf16", "bf16")][key], decoded[("bf16", "base")][key]
            assert isinstance(cpu, str) or isinstance(own, str) or not torch.equal(own, cpu), key


def test_winograd_gives_the_direct_convolutions_integers_up_to_its_bound():
    """The fast path for 3x3 stride-1 layers (portable.py) computes the same exact integer sums
    as F.conv2d: equal bit for bit, for inputs as large as its bound admits (where a wrong
    transform or a missing carry would show), odd sizes and batches; beyond the bound the layer
    declines it. The hyper-synthesis of the Gaussian models ends in such a layer."""
    import torch.nn.functional as F

    from compresszoo.models import portable as P

    torch.manual_seed(0)
    for ci, co, h, w in [(48, 64, 16, 16), (5, 7, 5, 9), (3, 4, 1, 1)]:
        conv = torch.nn.Conv2d(ci, co, 3, 1, 1)
        with torch.no_grad():
            conv.weight.mul_(20.0)  # w_frac drops below its cap: the layer sits at the 2**53 bound
        layer = P.fixed_layer(conv, None)
        assert layer.winograd is not None
        lim = (P.EXACT - 1) // (layer.winograd_bound * 4)
        assert lim > 2 ** 18  # room for real activations (|a| of a few hundred at A_FRAC bits)
        for n in (1, 2):
            x = torch.randint(-lim, lim + 1, (n, ci, h, w)).double()
            x[0, 0, 0, 0] = -lim
            assert layer.winograd_fits(x)
            assert torch.equal(layer.accumulate(x), F.conv2d(x, layer.weight, layer.bias, 1, 1))
        assert not layer.winograd_fits(torch.full((1, ci, h, w), float(lim + 1)))
    for arch in ("bmshj2018-hyperprior", "mbt2018-mean"):
        model = create_model(arch, 1).eval()
        layers = model.portable_layers("h_s", torch.device("cpu"))
        last = layers[-1]
        assert last.winograd is not None and last.winograd_bound * 4 * P.A_LIMIT > P.EXACT
        assert [la.subpixel is not None for la in layers] == [True, True, False]


def test_subpixel_deconvolution_gives_the_transposed_convolutions_integers():
    """The hyper-synthesis' 5x5 stride-2 transposed convolutions run as one 3x3 convolution over
    the four output phases plus a pixel shuffle (portable.py), by Winograd when the input is
    large enough and the bound holds, directly otherwise. Both must give F.conv_transpose2d's
    integers bit for bit: at the bound, on sizes with and without Winograd (16x16 and 5x9
    inputs), odd sizes, batches, and past the bound."""
    import torch.nn.functional as F

    from compresszoo.models import portable as P

    torch.manual_seed(0)
    for ci, co, h, w in [(40, 24, 16, 16), (5, 7, 5, 9), (3, 4, 1, 1), (6, 5, 17, 23)]:
        deconv = torch.nn.ConvTranspose2d(ci, co, 5, 2, 2, 1)
        with torch.no_grad():
            deconv.weight.mul_(20.0)
        layer = P.fixed_layer(deconv, None)
        assert layer.subpixel is not None and layer.winograd is not None
        lim = (P.EXACT - 1) // (layer.winograd_bound * 4)
        assert lim > 2 ** 18
        for n, big in ((1, lim), (2, lim), (1, min(4 * lim, int(P.A_LIMIT)))):
            x = torch.randint(-big, big + 1, (n, ci, h, w)).double()
            x[0, 0, 0, 0] = -big
            assert layer.winograd_fits(x) == (big == lim)
            want = F.conv_transpose2d(x, layer.weight, layer.bias, 2, 2, 1)
            assert torch.equal(layer.accumulate(x), want), (ci, co, h, w, n, big)
