"""compresszoo.compat: CompressAI 1.2.8's calls and assertions (from its tests and docs) against
the compat surface, for the four zoo architectures; the installed compressai is the oracle
where bytes or values are compared. The full CompressAI suite runs in
benchmarks/compressai_suite.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from compresszoo.compat import ans, zoo
from compresszoo.compat._CXX import pmf_to_quantized_cdf
from compresszoo.compat.entropy_models import EntropyBottleneck, EntropyModel, GaussianConditional
from compresszoo.compat.layers import GDN, MaskedConv2d
from compresszoo.compat.losses import RateDistortionLoss
from compresszoo.compat.models import (
    CompressionModel,
    FactorizedPrior,
    JointAutoregressiveHierarchicalPriors,
    MeanScaleHyperprior,
    ScaleHyperprior,
)
from compresszoo.compat.models.utils import _update_registered_buffer, update_registered_buffers
from compresszoo.compat.ops import LowerBound

# TorchScript is deprecated in torch 2.14, but deployed CompressAI code uses it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")

ARCHS = {
    "bmshj2018-factorized": FactorizedPrior,
    "bmshj2018-hyperprior": ScaleHyperprior,
    "mbt2018-mean": MeanScaleHyperprior,
    "mbt2018": JointAutoregressiveHierarchicalPriors,
}
TRANSFORMS = ("g_a", "g_s", "h_a", "h_s", "context_prediction", "entropy_parameters")
N, M = 8, 12  # small enough for CPU tests; every code path is the full-size one


def _net(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls(N, M).eval()


def _image(size: int = 64) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.zeros(2, 3, size, size)
    x[:, :, size // 4: -size // 4, size // 4: -size // 4] = 1
    return (x + 0.1 * torch.rand_like(x)).clamp(0, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_zoo_functions_take_progress_and_refuse_bad_params(arch):
    fn = zoo.image_models[arch]
    net = fn(1, metric="mse", progress=False)
    assert isinstance(net, ARCHS[arch])
    assert net.state_dict()["g_a.0.weight"].size(0) == (192 if arch == "mbt2018" else 128)
    for bad in ((-1,), (10,), (10, "ssim"), (1, "ssim")):
        with pytest.raises(ValueError):
            fn(*bad)
    with pytest.raises(ValueError):
        zoo.image._load_model(arch, "mse", 0)


def test_load_model_refuses_unknown_architecture():
    with pytest.raises(ValueError):
        zoo.image._load_model("yolo", "mse", 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_update_from_state_dict_and_codec_round_trip(arch, tmp_path):
    cls = ARCHS[arch]
    net = _net(cls)
    assert net.update() and not net.update() and not net.update(force=False)
    assert net.update(force=True)
    path = tmp_path / "model.pth.tar"
    torch.save(net.state_dict(), path)
    loaded = cls.from_state_dict(torch.load(path, weights_only=True)).eval()
    assert (loaded.N, loaded.M) == (N, M) and isinstance(loaded, cls)

    x = _image()
    with torch.no_grad():
        rv = net.compress(x)
    assert rv["shape"] == torch.Size([x.size(2) // net.downsampling_factor,
                                      x.size(3) // net.downsampling_factor])
    assert len(rv["strings"]) == (1 if arch == "bmshj2018-factorized" else 2)
    for strings in rv["strings"]:
        assert len(strings) == x.size(0) and all(isinstance(s, bytes) and s for s in strings)
    # The loaded copy decodes the original's streams to the encoder's own y_hat.
    with torch.no_grad():
        y_hat = net.compress(x, return_latents=True)["y_hat"]
        out = loaded.decompress(rv["strings"], rv["shape"])
    assert out["x_hat"].shape == x.shape
    assert torch.equal(out["y_hat"], y_hat)


@pytest.mark.parametrize("arch", ARCHS)
def test_from_state_dict_takes_a_compressai_checkpoint(arch):
    import compressai.models as ref_models

    torch.manual_seed(0)
    ref = getattr(ref_models, ARCHS[arch].__name__)(N, M)
    ref.update()
    ours = ARCHS[arch].from_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("arch", ARCHS)
def test_stream_order_keyword(arch):
    net = _net(ARCHS[arch])
    net.update()
    x = _image(64)
    with pytest.raises(ValueError, match="wavefront.*raster"):
        net.compress(x, order="zigzag")
    with pytest.raises(ValueError, match="wavefront.*raster"):
        net.decompress([[b""]] * 2, torch.Size([1, 1]), order="zigzag")
    if arch != "mbt2018":  # no context model: both orders are the same bytes
        assert net.compress(x, order="raster")["strings"] == net.compress(x)["strings"]


def test_update_quantiles_solves_the_aux_targets():
    torch.manual_seed(0)
    eb = EntropyBottleneck(4)
    before = eb.loss().item()
    assert eb.update(update_quantiles=True)
    after = eb.loss().item()
    # The bisection stops at rtol 1e-4 / atol 1e-3 in the quantiles' units; the loss is
    # the logits' distance to the targets, so it ends orders of magnitude below the start.
    assert after < before / 100
    model = CompressionModel()
    torch.manual_seed(0)
    model.entropy_bottleneck = EntropyBottleneck(4)
    assert model.update(update_quantiles=True)
    assert torch.allclose(model.entropy_bottleneck.quantiles, eb.quantiles)


def test_model_written_compressai_way():
    class Model(CompressionModel):
        def __init__(self):
            super().__init__()
            self.entropy_bottleneck = EntropyBottleneck(32)

    model = Model()
    assert len(list(model.parameters())) == 15
    with pytest.raises(NotImplementedError):
        model(torch.rand(1))
    assert model.update() and not model.update()
    x = torch.rand(1, 32, 4, 4)
    s = model.entropy_bottleneck.compress(x)
    x2 = model.entropy_bottleneck.decompress(s, x.size()[2:])
    means = model.entropy_bottleneck._get_medians()
    assert torch.allclose(torch.round(x - means) + means, x2)
    assert model.aux_loss().dim() == 0


def test_entropy_model_base_api():
    em = EntropyModel()
    x = torch.rand(1, 3, 4, 4)
    means = torch.rand(1, 3, 4, 4)
    assert torch.equal(em.quantize(x, "dequantize", means), torch.round(x - means) + means)
    with pytest.warns(UserWarning):
        assert torch.equal(em._quantize(x, "symbols"), em.quantize(x, "symbols"))
    sym = torch.randint(-32, 32, (1, 3, 4, 4))
    with pytest.warns(UserWarning):
        assert torch.equal(em._dequantize(sym, means), em.dequantize(sym, means))
    with pytest.raises(ValueError):
        em.quantize(x, mode="toto")
    with pytest.raises(ValueError):
        EntropyModel(entropy_coder="huffman")


def test_error_types_are_compressais():
    em = EntropyModel()
    idx = torch.zeros(1, 3, 4, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="update"):  # tables never built
        em.compress(torch.rand(1, 3, 4, 4), idx)
    with pytest.raises(ValueError, match="update"):
        em.decompress([b"\0" * 8], idx)
    with pytest.raises(ValueError):
        em.compress(torch.rand(1, 3, 1, 1), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError):
        em.decompress("sss", idx)
    with pytest.raises(ValueError, match="update"):
        FactorizedPrior(N, M).compress(_image(32))
    for bad in (1, torch.rand(10), [], (), [2, 1], [0, 1, 2]):
        with pytest.raises(ValueError):
            GaussianConditional(bad)
    for bound in (None, -0.1):
        with pytest.raises(ValueError):
            GaussianConditional([1.0], scale_bound=bound)

    gc = GaussianConditional(None)
    gc.update_scale_table([0.11, 1.0, 4.0])
    y = torch.randn(1, 3, 4, 4)
    indexes = gc.build_indexes(torch.ones_like(y))
    with pytest.raises(ValueError, match="indexes"):
        gc.compress(y, indexes[:, :2])
    strings = gc.compress(y, indexes)
    for means in (torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2, 4)):
        with pytest.raises(ValueError, match="means"):
            gc.decompress(strings, indexes, means=means)
    decoded = gc.decompress(strings, indexes, means=torch.zeros(1, 3, 1, 1))
    assert torch.equal(decoded, torch.round(y))


def test_cdf_buffers_resize_in_place_after_coding():
    """CompressAI's load idiom: update_registered_buffers(policy="resize") after coding."""
    small, big = _net(ScaleHyperprior, 0), _net(ScaleHyperprior, 1)
    with torch.no_grad():
        big.entropy_bottleneck.quantiles.mul_(3)  # wider tables: a different CDF size
    small.update()
    big.update()
    with torch.no_grad():
        rv = small.compress(_image(64))
        small.decompress(rv["strings"], rv["shape"])
    state = big.state_dict()
    own = small.entropy_bottleneck._quantized_cdf
    assert state["entropy_bottleneck._quantized_cdf"].shape != own.shape
    for name in ("entropy_bottleneck", "gaussian_conditional"):
        update_registered_buffers(getattr(small, name), name, ["_quantized_cdf", "_offset",
                                  "_cdf_length"], state, policy="resize")
    nn.Module.load_state_dict(small, state)
    for key, value in state.items():
        assert torch.equal(small.state_dict()[key], value), key
    with pytest.raises(ValueError):
        update_registered_buffers(small.entropy_bottleneck, "entropy_bottleneck", ["qweight"],
                                  state)
    with pytest.raises(RuntimeError):
        _update_registered_buffer(small.g_a[0], "wweight", "entropy_bottleneck._offset", state,
                                  policy="resize")


