"""mbt2018 in CompressAI's stream order: one latent position at a time, row by row.

compresszoo codes mbt2018's context model in wavefront order (architectures.py), which is
fast but writes the symbols in another order than CompressAI 1.2.8, whose
JointAutoregressiveHierarchicalPriors visits (h, w) in raster order and writes the M symbols
of each position channel by channel into one buffered rANS stream. These functions write and
read that order, so a stream can be made for, or read from, a CompressAI deployment.

portable=False repeats CompressAI's arithmetic step for step (a batch-1 5x5 convolution of
the masked context over the padded crop, the 1x1 entropy-parameter convolutions on one
position, the same thread settings as the caller): the stream is byte-identical to
CompressAI's and decodes where the float arithmetic is the same, as CompressAI's does.
portable=True computes the context and entropy parameters on the exact fixed-point path
(portable.py) with the same formulas as the wavefront coder, so the file decodes on any
CPU, thread count or GPU, and its latents equal the portable wavefront coder's.

Slow like the reference: H*W sequential steps. Speed is the wavefront order's job.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import portable as P


@torch.no_grad()
def raster_compress(model, x: Tensor, return_latents: bool = False, portable: bool = False) -> dict:
    """model.compress(x) for mbt2018 with the y streams in CompressAI's raster order."""
    y = model.g_a(x)
    z_strings, z_hat = model._code_z(y, portable)
    params = model._hyper_params(z_hat, portable)
    if y.shape[-2:] != params.shape[-2:]:
        raise ValueError(f"input of {tuple(x.shape[-2:])} pixels gives latents of {tuple(y.shape[-2:])} "
                         f"but hyper parameters of {tuple(params.shape[-2:])}; pad the image to a "
                         f"multiple of {model.downsampling_factor} (codec.image.pad)")
    code = _raster_portable if portable else _raster_float
    coded = [code(model, params[i:i + 1], y=y[i:i + 1]) for i in range(y.size(0))]
    out = {"strings": [[c[0] for c in coded], z_strings], "shape": z_hat.shape[-2:]}
    if return_latents:
        out["y_hat"] = torch.cat([c[1] for c in coded])
    return out


@torch.no_grad()
def raster_decompress(model, strings, shape, portable: bool = False) -> dict:
    """model.decompress for streams in CompressAI's raster order (CompressAI's or ours)."""
    model._check_strings(strings, 2, type(model).__name__)
    z_hat = model._decode_z(strings[1], shape, portable)
    params = model._hyper_params(z_hat, portable)
    if len(strings[0]) != z_hat.size(0):
        raise ValueError(f"got {len(strings[0])} y streams for {z_hat.size(0)} z streams")
    code = _raster_portable if portable else _raster_float
    y_hat = torch.cat([code(model, params[i:i + 1], data=s)[1] for i, s in enumerate(strings[0])])
    return {"x_hat": model.g_s(y_hat).clamp_(0, 1), "y_hat": y_hat}


def _coder(y: Tensor | None, data: bytes | None):
    from ..ans import rans

    return rans.RansDecoder(data) if y is None else rans.RansEncoder()


def _raster_float(model, params: Tensor, y: Tensor | None = None, data: bytes | None = None):
    """Encode y (data=None) or decode data (y=None) for one image; returns (bytes, y_hat).

    The steps of CompressAI's _compress_ar/_decompress_ar: the encoder's padded plane holds
    y itself (the mask zeroes every tap not yet coded), the decoder's starts at zero."""
    gc = model.gaussian_conditional
    cdfs, lengths, offsets = gc.coding_tables()
    k = model.KERNEL
    pad = k // 2
    H, W = params.shape[-2:]
    weight = model.context_prediction.masked_weight()
    bias = model.context_prediction.bias
    if y is None:
        plane = torch.zeros(1, model.M, H + 2 * pad, W + 2 * pad, dtype=params.dtype, device=params.device)
    else:
        plane = F.pad(y, (pad, pad, pad, pad))
    coder = _coder(y, data)
    symbols, indexes = [], []
    for h in range(H):
        for w in range(W):
            crop = plane[:, :, h:h + k, w:w + k]
            ctx = F.conv2d(crop, weight, bias=bias)
            p = params[:, :, h:h + 1, w:w + 1]
            scales, means = model.entropy_parameters(torch.cat((p, ctx), dim=1)).chunk(2, 1)
            idx = gc.build_indexes(scales).reshape(-1).cpu().numpy()
            if y is None:
                sym = torch.from_numpy(coder.decode(idx, cdfs, lengths, offsets)).to(params.device)
                sym = sym.reshape(1, -1, 1, 1)
            else:
                sym = gc.quantize(crop[:, :, pad:pad + 1, pad:pad + 1], "symbols", means)
                symbols.append(sym.reshape(-1).cpu().numpy())
                indexes.append(idx)
            plane[:, :, h + pad:h + pad + 1, w + pad:w + pad + 1] = gc.dequantize(sym, means)
    return _finish(coder, y, data, symbols, indexes, (cdfs, lengths, offsets),
                   plane[:, :, pad:pad + H, pad:pad + W].contiguous())


