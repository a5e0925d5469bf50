"""Ray Tune around the training driver: each trial is one compresszoo.train.fit() of a TrialSpec,
early-stopped against its own (architecture, lambda) group, bitrate-checked when it completes.

Layout under the sweep's deterministic path <storage>/<name>: Tune's experiment state (what
--resume restores), sweep.json (the settings a resume reuses), runs/ (each trial's Ray Train
run, resumed by name) and report/. MLflow: one parent run per sweep, a child run per trial.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from ..config import TrainConfig
from ..tracking import resolve_tracking_uri
from .space import SearchSpace, TrialSpec

SWEEP_FILE, HELD_OUT_FILE = "sweep.json", "held_out.pt"
RD_POINT_TAG = "compresszoo.sweep.rd_point"  # on a child run: its measured RD point, written once
TIME_ATTR, METRIC = "step", "val_loss"


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

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name or ""):
            raise ValueError(f"sweep name {self.name!r}: use letters, digits, '.', '_' and '-' "
                             "(it names the sweep's folder and MLflow runs), e.g. --name hyperprior-q1-8")
        if self.reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {self.reduction_factor}")

    @property
    def uri(self) -> str:
        from .. import storage

        return storage.join(self.storage, self.name)

    def prepared_base(self) -> TrainConfig:
        """The base config every trial shares, made location-independent (trial actors run in
        their own folders) and with a validation at every report, so ASHA compares fresh
        validation losses."""
        from .. import storage

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

    def train_config(self, trial: TrialSpec) -> TrainConfig:
        return self.prepared_base().with_overrides(trial.overrides())

    def to_dict(self) -> dict:
        return {"name": self.name, "storage": self.storage, "space": self.space.to_dict(),
                "base": self.base.to_dict(), "early_stopping": self.early_stopping,
                "grace_period": self.grace_period, "reduction_factor": self.reduction_factor,
                "compare_across_architectures": self.compare_across_architectures,
                "trial_cpus": self.trial_cpus, "max_concurrent": self.max_concurrent}

    @classmethod
    def from_dict(cls, d: dict) -> SweepConfig:
        d = dict(d)
        d["space"] = SearchSpace.from_dict(d["space"])
        d["base"] = TrainConfig.from_dict(d["base"])
        return cls(**d)


# ------------------------------------------------------------------ resources


def cpus_per_trial(cfg: TrainConfig, trial_cpus: float) -> float:
    """What one running trial holds: its Train workers, a Ray Data read task, its own actor."""
    return cfg.workers * cfg.cpus_per_worker + cfg.data_cpus + trial_cpus


def concurrency_for(cfg: TrainConfig, trial_cpus: float, resources: dict) -> int:
    """Trials at once so that every trial's workers and data tasks fit the cluster together
    (more would leave Ray Data tasks waiting on CPUs the other trials' workers hold)."""
    n = int(math.floor(resources.get("CPU", 1.0) / cpus_per_trial(cfg, trial_cpus) + 1e-9))
    if cfg.use_gpu:
        n = min(n, int(resources.get("GPU", 0) // cfg.workers))
    return max(1, n)


# ------------------------------------------------------------------ early stopping


class PerLambdaASHA(FIFOScheduler):
    """ASHA within groups of trials whose losses are comparable: same lambda (the loss is
    lambda * 255^2 * MSE + bpp, so losses at different lambdas say nothing about each other)
    and, unless compare_across_architectures, the same architecture, since the question a
    sweep answers is each architecture's best (N, M) per lambda.

    One AsyncHyperBandScheduler per group, dispatched by the trial's config; time is the
    training step. Two kinds of trial are never stopped: the zoo-default (N, M) trials (the
    baseline of the report's BD-rate; they still set the rung cutoffs) and a trial at its step
    budget (it is about to finish by itself and must reach its bitrate check).
    On a restored sweep, the trials recorded before the interruption are replayed into their
    groups from their result logs, so the rungs hold what they held before.
    Trials start in the space's order (FIFO): baselines first.
    """

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: float = 2.0,
                 compare_across_architectures: bool = False, metric: str = METRIC, mode: str = "min",
                 time_attr: str = TIME_ATTR):
        super().__init__()
        self._args = dict(time_attr=time_attr, metric=metric, mode=mode, max_t=max_t,
                          grace_period=min(grace_period, max_t), reduction_factor=reduction_factor,
                          stop_last_trials=False)
        self._metric = metric
        self._across = compare_across_architectures
        self._groups: dict[tuple, AsyncHyperBandScheduler] = {}
        self._group_of: dict[str, tuple] = {}
        self.stopped: set[str] = set()

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # metric and mode are fixed here; the sweep's TuneConfig sets none

    def group_key(self, config: dict) -> tuple:
        t = config["trial"]
        return (float(t["lmbda"]),) if self._across else (float(t["lmbda"]), t["architecture"])

    def _asha(self, trial) -> AsyncHyperBandScheduler | None:
        return self._groups.get(self._group_of.get(trial.trial_id))

    def on_trial_add(self, tune_controller, trial):
        key = self.group_key(trial.config)
        asha = self._groups.setdefault(key, AsyncHyperBandScheduler(**self._args))
        self._group_of[trial.trial_id] = key
        asha.on_trial_add(tune_controller, trial)
        if trial.last_result:  # restored from an interrupted sweep
            for result in _past_results(trial):
                asha.on_trial_result(tune_controller, trial, result)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = self._asha(trial).on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            if trial.config["trial"].get("zoo_default") or result.get(TIME_ATTR, 0) >= self._args["max_t"]:
                return TrialScheduler.CONTINUE
            self.stopped.add(trial.trial_id)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict):
        asha = self._asha(trial)
        if asha is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        asha = self._asha(trial)
        if asha is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"PerLambdaASHA: {len(self._groups)} group(s), {len(self.stopped)} trial(s) stopped early"


def _past_results(trial) -> list[dict]:
    """A restored trial's reported results, oldest first (its result.json on storage)."""
    results = []
    try:
        fs = trial.storage.storage_filesystem
        with fs.open_input_stream(f"{trial.path}/result.json") as f:
            for line in f.read().decode().splitlines():
                if line.strip():
                    results.append(json.loads(line))
    except (OSError, ValueError, RuntimeError):
        pass
    return [r for r in results if TIME_ATTR in r and METRIC in r] or [trial.last_result]


# ------------------------------------------------------------------ one trial


def sweep_trial(config: dict) -> None:
    """The Tune trainable: train one TrialSpec through the training driver (Tune around Train),
    then measure its real bitrate. Idempotent: a trial whose RD point is already recorded in its
    MLflow run (finished just before an interruption) reports that instead of running again."""
    import time

    import ray.tune

    from ..train import fit

    started = time.time()
    trial = TrialSpec.from_dict(config["trial"])
    cfg = TrainConfig.from_dict(config["base"]).with_overrides(trial.overrides()).resolved()
    point = recorded_point(cfg)
    if point is None:
        result = fit(cfg, callbacks=[_TimedReportCallback(started)], storage=cfg.storage,
                     mlflow_parent_run_id=config["sweep"]["parent_run_id"])
        try:
            point = measure_rd_point(cfg, result.checkpoint_dir, result.mlflow_run_id, steps=result.steps,
                                     val_loss=result.val_loss, images=load_held_out(config["sweep"]["held_out"]))
        finally:
            shutil.rmtree(result.checkpoint_dir, ignore_errors=True)
    ray.tune.report({**point, "trial_started_at": started, "reported_at": time.time()})


class _TimedReportCallback(TuneReportCallback):
    """Ray Train's TuneReportCallback (rank 0's metrics of every train.report go to Tune), plus
    the wall-clock times the report's concurrency count needs."""

    def __init__(self, started: float):
        super().__init__()
        self.started = started

    def after_report(self, run_context, metrics, checkpoint):
        import time

        metrics = [{**metrics[0], "trial_started_at": self.started, "reported_at": time.time()}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def measure_rd_point(cfg: TrainConfig, checkpoint_dir: str, run_id: str, *, steps: int,
                     val_loss: float, images: list | None = None) -> dict:
    """The codec's bitrate validation on held-out images (default: publish.held_out_images),
    the same check the registry gate runs: real payload bpp and decoded PSNR."""
    from ..codec.gate import GateThresholds, validate_bitrate
    from ..models.io import load_weights
    from ..publish import WEIGHTS_FILE, held_out_images
    from ..tracking import MlflowLogger
    from .report import rd_cost

    model = load_weights(Path(checkpoint_dir) / WEIGHTS_FILE)
    model.update(force=True)
    thresholds = GateThresholds(max_relative_gap=cfg.gate_max_gap, min_side=cfg.gate_min_side)
    report = validate_bitrate(model, images if images is not None else held_out_images(cfg), thresholds)
    o = report["overall"]
    point = {
        TIME_ATTR: steps, METRIC: val_loss, "completed": 1, "exact": bool(o["all_exact"]),
        "payload_bpp": o["payload_bpp"], "real_bpp": o["real_bpp"], "estimated_bpp": o["estimated_bpp"],
        "psnr": o["psnr"], "ms_ssim": o["ms_ssim"], "bitrate_gap": o["relative_gap"],
        "gate_images": o["num_images"], "gate_passed": bool(report["passed"]), "gate_reason": report["reason"],
        "mlflow_run_id": run_id,
    }
    point["rd_cost"] = rd_cost({**point, "lmbda": cfg.lmbda, "metric": cfg.metric})
    logger = MlflowLogger(cfg.tracking_uri, run_id)
    logger.log_dict(report, "bitrate_report.json")
    logger.log_metrics({f"rd_{k}": v for k, v in point.items()
                        if k in ("payload_bpp", "real_bpp", "estimated_bpp", "psnr", "ms_ssim", "rd_cost")
                        and v is not None}, steps)
    logger.set_tags({"sweep.status": "completed", "gate.passed": report["passed"], "gate.reason": report["reason"],
                     RD_POINT_TAG: json.dumps(point)})
    logger.close()
    return point


def save_held_out(cfg: TrainConfig, uri: str) -> None:
    """The gate's held-out images, read once per sweep: every trial is measured on the same
    images, and no trial starts a data pipeline just to fetch them."""
    import io

    import torch

    from .. import storage
    from ..publish import held_out_images

    buf = io.BytesIO()
    torch.save([x.contiguous() for x in held_out_images(cfg)], buf)
    storage.write_bytes(uri, buf.getvalue())


def load_held_out(uri: str) -> list:
    import io

    import torch

    from .. import storage

    return torch.load(io.BytesIO(storage.read_bytes(uri)), weights_only=True)


def _child_run(cfg: TrainConfig):
    """The trial's MLflow run (found by its deterministic run key), or None."""
    from mlflow.tracking import MlflowClient

    from ..tracking import RUN_KEY_TAG

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{cfg.run_name()}'",
                              max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def recorded_point(cfg: TrainConfig) -> dict | None:
    run = _child_run(cfg)
    if run is None or RD_POINT_TAG not in run.data.tags:
        return None
    return json.loads(run.data.tags[RD_POINT_TAG])


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


def run_sweep(sc: SweepConfig, *, resume: bool = False, report_dir: str | os.PathLike | None = None) -> SweepOutcome:
    """Run (or with resume=True, continue) a sweep to the end and write its report.

    resume=True reloads the settings stored with the sweep (sc only names it: name, storage)
    and restores Tune's experiment: finished trials are kept, unfinished ones restart and their
    Ray Train runs resume from their last checkpoints.
    """
    import ray
    from ray import tune

    from .. import storage
    from ..storage import ray_storage as storage_for

    sweep_file = storage.join(sc.uri, SWEEP_FILE)
    sc = settings_for(sc, resume=resume)
    base = sc.prepared_base()
    trials = sc.space.trials()
    if not ray.is_initialized():
        ray.init()
    root_path, fs = storage_for(sc.storage)
    exp_path = f"{root_path.rstrip('/')}/{sc.name}"
    parent = _parent_run(sc, base)
    held_out = storage.join(sc.uri, HELD_OUT_FILE)
    if not storage.exists(held_out):
        save_held_out(base, held_out)
    n = sc.max_concurrent or concurrency_for(base, sc.trial_cpus, ray.cluster_resources())
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
                                      failure_config=tune.FailureConfig(max_failures=1), verbose=1),
        )
    print(f"[tune_sweep] {sc.name}: {len(trials)} trial(s), up to {n} at once "
          f"({cpus_per_trial(base, sc.trial_cpus):g} CPU each); {'resuming' if restored else 'starting'} at {sc.uri}",
          flush=True)
    grid = tuner.fit()
    rows = [_row(r, base) for r in grid]
    outcome = finish_report(sc, rows, parent, report_dir=report_dir)
    outcome.concurrency, outcome.resumed = n, restored
    return outcome


