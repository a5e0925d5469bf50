"""Tests written against mutants that survived `make mutation` (benchmarks/mutation.py) in the
bitrate gate (codec/gate.py) and the rANS coder's Python layer (ans/rans.py).

The gate: every number in its report is checked against the same quantity measured here
without the gate (the file's bytes, its streams, a real decode, the model's likelihoods), the
failure rows (encode or decode failing) keep what was measured and name what failed, and
apply_gate's verdict and reasons are checked at each threshold's edge.
"""

from __future__ import annotations

import math
import struct
import time

import numpy as np
import pytest
import torch
from photos import photo, updated

from compresszoo.ans import rans
from compresszoo.codec import GateThresholds, validate_bitrate
from compresszoo.codec.container import unpack
from compresszoo.codec.gate import apply_gate
from compresszoo.codec.image import decode_image, encode_image, pad
from compresszoo.models.loss import ms_ssim, psnr

# ===================================================================== the gate


def _estimate(model, x: torch.Tensor) -> float:
    """-sum(log2 p) over all latents of the padded input, per pixel of the unpadded image."""
    with torch.no_grad():
        lik = model(pad(x[None]))["likelihoods"]
    bits = sum(float(-torch.log2(v).sum()) for v in lik.values())
    return bits / (x.shape[-2] * x.shape[-1])


def _payload_bytes(data: bytes) -> int:
    _, streams = unpack(data)
    return sum(len(s) for img in streams for s in img)


@pytest.fixture(scope="module")
def factorized():
    # The tiny factorized model estimates well under 1 bpp and codes close to its estimate.
    return updated("bmshj2018-factorized")


# mutmut runs, for a mutant, only the tests that called the mutated function: a report made
# in a module-scoped fixture would count for the first test using it only. So each test below
# makes its own report and checks all of it.


def _honest_report(factorized):
    """One 161x200 photo (MS-SSIM needs a side of at least 161) and a batch of two different
    160x176 crops (too small for MS-SSIM, and below min_side=161 for the gap)."""
    single = photo("astronaut", 161, 200)
    batch = torch.stack([photo("coffee", 160, 176, 50, 60), photo("chelsea", 160, 176, 10, 20)])
    thresholds = GateThresholds(min_side=161)
    t0 = time.perf_counter()
    report = validate_bitrate(factorized, [single, batch], thresholds)
    wall = time.perf_counter() - t0
    return report, [single, batch[0], batch[1]], thresholds, wall


