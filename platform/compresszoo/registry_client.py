"""The MLflow model registry: publish gated models, find them, download and load them.

A version's artifacts are plain files: model.safetensors (weights + zoo spec, loaded
without unpickling), config.json, bitrate_report.json and rd_point.json. The weights'
sha256 is a version tag (required); every download is hashed before it enters the cache,
and a load hashes the very bytes it loads.

"Not found" (MLflow's RESOURCE_DOES_NOT_EXIST, an empty search) is an answer; a registry
that cannot be reached or fails is a RegistryError, never mistaken for "not registered".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from . import storage
from .models.io import WEIGHTS_FILE
from .tracking import client as _tracking_client
from .tracking import mlflow_error_is, resolve_tracking_uri

CHAMPION = "champion"
ARTIFACT_DIR = "model"
_REF = re.compile(r"^(?P<name>[A-Za-z0-9._-]+?)(?:@(?P<alias>[A-Za-z0-9_-]+)|:(?P<version>\d+))?$")
_VERSION = re.compile(r"^[1-9][0-9]*$")
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


class RegistryError(RuntimeError):
    """A model could not be found, reached or verified; the message names model and server."""


def _client(tracking_uri: str | None = None):
    uri = resolve_tracking_uri(tracking_uri or "")
    return _tracking_client(uri), uri


def _failing(what: str, uri: str, e: BaseException) -> RegistryError:
    """The error for a registry that answered with something other than "not found"."""
    first = (str(e).splitlines() or [""])[0][:200]
    return RegistryError(f"{what}: the MLflow registry at {uri} is unreachable or failing "
                         f"({type(e).__name__}: {first}); check MLFLOW_TRACKING_URI and the server")


def _sqlite_file(uri: str) -> str | None:
    """The database file of a sqlite:/// tracking URI, or None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return path if path and path != ":memory:" else None


def _registry_exists(uri: str) -> bool:
    """False only for a sqlite URI whose file is missing: opening it would create an empty
    database (MLflow runs its migrations on connect), so a lookup must not."""
    db = _sqlite_file(uri)
    return db is None or os.path.exists(db)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ publish


