"""Training-crop throughput: Parquet shards + Ray Data (TrainStream) against the reference pipeline
(compressai ImageFolder + RandomCrop + ToTensor + torch DataLoader over the same frames as loose PNGs).

    python benchmarks/bench_data.py [--sizes 1024 4096] [--workers 2] [--repeat 2] [--only ours_qoi]

Each pipeline runs in a fresh process with the same number of worker processes (one per
core): 192 crops to warm up (workers started, imports done), then --epochs whole epochs
timed (default 3) from one stream, as training reads them: every epoch start included. The marginal cost per crop, (CPU(big) - CPU(small)) / (crops(big) -
crops(small)) over the two dataset sizes, is the steady-state number with the per-epoch
start cancelled out (an epoch of Vimeo90K is minutes long, so that is what training sees). Reported: crops per
CPU-second (crops/s of one fully busy core; CPU time is robust when other jobs share the
machine, wall time is not), for the pipeline's own processes and with Ray's daemons; wall
crops/s and the load average; peak memory (PSS, so shared pages count once) of all processes
and of the pipeline's own; shard size and bytes per frame. Ours runs on QOI shards (the
default) and on PNG shards with both PNG decoders (libspng via imagecodecs, and Pillow, the
reference's decoder), and the world-size-independent reader of elastic training
(GlobalBatchStream: global order from data/order.py, --only ours_qoi ours_global prints its
ratio to today's reader, target >= 0.90x). The frames are 448x256
photographs from the miniature generator, repeated to reach each size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

try:
    import compresszoo  # noqa: F401
except ImportError:
    _SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform")
    sys.path.insert(0, _SRC)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p)

import psutil  # noqa: E402


class TreeMeter:
    """CPU seconds and peak PSS of this process and its descendants, sampled in a thread.

    CPU is split into `work` (this process and the processes that run pipeline work: data
    loader workers, Ray task workers) and `daemons` (Ray's raylet, GCS, agents and Ray
    Data's helper actors, which burn CPU per second of wall time, not per crop). The
    sampler's own CPU is left out.
    """

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self.peak_work, self._stop = interval, 0, 0, threading.Event()
        self._cpu: dict[int, float] = {}
        self._daemon: dict[int, bool] = {}
        self.me = psutil.Process()

    _DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "Agent", "Actor")

    def _is_daemon(self, p: psutil.Process) -> bool:
        # Asked at every sample: a new Ray worker shows its real title only once it runs.
        if p.pid == self.me.pid:
            return False
        cmd = " ".join(p.cmdline())
        return any(d in cmd for d in self._DAEMONS)

    def _sample(self) -> None:
        pss = {True: 0, False: 0}
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self._cpu[p.pid] = t.user + t.system
                    self._daemon[p.pid] = self._is_daemon(p)
                    pss[self._daemon[p.pid]] += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.peak = max(self.peak, pss[True] + pss[False])
        self.peak_work = max(self.peak_work, pss[False])

    def __enter__(self):
        self._sample()
        self._start_cpu = dict(self._cpu)
        self.peak, self.peak_work, self._own = 0, 0, 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()
        self._own = time.thread_time()

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self._sample()  # before workers exit: their CPU time is only visible while they live
        delta = {pid: t - self._start_cpu.get(pid, 0.0) for pid, t in self._cpu.items()}
        self.daemons = sum(d for pid, d in delta.items() if self._daemon.get(pid))
        self.work = sum(d for pid, d in delta.items() if not self._daemon.get(pid)) - self._own

    def result(self, crops: int) -> dict:
        return {"crops": crops, "wall": self.wall, "work": self.work, "daemons": self.daemons, "peak": self.peak,
                "peak_work": self.peak_work, "load": os.getloadavg()[0]}


def _base_frames(base: str) -> list[str]:
    return sorted(
        os.path.join(d, f) for d, _, files in os.walk(os.path.join(base, "sequences")) for f in files if f.endswith(".png")
    )


def build_imagefolder(root: str, base: str, frames: int) -> None:
    """`frames` loose PNG files in compressai's ImageFolder layout (root/train/*.png), real copies."""
    srcs = _base_frames(base)
    os.makedirs(os.path.join(root, "train"))
    for i in range(frames):
        shutil.copyfile(srcs[i % len(srcs)], os.path.join(root, "train", f"{i:07d}.png"))


def build_vimeo(root: str, base: str, frames: int) -> str:
    """The same frames in the Vimeo90K layout for the sharder: train list plus one test sequence."""
    srcs = _base_frames(base)
    ids = [f"{i // 1000 + 1:05d}/{i % 1000 + 1:04d}" for i in range(frames // 7 + 1)]
    n = 0
    for seq in ids:
        os.makedirs(os.path.join(root, "sequences", seq))
        for k in range(1, 8):
            os.link(srcs[n % len(srcs)], os.path.join(root, "sequences", seq, f"im{k}.png"))
            n += 1
    with open(os.path.join(root, "sep_trainlist.txt"), "w") as f:
        f.write("\n".join(ids[:-1]) + "\n")
    with open(os.path.join(root, "sep_testlist.txt"), "w") as f:
        f.write(ids[-1] + "\n")
    return root


WARMUP_CROPS = 192


def timed(batches) -> dict:
    """Time whole epochs of an iterator of batches, their starts included."""
    crops, first = 0, None
    with TreeMeter() as meter:
        for x in batches:
            crops += len(x)
            if first is None:
                first = time.perf_counter() - meter.t0
    return {**meter.result(crops), "first_batch_s": first}


def warm_up(batches) -> None:
    """Start the workers and import everything: the first crops of an epoch, untimed."""
    crops = 0
    for x in batches:
        crops += len(x)
        if crops >= WARMUP_CROPS:
            break


def run_reference(root: str, *, workers: int, crop: int, batch: int, epochs: int) -> dict:
    import torch
    from compressai.datasets import ImageFolder
    from torchvision import transforms

    torch.set_num_threads(1)
    dataset = ImageFolder(root, split="train", transform=transforms.Compose([transforms.RandomCrop(crop), transforms.ToTensor()]))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=True, drop_last=False
    )
    warm_up(loader)
    return timed(x for _ in range(epochs) for x in loader)


def run_ours(dst: str, *, workers: int, crop: int, batch: int, epochs: int) -> dict:
    import ray
    import torch

    from compresszoo.data import TrainStream
    from compresszoo.data.images import png_decoder

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)

    def stream():
        return TrainStream(dst, rank=0, world_size=1, batch_size=batch, crop=crop, even_batches=False, task_cpus=1.0)

    warm_up(stream().epoch_batches())
    fresh = stream()  # whole epochs one after the other, a dataset started for each
    result = timed(x for _ in range(epochs) for x in fresh.epoch_batches())
    ray.shutdown()
    return {**result, "decoder": png_decoder()}


def run_global(dst: str, *, workers: int, crop: int, batch: int, epochs: int) -> dict:
    """The world-size-independent reader (GlobalBatchStream, data/order.py) as training uses it:
    one rank, the global batch, a 256-frame window; `epochs` epochs' worth of steps."""
    import itertools

    import ray
    import torch

    from compresszoo.data import Manifest
    from compresszoo.data.reader import GlobalBatchStream

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    steps = -(-Manifest.load(dst).frames("train") // batch)

    def stream():
        # stop: the stream ends where the timed epochs end, as training's ends at max_steps
        return GlobalBatchStream(dst, batch_size=batch, crop=crop, window=256, task_cpus=1.0,
                                 stop=steps * epochs).batches()

    warm_up(stream())
    result = timed(itertools.islice(stream(), steps * epochs))  # a fresh stream
    ray.shutdown()
    return result


def order_quality(groups: int = 11308, rows: int = 40, batch: int = 16, buffer: int = 256) -> None:
    """Shuffle quality, pure arithmetic on a Vimeo90K-sized manifest (452,320 training frames in
    row groups of 40): the global order (data/order.py) at three windows against the earlier
    reader's order (fragments permuted, then a `buffer`-row shuffle buffer drawing `batch` rows
    at random, as Ray Data's local shuffle does) and a uniform permutation. Clips: the
    sharder stores frames in a seeded random order, so a row group mixes clips."""
    import numpy as np

    from compresszoo.data.order import GlobalOrder

    n = groups * rows
    rng = np.random.default_rng(0)
    clip = rng.permutation(n) // 7  # clip of the frame stored at each position

    def buffered() -> np.ndarray:
        stream = (rng.permutation(groups)[:, None] * rows + np.arange(rows)).ravel()
        held, out = [], []
        for x in stream:
            held.append(x)
            if len(held) >= buffer + batch:
                for i in sorted(rng.choice(len(held), batch, replace=False), reverse=True):
                    out.append(held.pop(i))
        return np.array(out + list(rng.permutation(held)))

    orders = {"uniform permutation": rng.permutation(n), f"earlier reader ({buffer}-row shuffle buffer)": buffered()}
    for window in (256, 512, 1024):
        orders[f"global order, shuffle_buffer={window}"] = GlobalOrder(
            [rows] * groups, batch_size=batch, seed=0, window=window).epoch(0)[0]
    print(f"\n| order | same-clip frames per batch of {batch} | adjacent crops from one row group "
          f"| repeated row groups per batch of {batch} |")
    print("| --- | ---: | ---: | ---: |")
    for label, seq in orders.items():
        group = seq // rows
        batches = seq[: len(seq) // batch * batch].reshape(-1, batch)
        same_clip = np.mean([batch - len(set(clip[b])) for b in batches])
        repeated = np.mean([batch - len(set(b // rows)) for b in batches])
        print(f"| {label} | {same_clip:.4f} | {np.mean(group[1:] == group[:-1]):.3f} | {repeated:.2f} |")


def measure(kind: str, path: str, args, decoder: str = "auto") -> dict:
    """Run one pipeline in a fresh process (its own process tree, nothing shared) and return its numbers."""
    env = {**os.environ, "COMPRESSZOO_PNG_DECODER": decoder}
    cmd = [sys.executable, os.path.abspath(__file__), "--_run", kind, "--_path", path, "--workers", str(args.workers),
           "--crop", str(args.crop), "--batch", str(args.batch), "--epochs", str(args.epochs)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


PIPELINES = {  # key: (kind, PNG decoder, shard codec, label)
    "ours_qoi": ("ours", "auto", "qoi", "QOI shards + Ray Data (default)"),
    "ours_global": ("global", "auto", "qoi", "QOI shards + Ray Data, global order (elastic reader)"),
    "ours_spng": ("ours", "spng", "png", "PNG shards + Ray Data, libspng decode"),
    "ours_pillow": ("ours", "pillow", "png", "PNG shards + Ray Data, Pillow decode"),
    "reference": ("reference", "auto", None, "reference: ImageFolder + RandomCrop + DataLoader"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="frames per dataset size")
    p.add_argument("--workers", type=int, default=2, help="worker processes (= cores) for each pipeline")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3, help="whole epochs timed, one after the other")
    p.add_argument("--repeat", type=int, default=2, help="interleaved runs of each pipeline; the median is reported")
    p.add_argument("--shard-size-mb", type=float, default=64.0)
    p.add_argument("--only", nargs="+", choices=list(PIPELINES), default=list(PIPELINES),
                   help="pipelines to run (the reference is always run: ratios need it)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--order-quality", action="store_true",
                   help="print the shuffle quality of the global order against the earlier reader's, and stop")
    p.add_argument("--_run", choices=["ours", "global", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--_path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.order_quality:
        order_quality()
        return
    if args._run:
        run = {"ours": run_ours, "global": run_global, "reference": run_reference}[args._run]
        print(json.dumps(run(args._path, workers=args.workers, crop=args.crop, batch=args.batch,
                             epochs=args.epochs)))
        return

    import ray

    from compresszoo.data import Manifest, make_miniature, prepare

    tmp = tempfile.mkdtemp(prefix="bench_data_")
    rows = []
    try:
        base = make_miniature(os.path.join(tmp, "base"), sequences=18, test_sequences=2)
        for frames in args.sizes:
            work = os.path.join(tmp, f"n{frames}")
            folder = os.path.join(work, "imagefolder")
            build_imagefolder(folder, base, frames)
            src = build_vimeo(os.path.join(work, "vimeo"), base, frames)
            chosen = [k for k in PIPELINES if k in args.only or k == "reference"]
            dsts, train = {}, {}
            ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            for codec in sorted({PIPELINES[k][2] for k in chosen} - {None}):
                dsts[codec] = os.path.join(work, f"shards-{codec}")
                prepare(src, dsts[codec], shard_size_mb=args.shard_size_mb, progress=False, codec=codec)
                train[codec] = Manifest.load(dsts[codec]).shards_for("train")
            ray.shutdown()
            runs: dict[str, list[dict]] = {k: [] for k in chosen}
            for _ in range(args.repeat):  # interleaved, so that load from other jobs hits all alike
                for key in chosen:
                    kind, decoder, codec, _ = PIPELINES[key]
                    runs[key].append(measure(kind, folder if kind == "reference" else dsts[codec], args, decoder))
            rows.append((frames, train, {k: _median(v) for k, v in runs.items()}))
            print(f"done {frames} frames", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report(rows, args)


def _median(runs: list[dict]) -> dict:
    """The run with the median work-CPU per crop."""
    return sorted(runs, key=lambda r: r["work"] / r["crops"])[len(runs) // 2]


def report(rows, args) -> None:
    mb = 1 << 20
    print(f"\nRandom {args.crop}x{args.crop} crops of 448x256 PNG frames delivered as float tensors, batch "
          f"{args.batch}, {args.workers} worker processes per pipeline on a {psutil.cpu_count()}-core machine; "
          f"{WARMUP_CROPS} crops to warm up, then {args.epochs} whole epochs timed (their starts included), each pipeline in a fresh process, median of {args.repeat} interleaved runs. 'per CPU-s' = "
          "crops per second of one fully busy core; 'work' = the training process and the decode workers, "
          "without Ray's daemons.\n")
    print("| frames | pipeline | crops per CPU-s (work) | crops per CPU-s (incl. Ray daemons) | crops/s wall | "
          "load avg | first batch | peak memory, all (PSS) | of which pipeline processes | shards x size | bytes/frame |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for frames, trains, results in rows:
        for key, r in results.items():
            codec = PIPELINES[key][2]
            # The reference reads the PNG files themselves: the PNG shards' bytes per frame.
            train = trains.get(codec or "png") or next(iter(trains.values()))
            n_bytes = sum(s.bytes for s in train)
            per_frame = n_bytes / max(1, sum(s.rows for s in train))
            shape = f"{len(train)} x {n_bytes / len(train) / mb:.1f} MB" if codec else "loose PNG files"
            print(f"| {frames} | {PIPELINES[key][3]} | {r['crops'] / r['work']:.0f} | "
                  f"{r['crops'] / (r['work'] + r['daemons']):.0f} | {r['crops'] / r['wall']:.0f} | {r['load']:.1f} | "
                  f"{r['first_batch_s']:.1f} s | "
                  f"{r['peak'] / mb:.0f} MB | {r['peak_work'] / mb:.0f} MB | {shape} | {per_frame:.0f} |")
    print("\n| frames | ours | ratio per CPU-s (work) | ratio per CPU-s (incl. Ray daemons) | target |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for frames, _, results in rows:
        ref = results["reference"]
        for key in [k for k in results if k != "reference"]:
            r = results[key]
            work = (r["crops"] / r["work"]) / (ref["crops"] / ref["work"])
            total = (r["crops"] / (r["work"] + r["daemons"])) / (ref["crops"] / (ref["work"] + ref["daemons"]))
            print(f"| {frames} | {PIPELINES[key][3]} | {work:.2f}x | {total:.2f}x | >= 1.5x |")
    if all("ours_global" in r and "ours_qoi" in r for _, _, r in rows):
        print("\n| frames | global order (elastic) vs fragment order + shuffle buffer, crops per CPU-s (work) "
              "| (incl. Ray daemons) | target |")
        print("| ---: | ---: | ---: | ---: |")
        for frames, _, r in rows:
            new, old = r["ours_global"], r["ours_qoi"]
            work = (new["crops"] / new["work"]) / (old["crops"] / old["work"])
            total = (new["crops"] / (new["work"] + new["daemons"])) / (old["crops"] / (old["work"] + old["daemons"]))
            print(f"| {frames} | {work:.2f}x | {total:.2f}x | >= 0.90x |")
    if len(rows) >= 2:
        (small, _, a), (big, _, b) = rows[0], rows[-1]
        print(f"\nSteady state, marginal cost between {small} and {big} frames (the start cancels out):\n")
        print("| pipeline | crops per CPU-s (work) | crops per CPU-s (incl. Ray daemons) | ratio (work) | ratio (incl. daemons) |")
        print("| --- | ---: | ---: | ---: | ---: |")

        def marginal(key, daemons):
            cpu = lambda r: r["work"] + (r["daemons"] if daemons else 0.0)  # noqa: E731
            return (b[key]["crops"] - a[key]["crops"]) / (cpu(b[key]) - cpu(a[key]))

        for key in a:
            w, t = marginal(key, False), marginal(key, True)
            rw, rt = w / marginal("reference", False), t / marginal("reference", True)
            print(f"| {PIPELINES[key][3]} | {w:.0f} | {t:.0f} | {rw:.2f}x | {rt:.2f}x |")


if __name__ == "__main__":
    main()