def test_an_honest_report_holds_what_the_file_and_a_real_decode_measure_and_their_means(factorized):
    report, images, thresholds, wall = _honest_report(factorized)
    assert len(report["images"]) == 3  # the batch gives one row per image
    for row, x in zip(report["images"], images):
        h, w = x.shape[-2:]
        data = encode_image(factorized, x[None])  # the gate codes each image as a batch of one
        assert (row["height"], row["width"]) == (h, w)
        assert row["error"] is None and row["exact"] is True
        # the estimate is per pixel of the image, taken on the padded input the coder sees
        assert row["estimated_bpp"] == pytest.approx(_estimate(factorized, x), rel=1e-5)
        assert row["real_bpp"] == 8 * len(data) / (h * w)  # the whole file
        assert row["payload_bpp"] == 8 * _payload_bytes(data) / (h * w)  # the rANS streams
        assert row["payload_bpp"] < row["real_bpp"]
        gap = (row["payload_bpp"] - row["estimated_bpp"]) / row["estimated_bpp"]
        assert row["relative_gap"] == pytest.approx(gap, rel=1e-9)
        decoded = decode_image(data, factorized)  # (1, 3, h, w), as encoded
        assert row["psnr"] == pytest.approx(psnr(decoded, x[None]), rel=1e-6)
        if row is report["images"][0]:
            assert row["ms_ssim"] == pytest.approx(ms_ssim(decoded, x[None]).item(), rel=1e-5)
        assert 0 < row["encode_seconds"] < wall and 0 < row["decode_seconds"] < wall
    assert 0 < report["images"][0]["ms_ssim"] < 1
    # a side of 160 is too small for MS-SSIM: left out, not failed
    assert report["images"][1]["ms_ssim"] is None and report["images"][2]["ms_ssim"] is None
    # each batch image has its own row (each row matched its own image above)
    assert report["images"][1]["psnr"] != pytest.approx(report["images"][2]["psnr"], rel=1e-3)

    # overall: means over all rows, the gap over the images of at least min_side
    rows, overall = report["images"], report["overall"]
    assert report["thresholds"] == {"max_relative_gap": 0.03, "require_exact": True, "min_side": 161}

    def mean(key):
        return sum(r[key] for r in rows) / len(rows)

    assert overall["num_images"] == 3 and overall["all_exact"] is True
    assert overall["num_gap_images"] == 1  # 161 >= min_side counts, 160 does not
    for key in ("estimated_bpp", "real_bpp", "payload_bpp", "psnr"):
        assert overall[key] == pytest.approx(mean(key), rel=1e-12), key
    assert overall["ms_ssim"] == rows[0]["ms_ssim"]  # the mean of the rows that have one
    assert overall["gap_estimated_bpp"] == rows[0]["estimated_bpp"]
    assert overall["gap_payload_bpp"] == rows[0]["payload_bpp"]
    assert overall["relative_gap"] == pytest.approx(rows[0]["relative_gap"], rel=1e-12)
    assert overall["relative_gap"] != pytest.approx(
        (overall["payload_bpp"] - overall["estimated_bpp"]) / overall["estimated_bpp"], rel=1e-3)
    for key in ("encode_seconds", "decode_seconds"):
        assert overall[key] == pytest.approx(sum(r[key] for r in rows), rel=1e-12) and overall[key] < wall
    gap = overall["relative_gap"]
    assert 0 < abs(gap) < 0.03
    assert report["passed"] is True
    assert report["reason"] == f"all 3 decodes exact; bitrate gap {gap:+.2%} within 3%"


def test_the_default_gap_needs_images_of_256_pixels_and_given_thresholds_are_used(factorized):
    """With the default thresholds a 160x176 image gives no gap: it fails on that, naming
    256x256, and the report carries the defaults; the thresholds given are the ones judged by."""
    image = photo("coffee", 160, 176, 50, 60)
    small = validate_bitrate(factorized, image[None])
    assert small["thresholds"] == {"max_relative_gap": 0.03, "require_exact": True, "min_side": 256}
    assert small["overall"]["num_gap_images"] == 0 and small["overall"]["relative_gap"] is None
    assert small["overall"]["gap_estimated_bpp"] is None and small["overall"]["gap_payload_bpp"] is None
    assert small["passed"] is False
    assert small["reason"] == "no validation image of at least 256x256 to measure the bitrate gap"
    strict = validate_bitrate(factorized, [image], GateThresholds(max_relative_gap=1e-9, min_side=160))
    assert strict["overall"]["num_gap_images"] == 1 and strict["passed"] is False
    assert strict["reason"].startswith("bitrate gap ") and strict["reason"].endswith(" exceeds 0%")
    loose = validate_bitrate(factorized, [image], GateThresholds(max_relative_gap=0.5, min_side=160))
    assert loose["passed"] is True and loose["reason"].endswith(" within 50%")


class _Failing:
    """Mixed into a zoo model's class: compress fails on (padded) inputs of height 128
    (RuntimeError), decompress on latents of width 12 (RuntimeError) or 16 (ValueError)."""

    def compress(self, x, *args, **kwargs):
        if x.shape[-2] == 128:
            raise RuntimeError("out of coder memory")
        return super().compress(x, *args, **kwargs)

    def decompress(self, strings, shape, *args, **kwargs):
        if shape[1] == 12:
            raise RuntimeError("decoder crashed")
        if shape[1] == 16:
            raise ValueError("stream is corrupt at symbol 3")
        return super().decompress(strings, shape, *args, **kwargs)


def _failing_report():
    model = updated("bmshj2018-factorized")
    model.__class__ = type("Failing", (_Failing, type(model)), {})
    images = [photo("astronaut", 64, 96), photo("coffee", 100, 64), photo("coffee", 64, 150, 30, 30),
              photo("chelsea", 64, 200)]
    t0 = time.perf_counter()
    report = validate_bitrate(model, images, GateThresholds(min_side=64))
    return model, images, report, time.perf_counter() - t0


