"""Run identity (which TrainConfig fields name a run), the documented `paper` recipe and `--set` typing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest

from compresszoo.config import TrainConfig, paper, smoke

# The hand-maintained skip set the identity used to be computed from. Run names already in
# MLflow and in checkpoint storage were made with it: the hash must not move.
OLD_SKIP = {"workers", "use_gpu", "cpus_per_worker", "data_cpus", "max_failures", "storage",
            "tracking_uri", "experiment", "git_commit", "preset", "gate_max_gap",
            "gate_min_side", "gate_images", "compile", "log_every", "checkpoint_every"}
NEW_SETTINGS = {"max_workers", "resize_check_s"}  # settings added since: the hash ignores them


def old_config_hash(cfg: TrainConfig) -> str:
    key = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in OLD_SKIP | NEW_SETTINGS}
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
    assert names - set(TrainConfig.identity_fields()) == OLD_SKIP | NEW_SETTINGS

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


# ------------------------------------------------------------------ the recipes and --set

ROOT = Path(__file__).resolve().parents[1]


def test_the_paper_recipe_is_the_documented_schedule():
    """The values the README documents (CompressAI's training schedule), field by field."""
    cfg = paper()
    documented = {"crop": 256, "batch_size": 16, "lr": 1e-4, "aux_lr": 1e-3, "clip_max_norm": 1.0,
                  "plateau_patience": 20, "plateau_factor": 0.5, "max_steps": 4_500_000, "gate_max_gap": 0.03,
                  "debug_model": False, "preset": "paper"}
    assert {k: getattr(cfg, k) for k in documented} == documented
    readme = " ".join((ROOT / "README.md").read_text().split())
    for phrase in ("`paper` is the documented schedule (256x256 crops, global batch 16, Adam 1e-4,",
                   "aux Adam 1e-3 on the quantiles, gradient clipping 1.0,", "4.5M steps"):
        assert phrase in readme, phrase
    # batch_size is global: more workers split it, they do not multiply it
    assert paper(data="d", workers=4).resolved().batch_size == 16
    with pytest.raises(ValueError, match="batch_size=16 must be divisible by workers=3"):
        paper(data="d", workers=3).resolved()


def test_the_readme_table_of_smoke_against_paper_is_both_recipes():
    """The README lists every field in which `smoke` differs from `paper`, for the MSE recipe
    and (in parentheses) the MS-SSIM fine-tune: each row must hold both recipes' values, and
    every field that differs must have a row, so a changed recipe value or a new difference
    fails until the table says it."""
    import ast

    text = (ROOT / "README.md").read_text()
    start = text.index("| field | `paper` | `smoke` |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("| `"):
            break
        name, *cells = [c.strip() for c in line.strip("|").split("|")]
        parsed = []
        for cell in cells:
            m = re.fullmatch(r"(\S+)(?: \((\S+)\))?", cell)
            assert m, line
            mse = ast.literal_eval(m.group(1))
            parsed.append((mse, ast.literal_eval(m.group(2)) if m.group(2) else mse))
        rows[name.strip("`")] = parsed
    for metric, which in (("mse", 0), ("ms-ssim", 1)):
        p, s = paper(metric=metric), smoke(metric=metric)
        differ = {f.name for f in dataclasses.fields(p) if getattr(p, f.name) != getattr(s, f.name)} - {"preset"}
        assert differ <= set(rows), f"{metric}: no README row for {sorted(differ - set(rows))}"
        for name, ((paper_mse, paper_ms), (smoke_mse, smoke_ms)) in rows.items():
            want = (paper_mse, smoke_mse) if which == 0 else (paper_ms, smoke_ms)
            assert (getattr(p, name), getattr(s, name)) == want, (metric, name)


@pytest.mark.parametrize("pair, field, value", [
    ("max_steps=1000", "max_steps", 1000),
    ("max_steps=1e3", "max_steps", 1000),
    ("max_steps=2.5E3", "max_steps", 2500),
    ("lr=3e-4", "lr", 3e-4),
    ("lr=1", "lr", 1.0),
    ("bf16=true", "bf16", True), ("bf16=YES", "bf16", True), ("bf16=1", "bf16", True), ("bf16=on", "bf16", True),
    ("channels_last=false", "channels_last", False), ("channels_last=No", "channels_last", False),
    ("channels_last=0", "channels_last", False), ("channels_last=off", "channels_last", False),
    ("data=s3://bucket/a=b", "data", "s3://bucket/a=b"),  # only the first '=' splits
    ("architecture=mbt2018", "architecture", "mbt2018"),
    ("cpus_per_worker=0.25", "cpus_per_worker", 0.25),
])
def test_set_values_take_the_type_of_their_field(pair, field, value):
    cfg = smoke(channels_last=True).with_overrides([pair])
    got = getattr(cfg, field)
    assert got == value and type(got) is type(value), (pair, got)


@pytest.mark.parametrize("pair, message", [
    ("max_steps=abc", "max_steps='abc': expected int"),
    ("max_steps=1.5", "max_steps='1.5': expected int"),
    ("workers=", "workers='': expected int"),
    ("lr=fast", "lr='fast': expected float"),
    ("bf16=maybe", "bf16='maybe': expected bool"),
    ("max_steps", "override 'max_steps' must look like key=value"),
    ("max_step=10", "unknown config field 'max_step'; known: "),
])
def test_bad_set_values_name_the_field_and_the_expected_type(pair, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        smoke().with_overrides([pair])


def test_config_errors_are_one_library_type_naming_the_field():
    from compresszoo.config import ConfigError

    base = TrainConfig(data="somewhere")
    cases = [
        (lambda: base.with_overrides(["no_such_field=1"]), "no_such_field"),
        (lambda: base.with_overrides(["max_steps=ten"]), "max_steps"),
        (lambda: base.with_overrides(["bf16=maybe"]), "bf16"),
        (lambda: base.with_overrides({"max_steps": 0}).resolved(), "max_steps"),
        (lambda: base.with_overrides({"plateau_factor": 1.5}).resolved(), "plateau_factor"),
        (lambda: TrainConfig().resolved(), "data"),
    ]
    for make, field_name in cases:
        with pytest.raises(ConfigError, match=field_name):
            make()
    assert issubclass(ConfigError, ValueError)  # callers catching ValueError keep working
