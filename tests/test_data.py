"""The dataset layer: sharding (local and S3), manifest, resume after a kill, bad input, the streaming reader."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from compresszoo import storage
from compresszoo.data import (
    BadInputError,
    Manifest,
    ShardError,
    TrainStream,
    prepare,
    scan_source,
    validation_batches,
)
from compresszoo.data.images import BadImage, decode_rgb, encode_qoi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small shards and row groups so that the 56-frame miniature has ~11 shards and ~30 fragments.
PARAMS = {"shard_size_mb": 1.0, "row_group_mb": 0.3}
READ = {"batch_size": 4, "crop": 64, "task_cpus": 0.5, "shuffle_buffer": 8}


def listed_keys(src: str, split: str) -> list[str]:
    lines = open(os.path.join(src, f"sep_{split}list.txt")).read().split()
    return [f"{seq}/im{k}" for seq in lines for k in range(1, 8)]


def sha256_file(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def epoch_keys(streams: list[TrainStream]) -> list[list[str]]:
    """One epoch of every rank's stream: the keys each rank yielded, in order."""
    out = []
    for stream in streams:
        keys = []
        for images, batch_keys in stream.epoch_batches(with_keys=True):
            assert images.dtype.is_floating_point and images.shape[1:] == (3, READ["crop"], READ["crop"])
            assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
            keys += batch_keys
        out.append(keys)
    return out


def two_ranks(dst: str, **kw) -> list[TrainStream]:
    return [TrainStream(dst, rank=r, world_size=2, **{**READ, **kw}) for r in range(2)]


@pytest.fixture(scope="module")
def shards(shard_miniature) -> str:
    """The miniature sharded once, uninterrupted, to a local folder (several shards)."""
    return shard_miniature(**PARAMS)