def test_a_failed_encode_or_decode_is_a_row_that_names_the_failure_and_is_left_out_of_the_means():
    model, images, report, wall = _failing_report()
    ok, enc, dec, corrupt = report["images"]
    assert ok["error"] is None and ok["exact"] is True
    # encode failed: only the estimate was measured
    assert enc == {"height": 100, "width": 64, "estimated_bpp": pytest.approx(_estimate(model, images[1]), rel=1e-5),
                   "error": "encode failed: out of coder memory", "exact": False}
    # decode failed: the file was written and is counted, nothing decoded is
    for row, x in ((dec, images[2]), (corrupt, images[3])):
        h, w = x.shape[-2:]
        assert (row["height"], row["width"]) == (h, w)
        assert row["real_bpp"] == 8 * len(encode_image(model, x[None])) / (h * w)
        assert row["payload_bpp"] is None and row["exact"] is False
        assert row["estimated_bpp"] == pytest.approx(_estimate(model, x), rel=1e-5)
        assert 0 < row["encode_seconds"] < wall and 0 <= row["decode_seconds"] < wall
        assert not {"relative_gap", "psnr", "ms_ssim"} & set(row)
    assert dec["error"] == "decode failed: decoder crashed"
    assert corrupt["error"] == ("decode failed: corrupted file: the streams do not decode "
                                "(stream is corrupt at symbol 3)")

    rows, overall = report["images"], report["overall"]
    ok = rows[0]
    assert overall["num_images"] == 4 and overall["all_exact"] is False
    # rows 2 and 3 are large enough but have no payload: only row 0 measures the gap
    assert overall["num_gap_images"] == 1
    assert overall["gap_payload_bpp"] == ok["payload_bpp"] and overall["payload_bpp"] == ok["payload_bpp"]
    assert overall["gap_estimated_bpp"] == ok["estimated_bpp"]
    assert overall["relative_gap"] == pytest.approx(ok["relative_gap"], rel=1e-12)
    assert overall["psnr"] == ok["psnr"] and overall["ms_ssim"] is None
    assert overall["estimated_bpp"] == pytest.approx(sum(r["estimated_bpp"] for r in rows) / 4, rel=1e-12)
    assert overall["real_bpp"] == pytest.approx(sum(rows[i]["real_bpp"] for i in (0, 2, 3)) / 3, rel=1e-12)
    # the encode that failed took no counted time
    for key in ("encode_seconds", "decode_seconds"):
        assert overall[key] == pytest.approx(sum(rows[i][key] for i in (0, 2, 3)), rel=1e-12)
    assert report["passed"] is False and report["reason"] == "image 1: encode failed: out of coder memory"
    # without the failed encode, the first failure is the decode, named by its own index
    rest = {"images": rows[2:], "overall": overall}
    assert apply_gate(rest) == (False, "image 0: decode failed: decoder crashed")
    rest = {"images": [rows[0], rows[3]], "overall": overall}
    assert apply_gate(rest, GateThresholds(require_exact=False)) == (False, f"image 1: {rows[3]['error']}")


class _Certain:
    """Mixed into a zoo model's class: forward claims every latent certain (likelihood 1),
    an estimate of 0 bits; the coder still writes real streams."""

    def forward(self, x):
        out = super().forward(x)
        out["likelihoods"] = {k: torch.ones_like(v) for k, v in out["likelihoods"].items()}
        return out


def test_an_estimate_of_zero_bits_fails_with_an_infinite_gap():
    model = updated("bmshj2018-factorized")
    model.__class__ = type("Certain", (_Certain, type(model)), {})
    report = validate_bitrate(model, [photo("astronaut", 64, 64)], GateThresholds(min_side=64))
    (row,) = report["images"]
    assert row["estimated_bpp"] == 0 and row["payload_bpp"] > 0 and row["exact"] is True
    assert row["relative_gap"] == math.inf
    assert report["overall"]["relative_gap"] == math.inf
    assert report["passed"] is False
    assert report["reason"] == (f"bitrate gap +inf% between real payload bpp {row['payload_bpp']:.4f} and "
                                "estimate 0.0000 exceeds 3%")


