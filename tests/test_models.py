"""Model zoo: parity with the reference implementation, the registry, training steps."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from compresszoo import zoo
from compresszoo.models import (
    ARCHITECTURES,
    QUALITIES,
    RateDistortionLoss,
    create_model,
    model_spec,
    ms_ssim,
    pmf_to_quantized_cdf,
)

ZOO_TABLE = {  # ../shared/ARCHITECTURE.md, the zoo table (N, M) per quality
    "bmshj2018-factorized": [(128, 192)] * 5 + [(192, 320)] * 3,
    "bmshj2018-hyperprior": [(128, 192)] * 5 + [(192, 320)] * 3,
    "mbt2018-mean": [(128, 192)] * 4 + [(192, 320)] * 4,
    "mbt2018": [(192, 192)] * 4 + [(192, 320)] * 4,
}
ZOO_LAMBDAS = [0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800]
REF_CLASSES = {
    "bmshj2018-factorized": "FactorizedPrior",
    "bmshj2018-hyperprior": "ScaleHyperprior",
    "mbt2018-mean": "MeanScaleHyperprior",
    "mbt2018": "JointAutoregressiveHierarchicalPriors",
}
CDF_KEYS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def real_image(size: int = 128) -> torch.Tensor:
    from skimage import data

    img = data.astronaut()[100 : 100 + size, 150 : 150 + size]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0


def reference(name: str, N: int, M: int):
    google = importlib.import_module("compressai.models.google")
    return getattr(google, REF_CLASSES[name])(N, M)


def assert_same_outputs(a, b, x):
    with torch.no_grad():
        oa, ob = a.eval()(x), b.eval()(x)
    assert (oa["x_hat"] - ob["x_hat"]).abs().max().item() <= 1e-5
    assert oa["likelihoods"].keys() == ob["likelihoods"].keys()
    for k in oa["likelihoods"]:
        assert (oa["likelihoods"][k] - ob["likelihoods"][k]).abs().max().item() <= 1e-5
    assert abs(a.aux_loss().item() - b.aux_loss().item()) <= 1e-5 * max(1.0, abs(a.aux_loss().item()))


def assert_same_tables(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.rsplit(".", 1)[-1] in CDF_KEYS]
    assert any(k.endswith("_quantized_cdf") for k in keys)
    for k in keys:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].float(), sb[k].float()), k


PARITY_CASES = [(a, q, False) for a in ARCHITECTURES for q in (1, 5, 8)] + [
    (a, 1, True) for a in ARCHITECTURES
]


@pytest.mark.parametrize("name,quality,debug", PARITY_CASES,
                         ids=[f"{a}-q{q}{'-debug' if d else ''}" for a, q, d in PARITY_CASES])
def test_parity_with_reference_both_ways(name, quality, debug):
    spec = model_spec(name, quality, debug=debug)
    x = real_image()
    torch.manual_seed(quality)
    ref = reference(name, spec.N, spec.M)
    # Move the density away from its initialization so the tables are not trivial.
    with torch.no_grad():
        ref.entropy_bottleneck.quantiles.add_(torch.randn_like(ref.entropy_bottleneck.quantiles))
    ours = create_model(name, quality, debug=debug)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert_same_outputs(ref, ours, x)

    ref.update(force=True)
    ours.update(force=True)
    assert_same_tables(ref, ours)

    # Their updated checkpoint (CDF buffers included) loads into a fresh one of ours...
    fresh = create_model(name, quality, debug=debug)
    fresh.load_state_dict(ref.state_dict(), strict=True)
    assert_same_tables(ref, fresh)
    # ...and ours, trained a little on our side, loads into theirs.
    opt = torch.optim.SGD(ours.main_parameters(), lr=1e-3)
    out = ours.train()(x)
    RateDistortionLoss(spec.lmbda)(out, x)["loss"].backward()
    opt.step()
    ours.update(force=True)
    back = reference(name, spec.N, spec.M)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert_same_outputs(ours, back, x)
    assert_same_tables(ours, back)


def test_pmf_to_quantized_cdf_matches_reference_on_hard_pmfs():
    from compressai._CXX import pmf_to_quantized_cdf as ref_cdf

    rng = np.random.default_rng(0)
    checked_steal = 0
    for _ in range(300):
        n = int(rng.integers(1, 400))
        p = (rng.random(n) ** rng.integers(1, 12)).astype(np.float32)
        p /= p.sum()
        ours = pmf_to_quantized_cdf(p)
        theirs = np.asarray(ref_cdf(p.astype(np.float32).tolist(), 16))
        np.testing.assert_array_equal(ours, theirs)
        checked_steal += int(np.any(np.round(p * 65536) == 0))
        assert ours[0] == 0 and ours[-1] == 65536 and np.all(np.diff(ours) > 0)
    assert checked_steal > 50  # the frequency-stealing path was exercised
    with pytest.raises(ValueError, match="non-negative"):
        pmf_to_quantized_cdf(np.array([0.5, -0.1, 0.6], dtype=np.float32))


def test_registry_equals_zoo_table():
    for name, table in ZOO_TABLE.items():
        for q in QUALITIES:
            spec = model_spec(name, q)
            assert (spec.N, spec.M) == table[q - 1]
            assert spec.lmbda == pytest.approx(ZOO_LAMBDAS[q - 1])
            assert spec.registry_name == f"{name}-mse-q{q}"
    assert set(ARCHITECTURES) == set(ZOO_TABLE)
    assert model_spec("mbt2018", 3, N=64, M=96).registry_name == "mbt2018-mse-q3-N64-M96"


@pytest.mark.parametrize("bad,match", [
    (dict(name="mbt", quality=3), "unknown architecture 'mbt'; valid: bmshj2018-factorized"),
    (dict(name="mbt2018", quality=9), "unknown quality 9; valid: 1, 2, 3"),
    (dict(name="mbt2018", quality=3, metric="psnr"), "unknown metric 'psnr'; valid: mse, ms-ssim"),
])
def test_bad_requests_name_the_valid_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        create_model(**bad)


def test_zoo_functions_build_the_right_model(tmp_path, monkeypatch):
    m = zoo.mbt2018_mean(quality=5)
    assert type(m).__name__ == "MeanScaleHyperprior" and (m.N, m.M) == (192, 320)
    assert m.meta["quality"] == 5 and m.meta["lmbda"] == pytest.approx(0.025)
    assert type(zoo.bmshj2018_factorized(1)).__name__ == "FactorizedPrior"
    assert type(zoo.bmshj2018_hyperprior(8, metric="ms-ssim")).__name__ == "ScaleHyperprior"
    assert type(zoo.mbt2018(2)).__name__ == "JointAutoregressiveHierarchicalPriors"
    # pretrained comes from the MLflow registry: a missing model names itself and the server
    from compresszoo.registry_client import RegistryError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/empty.db")
    from compresszoo.tracking import client

    client().search_experiments()  # an empty registry that exists (a missing one is refused)
    with pytest.raises(RegistryError, match=r"'mbt2018-mse-q3@champion' not found .*empty\.db"):
        zoo.mbt2018(3, pretrained=True)
    with pytest.raises(ValueError, match="quality"):
        zoo.mbt2018(0)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("metric", ["mse", "ms-ssim"])
def test_every_registered_model_trains_a_step(name, metric):
    torch.manual_seed(0)
    model = create_model(name, quality=3, metric=metric, debug=True).train()
    x = torch.rand(2, 3, 192, 192) if metric == "ms-ssim" else torch.rand(2, 3, 64, 64)
    crit = RateDistortionLoss(model.meta["lmbda"], metric)
    opt = torch.optim.Adam(model.main_parameters(), lr=1e-3)
    aux_opt = torch.optim.Adam(model.aux_parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(x)
    assert out["x_hat"].shape == x.shape
    loss = crit(out, x)
    assert torch.isfinite(loss["loss"]) and loss["bpp_loss"].item() > 0
    loss["loss"].backward()
    opt.step()
    aux = model.aux_loss()
    aux.backward()
    aux_opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "g_a.0.weight" in changed and "entropy_bottleneck.quantiles" in changed
    assert model.update(force=True)
    assert model.entropy_bottleneck.quantized_cdf.numel() > 0


def test_ms_ssim_matches_pytorch_msssim_and_loss_formula():
    from pytorch_msssim import ms_ssim as ref_ms_ssim

    x = real_image(192)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    assert ms_ssim(x, y).item() == pytest.approx(ref_ms_ssim(x, y, data_range=1).item(), abs=1e-5)
    assert ms_ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    lik = {"y": torch.full((1, 4, 8, 8), 0.5)}
    out = RateDistortionLoss(0.01)({"x_hat": y, "likelihoods": lik}, x)
    bpp = 4 * 8 * 8 / (192 * 192)  # one bit per latent element
    assert out["bpp_loss"].item() == pytest.approx(bpp, rel=1e-5)
    mse = torch.mean((x - y) ** 2).item()
    assert out["loss"].item() == pytest.approx(0.01 * 255**2 * mse + bpp, rel=1e-5)
