"""Training on Ray Train with 2 workers (DDP over gloo). The two mbt2018 models train only here;
bmshj2018-hyperprior trains on 2 workers in tests/test_elastic.py (stopped by a real worker fault,
resumed on 1, compared with the uninterrupted run, its data position checked) and
bmshj2018-factorized on 2 workers of a two-node cluster there (and on 1 worker in the
registry, sweep and progress tests). A Ray Train start costs ~25 s here, so each architecture is trained where it
is needed, not in every file."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from compresszoo.config import smoke
from compresszoo.tracking import client as tracking_client


def small(shards, tmp_path, **kw):
    base = dict(data=shards, storage=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                crop=64, val_crop=64, val_images=2, batch_size=4, max_steps=3, val_every=3,
                checkpoint_every=3, log_every=1, cpus_per_worker=0.5, data_cpus=0.25, shuffle_buffer=8)
    base.update(kw)
    return smoke(**base)


@pytest.mark.parametrize("name", ["mbt2018-mean", "mbt2018"])
def test_the_mbt2018_models_train_with_two_workers(name, shards, tmp_path):
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
    # batch_size is global: 2 global batches of 4 were read, each worker taking 2 slots
    state = json.loads(open(os.path.join(res.checkpoint_dir, STATE_FILE)).read())
    assert state["data_positions"][0]["step"] == 2 and state["workers"] == [[0, 2]]
