"""The zoo job: plan the models, run each through train -> gate -> register, summarize.

MS-SSIM models are fine-tuned from the MSE champion of the same architecture and quality
(as CompressAI's zoo was made): a plan holding them holds their MSE parents, ordered first,
and run_zoo runs the parents to completion before any fine-tune starts.

pipelines/train_zoo.py is the command line around it; the concurrency rule here (how many
trainings fit the cluster at once) is also the one tune/ sizes its trials with.
"""

from __future__ import annotations

import json
import math
import os
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import progress, publish, registry_client, storage
from .config import MSE_PARENT, RECIPES, TrainConfig
from .models.registry import ARCHITECTURES, METRICS, QUALITIES
from .tracking import git_commit


class ZooError(ValueError):
    """A zoo plan that cannot run (an unknown architecture, a bad quality list)."""


def source_commit() -> str:
    """The commit the job runs from. Under `ray job submit` the working-dir copy has no .git:
    the submitter passes the commit in COMPRESSZOO_GIT_COMMIT (or --set git_commit=...)."""
    return os.environ.get("COMPRESSZOO_GIT_COMMIT") or git_commit()


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def plan(preset: str, *, archs: str | Sequence[str] = ARCHITECTURES, qualities: str | None = None,
         data: str = "", storage_uri: str | None = None, config_file: str | os.PathLike | None = None,
         overrides: Sequence[str] | dict = (), commit: str | None = None,
         metrics: str | Sequence[str] = ("mse",)) -> list[TrainConfig]:
    """One TrainConfig per model: the preset (for its metric) with these overrides, for each
    architecture x quality x metric (default qualities: all 8 for paper, the recipe's own for
    smoke), or for each entry of config_file (a tuned-zoo JSON from tune_sweep.py: a list of
    overrides). A metric given as an override (--set metric=...) counts as `metrics`.

    Every model warm-started from the MSE champion brings its MSE parent into the plan (once,
    from the preset's MSE recipe) unless the plan already trains it; parents come first."""
    if preset not in RECIPES:
        raise ZooError(f"unknown preset {preset!r}; valid: {', '.join(sorted(RECIPES))}")
    pairs = _pairs(overrides)
    wanted = requested_metrics(metrics, pairs)
    pairs.pop("metric", None)

    def recipe(metric: str, extra: dict | None = None) -> TrainConfig:
        cfg = RECIPES[preset](metric=metric)
        cfg = cfg.with_overrides({"git_commit": source_commit() if commit is None else commit,
                                  "storage": storage_uri or cfg.storage})
        if data:
            cfg = cfg.with_overrides({"data": data})
        return cfg.with_overrides(pairs).with_overrides(extra or {})

    if config_file:
        entries = json.loads(Path(config_file).read_text())
        entries = entries["models"] if isinstance(entries, dict) else entries
        models = [recipe(str(e.get("metric", wanted[0])), {k: v for k, v in e.items() if k != "metric"})
                  for e in entries]
    else:
        names = _split(archs) if isinstance(archs, str) else list(archs)
        for a in names:
            if a not in ARCHITECTURES:
                raise ZooError(f"unknown architecture {a!r}; valid: {', '.join(ARCHITECTURES)}")
        if qualities:
            try:
                qs = [int(q) for q in _split(qualities)]
            except ValueError:
                raise ZooError(f"qualities {qualities!r}: give comma-separated integers, e.g. 1,4,8") from None
        else:
            qs = list(QUALITIES) if preset == "paper" else [RECIPES[preset]().quality]
        models = [recipe(m, {"architecture": a, "quality": q}) for a in names for q in qs for m in wanted]
    return _with_parents(models, lambda child: recipe("mse", {
        k: getattr(child, k) for k in ("architecture", "quality", "N", "M", "debug_model")}))


def _pairs(overrides: Sequence[str] | dict) -> dict:
    if isinstance(overrides, dict):
        return dict(overrides)
    pairs = {}
    for text in overrides:
        if "=" not in text:
            raise ValueError(f"override {text!r} must look like key=value")
        key, value = text.split("=", 1)
        pairs[key] = value
    return pairs


