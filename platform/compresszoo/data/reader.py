"""Stream training crops from the shards of a manifest with Ray Data, one stream per Ray Train worker.

Two streams. GlobalBatchStream (at the end of this file; what train.py uses) yields each
rank's slots of the global batches of data/order.py: the same global sequence on any worker
count and from any resume step, so a run can shrink and grow (elastic training). TrainStream,
described here, is the earlier per-rank stream (fragment order split by rank, a shuffle
buffer, a fragment-granular cursor), kept as the throughput baseline of
benchmarks/bench_data.py; its order depends on the world size.

Call inside each training worker (rank r of world_size w):

    stream = TrainStream(manifest_uri, rank=r, world_size=w, batch_size=16, crop=256,
                         seed=0, position=saved_positions)          # None on a fresh run
    for epoch in range(stream.epoch, epochs):
        for images in stream.epoch_batches():      # float32 (B, 3, crop, crop) in [0, 1]
            ...train step...
            positions = gather(stream.position())   # every rank's dict, e.g. all_gather_object
    stream.stats()   # {"skipped_rows": n, "skipped": [[key, reason], ...], ...}

    for images in validation_batches(manifest_uri, crop=256, batch_size=16):  # center crops, test split
        ...

Epoch order. The unit of reading is a fragment: one Parquet row group (~40 frames). Epoch e
permutes all training fragments with (seed, e) and rank r takes remaining[r::world_size];
a local shuffle buffer (Ray Data's, seeded by (seed, e, rank)) then mixes rows across
fragments, and each fragment draws its crops from its own seeded generator. So each epoch
sees every training frame once across the workers, in an order that changes every epoch.
Memory is bounded whatever the dataset size: decoded crops waiting in Ray's object store
are capped at `buffer_mb` (Ray Data backpressure), plus the shuffle buffer (`shuffle_buffer`
crops) and `prefetch_batches` batches in the training process.

Equal steps. DDP needs every rank to run the same number of steps; with even_batches=True
(the default) every rank yields exactly min_r(rows of rank r) // batch_size full batches,
computed from the manifest by each rank alone: the few rows beyond that are left out this
epoch (a different few each epoch; counted in stats()["dropped_rows"]). If corrupt rows
leave a rank short, it pads its last batches with crops it already yielded this epoch
(stats()["padded_rows"]). even_batches=False yields every row, the last batch partial.

Resume granularity: one fragment. position() is a small JSON-able dict: the epoch and the
set of fragments fully consumed this epoch (a compressed bitmap over the manifest's
fragments, ~2 KB for full Vimeo90K), plus the next (shard, row group) for people to read.
Pass back the list of every rank's position (or one dict when world_size is 1): fragments
any rank finished are not read again, fragments in flight or in the shuffle buffer at save
time are read again from their start (at most shuffle_buffer + a few fragments of rows per
rank are repeated, no frame is lost). The world size may change between save and restore;
the order after a resume differs from the uninterrupted one. Ranks saved in different
epochs (possible with even_batches=False) resume at the latest one.
A position is untrusted input: every field is type- and range-checked and the bitmap is
inflated to exactly the manifest's fragment count, never more (PositionError otherwise;
its text is at most COMPRESSZOO_MAX_POSITION_BYTES).

Resources. Each stream decodes in Ray Data tasks of `task_cpus` CPUs (up to `concurrency`
at once, default: as many as fit), outside the training process: leave the cluster CPUs for
them beyond what the Train workers reserve. Nothing here prints or writes: every rank may
create its stream.

Bad data. A row whose bytes fail their CRC-32, that does not decode as RGB, or is smaller
than the crop, is skipped and counted (stats()). A shard that is missing, has the wrong
size, or is not valid Parquet raises ShardError naming it, at construction (missing/size,
one listing) or when read.
"""

from __future__ import annotations

import base64
import json
import math
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from compresszoo import storage
from compresszoo.data.images import BadImage, decode_rgb
from compresszoo.data.manifest import Manifest, ShardError, ShardInfo
from compresszoo.data.order import MAX_SPARES, GlobalOrder, crop_offset, rank_slots, spare
from compresszoo.limits import MAX_POSITION_BYTES, LimitError

if TYPE_CHECKING:
    import torch

__all__ = ["GlobalBatchStream", "TrainStream", "validation_batches", "ShardError", "PositionError"]

POSITION_VERSION = 1
_MAX_EPOCH = 2**31  # far beyond any run; keeps the epoch a valid seed word
_MAX_NAMED_SKIPS = 100
_MAX_BLOCKS = 4096


@dataclass(frozen=True)
class _Fragment:
    uri: str
    shard: str  # path relative to the manifest
    row_group: int
    rows: int
    size: int  # bytes of the whole shard, from the manifest


