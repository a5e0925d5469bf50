"""Streams exchanged with CompressAI 1.2.8 for all four architectures, mbt2018 in CompressAI's
raster order (models/raster.py), and the container's record of the order.

Each case shares one set of weights between a compresszoo model and CompressAI's class
(our state dict, CDF tables included, loaded strictly into theirs). Streams are compared
byte for byte (integers: exact). Decoded latents y_hat = symbol + mean are compared within
1e-3: the symbols are integers, so a difference below 0.5 means every symbol is the same,
and the means are float results (the same operations here, but equality is not exact by
construction). Pixels within 1e-4, 1/40 of an 8-bit step: two float syntheses of equal
latents (the float noise measured across CPUs is ~4e-7, tests/test_codec.py).
"""

from __future__ import annotations

import importlib
import struct
import zlib

import pytest
import torch
from photos import photo

from compresszoo.codec import ContainerError, decode_image, encode_image, read_header
from compresszoo.codec.container import FLAG_RASTER, unpack
from compresszoo.codec.image import decode_streams, encode_with_latents
from compresszoo.models import ARCHITECTURES, create_model
from compresszoo.models.raster import raster_compress, raster_decompress

REF_CLASSES = {
    "bmshj2018-factorized": "FactorizedPrior",
    "bmshj2018-hyperprior": "ScaleHyperprior",
    "mbt2018-mean": "MeanScaleHyperprior",
    "mbt2018": "JointAutoregressiveHierarchicalPriors",
}
LATENT_TOL = 1e-3
PIXEL_TOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Both libraries on one intra-op thread: the float coders use the caller's settings, and
    thousands of tiny per-position steps only lose to thread synchronisation."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _pair(name: str, quality: int = 3, debug: bool = True):
    """(ours, CompressAI's) with the same weights; latents and densities spread so the
    streams hold many distinct symbols and scale indexes."""
    torch.manual_seed(quality)
    ours = create_model(name, quality, debug=debug).eval()
    with torch.no_grad():
        ours.g_a[6].weight.mul_(20.0)
        ours.entropy_bottleneck.quantiles.mul_(3.0)
    ours.update(force=True)
    google = importlib.import_module("compressai.models.google")
    ref = getattr(google, REF_CLASSES[name])(ours.N, ours.M).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def _ref_latents(ref) -> list:
    """The latents CompressAI decodes, captured at the input of its g_s."""
    seen: list = []
    ref.g_s.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    return seen


def _photos(h: int = 128, w: int = 192) -> torch.Tensor:
    return torch.stack([photo("astronaut", h, w), photo("coffee", h, w, 100, 200)])


CASES = [(name, 3, True) for name in ARCHITECTURES] + [("mbt2018", 1, False)]


@pytest.mark.parametrize("name,quality,debug", CASES,
                         ids=[f"{n}-{'debug' if d else f'q{q}'}" for n, q, d in CASES])
def test_streams_exchange_with_compressai_both_ways(name, quality, debug):
    ours, ref = _pair(name, quality, debug)
    x = _photos() if debug else _photos(64, 128)  # q1 (N=M=192): 4x8 latents, 32 raster steps
    order = "raster" if name == "mbt2018" else "wavefront"
    seen = _ref_latents(ref)
    with torch.no_grad():
        theirs = ref.compress(x)
        mine = ours.compress(x, return_latents=True, order=order)
        # CompressAI encodes, compresszoo decodes ...
        from_theirs = ours.decompress(theirs["strings"], theirs["shape"], order=order)
        # ... and the reverse
        ref_x = ref.decompress(mine["strings"], mine["shape"])["x_hat"]
    assert mine["y_hat"].round().unique().numel() >= 5  # many distinct symbols, not all zeros
    assert mine["strings"] == theirs["strings"]  # the same bytes, every stream
    assert tuple(mine["shape"]) == tuple(theirs["shape"])
    assert torch.equal(from_theirs["y_hat"], mine["y_hat"])
    assert (seen[-1] - mine["y_hat"]).abs().max().item() < LATENT_TOL
    assert (ref_x - from_theirs["x_hat"]).abs().max().item() < PIXEL_TOL


