"""Ray Train overhead, and 1 vs 2 workers, on this machine.

(a) steps/s of a plain single-process loop (compresszoo.train.Trainer.train_step over the
    same TrainStream) against Ray Train with 1 CPU worker running the same step;
(b) images/s of Ray Train with 1 worker against 2 workers (same global batch).
Throughput of the Ray runs is the images_per_second metric the workers log to MLflow,
averaged after the first window (start-up excluded).

    python benchmarks/bench_ray_overhead.py [--arch bmshj2018-hyperprior] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from compresszoo.config import smoke  # noqa: E402


def data_dir(work: Path) -> str:
    from compresszoo.data.miniature import make_miniature
    from compresszoo.data.shards import prepare

    src, dst = work / "mini", work / "shards"
    make_miniature(str(src), sequences=16, test_sequences=2)
    prepare(str(src), str(dst), progress=False)
    return str(dst)


def plain_loop(cfg) -> float:
    from compresszoo.data.reader import TrainStream
    from compresszoo.train import Trainer

    cfg = cfg.resolved()
    torch.set_num_threads(1)
    tr = Trainer(cfg, 0, 1, torch.device("cpu"), None)
    stream = TrainStream(cfg.data, batch_size=cfg.batch_size, crop=cfg.crop, seed=cfg.seed,
                         shuffle_buffer=cfg.shuffle_buffer, task_cpus=cfg.data_cpus)
    done, t0, warm = 0, None, cfg.log_every
    while done < cfg.max_steps:
        for batch in stream.epoch_batches():
            tr.train_step(tr.model, batch)
            done += 1
            if done == warm:
                t0 = time.perf_counter()
            if done >= cfg.max_steps:
                break
    return (cfg.max_steps - warm) / (time.perf_counter() - t0)


def ray_steps_per_second(cfg) -> float:
    from mlflow.tracking import MlflowClient

    from compresszoo.train import fit

    res = fit(cfg)
    hist = MlflowClient(res.config.tracking_uri).get_metric_history(res.mlflow_run_id, "images_per_second")
    ips = statistics.mean(m.value for m in sorted(hist, key=lambda m: m.step)[1:])
    return ips / cfg.batch_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="bmshj2018-hyperprior")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = dict(architecture=args.arch, data=data_dir(work), storage=str(work / "runs"),
                      tracking_uri=f"sqlite:///{work}/mlflow.db", crop=args.crop, batch_size=args.batch,
                      max_steps=args.steps, log_every=10, val_every=10**6, checkpoint_every=10**6,
                      debug_model=False, quality=3, lr=1e-4, aux_lr=1e-3, cpus_per_worker=1.0,
                      data_cpus=0.5)
        plain = plain_loop(smoke(**common))
        one = ray_steps_per_second(smoke(**common, seed=1))
        two = ray_steps_per_second(smoke(**{**common, "seed": 2, "workers": 2, "cpus_per_worker": 0.75}))
    print(f"\n{args.arch} q3 (full size), batch {args.batch} (global), {args.crop}x{args.crop} crops, "
          f"{args.steps} steps, 2-core CPU machine\n")
    print("| setup | steps/s | images/s | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| plain single-process loop, 1 thread | {plain:.3f} | {plain * args.batch:.1f} | 1.00 |")
    print(f"| Ray Train, 1 CPU worker | {one:.3f} | {one * args.batch:.1f} | {one / plain:.2f} of plain |")
    print(f"| Ray Train, 2 CPU workers (DDP, gloo) | {two:.3f} | {two * args.batch:.1f} | {two / one:.2f} of 1 worker |")


if __name__ == "__main__":
    main()
