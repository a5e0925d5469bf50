"""The documented schedule and the MS-SSIM fine-tune (CompressAI docs/source/zoo.rst,
"Training"): lr held for a constant phase, then halved after `patience` epochs without a
better test loss, no floor; warm starts from a checkpoint or a registered model; the zoo
plan training MSE parents before their MS-SSIM fine-tunes."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time

import numpy as np
import pytest
import torch

from compresszoo import registry_client, zoo_jobs
from compresszoo.config import MSE_PARENT, paper, smoke
from compresszoo.registry_client import sha256_file
from compresszoo.train import (
    WEIGHTS_FILE,
    LrSchedule,
    Parent,
    Trainer,
    WarmStartError,
    resolve_parent,
    steps_per_epoch,
)


def schedule(**kw) -> LrSchedule:
    # lr 1.0 and factor 0.5: every lr below is a power of two, so comparisons are exact
    return LrSchedule(**{"lr": 1.0, "constant_steps": 0, "epoch_steps": 10, "patience": 2, **kw})


def lrs_for(s: LrSchedule, losses: list[float]) -> list[float]:
    """The lr after each epoch end, feeding one loss per epoch."""
    return [s.observe(s.last_step + s.epoch_steps, loss) for loss in losses]


# ---------------------------------------------------------------- the rule, as a function


def test_recipes_state_the_documented_values():
    p = paper()
    assert (p.lr, p.aux_lr, p.batch_size, p.crop, p.clip_max_norm, p.max_steps) == (1e-4, 1e-3, 16, 256, 1.0, 4_500_000)
    assert 1_000_000 <= p.constant_lr_steps <= 2_000_000  # "approximately 1-2M steps"
    assert (p.plateau_patience, p.plateau_factor, p.min_lr, p.val_images) == (20, 0.5, 0.0, 0)
    ft = paper(metric="ms-ssim")
    assert (ft.init_from, ft.lr, ft.aux_lr) == (MSE_PARENT, 1e-5, 1e-5)  # "1e-5 for both optimizers"
    assert ft.constant_lr_steps == ft.max_steps == 500_000  # the rate is held for the whole fine-tune
    assert paper(metric="ms-ssim", lr=3e-5).lr == 3e-5  # an explicit override still wins
    # Vimeo90K septuplets: 64,612 training sequences x 7 frames at batch 16
    assert steps_per_epoch(64_612 * 7, 16) == 28_268
    assert steps_per_epoch(42, 8) == 6 and steps_per_epoch(48, 8) == 6  # ceil, as a DataLoader without drop_last
    with pytest.raises(ValueError, match="training frames"):
        steps_per_epoch(0, 16)


def test_no_decay_inside_the_constant_phase_whatever_the_losses():
    s = schedule(constant_steps=100)
    worse = [float(i) for i in range(1, 11)]  # every epoch worse than the last, 10 epochs = 100 steps
    assert lrs_for(s, worse) == [1.0] * 10
    assert s.phase == "constant" and s.best == math.inf and s.epochs_since_best == 0
    # the plateau phase starts fresh at step 110: an improvement, then patience=2 bad epochs, then a halving
    assert lrs_for(s, [50.0, 50.0, 50.0, 50.0]) == [1.0, 1.0, 1.0, 0.5]
    assert s.phase == "plateau"


def test_halves_after_patience_epochs_without_improvement_not_before_and_has_no_floor():
    s = schedule(patience=3)
    assert lrs_for(s, [5.0, 4.0, 4.0, 4.0, 4.0]) == [1.0, 1.0, 1.0, 1.0, 1.0]  # 3 bad epochs: not yet
    assert s.epochs_since_best == 3
    assert lrs_for(s, [4.0]) == [0.5]  # the 4th: halved, and counting starts again
    assert lrs_for(s, [3.0, 3.5, 3.5, 3.5]) == [0.5] * 4  # an improvement resets the count
    # ReduceLROnPlateau's relative threshold: 1e-5 relative better is not an improvement
    assert lrs_for(s, [3.0 * (1 - 1e-5)]) == [0.25]
    # no floor: a long plateau keeps halving far below the old 1e-7 floor
    lrs = lrs_for(s, [3.0] * 4 * 30)
    assert lrs[-1] == 2.0 ** -32 < 1e-7
    assert lrs[3::4] == [2.0 ** -k for k in range(3, 33)]


def test_the_plateau_phase_is_pytorchs_reduce_lr_on_plateau_as_the_docs_say():
    """On any loss sequence, past the constant phase, the lr is ReduceLROnPlateau's (mode min,
    factor 0.5, no floor, its default threshold) started at the first plateau epoch."""
    rng = np.random.default_rng(0)
    # noisy descent with long flat stretches, so both improvements and plateaus occur
    losses = np.concatenate([np.linspace(2, 1, 40), np.full(30, 1.0), np.linspace(1, 0.8, 20), np.full(40, 0.8)])
    losses = (losses + rng.normal(0, 0.002, losses.size)).tolist()
    ours = schedule(patience=5, constant_steps=200)
    got = lrs_for(ours, losses)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=5, min_lr=0.0)
    want = []
    for i, loss in enumerate(losses):
        if (i + 1) * 10 > 200:
            ref.step(loss)
        want.append(opt.param_groups[0]["lr"])
    assert got == want
    assert min(got) <= 0.125  # the sequence really has plateaus: at least three halvings


def test_each_epoch_end_counts_once():
    s = schedule()
    assert [s.is_epoch_end(k) for k in (0, 5, 10, 20, 25)] == [False, False, True, True, False]
    s.observe(10, 1.0)
    with pytest.raises(ValueError, match="step 10 was already counted"):
        s.observe(10, 1.0)


# ---------------------------------------------------------------- on the Trainer


def photos(side: int = 64) -> torch.Tensor:
    from skimage import data

    crops = [data.astronaut()[:side, :side], data.coffee()[100:100 + side, 200:200 + side]]
    return torch.stack([torch.from_numpy(np.ascontiguousarray(c)).permute(2, 0, 1).float() / 255 for c in crops])


def trainer(recipe=smoke, **overrides) -> Trainer:
    # data is never read: validation batches are set directly, training batches passed in
    cfg = recipe(**{"architecture": "bmshj2018-hyperprior", "data": "unused", **overrides}).resolved()
    return Trainer(cfg, rank=0, world=1, device=torch.device("cpu"), run_id=None)


def epochs(t: Trainer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t.state.step += t.schedule.epoch_steps
        t.end_epoch()
        out.append(t.optimizer.param_groups[0]["lr"])
    return out


def test_the_schedule_state_survives_a_checkpoint_and_resumes_exactly(tmp_path):
    """The model does not change between these epochs, so after the first (an improvement on
    inf) none improves: with patience 1 the lr halves every second epoch. A resumed trainer
    continues the count; a fresh one would not halve on its next epoch."""
    kw = dict(lr=4e-3, constant_lr_steps=12, plateau_patience=1)
    t = trainer(**kw)
    t._val_batches = [photos()]
    t.schedule.epoch_steps = 6
    assert epochs(t, 2) == [4e-3, 4e-3]  # steps 6 and 12: the constant phase
    assert epochs(t, 4) == [4e-3, 4e-3, 2e-3, 2e-3]
    assert t.schedule.epochs_since_best == 1 and t.aux_optimizer.param_groups[0]["lr"] == t.cfg.aux_lr
    t.save(str(tmp_path))
    saved = json.loads((tmp_path / "state.json").read_text())["schedule"]
    assert saved == dataclasses.asdict(t.schedule) and saved["phase"] == "plateau"

    resumed = trainer(**kw)
    resumed.load(str(tmp_path))
    assert resumed.schedule == t.schedule and resumed.optimizer.param_groups[0]["lr"] == 2e-3
    resumed._val_batches = t._val_batches
    assert epochs(resumed, 3) == [1e-3, 1e-3, 5e-4]  # halved on its first epoch: the count went on
    fresh = trainer(**kw)  # what a lost schedule state would do: no halving at first
    fresh._val_batches, fresh.schedule.epoch_steps, fresh.state.step = t._val_batches, 6, 36
    assert epochs(fresh, 2) == [4e-3, 4e-3]


def _parent_checkpoint(tmp_path, **overrides):
    """A trained MSE parent's checkpoint folder (one real step: weights differ from the init)."""
    parent = trainer(paper, architecture="bmshj2018-factorized", quality=1, **overrides)
    parent.train_step(parent.model, photos())
    parent.save(str(tmp_path))
    return parent


