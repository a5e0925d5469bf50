"""Coder throughput on a Kodak-sized latent: compresszoo's rANS vs CompressAI and constriction.

Run: `python benchmarks/bench_coder.py` (one thread; prints a markdown table). Coders
are timed round-robin and each keeps its best round, so load from other processes
hits them alike and the ratios come from one run on one machine.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from compresszoo.ans import rans

SHAPE = (320, 48, 32)  # M x H/16 x W/16 for a 768x512 Kodak image


@dataclass
class Coder:
    name: str
    encode: Callable[[], object]
    decode: Callable[[object], object]  # takes what encode returned
    check: Callable[[object, object], None]  # (encoded, decoded): assert exactness
    size: Callable[[object], int]
    note: str
    t_enc: float = float("inf")
    t_dec: float = float("inf")


def build_latent(seed: int):
    from compressai.entropy_models import GaussianConditional
    from compressai.models.google import get_scale_table

    gc = GaussianConditional(None)
    gc.update_scale_table(get_scale_table())
    gc.update()
    g = torch.Generator().manual_seed(seed)
    table = gc.scale_table
    # Every element draws its scale from the 64-entry table, so all tables are used.
    pick = torch.randint(0, len(table), SHAPE, generator=g)
    scales = table[pick].float()
    y = torch.randn(SHAPE, generator=g) * scales
    return gc, y[None], scales[None], gc.build_indexes(scales)[None]


def coders(gc, y, scales, indexes) -> list[Coder]:
    from compressai.ans import RansDecoder, RansEncoder

    cdfs = gc._quantized_cdf.numpy().astype(np.int32)
    lengths = gc._cdf_length.numpy().astype(np.int32).reshape(-1)
    offsets = gc._offset.numpy().astype(np.int32).reshape(-1)
    symbols = gc.quantize(y, "symbols").reshape(-1).numpy().astype(np.int32)
    idx = indexes.reshape(-1).numpy().astype(np.int32)
    y_hat = gc.dequantize(torch.from_numpy(symbols).reshape(y.shape))
    lists = (symbols.tolist(), idx.tolist(), cdfs.tolist(), lengths.tolist(), offsets.tolist())
    ref_bytes = RansEncoder().encode_with_indexes(*lists)

    def same_bytes_and(expected):
        def check(data, decoded):
            assert (data[0] if isinstance(data, list) else data) == ref_bytes, "bytes differ"
            assert np.array_equal(np.asarray(decoded).reshape(-1), expected.reshape(-1))

        return check

    def our_compress():  # from the same tensors the reference path takes
        sym = gc.quantize(y, "symbols").reshape(-1).numpy()
        return rans.encode(sym, indexes.reshape(-1).numpy(), cdfs, lengths, offsets)

    def our_decompress(data):
        out = rans.decode(data, indexes.reshape(-1).numpy(), cdfs, lengths, offsets)
        return gc.dequantize(torch.from_numpy(out).reshape(y.shape))

    out = [
        Coder(
            "CompressAI GaussianConditional.compress/decompress",
            lambda: gc.compress(y, indexes),
            lambda s: gc.decompress(s, indexes),
            same_bytes_and(y_hat.numpy()),
            lambda s: len(s[0]),
            "the reference path",
        ),
        Coder(
            "CompressAI ans.RansEncoder/RansDecoder",
            lambda: RansEncoder().encode_with_indexes(*lists),
            lambda b: RansDecoder().decode_with_indexes(b, *lists[1:]),
            same_bytes_and(symbols),
            len,
            "lists prepared outside the timing",
        ),
        Coder(
            "compresszoo rans.encode/decode",
            lambda: rans.encode(symbols, idx, cdfs, lengths, offsets),
            lambda b: rans.decode(b, idx, cdfs, lengths, offsets),
            same_bytes_and(symbols),
            len,
            "NumPy in/out, tables validated each call",
        ),
        Coder(
            "compresszoo from/to tensors",
            our_compress,
            our_decompress,
            same_bytes_and(y_hat.numpy()),
            len,
            "quantize/dequantize included, like the reference path",
        ),
    ]
    return out + constriction_coders(symbols, idx, scales, cdfs, lengths, offsets)


def constriction_coders(symbols, idx, scales, cdfs, lengths, offsets) -> list[Coder]:
    """constriction's stack ANS coder (64-bit state, 32-bit words, 24-bit precision).

    It has no escape bin, so symbols are clipped into each table's range first; its
    streams are not byte-compatible and only the throughput is comparable.
    """
    try:
        import constriction
    except ImportError:
        return []
    model, AnsCoder = constriction.stream.model, constriction.stream.stack.AnsCoder
    n_bins = lengths - 1  # the last bin is the escape
    values = np.clip(symbols - offsets[idx], 0, n_bins[idx] - 2).astype(np.int32)

    # (1) Categorical models from the very same quantized tables, one concrete model per
    # table, symbols grouped by table (the decoder knows the indexes, so it can group too).
    groups = [np.flatnonzero(idx == t) for t in range(len(lengths))]
    cats = []
    for t in range(len(lengths)):
        freq = np.diff(cdfs[t, : lengths[t]]).astype(np.float64)
        cats.append(model.Categorical(freq / freq.sum(), perfect=False))

    def cat_encode():
        coder = AnsCoder()
        for t in reversed(range(len(groups))):
            coder.encode_reverse(values[groups[t]], cats[t])
        return coder.get_compressed()

    def cat_decode(data):
        coder, res = AnsCoder(data), np.empty_like(values)
        for t in range(len(groups)):
            res[groups[t]] = coder.decode(cats[t], len(groups[t]))
        return res

    # (2) Its quantized Gaussian family: the CDF is evaluated per symbol from (mean, std).
    half = int(n_bins.max())
    qg = model.QuantizedGaussian(-half, half)
    means = np.zeros(len(symbols), dtype=np.float64)
    stds = scales.reshape(-1).numpy().astype(np.float64)
    clipped = np.clip(symbols, -half, half).astype(np.int32)

    def qg_encode():
        coder = AnsCoder()
        coder.encode_reverse(clipped, qg, means, stds)
        return coder.get_compressed()

    def exact(expected):
        def check(_, decoded):
            assert np.array_equal(decoded, expected)

        return check

    return [
        Coder(
            "constriction AnsCoder + Categorical",
            cat_encode,
            cat_decode,
            exact(values),
            lambda d: d.nbytes,
            "same quantized tables, grouped per table, escapes clipped",
        ),
        Coder(
            "constriction AnsCoder + QuantizedGaussian",
            qg_encode,
            lambda d: AnsCoder(d).decode(qg, means, stds),
            exact(clipped),
            lambda d: d.nbytes,
            f"(mean, std) per symbol, support +-{half}",
        ),
    ]


def measure(all_coders: list[Coder], repeats: int) -> dict[str, int]:
    sizes = {}
    for c in all_coders:  # warm-up round doubles as the exactness check
        data = c.encode()
        c.check(data, c.decode(data))
        sizes[c.name] = c.size(data)
    for _ in range(repeats):
        for c in all_coders:
            t0 = time.perf_counter()
            data = c.encode()
            t1 = time.perf_counter()
            c.decode(data)
            t2 = time.perf_counter()
            c.t_enc, c.t_dec = min(c.t_enc, t1 - t0), min(c.t_dec, t2 - t1)
    return sizes


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    gc, y, scales, indexes = build_latent(args.seed)
    n = y.numel()
    all_coders = coders(gc, y, scales, indexes)
    sizes = measure(all_coders, args.repeats)
    ref, raw, ours, ours_t = all_coders[:4]

    print(f"\nlatent {SHAPE} = {n} symbols, 1 thread, {cpu_name()}, torch {torch.__version__},")
    print(f"best of {args.repeats} interleaved rounds\n")
    print("| coder | encode Msym/s | decode Msym/s | bytes | note |")
    print("| --- | ---: | ---: | ---: | --- |")
    for c in all_coders:
        enc, dec = n / c.t_enc / 1e6, n / c.t_dec / 1e6
        print(f"| {c.name} | {enc:.1f} | {dec:.1f} | {sizes[c.name]} | {c.note} |")
    print()
    for label, mine, theirs in (
        ("from/to tensors vs reference path (target >= 5x)", ours_t, ref),
        ("coder only vs reference path", ours, ref),
        ("coder only vs reference raw ans coder", ours, raw),
    ):
        print(
            f"compresszoo {label}: encode {theirs.t_enc / mine.t_enc:.1f}x, "
            f"decode {theirs.t_dec / mine.t_dec:.1f}x"
        )
    print(
        f"compresszoo coder only vs 100 Msym/s per core: encode {n / ours.t_enc / 1e8:.0%}, "
        f"decode {n / ours.t_dec / 1e8:.0%}"
    )


if __name__ == "__main__":
    main()
