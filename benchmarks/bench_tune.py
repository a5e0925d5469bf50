"""What early stopping saves in a sweep: trial-steps run with per-(architecture, lambda) ASHA
against running every trial to its step budget, whether both find the same best (N, M) per
(architecture, lambda), and the trial concurrency reached on this machine.

    python benchmarks/bench_tune.py                       # 2 archs x 2 lambdas x 3 (N, M), miniature data
    python benchmarks/bench_tune.py --channels 4x8,12x16,16x24 --max-steps 24 --num-cpus 16

Both sweeps train the same trials with the same seeds (training is deterministic), so a trial
that both complete has the same RD point in both; the question is only whether ASHA stopped
the winner. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import compresszoo  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "platform"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "platform"), os.environ.get("PYTHONPATH")) if p)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="bmshj2018-factorized,bmshj2018-hyperprior")
    ap.add_argument("--qualities", default="1,8")
    ap.add_argument("--channels", default="4x8,12x16", help="extra (N, M) besides the debug flavor's 8x12")
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--checkpoint-every", type=int, default=4, help="steps between reports (ASHA's rungs)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    ap.add_argument("--trial-cpus", type=float, default=0.25)
    ap.add_argument("--workdir", default=None, help="default: a fresh temporary folder")
    return ap.parse_args(argv)


def run(args) -> str:
    import ray

    from compresszoo.config import smoke
    from compresszoo.data.miniature import ensure_smoke_data
    from compresszoo.tune.report import best_per_lambda
    from compresszoo.tune.space import SearchSpace, parse_channels, parse_ints
    from compresszoo.tune.sweep import SweepConfig, run_sweep
    from compresszoo.zoo_jobs import cpus_per_run

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tune-")).resolve()
    load = os.getloadavg()[0]
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    data = ensure_smoke_data(work)
    base = smoke(data=data, tracking_uri=f"sqlite:///{work}/mlflow.db", crop=64, val_crop=64, val_images=2,
                 gate_images=2, gate_min_side=64, gate_max_gap=1.0, batch_size=4, max_steps=args.max_steps,
                 checkpoint_every=args.checkpoint_every, log_every=args.checkpoint_every, cpus_per_worker=0.25,
                 data_cpus=0.25, shuffle_buffer=8)
    space = SearchSpace(architectures=tuple(args.archs.split(",")), qualities=parse_ints(args.qualities, "--qualities"),
                        channels=parse_channels(args.channels), debug=True)
    results = {}
    for mode in ("asha", "full"):
        sc = SweepConfig(name=f"bench-{mode}", storage=str(work / "sweeps"), space=space, base=base,
                         early_stopping=mode == "asha", trial_cpus=args.trial_cpus)
        t0 = time.perf_counter()
        out = run_sweep(sc, report_dir=work / f"{mode}-report")
        results[mode] = (out, time.perf_counter() - t0)

    lines = [f"Sweep: {len(space.trials())} trials ({args.archs} x q{args.qualities} x (N, M) in 8x12,{args.channels}), "
             f"{args.max_steps} steps each, a report every {args.checkpoint_every}; Ray with {args.num_cpus} CPUs, "
             f"{cpus_per_run(base, args.trial_cpus):g} CPU per trial, "
             f"load average {load:.1f} at start.", "",
             "| run | trials | stopped early | trial-steps run | budget | saved | wall (s) | concurrency allowed | reached |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, (out, wall) in results.items():
        r = out.report
        s = r["trial_steps"]
        lines.append(f"| {'ASHA per (arch, lambda)' if mode == 'asha' else 'every trial to the end'} | "
                     f"{r['counts']['total']} | {r['counts'].get('early_stopped', 0)} | {s['run']} | {s['full_budget']} | "
                     f"{s['saved_fraction']:.0%} | {wall:.0f} | {out.concurrency} | {r['concurrency_reached']} |")
    asha = best_per_lambda(results["asha"][0].report["trials"])
    full = best_per_lambda(results["full"][0].report["trials"])
    lines += ["", "| arch | lambda | best (N, M), ASHA | best (N, M), full | same |", "| --- | --- | --- | --- | --- |"]
    same = 0
    for key in sorted(full):
        a, f = asha.get(key), full[key]
        ok = a is not None and (a["N"], a["M"]) == (f["N"], f["M"])
        same += ok
        found = "-" if a is None else f"{a['N']},{a['M']}"
        lines.append(f"| {key[0]} | {key[1]:g} | {found} | {f['N']},{f['M']} | {'yes' if ok else 'NO'} |")
    lines.append(f"\nSame best (N, M) in {same} of {len(full)} (architecture, lambda) groups.")
    return "\n".join(lines)


def main(argv=None) -> int:
    print(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
