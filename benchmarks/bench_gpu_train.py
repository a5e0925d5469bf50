"""GPU training throughput: compresszoo's training step against the reference's loop.

bmshj2018-hyperprior q3, batch 16, 256x256 crops of real photographs, one GPU. The
reference loop is CompressAI's examples/train.py step (forward, RD loss, backward, clip 1.0,
Adam, aux loss, aux Adam) on compressai's model; ours is compresszoo.train.Trainer.train_step
on ours (same weights), in fp32, then with channels_last and with bf16 autocast.

    python benchmarks/bench_gpu_train.py [--steps 50] [--batch 16]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from compresszoo.config import TrainConfig  # noqa: E402
from compresszoo.models.registry import model_spec  # noqa: E402
from compresszoo.train import Trainer  # noqa: E402


def crops(batch: int, size: int, device) -> torch.Tensor:
    from skimage import data

    photos = [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket")]
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(batch):
        p = photos[i % len(photos)]
        top = int(torch.randint(0, p.shape[0] - size + 1, (1,), generator=g))
        left = int(torch.randint(0, p.shape[1] - size + 1, (1,), generator=g))
        out.append(torch.from_numpy(p[top:top + size, left:left + size].copy()).permute(2, 0, 1))
    return (torch.stack(out).float() / 255).to(device)


def reference_step(model, x, lmbda):
    losses = importlib.import_module("compressai.losses")
    crit = losses.RateDistortionLoss(lmbda=lmbda)
    params = [p for n, p in model.named_parameters() if not n.endswith("quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
    opt, aux_opt = torch.optim.Adam(params, lr=1e-4), torch.optim.Adam(aux, lr=1e-3)

    def step():
        opt.zero_grad()
        aux_opt.zero_grad()
        out = crit(model(x), x)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.aux_loss().backward()
        aux_opt.step()

    return step


def timed(step, steps: int, device) -> float:
    for _ in range(5):
        step()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--arch", default="bmshj2018-hyperprior")
    ap.add_argument("--quality", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    spec = model_spec(args.arch, args.quality)
    x = crops(args.batch, args.size, device)
    google = importlib.import_module("compressai.models.google")
    cls = {"bmshj2018-hyperprior": "ScaleHyperprior", "bmshj2018-factorized": "FactorizedPrior",
           "mbt2018-mean": "MeanScaleHyperprior", "mbt2018": "JointAutoregressiveHierarchicalPriors"}
    torch.manual_seed(0)
    ref = getattr(google, cls[args.arch])(spec.N, spec.M).to(device).train()
    rows = [("reference (CompressAI loop, fp32)", timed(reference_step(ref, x, spec.lmbda), args.steps, device))]
    for label, extra in [("compresszoo fp32", {}), ("compresszoo channels_last", {"channels_last": True}),
                         ("compresszoo bf16 autocast + channels_last", {"channels_last": True, "bf16": True})]:
        cfg = TrainConfig(architecture=args.arch, quality=args.quality, data="-", use_gpu=device.type == "cuda",
                          **extra).resolved()
        tr = Trainer(cfg, 0, 1, device, None)
        tr.model.load_state_dict(ref.state_dict())
        tr.model.train()
        rows.append((label, timed(lambda tr=tr: tr.train_step(tr.model, x), args.steps, device)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{args.arch} q{args.quality} (N={spec.N}, M={spec.M}), batch {args.batch}, "
          f"{args.size}x{args.size}, {args.steps} timed steps, device: {name}, torch {torch.__version__}\n")
    print("| loop | images/s | ratio vs reference |")
    print("| --- | --- | --- |")
    base = args.batch * args.steps / rows[0][1]
    for label, secs in rows:
        ips = args.batch * args.steps / secs
        print(f"| {label} | {ips:.1f} | {ips / base:.2f} |")


if __name__ == "__main__":
    main()
