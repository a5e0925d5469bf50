"""Training on Ray Train: every architecture with 2 workers, a real worker fault, exact resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from compresszoo.config import smoke
from compresszoo.models import ARCHITECTURES
from compresszoo.tracking import client as tracking_client


def small(shards, tmp_path, **kw):
    base = dict(data=shards, storage=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                crop=64, val_crop=64, val_images=2, batch_size=4, max_steps=3, val_every=3,
                checkpoint_every=3, log_every=1, cpus_per_worker=0.5, data_cpus=0.25, shuffle_buffer=8)
    base.update(kw)
    return smoke(**base)


def positions_after(shards, cfg, steps: int, per_worker_batch: int) -> list[dict]:
    """Each rank's data position after `steps` batches of `per_worker_batch` crops, read here
    with the stream a worker builds (the checkpoint is taken before the loop lets go)."""
    from compresszoo.data.reader import TrainStream

    out = []
    for rank in range(cfg.workers):
        stream = TrainStream(shards, rank=rank, world_size=cfg.workers, batch_size=per_worker_batch, crop=cfg.crop,
                             seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, task_cpus=cfg.data_cpus)
        batches = stream.epoch_batches()
        for _ in range(steps):
            assert next(batches).shape[0] == per_worker_batch
        out.append(stream.position())
        batches.close()
    return out


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_each_architecture_trains_with_two_workers(name, shards, tmp_path):
    from compresszoo.train import STATE_FILE, WEIGHTS_FILE, fit

    cfg = small(shards, tmp_path, architecture=name, workers=2, max_steps=2, val_every=2,
                checkpoint_every=2)
    res = fit(cfg)
    assert res.steps == 2
    weights = load_file(os.path.join(res.checkpoint_dir, WEIGHTS_FILE))
    assert "entropy_bottleneck.quantiles" in weights
    run = tracking_client(res.config.tracking_uri).get_run(res.mlflow_run_id)
    assert run.data.params["workers"] == "2" and run.data.params["architecture"] == name
    assert {"loss", "bpp", "psnr", "aux_loss", "lr", "images_per_second", "val_loss"} <= set(run.data.metrics)
    if name == "bmshj2018-factorized":  # the data side is the same for every architecture
        # batch_size is global: each of the 2 workers read 2 steps of 4 // 2 = 2 crops
        state = json.loads(open(os.path.join(res.checkpoint_dir, STATE_FILE)).read())
        assert state["data_positions"] == positions_after(shards, res.config, 2, 2)
        assert state["data_positions"] != positions_after(shards, res.config, 2, 4)


def test_killed_worker_resumes_and_matches_uninterrupted_run(shards, tmp_path, monkeypatch):
    from compresszoo.data.reader import TrainStream
    from compresszoo.train import WEIGHTS_FILE, fit

    per_epoch = TrainStream(shards, batch_size=4, crop=64).steps_this_epoch()
    assert per_epoch and per_epoch >= 2
    kw = dict(architecture="bmshj2018-hyperprior", max_steps=2 * per_epoch, checkpoint_every=per_epoch,
              val_every=per_epoch)
    clean = fit(small(shards, tmp_path / "clean", **kw))

    marker = tmp_path / "killed.pid"
    monkeypatch.setenv("COMPRESSZOO_FAULT_AT_STEP", str(per_epoch + 1))
    monkeypatch.setenv("COMPRESSZOO_FAULT_MARKER", str(marker))
    faulty = fit(small(shards, tmp_path / "faulty", **kw))
    assert marker.exists()  # the worker process really was SIGKILLed once
    assert faulty.steps == clean.steps == 2 * per_epoch  # the exact step budget
    a = load_file(os.path.join(clean.checkpoint_dir, WEIGHTS_FILE))
    b = load_file(os.path.join(faulty.checkpoint_dir, WEIGHTS_FILE))
    assert a.keys() == b.keys()
    differ = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"resumed run differs from the uninterrupted one: {differ}"
    # one MLflow run for the resumed training, not two
    client = tracking_client(faulty.config.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("compresszoo").experiment_id])
    assert len(runs) == 1

    # Rerunning the same command after it finished resumes the same run: no new steps.
    monkeypatch.delenv("COMPRESSZOO_FAULT_AT_STEP")
    again = fit(small(shards, tmp_path / "faulty", **kw))
    assert again.run_name == faulty.run_name and again.mlflow_run_id == faulty.mlflow_run_id
    assert again.steps == faulty.steps
    c = load_file(os.path.join(again.checkpoint_dir, WEIGHTS_FILE))
    assert all(torch.equal(b[k], c[k]) for k in b)
