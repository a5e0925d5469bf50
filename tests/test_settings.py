"""Settings read from the environment: the MLflow tracking URI rule and the S3 endpoint."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from compresszoo import storage
from compresszoo.tracking import resolve_tracking_uri


def test_a_relative_sqlite_uri_is_made_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///runs/x.db") == f"sqlite:///{tmp_path}/runs/x.db"
    assert resolve_tracking_uri("sqlite:///../x.db") == f"sqlite:///{tmp_path.parent}/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == resolve_tracking_uri("") == f"sqlite:///{tmp_path}/env.db"
    # the argument wins over the environment; absolute and non-sqlite URIs are kept as given
    assert resolve_tracking_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    # resolved once: the same file after a change of directory (what Ray workers do)
    resolved = resolve_tracking_uri("sqlite:///here.db")
    monkeypatch.chdir(tmp_path.parent)
    assert resolve_tracking_uri(resolved) == resolved == f"sqlite:///{tmp_path}/here.db"


def _expected_s3(endpoint: str, scheme: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(region="us-east-1", endpoint_override=endpoint, scheme=scheme)


@pytest.fixture
def bare_s3_env(monkeypatch):
    for k in ("COMPRESSZOO_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.parametrize("endpoint, host, scheme", [
    ("http://127.0.0.1:9000", "127.0.0.1:9000", "http"),
    ("https://s3.example.org", "s3.example.org", "https"),
    ("minio.internal:9000", "minio.internal:9000", "https"),  # no scheme: https, never plain http
    ("s3.example.org", "s3.example.org", "https"),
    ("http://127.0.0.1:9000/", "127.0.0.1:9000", "http"),
])
def test_endpoint_with_or_without_a_scheme(bare_s3_env, endpoint, host, scheme):
    bare_s3_env.setenv("AWS_ENDPOINT_URL", endpoint)
    fs, path = storage.resolve("s3://bucket/key")
    assert path == "bucket/key"
    assert fs.equals(_expected_s3(host, scheme)), fs.__reduce__()[1]


def test_compresszoo_s3_endpoint_is_used_and_wins_over_aws_endpoint_url(bare_s3_env):
    bare_s3_env.setenv("COMPRESSZOO_S3_ENDPOINT", "storage.lan:9000")
    assert storage.resolve("s3://b/k")[0].equals(_expected_s3("storage.lan:9000", "https"))
    bare_s3_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert storage.resolve("s3://b/k")[0].equals(_expected_s3("storage.lan:9000", "https"))


def test_compresszoo_s3_endpoint_reaches_a_real_server(s3_bucket, s3_endpoint, monkeypatch, refused_url):
    """Bytes go to the server COMPRESSZOO_S3_ENDPOINT names, even with AWS_ENDPOINT_URL pointing
    at a port that refuses connections."""
    monkeypatch.setenv("COMPRESSZOO_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", refused_url)
    uri = f"{s3_bucket}/settings/blob.bin"
    storage.write_bytes(uri, b"through the endpoint")
    assert storage.read_bytes(uri) == b"through the endpoint"
    import boto3

    obj = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=s3_bucket[5:], Key="settings/blob.bin")
    assert obj["Body"].read() == b"through the endpoint"
    assert os.environ["AWS_ENDPOINT_URL"] == refused_url
