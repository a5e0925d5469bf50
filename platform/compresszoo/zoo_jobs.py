"""The zoo job: plan the models, run each through train -> gate -> register, summarize.

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

from . import publish, registry_client, storage
from .config import RECIPES, TrainConfig
from .models.registry import ARCHITECTURES, QUALITIES
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
         overrides: Sequence[str] | dict = (), commit: str | None = None) -> list[TrainConfig]:
    """One TrainConfig per model: the preset with these overrides, for each architecture x
    quality (default qualities: all 8 for paper, the recipe's own for smoke), or for each
    entry of config_file (a tuned-zoo JSON from tune_sweep.py: a list of overrides)."""
    if preset not in RECIPES:
        raise ZooError(f"unknown preset {preset!r}; valid: {', '.join(sorted(RECIPES))}")
    base = RECIPES[preset]()
    base = base.with_overrides({"git_commit": source_commit() if commit is None else commit,
                                "storage": storage_uri or base.storage})
    if data:
        base = base.with_overrides({"data": data})
    base = base.with_overrides(list(overrides) if not isinstance(overrides, dict) else overrides)
    if config_file:
        entries = json.loads(Path(config_file).read_text())
        return [base.with_overrides(e) for e in (entries["models"] if isinstance(entries, dict) else entries)]
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
        qs = list(QUALITIES) if preset == "paper" else [base.quality]
    return [base.with_overrides({"architecture": a, "quality": q}) for a in names for q in qs]


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


def _say(text: str) -> None:
    print(f"[train_zoo] {text}", flush=True)


def run_one(cfg: TrainConfig) -> dict:
    """Train one model (or skip it if this config and dataset are already registered), gate
    its real bitrate and register it if it passes. Returns its summary row."""
    from .train import fit  # torch and Ray Train: only once a model really trains

    cfg = cfg.resolved()
    spec = cfg.spec()
    row = {"architecture": spec.architecture, "quality": spec.quality, "lambda": spec.lmbda,
           "N": spec.N, "M": spec.M, "name": spec.registry_name}
    existing = registry_client.find_version(spec.registry_name, cfg.config_hash(),
                                            publish.manifest_sha(cfg.data), cfg.tracking_uri)
    if existing is not None:
        _say(f"{spec.registry_name}: already registered as version {existing.version} "
             "for this config and dataset; skipping")
        return {**row, "gate": True, "reason": "already registered", "version": str(existing.version),
                "steps": existing.tags.get("steps")}
    _say(f"{cfg.run_name()}: training {cfg.max_steps} steps on {cfg.workers} worker(s)")
    result = fit(cfg)
    out = publish.gate_and_register(cfg, result.checkpoint_dir, result.mlflow_run_id,
                                    steps=result.steps, val_loss=result.val_loss)
    verdict = f"registered version {out['version']}" if out["gate"] else f"NOT registered: {out['reason']}"
    _say(f"{spec.registry_name}: {verdict}")
    return out


def _guarded(job: Callable[[TrainConfig], dict], cfg: TrainConfig) -> dict:
    try:
        return job(cfg)
    except Exception as e:  # noqa: BLE001 - one failed model must not sink the others
        traceback.print_exc()
        s = cfg.spec()
        return {"architecture": s.architecture, "quality": s.quality, "lambda": s.lmbda, "N": s.N,
                "M": s.M, "gate": False, "reason": f"error: {type(e).__name__}: {e}"}


def run_zoo(configs: Sequence[TrainConfig], concurrency: int,
            job: Callable[[TrainConfig], dict] = run_one) -> list[dict]:
    """Run every config through `job` (default run_one), `concurrency` at once; a model that
    raises becomes an "error: ..." row instead of stopping the rest. Rows in config order."""
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(lambda c: _guarded(job, c), configs))


def failed(rows: Sequence[dict]) -> list[dict]:
    """The rows of models that raised (a gate refusal is a verdict, not a failure)."""
    return [r for r in rows if str(r.get("reason", "")).startswith("error:")]


def summarize(rows: Sequence[dict], workdir: str | os.PathLike) -> tuple[str, str]:
    """(markdown table, path of train_zoo_summary.json written under workdir)."""
    out = storage.join(workdir, "train_zoo_summary.json")
    storage.write_bytes(out, json.dumps(list(rows), indent=2, default=str).encode())
    return publish.summary_table(list(rows)), out
