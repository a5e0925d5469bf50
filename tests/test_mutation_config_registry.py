"""Tests written against mutants that survived `make mutation` (benchmarks/mutation.py) in
config.py and registry_client.py: which settings `resolved()` refuses and where each bound
lies, how `--set` values are typed (elastic worker ranges included), the recipes' documented
values, the model spec a config asks for, and the registry's answers (found, not found,
failing) on a real local MLflow store."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from compresszoo.config import MSE_PARENT, ConfigError, TrainConfig, paper, smoke
from compresszoo.models.registry import model_spec

# ------------------------------------------------------------------ config: resolved()


def _ok(**changes) -> TrainConfig:
    return TrainConfig(data="d", **changes).resolved()


def _refused(message: str, **changes) -> str:
    with pytest.raises(ConfigError) as err:
        TrainConfig(data="d", **changes).resolved()
    assert message in str(err.value), str(err.value)
    return str(err.value)


def test_resolved_fills_the_model_spec_and_keeps_explicit_channels_and_lambda():
    cfg = _ok(architecture="mbt2018", quality=6)
    spec = model_spec("mbt2018", 6, "mse")
    assert (cfg.N, cfg.M, cfg.lmbda) == (spec.N, spec.M, spec.lmbda)
    assert cfg.spec() == spec
    own = _ok(architecture="mbt2018", quality=6, N=24, M=40, lmbda=0.5)
    assert (own.N, own.M, own.lmbda) == (24, 40, 0.5)
    assert own.spec() == model_spec("mbt2018", 6, "mse", N=24, M=40, lmbda=0.5)
    debug = TrainConfig(debug_model=True, metric="ms-ssim", quality=2).spec()
    assert debug == model_spec("bmshj2018-hyperprior", 2, "ms-ssim", debug=True)
    assert (debug.N, debug.M) == (8, 12)


def test_resolved_makes_the_tracking_uri_absolute_and_keeps_a_server_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert _ok(tracking_uri="sqlite:///rel.db").tracking_uri == f"sqlite:///{tmp_path}/rel.db"
    assert _ok(tracking_uri="http://mlflow:5000").tracking_uri == "http://mlflow:5000"
    assert _ok().tracking_uri == "http://env:5000"


def test_worker_ranges_fixed_elastic_and_their_bounds():
    assert _ok(workers=2).worker_range() == 2
    assert _ok(workers=2, max_workers=2).worker_range() == 2  # a range of one count is fixed
    assert _ok(workers=1, max_workers=4).worker_range() == (1, 4)
    # elastic: the per-worker share need not divide (it changes with the count anyway)
    assert _ok(workers=3, max_workers=4, batch_size=16).worker_range() == (3, 4)
    assert _ok(workers=16, batch_size=16).workers == 16  # one crop each is enough
    assert _ok(workers=1, max_workers=16, batch_size=16).max_workers == 16
    msg = _refused("max_workers=2 is below workers=3: give the range as workers=MIN..MAX", workers=3, max_workers=2)
    assert "max_workers=0 for a fixed count" in msg
    _refused("up to 17 workers cannot share the global batch_size=16: each needs at least one crop",
             workers=1, max_workers=17)
    _refused("up to 17 workers cannot share the global batch_size=16", workers=17, max_workers=0)
    assert _refused("", workers=3) == ("batch_size=16 must be divisible by workers=3 (batch_size is global: "
                                       "each worker takes batch_size // workers)")


def test_resize_check_may_be_zero_but_not_negative():
    assert _ok(resize_check_s=0.0).resize_check_s == 0.0
    _refused("resize_check_s must be >= 0, got -1.0", resize_check_s=-1.0)


def test_empty_data_names_the_flag_and_the_tool_that_makes_a_manifest():
    with pytest.raises(ConfigError) as err:
        TrainConfig().resolved()
    assert str(err.value) == ("data is empty: give --data URI, a folder holding _manifest.json "
                              "(make one with pipelines/prepare_vimeo90k.py)")


@pytest.mark.parametrize("name", ["max_steps", "checkpoint_every", "crop"])
def test_counts_that_must_be_positive(name):
    _refused(f"{name} must be positive, got 0", **{name: 0})
    assert getattr(_ok(**{name: 1}), name) == 1


def test_worker_and_batch_counts_must_be_positive():
    """Checked before the worker/batch rules, which divide by them (workers=0 was a
    ZeroDivisionError)."""
    _refused("workers must be positive, got -1", workers=-1)
    _refused("workers must be positive, got 0", workers=0)
    _refused("batch_size must be positive, got 0", batch_size=0)
    _refused("batch_size must be positive, got 0", batch_size=0, workers=-1)
    assert _ok(batch_size=1).batch_size == 1


def test_an_int_setting_with_an_exponent_must_be_a_whole_number():
    cfg = TrainConfig(data="d").with_overrides(["max_steps=2e3", "crop=2.56E2"])
    assert (cfg.max_steps, cfg.crop) == (2000, 256) and type(cfg.max_steps) is int
    for value in ("1.5e0", "2.5e-1", "1e-3"):  # were truncated to 1, 0, 0 without a word
        with pytest.raises(ConfigError, match=f"^max_steps='{value}': expected int$"):
            TrainConfig(data="d").with_overrides([f"max_steps={value}"])


@pytest.mark.parametrize("name", ["val_every", "val_images", "constant_lr_steps", "plateau_patience", "min_lr"])
def test_counts_that_may_be_zero(name):
    assert getattr(_ok(**{name: 0}), name) == 0
    _refused(f"{name} must be >= 0, got -1", **{name: -1})


@pytest.mark.parametrize("factor", [0.0, 1.0, 1.5, -0.5])
def test_the_plateau_factor_must_lie_strictly_between_zero_and_one(factor):
    _refused(f"plateau_factor must be in (0, 1), got {factor} (the docs halve: 0.5)", plateau_factor=factor)


def test_plateau_factors_inside_the_interval_resolve():
    for factor in (0.5, 0.1, 0.99):
        assert _ok(plateau_factor=factor).plateau_factor == factor


def test_the_mse_champion_is_a_parent_only_for_ms_ssim():
    assert _refused("", init_from=MSE_PARENT) == (
        "init_from='mse-champion' needs metric=ms-ssim (an MSE model would start from itself); "
        "give a model reference or a checkpoint path instead")
    assert _ok(init_from=MSE_PARENT, metric="ms-ssim").init_from == MSE_PARENT
    assert _ok(init_from="other@champion").init_from == "other@champion"


def test_parent_ref_names_the_mse_model_with_the_same_channels():
    cfg = TrainConfig(architecture="mbt2018", quality=2, metric="ms-ssim", N=24, M=40, init_from=MSE_PARENT)
    assert cfg.parent_ref() == "mbt2018-mse-q2-N24-M40@champion"
    assert dataclasses.replace(cfg, init_from="x:3").parent_ref() == "x:3"
    assert dataclasses.replace(cfg, init_from="").parent_ref() == ""
    debug = TrainConfig(architecture="mbt2018", quality=2, metric="ms-ssim", debug_model=True, init_from=MSE_PARENT)
    assert debug.parent_ref() == "mbt2018-mse-q2-N8-M12@champion"


# ------------------------------------------------------------------ config: dicts and --set


def test_from_dict_round_trips_and_refuses_unknown_fields_naming_them():
    cfg = smoke(data="d", seed=4)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({**cfg.to_dict(), "zz": 1, "aa": 2})
    assert str(err.value).startswith("unknown config field(s) ['aa', 'zz']; known: ['M', 'N', 'architecture',")


def test_a_worker_range_sets_both_bounds_as_integers_and_later_pairs_still_apply():
    cfg = smoke().with_overrides(["workers=1..4", "seed=3"])
    assert (cfg.workers, cfg.max_workers, cfg.seed) == (1, 4, 3)
    assert type(cfg.workers) is int and type(cfg.max_workers) is int
    cfg = smoke().with_overrides({"workers": "2..8", "lr": "1e-3"})
    assert (cfg.workers, cfg.max_workers, cfg.lr) == (2, 8, 1e-3)
    fixed = smoke().with_overrides(["workers=2"])
    assert (fixed.workers, fixed.max_workers) == (2, 0)
    for bad, shown in (("workers=a..4", "'a'"), ("workers=1..b", "'b'")):
        with pytest.raises(ConfigError, match=f"^workers={shown}: expected int$"):
            smoke().with_overrides([bad])


def test_dict_overrides_take_values_as_given_and_strings_typed():
    cfg = smoke().with_overrides({"seed": 5, "bf16": "yes", "max_steps": "2e2"})
    assert (cfg.seed, cfg.bf16, cfg.max_steps) == (5, True, 200)
    with pytest.raises(ConfigError, match="^unknown config field 'nope'; known: M, N, architecture, aux_lr,"):
        smoke().with_overrides({"nope": 1})


@pytest.mark.parametrize("text", ["TRUE", "Yes", "ON", "1", "true", "yes", "on"])
def test_every_spelling_of_true(text):
    assert smoke().with_overrides([f"bf16={text}"]).bf16 is True


@pytest.mark.parametrize("text", ["FALSE", "No", "OFF", "0", "false", "no", "off"])
def test_every_spelling_of_false(text):
    assert smoke(bf16=True).with_overrides([f"bf16={text}"]).bf16 is False


@pytest.mark.parametrize("pair, field_name, value", [
    ("max_steps=3E2", "max_steps", 300),  # an upper-case exponent
    ("max_steps=-5", "max_steps", -5),  # typed here, refused by resolved()
    ("lr=2E-4", "lr", 2e-4),
    ("data=exe", "data", "exe"),  # an 'e' in a str value is no exponent
])
def test_numbers_and_strings(pair, field_name, value):
    got = getattr(smoke().with_overrides([pair]), field_name)
    assert got == value and type(got) is type(value)


def test_an_override_without_equals_sign_is_refused_even_in_a_list_of_good_ones():
    with pytest.raises(ConfigError, match=re.escape("override 'seed' must look like key=value")):
        smoke().with_overrides(["lr=1e-3", "seed"])


# ------------------------------------------------------------------ config: recipes


def test_smoke_keeps_the_papers_shape_at_a_small_scale_as_its_docstring_says():
    s = smoke()
    p = paper()
    assert (s.preset, s.debug_model, s.quality) == ("smoke", True, 8)
    assert (s.max_steps, s.constant_lr_steps) == (600, 200)  # the lr held for the first third
    assert s.constant_lr_steps * 3 == s.max_steps and p.constant_lr_steps * 3 == p.max_steps
    assert (s.plateau_patience, s.batch_size) == (2, 8)  # 2 epochs, batch 8
    assert s.gate_max_gap == 0.25 and p.gate_max_gap == 0.03  # README: 25% for smoke, 3% for paper
    ft = smoke(metric="ms-ssim")
    # 200 steps at a tenth of the MSE rate for both optimizers, on 192-pixel crops
    assert (ft.max_steps, ft.constant_lr_steps, ft.crop, ft.init_from) == (200, 200, 192, MSE_PARENT)
    assert ft.lr == ft.aux_lr == pytest.approx(s.lr / 10)
    assert ft.crop > 160  # MS-SSIM's five scales
    # the rest of the fine-tune is the smoke recipe itself
    same = {f.name for f in dataclasses.fields(TrainConfig)} - {
        "metric", "init_from", "lr", "aux_lr", "max_steps", "constant_lr_steps", "crop"}
    assert {k: getattr(ft, k) for k in same} == {k: getattr(s, k) for k in same}


def test_smoke_fits_the_miniature_and_two_cpus():
    """The miniature's 42 training frames make 6-step epochs at batch 8; one worker and its
    data reads fit on two CPUs; the gate codes a few images and validation the whole split."""
    import math

    s = smoke(data="d").resolved()
    assert math.ceil(42 / s.batch_size) == 6
    assert s.cpus_per_worker + s.data_cpus <= 1.0 and s.cpus_per_worker > 0 and s.data_cpus > 0
    assert s.val_images == 0 and s.val_crop == 256
    assert s.crop < s.val_crop and s.shuffle_buffer < paper().shuffle_buffer
    assert s.checkpoint_every < s.max_steps and s.max_steps % s.checkpoint_every == 0
    assert s.log_every < s.checkpoint_every and 0 < s.gate_images < paper().gate_images
    assert s.lr > paper().lr and s.aux_lr > paper().aux_lr


def test_paper_fine_tune_keeps_the_rest_of_the_paper_recipe():
    p, ft = paper(), paper(metric="ms-ssim")
    same = {f.name for f in dataclasses.fields(TrainConfig)} - {
        "metric", "init_from", "lr", "aux_lr", "max_steps", "constant_lr_steps"}
    assert {k: getattr(ft, k) for k in same} == {k: getattr(p, k) for k in same}
    assert (p.preset, p.constant_lr_steps, p.init_from, p.metric) == ("paper", 1_500_000, "", "mse")
    # README: "at 1e-5 for both optimizers, for 500k steps"; the rate is held for the whole fine-tune
    assert (ft.lr, ft.aux_lr, ft.max_steps, ft.constant_lr_steps) == (1e-5, 1e-5, 500_000, 500_000)
    assert paper(metric="ms-ssim", max_steps=10).max_steps == 10
    assert paper(metric="ms-ssim", init_from="").init_from == ""  # an explicit override still wins


def test_recipe_crops_are_whole_multiples_of_the_models_total_stride():
    """Training crops are not padded: each side must be a multiple of the deepest stride (64)."""
    from compresszoo.codec.container import PAD_MULTIPLE

    for recipe in (paper, smoke):
        for metric in ("mse", "ms-ssim"):
            cfg = recipe(metric=metric)
            assert cfg.crop % PAD_MULTIPLE == 0 and cfg.val_crop % PAD_MULTIPLE == 0, (recipe, metric, cfg.crop)


def test_recipes_log_and_checkpoint_on_the_last_step():
    for recipe in (paper, smoke):
        for metric in ("mse", "ms-ssim"):
            cfg = recipe(metric=metric)
            assert cfg.max_steps % cfg.checkpoint_every == 0 and cfg.checkpoint_every % cfg.log_every == 0, (
                recipe, metric)


def test_a_recipe_whose_base_is_ms_ssim_gets_the_fine_tune_defaults():
    from compresszoo.config import _recipe

    cfg = _recipe(TrainConfig(metric="ms-ssim"), {}, finetune_steps=7, finetune_lr=0.5, crop=64)
    assert (cfg.metric, cfg.init_from, cfg.lr, cfg.aux_lr, cfg.max_steps, cfg.constant_lr_steps, cfg.crop) == (
        "ms-ssim", MSE_PARENT, 0.5, 0.5, 7, 7, 64)
    mse = _recipe(TrainConfig(metric="ms-ssim"), {"metric": "mse"}, finetune_steps=7, finetune_lr=0.5)
    assert (mse.metric, mse.init_from, mse.max_steps) == ("mse", "", TrainConfig().max_steps)


def test_a_field_declared_with_a_real_type_is_typed_too():
    """A subclass made without `from __future__ import annotations` has classes, not strings,
    as field types: --set still types its values."""
    ext = dataclasses.make_dataclass("Ext", [("knob", int, 7), ("ratio", float, 0.5), ("flag", bool, False)],
                                     bases=(TrainConfig,), frozen=True)
    cfg = ext().with_overrides(["knob=5", "ratio=2", "flag=on"])
    assert (cfg.knob, cfg.ratio, cfg.flag) == (5, 2.0, True) and type(cfg.ratio) is float
    with pytest.raises(ConfigError, match="^knob='x': expected int$"):
        ext().with_overrides(["knob=x"])


# The settings: where or how a run executes, outside its identity (test_config.py has the history).
SETTINGS = {"checkpoint_every", "log_every", "workers", "max_workers", "resize_check_s", "use_gpu", "cpus_per_worker",
            "data_cpus", "compile", "max_failures", "storage", "tracking_uri", "experiment", "gate_max_gap",
            "gate_min_side", "gate_images", "git_commit", "preset"}


def test_a_fresh_import_declares_the_settings_outside_the_identity_with_their_defaults():
    """The class body runs again here (a new module object; the imported one is untouched) and
    makes the same class: the same settings, the same defaults (README: the gate's 3% on images
    of at least 256 pixels a side; an empty tracking URI means MLFLOW_TRACKING_URI or ./mlflow.db)."""
    import importlib.util

    spec = importlib.util.find_spec("compresszoo.config")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    names = [f.name for f in dataclasses.fields(fresh.TrainConfig)]
    assert set(names) - set(fresh.TrainConfig.identity_fields()) == SETTINGS
    default = fresh.TrainConfig()
    assert default.to_dict() == TrainConfig().to_dict()
    assert (default.gate_max_gap, default.gate_min_side, default.tracking_uri) == (0.03, 256, "")
    assert (default.workers, default.max_workers) == (1, 0)  # one worker, not elastic


# ------------------------------------------------------------------ registry: the model card

NAME = "bmshj2018-factorized-mse-q8-N8-M12"
CONFIG = {"seed": 1, "data": "s3://bucket/vimeo", "max_steps": 600}  # not in sorted order
TAGS = {"config_hash": "c0ffee", "manifest_sha": "m1", "steps": 12}
REPORT = {"passed": True, "reason": "within 25%",
          "overall": {"num_images": 2, "real_bpp": 0.25, "payload_bpp": 0.24, "estimated_bpp": 0.245,
                      "relative_gap": -0.0123, "psnr": 25.5, "ms_ssim": 0.9, "all_exact": True},
          "thresholds": {"max_relative_gap": 0.25}}
RD_POSITION = {"comparable": True, "text": "close to the zoo.", "quality": 8,
               "published": {"bpp": 0.3, "psnr": 26.0}, "measured": {"payload_bpp": 0.24, "psnr": 25.5},
               "psnr_delta_db_at_equal_bpp": -0.4, "bpp_delta_percent_at_equal_psnr": 12.5}


def _debug_model(seed: int = 0):
    import torch

    from compresszoo.models import create_model

    torch.manual_seed(seed)
    model = create_model("bmshj2018-factorized", 8, debug=True)
    model.update(force=True)
    return model.eval()


@pytest.fixture(scope="module")
def debug_model():
    return _debug_model()


def _tables(card: str) -> list[list[list[str]]]:
    """The card's Markdown tables, strictly: a blank line, a header row, a separator row of `---`
    cells of the same width, then rows of that width up to a blank line. (Without the blank line
    before it, a renderer reads the header row as the end of the paragraph above.)"""
    lines, tables, i = card.split("\n"), [], 0
    while i < len(lines):
        if lines[i].startswith("|"):
            assert i > 0 and lines[i - 1] == "", f"no blank line before the table at {lines[i]!r}"
            rows = []
            while i < len(lines) and lines[i]:
                line = lines[i]
                assert line.startswith("| ") and line.endswith(" |") or line.endswith("|"), line
                rows.append([c.strip() for c in line.strip().strip("|").split("|")])
                i += 1
            assert len(rows) >= 2 and set(rows[1]) == {"---"} and all(len(r) == len(rows[0]) for r in rows), rows
            tables.append([rows[0], *rows[2:]])
        i += 1
    return tables


def _card(model, **kw):
    from compresszoo.registry_client import model_card

    args = {"name": NAME, "config": CONFIG, "report": REPORT, "tags": TAGS, "val_loss": 0.5} | kw
    return model_card(model, **args)


def test_the_model_card_states_the_model_its_training_and_its_gate(debug_model):
    spec = model_spec("bmshj2018-factorized", 8, "mse", debug=True)
    card = _card(debug_model, tags={**TAGS, "parent": "mbt-mse-q8:3"}, attachments=["rd.png"])
    assert card.startswith("**bmshj2018-factorized** (mse, quality 8): a learned image codec of the CompressAI zoo, "
                           "trained and gated by compresszoo.\n\n")
    fields_table, gate = _tables(card)
    assert fields_table[0] == ["field", "value"]
    assert dict(fields_table[1:]) == {
        "architecture": "bmshj2018-factorized", "metric": "mse", "quality": "8", "lambda": f"{spec.lmbda:g}",
        "N, M": "8, 12", "steps": "12", "dataset": "s3://bucket/vimeo (manifest sha256 m1)", "config hash": "c0ffee",
        "validation loss": "0.5", "fine-tuned from": "mbt-mse-q8:3"}
    assert "\nGate (passed: within 25%), 2 held-out image(s):\n" in card
    assert gate == [["real bpp", "payload bpp", "estimated bpp", "gap", "allowed gap", "PSNR (dB)", "MS-SSIM", "exact"],
                    ["0.2500", "0.2400", "0.2450", "-1.23%", "25%", "25.50", "0.9000", "True"]]
    assert ("\nArtifacts: MLmodel (python_function flavor, loader compresszoo.serving.pyfunc; no pickle), "
            "model.safetensors, config.json, bitrate_report.json, rd_point.json, rd.png.\n") in card
    assert card.endswith(
        f'Load: `mlflow.pyfunc.load_model("models:/{NAME}@champion")` (predict: column `data` of image files '
        '-> .czoo bytes; `params={"mode": "decode"}`: .czoo -> PNG), '
        f'`compresszoo.registry_client.load_registered("{NAME}@champion")`, or '
        f"`compresszoo encode IMG -o OUT.czoo --model {NAME}@champion`.")
    assert "RD position" not in card


def test_a_card_without_gate_numbers_or_parent_shows_dashes(debug_model):
    card = _card(debug_model, config={}, report={}, tags={})
    fields_table, gate = _tables(card)
    values = dict(fields_table[1:])
    assert (values["steps"], values["dataset"], values["config hash"]) == ("-", "- (manifest sha256 -)", "-")
    assert "fine-tuned from" not in values
    assert "\nGate (not passed: -), 0 held-out image(s):\n" in card
    assert gate[1] == ["-"] * 8
    assert ", rd_point.json.\n" in card  # no attachments
    assert dict(_tables(_card(debug_model, tags={}))[0][1:])["steps"] == "600"  # the config's max_steps


@pytest.mark.parametrize("source, key", [("tags", "parent"), ("tags", "parent_version"), ("tags", "init_from"),
                                         ("tags", "finetune_from"), ("config", "parent"), ("config", "init_from"),
                                         ("config", "finetune_from"), ("config", "parent_version")])
def test_the_card_names_the_parent_from_any_of_its_keys(debug_model, source, key):
    kw = {"tags": {key: "p@champion"}} if source == "tags" else {"tags": {}, "config": {key: "p@champion"}}
    assert dict(_tables(_card(debug_model, **kw))[0][1:])["fine-tuned from"] == "p@champion"


def test_the_parent_in_the_tags_wins_over_the_config(debug_model):
    card = _card(debug_model, tags={"parent": "from-tags"}, config={"init_from": "from-config"})
    assert dict(_tables(card)[0][1:])["fine-tuned from"] == "from-tags"
    card = _card(debug_model, tags={"parent": "", "finetune_from": "late"}, config={"init_from": "from-config"})
    assert dict(_tables(card)[0][1:])["fine-tuned from"] == "late"  # an empty value is no parent


def test_the_card_places_the_model_against_the_published_zoo(debug_model):
    card = _card(debug_model, rd_position=RD_POSITION)
    assert "\nRD position against the published zoo (comparable): close to the zoo.\n" in card
    rd = _tables(card)[2]
    assert rd == [["", "payload bpp", "PSNR (dB)", "PSNR at equal bpp", "bits at equal PSNR"],
                  ["this model", "0.2400", "25.50", "-0.40", "+12.5%"],
                  ["published, quality 8", "0.3000", "26.00", "", ""]]
    bare = _card(debug_model, rd_position={"text": "no curve."})
    assert "\nRD position against the published zoo (not comparable): no curve.\n" in bare
    assert _tables(bare)[2][1:] == [["this model", "-", "-", "-", "-"], ["published, quality None", "-", "-", "", ""]]


def test_card_sections_without_optional_values_stay_empty_and_separated(debug_model):
    """An RD position without its sentence leaves the sentence empty (no placeholder), every
    attachment is listed once after the fixed artifacts, and a blank line separates the
    artifacts from the loading instructions (Markdown would join them into one paragraph)."""
    card = _card(debug_model, rd_position={"comparable": True}, attachments=["rd.png", "curve.csv"])
    assert "\nRD position against the published zoo (comparable): \n" in card
    assert ", rd_point.json, rd.png, curve.csv.\n\nLoad: `mlflow.pyfunc.load_model(" in card


def test_non_finite_measurements_print_as_python_writes_them(debug_model):
    """A lossless reconstruction has an infinite PSNR; a curve without overlap no delta."""
    inf, nan = float("inf"), float("nan")
    report = {"overall": {"psnr": inf}}
    rd_position = {"published": {"psnr": inf}, "measured": {"psnr": inf}, "psnr_delta_db_at_equal_bpp": nan,
                   "bpp_delta_percent_at_equal_psnr": -inf}
    gate, rd = _tables(_card(debug_model, report=report, rd_position=rd_position))[1:]
    assert gate[1][5] == "inf"
    assert rd[1][2:] == ["inf", "+nan", "-inf%"] and rd[2][2] == "inf"


def test_card_numbers_format_as_fixed_point_and_keep_other_values():
    from compresszoo.registry_client import _fmt

    assert (_fmt(None), _fmt(0.5), _fmt(3), _fmt("n/a"), _fmt(0.123, "+.2%")) == ("-", "0.5000", "3.0000", "n/a",
                                                                                   "+12.30%")
    assert (_fmt(float("nan")), _fmt(float("inf"))) == ("nan", "inf")


# ------------------------------------------------------------------ registry: references, cache, helpers


def test_a_reference_may_carry_surrounding_whitespace():
    from compresszoo.registry_client import parse_ref

    assert parse_ref(f" {NAME}@champion \n") == (NAME, "champion", None)
    assert parse_ref(f"\t{NAME}:12") == (NAME, None, "12")
    assert parse_ref(f"{NAME} ") == (NAME, None, None)
    with pytest.raises(ValueError) as err:
        parse_ref("a b")
    assert str(err.value) == ("bad model reference 'a b'; use NAME, NAME@ALIAS or NAME:VERSION "
                              "(e.g. mbt2018-mse-q3@champion)")


def test_the_cache_defaults_to_the_users_cache_folder(tmp_path, monkeypatch):
    from compresszoo.registry_client import cache_dir, cache_path

    monkeypatch.delenv("COMPRESSZOO_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "compresszoo"
    assert cache_path(NAME, 3) == (tmp_path / ".cache" / "compresszoo").resolve() / NAME / "3" / "model.safetensors"
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "c"))
    with pytest.raises(Exception) as err:
        cache_path(NAME, "x")
    assert str(err.value) == (f"model {NAME}: the registry returned version 'x', not a positive integer; "
                              "refusing to use it as a cache path")
    with pytest.raises(Exception) as err:
        cache_path("..", 1)
    assert str(err.value) == (f"model .. version 1: cache path {tmp_path.resolve()}/1/model.safetensors is outside "
                              f"the cache {(tmp_path / 'c').resolve()}; use a plain model name")


def test_the_database_file_of_a_tracking_uri():
    from compresszoo.registry_client import _sqlite_file

    assert _sqlite_file("sqlite:////srv/m.db?timeout=5&mode=ro") == "/srv/m.db"
    assert _sqlite_file("sqlite:////srv/m.db") == "/srv/m.db"
    assert _sqlite_file("sqlite:////srv/m.db?q=a?b") == "/srv/m.db"  # a '?' inside the query
    assert _sqlite_file("sqlite:///:memory:") is None and _sqlite_file("sqlite:///") is None
    assert _sqlite_file("sqlite://") is None and _sqlite_file("http://host:5000") is None


def test_requirements_pin_the_installed_version_or_name_the_source_checkout(monkeypatch):
    import importlib.metadata

    from compresszoo.registry_client import _requirements

    assert _requirements() == [f"compresszoo=={importlib.metadata.version('compresszoo')}"]

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert _requirements() == ["compresszoo"]


def test_sha256_file_hashes_files_larger_than_one_read(tmp_path):
    import hashlib

    from compresszoo.registry_client import sha256_file

    data = bytes(range(256)) * 9000  # 2.2 MiB: three reads of 1 MiB
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_attachments_must_be_plain_names_other_than_the_models_own_files(debug_model, tmp_path):
    from compresszoo.registry_client import write_model_dir

    plot = tmp_path / "plot.png"
    plot.write_bytes(b"png")
    for i, bad in enumerate(("MLmodel", "sub/plot.png")):
        with pytest.raises(ValueError) as err:
            write_model_dir(debug_model, tmp_path / f"m{i}", config={}, report={}, rd_point={}, attachments={bad: plot})
        assert str(err.value) == (f"attachment name {bad!r} must be a plain file name other than "
                                  "model.safetensors and MLmodel")


# ------------------------------------------------------------------ registry: a real sqlite store


@pytest.fixture(scope="module")
def store(tmp_path_factory, debug_model):
    """A real sqlite registry: version 1 of NAME (the champion) registered with a config, a gate
    report, tags, an attachment and an RD position; a registered model without versions."""
    from types import SimpleNamespace

    from compresszoo.registry_client import register
    from compresszoo.tracking import client as tracking_client

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/registry.db"  # not ./mlflow.db: the default must never find it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESSZOO_CACHE", str(root / "cache"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(root)  # a call wrongly falling back to ./mlflow.db lands here, not in the checkout
        client = tracking_client(uri)
        exp = client.create_experiment("mutation", artifact_location=str(root / "artifacts"))
        (root / "rd.png").write_bytes(b"\x89PNG not really")
        run = client.create_run(exp)
        registered = register(debug_model, name=NAME, run_id=run.info.run_id, config=CONFIG, report=REPORT,
                              rd_point={"bpp": 0.24}, tags=TAGS, val_loss=0.5, tracking_uri=uri,
                              attachments={"rd.png": root / "rd.png"}, rd_position=RD_POSITION)
        client.create_registered_model("no-versions")
        yield SimpleNamespace(root=root, uri=uri, client=client, exp=exp, registered=registered, run=run.info.run_id)


def test_register_writes_a_complete_mlflow_model_with_its_card(store, debug_model):
    import importlib.metadata
    import json
    from pathlib import Path

    import yaml

    from compresszoo.models.io import FORMAT, weights_id
    from compresszoo.registry_client import sha256_file

    assert store.registered == ("1", True)
    mv = store.client.get_model_version(NAME, "1")
    folder = Path(mv.source)
    assert folder.name == "model" and folder.is_dir()
    weights = folder / "model.safetensors"
    digest = sha256_file(weights)
    assert mv.tags == {"config_hash": "c0ffee", "manifest_sha": "m1", "steps": "12", "weights_sha256": digest,
                       "val_loss": "0.5"}
    assert json.loads((folder / "config.json").read_text()) == CONFIG
    assert (folder / "config.json").read_text() == json.dumps(CONFIG, indent=2, sort_keys=True)
    assert (folder / "bitrate_report.json").read_text() == json.dumps(REPORT, indent=2)
    assert (folder / "rd_point.json").read_text() == json.dumps({"bpp": 0.24}, indent=2)
    assert mv.run_id == store.run
    assert (folder / "rd.png").read_bytes() == (store.root / "rd.png").read_bytes()
    meta = yaml.safe_load((folder / "MLmodel").read_text())
    assert meta["flavors"]["compresszoo"] == {"weights": "model.safetensors", "weights_sha256": digest,
                                              "format": FORMAT, "weights_id": weights_id(debug_model)}
    assert meta["flavors"]["python_function"]["loader_module"] == "compresszoo.serving.pyfunc"
    assert "data" not in meta["flavors"]["python_function"]  # the weights stay at the folder's top
    files = [f for f in folder.rglob("*") if f.is_file()]
    others = sum(f.stat().st_size for f in files if f.name != "MLmodel")
    assert others < meta["model_size_bytes"] <= others + (folder / "MLmodel").stat().st_size
    version = importlib.metadata.version("compresszoo")
    assert (folder / "requirements.txt").read_text().split()[1:] == [f"compresszoo=={version}"]  # after mlflow
    # the card is the version's description; the registered model says so
    assert mv.description == _card(debug_model, attachments=["rd.png"], rd_position=RD_POSITION)
    assert store.client.get_registered_model(NAME).description == (
        f"compresszoo {NAME}: learned image codec; each version's description is its model card")


def _check_signature(sig):
    """predict's contract: a binary `data` column in; data, height, width and bpp out; `mode`
    defaults to encode (serving/pyfunc.py)."""
    import json

    sig = sig.to_dict()
    assert json.loads(sig["inputs"]) == [{"type": "binary", "name": "data", "required": True}]
    assert [(c["name"], c["type"]) for c in json.loads(sig["outputs"])] == [
        ("data", "binary"), ("height", "long"), ("width", "long"), ("bpp", "double")]
    assert [(p["name"], p["type"], p["default"]) for p in json.loads(sig["params"])] == [("mode", "string", "encode")]


def _check_example_png(png: bytes):
    """A 32x32 RGB PNG: a smooth gradient, red along x, green along y, blue constant."""
    import io

    import numpy as np
    from PIL import Image

    assert png.startswith(b"\x89PNG\r\n")
    rgb = np.asarray(Image.open(io.BytesIO(png)))
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert (rgb[:, :, 0] == rgb[:1, :, 0]).all() and (rgb[:, :, 1] == rgb[:, :1, 1]).all()
    assert (rgb[0, 0, 0], rgb[0, -1, 0], rgb[0, 0, 1], rgb[-1, 0, 1]) == (0, 255, 0, 255)
    assert (np.diff(rgb[0, :, 0].astype(int)) > 0).all() and (rgb[:, :, 2] == 128).all()


def test_the_signature_and_the_input_example():
    from compresszoo.registry_client import _example_png, pyfunc_signature

    _check_signature(pyfunc_signature())
    _check_example_png(_example_png())


def _check_model_folder(folder):
    """The MLmodel in `folder` declares predict's signature and an encode input example."""
    import base64

    from mlflow.models import Model

    meta = Model.load(str(folder))
    _check_signature(meta.signature)
    frame, params = meta.load_input_example(str(folder)), meta.load_input_example_params(str(folder))
    assert params == {"mode": "encode"} and list(frame.columns) == ["data"] and len(frame) == 1
    png = frame["data"][0]
    _check_example_png(png if isinstance(png, bytes) else base64.b64decode(png))


