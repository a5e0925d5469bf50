"""Gate and registry end to end on S3: train, gate, register, load pretrained in a fresh process."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from compresszoo import registry_client as rc
from compresszoo.config import smoke
from compresszoo.tracking import client as tracking_client

ROOT = Path(__file__).resolve().parents[1]


def _train_zoo():
    spec = importlib.util.spec_from_file_location("train_zoo", ROOT / "pipelines" / "train_zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def s3_setup(s3_bucket, s3_endpoint, miniature, ray_session, tmp_path, monkeypatch):
    from compresszoo.data.shards import prepare

    data = f"{s3_bucket}/vimeo-mini"
    prepare(miniature, data, progress=False, row_group_mb=0.05)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("COMPRESSZOO_MLFLOW_ARTIFACTS", f"{s3_bucket}/mlflow")
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    return data, s3_bucket, tracking


def test_gated_models_register_on_s3_and_load_pretrained_elsewhere(s3_setup, s3_endpoint, tmp_path):
    import boto3

    from compresszoo.codec import encode_image
    from compresszoo.models.io import load_weights

    data, bucket, tracking = s3_setup
    tz = _train_zoo()
    common = dict(data=data, storage=f"{bucket}/runs", tracking_uri=tracking, crop=64, batch_size=4,
                  max_steps=12, val_every=6, checkpoint_every=6, log_every=3, val_images=2, gate_images=2,
                  cpus_per_worker=0.5, data_cpus=0.25, shuffle_buffer=8)
    cfg = smoke(architecture="bmshj2018-factorized", **common)
    row = tz.run_one(cfg)
    assert row["gate"] is True and row["version"] == "1", row
    name = "bmshj2018-factorized-mse-q8-N8-M12"
    assert row["name"] == name

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket[5:])["Contents"]]
    assert any(k.startswith("runs/") and k.endswith("model.safetensors") for k in keys)  # checkpoints
    assert any(k.startswith("mlflow/") and k.endswith("model/model.safetensors") for k in keys)  # registry

    client = tracking_client(tracking)
    mv = client.get_model_version_by_alias(name, "champion")
    assert mv.source.startswith("s3://") and mv.tags["weights_sha256"]
    run = client.get_run(mv.run_id)
    assert run.data.tags["gate.passed"] == "True"

    # The training side encodes a real image with the registered weights...
    local = tmp_path / "trained.safetensors"
    s3_key = next(k for k in keys if k.startswith("mlflow/") and k.endswith("model/model.safetensors"))
    s3.download_file(bucket[5:], s3_key, str(local))
    trained = load_weights(local)
    from skimage import data as skdata

    img = torch.from_numpy(skdata.chelsea()[:200, :300].copy()).permute(2, 0, 1).float() / 255
    (tmp_path / "cat.czoo").write_bytes(encode_image(trained, img))
    from compresszoo.codec import decode_image

    np.save(tmp_path / "expected.npy", decode_image((tmp_path / "cat.czoo").read_bytes(), trained).numpy())

    # ...and a fresh process with only the environment loads it pretrained and decodes it.
    code = textwrap.dedent(f"""
        import numpy as np
        from compresszoo import zoo
        from compresszoo.codec import decode_image
        m = zoo.bmshj2018_factorized(quality=8, pretrained=True, N=8, M=12)
        x = decode_image(open({str(tmp_path / 'cat.czoo')!r}, 'rb').read(), m)
        # same latents; x_hat may differ in the last bits if thread counts differ
        assert np.abs(x.numpy() - np.load({str(tmp_path / 'expected.npy')!r})).max() < 1e-5
        print("decoded", tuple(x.shape))
    """)
    env = {k: v for k, v in os.environ.items()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "decoded (3, 200, 300)" in out.stdout

    # Running the same job again trains nothing and creates no second version.
    again = tz.run_one(cfg)
    assert again["reason"] == "already registered" and again["version"] == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    # A model that fails the gate is not registered, and its run says why.
    failing = smoke(architecture="bmshj2018-hyperprior", gate_max_gap=-1.0, **common)
    bad = tz.run_one(failing)
    assert bad["gate"] is False and "bitrate gap" in bad["reason"] and bad["version"] is None
    assert not client.search_model_versions("name = 'bmshj2018-hyperprior-mse-q8-N8-M12'")
    runs = client.search_runs([client.get_experiment_by_name("compresszoo").experiment_id],
                              filter_string="tags.`gate.passed` = 'False'")
    assert len(runs) == 1 and "bitrate gap" in runs[0].data.tags["gate.reason"]


def test_champion_moves_only_to_a_better_version_and_errors_name_model_and_server(tmp_path, monkeypatch,
                                                                                refused_url):
    from compresszoo.models import create_model

    uri = f"sqlite:///{tmp_path}/reg.db"
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    client = tracking_client(uri)
    exp = client.create_experiment("champion-test", artifact_location=str(tmp_path / "artifacts"))
    model = create_model("bmshj2018-factorized", 8, debug=True)
    model.update(force=True)
    name = "bmshj2018-factorized-mse-q8-N8-M12"
    results = []
    for val_loss in (5.0, 7.0, 3.0):
        run = client.create_run(exp)
        results.append(rc.register(model, name=name, run_id=run.info.run_id, config={}, report={},
                                   rd_point={}, tags={}, val_loss=val_loss, tracking_uri=uri))
    assert results == [("1", True), ("2", False), ("3", True)]
    assert client.get_model_version_by_alias(name, "champion").version in (3, "3")
    expected = client.get_model_version(name, "2").tags["weights_sha256"]
    path = rc.download(f"{name}:2", uri)
    assert path.exists() and rc.sha256_file(path) == expected
    path.write_bytes(b"tampered")  # a corrupted cache entry is detected and fetched again
    assert rc.sha256_file(rc.download(f"{name}:2", uri)) == expected
    assert rc.load_registered(f"{name}@champion", uri).meta["N"] == 8

    with pytest.raises(rc.RegistryError, match=rf"'{name}:9' not found .*reg\.db"):
        rc.download(f"{name}:9", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(rc.RegistryError, match=rf"unreachable .*{re.escape(refused_url)}"):
        rc.download(f"{name}@champion", refused_url)
    with pytest.raises(ValueError, match="bad model reference"):
        rc.parse_ref("no spaces allowed@x y")


# ------------------------------------------------------------------ registry failures and cache integrity

NAME = "bmshj2018-factorized-mse-q8-N8-M12"


def _publish(uri: str, *, val_loss: float, seed: int = 0, tags: dict | None = None) -> tuple[str, bool, str]:
    """Register a debug factorized model (weights drawn with `seed`) as a new version of NAME
    from a new run of the "integrity" experiment; returns (version, became_champion, weights_id)."""
    from compresszoo.models import create_model
    from compresszoo.models.io import weights_id

    client = tracking_client(uri)
    torch.manual_seed(seed)
    model = create_model("bmshj2018-factorized", 8, debug=True)
    model.update(force=True)
    run = client.create_run(client.get_experiment_by_name("integrity").experiment_id)
    version, champion = rc.register(model, name=NAME, run_id=run.info.run_id, config={}, report={}, rd_point={},
                                    tags=tags or {}, val_loss=val_loss, tracking_uri=uri)
    return version, champion, weights_id(model)


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """A real sqlite registry holding version 1 of NAME; returns (uri, weights_id)."""
    uri = f"sqlite:///{tmp_path}/reg.db"
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    tracking_client(uri).create_experiment("integrity", artifact_location=str(tmp_path / "artifacts"))
    version, champion, wid = _publish(uri, val_loss=1.0, tags={"config_hash": "c0ffee", "manifest_sha": "m1"})
    assert (version, champion) == ("1", True)
    return uri, wid


# ------------------------------------------------------------------ registry policies


def test_a_tie_does_not_move_the_champion(registered):
    uri, wid = registered
    assert _publish(uri, val_loss=1.0, seed=1)[:2] == ("2", False)  # equal, not better
    assert str(tracking_client(uri).get_model_version_by_alias(NAME, "champion").version) == "1"
    assert _publish(uri, val_loss=0.999, seed=2)[:2] == ("3", True)


def test_an_alias_names_its_own_version_and_a_missing_alias_is_not_the_champion(registered):
    from compresszoo.models.io import weights_id

    uri, champion_wid = registered
    version, became, staging_wid = _publish(uri, val_loss=2.0, seed=1)
    assert (version, became) == ("2", False) and staging_wid != champion_wid
    client = tracking_client(uri)
    client.set_registered_model_alias(NAME, "staging", "2")
    assert weights_id(rc.load_registered(f"{NAME}@staging", uri)) == staging_wid
    assert weights_id(rc.load_registered(f"{NAME}@champion", uri)) == champion_wid
    assert weights_id(rc.load_registered(NAME, uri)) == champion_wid  # no alias: the champion
    assert rc.download(f"{NAME}@staging", uri) == rc.cache_path(NAME, "2")
    with pytest.raises(rc.RegistryError, match=f"'{NAME}@nightly' not found"):
        rc.download(f"{NAME}@nightly", uri)


def test_a_corrupted_artifact_is_refused_and_never_cached(registered, tmp_path):
    uri, _ = registered
    stored = list((tmp_path / "artifacts").rglob("model/model.safetensors"))
    assert len(stored) == 1  # the registry's copy (the cache is still empty)
    data = bytearray(stored[0].read_bytes())
    data[-1] ^= 1  # one bit, in the tensor bytes
    stored[0].write_bytes(bytes(data))
    for load in (rc.download, rc.load_registered):
        with pytest.raises(rc.RegistryError, match=f"model {NAME} version 1 from .*reg\\.db: checksum mismatch"):
            load(f"{NAME}@champion", uri)
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] if (tmp_path / "cache").exists() else []
    assert cached == []


def test_find_version_needs_both_the_config_and_the_manifest(registered):
    uri, _ = registered
    assert str(rc.find_version(NAME, "c0ffee", "m1", uri).version) == "1"
    assert rc.find_version(NAME, "c0ffee", "m2", uri) is None  # same config, other dataset
    assert rc.find_version(NAME, "beef", "m1", uri) is None  # same dataset, other config
    _publish(uri, val_loss=2.0, seed=1, tags={"config_hash": "c0ffee", "manifest_sha": "m2"})
    assert str(rc.find_version(NAME, "c0ffee", "m2", uri).version) == "2"


def test_find_version_raises_on_an_unreachable_registry_and_returns_none_when_absent(registered, monkeypatch,
                                                                                     refused_url):
    import time

    uri, _ = registered
    assert rc.find_version(NAME, "c0ffee", "m1", uri).version in (1, "1")
    assert rc.find_version(NAME, "other", "m1", uri) is None
    assert rc.find_version("never-registered", "c0ffee", "m1", uri) is None

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    down = refused_url
    t0 = time.monotonic()
    with pytest.raises(rc.RegistryError, match=rf"unreachable or failing .*{down}"):
        rc.find_version(NAME, "c0ffee", "m1", down)
    assert time.monotonic() - t0 < 30


def test_experiment_creation_tolerates_only_the_already_exists_race(tmp_path):
    from mlflow.exceptions import MlflowException

    from compresszoo.tracking import experiment_id

    uri = f"sqlite:///{tmp_path}/exp.db"
    client = tracking_client(uri)
    first = experiment_id(client, "race")
    assert experiment_id(client, "race") == first

    class LateClient:  # sees no experiment, then loses the creation race to `client`
        def __init__(self):
            self.calls = 0

        def get_experiment_by_name(self, name):
            self.calls += 1
            return None if self.calls == 1 else client.get_experiment_by_name(name)

        def create_experiment(self, name, artifact_location=None, tags=None):
            return client.create_experiment(name, artifact_location=artifact_location, tags=tags)

    assert experiment_id(LateClient(), "race") == first

    with pytest.raises(MlflowException) as e:  # any other failure propagates
        experiment_id(client, "")
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"


def test_experiments_open_in_mlflows_training_view(tmp_path):
    """MLflow 3's UI picks an experiment's view from the mlflow.experimentKind tag; without it
    the runs hide behind the GenAI view's toggle. New and older experiments both get it."""
    from compresszoo.tracking import EXPERIMENT_KIND_TAG, find_or_create_run

    uri = f"sqlite:///{tmp_path}/kind.db"
    client = tracking_client(uri)
    find_or_create_run(uri, "fresh", "run-a")
    old = client.create_experiment("made-before")  # as compresszoo made them until now
    find_or_create_run(uri, "made-before", "run-b")
    for exp in (client.get_experiment_by_name("fresh"), client.get_experiment(old)):
        assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_a_registry_that_is_down_fails_at_once_naming_the_address_and_the_fix(refused_url, monkeypatch):
    """With MLflow's default retries a dead server takes minutes to fail; compresszoo checks
    the connection first. The bound is a hang guard, far above the expected instant failure."""
    import time

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    t0 = time.monotonic()
    with pytest.raises(rc.RegistryError, match=rf"model '{NAME}@champion'.*unreachable.*{re.escape(refused_url)}"
                       r".*cluster/up\.sh.*MLFLOW_TRACKING_URI"):
        rc.load_registered(f"{NAME}@champion", refused_url)
    assert time.monotonic() - t0 < 60
    monkeypatch.setenv("COMPRESSZOO_TRACKING_CONNECT_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="COMPRESSZOO_TRACKING_CONNECT_TIMEOUT='soon': give seconds"):
        rc.load_registered(f"{NAME}@champion", refused_url)


_RACER = textwrap.dedent("""
    import pathlib, sys, time
    from compresszoo import registry_client as rc
    from compresszoo.models.io import weights_id
    ready, go, ref, uri = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    ready.write_text("")
    deadline = time.monotonic() + 300
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit("no start signal")
        time.sleep(0.01)
    t0 = time.time()
    model = rc.load_registered(ref, uri)
    print("WID", weights_id(model), "SPAN", t0, time.time(), flush=True)
""")


def test_concurrent_first_downloads_all_load_the_verified_weights(registered, tmp_path):
    uri, wid = registered
    cache, go = tmp_path / "race-cache", tmp_path / "go"
    # Every racer stages, hashes and then waits 2 s before its rename: with a shared staging
    # name one racer's rename would steal another's file (FileNotFoundError) or expose bytes
    # another racer is still writing.
    env = {**os.environ, "COMPRESSZOO_CACHE": str(cache), "COMPRESSZOO_TEST_SLOW_COPY": "2"}
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(r), str(go), f"{NAME}@champion", uri],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in ready]
    try:
        import time

        deadline = time.monotonic() + 300
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a racer died early"
            time.sleep(0.05)
        go.write_text("")  # all start at once, on an empty cache
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    spans = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert f"WID {wid}" in out, (out, err[-2000:])
        spans.append([float(v) for v in out.split("SPAN")[1].split()])
    # The race really happened: at least two racers went through the 2 s staging window
    # (a cache hit is fast), and those windows overlapped in time.
    staged = [(a, b) for a, b in spans if b - a >= 2.0]
    assert len(staged) >= 2 and max(a for a, _ in staged) < min(b for _, b in staged), spans
    left = sorted(str(f.relative_to(cache)) for f in cache.rglob("*") if f.is_file())
    assert left == [f"{NAME}/1/model.safetensors"]  # no staged leftovers