def copy_of(shards: str, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(shards, dst)
    return dst


# ---- sharding ------------------------------------------------------------------------------


def test_local_shards_match_the_lists(shards, miniature):
    manifest = Manifest.load(shards)
    for split in ("train", "test"):
        keys = []
        for s in manifest.shards_for(split):
            path = os.path.join(shards, s.path)
            assert os.path.getsize(path) == s.bytes and sha256_file(path) == s.sha256
            assert list(pq.ParquetFile(path).metadata.to_dict()["row_groups"][i]["num_rows"] for i in range(len(s.row_groups))) == list(s.row_groups)
            keys += pq.read_table(path, columns=["key"]).column("key").to_pylist()
        assert sorted(keys) == sorted(listed_keys(miniature, split))
        assert manifest.frames(split) == len(listed_keys(miniature, split))
    assert len(manifest.shards) >= 6 and sum(len(s.row_groups) for s in manifest.shards_for("train")) >= 12
    doc = json.loads(open(os.path.join(shards, "_manifest.json")).read())
    assert doc["format_version"] == 2 and doc["source"]["lists"]["train"]["file"] == "sep_trainlist.txt"
    assert doc["splits"]["train"]["frames"] == 42 and doc["bad_input"]["missing"]["count"] == 0
    assert doc["codec"] == "qoi"
    # Frames are stored as QOI, losslessly: every row decodes to its source PNG's pixels.
    rows = pq.read_table(os.path.join(shards, manifest.shards[0].path)).to_pylist()
    for row in rows:
        assert row["image"][:4] == b"qoif" and row["crc32"] == zlib.crc32(row["image"])
        source = np.asarray(Image.open(os.path.join(miniature, "sequences", row["key"] + ".png")))
        assert np.array_equal(decode_rgb(row["image"]), source)
    row = rows[0]
    assert (row["height"], row["width"]) == (256, 448)


def test_s3_source_and_destination_give_the_same_shards(ray_session, miniature, shards, s3_bucket):
    src, dst = f"{s3_bucket}/vimeo", f"{s3_bucket}/shards"
    fs, path = storage.resolve(src)
    pafs.copy_files(miniature, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    manifest = prepare(src, dst, progress=False, **PARAMS)

    local = Manifest.load(shards)
    assert manifest.shards == local.shards  # same frames, same plan: byte-identical shards
    remote = Manifest.load(dst)
    assert remote.shards == local.shards and remote.source["uri"] == src
    import boto3

    s3 = boto3.client("s3")
    bucket = s3_bucket[len("s3://") :]
    for s in remote.shards:
        assert s3.head_object(Bucket=bucket, Key=f"shards/{s.path}")["ContentLength"] == s.bytes
    # Read back from S3: 2 ranks see every training frame exactly once.
    ranks = epoch_keys(two_ranks(dst, even_batches=False))
    assert collections.Counter(ranks[0] + ranks[1]) == collections.Counter(listed_keys(miniature, "train"))


def test_resume_after_killing_the_sharder(ray_session, miniature, shards, tmp_path):
    dst = str(tmp_path / "killed")
    log = open(tmp_path / "child.log", "w")
    child = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "pipelines", "prepare_vimeo90k.py"), "--src", miniature, "--dst", dst,
         "--shard-size-mb", str(PARAMS["shard_size_mb"]), "--row-group-mb", str(PARAMS["row_group_mb"]),
         "--max-parallel", "1", "--quiet", "--ray-address", ray_session.get_runtime_context().gcs_address],
        stdout=log, stderr=subprocess.STDOUT,
    )
    parts = os.path.join(dst, "_parts")

    def finished():
        return sorted(n for n in os.listdir(parts) if n.endswith(".json")) if os.path.isdir(parts) else []

    # Only a hang is caught here (a sharder that lives but writes nothing); a slow, loaded
    # machine must not fail the test, so the bound is far above the ~10 s this takes.
    deadline = time.monotonic() + 900
    while len(finished()) < 2:
        assert child.poll() is None, open(tmp_path / "child.log").read()
        assert time.monotonic() < deadline, "the sharder wrote no two shards in 900 s: hung"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    time.sleep(0.5)  # a task already running may still land its shard

    planned = len(Manifest.load(shards).shards)
    assert not os.path.exists(os.path.join(dst, "_manifest.json")), "a manifest before the last shard"
    done = finished()
    assert 2 <= len(done) < planned, f"the sharder finished {len(done)}/{planned} shards before the kill"
    kept = [name.removesuffix(".json") for name in done]
    inodes = {name: os.stat(os.path.join(dst, name)).st_ino for name in kept}
    # A finished shard damaged afterwards must be redone, not trusted.
    damaged = kept[0]
    with open(os.path.join(dst, damaged), "r+b") as f:
        f.truncate(100)

    manifest = prepare(miniature, dst, progress=False, **PARAMS)

    assert open(os.path.join(dst, "_manifest.json")).read() == open(os.path.join(shards, "_manifest.json")).read()
    for s in manifest.shards:
        assert sha256_file(os.path.join(dst, s.path)) == sha256_file(os.path.join(shards, s.path)) == s.sha256
    for name, inode in inodes.items():  # kept, not rewritten (a rewrite renames a new file in)
        assert (os.stat(os.path.join(dst, name)).st_ino == inode) == (name != damaged), name
    assert not [n for n in os.listdir(dst) + os.listdir(parts) if ".tmp-" in n]


# ---- reading -------------------------------------------------------------------------------


def test_two_workers_see_every_frame_once_in_a_new_order_each_epoch(shards, miniature):
    streams = two_ranks(shards, even_batches=False)
    first, second = epoch_keys(streams), epoch_keys(streams)
    train = collections.Counter(listed_keys(miniature, "train"))
    for epoch in (first, second):
        assert not set(epoch[0]) & set(epoch[1])
        assert collections.Counter(epoch[0] + epoch[1]) == train
    assert first[0] != second[0] and first[1] != second[1]
    assert streams[0].epoch == streams[1].epoch == 2
    # Same seed, same order: the shuffle is reproducible.
    assert epoch_keys(two_ranks(shards, even_batches=False)) == first


def test_even_batches_give_every_rank_the_same_steps(shards):
    streams = two_ranks(shards)
    steps = streams[0].steps_this_epoch()
    assert steps == streams[1].steps_this_epoch() and steps > 0
    ranks = epoch_keys(streams)
    assert [len(k) for k in ranks] == [steps * READ["batch_size"]] * 2
    assert len(set(ranks[0] + ranks[1])) == 2 * steps * READ["batch_size"]  # no frame twice
    dropped = sum(s.stats()["dropped_rows"] for s in streams)
    assert dropped == 42 - 2 * steps * READ["batch_size"]