def _fragments(manifest: Manifest, split: str) -> list[_Fragment]:
    return [
        _Fragment(manifest.shard_uri(s), s.path, i, n, s.bytes)
        for s in manifest.shards_for(split)
        for i, n in enumerate(s.row_groups)
    ]


def check_shards(manifest: Manifest, split: str) -> None:
    """Raise ShardError if a shard of `split` is missing or has another size than the manifest says.

    One listing of the dataset folder, not one request per shard.
    """
    shards = manifest.shards_for(split)
    if not shards:
        return
    fs, root = storage.resolve(manifest.root)
    listed = {
        info.path: info.size
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
        if info.type == pafs.FileType.File
    }
    for s in shards:
        path = fs.normalize_path(f"{root}/{s.path}")
        size = listed.get(path)
        if size is None:
            raise ShardError(_shard_message(manifest.shard_uri(s), "is missing", s))
        if size != s.bytes:
            raise ShardError(_shard_message(manifest.shard_uri(s), f"has {size} bytes", s))


def _shard_message(uri: str, problem: str, shard: ShardInfo | _Fragment) -> str:
    expected = shard.bytes if isinstance(shard, ShardInfo) else shard.size
    return (
        f"shard {uri} {problem}; the manifest lists it with {expected} bytes. "
        "Rerun pipelines/prepare_vimeo90k.py with the same --src and --dst: it rewrites "
        "shards whose checksum does not match"
    )


def _decode_fragments(batch: dict, *, crop: int, mode: str, seed: int, epoch: int) -> Iterator[dict]:
    """Ray Data map: fragment descriptors -> one block of crops per fragment.

    Bad rows come out with ok=False and a reason instead of an image, so the consumer can
    count them and know when each fragment is fully consumed.
    """
    for uri, shard, row_group, rows, size, fid in zip(
        batch["uri"], batch["shard"], batch["row_group"], batch["rows"], batch["size"], batch["fid"]
    ):
        frag = _Fragment(str(uri), str(shard), int(row_group), int(rows), int(size))
        table = _read_row_group(frag)
        keys = table.column("key").to_pylist()
        # CHW here, in the decode task, so the training process only converts to float.
        images = np.zeros((len(keys), 3, crop, crop), np.uint8)
        ok = np.ones(len(keys), bool)
        errors = [""] * len(keys)
        rng = np.random.default_rng([seed, epoch, int(fid)])
        crcs = table.column("crc32").to_pylist()
        for i, data in enumerate(table.column("image").to_pylist()):
            try:
                if zlib.crc32(data) != crcs[i]:
                    raise BadImage("unreadable", "CRC-32 mismatch: the stored bytes changed after sharding")
                img = decode_rgb(data)
                h, w, _ = img.shape
                if h < crop or w < crop:
                    raise BadImage("unreadable", f"{w}x{h} is smaller than the {crop}x{crop} crop")
                if mode == "random":
                    y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
                else:
                    y, x = (h - crop) // 2, (w - crop) // 2
                images[i] = img[y : y + crop, x : x + crop].transpose(2, 0, 1)
            except BadImage as e:
                ok[i] = False
                errors[i] = str(e)
        yield {
            "image": images,
            "key": np.array(keys, dtype=object),
            "ok": ok,
            "error": np.array(errors, dtype=object),
            "fid": np.full(len(keys), int(fid), np.int64),
        }


def _read_row_group(frag: _Fragment):
    fs, path = storage.resolve(frag.uri)
    try:
        with fs.open_input_file(path) as f:
            if f.size() != frag.size:
                raise ShardError(_shard_message(frag.uri, f"has {f.size()} bytes", frag))
            table = pq.ParquetFile(f).read_row_group(frag.row_group, columns=["key", "image", "crc32"])
    except ShardError:
        raise
    except FileNotFoundError:
        raise ShardError(_shard_message(frag.uri, "is missing", frag)) from None
    except Exception as e:  # ArrowInvalid, OSError, IndexError: a corrupt footer or pages
        raise ShardError(_shard_message(frag.uri, f"is not readable Parquet ({e})", frag)) from None
    if table.num_rows != frag.rows:
        raise ShardError(
            _shard_message(frag.uri, f"has {table.num_rows} rows in row group {frag.row_group}, not {frag.rows}", frag)
        )
    return table