def test_the_logged_signature_and_input_example_are_predicts_contract(store):
    from pathlib import Path

    _check_model_folder(Path(store.client.get_model_version(NAME, "1").source))


def test_write_model_dir_declares_the_signature_and_the_input_example(debug_model, tmp_path):
    """The same checks on a folder written here: the registry fixture writes its folder once per
    module, and the mutation tool credits that call to the first test that asked for the fixture
    only, so without this test a mutant of write_model_dir would meet none of the checks."""
    from compresszoo.registry_client import write_model_dir

    write_model_dir(debug_model, tmp_path / "version", config={}, report={}, rd_point={})
    _check_model_folder(tmp_path / "version")


def test_the_champion_lookup_answers_none_or_the_version(store):
    from compresszoo.registry_client import champion_version

    assert champion_version(NAME, store.uri) == "1"
    assert champion_version(NAME, store.uri + "?timeout=5") == "1"  # a query string after the file
    assert champion_version("no-versions", store.uri) is None  # no alias
    assert champion_version("never-registered", store.uri) is None
    missing = store.root / "missing.db"
    assert champion_version(NAME, f"sqlite:///{missing}?timeout=5") is None
    assert not missing.exists()


def test_latest_and_missing_references(store):
    from compresszoo.registry_client import RegistryError, _locate

    latest = store.client.create_model_version(NAME, "/nowhere/model", tags={"weights_sha256": "ab" * 32})
    try:
        assert _locate(f"{NAME}@latest", store.uri)[:3] == (NAME, str(latest.version), "ab" * 32)
        assert _locate(NAME, store.uri)[1] == "1"  # no alias: the champion
    finally:
        store.client.delete_model_version(NAME, latest.version)
    with pytest.raises(RegistryError) as err:
        _locate("never-registered@champion", store.uri)
    assert str(err.value) == (f"model 'never-registered@champion' not found in the MLflow registry at {store.uri}; "
                              "check the name, alias and MLFLOW_TRACKING_URI")


