"""The MLflow model registry: publish gated models, find them, download and load them.

A version's artifacts are plain files: model.safetensors (weights + zoo spec, loaded
without unpickling), config.json, bitrate_report.json and rd_point.json. The weights'
sha256 is a version tag and is checked after every download.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .tracking import resolve_tracking_uri

CHAMPION = "champion"
ARTIFACT_DIR = "model"
_REF = re.compile(r"^(?P<name>[A-Za-z0-9._-]+?)(?:@(?P<alias>[A-Za-z0-9_-]+)|:(?P<version>\d+))?$")


class RegistryError(RuntimeError):
    """A model could not be found, reached or verified; the message names model and server."""


def _client(tracking_uri: str | None = None):
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri or "")
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ publish


def find_version(name: str, config_hash: str, manifest_sha: str, tracking_uri: str | None = None):
    """The registered version trained from this config and dataset, or None."""
    client, _ = _client(tracking_uri)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001 - no such registered model yet
        return None
    for v in versions:
        if v.tags.get("config_hash") == config_hash and v.tags.get("manifest_sha") == manifest_sha:
            return v
    return None


def register(model, *, name: str, run_id: str, config: dict, report: dict, rd_point: dict,
             tags: dict, val_loss: float, tracking_uri: str | None = None) -> tuple[str, bool]:
    """Log the artifacts to the run, create a version and move `champion` if it is better.

    Returns (version, became_champion). Call only for models that passed the gate.
    """
    from .models.io import save_weights

    client, uri = _client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / ARTIFACT_DIR
        d.mkdir()
        save_weights(model, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (d / "bitrate_report.json").write_text(json.dumps(report, indent=2))
        (d / "rd_point.json").write_text(json.dumps(rd_point, indent=2))
        digest = sha256_file(d / "model.safetensors")
        client.log_artifacts(run_id, str(d), ARTIFACT_DIR)
    try:
        client.create_registered_model(name, description=f"compresszoo {name}")
    except Exception:  # noqa: BLE001 - exists already
        pass
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
    version = client.create_model_version(
        name, source, run_id=run_id,
        tags={**{k: str(v) for k, v in tags.items()}, "weights_sha256": digest, "val_loss": repr(val_loss)})
    champion = False
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        champion = val_loss < float(current.tags.get("val_loss", "inf"))
    except Exception:  # noqa: BLE001 - no champion yet
        champion = True
    if champion:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return str(version.version), champion


# ------------------------------------------------------------------ load


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    m = _REF.match(ref.strip())
    if not m:
        raise ValueError(f"bad model reference {ref!r}; use NAME, NAME@ALIAS or NAME:VERSION "
                         "(e.g. mbt2018-mse-q3@champion)")
    return m["name"], m["alias"], m["version"]


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESSZOO_CACHE", Path.home() / ".cache" / "compresszoo"))


def download(ref: str, tracking_uri: str | None = None) -> Path:
    """Download a registered version's weights into the cache (verified); return the file."""
    name, alias, version = parse_ref(ref)
    client, uri = _client(tracking_uri)
    try:
        if version:
            mv = client.get_model_version(name, version)
        else:
            mv = client.get_model_version_by_alias(name, alias or CHAMPION)
    except Exception as e:  # noqa: BLE001 - MLflow raises many types for "missing" and "down"
        kind = "unreachable" if "connect" in str(e).lower() or "Max retries" in str(e) else "not found"
        raise RegistryError(f"model {ref!r} {kind} in the MLflow registry at {uri} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); check the name, alias and MLFLOW_TRACKING_URI") from None
    expected = mv.tags.get("weights_sha256")
    target = cache_dir() / name / str(mv.version) / "model.safetensors"
    if target.exists() and expected and sha256_file(target) == expected:
        return target
    import mlflow.artifacts

    tmp = Path(tempfile.mkdtemp(prefix="compresszoo-dl-"))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source}/model.safetensors",
                                                    dst_path=str(tmp), tracking_uri=uri)
        got = sha256_file(local)
        if expected and got != expected:
            raise RegistryError(f"model {name} version {mv.version} from {uri}: checksum mismatch "
                                f"(expected {expected[:12]}, got {got[:12]}); the artifact is corrupted")
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(target.name + ".tmp")
        shutil.copyfile(local, staged)
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_registered(ref: str, tracking_uri: str | None = None):
    """NAME[@ALIAS|:VERSION] -> an eval-mode model with its CDF tables, from the registry."""
    from .models.io import load_weights

    return load_weights(download(ref, tracking_uri))
