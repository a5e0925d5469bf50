"""Bring a local mirror of the production stack up or down, on 127.0.0.1 only: a Ray head
with token auth and the job server, an S3 endpoint (moto) holding the project's bucket, and an
MLflow tracking server (SQLite database, artifacts in the bucket).

    cluster/up.sh   [--state-dir DIR] [--bucket NAME] [--num-cpus N]   # python cluster/local.py up
    . .cluster/env.sh      # every shell: this venv's bin on PATH, Ray address + token, S3, MLflow
    cluster/down.sh [--state-dir DIR]                                  # python cluster/local.py down
    python cluster/local.py status [--state-dir DIR]

Everything lives in the state folder (default .cluster/ in the repository): state.json (ports,
pids), env.sh and the Ray token (both mode 0600), logs/, the Ray session folder and mlflow.db.
S3 is moto's in-memory server, so each `up` starts a fresh cluster: an empty bucket and an
empty MLflow database. `down` stops only the processes this cluster started (never `ray stop`,
which kills every Ray process on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
REGION = "us-east-1"
DEFAULT_BUCKET = "compresszoo"
STATE_VERSION = 1
# Unix socket paths are limited to 107 bytes; Ray puts its sockets at
# <temp-dir>/session_<date>_<time>_<pid>/sockets/plasma_store (about 60 bytes past temp-dir).
_MAX_RAY_TMP = 45

# Inherited settings that would point the cluster (or its jobs) at some other Ray, S3 or MLflow.
_SCRUB = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
          "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
          "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
          "COMPRESSZOO_S3_ENDPOINT")


class ClusterError(RuntimeError):
    """A step failed; the message says which and what to look at."""


@dataclass(frozen=True)
class Paths:
    state: Path

    @property
    def state_json(self) -> Path:
        return self.state / "state.json"

    @property
    def env_sh(self) -> Path:
        return self.state / "env.sh"

    @property
    def token(self) -> Path:
        return self.state / "ray_auth_token"

    @property
    def credentials(self) -> Path:
        return self.state / "s3_credentials.json"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def mlflow_db(self) -> Path:
        return self.state / "mlflow.db"

    @property
    def lock(self) -> Path:
        return self.state / ".lock"

    def ray_tmp(self) -> Path:
        tmp = self.state / "ray"
        if len(str(tmp)) <= _MAX_RAY_TMP:
            return tmp
        # A deep state folder would overflow Ray's socket paths: use a short folder named
        # after the state folder, so up and down agree on it.
        import hashlib

        digest = hashlib.sha256(str(self.state).encode()).hexdigest()[:10]
        return Path("/tmp") / f"compresszoo-ray-{digest}"


# ------------------------------------------------------------------------------ small helpers

def _log(msg: str) -> None:
    print(f"[cluster] {msg}", flush=True)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (tokens, credentials, the env file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _http(url: str, headers: dict | None = None, timeout: float = 3.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (ray, mlflow), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _wait(check, what: str, timeout: float, log: Path | None = None, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{what}: the process exited with code {proc.returncode}; "
                               f"last lines of {log}:\n{_tail(log) if log else ''}")
        time.sleep(0.5)
    raise ClusterError(f"{what}: no answer after {timeout:.0f}s; last lines of {log}:\n"
                       f"{_tail(log) if log else ''}")


# ------------------------------------------------------------------------- process bookkeeping

def _psutil():
    import psutil  # a Ray dependency

    return psutil


def _record(pid: int) -> dict:
    return {"pid": pid, "create_time": _psutil().Process(pid).create_time()}


def _alive(rec: dict):
    """The process recorded in `rec`, if it still runs (same pid AND start time: no reuse)."""
    psutil = _psutil()
    try:
        p = psutil.Process(rec["pid"])
        if abs(p.create_time() - rec["create_time"]) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
            return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return None


def _ray_processes(state: dict) -> list:
    """This cluster's Ray processes: those naming its session folder or GCS port, and children.

    Matching on the cluster's own temp folder keeps other Ray clusters on the machine (other
    users, other checkouts, tests' ray.init()) out of reach.
    """
    psutil = _psutil()
    marker = state["ray_temp_dir"].rstrip("/") + "/"
    client = f"--address={HOST}:{state['ports']['gcs']}"
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, object] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] in me:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd or ("ray.util.client.server" in cmd and client in cmd):
            found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
    return [p for pid, p in found.items() if pid not in me]


def _cluster_processes(state: dict) -> list:
    psutil = _psutil()
    procs: dict[int, object] = {}
    for name in ("s3", "mlflow"):
        for rec in state.get("processes", {}).get(name, []):
            p = _alive(rec)
            if p is not None:
                procs[p.pid] = p
                with contextlib.suppress(psutil.Error):
                    for c in p.children(recursive=True):
                        procs.setdefault(c.pid, c)
    for p in _ray_processes(state):
        procs.setdefault(p.pid, p)
    return list(procs.values())


def _stop(state: dict, grace: float = 8.0) -> list[int]:
    """SIGTERM every process of this cluster, SIGKILL what is left; return pids that survive."""
    psutil = _psutil()
    procs = _cluster_processes(state)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _, alive = psutil.wait_procs(alive, timeout=5)
    # Ray may have forked a worker while we were stopping the rest: one more sweep.
    late = _cluster_processes(state)
    for p in late:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _, late_alive = psutil.wait_procs(late, timeout=5)
    return sorted({p.pid for p in alive} | {p.pid for p in late_alive})


# ------------------------------------------------------------------------------------ the env

def cluster_env(state: dict, creds: dict, token_path: Path) -> dict:
    """Variables every client and every Ray process of this cluster gets (values secret)."""
    s3 = f"http://{HOST}:{state['ports']['s3']}"
    return {
        # `ray job submit` reads RAY_API_SERVER_ADDRESS first; RAY_ADDRESS is the GCS address
        # so that ray.init() and `ray status` work too (they reject an http:// RAY_ADDRESS).
        "RAY_ADDRESS": f"{HOST}:{state['ports']['gcs']}",
        "RAY_API_SERVER_ADDRESS": f"http://{HOST}:{state['ports']['dashboard']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        # Despite its name this is Ray's multi-node switch: off, Ray takes 127.0.0.1 as the node
        # address, so GCS, raylet and workers listen on loopback only (no other host can join).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{state['ports']['mlflow']}",
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": creds["key"],
        "AWS_SECRET_ACCESS_KEY": creds["secret"],
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "COMPRESSZOO_BUCKET": state["bucket"],
    }


def _env_file_text(env: dict, state: dict) -> str:
    lines = [
        "# Written by cluster/local.py up; holds credentials (mode 0600), never commit or print it.",
        f"# Cluster state: {state['state_dir']}/state.json",
        "unset RAY_AUTH_TOKEN  # would win over RAY_AUTH_TOKEN_PATH",
        # python, ray, mlflow and compresszoo of the environment that started the cluster, so a
        # fresh shell needs nothing but this file (no venv activation).
        f"export PATH='{Path(sys.executable).parent}':\"$PATH\"",
    ]
    for k, v in env.items():
        lines.append(f"export {k}='{v}'")
    return "\n".join(lines) + "\n"


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("AWS_")}
    # Jobs run `python ...` through the raylet's PATH: make it this environment's python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _package_path(env: dict) -> str | None:
    """platform/ when this environment cannot import compresszoo (a checkout without install)."""
    r = subprocess.run([sys.executable, "-c", "import compresszoo"], env=env, capture_output=True)
    return None if r.returncode == 0 else str(ROOT / "platform")


# ---------------------------------------------------------------------------------- commands

def _load(paths: Paths) -> dict | None:
    try:
        return json.loads(paths.state_json.read_text())
    except (OSError, ValueError):
        return None


def health(state: dict, paths: Paths) -> dict[str, tuple[bool, str]]:
    """name -> (healthy, detail) for ray, s3 and mlflow."""
    out: dict[str, tuple[bool, str]] = {}
    ports = state["ports"]
    try:
        token = paths.token.read_text().strip()
    except OSError:
        token = ""
    code, body = _http(f"http://{HOST}:{ports['dashboard']}/api/version",
                       {"Authorization": f"Bearer {token}"})
    out["ray"] = (code == 200 and "ray_version" in body, f"dashboard /api/version -> {code or body}")
    try:
        creds = json.loads(paths.credentials.read_text())
        names = _list_buckets(ports["s3"], creds)
        ok = state["bucket"] in names
        out["s3"] = (ok, f"list buckets -> {names}" if ok else f"bucket {state['bucket']!r} missing: {names}")
    except Exception as e:  # any failure means unhealthy; say why
        out["s3"] = (False, f"list buckets failed: {type(e).__name__}: {e}")
    code, body = _http(f"http://{HOST}:{ports['mlflow']}/health")
    out["mlflow"] = (code == 200, f"/health -> {code or body} {body.strip()[:20] if code else ''}")
    return out


def _s3_client(port: int, creds: dict):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=f"http://{HOST}:{port}", region_name=REGION,
                        aws_access_key_id=creds["key"], aws_secret_access_key=creds["secret"],
                        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))


def _list_buckets(port: int, creds: dict) -> list[str]:
    return [b["Name"] for b in _s3_client(port, creds).list_buckets().get("Buckets", [])]


def up(paths: Paths, bucket: str, num_cpus: int | None, object_store_memory: int | None,
       timeout: float) -> dict:
    paths.state.mkdir(parents=True, exist_ok=True)
    # The state folder ignores itself: git and Ray's working_dir upload (which honours
    # .gitignore files) never pick up sockets, logs, tokens or the database.
    (paths.state / ".gitignore").write_text("*\n")
    old = _load(paths)
    if old is not None:
        if old.get("version") == STATE_VERSION and old.get("bucket") == bucket:
            h = health(old, paths)
            if all(ok for ok, _ in h.values()):
                _log(f"already up (state {paths.state}); nothing to do. `source {paths.env_sh}`")
                return old
        if "ray_temp_dir" in old and _cluster_processes(old):
            _log("found a partial cluster (a service is not healthy); bringing it down first")
        survivors = _stop(old) if "ray_temp_dir" in old else []
        if survivors:
            raise ClusterError(f"could not stop old processes {survivors}; stop them and retry")

    ray_tmp = paths.ray_tmp()
    shutil.rmtree(ray_tmp, ignore_errors=True)  # the previous session's sockets and logs
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.mlflow_db.unlink(missing_ok=True)  # S3 starts empty, so must the registry
    if not paths.token.exists():
        _write_private(paths.token, secrets.token_hex(32))
    # moto accepts any credentials; random ones make a leak findable (tests grep for them).
    alphabet = string.ascii_uppercase + string.digits
    creds = {"key": "CZLOCAL" + "".join(secrets.choice(alphabet) for _ in range(13)),
             "secret": secrets.token_urlsafe(30)}
    _write_private(paths.credentials, json.dumps(creds))

    p_s3, p_mlflow, p_gcs, p_dash, p_client, p_agent = _free_ports(6)
    state = {
        "version": STATE_VERSION,
        "state_dir": str(paths.state),
        "bucket": bucket,
        "ray_temp_dir": str(ray_tmp),
        "ports": {"s3": p_s3, "mlflow": p_mlflow, "gcs": p_gcs, "dashboard": p_dash,
                  "ray_client": p_client, "dashboard_agent": p_agent},
        "processes": {},
        "started_at": time.time(),
    }
    env = _base_env()
    env.update(cluster_env(state, creds, paths.token))
    extra = _package_path(env)
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    state["pythonpath_added"] = extra
    # Record before starting anything, so a failed `up` can still be brought down.
    paths.state_json.write_text(json.dumps(state, indent=2))

    try:
        _start_all(state, paths, env, creds, num_cpus, object_store_memory, timeout)
    except BaseException:
        _log("start failed; stopping what was started")
        _stop(state)
        raise
    _write_private(paths.env_sh, _env_file_text(cluster_env(state, creds, paths.token), state))
    urls = state["urls"]
    _log(f"up in {time.time() - state['started_at']:.0f}s (state {paths.state})")
    _log(f"  Ray jobs/dashboard {urls['ray_dashboard']}  GCS {urls['ray_gcs']}  (token auth on)")
    _log(f"  S3 (moto)          {urls['s3']}  bucket s3://{bucket}")
    _log(f"  MLflow             {urls['mlflow']}  (sqlite {paths.mlflow_db}, artifacts s3://{bucket}/mlflow)")
    if extra:
        _log(f"  compresszoo is not installed here: jobs import it from {extra} (PYTHONPATH)")
    _log(f"  dashboard token    the contents of {paths.token}: `. {paths.env_sh} && ray get-auth-token` "
         "(without the env file Ray prints ~/.ray/auth_token, another cluster's)")
    _log(f"next (the bucket s3://{bucket} is empty; the MLflow registry too):")
    _log(f"  . {paths.env_sh}     # every shell: PATH, Ray address and token, S3, MLflow")
    _log(f"  python pipelines/prepare_vimeo90k.py --make-miniature /tmp/vimeo-mini "
         f"--dst s3://{bucket}/vimeo90k-mini     # the data")
    _log(f"  ray job submit --working-dir . -- python pipelines/train_zoo.py --preset smoke "
         f"--data s3://{bucket}/vimeo90k-mini --storage s3://{bucket}/runs")
    return state


def _start_all(state, paths, env, creds, num_cpus, object_store_memory, timeout) -> None:
    ports, bucket = state["ports"], state["bucket"]
    s3_log, mlflow_log, ray_log = (paths.logs / n for n in ("s3.log", "mlflow.log", "ray-start.log"))

    def spawn(argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            # Own session: the services outlive this command and ignore the terminal's Ctrl-C.
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=paths.state, start_new_session=True)

    s3 = spawn([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(ports["s3"])], s3_log)
    state["processes"]["s3"] = [_record(s3.pid)]
    mlflow = spawn([sys.executable, "-m", "mlflow", "server",
                    "--backend-store-uri", f"sqlite:///{paths.mlflow_db}",
                    "--default-artifact-root", f"s3://{bucket}/mlflow",
                    "--host", HOST, "--port", str(ports["mlflow"]), "--workers", "1",
                    # Host-header allow list (DNS rebinding) and CORS: this address only.
                    "--allowed-hosts", f"{HOST}:{ports['mlflow']},localhost:{ports['mlflow']}",
                    "--cors-allowed-origins", f"http://{HOST}:{ports['mlflow']},http://localhost:{ports['mlflow']}"],
                   mlflow_log)
    state["processes"]["mlflow"] = [_record(mlflow.pid)]
    paths.state_json.write_text(json.dumps(state, indent=2))

    ray_cmd = [_bin("ray"), "start", "--head", "--node-ip-address", HOST,
               "--port", str(ports["gcs"]), "--dashboard-host", HOST,
               "--dashboard-port", str(ports["dashboard"]),
               "--ray-client-server-port", str(ports["ray_client"]),
               "--dashboard-agent-listen-port", str(ports["dashboard_agent"]),
               "--temp-dir", state["ray_temp_dir"], "--disable-usage-stats"]
    if num_cpus is not None:
        ray_cmd += ["--num-cpus", str(num_cpus)]
    if object_store_memory is not None:
        ray_cmd += ["--object-store-memory", str(object_store_memory)]
    with open(ray_log, "ab") as out:
        r = subprocess.run(ray_cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                           env=env, cwd=paths.state, timeout=timeout)
    if r.returncode != 0:
        raise ClusterError(f"`ray start --head` failed ({r.returncode}); last lines of {ray_log}:\n{_tail(ray_log)}")
    state["processes"]["ray"] = [_record(p.pid) for p in _ray_processes(state)]
    paths.state_json.write_text(json.dumps(state, indent=2))

    client = None

    def s3_ready() -> bool:
        nonlocal client
        try:
            client = client or _s3_client(ports["s3"], creds)
            client.list_buckets()
            return True
        except Exception:
            return False

    _wait(s3_ready, f"S3 (moto) on {HOST}:{ports['s3']}", timeout, s3_log, s3)
    if bucket not in _list_buckets(ports["s3"], creds):
        client.create_bucket(Bucket=bucket)
    token = paths.token.read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    _wait(lambda: _http(f"http://{HOST}:{ports['dashboard']}/api/version", auth)[0] == 200,
          f"Ray dashboard on {HOST}:{ports['dashboard']}", timeout, ray_log)
    # The job server answers once the head's agent is registered; submit right after `up` works.
    _wait(lambda: _http(f"http://{HOST}:{ports['dashboard']}/api/jobs/", auth)[0] == 200,
          "Ray job server", timeout, ray_log)
    _wait(lambda: _http(f"http://{HOST}:{ports['mlflow']}/health")[0] == 200,
          f"MLflow on {HOST}:{ports['mlflow']}", timeout, mlflow_log, mlflow)
    h = health(state, paths)
    bad = {k: d for k, (ok, d) in h.items() if not ok}
    if bad:
        raise ClusterError(f"health checks failed: {bad}")
    state["urls"] = {
        "ray_dashboard": f"http://{HOST}:{ports['dashboard']}",
        "ray_gcs": f"{HOST}:{ports['gcs']}",
        "s3": f"http://{HOST}:{ports['s3']}",
        "mlflow": f"http://{HOST}:{ports['mlflow']}",
    }
    state["env_file"] = str(paths.env_sh)
    paths.state_json.write_text(json.dumps(state, indent=2))


def down(paths: Paths) -> int:
    state = _load(paths)
    if state is None or "ray_temp_dir" not in state:
        _log(f"nothing to bring down (no {paths.state_json})")
        return 0
    procs = _cluster_processes(state)
    if not procs:
        _log("already down")
    survivors = _stop(state) if procs else []
    open_ports = [f"{k}:{p}" for k, p in state["ports"].items() if _port_open(p)]
    if survivors or open_ports:
        _log(f"NOT fully down: pids still alive {survivors}, ports still open {open_ports}")
        return 1
    if procs:
        _log(f"down: stopped {len(procs)} processes; no listener left on {sorted(state['ports'].values())}")
    paths.env_sh.unlink(missing_ok=True)  # a stale env file would point at nothing
    state["stopped_at"] = time.time()
    paths.state_json.write_text(json.dumps(state, indent=2))
    return 0


def status(paths: Paths) -> int:
    state = _load(paths)
    if state is None or "urls" not in state:
        _log("down (no running cluster recorded)")
        return 1
    h = health(state, paths)
    for name, (ok, detail) in h.items():
        _log(f"{name:7s} {'ok  ' if ok else 'DOWN'} {detail}")
    return 0 if all(ok for ok, _ in h.values()) else 1


@contextlib.contextmanager
def _locked(paths: Paths):
    paths.state.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClusterError(f"another up/down is running on {paths.state}; wait for it") from None
        yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--state-dir", default=os.environ.get("COMPRESSZOO_CLUSTER_DIR", str(ROOT / ".cluster")),
                    help="folder for state, logs, env.sh (default: .cluster/ in the repository, "
                    "or COMPRESSZOO_CLUSTER_DIR)")
    ap.add_argument("--bucket", default=DEFAULT_BUCKET, help=f"S3 bucket to create (default {DEFAULT_BUCKET})")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    ap.add_argument("--object-store-memory", type=int, default=None, help="bytes (default: Ray's)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds each service may take to answer")
    args = ap.parse_args(argv)
    paths = Paths(Path(os.path.abspath(args.state_dir)))
    try:
        with _locked(paths):
            if args.command == "up":
                up(paths, args.bucket, args.num_cpus, args.object_store_memory, args.timeout)
                return 0
            if args.command == "down":
                return down(paths)
            return status(paths)
    except ClusterError as e:
        print(f"cluster {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