def test_warm_start_from_a_checkpoint_gives_the_parents_weights_and_the_finetune_rate(tmp_path):
    parent = _parent_checkpoint(tmp_path / "parent")
    cfg = paper(architecture="bmshj2018-factorized", quality=1, metric="ms-ssim", data="unused",
                init_from=str(tmp_path / "parent")).resolved()
    pinned, info = resolve_parent(cfg)
    weights = tmp_path / "parent" / WEIGHTS_FILE
    assert pinned.init_from == str(weights) and info.sha256 == sha256_file(weights) and info.version == ""
    assert info.name == "bmshj2018-factorized-mse-q1" and pinned.lmbda == cfg.lmbda  # the child keeps its lambda
    assert info.tags() == {"parent.ref": str(weights), "parent.name": "bmshj2018-factorized-mse-q1",
                           "parent.version": "", "parent.weights_sha256": info.sha256}
    assert pinned.run_name() != cfg.run_name()  # the run's identity names the parent it starts from

    child = Trainer(pinned, 0, 1, torch.device("cpu"), None)
    want = parent.model.state_dict()
    assert any(not torch.equal(v, want[k]) for k, v in child.model.state_dict().items())  # before: its own init
    child.warm_start(info)
    got = child.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [g["lr"] for g in child.optimizer.param_groups] == [1e-5]
    assert [g["lr"] for g in child.aux_optimizer.param_groups] == [1e-5]
    assert not child.optimizer.state and not child.aux_optimizer.state  # fresh optimizers
    assert child.criterion.metric == "ms-ssim"

    # the fine-tune trains from there at 1e-5 (MS-SSIM needs crops over 160 pixels)
    before = {k: v.clone() for k, v in got.items()}
    child.train_step(child.model, photos(192))
    moved = max((child.model.state_dict()[k] - before[k]).abs().max().item() for k in before
                if before[k].is_floating_point())
    assert 0 < moved < 1e-4  # Adam moves each weight by about lr per step