def requested_metrics(metrics: str | Sequence[str], overrides: Sequence[str] | dict = ()) -> list[str]:
    """The metrics a plan asks for: `metrics` (comma-separated or a list), or the metric an
    override sets (--set metric=ms-ssim means what --metrics ms-ssim does)."""
    pairs = _pairs(overrides)
    wanted = [str(pairs["metric"])] if "metric" in pairs else (
        _split(metrics) if isinstance(metrics, str) else list(metrics))
    for m in wanted:
        if m not in METRICS:
            raise ZooError(f"unknown metric {m!r}; valid: {', '.join(METRICS)}")
    if not wanted:
        raise ZooError("no metric asked for; give --metrics mse, ms-ssim or mse,ms-ssim")
    return list(dict.fromkeys(wanted))


def parent_key(cfg: TrainConfig) -> tuple:
    """What names a model in the registry, whatever its metric: its MSE version's name."""
    return (cfg.architecture, cfg.quality, cfg.N, cfg.M, cfg.debug_model)


def is_finetune(cfg: TrainConfig) -> bool:
    """A model that starts from the MSE champion of its architecture and quality."""
    return cfg.init_from == MSE_PARENT


def _with_parents(models: list[TrainConfig], make_parent: Callable[[TrainConfig], TrainConfig]) -> list[TrainConfig]:
    """Models from scratch first (the planned MSE models and, once each, the missing parents of
    the fine-tunes), then the fine-tunes, each group in plan order."""
    scratch = [c for c in models if not is_finetune(c)]
    have = {parent_key(c) for c in scratch if c.metric == "mse"}
    for child in (c for c in models if is_finetune(c)):
        if parent_key(child) not in have:
            scratch.append(make_parent(child))
            have.add(parent_key(child))
    return scratch + [c for c in models if is_finetune(c)]


def cpus_per_run(cfg: TrainConfig, extra_cpus: float = 0.0) -> float:
    """What one running training holds: its Train workers, a Ray Data read task, and
    extra_cpus of its own (a Tune trial's actor)."""
    return cfg.workers * cfg.cpus_per_worker + cfg.data_cpus + extra_cpus


