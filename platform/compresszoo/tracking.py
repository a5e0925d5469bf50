"""MLflow tracking: one run per deterministic run name, resumed instead of duplicated.

Only rank 0 gets a real logger; other ranks get NullLogger, so call sites never test rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

RUN_KEY_TAG = "compresszoo.run_key"
#: the experiment tag MLflow 3's UI reads to choose an experiment's view; this value opens the
#: training view (runs, metrics, models) rather than the GenAI one (traces, evaluations)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
#: seconds a tracking server gets to accept a connection before it counts as unreachable
REACH_TIMEOUT_ENV = "COMPRESSZOO_TRACKING_CONNECT_TIMEOUT"


class TrackingUnreachable(ConnectionError):
    """A tracking/registry server that accepts no connection; `detail` names the URI and the fix."""

    def __init__(self, detail: str):
        super().__init__(f"MLflow server unreachable: {detail}")
        self.detail = detail


class NullLogger:
    """What non-zero ranks get: every call does nothing."""

    run_id = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_dict(self, obj: dict, name: str) -> None: ...
    def close(self) -> None: ...


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The one tracking-URI rule: the argument, else MLFLOW_TRACKING_URI, else ./mlflow.db.

    A relative sqlite path is made absolute here, once, so it means the same file after Ray
    workers change directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{os.path.abspath('mlflow.db')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{os.path.abspath(uri[len('sqlite:///'):])}"
    return uri


def check_reachable(uri: str, timeout: float | None = None) -> None:
    """Raise TrackingUnreachable unless an http(s) tracking URI's server accepts a TCP
    connection within `timeout` seconds (default: $COMPRESSZOO_TRACKING_CONNECT_TIMEOUT or 5).

    MLflow's own client retries a dead server with backoff for minutes; one short connect
    first turns "the cluster is down" into an error at once. Other schemes pass."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    if timeout is None:
        raw = os.environ.get(REACH_TIMEOUT_ENV, "5")
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"{REACH_TIMEOUT_ENV}={raw!r}: give seconds, e.g. 5") from None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise TrackingUnreachable(
            f"nothing accepted a connection at {uri} within {timeout:g} s ({type(e).__name__}: "
            f"{e or 'timed out'}); start the server (cluster/up.sh for the local cluster) or set "
            f"MLFLOW_TRACKING_URI to a running one ({REACH_TIMEOUT_ENV} sets the wait)") from None


def client(tracking_uri: str | None = None):
    """The one MlflowClient constructor: tracking and registry on the same resolved URI,
    checked to be reachable first (check_reachable)."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_client = client


def find_run(tracking_uri: str | None, experiment: str, run_key: str):
    """The MLflow run tagged with `run_key` in `experiment` (the oldest), or None."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                         max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def mlflow_error_is(exc: BaseException, code: str) -> bool:
    """True if `exc` is an MlflowException carrying the protocol error code `code`
    (e.g. RESOURCE_DOES_NOT_EXIST, RESOURCE_ALREADY_EXISTS). Stores and servers report
    "missing" and "exists" with these codes; anything else is a failure, not an answer."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == code


def experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created if missing; either way tagged to open in MLflow's
    training view (EXPERIMENT_KIND_TAG), including experiments made before the tag was set."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception as e:
        # Only a concurrent creator winning the race is expected; outages and bad
        # settings propagate.
        if not mlflow_error_is(e, "RESOURCE_ALREADY_EXISTS"):
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_or_create_run(tracking_uri: str, experiment: str, run_key: str, tags: dict | None = None) -> str:
    """The MLflow run for `run_key`: the existing one (resumed) or a new one."""
    run = find_run(tracking_uri, experiment, run_key)
    if run is not None:
        return run.info.run_id
    c = client(tracking_uri)
    exp_id = experiment_id(c, experiment, os.environ.get("COMPRESSZOO_MLFLOW_ARTIFACTS") or None)
    return c.create_run(exp_id, run_name=run_key, tags={RUN_KEY_TAG: run_key, **(tags or {})}).info.run_id


class MlflowLogger:
    """Logs to one MLflow run by id through the client API (no global active-run state)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = _client(tracking_uri)
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_dict(self, obj: dict, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def make_logger(rank: int, tracking_uri: str, run_id: str | None):
    return MlflowLogger(tracking_uri, run_id) if rank == 0 and run_id else NullLogger()


def provenance_tags() -> dict:
    """Versions of the stack and the git commit, as tags."""
    import mlflow
    import ray
    import torch

    from . import __version__

    return {
        "compresszoo.version": __version__, "torch.version": torch.__version__,
        "ray.version": ray.__version__, "mlflow.version": mlflow.__version__,
    }


def git_commit(repo: str | os.PathLike | None = None) -> str:
    repo = Path(repo or Path(__file__).resolve().parents[2])
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    if out.returncode != 0:
        return ""
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