def test_warm_start_refuses_a_changed_file_and_a_different_architecture(tmp_path):
    _parent_checkpoint(tmp_path / "parent")
    cfg = paper(architecture="bmshj2018-factorized", quality=1, metric="ms-ssim", data="unused",
                init_from=str(tmp_path / "parent")).resolved()
    pinned, info = resolve_parent(cfg)
    child = Trainer(pinned, 0, 1, torch.device("cpu"), None)
    with pytest.raises(WarmStartError, match="changed after the run started"):
        child.warm_start(Parent(info.ref, info.name, info.version, "0" * 64))
    other = paper(architecture="bmshj2018-hyperprior", quality=1, metric="ms-ssim", data="unused",
                  init_from=str(tmp_path / "parent")).resolved()
    with pytest.raises(WarmStartError, match=r"is bmshj2018-factorized N=128 M=192; this run trains "
                                             r"bmshj2018-hyperprior"):
        resolve_parent(other)
    with pytest.raises(WarmStartError, match="no model.safetensors at"):
        resolve_parent(dataclasses.replace(cfg, init_from=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="init_from='mse-champion' needs metric=ms-ssim"):
        paper(data="d", init_from=MSE_PARENT).resolved()
    assert paper(metric="ms-ssim", architecture="mbt2018", quality=6).parent_ref() == "mbt2018-mse-q6@champion"
    assert smoke(metric="ms-ssim").parent_ref() == "bmshj2018-hyperprior-mse-q8-N8-M12@champion"


# ---------------------------------------------------------------- the zoo plan


def _names(configs) -> list[str]:
    return [c.spec().registry_name for c in configs]


def test_the_zoo_plan_puts_mse_parents_before_their_msssim_finetunes():
    archs = "bmshj2018-hyperprior,mbt2018"
    only = zoo_jobs.plan("paper", archs=archs, qualities="1,2", metrics="ms-ssim", commit="")
    assert [c.metric for c in only] == ["mse"] * 4 + ["ms-ssim"] * 4
    for child in only[4:]:
        assert child.parent_ref().split("@")[0] in _names(only[:4])
        assert child.init_from == MSE_PARENT and child.lr == 1e-5
    assert only[0].lr == 1e-4 and only[0].init_from == ""  # parents from the MSE recipe
    both = zoo_jobs.plan("paper", archs=archs, qualities="1,2", metrics="mse,ms-ssim", commit="")
    assert [c.metric for c in both] == ["mse"] * 4 + ["ms-ssim"] * 4  # no parent planned twice
    assert _names(both) == _names(only)
    via_set = zoo_jobs.plan("smoke", archs="mbt2018", overrides=["metric=ms-ssim", "max_steps=7"], commit="")
    assert [(c.metric, c.max_steps) for c in via_set] == [("mse", 7), ("ms-ssim", 7)]
    with pytest.raises(zoo_jobs.ZooError, match="unknown metric 'ssim'; valid: mse, ms-ssim"):
        zoo_jobs.plan("smoke", metrics="ssim", commit="")


def test_run_zoo_finishes_the_parents_before_any_finetune_starts():
    configs = zoo_jobs.plan("smoke", archs="bmshj2018-hyperprior,mbt2018,mbt2018-mean",
                            metrics="mse,ms-ssim", commit="")
    events, lock = [], threading.Lock()

    def job(cfg):
        with lock:
            events.append(("start", cfg.metric))
        time.sleep(0.05 if cfg.metric == "mse" else 0.0)
        with lock:
            events.append(("end", cfg.metric))
        return {"metric": cfg.metric, "name": cfg.spec().registry_name}

    rows = zoo_jobs.run_zoo(configs, concurrency=6, job=job)
    assert [r["name"] for r in rows] == _names(configs)  # rows in plan order
    last_parent_end = max(i for i, e in enumerate(events) if e == ("end", "mse"))
    first_child_start = min(i for i, e in enumerate(events) if e == ("start", "ms-ssim"))
    assert last_parent_end < first_child_start


def test_a_missing_registry_has_no_champion_and_is_not_created(tmp_path):
    db = tmp_path / "mlflow.db"
    assert registry_client.champion_version("mbt2018-mse-q1", f"sqlite:///{db}") is None
    assert not db.exists()


# ---------------------------------------------------------------- end to end, on Ray


def _register_trained_parent(tracking: str, shards: str) -> str:
    """A smoke MSE model trained for a few real steps here (no Ray), registered through the
    registry's own register(); returns its name."""
    from compresszoo.data.reader import validation_batches
    from compresszoo.registry_client import register
    from compresszoo.tracking import find_or_create_run

    cfg = smoke(architecture="bmshj2018-factorized", data=shards, tracking_uri=tracking).resolved()
    t = Trainer(cfg, 0, 1, torch.device("cpu"), None)
    x = torch.cat(list(validation_batches(shards, crop=128, batch_size=4, task_cpus=0.25)))
    for _ in range(30):
        t.train_step(t.model, x)
    t.model.update(force=True)
    name = cfg.spec().registry_name
    run_id = find_or_create_run(tracking, "compresszoo", "parent", {})
    register(t.model.eval(), name=name, run_id=run_id, config=cfg.to_dict(), report={}, rd_point={},
             tags={}, val_loss=1.0, tracking_uri=tracking)
    return name


def test_msssim_model_finetunes_from_the_registered_mse_champion_and_records_lineage(
        shards, ray_session, tmp_path, monkeypatch):
    """train_zoo's plan for --metrics ms-ssim with the MSE parent registered: the parent is
    reused, the MS-SSIM model is fine-tuned from its champion through Ray Train, gated and
    registered with its parent recorded on the run and the version; a rerun trains nothing."""
    from compresszoo.tracking import client as tracking_client

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    parent_name = _register_trained_parent(tracking, shards)
    tiny = {"tracking_uri": tracking, "crop": 192, "batch_size": 8, "max_steps": 6, "checkpoint_every": 6,
            "log_every": 3, "val_images": 2, "gate_images": 2, "cpus_per_worker": 0.5, "data_cpus": 0.25,
            "shuffle_buffer": 8}
    configs = zoo_jobs.plan("smoke", archs="bmshj2018-factorized", metrics="ms-ssim", data=shards,
                            storage_uri=str(tmp_path / "runs"), overrides=tiny, commit="")
    child_name = "bmshj2018-factorized-ms-ssim-q8-N8-M12"
    assert _names(configs) == [parent_name, child_name] == ["bmshj2018-factorized-mse-q8-N8-M12", child_name]

    rows = zoo_jobs.run_zoo(configs, concurrency=2, reuse_parents=True)
    assert [(r["name"], r["gate"], r["version"]) for r in rows] == [(parent_name, True, "1"),
                                                                   (child_name, True, "1")], rows
    assert rows[0]["reason"] == "champion already registered"  # reused, not trained again
    assert rows[1]["parent"] == f"{parent_name}:1"

    client = tracking_client(tracking)
    parent_sha = client.get_model_version(parent_name, "1").tags["weights_sha256"]
    child = client.get_model_version(child_name, "1")
    lineage = {"parent.ref": f"{parent_name}:1", "parent.name": parent_name, "parent.version": "1",
               "parent.weights_sha256": parent_sha}
    assert {k: child.tags.get(k) for k in lineage} == lineage  # the registry shows the parent
    run = client.get_run(child.run_id)
    assert {k: run.data.tags.get(k) for k in lineage} == lineage
    assert run.data.params["init_from"] == f"{parent_name}:1" and run.data.params["metric"] == "ms-ssim"
    assert run.data.tags["gate.passed"] == "True"
    lrs = {m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert lrs == {2e-4}  # the smoke fine-tune rate, held for the whole run
    assert {m.step for m in client.get_metric_history(run.info.run_id, "lr_after_epoch")} == {6}

    # Again: the fine-tune of that parent version is already registered: nothing trains.
    again = zoo_jobs.run_zoo(configs, concurrency=2, reuse_parents=True)
    assert [r["reason"] for r in again] == ["champion already registered", "already registered"]
    assert len(client.search_model_versions(f"name = '{child_name}'")) == 1
