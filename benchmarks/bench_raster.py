"""mbt2018 in CompressAI's raster order: encode and decode time against CompressAI itself and
against compresszoo's wavefront order, same weights, one photograph.

Checks first that the raster streams are CompressAI's bytes both ways, then prints seconds
and ratios measured in this run (so load from other processes hits every coder alike).

    python benchmarks/bench_raster.py [--quality 3] [--height 512 --width 768] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from compresszoo.models import create_model, model_spec  # noqa: E402


def photo(height: int, width: int) -> torch.Tensor:
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (height, width), anti_aliasing=True)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()


def best(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quality", type=int, default=3)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from compressai.models.google import JointAutoregressiveHierarchicalPriors

    spec = model_spec("mbt2018", args.quality)
    torch.manual_seed(0)
    ref = JointAutoregressiveHierarchicalPriors(spec.N, spec.M).eval()
    with torch.no_grad():  # spread the latents and densities: streams of many distinct symbols
        ref.entropy_bottleneck.quantiles.mul_(4.0)
        ref.g_a[6].weight.mul_(20.0)
    ref.update(force=True)
    ours = create_model("mbt2018", args.quality).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.update(force=True)
    x = photo(args.height, args.width)
    rows = {}
    with torch.no_grad():
        rows["CompressAI 1.2.8 (raster)"] = best(lambda: ref.compress(x), args.repeats)
        rows["compresszoo raster, float"] = best(lambda: ours.compress(x, order="raster"), args.repeats)
        rows["compresszoo raster, portable"] = best(lambda: ours.compress(x, order="raster", portable=True),
                                                    args.repeats)
        rows["compresszoo wavefront, float"] = best(lambda: ours.compress(x), args.repeats)
        rows["compresszoo wavefront, portable"] = best(lambda: ours.compress(x, portable=True), args.repeats)
        theirs, mine = rows["CompressAI 1.2.8 (raster)"][1], rows["compresszoo raster, float"][1]
        assert mine["strings"] == theirs["strings"], "raster streams differ from CompressAI's"
        decode = {
            "CompressAI 1.2.8 (raster)": lambda: ref.decompress(theirs["strings"], theirs["shape"]),
            "compresszoo raster, float": lambda: ours.decompress(theirs["strings"], theirs["shape"], order="raster"),
            "compresszoo raster, portable": lambda: ours.decompress(
                rows["compresszoo raster, portable"][1]["strings"], theirs["shape"], order="raster", portable=True),
            "compresszoo wavefront, float": lambda: ours.decompress(
                rows["compresszoo wavefront, float"][1]["strings"], theirs["shape"]),
            "compresszoo wavefront, portable": lambda: ours.decompress(
                rows["compresszoo wavefront, portable"][1]["strings"], theirs["shape"], portable=True),
        }
        dec = {name: best(fn, args.repeats) for name, fn in decode.items()}
    ref_x = dec["CompressAI 1.2.8 (raster)"][1]["x_hat"]
    gap = (dec["compresszoo raster, float"][1]["x_hat"] - ref_x).abs().max().item()
    h, w = theirs["shape"][0] * 4, theirs["shape"][1] * 4
    print(f"mbt2018 q{args.quality} (N={spec.N}, M={spec.M}), {args.height}x{args.width} photo, {h}x{w} "
          f"latent positions, {args.threads} thread(s); raster streams byte-identical to CompressAI's "
          f"both ways; decoded pixels within {gap:.1e} of CompressAI's\n")
    base_e, base_d = rows["CompressAI 1.2.8 (raster)"][0], dec["CompressAI 1.2.8 (raster)"][0]
    print("| coder | y bytes | encode s | decode s | encode vs CompressAI | decode vs CompressAI |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (t_enc, out) in rows.items():
        t_dec = dec[name][0]
        size = sum(len(s) for s in out["strings"][0])
        print(f"| {name} | {size} | {t_enc:.2f} | {t_dec:.2f} | {base_e / t_enc:.2f}x | {base_d / t_dec:.2f}x |")


if __name__ == "__main__":
    main()