def test_a_version_whose_source_is_a_runs_uri_downloads_through_the_given_registry(store, tmp_path, monkeypatch):
    """runs:/ sources resolve through the tracking server: the one given, not the environment's."""
    import tempfile
    from pathlib import Path

    from compresszoo.registry_client import download, sha256_file

    mv = store.client.get_model_version(NAME, "1")
    run = store.client.create_run(store.exp)
    store.client.log_artifact(run.info.run_id, str(Path(mv.source) / "model.safetensors"), "model")
    v = store.client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                          tags={"weights_sha256": mv.tags["weights_sha256"]})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    try:
        path = download(f"{NAME}:{v.version}", store.uri)
        assert sha256_file(path) == mv.tags["weights_sha256"]
        assert list(scratch.iterdir()) == []  # no temporary folder left behind
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "scratch"]  # no ./mlflow.db made
    finally:
        store.client.delete_model_version(NAME, v.version)


def test_the_copy_hook_waits_between_staging_and_rename(store, tmp_path, monkeypatch):
    import time

    from compresszoo.registry_client import download

    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COMPRESSZOO_TEST_SLOW_COPY", "0.5")
    t0 = time.monotonic()
    download(f"{NAME}:1", store.uri)
    assert time.monotonic() - t0 >= 0.5


