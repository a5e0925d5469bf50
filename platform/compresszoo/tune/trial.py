"""One sweep trial: train a TrialSpec through compresszoo.train.fit (Tune around Train), then
measure its RD point with the registry gate's own bitrate check, recorded on its MLflow run
so a resumed sweep never trains or measures a finished trial twice.
"""

from __future__ import annotations

import io
import json
import shutil
import time

import ray.tune
import torch
from ray.tune.integration.ray_train import TuneReportCallback

from .. import storage
from ..config import TrainConfig
from ..publish import held_out_images, measure_and_log
from ..tracking import MlflowLogger, find_run
from ..train import fit, resolve_parent
from .report import rd_cost
from .scheduler import METRIC, TIME_ATTR
from .space import TrialSpec

RD_POINT_TAG = "compresszoo.sweep.rd_point"  # on a child run: its measured RD point, written once
RD_METRICS = ("payload_bpp", "real_bpp", "estimated_bpp", "psnr", "ms_ssim", "rd_cost")  # logged as rd_<name>


def sweep_trial(config: dict) -> None:
    """The Tune trainable: train one TrialSpec through the training driver (Tune around Train),
    then measure its real bitrate. Idempotent: a trial whose RD point is already recorded in its
    MLflow run (finished just before an interruption) reports that instead of running again."""
    started = time.time()
    cfg = trial_config(TrainConfig.from_dict(config["base"]), TrialSpec.from_dict(config["trial"]))
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
        metrics = [{**metrics[0], "trial_started_at": self.started, "reported_at": time.time()}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def measure_rd_point(cfg: TrainConfig, checkpoint_dir: str, run_id: str, *, steps: int,
                     val_loss: float, images: list | None = None) -> dict:
    """The registry gate's bitrate check (publish.measure_and_log: real payload bpp, decoded
    PSNR, its report and verdict logged) on held-out images (default: publish.held_out_images),
    then the trial's RD point: its rd_* metrics, and the whole point as a tag on the run,
    which is then closed."""
    _, report = measure_and_log(cfg, checkpoint_dir, run_id, steps=steps, images=images)
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
    logger.log_metrics({f"rd_{k}": point[k] for k in RD_METRICS if point[k] is not None}, steps)
    logger.set_tags({"sweep.status": "completed", RD_POINT_TAG: json.dumps(point)})
    logger.close()
    return point


def save_held_out(cfg: TrainConfig, uri: str) -> None:
    """The gate's held-out images, read once per sweep: every trial is measured on the same
    images, and no trial starts a data pipeline just to fetch them."""
    buf = io.BytesIO()
    torch.save([x.contiguous() for x in held_out_images(cfg)], buf)
    storage.write_bytes(uri, buf.getvalue())


def load_held_out(uri: str) -> list:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), weights_only=True)


def trial_config(base: TrainConfig, trial: TrialSpec) -> TrainConfig:
    """The trial's resolved config with its warm-start parent pinned (NAME:VERSION), as fit()
    pins it: the run's name, and so its MLflow run and recorded point, name that version."""
    cfg, _ = resolve_parent(base.with_overrides(trial.overrides()).resolved())
    return cfg


def child_run(cfg: TrainConfig):
    """The trial's MLflow run (found by its deterministic run key), or None."""
    return find_run(cfg.tracking_uri, cfg.experiment, cfg.run_name())


def recorded_point(cfg: TrainConfig) -> dict | None:
    """The RD point measure_rd_point recorded on the trial's run, or None if it has none."""
    run = child_run(cfg)
    if run is None or RD_POINT_TAG not in run.data.tags:
        return None
    return json.loads(run.data.tags[RD_POINT_TAG])