def _dataset(fragments: list[_Fragment], fids: list[int], *, crop, mode, seed, epoch, task_cpus, concurrency, buffer_mb):
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init()
    items = [
        {"uri": f.uri, "shard": f.shard, "row_group": f.row_group, "rows": f.rows, "size": f.size, "fid": fid}
        for f, fid in zip(fragments, fids)
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), _MAX_BLOCKS)))
    ds = ds.map_batches(
        _decode_fragments,
        batch_size=None,
        fn_kwargs={"crop": crop, "mode": mode, "seed": seed, "epoch": epoch},
        num_cpus=task_cpus,
        concurrency=concurrency,
    )
    # Block order fixed: the shuffle is ours (seeded), and the resume cursor needs it.
    ds.context.execution_options.preserve_order = True
    # Ray Data's default budget is half the object store: decoded crops would pile up to
    # gigabytes whenever decoding outpaces training. A fixed budget keeps memory flat.
    ds.context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=buffer_mb * 2**20
    )
    ds.context.enable_progress_bars = False
    return ds


def _unwrap_shard_error(e: BaseException) -> ShardError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ShardError):
            cause = getattr(e, "cause", None)  # Ray's RayTaskError keeps the original here
            return cause if isinstance(cause, ShardError) else ShardError(str(e.args[0]) if e.args else str(e))
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 in [0, 1]: a contiguous, vectorized pass in the trainer."""
    import torch  # here, not at the top: Ray Data's decode workers import this module too

    return torch.from_numpy(images.astype(np.float32)).mul_(1.0 / 255.0)


def _take(owed: np.ndarray, fids: np.ndarray) -> np.ndarray:
    """owed[f] -= (rows of fragment f in fids); return the fragments touched."""
    touched, counts = np.unique(fids, return_counts=True)
    owed[touched] -= counts
    return touched


def _encode_bitmap(mask: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.packbits(mask).tobytes(), 9)).decode()


class PositionError(ValueError):
    """A saved data position that is malformed; the message names the field."""


class PositionLimitError(PositionError, LimitError):
    """A saved data position larger than limits.MAX_POSITION_BYTES allows."""


def _decode_bitmap(text: str, n: int) -> np.ndarray:
    """The `consumed` bitmap of n fragments. It must inflate to exactly ceil(n / 8) bytes: no
    more than that (and never more than MAX_POSITION_BYTES) is ever decompressed."""
    need = (n + 7) // 8
    try:
        limit = MAX_POSITION_BYTES.check(need, f"data position of {n} fragments")
        raw = base64.b64decode(text, validate=True)
        inflate = zlib.decompressobj()
        bits = inflate.decompress(raw, need + 1)
    except LimitError as e:
        raise PositionLimitError(str(e)) from None
    except (ValueError, zlib.error) as e:  # binascii.Error is a ValueError
        raise PositionError(f"data position 'consumed' is not base64 zlib data ({e})") from None
    if len(bits) > need or inflate.unconsumed_tail:
        raise PositionError(f"data position 'consumed' inflates to more than the {need} bytes "
                            f"{n} fragments need (a position is at most {limit:,} bytes)")
    if not inflate.eof or inflate.unused_data:
        raise PositionError("data position 'consumed' is truncated or has trailing bytes")
    if len(bits) != need:
        raise PositionError(f"data position 'consumed' holds {len(bits)} bytes; {n} fragments need {need}")
    return np.unpackbits(np.frombuffer(bits, np.uint8))[:n].astype(bool)


def _int_field(p: dict, key: str, lo: int, hi: int | None = None) -> int:
    value = p.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value >= hi):
        bound = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise PositionError(f"data position {key!r} is {_short(value)}; expected an integer {bound}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_position(p) -> dict:
    """Check the type and range of every field of one rank's saved position; return it."""
    if not isinstance(p, dict):
        raise PositionError(f"a data position is {type(p).__name__}; expected the dict from position()")
    version = p.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version != POSITION_VERSION:
        raise PositionError(f"data position version {_short(version)}; this code reads {POSITION_VERSION}")
    _int_field(p, "seed", -(2**63), 2**64)
    _int_field(p, "epoch", 0, _MAX_EPOCH)
    _int_field(p, "fragments", 1)
    world = _int_field(p, "world_size", 1)
    _int_field(p, "rank", 0, world)
    consumed = p.get("consumed")
    if not isinstance(consumed, str):
        raise PositionError(f"data position 'consumed' is {_short(consumed)}; expected a string")
    try:
        MAX_POSITION_BYTES.check(len(consumed), "data position 'consumed'")
    except LimitError as e:
        raise PositionLimitError(str(e)) from None
    nxt = p.get("next")
    if nxt is not None and not (
        isinstance(nxt, dict) and isinstance(nxt.get("shard"), str)
        and isinstance(nxt.get("row_group"), int) and not isinstance(nxt.get("row_group"), bool)
    ):
        raise PositionError(f"data position 'next' is {_short(nxt)}; expected null or {{shard, row_group}}")
    return p