def test_an_unreachable_registry_is_an_error_naming_what_was_asked(refused_url, debug_model):
    from compresszoo.registry_client import RegistryError, champion_version, find_version, register

    for call, what in ((lambda: champion_version(NAME, refused_url), f"looking up the champion of {NAME}"),
                       (lambda: find_version(NAME, "c", "m", refused_url), f"looking up {NAME}"),
                       (lambda: register(debug_model, name=NAME, run_id="r", config={}, report={}, rd_point={},
                                         tags={}, val_loss=1.0, tracking_uri=refused_url), f"registering {NAME}")):
        with pytest.raises(RegistryError) as err:
            call()
        assert str(err.value).startswith(f"{what}: the MLflow registry is unreachable or failing -- "), str(err.value)
        assert refused_url in str(err.value)


def test_a_failing_registry_is_an_error_naming_the_server_and_the_first_line_of_its_answer(store):
    """A registry database that breaks while in use (its file overwritten): every lookup fails
    naming what it looked up, the server and the first line of the store's error, never "not found"."""
    import shutil

    from compresszoo.registry_client import RegistryError, champion_version, download, find_version
    from compresszoo.tracking import client as tracking_client

    broken = store.root / "broken.db"
    shutil.copyfile(store.root / "registry.db", broken)
    uri = f"sqlite:///{broken}"
    assert tracking_client(uri).get_registered_model(NAME).name == NAME  # the store opens and answers
    with open(broken, "r+b") as f:
        f.write(b"not a database" * 8)
    answer = "(MlflowException: (sqlite3.DatabaseError) file is not a database); check MLFLOW_TRACKING_URI and the server"
    for call, what in ((lambda: champion_version(NAME, uri), f"looking up the champion of {NAME}: "),
                       (lambda: find_version(NAME, "c", "m", uri), f"looking up {NAME}: "),
                       (lambda: download(f"{NAME}@champion", uri), f"model '{NAME}@champion' unreachable: ")):
        with pytest.raises(RegistryError) as err:
            call()
        assert str(err.value) == f"{what}the MLflow registry at {uri} is unreachable or failing {answer}"