# --------------------------------------------------------------------- apply_gate on reports


def _row(exact=True, error=None, height=256, width=256):
    return {"height": height, "width": width, "estimated_bpp": 0.5, "payload_bpp": 0.51, "exact": exact,
            "error": error}


def _report(rows, gap, est=0.5, real=0.51, num_gap_images=1):
    return {"images": rows, "overall": {"num_gap_images": num_gap_images, "relative_gap": gap,
                                        "gap_estimated_bpp": est, "gap_payload_bpp": real}}


@pytest.mark.parametrize("gap,passed", [(0.03, True), (-0.03, True), (0.0301, False), (-0.0301, False),
                                        (0.0, True)])
def test_the_default_gap_limit_is_3_percent_either_way(gap, passed):
    assert apply_gate(_report([_row()], gap))[0] is passed


def test_the_reasons_name_the_threshold_and_the_measured_values():
    assert apply_gate(_report([], 0.0)) == (False, "no validation images")
    assert apply_gate(_report([_row()], -0.0512, est=0.25, real=0.2372)) == (
        False, "bitrate gap -5.12% between real payload bpp 0.2372 and estimate 0.2500 exceeds 3%")
    assert apply_gate(_report([_row()], 0.2, est=0.25, real=0.3), GateThresholds(max_relative_gap=0.25)) == (
        True, "all 1 decodes exact; bitrate gap +20.00% within 25%")
    assert apply_gate(_report([_row()], 0.3), GateThresholds(max_relative_gap=0.25))[1].endswith("exceeds 25%")
    # the minimum side is the thresholds' own
    assert apply_gate(_report([_row()], None, num_gap_images=0), GateThresholds(min_side=96)) == (
        False, "no validation image of at least 96x96 to measure the bitrate gap")


def test_exactness_is_checked_image_by_image_unless_waived():
    rows = [_row(), _row(), _row(exact=False), _row(exact=False)]
    assert apply_gate(_report(rows, 0.01)) == (
        False, "image 2: decode not exact (decoded latents differ from the encoder's)")
    waived = GateThresholds(require_exact=False)
    assert apply_gate(_report(rows, 0.01), waived) == (True, "2 of 4 decodes exact; bitrate gap +1.00% within 3%")
    assert apply_gate(_report(rows[:2], 0.01), waived) == (True, "all 2 decodes exact; bitrate gap +1.00% within 3%")
    # an error outranks inexactness, and is reported even when exactness is waived
    rows[3] = _row(exact=False, error="decode failed: x")
    assert apply_gate(_report(rows, 0.01), waived) == (False, "image 3: decode failed: x")


# ===================================================================== the rANS coder

TABLES = (np.array([[0, 30000, 65536, 0], [0, 1000, 2000, 65536]], np.int32), [3, 4], [0, 1])


def _stream(n=50, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, 2, n).astype(np.int32)
    sym = (rng.integers(0, 2, n) + (idx == 1)).astype(np.int32)  # inside each table
    sym[7] = 5000  # one escape
    return sym, idx, rans.encode(sym, idx, *TABLES)


def test_decoding_past_the_end_names_the_first_missing_symbol_and_keeps_the_decoder():
    sym, idx, data = _stream()
    dec = rans.RansDecoder(data)
    more = np.concatenate([idx, np.zeros(9, np.int32)])
    with pytest.raises(ValueError) as err:
        dec.decode(more, *TABLES)
    assert str(err.value) == ("data: stream is truncated at symbol 50; the data is damaged or was coded with "
                              "other tables/indexes")
    # nothing was committed: the same decoder still decodes the stream from its start
    assert dec.decode(idx[:20], *TABLES).tolist() == sym[:20].tolist()
    assert dec.decode(idx[20:], *TABLES).tolist() == sym[20:].tolist()
    dec.finish()


