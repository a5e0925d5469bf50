"""Train the zoo on Ray, gate every model's real bitrate, register the ones that pass.

    python pipelines/train_zoo.py --preset smoke --data DATA_DIR          # local Ray
    ray job submit --working-dir . -- python pipelines/train_zoo.py ...   # a cluster

With --data omitted and --preset smoke, the miniature Vimeo90K is generated and sharded
under --workdir first, so the command runs on a fresh machine. MLflow comes from
MLFLOW_TRACKING_URI (default: sqlite ./mlflow.db).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import compresszoo  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "platform"))

from compresszoo.config import RECIPES, TrainConfig  # noqa: E402
from compresszoo.tracking import resolve_tracking_uri  # noqa: E402
from compresszoo.models.registry import ARCHITECTURES, QUALITIES  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(RECIPES), default="smoke")
    ap.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated architectures")
    ap.add_argument("--qualities", default=None, help="comma-separated qualities (default: all 8 for "
                    "paper, the recipe's quality for smoke)")
    ap.add_argument("--data", default="", help="dataset folder with _manifest.json (local or s3://)")
    ap.add_argument("--storage", default=None, help="checkpoint root (local or s3://); default WORKDIR/runs")
    ap.add_argument("--workdir", default="demo", help="where the smoke preset puts generated data")
    ap.add_argument("--config", default=None, help="a JSON file from tune_sweep.py: a list of overrides per model")
    ap.add_argument("--concurrency", type=int, default=0, help="trainings at once (0: as many as the cluster holds)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override any TrainConfig field, e.g. --set max_steps=1000 --set workers=2")
    return ap.parse_args(argv)


def ensure_smoke_data(workdir: Path) -> str:
    """Make and shard the miniature dataset once; return the shard folder."""
    from compresszoo.data.miniature import make_miniature
    from compresszoo.data.shards import prepare

    shards = workdir / "vimeo90k-mini-shards"
    if (shards / "_manifest.json").exists():
        return str(shards)
    src = workdir / "vimeo90k-mini"
    if not (src / "sep_trainlist.txt").exists():
        make_miniature(str(src))
    prepare(str(src), str(shards))
    return str(shards)


def plan(args) -> list[TrainConfig]:
    from compresszoo.tracking import git_commit

    base = RECIPES[args.preset]()
    # Under `ray job submit` the working-dir copy has no .git: the submitter can pass the
    # commit in COMPRESSZOO_GIT_COMMIT (or --set git_commit=...).
    commit = os.environ.get("COMPRESSZOO_GIT_COMMIT") or git_commit(ROOT)
    base = base.with_overrides({"git_commit": commit, "storage": args.storage or base.storage})
    if args.data:
        base = base.with_overrides({"data": args.data})
    base = base.with_overrides(args.overrides)
    if args.config:
        entries = json.loads(Path(args.config).read_text())
        return [base.with_overrides(e) for e in (entries["models"] if isinstance(entries, dict) else entries)]
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    for a in archs:
        if a not in ARCHITECTURES:
            raise SystemExit(f"train_zoo: unknown architecture {a!r}; valid: {', '.join(ARCHITECTURES)}")
    if args.qualities:
        qualities = [int(q) for q in args.qualities.split(",")]
    else:
        qualities = list(QUALITIES) if args.preset == "paper" else [base.quality]
    return [base.with_overrides({"architecture": a, "quality": q}) for a in archs for q in qualities]


def concurrency_for(cfg: TrainConfig, requested: int) -> int:
    import ray

    if requested > 0:
        return requested
    cpus = ray.cluster_resources().get("CPU", 1.0)
    per_run = cfg.workers * cfg.cpus_per_worker + cfg.data_cpus
    return max(1, int(math.floor(cpus / per_run)))


def run_one(cfg: TrainConfig) -> dict:
    from compresszoo import publish, registry_client
    from compresszoo.train import fit

    cfg = cfg.resolved()
    spec = cfg.spec()
    row = {"architecture": spec.architecture, "quality": spec.quality, "lambda": spec.lmbda,
           "N": spec.N, "M": spec.M, "name": spec.registry_name}
    existing = registry_client.find_version(spec.registry_name, cfg.config_hash(),
                                            publish.manifest_sha(cfg.data), cfg.tracking_uri)
    if existing is not None:
        print(f"[train_zoo] {spec.registry_name}: already registered as version {existing.version} "
              "for this config and dataset; skipping", flush=True)
        return {**row, "gate": True, "reason": "already registered", "version": str(existing.version),
                "steps": existing.tags.get("steps")}
    print(f"[train_zoo] {cfg.run_name()}: training {cfg.max_steps} steps on {cfg.workers} worker(s)", flush=True)
    result = fit(cfg)
    out = publish.gate_and_register(cfg, result.checkpoint_dir, result.mlflow_run_id,
                                    steps=result.steps, val_loss=result.val_loss)
    verdict = f"registered version {out['version']}" if out["gate"] else f"NOT registered: {out['reason']}"
    print(f"[train_zoo] {spec.registry_name}: {verdict}", flush=True)
    return out


def main(argv=None) -> int:
    import ray

    args = parse_args(argv)
    os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri()
    workdir = Path(args.workdir).resolve()
    if not args.data:
        if args.preset != "smoke":
            raise SystemExit("train_zoo: --data is required for the paper preset (a sharded Vimeo90K; "
                             "see pipelines/prepare_vimeo90k.py)")
    if args.storage is None:
        args.storage = str(workdir / "runs")
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True,
             log_to_driver=True)
    if not args.data:
        args.data = ensure_smoke_data(workdir)
    configs = plan(args)
    workers = concurrency_for(configs[0], args.concurrency)
    print(f"[train_zoo] {len(configs)} model(s), {workers} at once; MLflow at {os.environ['MLFLOW_TRACKING_URI']}",
          flush=True)
    rows = []

    def guarded(cfg):
        try:
            return run_one(cfg)
        except Exception as e:  # noqa: BLE001 - one failed model must not sink the others
            traceback.print_exc()
            s = cfg.spec()
            return {"architecture": s.architecture, "quality": s.quality, "lambda": s.lmbda, "N": s.N,
                    "M": s.M, "gate": False, "reason": f"error: {type(e).__name__}: {e}"}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(guarded, configs))
    from compresszoo.publish import summary_table

    print("\n" + summary_table(rows), flush=True)
    out = workdir / "train_zoo_summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2, default=str))
    failed = [r for r in rows if str(r.get("reason", "")).startswith("error:")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