def test_cache_path_takes_only_positive_integer_versions_inside_the_cache(registered, tmp_path):
    uri, _ = registered
    real = tracking_client(uri).get_model_version_by_alias(NAME, "champion").version
    assert rc.cache_path(NAME, real) == (tmp_path / "cache").resolve() / NAME / "1" / "model.safetensors"
    for bad in ("../../../x", "0", "-1", "1.5", "", "1/../../x"):
        with pytest.raises(rc.RegistryError, match="not a positive integer"):
            rc.cache_path(NAME, bad)
    with pytest.raises(rc.RegistryError, match="outside the cache"):
        rc.cache_path("..", "1")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "x").exists()


def test_a_version_without_its_checksum_tag_is_refused(registered, tmp_path):
    uri, _ = registered
    tracking_client(uri).delete_model_version_tag(NAME, "1", "weights_sha256")
    for load in (rc.download, rc.load_registered):
        with pytest.raises(rc.RegistryError, match=f"{NAME} version 1 .*has no weights_sha256 tag"):
            load(f"{NAME}@champion", uri)
    assert not (tmp_path / "cache").exists()


def test_a_read_only_lookup_never_creates_a_registry(tmp_path, monkeypatch):
    from compresszoo import zoo

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    expected = rf"no MLflow registry at {re.escape(f'sqlite:///{empty}/mlflow.db')} .*set MLFLOW_TRACKING_URI"
    with pytest.raises(rc.RegistryError, match=expected):
        rc.download(f"{NAME}@champion")
    with pytest.raises(rc.RegistryError, match=expected):
        rc.load_registered(f"{NAME}:1")
    with pytest.raises(rc.RegistryError, match=expected):
        zoo.bmshj2018_factorized(quality=8, pretrained=True, N=8, M=12)
    assert rc.find_version(NAME, "c0ffee", "m1") is None
    assert list(empty.iterdir()) == []
