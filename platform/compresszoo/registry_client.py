"""The MLflow model registry: publish gated models, find them, download and load them.

A version's artifacts form an MLflow Model (an MLmodel file) whose python_function flavor
is loaded by compresszoo.serving.pyfunc: no pickle anywhere, so `mlflow.pyfunc.load_model`
and `mlflow models serve` run only compresszoo's code. Next to the MLmodel file lie plain
files: model.safetensors (weights + zoo spec, loaded without unpickling), config.json,
bitrate_report.json, rd_point.json, the input example and the requirements. The weights'
sha256 is a version tag (required) and is recorded in the MLmodel's compresszoo flavor;
every download is hashed before it enters the cache, and a load hashes the very bytes it
loads. The version's description is its model card. Versions registered before the MLmodel
file existed (the same plain files, no MLmodel) load through compresszoo as before.

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
from .tracking import TrackingUnreachable, mlflow_error_is, resolve_tracking_uri
from .tracking import client as _tracking_client

CHAMPION = "champion"
ARTIFACT_DIR = "model"
_REF = re.compile(r"^(?P<name>[A-Za-z0-9._-]+?)(?:@(?P<alias>[A-Za-z0-9_-]+)|:(?P<version>\d+))?$")
_VERSION = re.compile(r"^[1-9][0-9]*$")
_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


class RegistryError(RuntimeError):
    """A model could not be found, reached or verified; the message names model and server."""


def _client(tracking_uri: str | None, what: str):
    """(client, resolved uri); a server that accepts no connection is a RegistryError about
    `what` at once, not minutes of MLflow's retries."""
    uri = resolve_tracking_uri(tracking_uri or "")
    try:
        return _tracking_client(uri), uri
    except TrackingUnreachable as e:
        raise RegistryError(f"{what}: the MLflow registry is unreachable or failing -- {e.detail}") from None
    except ValueError:  # a setting of ours that cannot be read: its own message says which
        raise
    except Exception as e:  # a store that opens but is broken, e.g. a sqlite file that is no database
        raise _failing(what, uri, e) from e


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


def champion_version(name: str, tracking_uri: str | None = None) -> str | None:
    """The version `name`'s champion alias points at, or None if there is none (no registry
    database yet, no such model, no alias). A failing registry raises RegistryError: an
    outage must not read as "no parent" and train a duplicate."""
    uri = resolve_tracking_uri(tracking_uri or "")
    if not _registry_exists(uri):
        return None
    client, _ = _client(uri, f"looking up the {CHAMPION} of {name}")
    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
    except Exception as e:
        if mlflow_error_is(e, _NOT_FOUND):
            return None
        raise _failing(f"looking up the {CHAMPION} of {name}", uri, e) from e
    return None if version is None else str(version)


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
    client, _ = _client(uri, f"looking up {name}")
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


#: the module MLflow imports to load a version (its `_load_pyfunc(path)`), and the column and
#: parameter of its predict(): `data` holds image files (encode) or .czoo files (decode)
PYFUNC_LOADER = "compresszoo.serving.pyfunc"
FLAVOR = "compresszoo"
COLUMN = "data"
MODES = ("encode", "decode")


