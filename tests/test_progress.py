"""The zoo job's output: progress lines and phases, not Ray's logs (unless --verbose)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from compresszoo import progress
from compresszoo.tracking import MlflowLogger, find_or_create_run

ROOT = Path(__file__).resolve().parents[1]
KEY = "bmshj2018-factorized-mse-q8-N8-M12"


class Clock:
    """A clock the test moves, so rates and throttling are exact."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_output_is_one_line_per_model_every_n_seconds_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    shown = progress.Display(out, live=False, every=30, clock=clock)
    shown.phase(KEY, "training", "600 steps", total=600)
    shown.update(KEY, 100, {"loss": 2.5, "bpp": 0.41, "psnr": 27.123, "images_per_second": 8.0})
    clock.now += 10
    shown.update(KEY, 150, {"loss": 2.0})  # within 30 s of the last line: not printed
    clock.now += 20
    shown.update(KEY, 200, {"loss": 1.5})  # 100 steps in 30 s since the first reading
    clock.now += 1
    shown.update(KEY, 600, {"loss": 1.0})  # the last step is always printed
    shown.phase(KEY, "gate", "compressing 4 held-out image(s)")
    lines = out.getvalue().splitlines()
    assert lines == [
        f"[train_zoo] {KEY}: training: 600 steps",
        f"[train_zoo] {KEY}: training  step 100/600 (17%)  loss 2.5  bpp 0.4100  PSNR 27.12 dB  8.0 img/s  ETA ?",
        f"[train_zoo] {KEY}: training  step 200/600 (33%)  loss 1.5  bpp 0.4100  PSNR 27.12 dB  8.0 img/s  "
        "ETA 2m00s",  # 400 steps left at 100 steps / 30 s
        f"[train_zoo] {KEY}: training  step 600/600 (100%)  loss 1  bpp 0.4100  PSNR 27.12 dB  8.0 img/s  ETA 0s",
        f"[train_zoo] {KEY}: gate: compressing 4 held-out image(s)",
    ]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # a log, not a terminal
    with pytest.raises(ValueError, match="phase 'trainig': use one of sharding, training"):
        shown.phase(KEY, "trainig")


def test_live_output_redraws_the_running_models_in_place(monkeypatch):
    out = io.StringIO()
    shown = progress.Display(out, live=True, clock=Clock())
    shown.phase("a", "training", total=10)
    shown.phase("b", "training", total=20)
    shown.update("a", 1, {"loss": 3.0})
    shown.update("b", 2, {"loss": 4.0})
    text = out.getvalue()
    # each change moves up over the block (a and b, drawn since their phase lines), clears
    # it and draws both again
    assert text.endswith("\x1b[2F\x1b[J\x1b[2K[train_zoo] a: training  step 1/10 (10%)  loss 3  ETA ?\n"
                         "\x1b[2K[train_zoo] b: training  step 2/20 (10%)  loss 4  ETA ?\n")
    shown.phase("a", "done", "registered version 1")  # a permanent line above the block
    assert out.getvalue().endswith("\x1b[2F\x1b[J[train_zoo] a: done: registered version 1\n"
                                   "\x1b[2K[train_zoo] b: training  step 2/20 (10%)  loss 4  ETA ?\n")
    monkeypatch.setenv(progress.EVERY_ENV, "often")
    with pytest.raises(ValueError, match="COMPRESSZOO_PROGRESS_EVERY='often': give seconds"):
        progress.Display(out)


def test_watching_follows_a_real_mlflow_run_by_its_key(tmp_path):
    """What the zoo job and a sweep use: the run is found by its key once fit creates it, and
    each poll shows the step and metrics rank 0 logged last."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = io.StringIO()
    shown = progress.Display(out, live=False, every=0)
    with progress.watching(shown, KEY, tracking_uri=uri, total=40, experiment="compresszoo",
                           run_key="run-1", interval=3600) as watcher:
        watcher.poll()  # no run yet: nothing to show, no error
        logger = MlflowLogger(uri, find_or_create_run(uri, "compresszoo", "run-1"))
        for step in (20, 40):
            logger.log_metrics({"loss": 3.0 - step / 20, "bpp": 0.5, "psnr": 20.0 + step / 10,
                                "images_per_second": 4.0, "lr": 1e-4}, step)
            if step == 20:
                watcher.poll()
    # the last reading comes when the block ends
    assert re.findall(r"step (\d+)/40", out.getvalue()) == ["20", "40"]
    assert "step 40/40 (100%)  loss 1  bpp 0.5000  PSNR 24.00 dB  4.0 img/s  ETA 0s" in out.getvalue()


def _train_zoo(shards: str, work: Path, gcs: str, *extra: str) -> subprocess.Popen:
    """pipelines/train_zoo.py in a fresh process on the test's Ray cluster, its own registry
    under `work`; stdout and stderr are pipes (as under `ray job submit`)."""
    work.mkdir()
    env = {**os.environ, "RAY_ADDRESS": gcs, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
           progress.EVERY_ENV: "0"}
    tiny = {"max_steps": 6, "checkpoint_every": 3, "log_every": 1, "crop": 64, "batch_size": 4,
            "val_images": 2, "gate_images": 2, "shuffle_buffer": 8}
    cmd = [sys.executable, str(ROOT / "pipelines" / "train_zoo.py"), "--archs", "bmshj2018-factorized",
           "--data", shards, "--workdir", str(work), *[a for k, v in tiny.items() for a in ("--set", f"{k}={v}")],
           *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work)


def _output(job: subprocess.Popen) -> str:
    out, _ = job.communicate(timeout=900)
    assert job.returncode == 0, out[-6000:]
    return out


def test_the_zoo_job_prints_progress_and_phases_and_ray_only_with_verbose(ray_session, shards, tmp_path):
    gcs = ray_session.get_runtime_context().gcs_address
    # the same tiny job twice at once (the cluster holds both): as is, and with --verbose
    jobs = _train_zoo(shards, tmp_path / "quiet", gcs), _train_zoo(shards, tmp_path / "verbose", gcs, "--verbose")
    quiet, verbose = (_output(j) for j in jobs)
    for ray_line in ("TrainingReport(", "(TrainController", "(RayTrainWorker", "core_worker.cc"):
        assert ray_line not in quiet, quiet
    assert "\r" not in quiet
    for phase in ("training: 6 steps, 1 worker(s)", "gate: compressing 2 held-out image(s)",
                  "registering: the MLflow Model", "done: registered version 1"):
        assert f"[train_zoo] {KEY}: {phase}" in quiet, quiet
    assert re.search(r"step 6/6 \(100%\)  loss \S+  bpp \S+  PSNR \S+ dB  \S+ img/s", quiet), quiet
    assert "| payload bpp | est. bpp | gap | allowed | gate |" in quiet
    # --verbose: Ray's own lines too, around the same progress
    assert "TrainingReport(" in verbose and f"[train_zoo] {KEY}: done: registered version 1" in verbose
