"""The global training order: which frame and which crop fill each slot of each global batch.

A function of (the manifest's training rows, seed, global batch size, window) only, never of
the worker count, so one worker, two or four train on the same global batches, and a run
resumed at any step on any worker count continues with exactly the batches it would have
seen. Pure arithmetic, no I/O: every rank computes the same order on its own.

- Frames are numbered 0..n-1 in manifest order (shards of the split, row groups, rows).
- Epoch e: the row groups are permuted with (seed, e) and cut, in that order, into windows of
  at least `window` frames; the frames of each window are permuted with (seed, e, window).
  The epoch's sequence is the concatenation: every frame exactly once per epoch.
- The epochs follow each other without a gap: global position p = step * batch_size + slot
  holds frame sequence(p // n)[p % n]. A batch may straddle two epochs; no frame is dropped.
- Rank r of w takes slots [r * B // w, (r + 1) * B // w) of every global batch.
- The crop of a slot is placed by a 64-bit hash of (seed, step, slot), whatever the frame.
- A slot whose frame is unusable (corrupt) takes spare k = 1, 2, ... : frame
  hash(seed, step, slot, k) mod n, the first usable one. The rule looks at that slot only,
  so no other slot (or rank) changes.

Why windows: a row group is the unit of reading (one Parquet read gives ~40 frames); a
window of row groups is read together by each rank and fully permuted, so the reads stay
sequential while the mix is a full permutation of `window` frames, not a shuffle buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
MAX_SPARES = 64  # spare candidates tried for one slot before the data is declared unusable


def _splitmix(z: int) -> int:
    z = (z + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix(*words: int) -> int:
    """A 64-bit hash of integers (SplitMix64 chained): the same on every machine and Python."""
    h = _GOLDEN
    for w in words:
        h = _splitmix(h ^ (int(w) & _M64))
    return h


def crop_offset(seed: int, step: int, slot: int, height: int, width: int, crop: int) -> tuple[int, int]:
    """(y, x) of the crop of global slot (step, slot) in a height x width frame."""
    word = mix(seed, 1, step, slot)
    return (word >> 32) % (height - crop + 1), (word & 0xFFFFFFFF) % (width - crop + 1)


def spare(seed: int, step: int, slot: int, k: int, frames: int) -> int:
    """The k-th (k >= 1) replacement frame for slot (step, slot) when its own frame is unusable."""
    return mix(seed, 2, step, slot, k) % frames


def rank_slots(batch_size: int, world_size: int, rank: int) -> range:
    """The slots of every global batch that `rank` trains on: [r * B // w, (r + 1) * B // w).

    Equal slices when w divides B; otherwise they differ by one and the trainer weights each
    rank's loss by its share (train.Trainer), so the averaged gradient is still the batch's.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if world_size > batch_size:
        raise ValueError(f"{world_size} workers cannot share a global batch of {batch_size}: every worker "
                         "needs at least one slot; lower the maximum of the worker range or raise batch_size")
    return range(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)


class GlobalOrder:
    """The order of one dataset split; see the module docstring."""

    def __init__(self, rows_per_group: Sequence[int], *, batch_size: int, seed: int, window: int):
        self.rows = np.asarray(rows_per_group, np.int64)
        if not len(self.rows) or self.rows.min() <= 0:
            raise ValueError("the order needs at least one row group of at least one frame")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.seed, self.window = batch_size, seed, max(1, window)
        self.starts = np.concatenate([[0], np.cumsum(self.rows)])  # frame id of each group's first row
        self.frames = int(self.starts[-1])
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def group_of(self, frame_ids: np.ndarray) -> np.ndarray:
        """The row group of each frame id."""
        return np.searchsorted(self.starts, frame_ids, side="right") - 1

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(sequence of frame ids of `epoch`, window bounds): window i is sequence[b[i]:b[i+1]]."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1], self._cached[2]
        groups = np.random.default_rng([self.seed & _M64, 0, epoch]).permutation(len(self.rows))
        ends = np.cumsum(self.rows[groups])
        parts, bounds, first, done = [], [0], 0, 0
        while first < len(groups):
            # the fewest groups from `first` on that hold at least `window` frames
            last = int(np.searchsorted(ends, done + self.window, side="left"))
            last = min(last, len(groups) - 1)
            ids = np.concatenate([np.arange(self.starts[g], self.starts[g + 1]) for g in groups[first:last + 1]])
            rng = np.random.default_rng([self.seed & _M64, 1, epoch, len(bounds) - 1])
            parts.append(ids[rng.permutation(len(ids))])
            done = int(ends[last])
            bounds.append(done)
            first = last + 1
        sequence = np.concatenate(parts)
        self._cached = (epoch, sequence, np.asarray(bounds, np.int64))
        return sequence, self._cached[2]

    def batch(self, step: int) -> np.ndarray:
        """Frame ids of the slots of global batch `step` (0-based), before any spare."""
        pos = step * self.batch_size + np.arange(self.batch_size)
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(pos // self.frames):
            here = pos // self.frames == e
            out[here] = self.epoch(int(e))[0][pos[here] % self.frames]
        return out

    def epoch_of_step(self, step: int) -> int:
        return step * self.batch_size // self.frames