def test_a_champion_without_a_recorded_loss_gives_way_and_an_unreadable_loss_is_an_error(store, debug_model,
                                                                                       monkeypatch):
    """Versions registered by hand (no val_loss tag) count as infinitely bad; a val_loss tag that
    is no number stops the registration instead of guessing (registered from MLFLOW_TRACKING_URI)."""
    from compresszoo.registry_client import RegistryError, champion_version, register

    name = "no-loss-model"
    store.client.create_registered_model(name)
    old = store.client.create_model_version(name, "/nowhere", tags={"weights_sha256": "ab" * 32})
    store.client.set_registered_model_alias(name, "champion", old.version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    run = store.client.create_run(store.exp).info.run_id
    assert register(debug_model, name=name, run_id=run, config={}, report={}, rd_point={}, tags={},
                    val_loss=1e30) == ("2", True)
    store.client.set_model_version_tag(name, "2", "val_loss", "n/a")
    with pytest.raises(RegistryError) as err:
        register(debug_model, name=name, run_id=run, config={}, report={}, rd_point={}, tags={}, val_loss=0.1)
    assert str(err.value) == (f"checking the champion of {name}: the MLflow registry at {store.uri} is unreachable "
                              "or failing (ValueError: could not convert string to float: 'n/a'); "
                              "check MLFLOW_TRACKING_URI and the server")
    assert champion_version(name) == "2"


def test_a_lookup_the_registry_refuses_quotes_the_first_200_characters_of_its_answer(store):
    """A name that breaks MLflow's filter syntax: the store's own error, its first line cut to
    200 characters, inside the message naming what was looked up and where."""
    from compresszoo.registry_client import RegistryError, find_version

    name = "a'b" * 100
    with pytest.raises(Exception) as direct:
        store.client.search_model_versions(f"name = '{name}'")
    first = str(direct.value).splitlines()[0]
    assert len(first) > 200
    with pytest.raises(RegistryError) as err:
        find_version(name, "c", "m", store.uri)
    assert str(err.value) == (f"looking up {name}: the MLflow registry at {store.uri} is unreachable or failing "
                              f"(MlflowException: {first[:200]}); check MLFLOW_TRACKING_URI and the server")


def test_a_registry_error_quotes_the_first_line_of_the_failure_cut_to_200_characters():
    from compresszoo.registry_client import RegistryError, _failing

    def message(e):
        err = _failing("looking up m", "sqlite:////r.db", e)
        assert isinstance(err, RegistryError)
        return str(err)

    tail = "); check MLFLOW_TRACKING_URI and the server"
    head = "looking up m: the MLflow registry at sqlite:////r.db is unreachable or failing ("
    assert message(OSError("disk I/O error\n[SQL: SELECT 1]")) == f"{head}OSError: disk I/O error{tail}"
    assert message(RuntimeError()) == f"{head}RuntimeError: {tail}"
    assert message(ValueError("x" * 300 + "\nmore")) == f"{head}ValueError: {'x' * 200}{tail}"


def test_lookups_without_a_uri_use_mlflow_tracking_uri(store, tmp_path, monkeypatch):
    from compresszoo.models.io import weights_id
    from compresszoo.registry_client import (
        champion_version,
        download,
        find_version,
        load_registered,
    )

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    assert champion_version(NAME) == "1"
    assert str(find_version(NAME, "c0ffee", "m1").version) == "1"
    assert find_version(NAME, "c0ffee", "m2") is None and find_version(NAME, "beef", "m1") is None
    assert download(f"{NAME}:1") == (tmp_path / "cache").resolve() / NAME / "1" / "model.safetensors"
    assert weights_id(load_registered(f"{NAME}@champion")) == weights_id(_debug_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no ./mlflow.db made


def test_a_missing_registry_file_names_the_uri_and_the_fix(tmp_path):
    from compresszoo.registry_client import RegistryError, download

    uri = f"sqlite:///{tmp_path}/none.db"
    with pytest.raises(RegistryError) as err:
        download(f"{NAME}:1", uri)
    assert str(err.value) == (f"no MLflow registry at {uri} (the database file does not exist); set "
                              "MLFLOW_TRACKING_URI (or pass tracking_uri) to the registry holding "
                              f"{NAME}, e.g. sqlite:////abs/path/mlflow.db or http://host:5000")
    assert list(tmp_path.iterdir()) == []


def test_unverifiable_and_corrupted_versions_are_refused_with_the_fix(store, tmp_path, monkeypatch):
    import hashlib
    from pathlib import Path

    from compresszoo.registry_client import RegistryError, download, sha256_file

    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "v" / "model.safetensors").parent.mkdir()
    (tmp_path / "v" / "model.safetensors").write_bytes(b"other bytes")
    good = sha256_file(Path(store.client.get_model_version(NAME, "1").source) / "model.safetensors")
    untagged = store.client.create_model_version(NAME, str(tmp_path / "v"))
    corrupted = store.client.create_model_version(NAME, str(tmp_path / "v"), tags={"weights_sha256": good})
    try:
        with pytest.raises(RegistryError) as err:
            download(f"{NAME}:{untagged.version}", store.uri)
        assert str(err.value) == (f"model {NAME} version {untagged.version} at {store.uri} has no weights_sha256 tag; "
                                  "refusing unverifiable weights (register it again with compresszoo)")
        with pytest.raises(RegistryError) as err:
            download(f"{NAME}:{corrupted.version}", store.uri)
        got = hashlib.sha256(b"other bytes").hexdigest()
        assert str(err.value) == (f"model {NAME} version {corrupted.version} from {store.uri}: checksum mismatch "
                                  f"(expected {good[:12]}, got {got[:12]}); the artifact is corrupted")
    finally:
        for v in (untagged, corrupted):
            store.client.delete_model_version(NAME, v.version)
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_a_registry_refusing_the_version_or_its_champion_is_an_error(store, debug_model):
    """The registry refuses the model's name, or the champion's recorded loss is unreadable:
    the version is not made champion and the error names what failed and where."""
    from compresszoo.registry_client import RegistryError, register

    with pytest.raises(Exception) as direct:
        store.client.create_registered_model("")
    run = store.client.create_run(store.exp).info.run_id
    with pytest.raises(RegistryError) as err:
        register(debug_model, name="", run_id=run, config={}, report={}, rd_point={}, tags={}, val_loss=1.0,
                 tracking_uri=store.uri)
    assert str(err.value) == (f"registering : the MLflow registry at {store.uri} is unreachable or failing "
                              f"(MlflowException: {str(direct.value).splitlines()[0]}); "
                              "check MLFLOW_TRACKING_URI and the server")


def test_a_registry_file_that_is_no_database_is_a_registry_error(tmp_path):
    """A sqlite tracking URI whose file is not a database (corrupted, or another file) names the
    model and the store instead of escaping as a raw SQLAlchemy error."""
    from compresszoo.registry_client import RegistryError, champion_version

    broken = tmp_path / "mlflow.db"
    broken.write_bytes(b"this is not a sqlite database" * 100)
    uri = f"sqlite:///{broken}"
    with pytest.raises(RegistryError) as err:
        champion_version("bmshj2018-hyperprior-mse-q1", tracking_uri=uri)
    # what was being done, and where: the model's name and the store's URI
    assert str(err.value).startswith(f"looking up the champion of bmshj2018-hyperprior-mse-q1: the MLflow "
                                     f"registry at {uri} is unreachable or failing (")
    assert re.search(r"unreachable or failing \(\w+Error: .*check MLFLOW_TRACKING_URI", str(err.value))


# Another process rewriting the shared cache file while a model loads: an audit hook on
# shutil.copyfile (a real event of the standard library, raised before the copy starts) plays
# that process, deterministically. Hooks cannot be removed, so this one only acts while a test
# sets _TAMPER.
_TAMPER: dict = {"path": None, "copies": []}
_HOOKED: list = []


def _tamper_with_copies(event, args):
    if event == "shutil.copyfile" and _TAMPER["path"] is not None:
        _TAMPER["copies"].append(tuple(str(a) for a in args))
        if str(args[0]) == str(_TAMPER["path"]):
            with open(args[0], "wb") as f:
                f.write(b"rewritten by another process")


def test_load_registered_uses_the_given_registry_and_refuses_a_cache_file_changed_while_loading(
        store, debug_model, tmp_path, monkeypatch):
    """load_registered asks the registry it is given (none in the environment, none in the
    working folder) and loads a private copy: if the shared cache file changes between its
    verification and the copy, the copy's hash gives it away and the error names the file, both
    hashes (12 hex digits) and what to do. The private copy lives in its own named temporary
    folder."""
    import hashlib
    import sys
    from pathlib import Path

    from compresszoo.registry_client import RegistryError, cache_path, load_registered, sha256_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    model = load_registered(f"{NAME}@champion", store.uri)
    want, got = debug_model.state_dict(), model.state_dict()
    assert set(want) == set(got) and all(torch.equal(got[k], want[k]) for k in want)  # saved bytes, loaded
    assert not (tmp_path / "mlflow.db").exists()
    cached = cache_path(NAME, "1")
    expected = sha256_file(cached)
    if not _HOOKED:
        sys.addaudithook(_tamper_with_copies)
        _HOOKED.append(True)
    _TAMPER.update(path=cached, copies=[])
    try:
        with pytest.raises(RegistryError) as err:
            load_registered(f"{NAME}@champion", store.uri)
    finally:
        _TAMPER["path"] = None
    (src, dst), = _TAMPER["copies"]
    assert Path(src) == cached and Path(dst).parent.name.startswith("compresszoo-load-")
    got = hashlib.sha256(b"rewritten by another process").hexdigest()
    assert str(err.value) == (f"model '{NAME}@champion': the cached file {cached} changed after verification "
                              f"(expected {expected[:12]}, got {got[:12]}); load it again")
