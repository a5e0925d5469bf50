"""Ray Tune sweeps: the search space, early stopping per (architecture, lambda), a smoke sweep on
the miniature dataset whose driver is SIGKILLed and resumed, real bitrates, the report and the
tuned-zoo config trained by train_zoo.

The smoke sweep runs once per module (it is the expensive part) and the tests below read it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from compresszoo.tune.report import best_per_lambda, build_report, tuned_zoo_config, write_report
from compresszoo.tune.space import SearchSpace, TrialSpec, parse_channels

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("bmshj2018-factorized", "bmshj2018-hyperprior")
NAME = "smoke-sweep"
MAX_STEPS = 8
# Tiny, and one validation per report (ASHA's rung at step 4 compares fresh validation losses).
TINY = {"crop": 64, "val_crop": 64, "val_images": 2, "gate_images": 2, "gate_min_side": 64, "gate_max_gap": 1.0,
        "batch_size": 4, "max_steps": MAX_STEPS, "checkpoint_every": 4, "log_every": 4,
        "cpus_per_worker": 0.25, "data_cpus": 0.25, "shuffle_buffer": 8}


def _pipeline(name: str):
    spec = importlib.util.spec_from_file_location(f"_{name}", ROOT / "pipelines" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- fast: space, scheduler, report


def test_space_always_includes_the_zoo_channels_and_names_trials_deterministically():
    space = SearchSpace(architectures=("mbt2018", "bmshj2018-factorized"), qualities=(8, 1),
                        channels=parse_channels("192x320,64x96"))
    trials = space.trials()
    assert trials == space.trials()  # deterministic
    by = {(t.architecture, t.quality, t.N, t.M) for t in trials}
    # the zoo's own (N, M) is always there, also when --channels does not name it
    assert ("mbt2018", 1, 192, 192) in by and ("bmshj2018-factorized", 1, 128, 192) in by
    assert ("mbt2018", 8, 192, 320) in by and ("bmshj2018-factorized", 8, 64, 96) in by
    # 192x320 is both architectures' q8 default: listed once there, as the default
    assert len(trials) == 2 * (3 + 2)
    defaults = [t for t in trials if t.zoo_default]
    assert {(t.architecture, t.quality) for t in defaults} == {(a, q) for a in space.architectures for q in (1, 8)}
    assert trials[:len(defaults)] == defaults  # baselines start first
    names = [t.name for t in trials]
    assert len(set(names)) == len(names)
    assert "mbt2018-l0.0018-N192-M192-s0" in names and TrialSpec.from_dict(trials[0].to_dict()) == trials[0]

    ranged = SearchSpace(architectures=("mbt2018-mean",), lambda_range=(0.0018, 0.18), num_lambdas=3)
    assert [round(lam, 4) for _, lam in ranged.lambdas()] == [0.0018, 0.018, 0.18]
    assert [q for q, _ in ranged.lambdas()] == [1, 4, 8]  # nearest zoo quality in log scale
    with pytest.raises(ValueError, match="unknown architecture 'mbt'; known"):
        SearchSpace(architectures=("mbt",), qualities=(1,))
    with pytest.raises(ValueError, match="either qualities"):
        SearchSpace(architectures=("mbt2018",))


def _fake_trial(tid, arch, lmbda, zoo_default):
    return SimpleNamespace(trial_id=tid, last_result={}, config={"trial": {
        "architecture": arch, "lmbda": lmbda, "zoo_default": zoo_default}})


def test_per_lambda_asha_compares_only_comparable_trials_and_never_stops_baselines(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from compresszoo.tune.scheduler import PerLambdaASHA

    STOP, GO = TrialScheduler.STOP, TrialScheduler.CONTINUE
    s = PerLambdaASHA(max_t=8, grace_period=4, reduction_factor=2)
    base = _fake_trial("base", "A", 0.01, True)
    alt = _fake_trial("alt", "A", 0.01, False)
    other_lambda = _fake_trial("lam2", "A", 0.1, False)
    other_arch = _fake_trial("archB", "B", 0.01, False)
    late = _fake_trial("late", "A", 0.01, False)
    for t in (base, alt, other_lambda, other_arch, late):
        s.on_trial_add(None, t)
    assert s.on_trial_result(None, base, {"step": 4, "val_loss": 10.0}) == GO
    assert s.on_trial_result(None, alt, {"step": 4, "val_loss": 20.0}) == STOP  # worse than its baseline
    # a loss at another lambda, or of another architecture, is never held against base's 10.0
    assert s.on_trial_result(None, other_lambda, {"step": 4, "val_loss": 99.0}) == GO
    assert s.on_trial_result(None, other_arch, {"step": 4, "val_loss": 99.0}) == GO
    # a trial at its step budget finishes (its bitrate check must run) even if it is worse
    assert s.on_trial_result(None, late, {"step": 8, "val_loss": 50.0}) == GO
    assert s.stopped == {"alt"}

    worse_base = PerLambdaASHA(max_t=8, grace_period=4)
    b2, a2 = _fake_trial("b", "A", 0.01, True), _fake_trial("a", "A", 0.01, False)
    worse_base.on_trial_add(None, b2)
    worse_base.on_trial_add(None, a2)
    assert worse_base.on_trial_result(None, a2, {"step": 4, "val_loss": 1.0}) == GO
    assert worse_base.on_trial_result(None, b2, {"step": 4, "val_loss": 5.0}) == GO  # baseline: never stopped

    # A restored sweep replays what its trials reported before the interruption (their
    # result.json on storage), so a finished baseline still sets the bar.
    import pyarrow.fs

    restored = PerLambdaASHA(max_t=8, grace_period=4)
    done = _fake_trial("done", "A", 0.01, True)
    done.last_result = {"step": 8, "val_loss": 5.0}
    done.path = str(tmp_path)
    done.storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem())
    (tmp_path / "result.json").write_text('{"step": 4, "val_loss": 10.0}\n{"step": 8, "val_loss": 5.0}\n')
    fresh = _fake_trial("fresh", "A", 0.01, False)
    restored.on_trial_add(None, done)
    restored.on_trial_add(None, fresh)
    assert restored.on_trial_result(None, fresh, {"step": 4, "val_loss": 12.0}) == STOP

    across = PerLambdaASHA(max_t=8, grace_period=4, compare_across_architectures=True)
    b3, x3 = _fake_trial("b", "A", 0.01, True), _fake_trial("x", "B", 0.01, False)
    across.on_trial_add(None, b3)
    across.on_trial_add(None, x3)
    across.on_trial_result(None, b3, {"step": 4, "val_loss": 10.0})
    assert across.on_trial_result(None, x3, {"step": 4, "val_loss": 20.0}) == STOP


def test_concurrency_is_sized_from_the_clusters_resources():
    from compresszoo.config import smoke
    from compresszoo.zoo_jobs import concurrency_for, cpus_per_run

    cfg = smoke(workers=2, cpus_per_worker=0.5, data_cpus=0.25)
    assert cpus_per_run(cfg, 0.25) == 1.5  # 2 workers x 0.5 + a data task + the trial's actor
    assert concurrency_for(cfg, {"CPU": 16.0}, extra_cpus=0.25) == 10
    assert concurrency_for(cfg, {"CPU": 1.0}, extra_cpus=0.25) == 1  # always at least one
    gpu = smoke(workers=2, use_gpu=True, cpus_per_worker=1.0, data_cpus=1.0)
    assert concurrency_for(gpu, {"CPU": 64.0, "GPU": 8.0}, extra_cpus=0.25) == 4  # GPUs bind first


def test_train_zoo_and_sweeps_share_one_gpu_aware_concurrency_rule():
    from compresszoo.config import smoke
    from compresszoo.tune import sweep
    from compresszoo.zoo_jobs import concurrency_for

    # train_zoo's runs have no trial actor: 2 x 1.0 + 1.0 = 3 CPUs each, 21 fit in 64 CPUs...
    gpu = smoke(workers=2, use_gpu=True, cpus_per_worker=1.0, data_cpus=1.0)
    assert concurrency_for(gpu.with_overrides({"use_gpu": False}), {"CPU": 64.0, "GPU": 8.0}) == 21
    # ...but with use_gpu each run's 2 workers hold 2 GPUs: 8 GPUs allow 4 runs, 1 GPU still 1
    assert concurrency_for(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    assert concurrency_for(gpu, {"CPU": 64.0, "GPU": 1.0}) == 1
    assert concurrency_for(gpu, {"CPU": 64.0}) == 1  # no GPU at all: one, which then waits for one
    assert concurrency_for(gpu, {"CPU": 64.0, "GPU": 8.0}, requested=6) == 6  # --concurrency wins
    assert sweep.concurrency_for is concurrency_for  # the sweep sizes its trials by the same rule


def test_a_run_that_cannot_start_is_one_line_on_stderr_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    from compresszoo import storage
    from compresszoo.tune.sweep import SweepError, settings_for
    from compresszoo.zoo_jobs import ZooError, plan

    ray_was_up = ray.is_initialized()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    ts = _pipeline("tune_sweep")
    common = ["--name", "s1", "--storage", str(tmp_path / "sweeps"), "--workdir", str(tmp_path)]
    with pytest.raises(SweepError, match="no sweep 's1'.*run without --resume"):
        settings_for(ts.sweep_config(ts.parse_args([*common, "--resume"])), resume=True)
    assert ts.main([*common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tune_sweep: no sweep 's1'") and err.count("\n") == 1
    storage.write_bytes(storage.join(str(tmp_path / "sweeps"), "s1", "sweep.json"), b"{}")
    assert ts.main(common) == 2
    assert "sweep 's1' already exists" in capsys.readouterr().err
    assert ts.main(["--name", "../up", "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("tune_sweep: sweep name '../up': use letters")

    with pytest.raises(ZooError, match="unknown architecture 'nope'; valid: bmshj2018-factorized"):
        plan("smoke", archs="nope", commit="")
    assert _pipeline("train_zoo").main(["--archs", "nope", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_zoo: unknown architecture 'nope'") and err.count("\n") == 1
    assert ray.is_initialized() == ray_was_up  # refused before starting (or joining) a cluster


def _row(arch, lmbda, q, n, m, bpp, psnr, *, zoo_default, status="completed", steps=8):
    from compresszoo.tune.report import rd_cost

    r = {"name": f"{arch}-l{lmbda:g}-N{n}-M{m}-s0", "architecture": arch, "quality": q, "lmbda": lmbda,
         "N": n, "M": m, "seed": 0, "zoo_default": zoo_default, "metric": "mse", "status": status,
         "steps": steps, "payload_bpp": bpp, "psnr": psnr, "val_loss": 1.0}
    r["rd_cost"] = rd_cost(r) if status == "completed" else None
    return r


def test_report_bd_rate_pareto_and_config_from_trial_rows(tmp_path):
    arch = "bmshj2018-hyperprior"
    rows = [  # the tuned (192, 320) needs 20% fewer bits at the same PSNR at every lambda
        _row(arch, 0.0018, 1, 128, 192, 0.20, 28.0, zoo_default=True),
        _row(arch, 0.0130, 4, 128, 192, 0.50, 32.0, zoo_default=True),
        _row(arch, 0.1800, 8, 192, 320, 1.20, 37.0, zoo_default=True),
        _row(arch, 0.0018, 1, 192, 320, 0.16, 28.0, zoo_default=False),
        _row(arch, 0.0130, 4, 192, 320, 0.40, 32.0, zoo_default=False),
        _row(arch, 0.1800, 8, 128, 192, 0.96, 37.0, zoo_default=False),
        _row(arch, 0.0130, 4, 64, 96, None, None, zoo_default=False, status="early_stopped", steps=4),
    ]
    report = build_report(rows, sweep="unit", max_steps=8)
    a = report["architectures"][arch]
    best = best_per_lambda(rows)
    assert [(b["N"], b["M"]) for b in report["best"]] == [(192, 320), (192, 320), (128, 192)]
    assert not any(b["zoo_default"] for b in best.values()) and len(a["changed"]) == 3
    assert a["bd_vs_zoo_default"]["bd_rate_percent"] == pytest.approx(-20.0, abs=1.0)
    assert report["counts"] == {"total": 7, "completed": 6, "early_stopped": 1}
    assert report["trial_steps"] == {"run": 52, "full_budget": 56, "saved_fraction": pytest.approx(4 / 56)}
    front = {p["name"] for p in report["pareto_front"]}
    assert f"{arch}-l0.0018-N128-M192-s0" not in front and f"{arch}-l0.0018-N192-M320-s0" in front
    paths = write_report(report, tmp_path)
    assert {p.name for p in paths.values()} == {"report.json", "tuned_zoo.json", f"rd_{arch}.png", "pareto.png"}
    entries = json.loads(paths["config"].read_text())["models"]
    assert entries == [{"architecture": arch, "quality": q, "N": n, "M": m, "lmbda": lam, "seed": 0}
                       for q, lam, n, m in ((1, 0.0018, 192, 320), (4, 0.013, 192, 320), (8, 0.18, 128, 192))]
    # two lambdas on one quality: the one nearest the zoo's lambda for it is kept
    dup = {"best": [dict(report["best"][0]), dict(report["best"][0], lmbda=0.0025, N=8)]}
    kept, left = tuned_zoo_config(dup)
    assert [e["lmbda"] for e in kept] == [0.0018] and left[0]["lmbda"] == 0.0025


# ---------------------------------------------------------------- the smoke sweep (killed, resumed)


@pytest.fixture(scope="module")
def sweep(shards, ray_session, tmp_path_factory):
    """A 2 arch x 1 lambda x 2 (N, M) sweep whose driver process is SIGKILLed once a trial has
    finished, then resumed with --resume in this process."""
    from compresszoo.tune.sweep import trial_states

    work = tmp_path_factory.mktemp("sweep")
    tracking = f"sqlite:///{work}/mlflow.db"
    common = ["--name", NAME, "--storage", str(work / "sweeps"), "--workdir", str(work), "--out", str(work / "report")]
    argv = ["--preset", "smoke", "--archs", ",".join(ARCHS), "--qualities", "8", "--channels", "4x8",
            "--data", shards, *common, *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "MLFLOW_TRACKING_URI": tracking, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log = open(work / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipelines" / "tune_sweep.py"), *argv], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    exp = str(work / "sweeps" / NAME)
    # A bound against a hung driver only (the driver's own exit is caught at once): far above
    # the few minutes a trial takes here, so a loaded machine does not fail the test.
    deadline, done = time.monotonic() + 1800, set()
    while not done:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the sweep driver ended (rc={proc.returncode}) before any trial finished:\n"
                        + (work / "driver.log").read_text()[-4000:])
        time.sleep(1.0)
        done = {n for n, s in trial_states(exp).items() if s["status"] == "TERMINATED" and s["completed"]}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    log.close()
    recorded = trial_states(exp)  # what the resume finds

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    try:
        t0 = time.time()
        rc = _pipeline("tune_sweep").main([*common, "--resume"])
        resume_seconds = time.time() - t0
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    report = json.loads((work / "report" / "report.json").read_text())
    return SimpleNamespace(work=work, tracking=tracking, done=done, recorded=recorded, killed_at=killed_at, rc=rc,
                           report=report, rows={r["name"]: r for r in report["trials"]},
                           resume_seconds=resume_seconds)


def _client(tracking):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking)


def _runs(sweep):
    client = _client(sweep.tracking)
    exp = client.get_experiment_by_name(f"compresszoo-sweep-{NAME}")
    return client, client.search_runs([exp.experiment_id], max_results=100)


def test_killed_sweep_resumes_without_rerunning_finished_trials(sweep):
    assert sweep.rc == 0
    assert 1 <= len(sweep.done) < 4, "the kill should land after some, not all, trials finished"
    assert sweep.report["counts"]["total"] == 4
    for name in sweep.done:
        row = sweep.rows[name]
        assert row["status"] == "completed"
        # Its last result predates the kill: the resumed sweep did not run it again.
        assert row["ended"] < sweep.killed_at, name
    # The trials left unfinished did run after the resume.
    assert any(r["ended"] > sweep.killed_at for r in sweep.rows.values())

    client, runs = _runs(sweep)
    parents = [r for r in runs if r.data.tags.get("compresszoo.sweep") == NAME]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, "one parent run per sweep, also across the resume"
    assert len(children) == 4 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    completed = {r["mlflow_run_id"] for r in sweep.rows.values() if r["status"] == "completed"}
    for run_id in completed:
        # measured exactly once: no finished trial was trained or measured a second time
        assert len(client.get_metric_history(run_id, "rd_payload_bpp")) == 1


def test_smoke_sweep_stops_some_trials_early_and_completes_the_baselines(sweep):
    rows = list(sweep.rows.values())
    grid = {(r["architecture"], r["lmbda"], (r["N"], r["M"])) for r in rows}
    assert grid == {(a, lam, c) for a in ARCHS for lam in (0.18,) for c in ((8, 12), (4, 8))}
    stopped = [r for r in rows if r["status"] == "early_stopped"]
    assert stopped and all(r["steps"] < MAX_STEPS for r in stopped)
    assert all(r["status"] == "completed" and r["steps"] == MAX_STEPS for r in rows if r["zoo_default"])
    assert sweep.report["trial_steps"]["run"] < 4 * MAX_STEPS
    client, runs = _runs(sweep)
    by_id = {r.info.run_id: r for r in runs}
    for r in stopped:
        run = by_id[r["mlflow_run_id"]]
        assert run.info.status == "KILLED" and run.data.tags["sweep.status"] == "early_stopped"


def test_every_completed_trial_has_a_real_coded_bitrate(sweep, tmp_path):
    client = _client(sweep.tracking)
    completed = [r for r in sweep.rows.values() if r["status"] == "completed"]
    assert completed
    for r in completed:
        assert r["exact"] is True and r["payload_bpp"] > 0 and math.isfinite(r["psnr"])
        path = client.download_artifacts(r["mlflow_run_id"], "bitrate_report.json", str(tmp_path))
        coded = json.loads(Path(path).read_text())
        assert len(coded["images"]) == 2 and all(i["exact"] for i in coded["images"])
        assert coded["overall"]["payload_bpp"] == pytest.approx(r["payload_bpp"])
        # payload bits are counted from the coder's streams, not the entropy model's estimate
        assert all(i["payload_bpp"] > 0 and "estimated_bpp" in i for i in coded["images"])


def test_report_plots_and_config_are_written_and_logged(sweep):
    report, out = sweep.report, sweep.work / "report"
    plots = {f"rd_{a}.png" for a in ARCHS} | {"pareto.png"}
    for name in plots | {"report.json", "tuned_zoo.json"}:
        assert (out / name).stat().st_size > 0
        assert (sweep.work / "sweeps" / NAME / "report" / name).exists()  # next to the sweep on storage
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    client, runs = _runs(sweep)
    parent = next(r for r in runs if r.data.tags.get("compresszoo.sweep") == NAME)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert plots | {"report.json", "tuned_zoo.json"} <= logged
    assert set(report["architectures"]) == set(ARCHS)
    for a in report["architectures"].values():
        bd = a["bd_vs_zoo_default"]  # a number, or why not (smoke models make crooked curves)
        assert (bd["bd_rate_percent"] is None) == (bd["error"] is not None)
    points = [r for r in report["trials"] if r["status"] == "completed"]
    for p in report["pareto_front"]:  # no trial beats a front point on both rate and PSNR
        assert not any(q["payload_bpp"] <= p["payload_bpp"] and q["psnr"] > p["psnr"] for q in points)
    entries = json.loads((out / "tuned_zoo.json").read_text())["models"]
    best = best_per_lambda(report["trials"])
    assert len(entries) == 2
    for e in entries:
        b = best[(e["architecture"], e["lmbda"])]
        assert (e["N"], e["M"], e["quality"]) == (b["N"], b["M"], b["quality"])


def test_tuned_config_trains_with_train_zoo(sweep, shards, tmp_path):
    from compresszoo import zoo_jobs

    tiny = {**TINY, "max_steps": 2, "checkpoint_every": 2, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    tz = _pipeline("train_zoo")
    args = tz.parse_args(["--preset", "smoke", "--config", str(sweep.work / "report" / "tuned_zoo.json"),
                          "--data", shards, "--storage", str(tmp_path / "runs"),
                          *[a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]])
    configs = tz.plan(args)  # the flags -> zoo_jobs.plan
    entries = json.loads((sweep.work / "report" / "tuned_zoo.json").read_text())["models"]
    assert [(c.architecture, c.quality, c.N, c.M, c.lmbda) for c in configs] == \
        [(e["architecture"], e["quality"], e["N"], e["M"], e["lmbda"]) for e in entries]
    row = zoo_jobs.run_one(configs[0])
    assert row["steps"] == 2 and row["real_bpp"] > 0 and (row["N"], row["M"]) == (configs[0].N, configs[0].M)