def _finish(coder, y, data, symbols, indexes, tables, y_hat: Tensor):
    if y is None:
        coder.finish()
        return data, y_hat
    if symbols:  # one call, as CompressAI's BufferedRansEncoder receives them
        coder.encode_with_indexes(np.concatenate(symbols), np.concatenate(indexes), *tables)
    return coder.flush(), y_hat


def _raster_portable(model, params: Tensor, y: Tensor | None = None, data: bytes | None = None):
    """The raster coder on the exact path: params are h_s's A_FRAC integers; the context and
    entropy parameters are integer sums (exact in any order, portable.py) with the wavefront
    coder's formulas, so both orders give the same y_hat. One intra-op thread for speed only."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.autocast(params.device.type, enabled=False):
            return _raster_portable_1t(model, params, y, data)
    finally:
        torch.set_num_threads(saved)


def _raster_portable_1t(model, params: Tensor, y: Tensor | None, data: bytes | None):
    gc = model.gaussian_conditional
    cdfs, lengths, offsets = gc.coding_tables()
    M, k = model.M, model.KERNEL
    pad = k // 2
    H, W = params.shape[-2:]
    dev = params.device
    ctx_layer = model.portable_layers("context_prediction", dev)[0]
    ep = model.portable_layers("entropy_parameters", dev)
    th, tw = torch.nonzero(model.context_prediction.mask[0, 0], as_tuple=True)
    th, tw = th.to(dev), tw.to(dev)
    w_ctx = ctx_layer.weight[:, :, th, tw].reshape(2 * M, -1).t()  # (M*taps, 2M)
    mats = [(la.weight.reshape(la.weight.shape[0], -1).t(), la.bias) for la in ep]
    y_fix = torch.zeros(M, H + 2 * pad, W + 2 * pad, dtype=torch.float64, device=dev)
    y_hat = torch.zeros(M, H, W, dtype=torch.float64, device=dev)
    one = 2.0 ** P.A_FRAC
    coder = _coder(y, data)
    symbols, indexes = [], []
    for h in range(H):
        for w in range(W):
            taps = y_fix[:, h + th, w + tw].reshape(1, -1)  # (1, M*taps), channel-major
            acc = torch.addmm(ctx_layer.bias[None], taps, w_ctx)
            act = torch.cat((params[0, :, h, w][None], ctx_layer.requantize(acc)), dim=1)
            for i, (layer, (wt, b)) in enumerate(zip(ep, mats)):
                acc = torch.addmm(b[None], act, wt)
                act = layer.requantize(acc) if i < len(ep) - 1 else layer.real(acc)
            scales, means = act.chunk(2, 1)  # (1, M), exact float64
            idx = gc.build_indexes(scales).reshape(-1).cpu().numpy()
            if y is None:
                sym = torch.from_numpy(coder.decode(idx, cdfs, lengths, offsets)).to(dev)[None]
            else:
                sym = gc.quantize(y[0, :, h, w].double()[None], "symbols", means)
                symbols.append(sym.reshape(-1).cpu().numpy())
                indexes.append(idx)
            symf = sym.to(torch.float64)
            y_fix[:, h + pad, w + pad] = (symf * one + torch.round(means * one)).clamp_(-P.A_LIMIT, P.A_LIMIT)[0]
            y_hat[:, h, w] = (symf + means)[0]
    return _finish(coder, y, data, symbols, indexes, (cdfs, lengths, offsets),
                   y_hat[None].to(model.g_s[0].weight.dtype))
