"""End to end on the local cluster: shard the miniature into the bucket, `ray job submit` the zoo
trainer, load the registered model pretrained in a fresh process with only the env file, bring it
all down. Plus a two-node Ray cluster on this machine training with workers on both nodes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from photos import kill_matching as _kill_matching

ROOT = Path(__file__).resolve().parents[1]
UP, DOWN = ROOT / "cluster" / "up.sh", ROOT / "cluster" / "down.sh"
BIN = Path(sys.executable).parent
ARCH, QUALITY = "bmshj2018-factorized", 8
REGISTRY_NAME = "bmshj2018-factorized-mse-q8-N8-M12"  # the smoke recipe's debug flavor
STEPS = 30  # checkpoints (and validations) at 15 and 30

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the local cluster scripts target Linux")


def _read_env_file(path: Path) -> dict:
    """The variables the env file exports (what `source .cluster/env.sh` sets)."""
    env = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


def _bare_env(home: Path, extra: dict | None = None) -> dict:
    """PATH, HOME (empty: no ~/.ray token, no model cache) and what the checkout needs to import
    compresszoo; nothing from this test process's Ray, S3 or MLflow settings."""
    env = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    if os.environ.get("PYTHONPATH"):  # set by conftest when compresszoo is not installed
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env.update(extra or {})
    return env


