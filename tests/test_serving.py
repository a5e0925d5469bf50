"""Registered versions as MLflow Models: pyfunc without pickle, the model card, `mlflow models
serve` over real HTTP. One debug model, gated on real photos and registered in a real sqlite
registry, serves every test of the module."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from photos import as_tensor as _tensor
from photos import png_bytes as _png
from PIL import Image
from skimage import data as skdata

from compresszoo import registry_client as rc
from compresszoo.tracking import client as tracking_client

NAME = "bmshj2018-factorized-mse-q8-N8-M12"
REF = f"{NAME}@champion"


def _pixels(png: bytes) -> torch.Tensor:
    return _tensor(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


PHOTO = skdata.chelsea()[:120, :176]  # a real photo, not a multiple of the model's stride


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """(tracking uri, root): version 1 of NAME, gated on two real 256x256 photo crops, with
    the RD plot attached as gate_and_register attaches it. The environment points at it."""
    from compresszoo.codec import validate_bitrate
    from compresszoo.models import create_model
    from compresszoo.models.registry import spec_of
    from compresszoo.publish import RD_PLOT, rd_plot, rd_position

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root}/mlflow.db"
    env = {"MLFLOW_TRACKING_URI": uri, "COMPRESSZOO_CACHE": str(root / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        client = tracking_client(uri)
        exp = client.create_experiment("serving", artifact_location=str(root / "artifacts"))
        torch.manual_seed(0)
        model = create_model("bmshj2018-factorized", 8, debug=True)
        model.update(force=True)
        images = [_tensor(skdata.astronaut()[:256, :256]), _tensor(skdata.coffee()[:256, 100:356])]
        report = validate_bitrate(model, images)
        run = client.create_run(exp)
        plot = rd_plot(report, root / RD_PLOT, title=NAME)
        position = rd_position(spec_of(model), report)
        version, champion = rc.register(
            model, name=NAME, run_id=run.info.run_id, config={"data": "s3://bucket/vimeo", "max_steps": 12},
            report=report, rd_point={"bpp": report["overall"]["real_bpp"]}, val_loss=1.0,
            tags={"steps": 12, "manifest_sha": "0123abcd", "config_hash": "c0ffee", "parent": f"{NAME}:7"},
            attachments={RD_PLOT: plot}, tracking_uri=uri, rd_position=position)
        assert (version, champion) == ("1", True)
        yield uri, root, report


def _version_dir(uri: str, version: str = "1") -> Path:
    mv = tracking_client(uri).get_model_version(NAME, version)
    return Path(mv.source.removeprefix("file://"))


def test_a_version_is_an_mlflow_model_without_pickle_with_a_model_card(registry):
    uri, root, report = registry
    folder = _version_dir(uri)
    files = sorted(p.name for p in folder.iterdir())
    assert {"MLmodel", "model.safetensors", "config.json", "bitrate_report.json", "rd_point.json",
            "input_example.json", "serving_input_example.json", "requirements.txt", "rd_plot.png"} <= set(files)
    # No pickle anywhere: no pickle file name, no file starting with a pickle protocol header.
    for p in folder.rglob("*"):
        if p.is_file():
            head = p.read_bytes()[:2]
            assert not (p.suffix in {".pkl", ".pickle", ".cloudpickle"} or (head[:1] == b"\x80" and head[1:] < b"\x06")), p
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "compresszoo.serving.pyfunc" and "python_model" not in pyfunc
    assert mlmodel["flavors"]["compresszoo"]["weights_sha256"] == rc.sha256_file(folder / "model.safetensors")
    assert mlmodel["model_size_bytes"] > (folder / "model.safetensors").stat().st_size
    sig = mlmodel["signature"]
    assert json.loads(sig["inputs"]) == [{"type": "binary", "name": "data", "required": True}]
    assert [c["name"] for c in json.loads(sig["outputs"])] == ["data", "height", "width", "bpp"]
    assert json.loads(sig["params"])[0]["name"] == "mode"
    example = json.loads((folder / "serving_input_example.json").read_text())
    png = base64.b64decode(example["dataframe_split"]["data"][0][0])
    assert png.startswith(b"\x89PNG") and example["params"] == {"mode": "encode"}
    assert (folder / "rd_plot.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((folder / "bitrate_report.json").read_text())["overall"] == report["overall"]

    # The model card: what the model is, how it was trained, what the gate measured.
    card = tracking_client(uri).get_model_version(NAME, "1").description
    overall = report["overall"]
    lmbda = rc.load_registered(REF).meta["lmbda"]
    for field in ("bmshj2018-factorized", "| metric | mse |", "| quality | 8 |", f"| lambda | {lmbda:g} |",
                  "| N, M | 8, 12 |", "| steps | 12 |", "s3://bucket/vimeo (manifest sha256 0123abcd)",
                  f"| fine-tuned from | {NAME}:7 |", f"{overall['real_bpp']:.4f}", f"{overall['payload_bpp']:.4f}",
                  f"{overall['psnr']:.2f}", f"{overall['relative_gap']:+.2%}", "rd_plot.png",
                  f"models:/{REF}"):
        assert field in card, (field, card)
    # ...and where it sits against the published zoo: these tiny channels, measured on two
    # photo crops, are plainly not comparable with the published Kodak point at quality 8.
    from compresszoo.evaluate.compare import PUBLISHED_ZOO

    published = json.loads(PUBLISHED_ZOO.read_text())["results"]["bmshj2018-factorized"]
    for field in ("RD position against the published zoo (not comparable)", "Kodak",
                  "N=8, M=12 is not the zoo's N=192, M=320 at quality 8",
                  "measured on 2 held-out image(s)", f"| published, quality 8 | {published['bpp'][7]:.4f} | "
                  f"{published['psnr'][7]:.2f} |", f"| this model | {overall['payload_bpp']:.4f} |"):
        assert field in card, (field, card)


def test_compresszoo_loads_the_same_artifacts_and_old_versions(registry, tmp_path, capsys):
    """load_registered (checksum checked), the CLI, and a version registered before MLmodel
    files existed (plain files only) all keep working."""
    from compresszoo import cli
    from compresszoo.models import create_model
    from compresszoo.models.io import save_weights, weights_id

    uri, root, _ = registry
    model = rc.load_registered(REF)
    assert model.meta["N"] == 8
    src = tmp_path / "cat.png"
    src.write_bytes(_png(PHOTO))
    assert cli.main(["encode", str(src), "-o", str(tmp_path / "cat.czoo"), "--model", REF]) == 0
    assert cli.main(["decode", str(tmp_path / "cat.czoo"), "-o", str(tmp_path / "back.png"), "--model", REF]) == 0
    assert "1 image(s) of 176x120" in capsys.readouterr().out

    # The old layout: the four plain files, no MLmodel; compresszoo still loads it, verified.
    client = tracking_client(uri)
    torch.manual_seed(1)
    old = create_model("bmshj2018-factorized", 8, debug=True)
    old.update(force=True)
    run = client.create_run(client.get_experiment_by_name("serving").experiment_id)
    d = tmp_path / "model"
    save_weights(old, d / "model.safetensors")
    for f in ("config.json", "bitrate_report.json", "rd_point.json"):
        (d / f).write_text("{}")
    client.log_artifacts(run.info.run_id, str(d), "model")
    source = f"{client.get_run(run.info.run_id).info.artifact_uri}/model"
    mv = client.create_model_version(NAME, source, run_id=run.info.run_id,
                                     tags={"weights_sha256": rc.sha256_file(d / "model.safetensors")})
    assert weights_id(rc.load_registered(f"{NAME}:{mv.version}")) == weights_id(old)
    # ...and a corrupted file of the new layout is refused by the pyfunc loader too.
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    bad = tmp_path / "corrupt"
    shutil.copytree(_version_dir(uri), bad)
    weights = bytearray((bad / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(MlflowException, match="checksum mismatch"):
        mlflow.pyfunc.load_model(str(bad))


def test_pyfunc_round_trip_in_a_fresh_process(registry, tmp_path):
    """models:/NAME@champion loads in a process that has only the environment; its .czoo
    decodes with the model compresszoo loads, to the quality of a direct encode/decode."""
    from compresszoo.codec import decode_image, encode_image
    from compresszoo.models.loss import psnr

    (tmp_path / "in.png").write_bytes(_png(PHOTO))
    code = textwrap.dedent(f"""
        import pathlib, pandas as pd, mlflow.pyfunc
        d = pathlib.Path({str(tmp_path)!r})
        m = mlflow.pyfunc.load_model("models:/{REF}")
        enc = m.predict(pd.DataFrame({{"data": [(d / "in.png").read_bytes()]}}))
        (d / "out.czoo").write_bytes(enc["data"][0])
        dec = m.predict(pd.DataFrame({{"data": [enc["data"][0]]}}), params={{"mode": "decode"}})
        (d / "out.png").write_bytes(dec["data"][0])
        print("shape", enc["height"][0], enc["width"][0], dec["height"][0], dec["width"][0])
        for data, params in ((b"not a czoo file", {{"mode": "decode"}}), (b"GIF89a garbage", None),
                             (enc["data"][0], {{"mode": "compress"}})):
            try:
                m.predict(pd.DataFrame({{"data": [data]}}), params=params)
            except ValueError as e:
                print("refused", type(e).__name__, str(e).splitlines()[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shape 120 176 120 176" in out.stdout
    refusals = [line for line in out.stdout.splitlines() if line.startswith("refused ServingInputError")]
    assert len(refusals) == 3, out.stdout
    assert "bad magic" in refusals[0] and "row 0 (image)" in refusals[1] and "mode='compress'" in refusals[2]

    model = rc.load_registered(REF)
    x = _tensor(PHOTO)
    direct = encode_image(model, x)
    served = (tmp_path / "out.czoo").read_bytes()
    # Same model (the decoder checks the weights id in the header), so the served file decodes here.
    assert torch.allclose(decode_image(served, model), decode_image(direct, model), atol=1e-5)
    # The served PNG is the decode rounded to 8 bits: within one level of the direct decode, so
    # its PSNR is the direct one up to that rounding (< 0.05 dB at this model's quality).
    back = _pixels((tmp_path / "out.png").read_bytes())
    assert (back - decode_image(direct, model).clamp(0, 1)).abs().max() <= 1 / 255 + 1e-6
    assert abs(psnr(back, x) - psnr(decode_image(direct, model), x)) < 0.05
    assert abs(len(served) - len(direct)) <= 0.01 * len(direct)


# ------------------------------------------------------------------ mlflow models serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _invoke(url: str, payloads: list[bytes], mode: str) -> tuple[int, dict]:
    rows = [[base64.b64encode(p).decode()] for p in payloads]
    return _post(f"{url}/invocations", {"dataframe_split": {"columns": ["data"], "data": rows},
                                        "params": {"mode": mode}})


@pytest.fixture(scope="module")
def served(registry):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` on 127.0.0.1; its URL.
    Stopped (its whole process group) at the end, whatever happened."""
    uri, root, _ = registry
    log = open(root / "serve.log", "wb")  # noqa: SIM115 - closed below, after the server
    # The port is free when chosen; if another process takes it first the server exits and
    # the readiness loop below reports its log.
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{REF}", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1", "-t", "60"],
        # MLflow execs `uvicorn` by name: the venv's bin must be on PATH (an activated venv).
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "COMPRESSZOO_CACHE": str(root / "cache"),
             "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow models serve exited {proc.returncode}: "
                                     f"{(root / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow models serve not ready in 90 s: {(root / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group may already be gone
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


def test_mlflow_models_serve_encodes_and_decodes_over_http(served, registry):
    from compresszoo.codec import decode_image, encode_image
    from compresszoo.models.loss import psnr

    model = rc.load_registered(REF)
    photo2 = skdata.astronaut()[100:164, 200:296]
    status, enc = _invoke(served, [_png(PHOTO), _png(photo2)], "encode")
    assert status == 200, enc
    rows = enc["predictions"]
    assert [(r["height"], r["width"]) for r in rows] == [(120, 176), (64, 96)]
    czoo = [base64.b64decode(r["data"]) for r in rows]
    assert all(abs(r["bpp"] - 8 * len(c) / (r["height"] * r["width"])) < 1e-9 for r, c in zip(rows, czoo))

    status, dec = _invoke(served, czoo, "decode")
    assert status == 200, dec
    for arr, r in zip((PHOTO, photo2), dec["predictions"]):
        x = _tensor(arr)
        back = _pixels(base64.b64decode(r["data"]))
        direct = decode_image(encode_image(model, x), model)
        # 8-bit rounding of the PNG answer, as in the fresh-process test.
        assert abs(psnr(back, x) - psnr(direct, x)) < 0.05

    # Hostile or wrong input is a 400 with the reason, and the server keeps serving.
    status, err = _invoke(served, [b"CZ\x02" + b"\xff" * 64], "decode")
    assert status == 400 and "row 0 (.czoo file): corrupted file" in err["message"], err
    status, err = _invoke(served, [b"\x89PNG\r\n\x1a\n not really"], "encode")
    assert status == 400 and "row 0 (image)" in err["message"], err
    status, again = _invoke(served, [_png(PHOTO)], "encode")
    assert status == 200 and base64.b64decode(again["predictions"][0]["data"]).startswith(b"CZ")


def test_pyfunc_loads_from_an_s3_backed_registry(s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    """The cluster's layout: sqlite (or a server) for the registry, artifacts on S3."""
    import mlflow.pyfunc
    import pandas as pd

    from compresszoo.codec import decode_image
    from compresszoo.models import create_model
    from compresszoo.models.io import weights_id

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("COMPRESSZOO_CACHE", str(tmp_path / "cache"))
    client = tracking_client(uri)
    exp = client.create_experiment("s3", artifact_location=f"{s3_bucket}/mlflow")
    torch.manual_seed(2)
    model = create_model("bmshj2018-factorized", 8, debug=True)
    model.update(force=True)
    run = client.create_run(exp)
    assert rc.register(model, name=NAME, run_id=run.info.run_id, config={}, report={}, rd_point={}, tags={},
                       val_loss=1.0, tracking_uri=uri) == ("1", True)
    assert client.get_model_version(NAME, "1").source.startswith("s3://")

    served = mlflow.pyfunc.load_model(f"models:/{REF}")
    czoo = served.predict(pd.DataFrame({"data": [_png(PHOTO)]}))["data"][0]
    mine = rc.load_registered(REF)
    assert weights_id(mine) == weights_id(model)
    png = served.predict(pd.DataFrame({"data": [czoo]}), params={"mode": "decode"})["data"][0]
    # One process, one model: the PNG is exactly the decode rounded to 8 bits.
    expected = (decode_image(czoo, mine).clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), expected)
