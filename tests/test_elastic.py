"""Elastic training: the same global batches on any worker count, exact mid-epoch resume on
another count, corrupt rows that move nothing else, and a real node loss on a two-node cluster."""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from photos import kill_matching as _kill_matching
from safetensors.torch import load_file

from compresszoo.data.manifest import Manifest
from compresszoo.data.order import GlobalOrder
from compresszoo.data.reader import GlobalBatchStream

BATCH, CROP, SEED, WINDOW = 4, 64, 5, 8
READ = {"batch_size": BATCH, "crop": CROP, "seed": SEED, "window": WINDOW, "task_cpus": 0.25}


def test_a_worker_range_is_a_setting_of_the_same_run():
    from compresszoo.config import smoke

    fixed = smoke(data="d").resolved()
    elastic = smoke(data="d").with_overrides(["workers=1..4", "resize_check_s=5"]).resolved()
    assert (elastic.workers, elastic.max_workers, elastic.worker_range()) == (1, 4, (1, 4))
    assert elastic.run_name() == fixed.run_name() and fixed.worker_range() == 1
    with pytest.raises(ValueError, match="max_workers=2 is below workers=3"):
        smoke(data="d", workers="3..2").resolved()
    with pytest.raises(ValueError, match="up to 16 workers cannot share the global batch_size=8"):
        smoke(data="d", workers="1..16").resolved()


def global_batches(dst: str, world: int, *, start: int = 0, stop: int) -> dict[int, dict]:
    """Steps [start, stop) read by `world` ranks, each rank's slice put back in slot order:
    {step: {"keys", "offsets", "images", "spare_for"}}."""
    out: dict[int, dict] = collections.defaultdict(lambda: {"keys": [], "offsets": [], "images": [],
                                                            "spare_for": []})
    for rank in range(world):
        stream = GlobalBatchStream(dst, rank=rank, world_size=world, step=start, **READ)
        if stop > start:
            for images, meta in stream.batches(with_meta=True):
                step = out[meta["step"]]
                step["keys"] += meta["keys"]
                step["offsets"] += meta["offsets"]
                step["spare_for"] += meta["spare_for"]
                step["images"].append(images)
                if meta["step"] == stop - 1:
                    break
        assert stream.step == stop
    return {s: {**v, "images": torch.cat(v["images"])} for s, v in sorted(out.items())}


def digest(batch: dict) -> str:
    """The hash of one global batch: its frame keys and crop offsets, slot by slot."""
    return hashlib.sha256(repr((batch["keys"], batch["offsets"])).encode()).hexdigest()