def test_ans_api_gives_compressais_bytes():
    from compressai import ans as ref

    rng = np.random.default_rng(0)
    gc = GaussianConditional(None)
    gc.update_scale_table([0.11, 1.0, 4.0, 16.0])
    tables = (gc._quantized_cdf.tolist(), gc._cdf_length.tolist(), gc._offset.tolist())
    symbols = rng.integers(-20, 20, 500).tolist()  # some escape the tables
    indexes = rng.integers(0, 4, 500).tolist()

    data = ans.RansEncoder().encode_with_indexes(symbols, indexes, *tables)
    assert isinstance(data, bytes)
    assert data == ref.RansEncoder().encode_with_indexes(symbols, indexes, *tables)
    assert ans.RansDecoder().decode_with_indexes(data, indexes, *tables) == symbols

    buffered = ans.BufferedRansEncoder()
    buffered.encode_with_indexes(symbols[:200], indexes[:200], *tables)
    buffered.encode_with_indexes(symbols[200:], indexes[200:], *tables)
    assert buffered.flush() == data

    dec = ans.RansDecoder()
    dec.set_stream(data)
    head = dec.decode_stream(indexes[:321], *tables)
    assert head + dec.decode_stream(indexes[321:], *tables) == symbols
    assert isinstance(head, list)


