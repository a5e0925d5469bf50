"""`compresszoo import-checkpoint`: checkpoints written by CompressAI itself are gated,
registered as imported baselines and load with pretrained=True in a fresh process; a file
whose pickle would run code is refused without running it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from photos import photo
from PIL import Image
from safetensors.torch import load_file

from compresszoo import importer
from compresszoo.registry_client import sha256_file
from compresszoo.tracking import client as tracking_client

NAME = "bmshj2018-hyperprior-mse-q1"  # the zoo's N=128, M=192: the plain registry name


def _compressai_net(scales: float):
    """CompressAI's own bmshj2018-hyperprior at quality 1's size with spread weights: latents
    of std ~1 and hyper-synthesized scales near `scales` (0: every scale at the lower bound,
    a model whose estimate the real coder cannot meet), tables built by CompressAI."""
    from compressai.zoo import bmshj2018_hyperprior

    torch.manual_seed(0)
    net = bmshj2018_hyperprior(quality=1, pretrained=False).eval()
    with torch.no_grad():
        net.g_a[6].weight.mul_(20.0)
        net.h_s[4].weight.mul_(0.1 if scales else 0.0)
        net.h_s[4].bias.fill_(scales)
        net.entropy_bottleneck.quantiles.mul_(3.0)
    net.update(force=True)
    return net


class _RunsCode:
    """A pickled object whose loading would create `marker` (what a hostile file does)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(tracking uri, gate image folder): one sqlite registry for the module (creating one
    costs seconds), the environment pointing at it."""
    root = tmp_path_factory.mktemp("import")
    uri = f"sqlite:///{root}/mlflow.db"
    images = root / "gate"
    images.mkdir()
    for name, crop in (("astronaut", photo("astronaut")), ("coffee", photo("coffee", 256, 256, 100, 200))):
        rgb = (crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(rgb).save(images / f"{name}.png")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("COMPRESSZOO_CACHE", str(root / "cache"))
        mp.setenv("COMPRESSZOO_MLFLOW_ARTIFACTS", str(root / "artifacts"))
        yield uri, images


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compresszoo.importer", "import-checkpoint", *args],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())


def test_a_compressai_checkpoint_is_gated_registered_and_loads_pretrained(env, tmp_path, capsys):
    uri, images = env
    net = _compressai_net(scales=3.0)
    # As CompressAI's examples/train.py saves: the state dict next to optimizer state.
    ckpt = tmp_path / "checkpoint_best_loss.pth.tar"
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    torch.save({"epoch": 3, "state_dict": net.state_dict(), "loss": 1.25,
                "optimizer": optimizer.state_dict()}, ckpt)
    sha = sha256_file(ckpt)
    out = _cli(str(ckpt), "--arch", "bmshj2018-hyperprior", "--metric", "mse", "--quality", "1",
               "--images", str(images), "--registry", uri)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"registered as version 1 (imported=true, source sha256 {sha})" in out.stdout

    client = tracking_client(uri)
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["imported"] == "true" and mv.tags["source_sha256"] == sha
    assert mv.tags["source_file"] == ckpt.name
    assert {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()} == {"champion": "1"}
    run = client.get_run(mv.run_id)
    assert run.data.tags["gate.passed"] == "True" and run.data.tags["imported"] == "true"
    gap = run.data.metrics["gate_relative_gap"]
    assert abs(gap) <= 0.03 and run.data.metrics["gate_payload_bpp"] > 1.0  # a real rate, not ~0

    # A fresh process: the zoo function, with the registry from the environment.
    dump = tmp_path / "loaded.safetensors"
    code = textwrap.dedent(f"""
        import compresszoo.zoo as zoo
        from safetensors.torch import save_file
        m = zoo.bmshj2018_hyperprior(quality=1, pretrained=True)
        save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, {str(dump)!r})
    """)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env=os.environ.copy())
    assert child.returncode == 0, child.stderr[-3000:]
    loaded, source = load_file(str(dump)), net.state_dict()
    assert loaded.keys() == source.keys()
    for k, v in source.items():  # every weight as CompressAI saved it; the CDF tables rebuilt equal
        assert torch.equal(loaded[k].to(v.dtype), v), k

    # The same file again: found, not registered twice (in-process: the same parser and handler).
    assert importer.main(["import-checkpoint", str(ckpt), "--arch", "bmshj2018-hyperprior", "--quality",
                          "1", "--images", str(images)]) == 0
    assert "already registered as version 1" in capsys.readouterr().out
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]


def test_the_gate_refuses_a_bare_state_dict_it_cannot_code_and_nothing_registers(env, tmp_path, capsys):
    uri, images = env
    bare = tmp_path / "bare.pth.tar"
    torch.save(_compressai_net(scales=0.0).state_dict(), bare)  # the published zoo's layout
    code = importer.main(["import-checkpoint", str(bare), "--arch", "bmshj2018-hyperprior", "--quality", "1",
                          "--images", str(images), "--registry", uri])
    err = capsys.readouterr().err
    assert code == 1 and "refused by the gate: bitrate gap" in err and "not registered" in err
    versions = tracking_client(uri).search_model_versions(f"name = '{NAME}'")  # the other test's, if run
    assert all(v.tags.get("source_sha256") != sha256_file(bare) for v in versions)
    runs = tracking_client(uri).search_runs(
        [tracking_client(uri).get_experiment_by_name("compresszoo").experiment_id],
        filter_string=f"tags.source_sha256 = '{sha256_file(bare)}'")
    assert [r.data.tags["gate.passed"] for r in runs] == ["False"]  # the verdict is logged


def test_a_checkpoint_that_would_run_code_is_refused_unrun(env, tmp_path, capsys):
    uri, images = env
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.pth.tar"
    state = _compressai_net(scales=3.0).state_dict()
    torch.save({"state_dict": state, "extra": _RunsCode(str(marker))}, hostile, pickle_protocol=2)
    # The payload is real: an unrestricted load runs it.
    torch.load(hostile, weights_only=False)
    assert marker.exists()
    marker.unlink()
    code = importer.main(["import-checkpoint", str(hostile), "--arch", "bmshj2018-hyperprior", "--quality",
                          "1", "--images", str(images), "--registry", uri])
    err = capsys.readouterr().err
    assert code == 2 and "pickled objects other than tensors" in err and "refused" in err
    assert not marker.exists()
    with pytest.raises(importer.CheckpointError, match="not a readable PyTorch checkpoint"):
        importer.read_state_dict(images / "astronaut.png")
    with pytest.raises(importer.CheckpointError, match="does not fit mbt2018"):
        importer.model_from_state_dict(state, "mbt2018", "mse", 1)
