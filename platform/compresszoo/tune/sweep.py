"""The sweep driver: a Ray Tune Tuner over a SearchSpace whose trials are tune.trial.sweep_trial
(each one compresszoo.train.fit of a TrialSpec), early-stopped per (architecture, lambda) by
tune.scheduler.PerLambdaASHA; then the report.

Layout under the sweep's deterministic path <storage>/<name>: Tune's experiment state (what
--resume restores), sweep.json (the settings a resume reuses), held_out.pt (the gate's images,
read once), runs/ (each trial's Ray Train run, resumed by name), parents/ (the MSE parents'
runs) and report/. MLflow: one parent run per sweep, a child run per trial.

MS-SSIM trials are fine-tunes (the recipe's init_from=MSE_PARENT, as the zoo was made): before
any trial starts, the sweep registers the MSE model each one starts from (one per architecture,
quality and (N, M); reused when its name already has a champion), exactly as train_zoo does.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.schedulers import FIFOScheduler

from .. import progress, storage
from ..config import RECIPES, TrainConfig
from ..storage import ray_storage
from ..tracking import (
    MlflowLogger,
    client,
    find_or_create_run,
    provenance_tags,
    resolve_tracking_uri,
)
from ..zoo_jobs import concurrency_for, cpus_per_run, is_finetune, parent_key, run_zoo
from .report import build_report, markdown_summary, write_report
from .scheduler import METRIC, TIME_ATTR, PerLambdaASHA
from .space import SearchSpace, TrialSpec
from .trial import child_run, save_held_out, sweep_trial, trial_config

SWEEP_FILE, HELD_OUT_FILE = "sweep.json", "held_out.pt"


class SweepError(ValueError):
    """A sweep that cannot start as asked: a bad name or setting, an existing sweep started
    over, a missing one resumed."""


@dataclass(frozen=True)
class SweepConfig:
    name: str
    storage: str  # local folder or s3://bucket/prefix; the sweep lives at <storage>/<name>
    space: SearchSpace
    base: TrainConfig  # every trial's config before its TrialSpec overrides
    early_stopping: bool = True
    grace_period: int = 0  # steps before a trial can be stopped; 0: the first report
    reduction_factor: float = 2.0
    compare_across_architectures: bool = False  # True: one ASHA per lambda, not per (arch, lambda)
    trial_cpus: float = 0.25  # the trial's own actor: Train controller, MLflow, the bitrate check
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs (and GPUs) hold
    # the user's --set pairs (what `base` was made with): the MSE parents of fine-tune trials
    # get them too, as train_zoo's plan gives them to the parents it adds
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name or ""):
            raise SweepError(f"sweep name {self.name!r}: use letters, digits, '.', '_' and '-' "
                             "(it names the sweep's folder and MLflow runs), e.g. --name hyperprior-q1-8")
        if self.reduction_factor <= 1:
            raise SweepError(f"reduction_factor must be > 1, got {self.reduction_factor}")

    @property
    def uri(self) -> str:
        return storage.join(self.storage, self.name)

    def prepared_base(self) -> TrainConfig:
        """The base config every trial shares, made location-independent (trial actors run in
        their own folders) and with a validation at every report, so ASHA compares fresh
        validation losses."""
        b = self.base
        data = b.data if not b.data or storage.is_remote(b.data) else os.path.abspath(b.data)
        return b.with_overrides({
            "data": data, "tracking_uri": resolve_tracking_uri(b.tracking_uri),
            "val_every": b.checkpoint_every,
            # A sweep's own MLflow experiment: a trial's run key (its config) is then unique to
            # this sweep and never collides with a train_zoo run of the same model.
            "experiment": b.experiment if b.experiment.endswith(f"-sweep-{self.name}")
            else f"{b.experiment}-sweep-{self.name}",
            "storage": storage.join(self.uri, "runs"),
        })

    def to_dict(self) -> dict:
        return {"name": self.name, "storage": self.storage, "space": self.space.to_dict(),
                "base": self.base.to_dict(), "early_stopping": self.early_stopping,
                "grace_period": self.grace_period, "reduction_factor": self.reduction_factor,
                "compare_across_architectures": self.compare_across_architectures,
                "trial_cpus": self.trial_cpus, "max_concurrent": self.max_concurrent,
                "overrides": dict(self.overrides)}

    @classmethod
    def from_dict(cls, d: dict) -> SweepConfig:
        d = dict(d)
        d["space"] = SearchSpace.from_dict(d["space"])
        d["base"] = TrainConfig.from_dict(d["base"])
        return cls(**d)


def _trial_name(trial) -> str:
    return TrialSpec.from_dict(trial.config["trial"]).name


# ------------------------------------------------------------------ the driver


@dataclass
class SweepOutcome:
    uri: str
    parent_run_id: str
    report: dict
    paths: dict = field(default_factory=dict)  # name -> local Path of report files
    concurrency: int = 0  # trials allowed at once
    resumed: bool = False


def run_sweep(sc: SweepConfig, *, resume: bool = False, report_dir: str | os.PathLike | None = None,
              verbose: bool = False) -> SweepOutcome:
    """Run (or with resume=True, continue) a sweep to the end and write its report.

    Progress: a line per trial from its MLflow run (progress.py, as the zoo job shows its
    models); verbose=True also prints Tune's own trial tables.

    resume=True reloads the settings stored with the sweep (sc only names it: name, storage)
    and restores Tune's experiment: finished trials are kept, unfinished ones restart and their
    Ray Train runs resume from their last checkpoints.
    """
    sweep_file = storage.join(sc.uri, SWEEP_FILE)
    sc = settings_for(sc, resume=resume)
    base = sc.prepared_base()
    trials = sc.space.trials()
    if not ray.is_initialized():
        ray.init()
    root_path, fs = ray_storage(sc.storage)
    exp_path = f"{root_path.rstrip('/')}/{sc.name}"
    parent = _parent_run(sc, base)
    register_mse_parents(sc)
    held_out = storage.join(sc.uri, HELD_OUT_FILE)
    if not storage.exists(held_out):
        save_held_out(base, held_out)
    n = concurrency_for(base, ray.cluster_resources(), extra_cpus=sc.trial_cpus, requested=sc.max_concurrent)
    trainable = tune.with_resources(sweep_trial, {"CPU": sc.trial_cpus})
    restored = resume and tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if restored:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        # stored resolved (absolute data path, MLflow URI), so a resume needs only the name
        storage.write_bytes(sweep_file, json.dumps(replace(sc, base=base).to_dict(), indent=2).encode())
        if sc.early_stopping:
            scheduler = PerLambdaASHA(
                max_t=base.max_steps, grace_period=sc.grace_period or base.checkpoint_every,
                reduction_factor=sc.reduction_factor, compare_across_architectures=sc.compare_across_architectures)
        else:
            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.to_dict() for t in trials]), "base": base.to_dict(),
                         "sweep": {"name": sc.name, "parent_run_id": parent, "held_out": held_out}},
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=n, reuse_actors=False,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=sc.name, storage_path=root_path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      verbose=1 if verbose else 0),
        )
    print(f"[tune_sweep] {sc.name}: {len(trials)} trial(s), up to {n} at once "
          f"({cpus_per_run(base, sc.trial_cpus):g} CPU each); {'resuming' if restored else 'starting'} at {sc.uri}",
          flush=True)
    shown = progress.Display(prefix="[tune_sweep]")
    watchers = [progress.RunWatcher(shown, t.name, tracking_uri=base.tracking_uri, total=base.max_steps,
                                    experiment=base.experiment, run_key=trial_config(base, t).run_name()).start()
                for t in trials]
    try:
        grid = tuner.fit()
    finally:
        for w in watchers:
            w.stop()
    rows = [_row(r, base) for r in grid]
    outcome = finish_report(sc, rows, parent, report_dir=report_dir)
    outcome.concurrency, outcome.resumed = n, restored
    return outcome


# What a parent shares with the sweep's trials besides the --set pairs: where it runs and logs.
_PARENT_SETTINGS = ("data", "tracking_uri", "git_commit", "experiment")


def mse_parents(sc: SweepConfig) -> list[TrainConfig]:
    """The MSE models the sweep's fine-tune trials start from: one per (architecture, quality,
    N, M), from the preset's MSE recipe with the sweep's --set pairs, in the experiment
    train_zoo uses, so train_zoo and later sweeps find (and reuse) them. [] when no trial is
    a fine-tune."""
    children = [sc.base.with_overrides(t.overrides()) for t in sc.space.trials()]
    children = [c for c in children if is_finetune(c)]
    if not children:
        return []
    if sc.base.preset not in RECIPES:
        raise SweepError(f"sweep {sc.name!r}: its trials fine-tune from MSE parents, but the base config "
                         f"names no recipe to train them with (preset={sc.base.preset!r}); give --preset")
    pairs = {k: v for k, v in sc.overrides.items() if k != "metric"}
    common = {k: getattr(sc.base, k) for k in _PARENT_SETTINGS}
    common["storage"] = storage.join(sc.uri, "parents")
    if common["data"] and not storage.is_remote(common["data"]):
        common["data"] = os.path.abspath(common["data"])
    common["tracking_uri"] = resolve_tracking_uri(common["tracking_uri"])
    out, seen = [], set()
    for child in children:
        if parent_key(child) in seen:
            continue
        seen.add(parent_key(child))
        model = {k: getattr(child, k) for k in ("architecture", "quality", "N", "M", "debug_model")}
        out.append(RECIPES[sc.base.preset](metric="mse").with_overrides(common).with_overrides(pairs)
                   .with_overrides(model))
    return out


def register_mse_parents(sc: SweepConfig) -> list[dict]:
    """Train, gate and register the MSE parents that have no champion yet (train_zoo's run_zoo,
    parents reused); a parent that fails stops the sweep before any trial starts (SweepError)."""
    parents = mse_parents(sc)
    if not parents:
        return []
    print(f"[tune_sweep] {sc.name}: {len(parents)} MSE parent(s) for the fine-tune trials: "
          + ", ".join(p.spec().registry_name for p in parents), flush=True)
    n = concurrency_for(parents[0], ray.cluster_resources())
    rows = run_zoo(parents, n, reuse_parents=True)
    bad = [r for r in rows if not r.get("gate")]  # refused by the gate, or failed (failed(rows))
    if bad:
        raise SweepError("the MSE parents of the fine-tune trials could not all be registered: "
                         + "; ".join(f"{r.get('name', r['architecture'])}: {r.get('reason')}" for r in bad)
                         + ". Fix the parent (or register one under that name) and rerun with --resume")
    return rows


def settings_for(sc: SweepConfig, *, resume: bool) -> SweepConfig:
    """The settings a run uses: sc for a new sweep, the stored ones for a resume; refuses to
    start over an existing sweep or to resume a missing one (SweepError)."""
    sweep_file = storage.join(sc.uri, SWEEP_FILE)
    if resume:
        if not storage.exists(sweep_file):
            raise SweepError(f"no sweep {sc.name!r} under {sc.storage} (no {sweep_file}); "
                             "run without --resume to start it")
        return SweepConfig.from_dict(json.loads(storage.read_bytes(sweep_file)))
    if storage.exists(sweep_file):
        raise SweepError(f"sweep {sc.name!r} already exists at {sc.uri}; pass --resume to "
                         "continue it, or choose another --name")
    return sc


def _parent_run(sc: SweepConfig, base: TrainConfig) -> str:
    run_id = find_or_create_run(base.tracking_uri, base.experiment, f"sweep-{sc.name}",
                                {**provenance_tags(), "compresszoo.sweep": sc.name, "git_commit": base.git_commit})
    logger = MlflowLogger(base.tracking_uri, run_id)
    params = {f"base.{k}": v for k, v in base.to_dict().items()}
    params.update({"space": json.dumps(sc.space.to_dict()), "early_stopping": sc.early_stopping,
                   "grace_period": sc.grace_period or base.checkpoint_every, "reduction_factor": sc.reduction_factor,
                   "compare_across_architectures": sc.compare_across_architectures,
                   "num_trials": len(sc.space.trials())})
    logger.log_params(params)
    return run_id


def _row(result, base: TrainConfig) -> dict:
    """One trial's line in the report, from Tune's Result."""
    t = TrialSpec.from_dict(result.config["trial"])
    m = dict(result.metrics or {})
    steps = int(m.get(TIME_ATTR) or 0)
    if result.error is not None:
        status = "error"
    elif m.get("completed"):
        status = "completed"
    else:
        status = "early_stopped" if steps else "not_run"
    row = {"name": t.name, **t.to_dict(), "metric": base.metric, "status": status, "steps": steps,
           "max_steps": base.max_steps, METRIC: m.get(METRIC),
           "started": m.get("trial_started_at"), "ended": m.get("reported_at"), "error": None if result.error is None else str(result.error)[:500]}
    for k in ("payload_bpp", "real_bpp", "estimated_bpp", "psnr", "ms_ssim", "bitrate_gap", "rd_cost", "exact",
              "gate_passed", "gate_reason", "mlflow_run_id"):
        # only a completed trial has an RD point; the others' "psnr" is a training batch's
        row[k] = m.get(k) if status == "completed" else None
    if status == "completed" and not row["exact"]:
        # the stream did not decode to the encoder's latents: no trustworthy RD point
        row["payload_bpp"] = row["rd_cost"] = None
    return row


def concurrency_reached(rows: list[dict]) -> int:
    """Most trials running at the same time, from each trial's start and last report."""
    events = []
    for r in rows:
        if r.get("started") is not None and r.get("ended") is not None:
            events += [(r["started"], 1), (r["ended"], -1)]
    best = cur = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        best = max(best, cur)
    return best


