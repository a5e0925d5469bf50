"""Policies with no reference implementation to compare against: the classic codecs' BD-rates
(AVIF and JPEG XL, through the real encoders), DDP keeping every rank's weights identical, and
which config fields make a run's name."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from compresszoo.config import TrainConfig, smoke
from compresszoo.evaluate import rd
from compresszoo.evaluate.classic import CODECS
from compresszoo.evaluate.coding import code_all
from compresszoo.evaluate.images import Picture

# ------------------------------------------------------------------ AVIF and JPEG XL BD-rates


@pytest.fixture(scope="module")
def classic_curves():
    """PSNR curves of JPEG, AVIF and JPEG XL over their whole quality sweeps, on two photographs
    (160-pixel crops: below MS-SSIM's 161, which would cost seconds a point)."""
    from skimage import data

    pictures = [Picture("astronaut", np.ascontiguousarray(data.astronaut()[64:224, 128:288])),
                Picture("chelsea", np.ascontiguousarray(data.chelsea()[40:200, 100:260]))]
    names = ("jpeg", "avif", "jxl")
    for name in names:  # no skip: the codecs are dependencies (Pillow >= 11.3, imagecodecs)
        assert CODECS[name].missing() is None, CODECS[name].missing()
    points = code_all([], [CODECS[n] for n in names], pictures, progress=lambda _: None)
    curves = {n: rd.curve_from_points(n, [p for p in points if p["curve"] == n])[0] for n in names}
    return points, curves


@pytest.mark.parametrize("codec", ["avif", "jxl"])
def test_avif_and_jpeg_xl_need_far_fewer_bits_than_jpeg_at_equal_psnr(classic_curves, codec):
    points, curves = classic_curves
    mine = [p for p in points if p["curve"] == codec]
    assert all(p["error"] is None for p in mine)
    # the quality setting reaches the encoder: more quality, more bits and a better picture
    bpp = [p["bpp"] for p in mine]
    assert bpp == sorted(bpp) and len(set(bpp)) == len(bpp), bpp
    assert mine[-1]["psnr"] > mine[0]["psnr"] + 8
    # both are a generation past JPEG: published comparisons put them 20-50% below it on
    # photographs (here, on these small crops, AVIF about -39% and JPEG XL about -19%); a codec
    # decoded wrong gives no BD at all and one coded at a single setting no curve
    summary = rd.bd_summary(curves["jpeg"], curves[codec])
    assert summary["error"] is None, summary
    assert -70 < summary["bd_rate_percent"] < -10, summary
    assert summary["bd_quality_db"] > 0.5, summary


# ------------------------------------------------------------------ run-name field exclusions


def _other_value(f: dataclasses.Field, value):
    """A different value of the field's type."""
    typ = f.type if isinstance(f.type, str) else f.type.__name__
    if typ == "bool":
        return not value
    if typ == "int":
        return value + 1
    if typ == "float":
        return value * 2 + 0.5
    if typ == "str":
        return value + "-other"
    raise AssertionError(f"field {f.name} has type {typ}: teach this test a value for it")


def test_every_field_changes_the_run_name_exactly_when_it_is_part_of_the_identity():
    base = smoke(data="s3://bucket/vimeo").resolved()
    identity = set(TrainConfig.identity_fields())
    for f in dataclasses.fields(TrainConfig):
        moved = dataclasses.replace(base, **{f.name: _other_value(f, getattr(base, f.name))})
        changes = moved.run_name() != base.run_name()
        assert changes == (f.name in identity), (f.name, "identity" if f.name in identity else "setting")
        assert (moved.config_hash() != base.config_hash()) == changes, f.name
    # where a run executes and where it is stored are settings; what it learns is identity
    assert {"workers", "storage", "tracking_uri", "log_every", "gate_max_gap"}.isdisjoint(identity)
    assert {"lr", "seed", "batch_size", "crop", "max_steps", "constant_lr_steps"} <= identity


# ------------------------------------------------------------------ DDP


def test_ddp_ranks_hold_identical_weights_after_steps_on_different_data(ray_session, tmp_path):
    """Two workers, each training on its own crops: after the steps every rank's weights are
    the same bits (DDP averaged the gradients; the aux loss is data-free), and they moved."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from skimage import data

    def crops(img, top):
        a = np.ascontiguousarray(img[top:top + 64, :128]).astype(np.float32) / 255.0
        return torch.from_numpy(a).permute(2, 0, 1).reshape(3, 64, 2, 64).permute(2, 0, 1, 3)

    # 2 steps x 2 ranks, each rank 2 different 64x64 crops of a real photo per step
    batches = [[crops(data.astronaut(), 64 * (2 * step + rank)) for rank in range(2)] for step in range(2)]
    cfg = smoke(architecture="bmshj2018-hyperprior", data="unused", batch_size=4, workers=2,
                lr=1e-3, storage=str(tmp_path / "runs"))

    def loop(config):
        import ray.train

        from compresszoo.train import Trainer

        torch.set_num_threads(1)
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        trainer = Trainer(TrainConfig.from_dict(config["cfg"]), rank, world, torch.device("cpu"), None)

        def digest():
            h = hashlib.sha256()
            for k, v in sorted(trainer.model.state_dict().items()):
                h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()

        before = digest()
        net = trainer._ddp()
        for step, per_rank in enumerate(config["batches"]):
            trainer.state.step = step
            trainer.train_step(net, per_rank[rank])
        out = {"before": before, "after": digest(),
               "quantiles": trainer.model.entropy_bottleneck.quantiles.detach().numpy().tobytes().hex()}
        with open(f"{config['out']}/rank{rank}.json", "w") as fh:
            json.dump(out, fh)

    TorchTrainer(
        loop, train_loop_config={"cfg": cfg.to_dict(), "batches": batches, "out": str(tmp_path)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="ddp-identical", storage_path=str(tmp_path / "runs")),
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["before"] == ranks[1]["before"]  # the same seed builds the same model
    assert ranks[0]["after"] != ranks[0]["before"]  # the steps trained it
    assert ranks[0]["after"] == ranks[1]["after"]
    assert ranks[0]["quantiles"] == ranks[1]["quantiles"]
