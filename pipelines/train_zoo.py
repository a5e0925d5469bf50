"""Train the zoo on Ray, gate every model's real bitrate, register the ones that pass.

    python pipelines/train_zoo.py --preset smoke --data DATA_DIR          # local Ray
    python pipelines/train_zoo.py --preset smoke --metrics ms-ssim        # MSE parents, then fine-tunes
    ray job submit --working-dir . -- python pipelines/train_zoo.py ...   # a cluster

MS-SSIM models are fine-tuned from the MSE champion of the same architecture and quality:
with --metrics ms-ssim, a parent whose name already has a champion is reused and a missing
one is trained (and registered) first; with --metrics mse,ms-ssim both halves are trained.

With --data omitted and --preset smoke, the miniature Vimeo90K is generated and sharded
under --workdir first, so the command runs on a fresh machine. MLflow comes from
MLFLOW_TRACKING_URI (default: sqlite ./mlflow.db).

Output: each model's phases (sharding, training, gate, registering) and a progress line
(step of total, loss, bpp, PSNR, images/s, ETA) redrawn in place on a terminal, or printed
every COMPRESSZOO_PROGRESS_EVERY seconds (default 30) into a log; then the summary table.
Ray's own output (per-report lines, warnings, worker logs) stays in the Ray logs unless
--verbose.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import compresszoo  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "platform"))

import ray  # noqa: E402

from compresszoo import progress, zoo_jobs  # noqa: E402
from compresszoo.config import RECIPES  # noqa: E402
from compresszoo.data.miniature import ensure_smoke_data  # noqa: E402
from compresszoo.models.registry import ARCHITECTURES  # noqa: E402
from compresszoo.tracking import resolve_tracking_uri  # noqa: E402
from compresszoo.zoo_jobs import run_one  # noqa: E402, F401 - tests/test_registry.py still calls it from here


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(RECIPES), default="smoke")
    ap.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated architectures")
    ap.add_argument("--qualities", default=None, help="comma-separated qualities (default: all 8 for "
                    "paper, the recipe's quality for smoke)")
    ap.add_argument("--metrics", default="mse", help="comma-separated: mse, ms-ssim (fine-tuned from the "
                    "MSE champions, trained first where missing) or mse,ms-ssim")
    ap.add_argument("--data", default="", help="dataset folder with _manifest.json (local or s3://)")
    ap.add_argument("--storage", default=None, help="checkpoint root (local or s3://); default WORKDIR/runs")
    ap.add_argument("--workdir", default="demo", help="where the smoke preset puts generated data")
    ap.add_argument("--config", default=None, help="a JSON file from tune_sweep.py: a list of overrides per model")
    ap.add_argument("--concurrency", type=int, default=0, help="trainings at once (0: as many as the cluster holds)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override any TrainConfig field, e.g. --set max_steps=1000 --set workers=2")
    ap.add_argument("--verbose", action="store_true", help="also stream Ray's own output (workers' logs, "
                    "Ray Train's per-report lines, Ray Data's progress bars) into this output")
    return ap.parse_args(argv)


def plan(args):
    """The models this command line asks for (zoo_jobs.plan on the parsed flags)."""
    return zoo_jobs.plan(args.preset, archs=args.archs, qualities=args.qualities, data=args.data,
                         storage_uri=args.storage, config_file=args.config, overrides=args.overrides,
                         metrics=args.metrics)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri()
    workdir = Path(args.workdir).resolve()
    if not args.data and args.preset != "smoke":
        print("train_zoo: --data is required for the paper preset (a sharded Vimeo90K; "
              "see pipelines/prepare_vimeo90k.py)", file=sys.stderr)
        return 2
    if args.storage is None:
        args.storage = str(workdir / "runs")
    try:
        plan(args)  # fail fast on a bad flag, before starting Ray
    except ValueError as e:
        print(f"train_zoo: {e}", file=sys.stderr)
        return 2
    shown = progress.set_default(progress.Display())
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True,
             **progress.quiet_ray_logging(args.verbose))
    if not args.data:
        shown.phase("data", "sharding", f"the miniature Vimeo90K under {workdir} (once)")
        args.data = ensure_smoke_data(workdir)
    configs = plan(args)
    workers = zoo_jobs.concurrency_for(configs[0], ray.cluster_resources(), requested=args.concurrency)
    shown.message(f"{len(configs)} model(s), {min(workers, len(configs))} at once; "
                  f"MLflow at {os.environ['MLFLOW_TRACKING_URI']}"
                  + ("" if args.verbose else "; Ray's own output is in the Ray logs (--verbose shows it)"))
    # MSE models in the plan only as parents (not asked for) are reused when registered
    reuse = "mse" not in zoo_jobs.requested_metrics(args.metrics, args.overrides)
    rows = zoo_jobs.run_zoo(configs, workers, reuse_parents=reuse)
    table, _ = zoo_jobs.summarize(rows, workdir)
    print("\n" + table, flush=True)
    return 1 if zoo_jobs.failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