def settings_for(sc: SweepConfig, *, resume: bool) -> SweepConfig:
    """The settings a run uses: sc for a new sweep, the stored ones for a resume; refuses to
    start over an existing sweep or to resume a missing one."""
    from .. import storage

    sweep_file = storage.join(sc.uri, SWEEP_FILE)
    if resume:
        if not storage.exists(sweep_file):
            raise SystemExit(f"tune_sweep: no sweep {sc.name!r} under {sc.storage} (no {sweep_file}); "
                             "run without --resume to start it")
        return SweepConfig.from_dict(json.loads(storage.read_bytes(sweep_file)))
    if storage.exists(sweep_file):
        raise SystemExit(f"tune_sweep: sweep {sc.name!r} already exists at {sc.uri}; pass --resume to "
                         "continue it, or choose another --name")
    return sc


def _parent_run(sc: SweepConfig, base: TrainConfig) -> str:
    from ..tracking import MlflowLogger, find_or_create_run, provenance_tags

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
    from .. import storage
    from ..tracking import MlflowLogger
    from .report import build_report, markdown_summary, write_report

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
    from mlflow.tracking import MlflowClient

    client = None
    for r in rows:
        if r["status"] not in ("early_stopped", "error"):
            continue
        run = _child_run(sc.train_config(TrialSpec.from_dict(r)).resolved())
        if run is None:
            continue
        r["mlflow_run_id"] = run.info.run_id
        client = client or MlflowClient(tracking_uri=sc.prepared_base().tracking_uri)
        client.set_tag(run.info.run_id, "sweep.status", r["status"])
        client.set_tag(run.info.run_id, "sweep.stopped_at_step", str(r["steps"]))
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED" if r["status"] == "early_stopped" else "FAILED")


def trial_states(sc_or_uri) -> dict[str, dict]:
    """{trial name: {"status", "step", "completed"}} as Tune last recorded them: a sweep's
    progress from its storage alone (what a resume will find)."""
    from ray.tune import ExperimentAnalysis

    from ..storage import ray_storage as storage_for

    if isinstance(sc_or_uri, SweepConfig):
        root_path, fs = storage_for(sc_or_uri.storage)
        path = f"{root_path.rstrip('/')}/{sc_or_uri.name}"
    else:
        path, fs = storage_for(sc_or_uri)
    try:
        analysis = ExperimentAnalysis(path, storage_filesystem=fs)
    except (ValueError, FileNotFoundError, OSError):
        return {}
    return {_trial_name(t): {"status": t.status, "step": (t.last_result or {}).get(TIME_ATTR, 0),
                             "completed": bool((t.last_result or {}).get("completed"))}
            for t in analysis.trials}