def test_a_stream_whose_words_are_all_read_must_also_restore_the_initial_state():
    """The 8-byte empty stream is the initial state 2^31; any other state with no words left
    did not end cleanly."""
    assert rans.encode([], [], *TABLES) == struct.pack("<II", 1 << 31, 0)
    assert rans.decode(struct.pack("<II", 1 << 31, 0), [], *TABLES).shape == (0,)
    for state in ((1 << 31) + 1, 1 << 32, (1 << 31) - 1):
        with pytest.raises(ValueError) as err:
            rans.decode(struct.pack("<Q", state), [], *TABLES)
        assert str(err.value) == (f"data: stream did not end cleanly (0 words left, final state {state:#x}); it "
                                  "is damaged or was decoded with other tables/indexes")


def test_a_failed_encoder_call_names_the_symbol_in_that_call_and_commits_nothing():
    sym, idx, _ = _stream()
    enc = rans.RansEncoder()
    enc.encode_with_indexes(sym[:30], idx[:30], *TABLES)
    far = np.array([0, 0, 0, -(2**31), 0], np.int32)  # 2^31 + 1 bins below table 1's first bin
    with pytest.raises(ValueError) as err:
        enc.encode_with_indexes(far, np.ones(5, np.int32), *TABLES)
    assert str(err.value) == ("symbols: value at position 3 is more than 2^31 bins outside its table; "
                              "clamp the symbols")
    with pytest.raises(ValueError, match="^symbols: value at position 3 "):
        rans.encode(far, np.ones(5, np.int32), *TABLES)
    enc.encode_with_indexes(sym[30:], idx[30:], *TABLES)
    assert enc.flush() == rans.encode(sym, idx, *TABLES)


def test_every_kernel_error_code_becomes_a_value_error_naming_the_argument():
    """The kernels return codes, never raise; each code is translated once, here."""
    messages = {kind: str(rans._coding_error(code, 7, "data")) for code, kind in rans._ext().ERRORS.items()}
    assert messages == {
        "index": "indexes: position 7 names no cdfs row",
        "range": "symbols: value at position 7 is more than 2^31 bins outside its table; clamp the symbols",
        "truncated": "data: stream is truncated at symbol 7; the data is damaged or was coded with other "
                     "tables/indexes",
        "corrupt": "data: stream is corrupt at symbol 7; the data is damaged or was coded with other "
                   "tables/indexes",
    }
    unknown = max(rans._ext().ERRORS) + 1  # out of memory: no name of its own
    assert str(rans._coding_error(unknown, 0, "encode")).startswith("encode: stream is unknown at symbol 0")


def test_pad_cdfs_zero_pads_rows_to_the_longest_and_checks_each_row():
    out = rans.pad_cdfs([[0, 65536], np.array([0, 100, 65536], np.int64), (0, 5, 6, 65536)])
    assert out.dtype == np.int32 and out.tolist() == [[0, 65536, 0, 0], [0, 100, 65536, 0], [0, 5, 6, 65536]]
    assert rans.pad_cdfs([]).shape == (0, 0)
    with pytest.raises(ValueError, match=r"^cdfs: row 1 is not a flat sequence of integers$"):
        rans.pad_cdfs([[0, 65536], [[0, 1], [2]]])
    with pytest.raises(ValueError, match=r"^cdfs: expected int32 values, got dtype float64$"):
        rans.pad_cdfs([[0, 65536], [0.0, 65536.0]])


@pytest.mark.parametrize("value,message", [
    (2**31 - 1, "row 0 is not strictly increasing"),  # fits int32: converted, then checked as a CDF
    (2**31, "expected int32 values, got dtype int64"),
    (-(2**31), "row 0 is not strictly increasing"),
    (-(2**31) - 1, "expected int32 values, got dtype int64"),
])
def test_wider_cdf_tables_are_converted_only_when_every_value_fits_int32(value, message):
    cdfs = np.array([[0, value, 65536]], np.int64)
    with pytest.raises(ValueError, match=message):
        rans.encode([0], [0], cdfs, [3], [0])
    if "expected int32" in message:  # a row given alone is held to the same bound
        with pytest.raises(ValueError, match=message):
            rans.pad_cdfs(cdfs.tolist())
    else:
        assert rans.pad_cdfs(cdfs.tolist()).tolist() == cdfs.tolist()