def finish_report(sc: SweepConfig, rows: list[dict], parent_run_id: str, *,
                  report_dir: str | os.PathLike | None = None) -> SweepOutcome:
    """Write the report (local folder, the sweep's storage, the MLflow parent run) and close
    the trial runs that early stopping cut short."""
    base = sc.prepared_base()
    _close_stopped_runs(sc, rows)
    report = build_report(rows, sweep=sc.name, max_steps=base.max_steps)
    report["concurrency_reached"] = concurrency_reached(rows)
    out = Path(report_dir) if report_dir else Path(tempfile.mkdtemp(prefix=f"sweep-{sc.name}-"))
    paths = write_report(report, out, metric=base.metric)
    for p in paths.values():
        storage.write_bytes(storage.join(sc.uri, "report", p.name), p.read_bytes())
    logger = MlflowLogger(base.tracking_uri, parent_run_id)
    logger.log_dict(report, "report.json")
    for p in paths.values():
        if p.suffix == ".png" or p.name.endswith("tuned_zoo.json"):
            logger.client.log_artifact(parent_run_id, str(p))
    metrics = {f"trials_{k}": v for k, v in report["counts"].items()}
    metrics["trial_steps_saved_fraction"] = report["trial_steps"]["saved_fraction"]
    metrics["concurrency_reached"] = report["concurrency_reached"]
    for arch, a in report["architectures"].items():
        if a["bd_vs_zoo_default"].get("bd_rate_percent") is not None:
            metrics[f"bd_rate_percent_{arch}"] = a["bd_vs_zoo_default"]["bd_rate_percent"]
    logger.log_metrics(metrics, 0)
    logger.set_tags({"sweep.uri": sc.uri})
    logger.close()
    print(markdown_summary(report), flush=True)
    return SweepOutcome(sc.uri, parent_run_id, report, paths)


