"""Training-step time of compresszoo's models against the reference (CompressAI 1.2.8).

One step = forward + RD loss + backward + main Adam step + aux loss/backward/aux Adam step,
batch 8 of 256x256 crops, CPU, one thread. Runs ours and the reference interleaved on the
same weights and data and prints the median step time and the ratio ours/reference.

    python benchmarks/bench_train_step.py [--quality 3] [--steps 5] [--batch 8] [--size 256]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from compresszoo.models import ARCHITECTURES, RateDistortionLoss, create_model, model_spec  # noqa: E402

REF = {
    "bmshj2018-factorized": "FactorizedPrior",
    "bmshj2018-hyperprior": "ScaleHyperprior",
    "mbt2018-mean": "MeanScaleHyperprior",
    "mbt2018": "JointAutoregressiveHierarchicalPriors",
}


def make_step(model, aux_params, main_params, lmbda):
    crit = RateDistortionLoss(lmbda)
    opt = torch.optim.Adam(main_params, lr=1e-4)
    aux_opt = torch.optim.Adam(aux_params, lr=1e-3)

    def step(x):
        opt.zero_grad(set_to_none=True)
        aux_opt.zero_grad(set_to_none=True)
        loss = crit(model(x), x)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(main_params, 1.0)
        opt.step()
        model.aux_loss().backward()
        aux_opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quality", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--archs", default=",".join(ARCHITECTURES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    google = importlib.import_module("compressai.models.google")
    x = torch.rand(args.batch, 3, args.size, args.size)
    rows = []
    for name in args.archs.split(","):
        spec = model_spec(name, args.quality)
        torch.manual_seed(0)
        ref = getattr(google, REF[name])(spec.N, spec.M).train()
        ours = create_model(name, args.quality).train()
        ours.load_state_dict(ref.state_dict())
        ref_aux = [p for n, p in ref.named_parameters() if n.endswith("quantiles")]
        ref_main = [p for n, p in ref.named_parameters() if not n.endswith("quantiles")]
        steps = {
            "ours": make_step(ours, ours.aux_parameters(), ours.main_parameters(), spec.lmbda),
            "reference": make_step(ref, ref_aux, ref_main, spec.lmbda),
        }
        times = {k: [] for k in steps}
        for k in steps:  # warm-up
            steps[k](x)
        for _ in range(args.steps):
            for k, fn in steps.items():
                t0 = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((name, spec, med["ours"], med["reference"], med["ours"] / med["reference"]))
        print(f"{name}: ours {med['ours']:.3f}s reference {med['reference']:.3f}s", flush=True)
    print(f"\nTraining step, batch {args.batch}, {args.size}x{args.size}, CPU, 1 thread, "
          f"quality {args.quality}, median of {args.steps} interleaved steps\n")
    print("| architecture | N, M | ours (s/step) | reference (s/step) | ratio ours/ref |")
    print("| --- | --- | --- | --- | --- |")
    for name, spec, o, r, ratio in rows:
        print(f"| {name} | {spec.N}, {spec.M} | {o:.3f} | {r:.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
