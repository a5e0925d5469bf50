"""Tests written against mutants of the entropy models (models/entropy.py) and of the training
schedule (LrSchedule in train.py) that survived `make mutation` (benchmarks/mutation.py).

The oracles are independent of the code under test: the installed CompressAI (its entropy
models, its pmf quantizer and its rANS coder give the reference numbers, tables and bytes),
PyTorch's ReduceLROnPlateau (the schedule's plateau phase), and arithmetic done here by hand.
Everything runs on small inputs (a few channels, a few positions).
"""

from __future__ import annotations

import re

import compressai.entropy_models as ref_entropy
import numpy as np
import pytest
import torch
from compressai._CXX import pmf_to_quantized_cdf as ref_cdf
from compressai.models.base import get_scale_table as ref_scale_table

from compresszoo.config import TrainConfig
from compresszoo.models import entropy as entropy_module
from compresszoo.models.entropy import (
    EntropyBottleneck,
    EntropyModel,
    GaussianConditional,
    get_scale_table,
    pmf_to_quantized_cdf,
    pmfs_to_cdf_table,
)
from compresszoo.train import LrSchedule

# ===================================================================== the lr schedule


def _torch_plateau_lrs(losses: list[float], *, lr: float, patience: int, factor: float,
                       threshold: float = 1e-4, min_lr: float = 0.0) -> list[float]:
    """The lr after each epoch under PyTorch's ReduceLROnPlateau (mode min, rel threshold)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=factor, patience=patience,
                                                       threshold=threshold, min_lr=min_lr, eps=0.0)
    out = []
    for loss in losses:
        sched.step(loss)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_a_loss_exactly_at_the_threshold_is_no_improvement_as_in_pytorch():
    # threshold 0: an equal loss is not below best * (1 - 0), so the epochs count on.
    losses = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    s = LrSchedule(lr=1.0, constant_steps=0, epoch_steps=10, patience=2, threshold=0.0)
    lrs = [s.observe(10 * (i + 1), loss) for i, loss in enumerate(losses)]
    assert lrs == _torch_plateau_lrs(losses, lr=1.0, patience=2, factor=0.5, threshold=0.0)
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    # the default relative threshold: a loss of exactly best * (1 - 1e-4) is no improvement either
    edge = 2.0 * (1 - 1e-4)
    losses = [2.0, edge, edge, edge]
    s = LrSchedule(lr=1.0, constant_steps=0, epoch_steps=10, patience=2)
    lrs = [s.observe(10 * (i + 1), loss) for i, loss in enumerate(losses)]
    assert lrs == _torch_plateau_lrs(losses, lr=1.0, patience=2, factor=0.5) == [1.0, 1.0, 1.0, 0.5]
    assert s.best == 2.0


def test_from_config_takes_every_schedule_field_from_the_config():
    cfg = TrainConfig(lr=0.3, constant_lr_steps=5, plateau_patience=1, plateau_factor=0.25, min_lr=0.1)
    s = LrSchedule.from_config(cfg, epoch_steps=7)
    assert (s.lr, s.constant_steps, s.epoch_steps, s.patience, s.factor, s.min_lr) == (0.3, 5, 7, 1, 0.25, 0.1)
    # and behaves as such: epochs of 7 steps, quartered after one flat epoch, floored at 0.1
    assert [t for t in range(1, 22) if s.is_epoch_end(t)] == [7, 14, 21]
    lrs = [s.observe(t, 1.0) for t in (7, 14, 21, 28, 35, 42)]
    # 0.3 * 0.25 = 0.075 is below the floor: 0.1 (without the factor 0.15, without the floor 0.075)
    assert lrs == pytest.approx([0.3, 0.3, 0.1, 0.1, 0.1, 0.1])
    # the constant phase (steps <= 5) is over by the first epoch end: the first loss is the best
    assert s.phase == "plateau"


# ===================================================================== the entropy models

# CompressAI's modules are the reference; both sides get the same weights.


def _ref():
    return ref_entropy  # imported at the top: a mutation run's fork server loads it once


def _bottlenecks(channels: int = 3, seed: int = 0, spread: float = 0.0):
    """(ours, CompressAI's) EntropyBottleneck with identical, moved-away-from-init weights."""
    torch.manual_seed(seed)
    ref = _ref().EntropyBottleneck(channels)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
        ref.quantiles.add_(spread * torch.randn_like(ref.quantiles))
    ours = EntropyBottleneck(channels)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _gaussians(table=(0.11, 0.5, 1.0, 2.5, 7.0)):
    ours, ref = GaussianConditional(None), _ref().GaussianConditional(None)
    ours.update_scale_table(list(table))
    ref.update_scale_table(list(table))
    return ours, ref


def test_scale_table_is_compressais_and_takes_its_bounds():
    ours = get_scale_table()
    assert ours.shape == (64,)
    torch.testing.assert_close(ours, ref_scale_table(), rtol=1e-6, atol=0)
    assert ours[0].item() == pytest.approx(0.11, rel=1e-6) and ours[-1].item() == pytest.approx(256, rel=1e-6)
    small = get_scale_table(0.5, 8.0, 5)
    torch.testing.assert_close(small, torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0]), rtol=1e-6, atol=0)


