"""`compresszoo decode` without --model: the registered version is found from the identity
the file records (architecture, metric, quality, N, M, weights fingerprint) in a real sqlite
registry holding several versions of the same name, one of them in the pre-MLmodel layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from compresszoo import cli
from compresszoo import registry_client as rc
from compresszoo.models import create_model
from compresszoo.tracking import client as tracking_client

NAME = "bmshj2018-factorized-mse-q8-N8-M12"


def _model(seed: int):
    torch.manual_seed(seed)
    m = create_model("bmshj2018-factorized", 8, debug=True)
    m.update(force=True)
    return m.eval()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """{seed: version}: versions 1 (champion) and 2 (seeds 0, 1) as MLflow Models, 3 (seed 2) in
    the old plain-files layout, 4 the same weights as 1 again."""
    from compresszoo.models.io import save_weights

    root = tmp_path_factory.mktemp("lookup")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("COMPRESSZOO_CACHE", str(root / "cache"))
        client = tracking_client(uri)
        exp = client.create_experiment("lookup", artifact_location=str(root / "artifacts"))
        for seed, loss in ((0, 1.0), (1, 2.0)):
            run = client.create_run(exp)
            rc.register(_model(seed), name=NAME, run_id=run.info.run_id, config={}, report={}, rd_point={},
                        tags={}, val_loss=loss, tracking_uri=uri)
        run = client.create_run(exp)  # the layout of versions registered before MLmodel files
        old = root / "old" / "model"
        save_weights(_model(2), old / "model.safetensors")
        client.log_artifacts(run.info.run_id, str(old.parent), None)
        client.create_model_version(NAME, f"{client.get_run(run.info.run_id).info.artifact_uri}/model",
                                    run_id=run.info.run_id,
                                    tags={"weights_sha256": rc.sha256_file(old / "model.safetensors")})
        run = client.create_run(exp)
        rc.register(_model(0), name=NAME, run_id=run.info.run_id, config={}, report={}, rd_point={},
                    tags={}, val_loss=3.0, tracking_uri=uri)
        yield mp


def _encode(tmp_path, model, name: str):
    from compresszoo.codec import encode_image

    x = torch.from_numpy(skdata.astronaut()[:64, :96].copy()).permute(2, 0, 1).float() / 255
    (tmp_path / name).write_bytes(encode_image(model, x))
    return x


@pytest.mark.parametrize("seed, version", [(1, "2"), (2, "3"), (0, "1")])
def test_decode_finds_the_registered_version_by_the_files_identity(registry, tmp_path, capsys, seed, version):
    from compresszoo.codec import decode_image

    model = _model(seed)
    _encode(tmp_path, model, "f.czoo")
    assert cli.main(["decode", str(tmp_path / "f.czoo"), "-o", str(tmp_path / "out.png")]) == 0
    assert f"using the registered {NAME}:{version}" in capsys.readouterr().out  # 1, not its twin 4
    expected = (decode_image((tmp_path / "f.czoo").read_bytes(), model).clamp(0, 1).permute(1, 2, 0).numpy()
                * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), expected)


def test_decode_without_a_match_says_so_and_writes_nothing(registry, tmp_path, capsys):
    _encode(tmp_path, _model(9), "f.czoo")  # weights nobody registered
    assert cli.main(["decode", str(tmp_path / "f.czoo"), "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert f"no registered version of {NAME}" in err and "4 version(s) checked" in err and "--model" in err
    other = create_model("bmshj2018-factorized", 3, debug=True)  # a name with no versions at all
    other.update(force=True)
    _encode(tmp_path, other.eval(), "g.czoo")
    assert cli.main(["decode", str(tmp_path / "g.czoo"), "-o", str(tmp_path / "out.png")]) == 2
    assert "0 version(s) checked" in capsys.readouterr().err
    registry.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none.db")
    assert cli.main(["decode", str(tmp_path / "f.czoo"), "-o", str(tmp_path / "out.png")]) == 2
    assert "no registry at" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.czoo", "g.czoo"]  # no image, no database
