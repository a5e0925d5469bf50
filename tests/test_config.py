"""Run identity: which TrainConfig fields name a run, declared on the fields themselves."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from compresszoo.config import TrainConfig, paper, smoke

# The hand-maintained skip set the identity used to be computed from. Run names already in
# MLflow and in checkpoint storage were made with it: the hash must not move.
OLD_SKIP = {"workers", "use_gpu", "cpus_per_worker", "data_cpus", "max_failures", "storage",
            "tracking_uri", "experiment", "git_commit", "preset", "gate_max_gap",
            "gate_min_side", "gate_images", "compile", "log_every", "checkpoint_every"}


def old_config_hash(cfg: TrainConfig) -> str:
    key = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in OLD_SKIP}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


RECIPES = {
    "smoke": lambda: smoke(),
    "paper": lambda: paper(),
    "smoke-resolved": lambda: smoke(data="s3://bucket/vimeo", workers=2).resolved(),
    "paper-resolved": lambda: paper(data="/data/vimeo", architecture="mbt2018", quality=6).resolved(),
    "smoke-factorized": lambda: smoke(architecture="bmshj2018-factorized", data="d", seed=3).resolved(),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_identity_hash_and_run_name_match_the_old_skip_set(recipe):
    cfg = RECIPES[recipe]()
    assert cfg.config_hash() == old_config_hash(cfg)
    assert cfg.run_name() == (f"{cfg.architecture}-{cfg.metric}-q{cfg.quality}-l{cfg.lmbda:g}-N{cfg.N}"
                              f"-M{cfg.M}-s{cfg.seed}-{old_config_hash(cfg)}")


def test_identity_is_declared_per_field_and_defaults_to_part_of_it():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert names - set(TrainConfig.identity_fields()) == OLD_SKIP

    @dataclasses.dataclass(frozen=True)
    class Extended(TrainConfig):
        new_knob: int = 7  # written without metadata: part of the identity

    assert "new_knob" in Extended.identity_fields()
    base = Extended(data="d")
    assert dataclasses.replace(base, new_knob=8).config_hash() != base.config_hash()


def test_settings_resume_the_same_run_and_learning_fields_do_not():
    cfg = smoke(data="d").resolved()
    moved = cfg.with_overrides({"workers": 2, "storage": "s3://b/runs", "tracking_uri": "http://x:5000",
                                "gate_max_gap": 0.5, "log_every": 7, "checkpoint_every": 9,
                                "compile": True, "preset": "other"})
    assert moved.run_name() == cfg.run_name()
    for change in ({"lr": 1e-3}, {"seed": 1}, {"bf16": True}, {"channels_last": True}, {"crop": 64}):
        assert cfg.with_overrides(change).config_hash() != cfg.config_hash(), change
