"""Gate and registry end to end on S3: train, gate, register, load pretrained in a fresh process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from compresszoo.config import smoke

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
    from mlflow.tracking import MlflowClient

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

    client = MlflowClient(tracking, registry_uri=tracking)
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


def test_champion_moves_only_to_a_better_version_and_errors_name_model_and_server(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from compresszoo import registry_client as rc
    from compresszoo.models import create_model

    uri = f"sqlite:///{tmp_path}/reg.db"
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    client = MlflowClient(uri, registry_uri=uri)
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
    with pytest.raises(rc.RegistryError, match=r"unreachable .*http://127\.0\.0\.1:9"):
        rc.download(f"{name}@champion", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match="bad model reference"):
        rc.parse_ref("no spaces allowed@x y")