def _run(cmd, env: dict, timeout: float = 300, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(cluster_local):
    """One cluster for the module. `down` and its checks run when the last test using it is
    done, whatever order the tests ran in (a failed check reports as an error there)."""
    # A short folder: Ray's unix socket paths live under it (107-byte limit).
    state_dir = Path(tempfile.mkdtemp(prefix="czc-e2e-"))
    home = state_dir / "home"
    home.mkdir()
    t0 = time.monotonic()
    r = _run([str(UP), "--state-dir", str(state_dir), "--num-cpus", "2",
              "--object-store-memory", str(200 * 1024 * 1024)], _bare_env(home), timeout=400)
    state_file = state_dir / "state.json"
    try:
        assert r.returncode == 0, f"up failed:\n{r.stdout}\n{r.stderr}"
        env = _read_env_file(state_dir / "env.sh")
        c = {"dir": state_dir, "home": home, "env": env, "client_env": _bare_env(home, env),
             "state": json.loads(state_file.read_text()), "bucket": env["COMPRESSZOO_BUCKET"],
             "up_s": time.monotonic() - t0}
        yield c
        _down_leaves_nothing_behind(c, cluster_local)
    finally:
        _run([str(DOWN), "--state-dir", str(state_dir)], _bare_env(home))
        shutil.rmtree(state_dir, ignore_errors=True)


def _s3(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _job_status(sid: str, env: dict) -> str:
    """`ray job status` as one word (the CLI words terminal states as sentences)."""
    r = _run(["ray", "job", "status", sid], env, timeout=60)
    text = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
    for status, words in (("SUCCEEDED", "succeeded"), ("FAILED", "failed"), ("STOPPED", "was stopped")):
        if f"Job '{sid}' {words}" in text:
            return status
    m = re.search(rf"Status for job '{sid}': (\w+)", text)
    return m[1] if m else ""


@pytest.fixture(scope="module")
def job(cluster):
    """Shard the miniature into the bucket, submit train_zoo.py, wait for a terminal status."""
    env, bucket = cluster["client_env"], cluster["bucket"]
    data, runs = f"s3://{bucket}/vimeo-mini", f"s3://{bucket}/runs"
    work = cluster["dir"] / "work"
    t0 = time.monotonic()
    # The user's command from cluster/README.md: the driver joins the cluster (RAY_ADDRESS) and
    # its tasks write the shards into the bucket.
    prep = _run([sys.executable, "pipelines/prepare_vimeo90k.py", "--make-miniature", str(work / "mini"),
                 "--dst", data, "--row-group-mb", "1", "--quiet"], env, timeout=300)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert "vimeo-mini/_manifest.json" in _keys(_s3(env), bucket, "vimeo-mini/")

    t_shard = time.monotonic()
    sid = f"czc-e2e-{uuid.uuid4().hex[:8]}"
    half = STEPS // 2
    train = ["python", "pipelines/train_zoo.py", "--preset", "smoke", "--archs", ARCH, "--qualities", str(QUALITY),
             "--data", data, "--storage", runs, "--workdir", str(work / "job"), "--set", f"max_steps={STEPS}",
             "--set", f"val_every={half}", "--set", f"checkpoint_every={half}", "--set", "log_every=5"]
    # Blocking submit: one client process that follows the logs and exits 1 if the job fails
    # (polling `ray job status` would start a Ray CLI every few seconds on a 2-core machine).
    try:
        sub = _run(["ray", "job", "submit", "--submission-id", sid, "--working-dir", str(ROOT), "--", *train],
                   env, timeout=480)
        submit_out, submit_rc = sub.stdout + sub.stderr, sub.returncode
    except subprocess.TimeoutExpired as e:
        submit_out, submit_rc = _text(e.stdout) + _text(e.stderr), None
    t_job = time.monotonic()
    status = _job_status(sid, env)
    logs = _run(["ray", "job", "logs", sid], env, timeout=60)
    listing = _run(["ray", "job", "list"], env, timeout=60)  # entrypoints and runtime envs
    summary = work / "job" / "train_zoo_summary.json"
    print(f"[e2e] up {cluster['up_s']:.0f}s, shard {t_shard - t0:.0f}s, job {t_job - t_shard:.0f}s")
    return {"id": sid, "status": status, "submit_rc": submit_rc, "logs": logs.stdout + logs.stderr,
            "submit": submit_out, "list": listing.stdout + listing.stderr,
            "rows": json.loads(summary.read_text()) if summary.exists() else None}


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def test_job_trains_and_checkpoints_to_s3(cluster, job):
    assert job["status"] == "SUCCEEDED" and job["submit_rc"] == 0, \
        f"job {job['id']}: {job['status'] or 'no terminal status'} (submit exit {job['submit_rc']})\n" \
        f"{job['logs'][-6000:]}"
    [row] = job["rows"]
    assert row["gate"] is True and row["version"] == "1", row
    assert row["name"] == REGISTRY_NAME and row["steps"] == STEPS
    assert f"{REGISTRY_NAME}: done: registered version 1" in job["logs"]  # the progress display's phase

    s3, bucket = _s3(cluster["env"]), cluster["bucket"]
    keys = _keys(s3, bucket, "runs/")
    weights = sorted(k for k in keys if "/checkpoint_" in k and k.endswith("/model.safetensors"))
    assert len(weights) == 2, keys  # checkpoint_every=STEPS//2, num_to_keep=2
    steps = sorted(json.loads(s3.get_object(Bucket=bucket, Key=k.rsplit("/", 1)[0] + "/state.json")["Body"].read())
                   ["step"] for k in weights)
    assert steps == [STEPS // 2, STEPS]
    # The registered version's artifacts went to the bucket through the MLflow server.
    assert any(k.endswith("/model/model.safetensors") for k in _keys(s3, bucket, "mlflow/"))


def test_fresh_process_loads_pretrained_from_the_registry(cluster, job):
    """Only the env file's variables: the registry (MLflow server) and the artifacts (S3) must
    both be reachable from them, and the model must compress a real photograph."""
    assert job["status"] == "SUCCEEDED"
    code = textwrap.dedent("""
        import json, math
        import torch
        from skimage import data
        from compresszoo import zoo
        from compresszoo.codec import decode_image, encode_image

        img = torch.from_numpy(data.astronaut()[100:300, 50:350].copy()).permute(2, 0, 1).float() / 255

        def code(model):
            blob = encode_image(model, img)
            x = decode_image(blob, model)
            mse = (x.clamp(0, 1) - img).pow(2).mean().item()
            return {"shape": list(x.shape), "bpp": 8 * len(blob) / (img.shape[1] * img.shape[2]),
                    "psnr": 10 * math.log10(1 / mse)}

        model = zoo.bmshj2018_factorized(quality=8, pretrained=True, N=8, M=12)
        untrained = zoo.bmshj2018_factorized(quality=8, N=8, M=12).eval()
        untrained.update(force=True)
        print("RESULT", json.dumps({"pretrained": code(model), "untrained": code(untrained)}))
    """)
    r = _run([sys.executable, "-c", code], cluster["client_env"], timeout=300, cwd=cluster["home"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    print(f"[e2e] decoded with the registered model: {out}")
    pre = out["pretrained"]
    assert pre["shape"] == [3, 200, 300]
    assert 0 < pre["bpp"] < 24
    # Trained for the job's few steps, it must clearly beat the same model untrained.
    # (After 30 steps the debug flavor reaches ~12 dB on this photo; the same model untrained ~5 dB.)
    assert pre["psnr"] > 9 and pre["psnr"] > out["untrained"]["psnr"] + 4, out
    # The weights were downloaded into the (fresh) HOME's cache, verified, from the registry.
    assert list((cluster["home"] / ".cache" / "compresszoo" / REGISTRY_NAME).glob("*/model.safetensors"))


def test_no_secret_in_job_logs_or_mlflow(cluster, job):
    from mlflow.tracking import MlflowClient

    assert job["status"] == "SUCCEEDED"
    env = cluster["env"]
    secrets = [env["AWS_SECRET_ACCESS_KEY"], Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()]
    assert all(len(s) >= 20 for s in secrets)
    uri = env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("compresszoo")
    runs = client.search_runs([exp.experiment_id])
    assert runs and runs[0].data.params["architecture"] == ARCH and "gate.passed" in runs[0].data.tags
    texts = [job["logs"], job["submit"], job["list"]]
    for run in runs:
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    mv = client.get_model_version_by_alias(REGISTRY_NAME, "champion")
    texts.append(json.dumps(mv.tags))
    assert "AWS_SECRET_ACCESS_KEY" not in job["list"]
    for i, text in enumerate(texts):
        for secret in secrets:
            assert secret not in text, f"a credential leaked into text #{i}"


def _down_leaves_nothing_behind(cluster, cluster_local):
    """The cluster fixture's teardown, after the training job: down, then nothing runs or answers."""
    import psutil

    local = cluster_local
    state = cluster["state"]
    before = [p.pid for p in local._cluster_processes(state)]
    assert before
    r = _run([str(DOWN), "--state-dir", str(cluster["dir"])], _bare_env(cluster["home"]))
    assert r.returncode == 0, r.stdout + r.stderr
    alive = [pid for pid in before if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running after down: {alive}"
    assert not local._cluster_processes(state)
    open_ports = [f"{k}:{p}" for k, p in state["ports"].items() if local._port_open(p)]
    assert not open_ports, f"still listening after down: {open_ports}"
    assert not (cluster["dir"] / "env.sh").exists()


# ----------------------------------------------------------------------------------- two nodes

_TWO_NODES = textwrap.dedent("""
    import json, os, sys
    import ray
    from ray.cluster_utils import Cluster
    from compresszoo.config import smoke
    from compresszoo.data.shards import prepare
    from compresszoo.train import fit

    miniature, bucket, work = sys.argv[1:4]
    # Two nodes of one CPU each; a worker takes 0.6 CPU, so no node holds both workers.
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 1, "object_store_memory": 100 * 1024 * 1024})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
        cluster.wait_for_nodes()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        data = f"{bucket}/vimeo-mini"
        prepare(miniature, data, progress=False, row_group_mb=0.05, task_cpus=0.5)
        cfg = smoke(architecture="bmshj2018-factorized", data=data, storage=f"{bucket}/runs",
                    tracking_uri=f"sqlite:///{work}/mlflow.db", crop=64, val_crop=64, val_images=2,
                    batch_size=4, max_steps=2, val_every=2, checkpoint_every=1, log_every=1,
                    cpus_per_worker=0.6, data_cpus=0.2, shuffle_buffer=8, workers=2, max_failures=0)
        res = fit(cfg)
        from ray.util.state import list_actors

        actors = [{"pid": a.pid, "node_id": a.node_id}
                  for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=100)]
        print("RESULT", json.dumps({"nodes": nodes, "actors": actors, "steps": res.steps,
                                    "run_name": res.run_name, "checkpoint_dir": res.checkpoint_dir,
                                    "files": sorted(os.listdir(res.checkpoint_dir))}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_two_node_training_shares_storage_through_s3(miniature, s3_bucket, tmp_path):
    """Ray's multi-node test cluster, in a subprocess (this process may hold the session's Ray):
    two workers on two nodes, checkpoints written to and restored from s3://."""
    import boto3

    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_EC2_METADATA_DISABLED")
    # Its own Ray temp folder (short: socket paths): the cluster's address file and sessions stay
    # out of /tmp/ray, so no other ray.init() on this machine joins it meanwhile.
    ray_tmp = Path(tempfile.mkdtemp(prefix="czn-"))
    env = _bare_env(tmp_path, {k: os.environ[k] for k in keys}
                    | {"COMPRESSZOO_PID_DIR": str(pid_dir), "RAY_TMPDIR": str(ray_tmp)})
    try:
        r = _run([sys.executable, "-c", _TWO_NODES, miniature, s3_bucket, str(tmp_path)], env, timeout=420,
                 cwd=tmp_path)
    finally:
        _kill_matching(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0 and "RESULT " in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert len(out["nodes"]) == 2
    # Each rank's process (pid file written by the worker) ran on its own node of the two.
    pids = {int((pid_dir / f"rank{rank}.pid").read_text()) for rank in (0, 1)}
    node_of = {a["pid"]: a["node_id"] for a in out["actors"]}
    assert pids <= set(node_of), (pids, out["actors"])
    assert {node_of[p] for p in pids} == set(out["nodes"])
    # Training reached its last step; rank 0's checkpoints are in the bucket, and fit() brought
    # the final one back from there.
    assert out["steps"] == 2 and "model.safetensors" in out["files"] and "state.json" in out["files"]
    bucket = s3_bucket[len("s3://"):]
    listed = _keys(boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]), bucket, f"runs/{out['run_name']}/")
    ckpts = {k.split("/")[2] for k in listed if k.count("/") >= 3 and k.split("/")[2].startswith("checkpoint_")}
    assert len(ckpts) == 2, listed
