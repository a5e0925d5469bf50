"""The sharder: Vimeo90K frames -> Parquet shards + `_manifest.json`, in parallel Ray tasks.

Each frame is checked (8-bit RGB, decodable) and stored as lossless QOI (default: ~3.5x
faster to decode than PNG) or as its source PNG bytes, with the CRC-32 of what is stored.

Resumable: each finished shard gets a small record `_parts/<shard>.json` (plan fingerprint,
sha256, rows) written after the shard itself; a rerun keeps shards whose record and checksum
match and redoes the rest. The plan is deterministic (list order, seeded shuffle, sizes from
the listing), so a resumed run produces the same shards and manifest as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from compresszoo import storage
from compresszoo.data.images import BadImage, decode_rgb, encode_qoi
from compresszoo.data.manifest import (
    CODECS,
    DEFAULT_CODEC,
    SHARD_SCHEMA,
    Manifest,
    ShardInfo,
    manifest_uri,
)
from compresszoo.data.report import BadInputError, BadInputReport
from compresszoo.data.vimeo import SPLITS, Frame, scan_source

DEFAULT_SHARD_MB = 256.0
# A row group is the unit of reading, shuffling and resuming: ~8 MB is ~40 Vimeo frames,
# small enough to stream and to shuffle at fine grain, big enough for efficient S3 reads.
DEFAULT_ROW_GROUP_MB = 8.0
PARTS_DIR = "_parts"
_MB = 1 << 20


@dataclass(frozen=True)
class ShardPlan:
    name: str  # file name inside DST, e.g. train-00003.parquet
    split: str
    frames: tuple[Frame, ...]
    row_groups: tuple[int, ...]  # planned frames per row group

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{SHARD_SCHEMA}|{self.name}|{self.row_groups}".encode())
        for f in self.frames:
            h.update(f"{f.key}|{f.split}|{f.size}\n".encode())
        return h.hexdigest()


def plan_shards(
    frames: list[Frame],
    *,
    shard_bytes: int,
    row_group_bytes: int,
    shuffle_seed: int | None = 0,
) -> list[ShardPlan]:
    """Pack frames into shards of about `shard_bytes` with row groups of about `row_group_bytes`.

    Training frames are permuted once with `shuffle_seed` so that a row group mixes many
    sequences (the reader then only shuffles row-group order and a small buffer); the test
    split keeps list order.
    """
    plans = []
    for split in SPLITS:
        chosen = [f for f in frames if f.split == split]
        if split == "train" and shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(len(chosen))
            chosen = [chosen[i] for i in order]
        for i, groups in enumerate(_pack(chosen, shard_bytes, row_group_bytes)):
            members = tuple(f for g in groups for f in g)
            plans.append(ShardPlan(f"{split}-{i:05d}.parquet", split, members, tuple(len(g) for g in groups)))
    return plans


def _pack(frames: list[Frame], shard_bytes: int, row_group_bytes: int) -> list[list[list[Frame]]]:
    """Greedy packing in order: shards of row groups, each closed before it would overflow."""
    shards: list[list[list[Frame]]] = []
    shard_size = group_size = 0
    for f in frames:
        if not shards or shard_size + f.size > shard_bytes:
            shards.append([[]])
            shard_size = group_size = 0
        elif shards[-1][-1] and group_size + f.size > row_group_bytes:
            shards[-1].append([])
            group_size = 0
        shards[-1][-1].append(f)
        shard_size += f.size
        group_size += f.size
    return shards


def _sha256(uri: str) -> tuple[str, int] | None:
    fs, path = storage.resolve(uri)
    h, n = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(path) as f:
            while chunk := f.read(8 * _MB):
                h.update(chunk)
                n += len(chunk)
    except FileNotFoundError:
        return None
    return h.hexdigest(), n


def _load_record(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return None


def build_shard(plan: ShardPlan, src: str, dst: str, codec: str = DEFAULT_CODEC) -> dict:
    """Keep the shard `plan` describes if it is already complete, else (re)write it.

    Returns its record: {"fingerprint", "shard": ShardInfo json, "bad": [[category, key,
    detail]...], "kept": bool}. Runs inside a Ray task; everything it needs is in its arguments.
    """
    shard_uri = storage.join(dst, plan.name)
    record_uri = storage.join(dst, PARTS_DIR, plan.name + ".json")
    fingerprint = hashlib.sha256(f"{plan.fingerprint()}|{codec}".encode()).hexdigest()
    record = _load_record(record_uri)
    if record and record.get("fingerprint") == fingerprint:
        found = _sha256(shard_uri)
        if found == (record["shard"]["sha256"], record["shard"]["bytes"]):
            return {**record, "kept": True}

    src_fs, src_root = storage.resolve(src)
    bad: list[list[str]] = []
    written_groups: list[int] = []
    with storage.staged_file(shard_uri) as tmp:
        with pq.ParquetWriter(
            tmp,
            SHARD_SCHEMA,
            compression={"key": "zstd", "split": "zstd", "image": "none", "crc32": "zstd",
                         "height": "zstd", "width": "zstd"},
            use_dictionary=["split"],
            # min/max statistics of an image column would copy whole images into the footer.
            write_statistics=["key"],
        ) as writer:
            start = 0
            for n in plan.row_groups:
                cols: dict[str, list] = {k: [] for k in SHARD_SCHEMA.names}
                for frame in plan.frames[start : start + n]:
                    try:
                        with src_fs.open_input_stream(frame.source_path(src_root)) as f:
                            data = f.read()
                        img = decode_rgb(data)
                        h, w, _ = img.shape
                        if codec == "qoi":
                            data = encode_qoi(img)
                    except FileNotFoundError:
                        bad.append(["missing", frame.key, "vanished after the source was listed"])
                        continue
                    except BadImage as e:
                        bad.append([e.kind, frame.key, str(e)])
                        continue
                    for col, value in zip(cols, (frame.key, frame.split, data, zlib.crc32(data), h, w)):
                        cols[col].append(value)
                start += n
                if cols["key"]:
                    writer.write_table(pa.table(cols, schema=SHARD_SCHEMA), row_group_size=len(cols["key"]))
                    written_groups.append(len(cols["key"]))
        digest, nbytes = _sha256(tmp)
    info = ShardInfo(plan.name, plan.split, sum(written_groups), nbytes, digest, tuple(written_groups))
    record = {"fingerprint": fingerprint, "shard": info.to_json(), "bad": bad}
    # Written after the shard: a shard without its record is treated as partial and redone.
    storage.write_bytes(record_uri, json.dumps(record, sort_keys=True).encode())
    return {**record, "kept": False}


class _Progress:
    """One status line on stderr: shards done, frames, throughput; at most one update a second."""

    def __init__(self, shards: int, frames: int, enabled: bool):
        self.shards, self.frames, self.enabled = shards, frames, enabled
        self.done_shards = self.done_frames = self.kept = self.bytes = 0
        self.t0 = self.last = time.monotonic()
        self.tty = enabled and sys.stderr.isatty()

    def update(self, record: dict, planned_frames: int) -> None:
        self.done_shards += 1
        self.done_frames += planned_frames
        self.kept += record["kept"]
        self.bytes += 0 if record["kept"] else record["shard"]["bytes"]
        now = time.monotonic()
        if self.enabled and (now - self.last >= 1.0 or self.done_shards == self.shards):
            self.last = now
            rate = self.bytes / _MB / max(now - self.t0, 1e-9)
            line = (
                f"shards {self.done_shards}/{self.shards} ({self.kept} kept) | "
                f"frames {self.done_frames}/{self.frames} | {rate:.1f} MB/s written"
            )
            end = "\n" if (not self.tty or self.done_shards == self.shards) else ""
            print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def prepare(
    src: str,
    dst: str,
    *,
    tuplet: str = "auto",
    shard_size_mb: float = DEFAULT_SHARD_MB,
    row_group_mb: float = DEFAULT_ROW_GROUP_MB,
    on_bad: str = "skip",
    shuffle_seed: int | None = 0,
    max_parallel: int | None = None,
    task_cpus: float = 1.0,
    progress: bool = True,
    codec: str = DEFAULT_CODEC,
) -> Manifest:
    """Shard the Vimeo90K folder `src` into `dst` (local or s3://); return the manifest.

    codec: how frames are stored, 'qoi' (lossless re-encoding, fast to decode) or 'png'
    (the source bytes as they are); see manifest.CODECS.
    on_bad: 'skip' leaves bad frames and list lines out and names them in the manifest;
    'fail' raises BadInputError naming them. Uses the running Ray cluster, or starts a
    local one. Rerunning after a crash resumes (see module docstring).
    """
    import ray

    if codec not in CODECS:
        raise ValueError(f"codec={codec!r}: choose one of {', '.join(CODECS)}")
    scan = scan_source(src, tuplet)
    scan.report.check(on_bad)
    plans = plan_shards(
        scan.frames,
        shard_bytes=int(shard_size_mb * _MB),
        row_group_bytes=int(row_group_mb * _MB),
        shuffle_seed=shuffle_seed,
    )
    # The old manifest goes first: it must never describe shards this run may rewrite.
    storage.delete(manifest_uri(dst))
    for folder in (dst, storage.join(dst, PARTS_DIR)):
        storage.remove_stale_temporaries(folder)

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=task_cpus)(build_shard)
    limit = max_parallel or max(1, int(ray.cluster_resources().get("CPU", 1) / task_cpus))
    bar = _Progress(len(plans), len(scan.frames), progress)
    records: dict[str, dict] = {}
    pending: dict = {}
    queue = list(plans)
    by_name = {p.name: p for p in plans}
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                plan = queue.pop(0)
                pending[remote.remote(plan, src, dst, codec)] = plan.name
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            record = ray.get(ready[0])
            records[name] = record
            bar.update(record, len(by_name[name].frames))
            if record["bad"] and on_bad == "fail":
                report = BadInputReport()
                report.extend(map(tuple, record["bad"]))
                raise BadInputError(
                    f"{name}: {report.summary()}\nrerun with --on-bad skip to leave these out "
                    "(finished shards are kept)"
                )
    finally:
        for ref in pending:
            ray.cancel(ref)

    report = scan.report
    for plan in plans:
        report.extend(map(tuple, records[plan.name]["bad"]))
    manifest = Manifest(
        root=dst,
        shards=[ShardInfo.from_json(records[p.name]["shard"]) for p in plans],
        tuplet=scan.tuplet,
        source={"uri": src, "lists": scan.lists},
        params={
            "shard_size_mb": shard_size_mb,
            "row_group_mb": row_group_mb,
            "shuffle_seed": shuffle_seed,
            "on_bad": on_bad,
            "codec": codec,
        },
        bad_input=report.to_json(),
        codec=codec,
    )
    manifest.save()
    if progress:
        kept = sum(r["kept"] for r in records.values())
        print(
            f"wrote {manifest_uri(dst)}: {manifest.frames('train')} train + {manifest.frames('test')} test "
            f"frames in {len(plans)} shards ({kept} kept from an earlier run)\n{report.summary()}",
            file=sys.stderr,
        )
    return manifest
