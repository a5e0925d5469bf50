"""The Ray Serve application (compresszoo.serving.ray_serve) on the session's Ray: real HTTP
on 127.0.0.1 against a model registered in a real sqlite registry, loaded by the replica
from there (checksum checked)."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from photos import as_tensor as _tensor
from photos import png_bytes as _png
from PIL import Image
from skimage import data as skdata
from test_hostile_codec import png_header_only

from compresszoo import registry_client as rc
from compresszoo.tracking import client as tracking_client

NAME = "bmshj2018-factorized-mse-q8-N8-M12"
REF = f"{NAME}@champion"
PHOTO = skdata.astronaut()[40:160, 100:276]  # 120x176: a real photo, not a multiple of 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, timeout: float = 60) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """(base URL, the registered model): version 1 of NAME in a tmp sqlite registry, served by
    one application on the session's Ray; Serve is shut down at the end."""
    from ray import serve

    from compresszoo.models import create_model
    from compresszoo.serving.ray_serve import start

    root = tmp_path_factory.mktemp("ray_serve")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("COMPRESSZOO_CACHE", str(root / "cache"))  # forwarded to the replicas
        mp.setenv("COMPRESSZOO_MAX_REQUEST_BYTES", str(1 << 20))
        client = tracking_client(uri)
        exp = client.create_experiment("serve", artifact_location=str(root / "artifacts"))
        torch.manual_seed(0)
        model = create_model("bmshj2018-factorized", 8, debug=True)
        model.update(force=True)
        run = client.create_run(exp)
        assert rc.register(model, name=NAME, run_id=run.info.run_id, config={}, report={}, rd_point={},
                           tags={}, val_loss=1.0, tracking_uri=uri) == ("1", True)
        try:
            urls = start([REF], port=_free_port(), tracking_uri=uri, min_replicas=1, max_replicas=2,
                         num_cpus=0.5)
            yield urls[REF], model.eval()
        finally:
            serve.shutdown()


def test_serve_encodes_and_decodes_a_photo_over_http(served):
    from compresszoo.codec import decode_image, encode_image
    from compresszoo.models.loss import psnr

    url, model = served
    assert url.endswith(f"/{NAME}/champion")
    with urllib.request.urlopen(url, timeout=30) as r:
        identity = json.loads(r.read())
    assert identity["ref"] == REF and (identity["N"], identity["M"]) == (8, 12)
    from compresszoo.models.io import weights_id

    assert identity["weights_id"] == weights_id(model)  # the registered weights, loaded verified

    status, czoo, headers = _post(f"{url}/encode", _png(PHOTO))
    assert status == 200, czoo[:300]
    assert headers["content-type"] == "application/x-czoo" and czoo.startswith(b"CZ")
    assert (headers["x-height"], headers["x-width"]) == ("120", "176")
    status, png, headers = _post(f"{url}/decode", czoo)
    assert status == 200 and headers["content-type"] == "image/png", png[:300]
    back = _tensor(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    x = _tensor(PHOTO)
    direct = encode_image(model, x)
    # Another process and thread count: the file may differ by a latent rounded the other way,
    # but decodes here (same weights) to the direct quality; the PNG adds 8-bit rounding.
    assert abs(len(czoo) - len(direct)) <= 0.01 * len(direct)
    assert abs(psnr(back, x) - psnr(decode_image(direct, model), x)) < 0.05
    assert abs(psnr(decode_image(czoo, model), x) - psnr(decode_image(direct, model), x)) < 0.05


def test_serve_batches_concurrent_requests(served):
    url, _ = served
    # 12 requests at once: while one batch is coded the others queue and leave as one batch.
    crops = [_png(np.ascontiguousarray(skdata.coffee()[i * 20:i * 20 + 128, :192])) for i in range(12)]
    with ThreadPoolExecutor(len(crops)) as pool:
        answers = list(pool.map(lambda body: _post(f"{url}/encode", body), crops))
    assert [a[0] for a in answers] == [200] * len(crops)
    assert max(int(a[2]["x-batch-size"]) for a in answers) > 1, [a[2]["x-batch-size"] for a in answers]


def test_serve_refuses_hostile_input_with_4xx_and_keeps_serving(served):
    from compresszoo.codec import encode_image
    from compresszoo.models import create_model

    url, _ = served
    torch.manual_seed(5)
    other = create_model("bmshj2018-factorized", 8, debug=True)
    other.update(force=True)
    cases = [
        ("decode", b"CZ\x02" + b"\xff" * 64, 400, "corrupted"),
        ("decode", encode_image(other, _tensor(PHOTO[:64, :64])), 400, "encoded with"),
        ("encode", b"\x89PNG\r\n\x1a\n not really", 400, "cannot read image"),
        ("encode", b"", 400, "empty body"),
        ("encode", png_header_only(40000, 40000), 413, "COMPRESSZOO_MAX_PIXELS"),
        ("encode", b"\0" * (2 << 20), 413, "COMPRESSZOO_MAX_REQUEST_BYTES"),
    ]
    for route, body, code, words in cases:
        status, answer, _ = _post(f"{url}/{route}", body)
        assert status == code and words in json.loads(answer)["error"], (route, words, status, answer[:300])
    status, czoo, _ = _post(f"{url}/encode", _png(PHOTO[:64, :64]))
    assert status == 200 and czoo.startswith(b"CZ")