def test_resume_mid_epoch_loses_no_frame(shards, miniature):
    streams = two_ranks(shards, even_batches=False)
    seen = []
    for stream in streams:  # stop each rank after two batches, as a crash after a checkpoint
        for i, (_, keys) in enumerate(stream.epoch_batches(with_keys=True)):
            seen += keys
            if i == 1:
                break
    saved = json.loads(json.dumps([s.position() for s in streams]))
    assert all(p["epoch"] == 0 and p["next"] is not None for p in saved) and len(json.dumps(saved)) < 1000

    resumed = two_ranks(shards, even_batches=False, position=saved)
    rest = epoch_keys(resumed)
    train = set(listed_keys(miniature, "train"))
    assert set(seen) | set(rest[0]) | set(rest[1]) == train
    repeated = len(seen) + len(rest[0]) + len(rest[1]) - len(train)
    assert 0 <= repeated < len(seen)  # only rows of fragments in flight at the stop come again
    assert all(s.epoch == 1 for s in resumed)
    with pytest.warns(UserWarning, match="1 of 2 ranks"):  # one rank's position alone: the epoch restarts
        assert TrainStream(shards, rank=0, world_size=2, position=saved[0], **READ).position()["consumed"] == \
            two_ranks(shards)[0].position()["consumed"]
    # A different world size resumes from the union of both ranks' positions.
    alone = TrainStream(shards, rank=0, world_size=1, position=saved, **{**READ, "even_batches": False})
    (keys,) = epoch_keys([alone])
    assert set(seen) | set(keys) == train and len(keys) < len(train)


def test_too_many_workers_for_the_data_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="cannot give 64 workers a batch of 4"):
        TrainStream(shards, rank=0, world_size=64, **READ)


def test_corrupt_row_is_skipped_and_counted(shards, miniature, tmp_path):
    dst = copy_of(shards, tmp_path)
    shard = Manifest.load(dst).shards_for("train")[0]
    path = os.path.join(dst, shard.path)
    row = pq.read_table(path).slice(0, 1).to_pylist()[0]
    data = open(path, "rb").read()
    at = data.index(row["image"]) + len(row["image"]) // 2  # inside the image data, same file size
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 64)

    streams = two_ranks(dst, even_batches=False)
    ranks = epoch_keys(streams)
    expected = collections.Counter(listed_keys(miniature, "train"))
    del expected[row["key"]]
    assert collections.Counter(ranks[0] + ranks[1]) == expected
    stats = [s.stats() for s in streams]
    assert sum(s["skipped_rows"] for s in stats) == 1
    assert [k for s in stats for k, _ in s["skipped"]] == [row["key"]]
    assert "CRC-32 mismatch" in [r for s in stats for _, r in s["skipped"]][0]
    # With equal steps, the rank that lost a row still yields as many batches as the other.
    even = two_ranks(dst)
    steps = even[0].steps_this_epoch()
    ranks = epoch_keys(even)
    assert [len(k) for k in ranks] == [steps * READ["batch_size"]] * 2 and row["key"] not in ranks[0] + ranks[1]


