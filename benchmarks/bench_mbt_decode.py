"""mbt2018 decode time of a Kodak-sized (768x512) photograph: ours against the reference.

Same weights in both (ours loaded from the reference's state dict, tables from update()).
The reference decodes its own bitstream position by position; ours decodes its wavefront
stream, on the float path (the reference's arithmetic) and on the portable path (exact
fixed-point entropy parameters, the path .czoo files use). Prints seconds, the speed-ups and
how far the float path's decoded image is from the reference's (float noise: pixels are not
bit-identical across CPUs, since oneDNN picks kernels per instruction set).

    python benchmarks/bench_mbt_decode.py [--quality 3] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from compresszoo.models import create_model, model_spec  # noqa: E402


def kodak_sized() -> torch.Tensor:
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (512, 768), anti_aliasing=True)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()


def best_of(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quality", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from compressai.models.google import JointAutoregressiveHierarchicalPriors

    spec = model_spec("mbt2018", args.quality)
    torch.manual_seed(0)
    ref = JointAutoregressiveHierarchicalPriors(spec.N, spec.M).eval()
    with torch.no_grad():  # spread the densities so the streams are not trivially short
        ref.entropy_bottleneck.quantiles.mul_(4.0)
        ref.g_a[6].weight.mul_(20.0)
    ours = create_model("mbt2018", args.quality).eval()
    ours.load_state_dict(ref.state_dict())
    ref.update(force=True)
    ours.update(force=True)
    x = kodak_sized()
    with torch.no_grad():
        ref_c = ref.compress(x)
        our_c = ours.compress(x)
        t_ref, m_ref, ref_d = best_of(lambda: ref.decompress(ref_c["strings"], ref_c["shape"]), args.repeats)
        t_our, m_our, our_d = best_of(lambda: ours.decompress(our_c["strings"], our_c["shape"]), args.repeats)
        port_c = ours.compress(x, portable=True)
        t_port, m_port, port_d = best_of(
            lambda: ours.decompress(port_c["strings"], port_c["shape"], portable=True), args.repeats)
    diff = (ref_d["x_hat"] - our_d["x_hat"]).abs().max().item()
    ref_bytes = sum(len(s) for ss in ref_c["strings"] for s in ss)
    our_bytes = sum(len(s) for ss in our_c["strings"] for s in ss)
    port_bytes = sum(len(s) for ss in port_c["strings"] for s in ss)
    print(f"\nmbt2018 q{args.quality} (N={spec.N}, M={spec.M}), 768x512, {args.threads} thread(s), "
          f"best of {args.repeats}\n")
    print("| decoder | seconds (best) | seconds (median) | stream bytes |")
    print("| --- | --- | --- | --- |")
    print(f"| reference decompress | {t_ref:.2f} | {m_ref:.2f} | {ref_bytes} |")
    print(f"| compresszoo decompress (wavefront, float) | {t_our:.2f} | {m_our:.2f} | {our_bytes} |")
    print(f"| compresszoo decompress (wavefront, portable) | {t_port:.2f} | {m_port:.2f} | {port_bytes} |")
    print(f"\nspeed-up: float {t_ref / t_our:.1f}x, portable {t_ref / t_port:.1f}x; "
          f"max |x_hat difference| float path vs reference = {diff:.2e}")
    if diff > 1e-4:  # 1/40 of an 8-bit step: anything larger is a decoding error, not float noise
        sys.exit(1)


if __name__ == "__main__":
    main()