def test_pmf_to_quantized_cdf_is_a_list_like_compressais():
    from compressai._CXX import pmf_to_quantized_cdf as ref

    out = pmf_to_quantized_cdf([0.1, 0.2, 0, 0], 16)
    assert out == [0, 21845, 65534, 65535, 65536] == ref([0.1, 0.2, 0, 0], 16)
    pmf = np.random.default_rng(0).dirichlet(np.ones(30)).tolist()
    assert pmf_to_quantized_cdf(pmf, 16) == ref(pmf, 16)
    for bad in ([1, 0, -1], [1, 0, float("nan")]):
        with pytest.raises(ValueError):
            pmf_to_quantized_cdf(bad, 16)


@pytest.mark.parametrize("metric", ["mse", "ms-ssim"])
def test_rate_distortion_loss_arguments(metric):
    from compressai.losses import RateDistortionLoss as Ref

    torch.manual_seed(0)
    x = torch.rand(1, 3, 176, 176)
    out = {"x_hat": (x + 0.05 * torch.randn_like(x)).clamp(0, 1),
           "likelihoods": {"y": torch.rand(1, 4, 11, 11) * 0.9 + 0.05}}
    ours, ref = RateDistortionLoss(metric=metric)(out, x), Ref(metric=metric)(out, x)
    assert RateDistortionLoss().lmbda == Ref().lmbda == 1e-2
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key])  # float32 sums in another order
    only = RateDistortionLoss(metric=metric, return_type="bpp_loss")(out, x)
    assert torch.equal(only, ours["bpp_loss"])
    with pytest.raises(ValueError):
        RateDistortionLoss(return_type="psnr")


def test_lower_bound_scripted_and_eager():
    x = torch.rand(16, requires_grad=True)
    bound = torch.rand(1)
    lb = LowerBound(bound)
    scripted = torch.jit.script(lb)
    assert torch.equal(scripted(x), torch.max(x, bound))
    y = lb(x)
    y.backward(x)  # eager keeps the straight-through gradient
    assert torch.equal(x.grad, (x >= bound) * x)


@pytest.mark.parametrize("arch", ARCHS)
def test_transforms_script_and_export_like_eager(arch):
    """Scripted and exported transforms give eager's outputs. Not bitwise: TorchScript's
    fuser and export's decompositions may replace elementwise kernels (GDN's rsqrt) with
    generated code, so the outputs agree to float32 rounding (assert_close's defaults)."""
    net = _net(ARCHS[arch])
    inputs = {"g_a": torch.rand(1, 3, 32, 32), "g_s": torch.randn(1, M, 2, 2),
              "h_a": torch.randn(1, M, 2, 2), "h_s": torch.randn(1, N, 1, 1),
              "context_prediction": torch.randn(1, M, 4, 4),
              "entropy_parameters": torch.randn(1, 4 * M, 4, 4)}
    names = [n for n in TRANSFORMS if hasattr(net, n)]
    assert len(names) == {"bmshj2018-factorized": 2, "mbt2018": 6}.get(arch, 4)
    with torch.no_grad():
        for name in names:
            module, x = getattr(net, name), inputs[name]
            eager = module(x)
            scripted = torch.jit.script(module)
            for _ in range(3):  # the profiling executor optimizes after the first runs
                torch.testing.assert_close(scripted(x), eager, msg=f"{name} scripted")
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer)
            buffer.seek(0)
            torch.testing.assert_close(torch.jit.load(buffer)(x), eager, msg=f"{name} saved")
            exported = torch.export.export(module, (x,)).module()
            torch.testing.assert_close(exported(x), eager, msg=f"{name} exported")


def test_layers_script():
    x = torch.rand(1, 16, 6, 6)
    for layer in (GDN(16), GDN(16, inverse=True), MaskedConv2d(16, 8, 5, padding=2)):
        scripted = torch.jit.script(layer)
        torch.testing.assert_close(scripted(x), layer(x))