def test_truncated_or_missing_shard_fails_naming_it(shards, tmp_path):
    dst = copy_of(shards, tmp_path)
    shard = Manifest.load(dst).shards_for("train")[1]
    path = os.path.join(dst, shard.path)
    with open(path, "r+b") as f:
        f.truncate(shard.bytes // 2)
    with pytest.raises(ShardError, match=shard.path):
        TrainStream(dst, **READ)
    os.remove(path)
    with pytest.raises(ShardError, match=f"{shard.path} is missing"):
        TrainStream(dst, **READ)


def test_corrupt_footer_fails_naming_the_shard_while_reading(shards, tmp_path):
    dst = copy_of(shards, tmp_path)
    shard = Manifest.load(dst).shards_for("train")[2]
    with open(os.path.join(dst, shard.path), "r+b") as f:  # same size, footer destroyed
        f.seek(shard.bytes - 64)
        f.write(b"\0" * 64)
    stream = TrainStream(dst, **{**READ, "shuffle_buffer": 0})
    with pytest.raises(ShardError, match=f"{shard.path} is not readable Parquet"):
        for _ in stream.epoch_batches():
            pass


def test_validation_batches_are_center_crops_of_the_test_split(shards, miniature):
    stats = {}
    batches = list(validation_batches(shards, crop=64, batch_size=5, stats=stats, task_cpus=0.5))
    assert [len(b) for b in batches] == [5, 5, 4] and stats["skipped_rows"] == 0
    first_key = Manifest.load(shards).shards_for("test")[0]
    row = pq.read_table(os.path.join(shards, first_key.path)).slice(0, 1).to_pylist()[0]
    img = decode_rgb(row["image"])
    center = img[(256 - 64) // 2 : (256 + 64) // 2, (448 - 64) // 2 : (448 + 64) // 2]
    assert np.allclose(batches[0][0].permute(1, 2, 0).numpy() * 255, center, atol=1e-3)
    assert batches[0].is_contiguous() and batches[0].dtype == torch.float32
    limited = list(validation_batches(shards, crop=64, batch_size=5, limit=7, task_cpus=0.5))
    assert [len(b) for b in limited] == [5, 2]


# ---- bad input -----------------------------------------------------------------------------


@pytest.fixture
def damaged_source(miniature, tmp_path):
    """A copy of the miniature with one of each problem the sharder must report."""
    src = str(tmp_path / "damaged")
    shutil.copytree(miniature, src)
    seq = os.path.join(src, "sequences")
    os.remove(os.path.join(seq, "00001/0001/im3.png"))
    with open(os.path.join(seq, "00001/0002/im1.png"), "wb") as f:
        f.write(b"not a png")
    Image.new("L", (448, 256)).save(os.path.join(seq, "00001/0003/im7.png"))
    with open(os.path.join(src, "sep_trainlist.txt"), "a") as f:
        f.write("garbage line\n00001/0001\n")
    return src


def test_bad_input_is_counted_named_and_skipped(ray_session, damaged_source, tmp_path):
    dst = str(tmp_path / "out")
    manifest = prepare(damaged_source, dst, progress=False, **PARAMS)
    bad = manifest.bad_input
    assert {k: v["count"] for k, v in bad.items()} == {"list": 2, "missing": 1, "unreadable": 1, "not_rgb": 1}
    assert bad["missing"]["items"][0][0] == "00001/0001/im3"
    assert bad["unreadable"]["items"][0][0] == "00001/0002/im1"
    assert bad["not_rgb"]["items"][0] == ["00001/0003/im7", "PNG grayscale 8-bit, expected 8-bit RGB"]
    assert [n for n, _ in bad["list"]["items"]] == ["sep_trainlist.txt:7", "sep_trainlist.txt:8"]
    assert manifest.frames("train") == 42 - 3
    keys = {k for s in manifest.shards for k in pq.read_table(os.path.join(dst, s.path)).column("key").to_pylist()}
    assert not keys & {"00001/0001/im3", "00001/0002/im1", "00001/0003/im7"}


def test_on_bad_fail_stops_naming_the_problems(ray_session, damaged_source, miniature, tmp_path):
    with pytest.raises(BadInputError, match="00001/0001/im3") as e:
        prepare(damaged_source, str(tmp_path / "a"), on_bad="fail", progress=False, **PARAMS)
    assert "sep_trainlist.txt:7" in str(e.value) and not os.path.exists(tmp_path / "a")
    # A frame that only turns out bad when decoded stops the run too, named.
    src = str(tmp_path / "one_bad")
    shutil.copytree(miniature, src)
    with open(os.path.join(src, "sequences/00001/0002/im4.png"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(BadInputError, match="00001/0002/im4"):
        prepare(src, str(tmp_path / "b"), on_bad="fail", progress=False, **PARAMS)


def test_missing_and_wrong_lists(miniature, tmp_path):
    src = str(tmp_path / "lists")
    shutil.copytree(miniature, src)
    os.remove(os.path.join(src, "sep_testlist.txt"))
    scan = scan_source(src)
    assert set(scan.lists) == {"train"} and scan.report.names("list") == ["sep_testlist.txt"]
    with open(os.path.join(src, "sep_trainlist.txt"), "w") as f:
        f.write("09999/0001\n09999/0002\n")
    with pytest.raises(BadInputError, match="none of its 2 sequences exist"):
        scan_source(src)
    os.remove(os.path.join(src, "sep_trainlist.txt"))
    with pytest.raises(BadInputError, match="no sep_trainlist.txt"):
        scan_source(src)
    with pytest.raises(BadInputError, match="does not exist"):
        scan_source(str(tmp_path / "nowhere"))


def test_cli_reports_bad_input_and_exits_nonzero(damaged_source, tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pipelines", "prepare_vimeo90k.py"), "--src", damaged_source,
         "--dst", str(tmp_path / "out"), "--on-bad", "fail"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "1 missing frames: 00001/0001/im3" in out.stderr and "Traceback" not in out.stderr


def test_triplet_layout_is_read_from_its_lists(tmp_path):
    from compresszoo.data import make_miniature

    src = make_miniature(str(tmp_path / "tri"), sequences=3, test_sequences=1, tuplet="tri")
    scan = scan_source(src)
    assert scan.tuplet == "tri" and scan.lists["train"]["file"] == "tri_trainlist.txt"
    assert [f.key for f in scan.frames if f.split == "test"] == ["00001/0003/im1", "00001/0003/im2", "00001/0003/im3"]
    assert len(scan.frames) == 9 and not scan.report


def test_png_codec_keeps_the_source_bytes_and_gives_the_same_crops(ray_session, miniature, shards, tmp_path):
    dst = str(tmp_path / "png-shards")
    manifest = prepare(miniature, dst, progress=False, codec="png", **PARAMS)
    assert json.loads(open(os.path.join(dst, "_manifest.json")).read())["codec"] == "png"
    for row in pq.read_table(os.path.join(dst, manifest.shards[0].path)).to_pylist():
        assert row["image"] == open(os.path.join(miniature, "sequences", row["key"] + ".png"), "rb").read()
        assert row["crc32"] == zlib.crc32(row["image"])
    # The same frames through either codec give the same crops, bit for bit.
    png = list(validation_batches(dst, crop=64, batch_size=5, task_cpus=0.5))
    qoi = list(validation_batches(shards, crop=64, batch_size=5, task_cpus=0.5))
    assert len(png) == len(qoi) == 3 and all(torch.equal(a, b) for a, b in zip(png, qoi))
    with pytest.raises(ValueError, match="codec='jpeg': choose one of qoi, png"):
        prepare(miniature, str(tmp_path / "x"), progress=False, codec="jpeg")


def test_qoi_frames_are_checked_before_and_while_decoding(miniature, tmp_path):
    img = np.asarray(Image.open(os.path.join(miniature, "sequences/00001/0001/im1.png")))
    data = encode_qoi(img)
    assert np.array_equal(decode_rgb(data), img) and len(data) < img.nbytes
    rgba = bytearray(data)
    rgba[12] = 4
    huge = bytearray(data)
    huge[4:12] = (60000).to_bytes(4, "big") * 2
    for bad, kind, match in [(data[:-3], "unreadable", "truncated"), (data[:9], "unreadable", "shorter than"),
                             (bytes(rgba), "not_rgb", "4 channels"), (bytes(huge), "unreadable", "pixels")]:
        with pytest.raises(BadImage, match=match) as e:
            decode_rgb(bad)
        assert e.value.kind == kind
    # Mutated, truncated and random QOI bytes in a child process: it survives, every failure
    # is a BadImage (flips inside the pixel data may decode: the reader's CRC-32 catches those).
    (tmp_path / "f.qoi").write_bytes(data)
    script = f"""
import random
from compresszoo.data.images import BadImage, decode_rgb
good = open({str(tmp_path / "f.qoi")!r}, "rb").read()
rng, failed = random.Random(0), 0
for i in range(3000):
    b = bytearray(good)
    if i % 3 == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif i % 3 == 1:
        b = b[:rng.randrange(len(b))]
    else:
        b = b"qoif" + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 3000)))
    try:
        decode_rgb(bytes(b))
    except BadImage:
        failed += 1
print(failed)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 2000  # truncations and random bytes all fail

def test_png_decoders_agree(miniature):
    data = open(os.path.join(miniature, "sequences/00001/0001/im1.png"), "rb").read()
    assert np.array_equal(decode_rgb(data, "spng"), decode_rgb(data, "pillow"))
    gray = io.BytesIO()
    Image.new("L", (8, 8)).save(gray, format="PNG")
    for bad, kind in [(data[:5000], "unreadable"), (data[:2000] + b"\xff" * 64 + data[2064:], "unreadable"),
                      (b"junk", "unreadable"), (gray.getvalue(), "not_rgb")]:
        kinds = []
        for decoder in ("spng", "pillow"):
            with pytest.raises(BadImage) as e:
                decode_rgb(bad, decoder)
            kinds.append(e.value.kind)
        assert kinds == [kind, kind]


# ---- storage -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_storage_round_trip(where, tmp_path, s3_bucket):
    base = str(tmp_path) if where == "local" else f"{s3_bucket}/x"
    uri = storage.join(base, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")
    assert storage.read_bytes(uri) == b"two" and storage.size(uri) == 3
    with pytest.raises(RuntimeError), storage.staged_file(uri) as tmp:  # a failed write leaves the old file
        open(tmp, "wb").write(b"partial")
        raise RuntimeError
    assert storage.read_bytes(uri) == b"two"
    storage.delete(uri)
    assert not storage.exists(uri)
    if where == "local":
        assert os.listdir(tmp_path / "a") == []
        assert storage.resolve(f"file://{tmp_path}")[1] == str(tmp_path)
    else:
        fs, path = storage.resolve(uri)
        assert isinstance(fs, pafs.S3FileSystem) and path == uri[len("s3://") :]


# ---- the manifest's own rules (no Ray: a hand-made manifest) ----------------------------------


def _hand_made(root) -> Manifest:
    from compresszoo.data.manifest import ShardInfo

    shard = ShardInfo("train/shard-00000.parquet", "train", 3, 1234, "ab" * 32, (2, 1))
    manifest = Manifest(root=str(root), shards=[shard], source={"lists": {}}, params={"row_group_mb": 1.0})
    manifest.save()
    return manifest


def test_the_manifest_file_itself_names_the_same_dataset(tmp_path):
    from compresszoo.data.manifest import MANIFEST_NAME

    root = str(tmp_path / "ds")
    os.makedirs(root)
    saved = _hand_made(root)
    for uri in (root, root + "/", os.path.join(root, MANIFEST_NAME), f"file://{root}/{MANIFEST_NAME}"):
        loaded = Manifest.load(uri)
        assert loaded.root.rstrip("/").removeprefix("file://") == root, uri
        assert loaded.shards == saved.shards and loaded.params == saved.params, uri
        assert loaded.shard_uri(loaded.shards[0]).removeprefix("file://") == \
            os.path.join(root, "train", "shard-00000.parquet"), uri


@pytest.mark.parametrize("change, shown", [
    ({"format_version": 1}, "version 1"),
    ({"format_version": 3}, "version 3"),
    ({"format": "compresszoo.other-shards"}, "format 'compresszoo.other-shards'"),
])
def test_a_manifest_of_another_format_or_version_is_refused(tmp_path, change, shown):
    from compresszoo.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, ManifestError

    root = str(tmp_path)
    _hand_made(root)
    path = os.path.join(root, MANIFEST_NAME)
    doc = json.loads(open(path).read())
    assert (doc["format"], doc["format_version"]) == (FORMAT, FORMAT_VERSION) == ("compresszoo.vimeo90k-shards", 2)
    storage.write_bytes(path, json.dumps({**doc, **change}).encode())
    with pytest.raises(ManifestError, match=f"^{path}: .*{shown}.*this code reads 'compresszoo.vimeo90k-shards' "
                                            "version 2; rerun the sharder"):
        Manifest.load(root)


def test_a_dataset_without_a_manifest_says_how_to_make_one(tmp_path):
    from compresszoo.data.manifest import ManifestError

    with pytest.raises(ManifestError, match=r"_manifest\.json: no manifest; run pipelines/prepare_vimeo90k\.py"):
        Manifest.load(str(tmp_path))
