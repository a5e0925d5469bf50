"""The local cluster (cluster/up.sh, cluster/down.sh): three services on 127.0.0.1 only, a job
submitted with nothing but the env file (token auth on), and nothing left behind after down."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UP, DOWN = ROOT / "cluster" / "up.sh", ROOT / "cluster" / "down.sh"
BIN = Path(sys.executable).parent
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the local cluster scripts target Linux")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 300)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _client_env(home: Path) -> dict:
    """A bare environment (no RAY_/AWS_/MLFLOW_ variables, an empty HOME so no ~/.ray/auth_token):
    whatever the client needs must come from the env file."""
    return {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def _with_env_file(env_sh: Path, command: str, home: Path, cwd=ROOT) -> subprocess.CompletedProcess:
    return _run(["bash", "-c", f". '{env_sh}' && {command}"], env=_client_env(home), cwd=cwd)


@pytest.fixture(scope="module")
def cluster(cluster_local):
    """One cluster for the module. `down` and its checks run when the last test using it is
    done, whatever order the tests ran in (a failed check reports as an error there)."""
    # A short folder: Ray's unix socket paths live under it (107-byte limit).
    state_dir = Path(tempfile.mkdtemp(prefix="czc-"))
    home = state_dir / "home"
    home.mkdir()
    r = _run([str(UP), "--state-dir", str(state_dir), "--num-cpus", "2",
              "--object-store-memory", str(200 * 1024 * 1024)], timeout=400)
    state_file = state_dir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    try:
        assert r.returncode == 0, f"up failed:\n{r.stdout}\n{r.stderr}"
        c = {"dir": state_dir, "state": state, "env_sh": state_dir / "env.sh", "home": home,
             "up_output": r.stdout + r.stderr}
        yield c
        _down_leaves_nothing_behind(c, cluster_local)
    finally:
        _run([str(DOWN), "--state-dir", str(state_dir)])
        shutil.rmtree(state_dir, ignore_errors=True)


def _secret_values(c) -> list[str]:
    creds = json.loads((c["dir"] / "s3_credentials.json").read_text())
    return [creds["secret"], (c["dir"] / "ray_auth_token").read_text().strip()]


def test_up_answers_health_checks_and_is_idempotent(cluster):
    r = _run([sys.executable, str(ROOT / "cluster" / "local.py"), "status", "--state-dir", str(cluster["dir"])])
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("ray", "s3", "mlflow"):
        assert f"{name}" in r.stdout and "DOWN" not in r.stdout
    again = _run([str(UP), "--state-dir", str(cluster["dir"])])
    assert again.returncode == 0 and "already up" in again.stdout, again.stdout + again.stderr
    # The next steps start with the data: the bucket is empty; the dashboard token is named.
    out = cluster["up_output"]
    assert "is empty" in out and "pipelines/prepare_vimeo90k.py" in out and "ray get-auth-token" in out, out
    assert out.index("prepare_vimeo90k") < out.index("ray job submit")
    # Neither the up output nor the status output shows a secret.
    for secret in _secret_values(cluster):
        assert secret not in cluster["up_output"] + again.stdout + again.stderr + r.stdout


def test_env_file_and_secrets_are_private(cluster):
    env_sh = cluster["env_sh"]
    assert env_sh.stat().st_mode & 0o077 == 0
    assert (cluster["dir"] / "ray_auth_token").stat().st_mode & 0o077 == 0
    text = env_sh.read_text()
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",
                "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED", "AWS_DEFAULT_REGION"):
        assert f"export {var}=" in text, var
    # The token stays in its file: the env file names the file, never the token.
    token = (cluster["dir"] / "ray_auth_token").read_text().strip()
    assert token not in text
    assert "export RAY_AUTH_MODE='token'" in text
    # A fresh shell (no venv activated) finds this environment's commands through the env file.
    r = _run(["bash", "-c", f". '{env_sh}' && command -v python ray compresszoo"],
             env={"PATH": "/usr/bin:/bin", "HOME": str(cluster["home"])})
    assert r.returncode == 0 and r.stdout.split() == [str(BIN / n) for n in ("python", "ray", "compresszoo")], r


def _listeners(pids: list[int]) -> list[tuple[int, str, str, int]]:
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((pid, p.name(), c.laddr.ip, c.laddr.port))
        except psutil.NoSuchProcess:
            pass
    return out


def test_every_service_listens_on_loopback_only(cluster, cluster_local):
    local = cluster_local
    state = cluster["state"]
    procs = local._cluster_processes(state)
    listeners = _listeners([p.pid for p in procs])
    ports = {port for *_, port in listeners}
    for name in ("s3", "mlflow", "gcs", "dashboard"):
        assert state["ports"][name] in ports, f"{name} port {state['ports'][name]} not listening: {listeners}"
    exposed = [x for x in listeners if x[2] not in LOOPBACK]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"


def _get(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_mlflow_rejects_foreign_host_headers(cluster):
    """DNS-rebinding guard: the API answers only requests addressed to 127.0.0.1/localhost
    (MLflow exempts /health and /version from the check, so ask the REST API)."""
    port = cluster["state"]["ports"]["mlflow"]
    path = "/api/2.0/mlflow/experiments/search?max_results=1"

    def status_for(host: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", path, headers={"Host": host})
            return conn.getresponse().status
        finally:
            conn.close()

    assert status_for(f"127.0.0.1:{port}") == 200
    assert status_for(f"localhost:{port}") == 200
    assert status_for("attacker.example") in (400, 403)
    assert status_for("192.168.1.10:80") in (400, 403)  # MLflow's default would let this in


def test_ray_api_needs_the_token(cluster):
    dash = cluster["state"]["urls"]["ray_dashboard"]
    token = (cluster["dir"] / "ray_auth_token").read_text().strip()
    assert _get(f"{dash}/api/jobs/") == 401
    assert _get(f"{dash}/api/jobs/", {"Authorization": "Bearer not-the-token"}) in (401, 403)
    assert _get(f"{dash}/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200


def test_job_submit_with_only_the_env_file(cluster):
    code = ("import os, platform; print('hi from', platform.system()); "
            "print('env', sorted(k for k in os.environ if k.startswith(('AWS_', 'MLFLOW_'))))")
    r = _with_env_file(cluster["env_sh"], f'ray job submit --submission-id czc-hi -- python -c "{code}"',
                       cluster["home"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "hi from Linux" in r.stdout and "succeeded" in (r.stdout + r.stderr)
    # The job found the S3/MLflow settings in the cluster's environment, not in the submit call...
    assert "AWS_SECRET_ACCESS_KEY" in r.stdout and "MLFLOW_TRACKING_URI" in r.stdout
    # ...and neither its logs nor its record show a credential's value.
    logs = _with_env_file(cluster["env_sh"], "ray job logs czc-hi", cluster["home"])
    info = _with_env_file(cluster["env_sh"], "ray job list", cluster["home"])  # entrypoints, runtime envs
    for secret in _secret_values(cluster):
        for out in (r.stdout, r.stderr, logs.stdout, logs.stderr, info.stdout, info.stderr):
            assert secret not in out
    # ray status (GCS address + token from the env file) works too.
    st = _with_env_file(cluster["env_sh"], "ray status", cluster["home"])
    assert st.returncode == 0 and "CPU" in st.stdout, st.stdout + st.stderr


def test_driver_connects_with_the_env_file(cluster):
    """ray.init() in a shell that sourced the env file joins the cluster (RAY_ADDRESS is the GCS
    address, not the dashboard URL, which ray.init() would refuse)."""
    code = ("import ray; ray.init(); "
            "print('nodes', [n['NodeManagerAddress'] for n in ray.nodes()], ray.get(ray.remote(lambda: 6 * 7).remote()))")
    r = _with_env_file(cluster["env_sh"], f'python -c "{code}"', cluster["home"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nodes ['127.0.0.1'] 42" in r.stdout


def test_job_submit_fails_with_a_wrong_token(cluster, tmp_path):
    bad = tmp_path / "bad_token"
    bad.write_text("0" * 64)
    r = _with_env_file(cluster["env_sh"], f"RAY_AUTH_TOKEN_PATH='{bad}' ray job submit -- python -c 'print(1)'",
                       cluster["home"])
    assert r.returncode != 0
    assert "authentication" in (r.stdout + r.stderr).lower()


def test_wheel_reaches_workers_through_py_modules(cluster, tmp_path):
    """The built wheel's package, shipped with py_modules next to the repo as working_dir:
    workers import the compiled codec from it, and `import platform` stays the stdlib's."""
    out = tmp_path / "dist"
    b = _run([str(ROOT / "cluster" / "build_wheel.sh"), str(out)], timeout=600)
    assert b.returncode == 0, b.stdout + b.stderr
    wheels = list(out.glob("compresszoo-*.whl"))
    assert len(wheels) == 1
    modules = out / "py_modules" / "compresszoo"
    code = ("import platform, compresszoo.ans._rans as r; platform.system(); "
            "print('codec', r.__file__); print('stdlib', platform.__file__)")
    runtime_env = json.dumps({"py_modules": [str(modules)]})
    r = _with_env_file(cluster["env_sh"],
                       f"ray job submit --working-dir . --runtime-env-json '{runtime_env}' -- python -c \"{code}\"",
                       cluster["home"])
    assert r.returncode == 0, r.stdout + r.stderr
    codec = next(line for line in r.stdout.splitlines() if line.startswith("codec "))
    assert "py_modules_files" in codec and codec.endswith(".so")
    stdlib = next(line for line in r.stdout.splitlines() if line.startswith("stdlib "))
    assert "working_dir_files" not in stdlib and str(ROOT) not in stdlib


def _down_leaves_nothing_behind(cluster, cluster_local):
    """The cluster fixture's teardown: down, then nothing runs or answers."""
    import psutil

    local = cluster_local
    state = cluster["state"]
    before = [p.pid for p in local._cluster_processes(state)]
    assert before
    # After the module's jobs, Ray's workers and job supervisors exist too: still loopback only.
    exposed = [x for x in _listeners(before) if x[2] not in LOOPBACK]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"
    r = _run([str(DOWN), "--state-dir", str(cluster["dir"])])
    assert r.returncode == 0, r.stdout + r.stderr
    alive = [pid for pid in before if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running after down: {alive}"
    assert not local._cluster_processes(state)
    for name, port in state["ports"].items():
        assert not local._port_open(port), f"{name} port {port} still open"
    assert not cluster["env_sh"].exists()
    again = _run([str(DOWN), "--state-dir", str(cluster["dir"])])
    assert again.returncode == 0, again.stdout + again.stderr