def test_cdf_values_must_be_integers_and_symbols_must_be_numbers():
    with pytest.raises(ValueError, match=r"^cdfs: expected int32 values, got dtype float64$"):
        rans.encode([0], [0], np.array([[0.0, 30000.0, 65536.0]]), [3], [0])
    with pytest.raises(ValueError, match=r"^symbols: expected integers, got dtype <U1; pass an int32 array$"):
        rans.encode(["a"], [0], *TABLES)
    # booleans and integral floats are integers
    data = rans.encode(np.array([True, False]), np.array([0.0, 1.0]), *TABLES)
    assert rans.decode(data, [0, 1], *TABLES).tolist() == [1, 0]


def _bad(**change):
    sym, idx, _ = _stream(8)
    args = dict(symbols=sym, indexes=idx, cdfs=TABLES[0], cdf_lengths=TABLES[1], offsets=TABLES[2])
    args.update(change)
    return args


def _cdfs_with(row, col, value):
    cdfs = TABLES[0].copy()
    cdfs[row, col] = value
    return cdfs


# Each bad argument, and the whole message that names it and says what to do. Two tables of
# width 4: an index of 2 or 3 fits the width but names no row.
MESSAGES = {
    "index = number of tables": (_bad(indexes=np.full(8, 2)),
                                 "indexes: values 2..2 outside [0, 2); every index must name a row of cdfs"),
    "index = width - 1": (_bad(indexes=np.arange(8) % 4),
                          "indexes: values 0..3 outside [0, 2); every index must name a row of cdfs"),
    "negative index only": (_bad(indexes=np.array([0, 1, 0, 1, 0, 1, 0, -1])),
                            "indexes: values -1..1 outside [0, 2); every index must name a row of cdfs"),
    "fractional index": (_bad(indexes=np.full(8, 0.5)), "indexes: has non-integer values; round before coding"),
    "fractional length": (_bad(cdf_lengths=[3.5, 4]), "cdf_lengths: has non-integer values; round before coding"),
    "fractional offset": (_bad(offsets=[0, 0.25]), "offsets: has non-integer values; round before coding"),
    "text length": (_bad(cdf_lengths=["3", "4"]), "cdf_lengths: expected integers, got dtype <U1; pass an int32 array"),
    "sizes differ": (_bad(indexes=np.zeros(7, np.int32)),
                     "symbols/indexes: sizes differ (8 vs 7); one index per symbol"),
    "1-D cdfs": (_bad(cdfs=np.arange(9)),
                 "cdfs: expected a 2-D array (one padded row per table), got shape (9,); stack the rows with "
                 "compresszoo.ans.rans.pad_cdfs"),
    "3-D cdfs": (_bad(cdfs=TABLES[0][None]),
                 "cdfs: expected a 2-D array (one padded row per table), got shape (1, 2, 4); stack the rows with "
                 "compresszoo.ans.rans.pad_cdfs"),
    "a cdf value that is no number": (_bad(cdfs=[[0, None, 65536], [0, 1000, 2000, 65536]]),
                                      "cdfs: expected int32 values, got dtype object"),
    "one length": (_bad(cdf_lengths=[3]), "cdf_lengths/offsets: need one entry per cdfs row (2), got 1 and 2"),
    "three offsets": (_bad(offsets=[0, 0, 0]), "cdf_lengths/offsets: need one entry per cdfs row (2), got 2 and 3"),
    "length < 2": (_bad(cdf_lengths=[1, 4]), "cdfs: row 0 length 1 < 2 (a table needs at least one bin plus the "
                                             "escape bin); rebuild the quantized CDF tables (model.update())"),
    "length > width": (_bad(cdf_lengths=[3, 5]), "cdfs: row 1 length 5 exceeds the row width 4; rebuild the "
                                                 "quantized CDF tables (model.update())"),
    "not starting at 0": (_bad(cdfs=_cdfs_with(0, 0, 1)),
                          "cdfs: row 0 does not start at 0; rebuild the quantized CDF tables (model.update())"),
    "not increasing": (_bad(cdfs=_cdfs_with(1, 2, 1000)),
                       "cdfs: row 1 is not strictly increasing (every bin needs a nonzero frequency); rebuild the "
                       "quantized CDF tables (model.update())"),
    "not ending at 65536": (_bad(cdfs=_cdfs_with(1, 3, 65535)),
                            "cdfs: row 1 does not end at 65536 (16-bit precision); rebuild the quantized CDF tables "
                            "(model.update())"),
}


