"""The portable entropy-parameter path against the float path, measured in one run.

    python benchmarks/bench_portable.py [--repeats 3] [--threads 1] [--size 256] [--overhead-only]
                                        [--archs mbt2018-mean ...] [--encode-pairs 12]

For each architecture at two qualities (q1, and the first quality with M=320): payload bytes
and bpp of both paths on real photographs, decoded PSNR, best-of-N encode and decode times
(interleaved), and the ratios portable / float. Models are full-size with random weights
spread as in tests/test_portable.py (no trained weights can be downloaded here), so the rate
comparison is between two ways of computing the same entropy parameters.

--encode-pairs N times only `compress` of one Kodak-size (768x512) photograph, the two paths
alternating N times after two warm-up pairs, and prints the best and the median ratio: a
single image at the size most codec papers report, where the hyper-synthesis' layers are large
enough for its Winograd paths.

Then the file overhead (bytes over the rANS payload) of a 768x512 photograph coded by each
architecture at q1: .czoo format 1 (JSON header), format 2, and CompressAI's example codec
(examples/codec.py: 2 header bytes, height and width as u32, the latent shape as two u32, the
stream count as u32 and a u32 length per stream; no checksum, no weights identity).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from test_portable import spread  # noqa: E402

from compresszoo.models import ARCHITECTURES, create_model  # noqa: E402
from compresszoo.models.loss import psnr  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]


def spread_model(arch: str, q: int):
    """The full-size model of (arch, q), seeded by q, weights spread, tables built."""
    torch.manual_seed(q)
    model = create_model(arch, q).eval()
    spread(model)
    model.update(force=True)
    return model


def qualities(arch: str) -> tuple[int, int]:
    """q1 and the first quality with M=320."""
    return 1, 5 if arch.startswith("mbt2018") else 6


def compressai_example_overhead(streams: int) -> int:
    return 2 + 2 * 4 + 2 * 4 + 4 + 4 * streams


def overhead_table() -> None:
    from czoo_v1 import encode_v1
    from skimage import data, transform

    from compresszoo.codec import encode_image, read_header

    img = transform.resize(data.astronaut(), (512, 768), anti_aliasing=True)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    print("\n| architecture (q1, 768x512) | payload bytes | format 1 overhead | format 2 overhead "
          "| CompressAI example codec overhead |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for arch in ARCHITECTURES:
        model = spread_model(arch, 1)
        v2 = encode_image(model, x)
        v1 = encode_v1(model, x)
        payload = lambda b: sum(map(sum, read_header(b).stream_lengths))  # noqa: E731
        streams = len(read_header(v2).stream_lengths[0])
        print(f"| {arch} | {payload(v2)} | {len(v1) - payload(v1)} | {len(v2) - payload(v2)} | "
              f"{compressai_example_overhead(streams)} |", flush=True)


def photos(size: int) -> list[torch.Tensor]:
    from skimage import data

    out = []
    for name in PHOTOS:
        img = getattr(data, name)()
        h, w = img.shape[:2]
        top, left = (h - min(h, size)) // 2, (w - min(w, size)) // 2
        crop = img[top:top + size, left:left + size]
        out.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float()[None] / 255.0)
    return out


def encode_pairs(archs: list[str], pairs: int) -> None:
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (512, 768), anti_aliasing=True)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None]
    print("| architecture | q | encode float, best (ms) | portable, best (ms) | ratio of bests | ratio of medians |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for arch in archs:
        for q in qualities(arch):
            model = spread_model(arch, q)
            times = {False: [], True: []}
            with torch.no_grad():
                for i in range(pairs + 2):
                    for portable in (False, True):
                        t = time.perf_counter()
                        model.compress(x, portable=portable)
                        if i >= 2:  # two warm-up pairs
                            times[portable].append(time.perf_counter() - t)
            f, p = times[False], times[True]
            print(f"| {arch} | {q} | {1000 * min(f):.0f} | {1000 * min(p):.0f} | {min(p) / min(f):.3f} | "
                  f"{np.median(p) / np.median(f):.3f} |", flush=True)


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--overhead-only", action="store_true")
    ap.add_argument("--archs", nargs="+", choices=list(ARCHITECTURES), default=list(ARCHITECTURES),
                    help="architectures to time (default: all four)")
    ap.add_argument("--encode-pairs", type=int, default=0,
                    help="only time compress() of one 768x512 photograph, float and portable alternating")
    args = ap.parse_args()
    if args.encode_pairs:
        torch.set_num_threads(args.threads)
        encode_pairs(args.archs, args.encode_pairs)
        return
    if args.overhead_only:
        overhead_table()
        return
    torch.set_num_threads(args.threads)
    images = photos(args.size)
    print("| architecture | q | N, M | float bpp | portable bpp | rate | PSNR float | PSNR portable "
          "| encode float (s) | encode portable (s) | ratio | decode float (s) | decode portable (s) | ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arch in args.archs:
        for q in qualities(arch):
            model = spread_model(arch, q)
            model.portable_layers(model.portable_modules[0], torch.device("cpu")) if model.portable_modules else None
            stats = {p: {"bits": 0, "pixels": 0, "psnr": [], "enc": 0.0, "dec": 0.0} for p in (False, True)}
            for x in images:
                for portable in (False, True):  # interleaved: both paths see the same machine state
                    s = stats[portable]
                    te, c = best_of(lambda m=model, x=x, p=portable: m.compress(x, portable=p), args.repeats)
                    td, d = best_of(lambda m=model, c=c, p=portable: m.decompress(c["strings"], c["shape"], portable=p),
                                    args.repeats)
                    s["bits"] += 8 * sum(len(b) for group in c["strings"] for b in group)
                    s["pixels"] += x.shape[-2] * x.shape[-1]
                    s["psnr"].append(psnr(d["x_hat"], x))
                    s["enc"] += te
                    s["dec"] += td
            f, p = stats[False], stats[True]
            bf, bp = f["bits"] / f["pixels"], p["bits"] / p["pixels"]
            print(f"| {arch} | {q} | {model.N}, {model.M} | {bf:.4f} | {bp:.4f} | {100 * (bp / bf - 1):+.3f}% | "
                  f"{np.mean(f['psnr']):.3f} | {np.mean(p['psnr']):.3f} | {f['enc']:.3f} | {p['enc']:.3f} | "
                  f"{p['enc'] / f['enc']:.2f} | {f['dec']:.3f} | {p['dec']:.3f} | {p['dec'] / f['dec']:.2f} |", flush=True)
    overhead_table()


if __name__ == "__main__":
    main()