def _close_stopped_runs(sc: SweepConfig, rows: list[dict]) -> None:
    """Tag the runs of early-stopped and failed trials with why and where they stopped, and end
    the ones still marked running (a stopped trial's actor is killed before it can)."""
    tracker = None
    for r in rows:
        if r["status"] not in ("early_stopped", "error"):
            continue
        run = child_run(trial_config(sc.prepared_base(), TrialSpec.from_dict(r)))
        if run is None:
            continue
        r["mlflow_run_id"] = run.info.run_id
        tracker = tracker or client(sc.prepared_base().tracking_uri)
        tracker.set_tag(run.info.run_id, "sweep.status", r["status"])
        tracker.set_tag(run.info.run_id, "sweep.stopped_at_step", str(r["steps"]))
        if run.info.status == "RUNNING":
            tracker.set_terminated(run.info.run_id, status="KILLED" if r["status"] == "early_stopped" else "FAILED")


def trial_states(sc_or_uri) -> dict[str, dict]:
    """{trial name: {"status", "step", "completed"}} as Tune last recorded them: a sweep's
    progress from its storage alone (what a resume will find)."""
    if isinstance(sc_or_uri, SweepConfig):
        root_path, fs = ray_storage(sc_or_uri.storage)
        path = f"{root_path.rstrip('/')}/{sc_or_uri.name}"
    else:
        path, fs = ray_storage(sc_or_uri)
    try:
        analysis = ExperimentAnalysis(path, storage_filesystem=fs)
    except (ValueError, FileNotFoundError, OSError):
        return {}
    return {_trial_name(t): {"status": t.status, "step": (t.last_result or {}).get(TIME_ATTR, 0),
                             "completed": bool((t.last_result or {}).get("completed"))}
            for t in analysis.trials}