def test_global_batches_are_the_same_on_any_worker_count_and_after_a_resume(ray_session, shards):
    frames = Manifest.load(shards).frames("train")
    steps = 2 * frames // BATCH + 2  # two whole epochs and into the third
    one = global_batches(shards, 1, stop=steps)
    two = global_batches(shards, 2, stop=steps)
    assert [digest(one[s]) for s in one] == [digest(two[s]) for s in two] and len(one) == steps
    # The very same pixels, not only the same keys and offsets (uint8 crops: exact).
    assert all(torch.equal(one[s]["images"], two[s]["images"]) for s in one)
    # Stopped mid-epoch at step 7 (of ~10.5 per epoch), resumed on 3 workers (uneven slices
    # of 1, 1 and 2 crops): exactly the global batches of the uninterrupted run from there.
    three = global_batches(shards, 3, start=7, stop=steps)
    assert list(three) == list(range(7, steps))
    assert [digest(three[s]) for s in three] == [digest(one[s]) for s in range(7, steps)]
    # Every frame of each completed epoch exactly once; a new order each epoch; crops vary.
    sequence = [k for s in one for k in one[s]["keys"]]
    epochs = [sequence[:frames], sequence[frames:2 * frames]]
    assert all(len(set(e)) == frames for e in epochs) and epochs[0] != epochs[1]
    assert len({o for s in one for o in one[s]["offsets"]}) > frames
    # The order is the manifest's arithmetic alone: the reader follows it slot by slot.
    order = GlobalOrder([r for s in Manifest.load(shards).shards_for("train") for r in s.row_groups],
                        batch_size=BATCH, seed=SEED, window=WINDOW)
    keys = [k for s in Manifest.load(shards).shards_for("train")
            for k in pq.read_table(os.path.join(shards, s.path), columns=["key"]).column("key").to_pylist()]
    assert all([keys[i] for i in order.batch(s)] == one[s]["keys"] for s in one)
    # A stream given stop (training's max_steps) ends there, across an epoch boundary too.
    stopping = GlobalBatchStream(shards, rank=1, world_size=2, step=9, stop=13, **READ)
    ended = list(itertools.islice(stopping.batches(with_meta=True), 5))  # 5: fails, not hangs, if it runs on
    assert [m["step"] for _, m in ended] == [9, 10, 11, 12]
    assert [m["keys"] for _, m in ended] == [two[s]["keys"][BATCH // 2:] for s in range(9, 13)]
    with pytest.raises(ValueError, match="5 workers cannot share a global batch of 4"):
        GlobalBatchStream(shards, rank=0, world_size=5, **READ)
    with pytest.raises(ValueError, match="stop=2 is before step=3"):
        GlobalBatchStream(shards, step=3, stop=2, **READ)


def test_a_corrupt_row_changes_no_other_slot(ray_session, shards, tmp_path):
    steps = 6
    clean = global_batches(shards, 2, stop=steps)
    # Damage the frame in slot 3 of step 1 (rank 1's slice), same file size.
    victim = clean[1]["keys"][3]
    dst = str(tmp_path / "copy")
    shutil.copytree(shards, dst)
    for s in Manifest.load(dst).shards_for("train"):
        path = os.path.join(dst, s.path)
        table = pq.read_table(path, columns=["key", "image"])
        if victim in table.column("key").to_pylist():
            image = table.column("image")[table.column("key").to_pylist().index(victim)].as_py()
            data = open(path, "rb").read()
            at = data.index(image) + len(image) // 2
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(bytes(b ^ 0xFF for b in data[at:at + 64]))
    damaged = global_batches(dst, 2, stop=steps)
    for s in range(steps):
        for slot in range(BATCH):
            same = (damaged[s]["keys"][slot], damaged[s]["offsets"][slot]) == \
                (clean[s]["keys"][slot], clean[s]["offsets"][slot])
            assert same == ((s, slot) != (1, 3)), (s, slot)
            if (s, slot) != (1, 3):
                assert torch.equal(damaged[s]["images"][slot], clean[s]["images"][slot])
    assert damaged[1]["spare_for"][3] == victim and damaged[1]["keys"][3] != victim
    # The same on one worker: the spare is a function of the slot, not of who reads it.
    alone = global_batches(dst, 1, stop=steps)
    assert [digest(alone[s]) for s in alone] == [digest(damaged[s]) for s in damaged]
    stream = GlobalBatchStream(dst, rank=1, world_size=2, **READ)
    for _, meta in stream.batches(with_meta=True):
        if meta["step"] == 1:
            break
    stats = stream.stats()
    assert stats["spares"] == 1 and stats["skipped"][0][0] == victim and "CRC-32" in stats["skipped"][0][1]


# ---- training: 1 vs 2 workers, a stop and a resume on another count -------------------------


def small(shards, tmp_path, **kw):
    from compresszoo.config import smoke

    base = dict(data=shards, storage=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                architecture="bmshj2018-hyperprior", crop=CROP, val_crop=CROP, val_images=2, batch_size=BATCH,
                seed=SEED, shuffle_buffer=WINDOW, max_steps=6, val_every=0, checkpoint_every=3, log_every=1,
                cpus_per_worker=0.5, data_cpus=0.25)
    base.update(kw)
    return smoke(**base)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def test_stopped_on_two_workers_resumed_on_one_matches_the_uninterrupted_run(ray_session, shards, tmp_path,
                                                                             monkeypatch):
    from compresszoo.models.registry import build
    from compresszoo.tracking import client as tracking_client
    from compresszoo.train import STATE_FILE, WEIGHTS_FILE, fit

    clean = fit(small(shards, tmp_path / "clean", workers=1))

    marker = tmp_path / "killed.pid"
    monkeypatch.setenv("COMPRESSZOO_FAULT_AT_STEP", "4")  # after the checkpoint at 3: mid-epoch
    monkeypatch.setenv("COMPRESSZOO_FAULT_MARKER", str(marker))
    with pytest.raises(Exception):  # noqa: B017 - Ray's wrapper of the killed worker's death
        fit(small(shards, tmp_path / "resized", workers=2, max_failures=0))
    assert marker.exists()  # rank 0's process really was SIGKILLed
    resumed = fit(small(shards, tmp_path / "resized", workers=1))  # the same run, another count
    assert resumed.steps == clean.steps == 6 and resumed.run_name == clean.run_name

    state = json.loads(open(os.path.join(resumed.checkpoint_dir, STATE_FILE)).read())
    assert state["workers"] == [[0, 2], [3, 1]]
    # The data position the checkpoint holds is the one any stream reaches after 6 global batches.
    assert state["data_positions"] == [GlobalBatchStream(shards, step=6, **READ).position()]
    a, b = (load_file(os.path.join(r.checkpoint_dir, WEIGHTS_FILE)) for r in (clean, resumed))
    torch.manual_seed(SEED)  # the initial weights every rank starts from (train.Trainer)
    start = {k: v.detach() for k, v in build(clean.config.spec()).state_dict().items()}
    # Same batches, same noise; steps 1-3 summed the gradient as two halves averaged by DDP's
    # all-reduce instead of one batch: float32 rounding (~1e-7 relative) that Adam can enlarge
    # where a gradient is near zero. Far below how far training moved the weights.
    gap, moved = max_difference(a, b), max_difference(a, start)
    assert gap < 1e-4 and moved > 1e-3, (gap, moved)
    # One MLflow run for the whole resized training, its worker counts per step range.
    client = tracking_client(resumed.config.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("compresszoo").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["compresszoo.workers"] == "0:2,3:1"
    history = client.get_metric_history(resumed.mlflow_run_id, "workers")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (3, 1.0)]
    # Rerunning the finished command resumes the same run: no new steps, the same weights.
    monkeypatch.delenv("COMPRESSZOO_FAULT_AT_STEP")
    again = fit(small(shards, tmp_path / "resized", workers=1))
    assert again.mlflow_run_id == resumed.mlflow_run_id and again.steps == 6
    assert max_difference(b, load_file(os.path.join(again.checkpoint_dir, WEIGHTS_FILE))) == 0.0


# ---- elastic: a two-node cluster loses a node and gets it back --------------------------------

# 12 steps of 4 crops: one whole epoch of the 42 training frames and into the next. The node
# goes after the checkpoint at step 4 and comes back after the one at step 8.
ELASTIC_STEPS, ELASTIC_CHECKPOINT = 12, 4

_ELASTIC = textwrap.dedent("""
    import json, os, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster
    from compresszoo.config import smoke
    from compresszoo.data.shards import prepare
    from compresszoo.train import fit

    miniature, work, steps, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    log, hold = os.environ["COMPRESSZOO_BATCH_LOG"], os.environ["COMPRESSZOO_STEP_HOLD"]
    node = dict(num_cpus=1, object_store_memory=100 * 1024 * 1024)
    # One CPU per node and 0.6 per worker: a node holds one worker, and its Ray Data tasks.
    events = {"start": time.time()}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    ray.init(address=cluster.address, log_to_driver=False)

    def worlds():
        seen = []
        for name in os.listdir(log):
            for line in open(os.path.join(log, name)):
                step, world, t = line.split()[:3]
                seen.append((float(t), int(step), int(world)))
        return sorted(seen)

    def wait_for(what, timeout=600):
        deadline = time.time() + timeout
        while not what():
            if time.time() > deadline or not trainer.is_alive():
                print("FAILED waiting; last steps (step, world):", [(s, w) for _, s, w in worlds()][-5:],
                      flush=True)
                raise SystemExit(1)
            time.sleep(0.05)

    try:
        second = cluster.add_node(**node)
        cluster.wait_for_nodes()
        events["nodes"] = time.time()
        data = os.path.join(work, "shards")
        prepare(miniature, data, progress=False, row_group_mb=0.05, task_cpus=0.5)
        events["prepared"] = time.time()
        cfg = smoke(architecture="bmshj2018-factorized", data=data, storage=os.path.join(work, "runs"),
                    tracking_uri=f"sqlite:///{work}/mlflow.db", crop=64, val_crop=64, val_images=2,
                    batch_size=4, max_steps=steps, val_every=0, checkpoint_every=every, log_every=1,
                    cpus_per_worker=0.6, data_cpus=0.2, shuffle_buffer=8, workers="1..2", resize_check_s=1,
                    max_failures=3)
        out = {}

        def hold_at(step):  # the workers park before this step (train._log_batch)
            with open(hold + ".tmp", "w") as f:
                f.write(str(step))
            os.replace(hold + ".tmp", hold)

        def parked(step, world):
            return lambda: any(s == step and w == world for _, s, w in worlds())

        first, second_hold = every, 2 * every
        hold_at(first)
        trainer = threading.Thread(target=lambda: out.update(result=fit(cfg)))
        trainer.start()
        wait_for(parked(first, 2))  # two workers, parked just after their checkpoint at `first`
        events["parked_two"] = time.time()
        time.sleep(3)  # Ray Train's controller registers a reported checkpoint when it polls (2 s)
        hold_at(second_hold)
        events["lost"] = time.time()
        cluster.remove_node(second, allow_graceful=False)
        wait_for(parked(second_hold, 1))  # one worker went on from `first` to `second_hold`
        time.sleep(3)
        events["back"] = time.time()
        cluster.add_node(**node)

        def two_again():
            return any(w == 2 and t > events["back"] for t, _, w in worlds())
        wait_for(two_again)
        events["two_again"] = time.time()
        os.remove(hold)
        trainer.join(600)
        events["done"] = time.time()
        res = out["result"]
        print("RESULT", json.dumps({"steps": res.steps, "events": events, "run_id": res.mlflow_run_id,
                                    "tracking_uri": res.config.tracking_uri, "data": data,
                                    "checkpoint_dir": res.checkpoint_dir}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def run_elastic(miniature: str, work: Path) -> tuple[dict, dict]:
    """The two-node elastic run in a subprocess (this process may hold the session's Ray):
    (its RESULT, {rank file: [(step, world, time, [(key, y, x), ...]), ...]})."""
    log = work / "batches"
    log.mkdir(parents=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="cze-"))  # its own sessions, away from /tmp/ray
    env = {**os.environ, "COMPRESSZOO_BATCH_LOG": str(log), "COMPRESSZOO_STEP_HOLD": str(work / "hold"),
           "RAY_TMPDIR": str(ray_tmp),
           # After a node is lost Ray Train first retries the old group size (its view of the
           # nodes lags) until this timeout, 60 s by default (README, resize costs).
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}
    env.pop("RAY_ADDRESS", None)
    try:
        r = subprocess.run([sys.executable, "-c", _ELASTIC, miniature, str(work), str(ELASTIC_STEPS),
                            str(ELASTIC_CHECKPOINT)], capture_output=True, text=True, env=env, cwd=work,
                           timeout=900)
    finally:
        _kill_matching(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0 and "RESULT " in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]
    result = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    lines = {}
    for name in os.listdir(log):
        rows = []
        for line in open(log / name):
            step, world, t, *crops = line.split()
            rows.append((int(step), int(world), float(t),
                         [(k, int(y), int(x)) for k, y, x in (c.rsplit(":", 2) for c in crops)]))
        lines[name] = rows
    return result, lines


def test_elastic_run_shrinks_when_a_node_goes_and_grows_when_it_returns(miniature, tmp_path):
    from compresszoo.data.order import crop_offset
    from compresszoo.tracking import client as tracking_client
    from compresszoo.train import STATE_FILE

    result, ranks = run_elastic(miniature, tmp_path)
    assert result["steps"] == ELASTIC_STEPS
    # The batches each step finally trained on: a step replayed after a restart counts once,
    # its last attempt (what the checkpoint of the run holds).
    final: dict[int, dict] = {}
    attempts = sorted((t, step, world, name, crops) for name, rows in ranks.items()
                      for step, world, t, crops in rows)
    for _, step, world, name, crops in attempts:
        if final.get(step, {}).get("world") != world:  # a replay on another count replaces it
            final[step] = {"world": world, "ranks": {}}
        final[step]["ranks"][name] = crops
    assert sorted(final) == list(range(ELASTIC_STEPS))
    worlds = [final[s]["world"] for s in range(ELASTIC_STEPS)]
    assert all(len(final[s]["ranks"]) == worlds[s] for s in final)
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2  # shrank, then grew back
    # Every resize restarted at a checkpoint: a world change only at a checkpoint step.
    changes = [s for s in range(1, ELASTIC_STEPS) if worlds[s] != worlds[s - 1]]
    assert len(changes) >= 2 and all(s % ELASTIC_CHECKPOINT == 0 for s in changes), changes
    # The global batches are the order's, whatever the count: keys and crop offsets.
    manifest = Manifest.load(result["data"])
    order = GlobalOrder([r for s in manifest.shards_for("train") for r in s.row_groups],
                        batch_size=4, seed=0, window=8)
    keys = [k for s in manifest.shards_for("train")
            for k in pq.read_table(os.path.join(result["data"], s.path), columns=["key"]).column("key").to_pylist()]
    sequence = []
    for step in range(ELASTIC_STEPS):
        crops = [c for name in sorted(final[step]["ranks"]) for c in final[step]["ranks"][name]]
        assert [k for k, _, _ in crops] == [keys[i] for i in order.batch(step)], step
        assert all((y, x) == crop_offset(0, step, slot, 256, 448, 64) for slot, (_, y, x) in enumerate(crops))
        sequence += [k for k, _, _ in crops]
    frames = len(keys)
    for e in range(len(sequence) // frames):  # each completed epoch: every frame exactly once
        assert sorted(sequence[e * frames:(e + 1) * frames]) == sorted(keys)
    # One MLflow run; the checkpoint and the run both name the worker count per step range.
    state = json.loads(open(os.path.join(result["checkpoint_dir"], STATE_FILE)).read())
    client = tracking_client(result["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("compresszoo").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == result["run_id"]
    recorded = [[s, w] for s, w in state["workers"]]
    assert [w for _, w in recorded] == [worlds[0]] + [worlds[s] for s in changes]
    assert [s for s, _ in recorded] == [0] + changes
    assert runs[0].data.tags["compresszoo.workers"] == ",".join(f"{s}:{w}" for s, w in recorded)
    # Resize costs, for the README: node lost -> first step on one worker, node back -> first
    # step on two.
    first = {w: min(t for t, _, world, _, _ in attempts if world == w and t > result["events"][ev])
             for w, ev in ((1, "lost"), (2, "back"))}
    timing = {"shrink_s": first[1] - result["events"]["lost"], "grow_s": first[2] - result["events"]["back"]}
    (tmp_path / "resize_timing.json").write_text(json.dumps(timing))
    print("elastic resize timing:", timing)
    t0 = result["events"]["start"]
    print("elastic phases:", {k: round(v - t0, 1) for k, v in result["events"].items()})
