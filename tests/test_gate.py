"""The bitrate gate's two promises, each on a model that breaks only that promise.

1. Exactness: a decoder that completes but yields other latents fails on "not exact" (the
   branch that compares latents), not on a decode error.
2. The 3% gap: a full-size Gaussian-conditional model with spread scales passes, and the
   scale-index mapping it codes with is the one the estimate assumes (the smallest table
   scale at or above the predicted scale); one slot off either way fails the gate.
"""

from __future__ import annotations

import pytest
import torch
from photos import photo

from compresszoo.codec import GateThresholds, validate_bitrate
from compresszoo.codec.gate import apply_gate
from compresszoo.models import create_model
from compresszoo.models.entropy import get_scale_table

# ------------------------------------------------------------------ exactness


def _drifting(model):
    """The same model, whose decoder adds 0.25 to the predicted means: the symbols (coded
    with the scales alone) decode completely, but y_hat = symbol + mean is off by 0.25."""

    class Drifting(type(model)):
        decoding = False

        def _coding_params(self, z_hat, portable):
            scales, means = super()._coding_params(z_hat, portable)
            return scales, (means + 0.25 if self.decoding else means)

        def decompress(self, strings, shape, portable=False):
            self.decoding = True
            try:
                return super().decompress(strings, shape, portable)
            finally:
                self.decoding = False

    model.__class__ = Drifting
    return model


@pytest.fixture(scope="module")
def exactness_reports():
    torch.manual_seed(0)
    honest = create_model("mbt2018-mean", 3, debug=True).eval()
    honest.update(force=True)
    torch.manual_seed(0)
    drifting = _drifting(create_model("mbt2018-mean", 3, debug=True).eval())
    drifting.update(force=True)
    images = [photo("astronaut", 256, 256)]
    return validate_bitrate(honest, images), validate_bitrate(drifting, images)


def test_a_decode_that_completes_with_other_latents_fails_as_not_exact(exactness_reports):
    honest, drifting = exactness_reports
    assert honest["images"][0]["exact"] is True and honest["overall"]["all_exact"] is True
    row = drifting["images"][0]
    # The decode completed (no error, a payload was measured): only the latents differ.
    assert row["error"] is None and row["payload_bpp"] > 0 and row["psnr"] > 0
    assert row["exact"] is False and drifting["overall"]["all_exact"] is False
    assert not drifting["passed"]
    assert drifting["reason"] == "image 0: decode not exact (decoded latents differ from the encoder's)"


def test_exactness_is_what_fails_the_drifting_model(exactness_reports):
    """Without the exactness requirement the same report is judged on its gap alone, and the
    honest model's report differs from the drifting one only in `exact`."""
    honest, drifting = exactness_reports
    passed, reason = apply_gate(drifting, GateThresholds(require_exact=False, max_relative_gap=10.0))
    assert passed and "0 of 1 decodes exact" in reason and "bitrate gap" in reason
    assert honest["images"][0]["payload_bpp"] == drifting["images"][0]["payload_bpp"]
    # a report where only the exact flag is off fails on it, even with a zero gap
    forged = {"images": [dict(honest["images"][0], exact=False)], "overall": dict(honest["overall"])}
    assert apply_gate(forged, GateThresholds(max_relative_gap=10.0))[1].endswith("decode not exact "
                                                                                 "(decoded latents differ from the encoder's)")


# ------------------------------------------------------------------ the 3% gap on a full-size model

TABLE = get_scale_table()


@pytest.fixture(scope="module")
def spread_hyperprior():
    """bmshj2018-hyperprior q1 (N=128, M=192) with spread latents and scales.

    Random weights put every scale at the table's 0.11 floor. Here the latents are spread
    (g_a's last conv x5, quantiles x3) and each channel's scale is set 3% below a table scale
    drawn from slots 8..39 (0.3 to 11), by the bias of h_s's last conv (its weights x0.1 keep
    a little spatial variation). Scales that sat anywhere inside a table step would make the
    coder's rounding up worth half a step on average, and a one-slot shift down would then
    land as far inside 3% as the right mapping; sitting just under a table scale, the right
    mapping costs ~1.5% and one slot either way costs 4-7% (measured: +1.5%, -4.2%, +7.4%)."""
    torch.manual_seed(1)
    m = create_model("bmshj2018-hyperprior", 1).eval()
    with torch.no_grad():
        m.g_a[6].weight.mul_(5.0)
        m.entropy_bottleneck.quantiles.mul_(3.0)
        m.h_s[4].weight.mul_(0.1)
        m.h_s[4].bias.copy_(TABLE[torch.randint(8, 40, (m.M,))] * 0.97)
    m.update(force=True)
    images = [photo("astronaut", 256, 256), photo("coffee", 256, 320, 100, 100)]
    return m, images, validate_bitrate(m, images)


def test_full_size_gaussian_model_with_spread_scales_passes_the_3_percent_gate(spread_hyperprior):
    model, _, report = spread_hyperprior
    assert GateThresholds().max_relative_gap == 0.03
    assert report["passed"], report["reason"]
    assert report["overall"]["all_exact"] and report["overall"]["num_gap_images"] == 2
    gap = report["overall"]["relative_gap"]
    assert 0 < gap < 0.03, gap  # rounding scales up to the table costs bits, never saves them
    assert report["reason"] == f"all 2 decodes exact; bitrate gap {gap:+.2%} within 3%"


def test_the_coder_uses_the_smallest_table_scale_at_or_above_each_predicted_scale(spread_hyperprior):
    """The contract behind the gap, on the model's own predicted scales (many table slots)."""
    model, images, _ = spread_hyperprior
    gc = model.gaussian_conditional
    with torch.no_grad():
        y = model.g_a(images[0][None])
        z_hat = model.entropy_bottleneck(model.h_a(y.abs()), training=False)[0]
        scales = model.h_s(z_hat)
    idx = gc.build_indexes(scales).long()
    assert idx.unique().numel() >= 20  # the scales spread over the table
    bounded = scales.clamp(min=float(gc.scale_bound))
    table = gc.scale_table
    assert bool((table[idx] >= bounded).all())
    below = table[(idx - 1).clamp(min=0)]
    assert bool(((idx == 0) | (below < bounded)).all())
    # the ends: the floor maps to slot 0, anything past the last scale to the last slot
    edge = gc.build_indexes(torch.tensor([0.0, 0.11, float(table[1]), float(table[1]) * 1.001, 1e6]))
    assert edge.tolist() == [0, 0, 1, 2, len(table) - 1]