def concurrency_for(cfg: TrainConfig, resources: dict, *, extra_cpus: float = 0.0, requested: int = 0) -> int:
    """Trainings at once: `requested` if > 0, else as many as fit the cluster's `resources`
    (ray.cluster_resources()) together: CPUs for every run's workers and data tasks (more
    would leave Ray Data tasks waiting on CPUs the other runs' workers hold) and, with
    use_gpu, a GPU per worker. Always at least one."""
    if requested > 0:
        return requested
    n = int(math.floor(resources.get("CPU", 1.0) / cpus_per_run(cfg, extra_cpus) + 1e-9))
    if cfg.use_gpu:
        n = min(n, int(resources.get("GPU", 0) // cfg.workers))
    return max(1, n)


def run_one(cfg: TrainConfig) -> dict:
    """Train one model (or skip it if this config and dataset are already registered), gate
    its real bitrate and register it if it passes. Returns its summary row.

    Its phases and a training progress line (from its MLflow run) go to progress.default()."""
    from .train import fit, resolve_parent  # torch and Ray Train: only once a model really trains

    # the parent pinned first: a fine-tune's identity names the parent version it starts from
    cfg, parent = resolve_parent(cfg.resolved())
    spec = cfg.spec()
    row = {"architecture": spec.architecture, "quality": spec.quality, "lambda": spec.lmbda,
           "N": spec.N, "M": spec.M, "name": spec.registry_name}
    existing = registry_client.find_version(spec.registry_name, cfg.config_hash(),
                                            publish.manifest_sha(cfg.data), cfg.tracking_uri)
    shown = progress.default()
    label = spec.registry_name
    if existing is not None:
        shown.phase(label, "skipped", f"already registered as version {existing.version} for this config "
                    "and dataset")
        return {**row, "gate": True, "reason": "already registered", "version": str(existing.version),
                "steps": existing.tags.get("steps")}
    with progress.watching(shown, label, tracking_uri=cfg.tracking_uri, total=cfg.max_steps,
                           experiment=cfg.experiment, run_key=cfg.run_name(),
                           detail=f"{cfg.workers} worker(s), run {cfg.run_name()}"):
        result = fit(cfg)
    shown.phase(label, "gate", f"compressing {cfg.gate_images or 'all'} held-out image(s) for real")
    out = publish.gate_and_register(cfg, result.checkpoint_dir, result.mlflow_run_id,
                                    steps=result.steps, val_loss=result.val_loss,
                                    on_register=lambda: shown.phase(label, "registering",
                                                                    "the MLflow Model, its model card, champion"))
    if parent and out.get("version"):
        from .tracking import client

        c = client(cfg.tracking_uri)  # the registry shows each version's parent
        for key, value in parent.tags().items():
            c.set_model_version_tag(spec.registry_name, out["version"], key, value)
        out["parent"] = parent.ref
    verdict = f"registered version {out['version']}" if out["gate"] else f"NOT registered: {out['reason']}"
    shown.phase(label, "done", verdict)
    return out


def _guarded(job: Callable[[TrainConfig], dict], cfg: TrainConfig) -> dict:
    try:
        return job(cfg)
    except Exception as e:  # noqa: BLE001 - one failed model must not sink the others
        traceback.print_exc()
        s = cfg.spec()
        progress.default().phase(s.registry_name, "failed", f"{type(e).__name__}: {e}")
        return {"architecture": s.architecture, "quality": s.quality, "lambda": s.lmbda, "N": s.N,
                "M": s.M, "gate": False, "reason": f"error: {type(e).__name__}: {e}"}


def reuse_parent(cfg: TrainConfig) -> dict:
    """An MSE model planned only as the parent of fine-tunes: skipped when its name already
    has a champion (the fine-tunes start from it), else run_one (train, gate, register)."""
    cfg = cfg.resolved()
    spec = cfg.spec()
    from .registry_client import champion_version

    version = champion_version(spec.registry_name, cfg.tracking_uri)
    if version is None:
        return run_one(cfg)
    progress.default().phase(spec.registry_name, "skipped",
                             f"champion version {version} already registered; fine-tuning from it")
    return {"architecture": spec.architecture, "quality": spec.quality, "lambda": spec.lmbda, "N": spec.N,
            "M": spec.M, "name": spec.registry_name, "gate": True, "reason": "champion already registered",
            "version": version}


def run_zoo(configs: Sequence[TrainConfig], concurrency: int,
            job: Callable[[TrainConfig], dict] = run_one, *, reuse_parents: bool = False) -> list[dict]:
    """Run every config through `job` (default run_one), `concurrency` at once; a model that
    raises becomes an "error: ..." row instead of stopping the rest. Rows in config order.

    Fine-tunes (init_from=MSE_PARENT) start only once every other model has finished, so
    their MSE parents are registered first. reuse_parents: the MSE models are in the plan only
    as parents; one whose name already has a champion is not trained again (reuse_parent)."""
    first = [i for i, c in enumerate(configs) if not is_finetune(c)]
    then = [i for i, c in enumerate(configs) if is_finetune(c)]
    rows: list = [None] * len(configs)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for stage in (first, then):
            jobs = [reuse_parent if reuse_parents and configs[i].metric == "mse" and job is run_one else job
                    for i in stage]
            for i, row in zip(stage, pool.map(lambda ij: _guarded(ij[1], configs[ij[0]]), zip(stage, jobs))):
                rows[i] = row
    return rows


def failed(rows: Sequence[dict]) -> list[dict]:
    """The rows of models that raised (a gate refusal is a verdict, not a failure)."""
    return [r for r in rows if str(r.get("reason", "")).startswith("error:")]


def summarize(rows: Sequence[dict], workdir: str | os.PathLike) -> tuple[str, str]:
    """(markdown table, path of train_zoo_summary.json written under workdir)."""
    out = storage.join(workdir, "train_zoo_summary.json")
    storage.write_bytes(out, json.dumps(list(rows), indent=2, default=str).encode())
    return publish.summary_table(list(rows)), out