def test_mbt2018_wavefront_stays_the_default_and_raster_is_the_reference_order():
    ours, ref = _pair("mbt2018")
    x = _photos()
    with torch.no_grad():
        theirs = ref.compress(x)
        default = ours.compress(x, return_latents=True)
        raster = raster_compress(ours, x, return_latents=True)
        wave = ours.compress(x, return_latents=True, order="wavefront")
    assert default["strings"] == wave["strings"]
    assert raster["strings"] == theirs["strings"] != default["strings"]
    # The same symbols in another order: same latents, same stream sizes give or take a word.
    assert torch.equal(raster["y_hat"], default["y_hat"])
    assert torch.equal(raster_decompress(ours, theirs["strings"], theirs["shape"])["y_hat"], raster["y_hat"])
    # A stream decoded in the wrong order is refused or decodes to other latents, never silently equal.
    try:
        wrong = ours.decompress(theirs["strings"], theirs["shape"])["y_hat"]
    except ValueError:
        wrong = None
    assert wrong is None or not torch.equal(wrong, raster["y_hat"])
    with pytest.raises(ValueError, match="order"):
        ours.compress(x, order="zigzag")


def test_portable_raster_is_exact_and_codes_the_wavefront_latents():
    """The fixed-point raster coder computes the wavefront coder's integers (exact sums),
    so both orders give bitwise the same latents; its own round trip is exact."""
    ours, _ = _pair("mbt2018")
    x = _photos()
    with torch.no_grad():
        raster = ours.compress(x, return_latents=True, portable=True, order="raster")
        wave = ours.compress(x, return_latents=True, portable=True)
        back = ours.decompress(raster["strings"], raster["shape"], portable=True, order="raster")
    assert raster["strings"][1] == wave["strings"][1]  # z is coded the same way
    assert raster["strings"][0] != wave["strings"][0]
    assert torch.equal(raster["y_hat"], wave["y_hat"])
    assert torch.equal(back["y_hat"], raster["y_hat"])


def test_container_records_the_order_and_decodes_in_it():
    ours, _ = _pair("mbt2018")
    x = photo("rocket", 96, 128)
    raster, y_raster = encode_with_latents(ours, x, order="raster")
    wave = encode_image(ours, x)
    assert read_header(raster).order == "raster" and raster[3] & FLAG_RASTER
    assert read_header(wave).order == "wavefront" and not wave[3] & FLAG_RASTER
    assert unpack(raster)[1] != unpack(wave)[1]
    header, out = decode_streams(raster, ours)
    assert header.order == "raster" and torch.equal(out["y_hat"], y_raster)
    assert torch.equal(decode_image(raster, ours), decode_image(wave, ours))
    # The bit decides the order: cleared (checksum rebuilt), the raster streams are refused
    # or decode to other latents.
    body = bytearray(raster[:-4])
    body[3] &= ~FLAG_RASTER
    cleared = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    try:
        wrong = decode_streams(cleared, ours)[1]["y_hat"]
    except ContainerError:
        wrong = None
    assert wrong is None or not torch.equal(wrong, y_raster)


def test_other_architectures_record_one_order_and_refuse_the_bit():
    ours, _ = _pair("bmshj2018-hyperprior")
    x = photo("rocket", 64, 64)
    data = encode_image(ours, x, order="raster")
    assert data == encode_image(ours, x)  # same streams: the file says wavefront
    assert read_header(data).order == "wavefront"
    body = bytearray(data[:-4])
    body[3] |= FLAG_RASTER
    with pytest.raises(ContainerError, match="raster-order bit"):
        read_header(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))
    with pytest.raises(ValueError, match="unknown coding order"):
        encode_image(ours, x, order="zigzag")
