"""Training on Ray Train: every architecture with 2 workers. A real worker fault and the resume
that matches the uninterrupted run (on another worker count) are in tests/test_elastic.py."""

from __future__ import annotations

import json
import os

import pytest
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


def position_after(shards, cfg, steps: int) -> dict:
    """The data position a worker's stream holds after `steps` global batches (the same on every rank)."""
    from compresszoo.data.reader import GlobalBatchStream

    return GlobalBatchStream(shards, batch_size=cfg.batch_size, crop=cfg.crop, seed=cfg.seed,
                             window=cfg.shuffle_buffer, step=steps).position()


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
        # batch_size is global: 2 global batches of 4 were read, each worker taking 2 slots
        state = json.loads(open(os.path.join(res.checkpoint_dir, STATE_FILE)).read())
        assert state["data_positions"] == [position_after(shards, res.config, 2)]
        assert state["workers"] == [[0, 2]]
