"""The public image-file helpers (compresszoo.read_image / write_image): the tensors the codec
takes, from paths or bytes, and back to files; hostile files refused before decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from test_hostile_codec import png_header_only

from compresszoo import read_image, write_image
from compresszoo.imagefiles import InputError
from compresszoo.limits import LimitError

PHOTO = skdata.astronaut()[:48, :80]


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_read_image_gives_the_codec_tensor_from_a_path_or_bytes(tmp_path):
    (tmp_path / "p.png").write_bytes(_png(PHOTO))
    x = read_image(tmp_path / "p.png")
    assert x.shape == (3, 48, 80) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(PHOTO).permute(2, 0, 1).float() / 255)
    assert torch.equal(read_image(_png(PHOTO)), x)
    gray = skdata.camera()[:16, :24]
    g = read_image(_png(gray))
    assert g.shape == (3, 16, 24) and torch.equal(g[0], g[2]) and torch.equal(g[0] * 255, torch.from_numpy(gray).float())
    import imagecodecs  # 16-bit from bytes too: all 16 bits, not Pillow's 8

    low = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint16)
    np.testing.assert_allclose(read_image(imagecodecs.png_encode(low)).permute(1, 2, 0).numpy(), low / 65535.0,
                               rtol=0, atol=1e-7)


def test_read_image_refuses_hostile_files_by_name(tmp_path):
    with pytest.raises(LimitError, match="COMPRESSZOO_MAX_PIXELS"):
        read_image(png_header_only(40000, 40000))
    with pytest.raises(InputError, match=r"cannot read image .*nothing\.png: no such file"):
        read_image(tmp_path / "nothing.png")
    with pytest.raises(InputError, match="cannot read image: UnidentifiedImageError"):
        read_image(b"GIF89a garbage")


def test_write_image_round_trips_and_refuses_what_it_cannot_write(tmp_path):
    x = torch.from_numpy(PHOTO).permute(2, 0, 1).float() / 255
    write_image(x, tmp_path / "a.png")
    assert torch.equal(read_image(tmp_path / "a.png"), x)  # 8-bit values survive exactly
    write_image(x[None] + 0.3 / 255, tmp_path / "b.png")  # (1, 3, H, W) as decode_image of a 1-batch
    assert torch.equal(read_image(tmp_path / "b.png"), x)  # rounded to the nearest level
    write_image(x, tmp_path / "c.jpg")
    assert Image.open(tmp_path / "c.jpg").format == "JPEG"
    with pytest.raises(InputError, match="unsupported output extension '.xyz'"):
        write_image(x, tmp_path / "d.xyz")
    with pytest.raises(InputError, match="one RGB image"):
        write_image(torch.stack([x, x]), tmp_path / "e.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.jpg"]  # nothing half-written