@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_each_bad_argument_gets_the_message_that_names_it(case):
    args, message = MESSAGES[case]
    with pytest.raises(ValueError) as err:
        rans.encode(**args)
    assert str(err.value) == message
    if not message.startswith("symbols"):  # the decoder checks the same arguments the same way
        data = rans.encode(*_stream(8)[:2], *TABLES)
        with pytest.raises(ValueError) as err:
            rans.decode(data, *(args[k] for k in ("indexes", "cdfs", "cdf_lengths", "offsets")))
        assert str(err.value) == message
        enc = rans.RansEncoder()
        with pytest.raises(ValueError) as err:
            enc.encode_with_indexes(**args)
        assert str(err.value) == message


@pytest.mark.parametrize("data,message", [
    (12, "data: expected bytes, got int; pass the encoder's output"),
    ("text", "data: expected bytes, got str; pass the encoder's output"),
    (b"\0" * 4, "data: a rANS stream is a whole number of 4-byte words, at least 2; got 4 bytes (truncated or "
                "not a stream)"),
    (b"\0" * 14, "data: a rANS stream is a whole number of 4-byte words, at least 2; got 14 bytes (truncated "
                 "or not a stream)"),
])
def test_what_is_not_a_stream_is_refused_before_decoding(data, message):
    with pytest.raises(ValueError) as err:
        rans.RansDecoder(data)
    assert str(err.value) == message


def test_ragged_nested_and_empty_tables():
    """Rows of unequal length (lists or an object array), a row given as a (1, n) array, and no
    tables at all."""
    sym, idx, data = _stream()
    ragged = [[0, 30000, 65536], [0, 1000, 2000, 65536]]
    assert rans.encode(sym, idx, ragged, *TABLES[1:]) == data
    assert rans.decode(data, idx, ragged, *TABLES[1:]).tolist() == sym.tolist()
    rows = np.empty(2, dtype=object)  # a 1-D object array of ragged rows, as np.array(rows, dtype=object) makes
    rows[0], rows[1] = np.array(ragged[0]), np.array(ragged[1])
    assert rans.encode(sym, idx, rows, *TABLES[1:]) == data
    assert rans.decode(data, idx, rows, *TABLES[1:]).tolist() == sym.tolist()
    nested = [np.array([[0, 30000, 65536]]), np.array([[0, 1000], [2000, 65536]])]
    assert rans.pad_cdfs(nested).tolist() == TABLES[0].tolist()
    empty = rans.encode([], [], *TABLES)
    for no_tables in (np.zeros((0, 4)), np.zeros((0, 0), np.int64), rans.pad_cdfs([])):
        assert rans.encode([], [], no_tables, [], []) == empty
        assert rans.decode(empty, [], no_tables, [], []).shape == (0,)
    # a table row that is empty is padded like any other (and refused by its length)
    assert rans.pad_cdfs([[], [0, 65536]]).tolist() == [[0, 0], [0, 65536]]


def test_a_buffered_encoder_grows_from_its_smallest_capacity_and_flush_empties_it():
    sym, idx, data = _stream(3000, seed=1)
    sym[::50] = 10**6  # escapes take several entries each
    enc = rans.RansEncoder(capacity=0)
    for part in np.array_split(np.arange(3000), 5):
        enc.encode_with_indexes(sym[part], idx[part], *TABLES)
    assert enc.flush() == rans.encode(sym, idx, *TABLES)
    assert enc.flush() == rans.encode([], [], *TABLES)
    enc.encode_with_indexes(sym[:3], idx[:3], *TABLES)
    assert enc.flush() == rans.encode(sym[:3], idx[:3], *TABLES)