class TrainStream:
    """Per-worker training stream over a shard manifest; see the module docstring."""

    def __init__(
        self,
        manifest_uri: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 16,
        crop: int = 256,
        seed: int = 0,
        position: dict | list[dict] | None = None,
        shuffle_buffer: int = 256,
        even_batches: bool = True,
        split: str = "train",
        task_cpus: float = 1.0,
        concurrency: int | None = None,
        prefetch_batches: int = 1,
        buffer_mb: float = 128.0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.manifest = Manifest.load(manifest_uri)
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.crop, self.seed = batch_size, crop, seed
        self.shuffle_buffer, self.even_batches, self.split = shuffle_buffer, even_batches, split
        self.task_cpus, self.concurrency, self.prefetch_batches = task_cpus, concurrency, prefetch_batches
        self.buffer_mb = buffer_mb
        self.fragments = _fragments(self.manifest, split)
        if not self.fragments:
            raise ValueError(f"{self.manifest.root}: the manifest has no '{split}' frames")
        self._rows = np.array([f.rows for f in self.fragments], np.int64)
        if len(self.fragments) < world_size or self._rows.sum() // world_size < batch_size:
            raise ValueError(
                f"{self.manifest.root}: {self._rows.sum()} '{split}' frames in {len(self.fragments)} row groups "
                f"cannot give {world_size} workers a batch of {batch_size} each; use fewer workers, a smaller "
                "batch, or reshard with a smaller --row-group-mb"
            )
        check_shards(self.manifest, split)
        self.epoch = 0
        self._consumed = np.zeros(len(self.fragments), bool)
        self._stats = {"skipped_rows": 0, "skipped": [], "padded_rows": 0, "dropped_rows": 0}
        if position is not None:
            self._restore(position)

    # ---- position -------------------------------------------------------------------

    def position(self) -> dict:
        """Where this rank stands: a small JSON-able dict to store in a checkpoint."""
        remaining = self._plan()[0][self.rank]
        nxt = self.fragments[remaining[0]] if len(remaining) else None
        return {
            "version": POSITION_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "fragments": len(self.fragments),
            "consumed": _encode_bitmap(self._consumed),
            "rank": self.rank,
            "world_size": self.world_size,
            "next": {"shard": nxt.shard, "row_group": nxt.row_group} if nxt else None,
        }

    def _restore(self, position: dict | list[dict]) -> None:
        if isinstance(position, dict):
            positions = [position]
        elif isinstance(position, (list, tuple)) and position:
            positions = list(position)
        else:
            raise PositionError(f"data position is {_short(position)}; pass position() or a non-empty list of them")
        for p in positions:
            _check_position(p)
            if p["seed"] != self.seed:
                raise PositionError(f"the saved data position used seed {p['seed']}; this stream uses seed {self.seed}")
        self.epoch = max(p["epoch"] for p in positions)
        self._consumed[:] = False
        why = None
        if any(p["fragments"] != len(self.fragments) for p in positions):
            why = "the dataset changed since it was saved"
        elif len(positions) != positions[0]["world_size"]:
            why = f"it holds {len(positions)} of {positions[0]['world_size']} ranks (save every rank's position())"
        if why:
            warnings.warn(f"data position: {why}; restarting epoch {self.epoch} from its beginning", stacklevel=3)
            return
        for p in positions:  # one bitmap at a time, each of exactly the manifest's size
            if p["epoch"] == self.epoch:
                self._consumed |= _decode_bitmap(p["consumed"], len(self.fragments))

    def _plan(self) -> tuple[list[np.ndarray], int | None]:
        """This epoch's remaining fragments of every rank, and the steps each must yield."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.fragments))
        remaining = order[~self._consumed[order]]
        per_rank = [remaining[r :: self.world_size] for r in range(self.world_size)]
        steps = None
        if self.even_batches:
            steps = min(int(self._rows[p].sum()) for p in per_rank) // self.batch_size
        return per_rank, steps

    # ---- iteration ------------------------------------------------------------------

    def steps_this_epoch(self) -> int | None:
        """Batches every rank yields in the (rest of the) current epoch; None if even_batches=False."""
        return self._plan()[1]

    def stats(self) -> dict:
        """Counts since construction: skipped_rows (+ up to 100 named), padded_rows, dropped_rows."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._stats.items()}

    def epoch_batches(self, *, with_keys: bool = False) -> Iterator[torch.Tensor]:
        """Yield this epoch's batches (the rest of it, after a restore); then advance the epoch.

        with_keys=True yields (images, keys) with the frame key of every row. Stopping early
        (break) keeps the position mid-epoch; the next call continues the same epoch.
        """
        per_rank, steps = self._plan()
        mine = per_rank[self.rank]
        owed = np.zeros(len(self.fragments), np.int64)  # rows not yet handed out or skipped
        owed[mine] = self._rows[mine]
        if steps == 0 or not len(mine):
            self._finish_epoch(owed)
            return
        ds = _dataset(
            [self.fragments[i] for i in mine],
            [int(i) for i in mine],
            crop=self.crop,
            mode="random",
            seed=self.seed,
            epoch=self.epoch,
            task_cpus=self.task_cpus,
            concurrency=self.concurrency,
            buffer_mb=self.buffer_mb,
        )
        batches = ds.iter_batches(
            batch_size=self.batch_size,
            batch_format="numpy",
            prefetch_batches=self.prefetch_batches,
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=int(np.random.default_rng([self.seed, self.epoch, self.rank]).integers(2**31)),
        )
        pending = _Rebatcher(self.batch_size)
        last = None
        yielded = 0
        for batch in _reraise_shard_errors(batches):
            ok = batch["ok"]
            if not ok.all():
                self._skip(batch["key"][~ok], batch["error"][~ok])
                _take(owed, batch["fid"][~ok])
                batch = {k: batch[k][ok] for k in ("image", "key", "fid")}
            pending.add({k: batch[k] for k in ("image", "key", "fid")})
            while (out := pending.pop()) is not None:
                yielded += 1
                last = out
                self._deliver(out["fid"], owed, final=yielded == steps)
                yield self._out(out, with_keys)
                if yielded == steps:
                    return
        if steps is None:
            out = pending.rest()
            if out is None:
                self._finish_epoch(owed)
            else:
                self._deliver(out["fid"], owed, final=True)
                yield self._out(out, with_keys)
            return
        # Corrupt rows left this rank short of the steps every rank must run: pad the last
        # batches with crops this rank already yielded this epoch.
        while yielded < steps:
            out = pending.rest()
            pool = last if last is not None else out
            if pool is None:
                raise ShardError(f"rank {self.rank}: no decodable frame in its share of epoch {self.epoch}")
            have = 0 if out is None else len(out["key"])
            idx = np.arange(self.batch_size - have) % len(pool["key"])
            padded = {k: pool[k][idx] for k in ("image", "key", "fid")}
            if out is not None:
                self._deliver(out["fid"], owed, final=False)
                padded = {k: np.concatenate([out[k], padded[k]]) for k in padded}
            self._stats["padded_rows"] += len(idx)
            yielded += 1
            if yielded == steps:
                self._finish_epoch(owed)
            last = padded
            yield self._out(padded, with_keys)

    def _out(self, batch: dict, with_keys: bool):
        tensor = _to_tensor(batch["image"])
        return (tensor, [str(k) for k in batch["key"]]) if with_keys else tensor

    def _skip(self, keys, errors) -> None:
        self._stats["skipped_rows"] += len(keys)
        room = max(_MAX_NAMED_SKIPS - len(self._stats["skipped"]), 0)
        self._stats["skipped"].extend([str(k), str(e)] for k, e in list(zip(keys, errors))[:room])

    def _deliver(self, fids: np.ndarray, owed: np.ndarray, *, final: bool) -> None:
        """Count rows as handed out; a fragment with nothing owed any more is done this epoch."""
        done = _take(owed, fids)
        self._consumed[done[owed[done] == 0]] = True
        if final:
            # Before the last batch is handed out: a checkpoint taken after that step
            # resumes at the next epoch, not at the tail of this one.
            self._finish_epoch(owed)

    def _finish_epoch(self, owed: np.ndarray) -> None:
        self._stats["dropped_rows"] += int(owed.sum())
        self.epoch += 1
        self._consumed[:] = False


class _Rebatcher:
    """Re-cut batches that lost rows into full batches of `size` (no copy when aligned)."""

    def __init__(self, size: int):
        self.size, self.parts, self.rows = size, [], 0

    def add(self, batch: dict) -> None:
        if len(batch["key"]):
            self.parts.append(batch)
            self.rows += len(batch["key"])

    def pop(self) -> dict | None:
        if self.rows < self.size:
            return None
        if len(self.parts[0]["key"]) < self.size:
            self.parts = [{k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}]
        head = self.parts[0]
        out = {k: v[: self.size] for k, v in head.items()}
        rest = {k: v[self.size :] for k, v in head.items()}
        self.parts = ([rest] if len(rest["key"]) else []) + self.parts[1:]
        self.rows -= self.size
        return out

    def rest(self) -> dict | None:
        if not self.rows:
            return None
        out = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        self.parts, self.rows = [], 0
        return out


def _reraise_shard_errors(batches):
    """Iterate Ray Data batches; a ShardError raised inside a Ray task comes out as itself."""
    try:
        yield from batches
    except Exception as e:
        shard_error = _unwrap_shard_error(e)
        if shard_error is None:
            raise
        raise ShardError(str(shard_error)) from None


def validation_batches(
    manifest_uri: str,
    *,
    crop: int = 256,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    stats: dict | None = None,
    split: str = "test",
    task_cpus: float = 1.0,
    buffer_mb: float = 128.0,
) -> Iterator[torch.Tensor]:
    """Yield center crops of the test split, float32 (B, 3, crop, crop), in manifest order.

    Rank r gets fragments r::world_size; the last batch may be partial. `limit` caps the
    frames for a quick validation. Skipped rows are counted into `stats` if given.
    """
    manifest = Manifest.load(manifest_uri)
    fragments = _fragments(manifest, split)
    if not fragments:
        raise ValueError(f"{manifest.root}: the manifest has no '{split}' frames")
    check_shards(manifest, split)
    fids = list(range(len(fragments)))[rank::world_size]
    if limit is not None:
        rows = np.cumsum([fragments[i].rows for i in fids])
        fids = fids[: int(np.searchsorted(rows, limit)) + 1]
    if stats is not None:
        stats.setdefault("skipped_rows", 0)
        stats.setdefault("skipped", [])
    if not fids:
        return
    ds = _dataset(
        [fragments[i] for i in fids], fids, crop=crop, mode="center", seed=0, epoch=0,
        task_cpus=task_cpus, concurrency=None, buffer_mb=buffer_mb,
    )
    budget = math.inf if limit is None else limit
    pending = _Rebatcher(batch_size)
    for batch in _reraise_shard_errors(ds.iter_batches(batch_size=batch_size, batch_format="numpy")):
        ok = batch["ok"]
        if stats is not None and not ok.all():
            stats["skipped_rows"] += int((~ok).sum())
            stats["skipped"].extend([str(k), str(e)] for k, e in zip(batch["key"][~ok], batch["error"][~ok]))
        pending.add({k: batch[k][ok] if not ok.all() else batch[k] for k in ("image", "key")})
        while budget > 0 and (out := pending.pop()) is not None:
            images = out["image"][: int(min(budget, batch_size))]
            budget -= len(images)
            yield _to_tensor(images)
        if budget <= 0:
            return
    out = pending.rest()
    if out is not None and budget > 0:
        yield _to_tensor(out["image"][: int(min(budget, len(out["image"])))])


# ---- the world-size-independent stream (data/order.py) ------------------------------------

GLOBAL_POSITION_VERSION = 2
_BLOCK_ROWS = 32  # crops per block a decode task hands over: small blocks, steady backpressure
# Windows per Ray dataset, at least: a dataset spans whole epochs until it has this many, so
# a small dataset's epoch boundary is no new dataset start (a start costs seconds: an
# executor, the first tasks scheduled, nothing prefetched across it).
_SPAN_WINDOWS = 64


def _decode_slots(batch: dict, *, fragments: list[_Fragment], starts: np.ndarray, crop: int, seed: int,
                  batch_size: int) -> Iterator[dict]:
    """Ray Data map: one window's slots of one rank -> blocks of crops in slot order.

    Each row group of the window is read once; a corrupt frame is replaced by its slot's
    spare (order.spare), read from wherever it lies. Rows carry their global position so the
    consumer can check that every step gets exactly its slots.
    """
    frames_total = int(starts[-1])
    for pos_bytes, frame_bytes in zip(batch["pos"], batch["frames"]):
        pos = np.frombuffer(pos_bytes, np.int64)
        frames = np.frombuffer(frame_bytes, np.int64)
        groups = np.searchsorted(starts, frames, side="right") - 1
        tables = {int(g): _rows_of(fragments[int(g)]) for g in np.unique(groups)}
        for lo in range(0, len(pos), _BLOCK_ROWS):
            n = min(_BLOCK_ROWS, len(pos) - lo)
            images = np.zeros((n, 3, crop, crop), np.uint8)
            keys, offsets, spare_for, bad = [], np.zeros((n, 2), np.int64), [], []
            for i in range(n):
                step, slot = divmod(int(pos[lo + i]), batch_size)
                frame, k, replaced, met = int(frames[lo + i]), 0, "", []
                while True:
                    g = int(np.searchsorted(starts, frame, side="right") - 1)
                    if g not in tables:
                        tables[g] = _rows_of(fragments[g])
                    key, data, crc = (col[frame - int(starts[g])] for col in tables[g])
                    try:
                        img = _checked_image(data, crc, crop)
                        break
                    except BadImage as e:
                        met.append([key, str(e)])
                        replaced = replaced or key
                        k += 1
                        if k > MAX_SPARES:
                            raise ShardError(f"slot {slot} of step {step}: {k} frames in a row are unusable "
                                             f"(last: {key}: {e}); rerun pipelines/prepare_vimeo90k.py") from None
                        frame = spare(seed, step, slot, k, frames_total)
                h, w, _ = img.shape
                y, x = crop_offset(seed, step, slot, h, w, crop)
                images[i] = img[y : y + crop, x : x + crop].transpose(2, 0, 1)
                keys.append(key)
                offsets[i] = (y, x)
                spare_for.append(replaced)
                bad.append(json.dumps(met) if met else "")
            yield {
                "image": images,
                "key": np.array(keys, dtype=object),
                "pos": pos[lo : lo + n].copy(),
                "offset": offsets,
                "spare_for": np.array(spare_for, dtype=object),
                "bad": np.array(bad, dtype=object),  # [[key, reason], ...] as JSON, per slot
            }


def _rows_of(frag: _Fragment) -> tuple[list, list, list]:
    table = _read_row_group(frag)
    return (table.column("key").to_pylist(), table.column("image").to_pylist(), table.column("crc32").to_pylist())


def _checked_image(data: bytes, crc: int, crop: int) -> np.ndarray:
    if zlib.crc32(data) != crc:
        raise BadImage("unreadable", "CRC-32 mismatch: the stored bytes changed after sharding")
    img = decode_rgb(data)
    h, w, _ = img.shape
    if h < crop or w < crop:
        raise BadImage("unreadable", f"{w}x{h} is smaller than the {crop}x{crop} crop")
    return img


class GlobalBatchStream:
    """Rank `rank`'s slices of the global batches of order.GlobalOrder, from global step `step` on.

        stream = GlobalBatchStream(uri, rank=r, world_size=w, batch_size=16, crop=256, seed=0,
                                   window=256, step=saved_step)   # the step a checkpoint holds
        for images in stream.batches():   # float32 (16 // w, 3, crop, crop), forever
            ...train global step stream.step - 1...

    `batch_size` is the GLOBAL batch; this rank yields its slots of each (order.rank_slots). The batches, their frames and crops, depend on (manifest, seed, batch_size, window,
    step) only: any world size, any resume point, the same global sequence (order.py).

    Reading: Ray Data tasks, one per window (>= `window` frames of whole row groups) and rank,
    each reading the window's row groups once and decoding only this rank's slots; decoded
    crops waiting in Ray's object store are capped at `buffer_mb` (backpressure), plus
    `prefetch_batches` blocks in the training process. With w workers every row group is
    read by each of them (w times the bytes of one reader), each decodes 1/w of it.
    One Ray dataset spans whole epochs until it holds at least _SPAN_WINDOWS windows (many
    epochs of a small dataset, one of Vimeo90K): an epoch boundary inside it costs nothing,
    where a new dataset costs seconds before its first block.

    Corrupt rows (CRC, decode, too small) are replaced by the slot's deterministic spare and
    counted in stats(): no other slot, rank or step changes.
    """

    def __init__(self, manifest_uri: str, *, rank: int = 0, world_size: int = 1, batch_size: int = 16,
                 crop: int = 256, seed: int = 0, window: int = 256, step: int = 0, split: str = "train",
                 task_cpus: float = 1.0, concurrency: int | None = None, prefetch_batches: int = 2,
                 buffer_mb: float = 128.0, stop: int | None = None):
        self.slots = rank_slots(batch_size, world_size, rank)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if stop is not None and stop < step:
            raise ValueError(f"stop={stop} is before step={step}")
        self.stop = stop
        self.manifest = Manifest.load(manifest_uri)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.crop, self.seed, self.window, self.step, self.split = crop, seed, window, step, split
        self.task_cpus, self.concurrency = task_cpus, concurrency
        self.prefetch_batches, self.buffer_mb = prefetch_batches, buffer_mb
        self.fragments = _fragments(self.manifest, split)
        if not self.fragments:
            raise ValueError(f"{self.manifest.root}: the manifest has no '{split}' frames")
        self.order = GlobalOrder([f.rows for f in self.fragments], batch_size=batch_size, seed=seed, window=window)
        check_shards(self.manifest, split)
        self._stats = {"skipped_rows": 0, "skipped": [], "spares": 0}

    def position(self) -> dict:
        """What a checkpoint needs to continue exactly: the next global step, and what fixes the order."""
        return {"version": GLOBAL_POSITION_VERSION, "step": self.step, "seed": self.seed,
                "frames": self.order.frames, "batch_size": self.batch_size, "window": self.window}

    def check_position(self, saved: dict) -> None:
        """Raise PositionError if `saved` (a position()) was taken on another order than this stream's."""
        if not isinstance(saved, dict) or saved.get("version") != GLOBAL_POSITION_VERSION:
            raise PositionError(f"data position {_short(saved)} is not a version-{GLOBAL_POSITION_VERSION} "
                                "position() of GlobalBatchStream")
        mine = self.position()
        for key in ("seed", "frames", "batch_size", "window"):
            if saved.get(key) != mine[key]:
                raise PositionError(f"the saved data position has {key}={_short(saved.get(key))}, this stream "
                                    f"{mine[key]}: the run's data order changed (same dataset, seed, batch_size "
                                    "and shuffle_buffer are needed to resume it)")

    def stats(self) -> dict:
        """Counts since construction: skipped_rows (corrupt frames met; up to 100 named), spares used."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._stats.items()}

    def batches(self, *, with_meta: bool = False) -> Iterator:
        """Yield this rank's slice of global batch self.step, self.step + 1, ... up to global
        batch `stop` - 1 (the training's max_steps: nothing beyond it is decoded), or forever.

        with_meta=True yields (images, meta) with meta = {"step", "keys", "offsets" [(y, x)],
        "spare_for" (the replaced frame's key or "")}.
        """
        per = len(self.slots)
        pending = _Rebatcher(per)
        epoch = self.order.epoch_of_step(self.step)
        while self.stop is None or self.step < self.stop:
            items, epoch = self._span_items(epoch, start=self.step * self.batch_size)
            blocks = self._dataset(items).iter_batches(batch_size=None, batch_format="numpy",
                                                       prefetch_batches=self.prefetch_batches)
            for block in _reraise_shard_errors(blocks):
                self._count_bad(block)
                pending.add({k: block[k] for k in ("image", "key", "pos", "offset", "spare_for")})
                while (out := pending.pop()) is not None:
                    expected = self.step * self.batch_size + self.slots.start
                    if int(out["pos"][0]) != expected:  # an internal invariant, never data
                        raise RuntimeError(f"rank {self.rank}: got position {out['pos'][0]}, "
                                           f"expected {expected}")
                    self.step += 1
                    yield self._out(out, with_meta)

    def _out(self, batch: dict, with_meta: bool):
        tensor = _to_tensor(batch["image"])
        if not with_meta:
            return tensor
        return tensor, {"step": self.step - 1, "keys": [str(k) for k in batch["key"]],
                        "offsets": [tuple(int(v) for v in o) for o in batch["offset"]],
                        "spare_for": [str(k) for k in batch["spare_for"]]}

    def _count_bad(self, block: dict) -> None:
        for met in block["bad"]:
            if met:
                pairs = json.loads(met)
                self._stats["spares"] += 1
                self._stats["skipped_rows"] += len(pairs)
                room = max(_MAX_NAMED_SKIPS - len(self._stats["skipped"]), 0)
                self._stats["skipped"].extend(pairs[:room])

    def _span_items(self, epoch: int, *, start: int) -> tuple[list[dict], int]:
        """The work items (one per window: positions and frames) of this rank's slots at global
        positions >= start, from `epoch` on through whole epochs until there are at least
        _SPAN_WINDOWS of them; and the first epoch not included."""
        items: list[dict] = []
        end = math.inf if self.stop is None else self.stop * self.batch_size
        while len(items) < _SPAN_WINDOWS and epoch * self.order.frames < end:
            items += self._epoch_items(epoch, start=start)
            epoch += 1
        return items, epoch

    def _epoch_items(self, epoch: int, *, start: int) -> list[dict]:
        """The work items of this rank's slots of `epoch` at global positions >= start (and
        before stop * batch_size)."""
        n = self.order.frames
        sequence, bounds = self.order.epoch(epoch)
        first = max(start - epoch * n, 0)
        last = n if self.stop is None else min(n, self.stop * self.batch_size - epoch * n)
        offsets = np.arange(first, last, dtype=np.int64)
        pos = epoch * n + offsets
        slot = pos % self.batch_size
        mine = (slot >= self.slots.start) & (slot < self.slots.stop)
        pos, offsets = pos[mine], offsets[mine]
        cuts = np.searchsorted(offsets, bounds[1:-1])
        return [{"pos": p.tobytes(), "frames": sequence[o].tobytes()}
                for p, o in zip(np.split(pos, cuts), np.split(offsets, cuts)) if len(p)]

    def _dataset(self, items: list[dict]):
        """One Ray dataset over `items`, decoded in order."""
        import ray
        import ray.data

        if not ray.is_initialized():
            ray.init()
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), _MAX_BLOCKS)))
        ds = ds.map_batches(
            _decode_slots, batch_size=1,
            fn_kwargs={"fragments": self.fragments, "starts": self.order.starts, "crop": self.crop,
                       "seed": self.seed, "batch_size": self.batch_size},
            num_cpus=self.task_cpus, concurrency=self.concurrency,
        )
        ds.context.execution_options.preserve_order = True  # slot order is the batch order
        ds.context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
            object_store_memory=self.buffer_mb * 2**20)
        ds.context.enable_progress_bars = False
        return ds
