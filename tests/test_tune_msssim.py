"""MS-SSIM sweeps are fine-tunes, as the zoo was made: the sweep plans the MSE parent of every
trial (one per architecture, quality and (N, M)), trains and registers the missing ones before
any trial starts, reuses registered ones, and every trial starts from its parent's version."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from compresszoo.config import MSE_PARENT
from compresszoo.tune.space import SearchSpace
from compresszoo.tune.sweep import (
    SweepConfig,
    SweepError,
    mse_parents,
    register_mse_parents,
    run_sweep,
)

ROOT = Path(__file__).resolve().parents[1]
ARCH = "bmshj2018-factorized"
# Tiny but MS-SSIM-able: its five scales need crops over 160 pixels a side.
TINY = {"crop": "192", "val_crop": "192", "val_images": "2", "gate_images": "2", "gate_min_side": "192",
        "gate_max_gap": "1.0", "batch_size": "2", "max_steps": "4", "checkpoint_every": "4",
        "log_every": "2", "cpus_per_worker": "0.25", "data_cpus": "0.25", "shuffle_buffer": "4"}


def _sweep_config(tmp_path, *extra: str, channels: str = "4x8"):
    spec = importlib.util.spec_from_file_location("_tune_sweep", ROOT / "pipelines" / "tune_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--name", "ms", "--storage", str(tmp_path / "sweeps"), "--archs", ARCH, "--qualities", "8",
            "--channels", channels, "--no-early-stopping", *extra,
            *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]]
    return mod.sweep_config(mod.parse_args(argv))


def test_an_msssim_sweep_plans_one_mse_parent_per_model_shape_with_the_sweeps_settings(tmp_path):
    sc = _sweep_config(tmp_path, "--metric", "ms-ssim", "--data", str(tmp_path / "data"))
    assert sc.base.metric == "ms-ssim" and sc.base.init_from == MSE_PARENT  # the fine-tune recipe
    assert sc.space.metric == "ms-ssim"
    parents = mse_parents(sc)
    assert sorted((p.N, p.M) for p in parents) == [(4, 8), (8, 12)]  # the zoo's debug (N, M) and 4x8
    for p in parents:
        assert (p.metric, p.init_from, p.architecture, p.quality) == ("mse", "", ARCH, 8)
        assert p.lr == 2e-3 and p.max_steps == 4  # the smoke MSE rate, with the sweep's --set pairs
        assert p.crop == 192 and p.experiment == "compresszoo"  # train_zoo's experiment: reusable
        assert p.data == str(tmp_path / "data") and p.storage.endswith("/ms/parents")
    # --set metric=ms-ssim means --metric ms-ssim
    assert [p.spec().registry_name for p in mse_parents(_sweep_config(tmp_path, "--set", "metric=ms-ssim"))] \
        == [p.spec().registry_name for p in parents]
    # an MSE sweep has no parents; a base without a recipe cannot train them
    assert mse_parents(_sweep_config(tmp_path)) == []
    from dataclasses import replace
    with pytest.raises(SweepError, match="names no recipe"):
        mse_parents(replace(sc, base=sc.base.with_overrides({"preset": ""})))


def test_sweep_settings_keep_the_overrides_across_a_resume(tmp_path):
    sc = _sweep_config(tmp_path, "--metric", "ms-ssim")
    again = SweepConfig.from_dict(sc.to_dict())
    assert again.overrides == sc.overrides and again.overrides["max_steps"] == "4"
    assert mse_parents(again) == mse_parents(sc)


def test_msssim_sweep_trains_missing_parents_first_and_finetunes_every_trial_from_them(
        shards, ray_session, tmp_path, monkeypatch, capsys):
    from compresszoo.tracking import client

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    # one trial (the zoo's own (N, M)) keeps this end-to-end run small; the planning of several
    # parents is the test above
    sc = _sweep_config(tmp_path, "--metric", "ms-ssim", "--data", shards, channels="")
    assert isinstance(sc.space, SearchSpace) and len(sc.space.trials()) == 1
    outcome = run_sweep(sc, report_dir=tmp_path / "report")

    c = client(tracking)
    names = {p.spec().registry_name for p in mse_parents(sc)}
    assert names == {f"{ARCH}-mse-q8-N8-M12"}
    for name in names:  # trained, gated and registered before the trials
        (v,) = c.search_model_versions(f"name = '{name}'")
        assert str(v.version) == "1" and c.get_run(v.run_id).data.tags["gate.passed"] == "True"
    rows = outcome.report["trials"]
    assert [r["status"] for r in rows] == ["completed"], rows
    shown = capsys.readouterr().out  # the trial's progress line, read from its MLflow run
    assert f"[tune_sweep] {rows[0]['name']}" in shown and "4/4" in shown, shown[-2000:]
    exp = c.get_experiment_by_name("compresszoo-sweep-ms")
    runs = [r for r in c.search_runs([exp.experiment_id]) if "parent.ref" in r.data.tags]
    assert len(runs) == 1
    for run in runs:  # each trial started from the parent of its own shape, at the fine-tune rate
        p = run.data.params
        parent = f"{ARCH}-mse-q8-N{p['N']}-M{p['M']}"
        assert run.data.tags["parent.ref"] == f"{parent}:1" and p["init_from"] == f"{parent}:1"
        assert p["metric"] == "ms-ssim" and float(p["lr"]) == float(p["aux_lr"]) == 2e-4
        sha = c.get_model_version(parent, "1").tags["weights_sha256"]
        assert run.data.tags["parent.weights_sha256"] == sha

    # Registered parents are reused, not trained again.
    again = register_mse_parents(sc)
    assert [r["reason"] for r in again] == ["champion already registered"]
    assert all(len(c.search_model_versions(f"name = '{n}'")) == 1 for n in names)