def find_version(name: str, config_hash: str, manifest_sha: str, tracking_uri: str | None = None):
    """The registered version trained from this config and dataset, or None.

    Raises RegistryError if the registry cannot answer: an outage must not read as
    "not registered" (which would retrain and register a duplicate).
    """
    uri = resolve_tracking_uri(tracking_uri or "")
    if not _registry_exists(uri):
        return None  # nothing registered yet; training creates the database
    client, _ = _client(uri)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception as e:
        if mlflow_error_is(e, _NOT_FOUND):
            return None
        raise _failing(f"looking up {name}", uri, e) from e
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
        save_weights(model, d / WEIGHTS_FILE)
        (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (d / "bitrate_report.json").write_text(json.dumps(report, indent=2))
        (d / "rd_point.json").write_text(json.dumps(rd_point, indent=2))
        digest = sha256_file(d / WEIGHTS_FILE)
        client.log_artifacts(run_id, str(d), ARTIFACT_DIR)
    try:
        client.create_registered_model(name, description=f"compresszoo {name}")
    except Exception as e:
        if not mlflow_error_is(e, "RESOURCE_ALREADY_EXISTS"):
            raise _failing(f"registering {name}", uri, e) from e
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
    version = client.create_model_version(
        name, source, run_id=run_id,
        tags={**{k: str(v) for k, v in tags.items()}, "weights_sha256": digest, "val_loss": repr(val_loss)})
    try:
        # The alias map says "no champion yet" without relying on an exception, so a
        # failing registry raises instead of handing the alias to this version.
        current = client.get_registered_model(name).aliases.get(CHAMPION)
        champion = current is None or val_loss < float(
            client.get_model_version(name, str(current)).tags.get("val_loss", "inf"))
    except Exception as e:
        raise _failing(f"checking the {CHAMPION} of {name}", uri, e) from e
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


def cache_path(name: str, version) -> Path:
    """Where version `version` of `name` is cached; refuses anything that is not a positive
    integer version or that would resolve outside the cache (the version comes from the
    server, which must not choose where this client writes)."""
    v = str(version)
    if not _VERSION.match(v):
        raise RegistryError(f"model {name}: the registry returned version {v!r}, not a positive integer; "
                            "refusing to use it as a cache path")
    root = cache_dir().resolve()
    target = (root / name / v / WEIGHTS_FILE).resolve()
    if not target.is_relative_to(root):
        raise RegistryError(f"model {name} version {v}: cache path {target} is outside the cache {root}; "
                            "use a plain model name")
    return target


def _locate(ref: str, tracking_uri: str | None):
    """(name, version, expected sha256, source uri, tracking uri) of a reference."""
    name, alias, version = parse_ref(ref)
    uri = resolve_tracking_uri(tracking_uri or "")
    if not _registry_exists(uri):
        raise RegistryError(f"no MLflow registry at {uri} (the database file does not exist); set "
                            "MLFLOW_TRACKING_URI (or pass tracking_uri) to the registry holding "
                            f"{name}, e.g. sqlite:////abs/path/mlflow.db or http://host:5000")
    client, _ = _client(uri)
    try:
        if not version:
            # Aliases are read from the registered model: a missing alias is then plainly
            # absent (MLflow reports it as INVALID_PARAMETER_VALUE, not as "not found").
            alias = alias or CHAMPION
            version = client.get_registered_model(name).aliases.get(alias)
            if version is None and alias.lower() == "latest":  # MLflow's implicit alias
                version = client.get_model_version_by_alias(name, alias).version
        mv = client.get_model_version(name, str(version)) if version is not None else None
    except Exception as e:
        if not mlflow_error_is(e, _NOT_FOUND):
            raise RegistryError(f"model {ref!r} unreachable: the MLflow registry at {uri} is unreachable or "
                                f"failing ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
                                "check MLFLOW_TRACKING_URI and the server") from e
        mv = None
    if mv is None:
        raise RegistryError(f"model {ref!r} not found in the MLflow registry at {uri}; "
                            "check the name, alias and MLFLOW_TRACKING_URI")
    expected = mv.tags.get("weights_sha256")
    if not expected:
        raise RegistryError(f"model {name} version {mv.version} at {uri} has no weights_sha256 tag; "
                            "refusing unverifiable weights (register it again with compresszoo)")
    return name, str(mv.version), expected, mv.source, uri


def _download(ref: str, tracking_uri: str | None = None) -> tuple[Path, str]:
    """Make sure the verified weights are cached; return (cached file, expected sha256)."""
    name, version, expected, source, uri = _locate(ref, tracking_uri)
    target = cache_path(name, version)
    if target.exists() and sha256_file(target) == expected:
        return target, expected
    import mlflow.artifacts

    tmp = tempfile.mkdtemp(prefix="compresszoo-dl-")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{WEIGHTS_FILE}", dst_path=tmp,
                                                    tracking_uri=uri)
        # Each download stages under its own name, is hashed there and only then renamed
        # into place: concurrent first downloads never share or expose a partial file.
        with storage.staged_file(target) as staged:
            shutil.copyfile(local, staged)
            got = sha256_file(staged)
            if got != expected:
                raise RegistryError(f"model {name} version {version} from {uri}: checksum mismatch "
                                    f"(expected {expected[:12]}, got {got[:12]}); the artifact is corrupted")
            delay = float(os.environ.get("COMPRESSZOO_TEST_SLOW_COPY") or 0)
            if delay > 0:  # test hook: widen the window between staging and rename
                time.sleep(delay)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, expected


def download(ref: str, tracking_uri: str | None = None) -> Path:
    """Download a registered version's weights into the cache (verified); return the file."""
    return _download(ref, tracking_uri)[0]


def load_registered(ref: str, tracking_uri: str | None = None):
    """NAME[@ALIAS|:VERSION] -> an eval-mode model with its CDF tables, from the registry."""
    from .models.io import load_weights

    path, expected = _download(ref, tracking_uri)
    # Load a private copy hashed after copying: the bytes loaded are the bytes verified,
    # whatever happens to the shared cache file meanwhile.
    with tempfile.TemporaryDirectory(prefix="compresszoo-load-") as tmp:
        private = Path(tmp) / WEIGHTS_FILE
        shutil.copyfile(path, private)
        got = sha256_file(private)
        if got != expected:
            raise RegistryError(f"model {ref!r}: the cached file {path} changed after verification "
                                f"(expected {expected[:12]}, got {got[:12]}); load it again")
        return load_weights(private)