def test_pmf_quantizer_is_compressais_at_other_precisions_and_refuses_what_it_cannot_code():
    rng = np.random.default_rng(1)
    for precision in (8, 12, 16):
        for n in (1, 2, 7, 40):
            p = (rng.random(n) ** 6).astype(np.float32)
            p /= p.sum()
            ours = pmf_to_quantized_cdf(p, precision)
            np.testing.assert_array_equal(ours, ref_cdf(p.tolist(), precision))
            assert ours.dtype == np.int32 and ours[-1] == 1 << precision
    # a symbol far left of the richest one and one far right: both stealing directions
    for p in ([1e-9, 0.999999998, 1e-9], [0.5, 1e-9, 1e-9, 0.5 - 2e-9], [1e-9] * 3 + [1.0 - 3e-9]):
        p = np.asarray(p, dtype=np.float32)
        np.testing.assert_array_equal(pmf_to_quantized_cdf(p), ref_cdf(p.tolist(), 16))
        assert np.all(np.diff(pmf_to_quantized_cdf(p)) >= 1)
    for bad in ([], [[0.5, 0.5]], [0.5, float("nan")], [0.5, float("inf")], [0.5, -1e-3]):
        with pytest.raises(ValueError, match="^pmf must be a non-empty 1-D array of finite, non-negative values$"):
            pmf_to_quantized_cdf(np.asarray(bad, dtype=np.float32))
    with pytest.raises(ValueError, match="^pmf sums to zero after quantization; it cannot be coded$"):
        pmf_to_quantized_cdf(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="^cannot give every symbol a non-zero frequency; precision too low$"):  # 5 symbols cannot fit in 4 counts
        pmf_to_quantized_cdf(np.full(5, 0.2, dtype=np.float32), precision=2)
    # a float64 pmf is rounded to float32 first, as the reference's float pmf: 1000.5 - 6.6e-8
    # counts round to 1001 in float32 (1000 in float64), and the table follows
    p64 = np.array([1000.5 / 65536 - 1e-12, 64535 / 65536])
    np.testing.assert_array_equal(pmf_to_quantized_cdf(p64), ref_cdf(p64.tolist(), 16))
    assert pmf_to_quantized_cdf(p64).tolist() == [0, 1001, 65536]
    # a pmf that quantizes to a single count is still coded: every other symbol steals from it
    one_count = np.array([2.0 ** -16, 0.0, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(pmf_to_quantized_cdf(one_count), ref_cdf(one_count.tolist(), 16))
    # exactly enough counts: every symbol gets one (the last steal leaves the richest at 1)
    np.testing.assert_array_equal(pmf_to_quantized_cdf(np.array([0.001, 0.001, 0.998], np.float32), 2),
                                  [0, 1, 2, 4])


def test_cdf_table_rows_are_padded_per_pmf_and_resizable():
    pmf = torch.tensor([[0.2, 0.3, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    tail = torch.tensor([[0.0], [0.0]])
    table = pmfs_to_cdf_table(pmf, tail, torch.tensor([3, 4]), 4)
    assert table.shape == (2, 6) and table.dtype == torch.int32
    np.testing.assert_array_equal(table[0].numpy(), [*pmf_to_quantized_cdf(np.array([0.2, 0.3, 0.5, 0.0])), 0])
    np.testing.assert_array_equal(table[1].numpy(), pmf_to_quantized_cdf(np.array([0.25] * 4 + [0.0])))
    table.resize_(1, 2)  # a tensor over NumPy memory refuses this


def test_the_base_model_checks_its_coder_and_starts_without_tables():
    em = EntropyModel()
    assert em.entropy_coder_precision == 16 and not em.is_updated()
    for name in ("_offset", "_quantized_cdf", "_cdf_length"):
        buf = getattr(em, name)
        assert buf.numel() == 0 and buf.dtype == torch.int32
    assert em.offset is em._offset and em.quantized_cdf is em._quantized_cdf and em.cdf_length is em._cdf_length
    EntropyModel(entropy_coder="ans")
    with pytest.raises(ValueError, match=r"^entropy_coder 'huffman' is not available; compresszoo has one coder, "
                                         r"'ans' \(rANS\), the default$"):
        EntropyModel(entropy_coder="huffman")
    with pytest.raises(ValueError, match=r"entropy_coder_precision must be 16 \(the rANS coder's table "
                                         r"precision\), got 15"):
        EntropyModel(entropy_coder_precision=15)


def test_likelihood_bound_is_applied_only_when_positive():
    ours, _ = _gaussians()
    y = torch.tensor([[[[0.0, 40.0]]]])
    scales = torch.full_like(y, 0.2)
    _, bounded = ours(y, scales, training=False)
    assert bounded[0, 0, 0, 1].item() == pytest.approx(1e-9)
    free = GaussianConditional(None, likelihood_bound=0)
    # likelihood_bound passed positionally, after the scale table (CompressAI's *args)
    assert not GaussianConditional(None, 0).use_likelihood_bound
    assert not EntropyBottleneck(2, 0).use_likelihood_bound and EntropyBottleneck(2).use_likelihood_bound
    assert not EntropyBottleneck(2, likelihood_bound=0).use_likelihood_bound  # and by keyword
    assert not free.use_likelihood_bound and not hasattr(free, "likelihood_lower_bound")
    _, raw = free(y, scales, training=False)
    assert raw[0, 0, 0, 1].item() < 1e-12
    assert raw[0, 0, 0, 0].item() == bounded[0, 0, 0, 0].item() > 0.9


def test_quantize_modes_round_around_the_means():
    em = EntropyModel()
    x = torch.tensor([[0.2, 0.7, -1.6, 2.5]])
    means = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(em.quantize(x, "dequantize"), torch.tensor([[0.0, 1.0, -2.0, 2.0]]))
    torch.testing.assert_close(em.quantize(x, "dequantize", means), torch.tensor([[0.5, 0.5, -1.5, 2.5]]))
    sym = em.quantize(x, "symbols", means)
    assert sym.dtype == torch.int32 and sym.tolist() == [[0, 0, -2, 2]]
    assert em.quantize(x, "symbols").tolist() == [[0, 1, -2, 2]]
    torch.manual_seed(0)
    big = torch.zeros(10_000)
    noisy = em.quantize(big, "noise")
    torch.manual_seed(0)  # the same draw as CompressAI's quantize: inputs + uniform(-0.5, 0.5)
    assert torch.equal(noisy, ref_entropy.EntropyModel().quantize(big, "noise"))
    assert noisy.abs().max().item() <= 0.5 and noisy.std().item() == pytest.approx(12 ** -0.5, rel=0.05)
    with pytest.raises(ValueError, match="quantize mode must be noise, dequantize or symbols, got 'round'"):
        em.quantize(x, "round")
    # dequantize: symbols in the means' dtype, or in the given dtype without means
    s = torch.tensor([1, -2], dtype=torch.int32)
    assert EntropyModel.dequantize(s).dtype == torch.float32
    assert EntropyModel.dequantize(s, dtype=torch.float64).dtype == torch.float64
    out = EntropyModel.dequantize(s, torch.tensor([0.25, 0.25], dtype=torch.float64), dtype=torch.float16)
    # the means' dtype wins over `dtype`: 4097 has no float16 (nor bfloat16) value
    big_sym = torch.tensor([4097], dtype=torch.int32)
    assert EntropyModel.dequantize(big_sym, torch.tensor([0.25], dtype=torch.float64), dtype=torch.bfloat16).item() == 4097.25
    assert out.dtype == torch.float64 and out.tolist() == [1.25, -1.75]
    # the deprecated names warn, pointing at their caller (stacklevel), not at entropy.py
    with pytest.warns(UserWarning, match="^_quantize is deprecated; use quantize$") as caught:
        assert em._quantize(x, "symbols", means).tolist() == [[0, 0, -2, 2]]
    assert caught[0].filename != entropy_module.__file__
    with pytest.warns(UserWarning, match="^_dequantize is deprecated; use dequantize$") as caught:
        assert EntropyModel._dequantize(s, torch.tensor([0.5, 0.5])).tolist() == [1.5, -1.5]
    assert caught[0].filename != entropy_module.__file__


def test_coding_tables_name_what_is_missing_or_misshapen_and_are_copies():
    eb = EntropyBottleneck(2)
    with pytest.raises(ValueError, match=r"^EntropyBottleneck has no CDF table: call model.update\(\) after "
                                         r"training \(or load a state dict saved after update\(\)\) before"):
        eb.coding_tables()
    eb.update()
    cdfs, lengths, offsets = eb.coding_tables()
    assert cdfs.dtype == lengths.dtype == offsets.dtype == np.int32
    np.testing.assert_array_equal(cdfs, eb._quantized_cdf.numpy())
    np.testing.assert_array_equal(lengths, eb._cdf_length.numpy())
    np.testing.assert_array_equal(offsets, eb._offset.numpy())
    cdfs[:] = 7
    # a buffer set in another integer dtype (as CompressAI-style code may) still reaches the coder as int32
    wide = EntropyBottleneck(2)
    wide.update()
    wide._cdf_length, wide._offset = wide._cdf_length.long(), wide._offset.long()
    _, lengths64, offsets64 = wide.coding_tables()
    assert lengths64.dtype == offsets64.dtype == np.int32
    np.testing.assert_array_equal(lengths64, lengths)
    assert eb._quantized_cdf[0, 0].item() == 0  # the coder's copy is not the buffer
    eb._quantized_cdf.resize_(eb._quantized_cdf.shape)  # still resizable after coding
    for name, what, bad, rank in (("_cdf_length", "CDF lengths", torch.empty(0, dtype=torch.int32), None),
                                  ("_offset", "offsets", torch.empty(0, dtype=torch.int32), None),
                                  ("_quantized_cdf", "CDF table", eb._quantized_cdf.reshape(-1), 2),
                                  ("_cdf_length", "CDF lengths", eb._cdf_length[None], 1),
                                  ("_offset", "offsets", eb._offset[None], 1)):
        broken = EntropyBottleneck(2)
        broken.update()
        setattr(broken, name, bad)
        if rank is None:
            with pytest.raises(ValueError, match=f"EntropyBottleneck has no {what}: call model.update"):
                broken.coding_tables()
        else:
            with pytest.raises(ValueError, match=rf"EntropyBottleneck: {what} must be {rank}-D, got size "
                                                 rf"{re_tuple(tuple(bad.shape))}; rebuild them with update\(force=True\)$"):
                broken.coding_tables()


def re_tuple(t: tuple) -> str:
    return re.escape(str(t))


def test_bottleneck_init_is_compressais():
    for kwargs in ({}, {"init_scale": 4.0, "filters": (2, 5), "tail_mass": 1e-6}):
        torch.manual_seed(3)
        ref = _ref().EntropyBottleneck(3, **kwargs)
        torch.manual_seed(3)
        ours = EntropyBottleneck(3, **kwargs)
        rs, os_ = ref.state_dict(), ours.state_dict()
        assert rs.keys() == os_.keys()
        for k in rs:
            if "_cdf" in k or "_offset" in k:
                continue
            assert rs[k].shape == os_[k].shape, k
            torch.testing.assert_close(os_[k].float(), rs[k].float(), rtol=1e-6, atol=0, msg=k)
        assert ours.filters == tuple(kwargs.get("filters", (3, 3, 3, 3)))
        assert ours.init_scale == kwargs.get("init_scale", 10.0)
        assert ours.tail_mass == kwargs.get("tail_mass", 1e-9)


def test_aux_targets_are_the_tail_quantiles():
    # the aux loss pulls the quantiles to where the cumulative is tail/2, 1/2 and 1 - tail/2
    for tail in (0.2, 1e-3):
        target = EntropyBottleneck(2, tail_mass=tail).target
        torch.testing.assert_close(torch.sigmoid(target), torch.tensor([tail / 2, 0.5, 1 - tail / 2]),
                                   rtol=1e-6, atol=0)


def test_old_parameter_names_load():
    ours, ref = _bottlenecks()
    old = {}
    for k, v in ref.state_dict().items():
        for new, legacy in (("matrices.", "_matrix"), ("biases.", "_bias"), ("factors.", "_factor")):
            if k.startswith(new):
                k = legacy + k[len(new):]
        old[k] = v
    assert "_matrix0" in old and "_bias4" in old and "_factor3" in old
    fresh = EntropyBottleneck(3)
    fresh.load_state_dict(old)
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # nested under a prefix, as inside a model
    outer = torch.nn.Module()
    outer.entropy_bottleneck = EntropyBottleneck(3)
    outer.load_state_dict({f"entropy_bottleneck.{k}": v for k, v in old.items()})
    assert torch.equal(outer.entropy_bottleneck.matrices[2], ours.matrices[2])


def test_bottleneck_likelihoods_aux_loss_and_outputs_are_compressais():
    ours, ref = _bottlenecks(spread=1.0)
    torch.manual_seed(1)
    x = 3 * torch.randn(2, 3, 4, 5)
    assert torch.equal(ours.medians(), ref._get_medians()) and torch.equal(ours._get_medians(), ours.medians())
    torch.testing.assert_close(ours.loss(), ref.loss(), rtol=1e-5, atol=1e-5)
    o_out, o_lik = ours(x, training=False)
    r_out, r_lik = ref(x, training=False)
    torch.testing.assert_close(o_out, r_out, rtol=0, atol=0)
    torch.testing.assert_close(o_lik, r_lik, rtol=1e-5, atol=1e-7)
    # training: noise within half a step around the input, the likelihood of the noisy value
    ours.train()
    t_out, t_lik = ours(x)
    # noise, not rounding: the outputs are not the medians plus whole numbers
    med = ours.medians().detach().reshape(1, 3, 1, 1)
    assert (t_out - x).abs().max().item() <= 0.5 and not torch.equal(t_out, torch.round(x - med) + med)
    # the training argument overrides the module's mode, both ways
    assert torch.equal(ours(x, training=False)[0], o_out)
    assert not torch.equal(ours.eval()(x, training=True)[0], o_out)
    ours.train()
    values = t_out.permute(1, 0, 2, 3).reshape(3, 1, -1)
    expect, _, _ = ref._likelihood(values)
    torch.testing.assert_close(t_lik, expect.reshape(3, 2, 4, 5).permute(1, 0, 2, 3).clamp_min(1e-9),
                               rtol=1e-5, atol=1e-7)
    # and gradients reach the density (not through a stop_gradient): the training pass
    t_lik.log().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (*ours.matrices, *ours.biases, *ours.factors))
    # the aux loss reaches only the quantiles
    ours.zero_grad()
    ours.loss().backward()
    assert ours.quantiles.grad.abs().sum() > 0
    assert all(p.grad is None for p in (*ours.matrices, *ours.biases, *ours.factors))
    # the table pass: both ends, each the density at value -+ 0.5
    samples = torch.linspace(-4, 4, 9).repeat(3, 1, 1)
    pmf, lower, upper = ours._likelihood(samples, stop_gradient=True)
    assert not (pmf.requires_grad or lower.requires_grad or upper.requires_grad)  # both ends detached
    r_pmf, r_lower, r_upper = ref._likelihood(samples, stop_gradient=True)
    for a, b in ((pmf, r_pmf), (lower, r_lower), (upper, r_upper)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pmf2, lower2, upper2 = ours._likelihood(samples)
    for a, b in ((pmf2, r_pmf), (lower2, r_lower), (upper2, r_upper)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bottleneck_tables_indexes_and_bytes_are_compressais():
    ours, ref = _bottlenecks(channels=4, spread=2.0)
    assert ours.update() is True and ours.update() is False
    ref.update()
    for name in ("_quantized_cdf", "_offset", "_cdf_length"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    with torch.no_grad():
        ours.quantiles.add_(1.5)
    assert ours.update() is False  # not forced: the old tables stay
    assert torch.equal(ours._offset, ref._offset)
    assert ours.update(force=True) is True
    with torch.no_grad():
        ref.quantiles.add_(1.5)
    ref.update(force=True)
    for name in ("_quantized_cdf", "_offset", "_cdf_length"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    size = torch.Size((2, 4, 3, 5))
    idx = ours.build_indexes(size)
    assert idx.dtype == torch.int32 and torch.equal(idx, _ref().EntropyBottleneck._build_indexes(size))
    torch.manual_seed(2)
    x = 4 * torch.randn(size)
    strings = ours.compress(x)
    assert strings == ref.compress(x)
    out = ours.decompress(strings, size[2:])
    torch.testing.assert_close(out, ref.decompress(strings, size[2:]), rtol=0, atol=0)
    torch.testing.assert_close(out, torch.round(x - ours.medians().reshape(1, 4, 1, 1)) + ours.medians().reshape(1, 4, 1, 1))
    # the fixed-point form: symbol * 2**frac + round(median * 2**frac), exactly
    fixed = ours.decompress_fixed(strings, size[2:], 8)
    assert fixed.dtype == torch.float64
    symbols = torch.round(x.double() - ours.medians().double().reshape(1, 4, 1, 1))
    expect = symbols * 256 + torch.round(ours.medians().double().reshape(1, 4, 1, 1) * 256)
    assert torch.equal(fixed, expect)
    assert torch.equal(fixed, torch.round(fixed))


def test_quantiles_by_bisection_solve_the_targets():
    ours, ref = _bottlenecks(channels=2, spread=3.0)
    before = ours.loss().item()
    assert ours.update(update_quantiles=True)
    logits = ours._logits_cumulative(ours.quantiles, stop_gradient=True)
    # the bisection ends within atol 1e-3 of each root; the logits' slope there bounds the error
    torch.testing.assert_close(logits, ours.target.expand_as(logits), rtol=0, atol=0.05)
    assert ours.loss().item() < before / 100
    ref._update_quantiles()
    torch.testing.assert_close(ours.quantiles, ref.quantiles, rtol=1e-3, atol=2e-3)
    # the tables were built from the solved quantiles (the same as CompressAI's update after it)
    ref.update(force=True)
    assert torch.equal(ours._offset, ref._offset) and torch.equal(ours._cdf_length, ref._cdf_length)
    # a looser tolerance stops earlier
    loose, _ = _bottlenecks(channels=2, spread=3.0)
    loose._update_quantiles(rtol=0.0, atol=50.0)
    assert (loose.quantiles - ours.quantiles).abs().max().item() > 1.0
    wide, _ = _bottlenecks(channels=2, spread=3.0)
    wide._update_quantiles(search_radius=10.0)  # roots beyond +-10 are out of reach
    assert wide.quantiles.abs().max().item() <= 10.0 < ours.quantiles.abs().max().item()


def test_gaussian_conditional_checks_its_arguments():
    for bad, msg in ((torch.tensor([1.0]), "scale_table must be None, a list or a tuple of scales, got Tensor"),
                     ([], "^scale_table must be a non-empty increasing list of positive scales$"),
                     ([2.0, 1.0], "non-empty increasing"), ([0.0, 1.0], "positive scales"),
                     ((-1.0,), "positive scales")):
        with pytest.raises(ValueError, match=msg):
            GaussianConditional(bad)
    for bound in (None, 0.0, -0.1):
        with pytest.raises(ValueError, match=rf"scale_bound must be positive, got {bound!r}"):
            GaussianConditional([1.0], scale_bound=bound)
    gc = GaussianConditional((0.5, 1, 3), scale_bound=0.2, tail_mass=1e-4)
    assert gc.scale_table.dtype == torch.float32 and gc.scale_table.tolist() == [0.5, 1.0, 3.0]
    assert gc.scale_bound.tolist() == [pytest.approx(0.2)] and gc.tail_mass == 1e-4
    assert GaussianConditional([1.0]).scale_bound.item() == pytest.approx(0.11)
    assert GaussianConditional(None).scale_table.numel() == 0
    with pytest.raises(ValueError, match=r"^GaussianConditional has no scale table: call model.update\(\) first$"):
        GaussianConditional(None).build_indexes(torch.ones(1))


def test_gaussian_tables_likelihoods_indexes_and_bytes_are_compressais():
    ours, ref = _gaussians()
    for name in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    # a table for another tail mass (the update's multiplier)
    wide, wide_ref = GaussianConditional(None, tail_mass=1e-3), _ref().GaussianConditional(None, tail_mass=1e-3)
    wide.update_scale_table([0.3, 5.0])
    wide_ref.update_scale_table([0.3, 5.0])
    for name in ("_quantized_cdf", "_offset", "_cdf_length"):
        assert torch.equal(getattr(wide, name), getattr(wide_ref, name)), name
    assert wide._offset.tolist() != ours._offset[[1, 4]].tolist()
    # update_scale_table: refused without force once built, rebuilt with it
    assert ours.update_scale_table([0.2, 4.0]) is False and ours.scale_table.numel() == 5
    assert ours.update_scale_table([0.2, 4.0], force=True) is True
    ref.update_scale_table([0.2, 4.0], force=True)
    for name in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    ours, ref = _gaussians()
    x = torch.linspace(-9, 9, 37)
    torch.testing.assert_close(ours._standardized_cumulative(x), ref._standardized_cumulative(x), rtol=0, atol=0)
    assert ours._standardized_cumulative(torch.tensor([-10.0])).item() == pytest.approx(7.6199e-24, rel=1e-3)  # erfc keeps the far tail
    torch.manual_seed(4)
    y = 3 * torch.randn(2, 3, 4, 4)
    scales = torch.rand(2, 3, 4, 4) * 8  # some below the 0.11 bound
    scales[0, 0, 0, :] = torch.tensor([0.0, 0.11, 0.5, 7.0])  # at and beside table entries
    means = torch.randn(2, 3, 4, 4)
    for m in (None, means):
        torch.testing.assert_close(ours._likelihood(y, scales, m), ref._likelihood(y, scales, m), rtol=1e-6, atol=1e-9)
        o_out, o_lik = ours(y, scales, m, training=False)
        r_out, r_lik = ref(y, scales, m, training=False)
        assert torch.equal(o_out, r_out)
        torch.testing.assert_close(o_lik, r_lik, rtol=1e-6, atol=1e-9)
    ours.train()
    t_out, t_lik = ours(y, scales, means)
    # noise, not rounding around the means
    assert (t_out - y).abs().max().item() <= 0.5 and not torch.equal(t_out, torch.round(y - means) + means)
    assert torch.equal(ours(y, scales, means, training=False)[0], torch.round(y - means) + means)
    assert not torch.equal(ours.eval()(y, scales, means, training=True)[0], torch.round(y - means) + means)
    ours.train()
    torch.testing.assert_close(t_lik, ref._likelihood(t_out, scales, means).clamp_min(1e-9), rtol=1e-6, atol=1e-9)
    idx = ours.build_indexes(scales)
    assert idx.dtype == torch.int32 and torch.equal(idx, ref.build_indexes(scales))
    assert idx[0, 0, 0].tolist() == [0, 0, 1, 4]
    strings = ours.compress(y, idx, means)
    assert strings == ref.compress(y, idx, means)
    out = ours.decompress(strings, idx, means=means)
    torch.testing.assert_close(out, ref.decompress(strings, idx, means=means), rtol=0, atol=0)
    assert ours.decompress(strings, idx, dtype=torch.float64).dtype == torch.float64


def test_compress_and_decompress_check_their_arguments():
    ours, _ = _gaussians()
    y = torch.randn(2, 3, 4, 4)
    idx = torch.zeros(2, 3, 4, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"inputs: need at least 2 dimensions \(batch, channels, ...\), got size \(4,\)"):
        ours.compress(torch.zeros(4), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"indexes: size \(2, 3, 4\) does not match inputs \(2, 3, 4, 4\)"):
        ours.compress(y, idx[..., 0])
    with pytest.raises(ValueError, match=r"^indexes: expected an integer tensor of CDF rows, got torch.float32; "
                                         r"build them with build_indexes\(\)$"):
        ours.compress(y, idx.float())
    strings = ours.compress(y, idx)
    with pytest.raises(ValueError, match=r"strings: expected a list of bytes \(one per batch item\), got bytes"):
        ours.decompress(strings[0], idx)
    assert ours.decompress(tuple(strings), idx).shape == y.shape
    with pytest.raises(ValueError, match="got 1 streams for a batch of 2"):
        ours.decompress(strings[:1], idx)
    with pytest.raises(ValueError, match="got 1 streams for a batch of 2"):
        ours.decompress_symbols(strings[:1], idx)
    with pytest.raises(ValueError, match=r"indexes: need at least 2 dimensions \(batch, channels, ...\), got size \(2,\)"):
        ours.decompress(strings, idx[:, 0, 0, 0])
    with pytest.raises(ValueError, match="GaussianConditional has no CDF table"):
        GaussianConditional([1.0]).decompress(strings, idx, means=torch.zeros(7))
    for bad in (torch.zeros(2, 2, 4, 4), torch.zeros(1, 3, 4, 4), torch.zeros(2, 3, 4, 3), torch.zeros(2, 3, 4),
                torch.zeros(2, 3, 4, 4, 1), torch.zeros(2, 3, 2, 1)):
        with pytest.raises(ValueError, match=rf"means: size {re_tuple(tuple(bad.shape))} does not fit indexes "
                                             r"\(2, 3, 4, 4\) \(same batch and channels; each other dimension"):
            ours.decompress(strings, idx, means=bad)
    for fine in (torch.zeros(2, 3, 1, 1), torch.zeros(2, 3, 4, 1), torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 4, 4)):
        assert torch.equal(ours.decompress(strings, idx, means=fine + 0.5), torch.round(y) + 0.5)


def test_loading_tables_of_another_size_resizes_the_buffers():
    small, _ = _gaussians((0.2, 1.0))
    big, _ = _gaussians()
    assert small._quantized_cdf.shape != big._quantized_cdf.shape
    small.load_state_dict(big.state_dict())
    for name in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"):
        assert torch.equal(getattr(small, name), getattr(big, name)), name
        assert getattr(small, name).dtype == getattr(big, name).dtype, name
    # a state dict without the tables (strict=False) leaves them as they are
    partial = {k: v for k, v in big.state_dict().items() if k not in ("_quantized_cdf", "_offset")}
    keep = GaussianConditional(None)
    keep.update_scale_table([0.5, 2.0])
    before = keep._quantized_cdf.clone()
    result = keep.load_state_dict(partial, strict=False)
    assert sorted(result.missing_keys) == ["_offset", "_quantized_cdf"]
    assert torch.equal(keep._quantized_cdf, before) and torch.equal(keep.scale_table, big.scale_table)
    fresh = EntropyBottleneck(3)
    src, _ = _bottlenecks(spread=2.0)
    src.update()
    fresh.load_state_dict(src.state_dict())
    assert torch.equal(fresh._quantized_cdf, src._quantized_cdf) and fresh.is_updated()



def test_two_dimensional_latents_code_and_symbols_come_back_as_int32():
    # (batch, channels) with no spatial dimensions is a valid shape for compress and decompress
    ours, ref = _gaussians()
    torch.manual_seed(5)
    y, scales = 3 * torch.randn(2, 6), torch.rand(2, 6) * 4
    idx = ours.build_indexes(scales)
    strings = ours.compress(y, idx)
    assert strings == ref.compress(y, idx)
    assert torch.equal(ours.decompress(strings, idx), torch.round(y))
    # the raw symbols: int32, as quantize(..., "symbols") gives them
    symbols = ours.decompress_symbols(strings, idx)
    assert symbols.dtype == torch.int32 and torch.equal(symbols, ours.quantize(y, "symbols"))


def test_a_new_scale_table_is_stored_as_float32_whatever_it_came_as():
    for table in (torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64), [1, 2, 4]):
        ours, ref = GaussianConditional(None), ref_entropy.GaussianConditional(None)
        assert ours.update_scale_table(table)
        ref.update_scale_table(table)
        assert ours.scale_table.dtype == torch.float32 == ref.scale_table.dtype
        assert torch.equal(ours.scale_table, ref.scale_table)
        assert torch.equal(ours._quantized_cdf, ref._quantized_cdf)
