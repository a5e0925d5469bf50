"""Shared fixtures: a real S3 endpoint (moto's server on 127.0.0.1), a small Ray, the miniature dataset."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import uuid

import pytest

_PLATFORM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform")
try:
    import compresszoo  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, _PLATFORM)
    # Ray workers and child processes import it too.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_PLATFORM, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of an S3 server on 127.0.0.1; the environment points boto3 and pyarrow at it."""
    from moto.server import ThreadedMotoServer

    # Port 0: the server binds a free port itself, so no other process can take it between
    # choosing and binding (the race a "find a free port, then bind it" helper has).
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def refused_url():
    """http://127.0.0.1:PORT where connections are refused: the port is bound by this fixture
    but never listened on, so nothing else can take it and every connect fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh empty bucket on the test endpoint, as 's3://name'."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """A small local Ray; started after the S3 environment so its workers inherit it."""
    import ray

    # address="local": a fresh Ray of our own, even if another `ray start` cluster runs here.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def miniature(tmp_path_factory):
    """A Vimeo90K-format folder (8 septuplets: 6 train, 2 test) made from real photographs."""
    from compresszoo.data import make_miniature

    return make_miniature(str(tmp_path_factory.mktemp("vimeo_mini")), sequences=8, test_sequences=2)


@pytest.fixture(scope="session")
def cluster_local():
    """cluster/local.py as a module (cluster/ is scripts, not a package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster", "local.py")
    spec = importlib.util.spec_from_file_location("compresszoo_cluster_local", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shard_miniature(miniature, ray_session, tmp_path_factory):
    """shard_miniature(**params) -> a folder of shards of the miniature, made once per params."""
    from compresszoo.data.shards import prepare

    made: dict = {}

    def make(**params) -> str:
        key = tuple(sorted(params.items()))
        if key not in made:
            made[key] = str(tmp_path_factory.mktemp("shards"))
            prepare(miniature, made[key], progress=False, **params)
        return made[key]

    return make


@pytest.fixture(scope="session")
def shards(shard_miniature) -> str:
    """The miniature sharded once for the training and sweep tests (small row groups)."""
    return shard_miniature(row_group_mb=0.05)