def pyfunc_signature():
    """The signature every version is logged with (predict's input, output and `mode`)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", COLUMN)]),
        outputs=Schema([ColSpec("binary", COLUMN), ColSpec("long", "height"), ColSpec("long", "width"),
                        ColSpec("double", "bpp")]),
        params=ParamSchema([ParamSpec("mode", "string", MODES[0])]))


def _example_png() -> bytes:
    """A 32x32 RGB PNG (a smooth gradient) as the logged input example: small, and decodable
    by anything that reads PNG."""
    import io

    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 32, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(32, 0), ramp[:, None].repeat(32, 1),
                    np.full((32, 32), 128, np.float32)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return [f"compresszoo=={version('compresszoo')}"]
    except PackageNotFoundError:  # a source checkout on sys.path
        return ["compresszoo"]


def write_model_dir(model, path: str | os.PathLike, *, config: dict, report: dict, rd_point: dict,
                    attachments: dict[str, str | os.PathLike] | None = None) -> str:
    """Write a version's artifact folder (an MLflow Model) at `path`; returns the weights' sha256.

    `path` must not exist. attachments: extra files copied in under the given names (the RD plot).
    """
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model

    from .models.io import FORMAT, save_weights, weights_id

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="compresszoo-weights-") as staging:
        weights = Path(staging) / WEIGHTS_FILE
        save_weights(model, weights)
        digest = sha256_file(weights)
        meta = Model()
        # Read by serving.pyfunc: the weights file and the hash it must have.
        meta.add_flavor(FLAVOR, weights=WEIGHTS_FILE, weights_sha256=digest, format=FORMAT,
                        weights_id=weights_id(model))
        # No data_path: the weights stay at the folder's top, where load_registered finds them.
        mlflow.pyfunc.save_model(
            str(path), loader_module=PYFUNC_LOADER, mlflow_model=meta, signature=pyfunc_signature(),
            input_example=(pd.DataFrame({COLUMN: [_example_png()]}), {"mode": MODES[0]}),
            pip_requirements=_requirements())
        shutil.move(str(weights), path / WEIGHTS_FILE)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (path / "bitrate_report.json").write_text(json.dumps(report, indent=2))
    (path / "rd_point.json").write_text(json.dumps(rd_point, indent=2))
    for name, src in (attachments or {}).items():
        if Path(name).name != name or name in {WEIGHTS_FILE, "MLmodel"}:
            raise ValueError(f"attachment name {name!r} must be a plain file name other than "
                             f"{WEIGHTS_FILE} and MLmodel")
        shutil.copyfile(src, path / name)
    # save_model measured the folder before the weights moved in: record the real size.
    saved = Model.load(str(path))
    saved.model_size_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    saved.save(str(path / "MLmodel"))
    return digest


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def model_card(model, *, name: str, config: dict, report: dict, tags: dict, val_loss: float,
               attachments=(), rd_position: dict | None = None) -> str:
    """The version's description (Markdown): what the model is, how it was trained, what the
    gate measured, where that sits against the published zoo (rd_position: from
    evaluate.compare.rd_position, with its sentence under "text"), with how to load it."""
    from .models.registry import spec_of

    spec = spec_of(model)
    overall = report.get("overall") or {}
    th = report.get("thresholds") or {}
    parent = next((str(v) for src in (tags, config) for k in ("parent", "parent_version", "init_from",
                                                             "finetune_from") if (v := src.get(k))), None)
    data = config.get("data") or "-"
    lines = [
        f"**{spec.architecture}** ({spec.metric}, quality {spec.quality}): a learned image codec of "
        "the CompressAI zoo, trained and gated by compresszoo.",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| architecture | {spec.architecture} |",
        f"| metric | {spec.metric} |",
        f"| quality | {spec.quality} |",
        f"| lambda | {spec.lmbda:g} |",
        f"| N, M | {spec.N}, {spec.M} |",
        f"| steps | {tags.get('steps', config.get('max_steps', '-'))} |",
        f"| dataset | {data} (manifest sha256 {tags.get('manifest_sha', '-')}) |",
        f"| config hash | {tags.get('config_hash', '-')} |",
        f"| validation loss | {val_loss:.6g} |",
    ]
    if parent:
        lines.append(f"| fine-tuned from | {parent} |")
    lines += [
        "",
        f"Gate ({'passed' if report.get('passed') else 'not passed'}: {report.get('reason', '-')}), "
        f"{overall.get('num_images', 0)} held-out image(s):",
        "",
        "| real bpp | payload bpp | estimated bpp | gap | allowed gap | PSNR (dB) | MS-SSIM | exact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {_fmt(overall.get('real_bpp'))} | {_fmt(overall.get('payload_bpp'))} | "
        f"{_fmt(overall.get('estimated_bpp'))} | {_fmt(overall.get('relative_gap'), '+.2%')} | "
        f"{_fmt(th.get('max_relative_gap'), '.0%')} | {_fmt(overall.get('psnr'), '.2f')} | "
        f"{_fmt(overall.get('ms_ssim'))} | {overall.get('all_exact', '-')} |",
        "",
    ]
    if rd_position:
        pub, mine = rd_position.get("published") or {}, rd_position.get("measured") or {}
        bits = rd_position.get("bpp_delta_percent_at_equal_psnr")
        lines += [
            "RD position against the published zoo "
            f"({'comparable' if rd_position.get('comparable') else 'not comparable'}): {rd_position.get('text', '')}",
            "",
            "| | payload bpp | PSNR (dB) | PSNR at equal bpp | bits at equal PSNR |",
            "| --- | --- | --- | --- | --- |",
            f"| this model | {_fmt(mine.get('payload_bpp'))} | {_fmt(mine.get('psnr'), '.2f')} | "
            f"{_fmt(rd_position.get('psnr_delta_db_at_equal_bpp'), '+.2f')} | {_fmt(bits, '+.1f')}"
            f"{'' if bits is None else '%'} |",
            f"| published, quality {rd_position.get('quality')} | {_fmt(pub.get('bpp'))} | "
            f"{_fmt(pub.get('psnr'), '.2f')} | | |",
            "",
        ]
    lines += [
        "Artifacts: MLmodel (python_function flavor, loader compresszoo.serving.pyfunc; no pickle), "
        f"{WEIGHTS_FILE}, config.json, bitrate_report.json, rd_point.json"
        + "".join(f", {a}" for a in attachments) + ".",
        "",
        f"Load: `mlflow.pyfunc.load_model(\"models:/{name}@{CHAMPION}\")` (predict: column `{COLUMN}` "
        "of image files -> .czoo bytes; `params={\"mode\": \"decode\"}`: .czoo -> PNG), "
        f"`compresszoo.registry_client.load_registered(\"{name}@{CHAMPION}\")`, or "
        f"`compresszoo encode IMG -o OUT.czoo --model {name}@{CHAMPION}`.",
    ]
    return "\n".join(lines)


def register(model, *, name: str, run_id: str, config: dict, report: dict, rd_point: dict,
             tags: dict, val_loss: float, tracking_uri: str | None = None,
             attachments: dict[str, str | os.PathLike] | None = None,
             rd_position: dict | None = None) -> tuple[str, bool]:
    """Log the artifacts (an MLflow Model) to the run, create a version with its model card
    and move `champion` if it is better.

    Returns (version, became_champion). Call only for models that passed the gate.
    attachments: extra files for the version's folder, by name (e.g. the RD plot PNG);
    rd_position: the card's comparison with the published zoo (see model_card).
    """
    client, uri = _client(tracking_uri, f"registering {name}")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / ARTIFACT_DIR
        digest = write_model_dir(model, d, config=config, report=report, rd_point=rd_point,
                                 attachments=attachments)
        client.log_artifacts(run_id, str(d), ARTIFACT_DIR)
    card = model_card(model, name=name, config=config, report=report, tags=tags, val_loss=val_loss,
                      attachments=sorted(attachments or {}), rd_position=rd_position)
    try:
        client.create_registered_model(name, description=f"compresszoo {name}: learned image codec; "
                                       "each version's description is its model card")
    except Exception as e:
        if not mlflow_error_is(e, "RESOURCE_ALREADY_EXISTS"):
            raise _failing(f"registering {name}", uri, e) from e
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
    version = client.create_model_version(
        name, source, run_id=run_id, description=card,
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
    client, _ = _client(uri, f"model {ref!r}")
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
            raise _failing(f"model {ref!r} unreachable", uri, e) from e
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
            delay = float(os.environ.get("COMPRESSZOO_TEST_SLOW_COPY") or "0")
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
