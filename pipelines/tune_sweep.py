"""Sweep lambda and (N, M) across the zoo's architectures with Ray Tune, around the same
training driver as train_zoo.py; every completed trial's RD point is a real, coded bitrate.

    python pipelines/tune_sweep.py --preset smoke --archs bmshj2018-factorized,bmshj2018-hyperprior \\
        --qualities 1,8 --channels 12x16 --name demo-sweep            # local Ray, miniature data
    python pipelines/tune_sweep.py --name demo-sweep --resume         # continue after a crash
    python pipelines/train_zoo.py --config demo/sweeps/demo-sweep/tuned_zoo.json --preset paper ...

--metric ms-ssim sweeps MS-SSIM models the way the zoo made them: every trial is fine-tuned
from the MSE model of its architecture, quality and (N, M), which the sweep first trains and
registers (or reuses when registered).

Lambdas: --qualities (the zoo's lambda for each) or --lambda-range LO:HI --num-lambdas K
(log-spaced). (N, M): the zoo's own choice plus --channels. RAY_ADDRESS joins a cluster;
MLflow comes from MLFLOW_TRACKING_URI (default: sqlite ./mlflow.db).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import compresszoo  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "platform"))

import ray  # noqa: E402

from compresszoo import progress  # noqa: E402
from compresszoo.config import RECIPES  # noqa: E402
from compresszoo.data.miniature import ensure_smoke_data  # noqa: E402
from compresszoo.models.registry import ARCHITECTURES  # noqa: E402
from compresszoo.tracking import git_commit, resolve_tracking_uri  # noqa: E402
from compresszoo.tune.space import SearchSpace, parse_channels, parse_ints, parse_lambda_range  # noqa: E402
from compresszoo.tune.sweep import SweepConfig, run_sweep, settings_for  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="the sweep's name: its folder under --storage and its "
                    "MLflow runs; the same name with --resume continues it")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted sweep with its stored "
                    "settings (only --name, --storage and --out are read); finished trials are not rerun")
    ap.add_argument("--preset", choices=sorted(RECIPES), default="smoke")
    ap.add_argument("--metric", choices=("mse", "ms-ssim"), default="mse", help="what the trials optimize; "
                    "ms-ssim trials are fine-tuned from their MSE parents (trained first if not registered)")
    ap.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated architectures")
    ap.add_argument("--qualities", default=None, help="the zoo's lambdas of these qualities, e.g. 1,4,8 "
                    "(default: 1,8 for smoke, 1..8 for paper)")
    ap.add_argument("--lambda-range", default=None, metavar="LO:HI", help="log-spaced lambdas instead of --qualities")
    ap.add_argument("--num-lambdas", type=int, default=4, help="values in --lambda-range")
    ap.add_argument("--channels", default="", help="extra (N, M) candidates besides the zoo's own, e.g. 8x12,16x24")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--data", default="", help="dataset folder with _manifest.json (local or s3://)")
    ap.add_argument("--storage", default=None, help="sweep root (local or s3://); default WORKDIR/sweeps")
    ap.add_argument("--workdir", default="demo", help="where the smoke preset puts generated data")
    ap.add_argument("--out", default=None, help="local folder for the report; default WORKDIR/sweeps/NAME-report")
    ap.add_argument("--no-early-stopping", action="store_true", help="run every trial to its step budget")
    ap.add_argument("--grace-period", type=int, default=0, help="steps before ASHA may stop a trial "
                    "(0: checkpoint_every, the first report)")
    ap.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA's reduction factor")
    ap.add_argument("--compare-across-archs", action="store_true", help="early-stop per lambda across "
                    "architectures instead of per (architecture, lambda)")
    ap.add_argument("--trial-cpus", type=float, default=0.25, help="CPUs of each trial's own actor "
                    "(Train controller, the bitrate check)")
    ap.add_argument("--concurrency", type=int, default=0, help="trials at once (0: as many as the cluster holds)")
    ap.add_argument("--verbose", action="store_true", help="also print Ray's and Tune's own output (trial "
                    "tables, worker logs); by default a progress line per trial")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override any TrainConfig field for every trial, e.g. --set max_steps=20000")
    return ap.parse_args(argv)


def sweep_config(args) -> SweepConfig:
    """The SweepConfig these flags describe (a ValueError names a bad flag)."""
    pairs = {}
    for text in args.overrides:
        if "=" not in text:
            raise ValueError(f"--set {text!r} must look like key=value")
        key, value = text.split("=", 1)
        pairs[key] = value
    metric = pairs.pop("metric", args.metric)  # --set metric=... means what --metric does
    base = RECIPES[args.preset](metric=metric).with_overrides({"git_commit": git_commit(ROOT), "data": args.data})
    base = base.with_overrides(pairs)
    if args.lambda_range:
        lam = {"lambda_range": parse_lambda_range(args.lambda_range), "num_lambdas": args.num_lambdas}
    else:
        default_q = "1,8" if args.preset == "smoke" else "1,2,3,4,5,6,7,8"
        lam = {"qualities": parse_ints(args.qualities or default_q, "--qualities")}
    space = SearchSpace(architectures=tuple(a.strip() for a in args.archs.split(",") if a.strip()),
                        channels=parse_channels(args.channels), seeds=parse_ints(args.seeds, "--seeds"),
                        metric=base.metric, debug=base.debug_model, **lam)
    return SweepConfig(name=args.name, storage=args.storage, space=space, base=base,
                       early_stopping=not args.no_early_stopping, grace_period=args.grace_period,
                       reduction_factor=args.reduction_factor,
                       compare_across_architectures=args.compare_across_archs,
                       trial_cpus=args.trial_cpus, max_concurrent=args.concurrency, overrides=pairs)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri()
    workdir = Path(args.workdir).resolve()
    if args.storage is None:
        args.storage = str(workdir / "sweeps")
    if not args.data and not args.resume and args.preset != "smoke":
        print("tune_sweep: --data is required for the paper preset (a sharded Vimeo90K; "
              "see pipelines/prepare_vimeo90k.py)", file=sys.stderr)
        return 2
    try:
        sc = sweep_config(args)
        settings_for(sc, resume=args.resume)  # fail fast, before starting Ray
    except ValueError as e:  # SweepError, or a flag the search space refuses
        print(f"tune_sweep: {e}", file=sys.stderr)
        return 2
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True,
             **progress.quiet_ray_logging(args.verbose))
    if not args.data and not args.resume:
        sc = replace(sc, base=sc.base.with_overrides({"data": ensure_smoke_data(workdir)}))
    out = Path(args.out) if args.out else Path(args.storage if "://" not in args.storage else workdir) / f"{args.name}-report"
    outcome = run_sweep(sc, resume=args.resume, report_dir=out, verbose=args.verbose)
    print(f"[tune_sweep] report: {out}; tuned zoo: python pipelines/train_zoo.py --config "
          f"{outcome.paths['config']} ...", flush=True)
    return 1 if outcome.report["counts"].get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
