"""The four zoo architectures, built from the shared transforms in layers.py.

forward() gives x_hat and likelihoods; compress()/decompress() go through the
project's rANS coder. Parameter names follow CompressAI so checkpoints load both ways.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import layers as L
from . import portable as P
from .entropy import EntropyBottleneck, EntropyModel, GaussianConditional, get_scale_table

#: the stream orders of mbt2018's context model (see JointAutoregressiveHierarchicalPriors)
ORDERS = ("wavefront", "raster")


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")


class CompressionModel(nn.Module):
    """Base: update(), aux_loss() and the metadata saved with every checkpoint.

    N and M are optional so that models written CompressAI's way (`super().__init__()`, then
    their own entropy_bottleneck and transforms) work unchanged."""

    #: total downsampling from image to the deepest latent; inputs are padded to it
    downsampling_factor = 16

    def __init__(self, N: int | None = None, M: int | None = None):
        super().__init__()
        self.meta: dict = {}
        if N is not None and M is not None:
            self.N, self.M = int(N), int(M)
            self.meta.update(N=self.N, M=self.M)

    @classmethod
    def from_state_dict(cls, state_dict: dict):
        """A model of this class sized from a state dict (N from g_a's first conv, M from its
        last), with the state dict loaded: CompressAI's constructor for its checkpoints."""
        convs = [k for k in ("g_a.0.weight", "g_a.6.weight") if k not in state_dict]
        if convs:
            raise ValueError(f"state_dict has no {', '.join(convs)}: not a checkpoint of "
                             f"{cls.__name__} (g_a must hold 4 convolutions)")
        net = cls(state_dict["g_a.0.weight"].size(0), state_dict["g_a.6.weight"].size(0))
        net.load_state_dict(state_dict)
        return net

    def entropy_models(self):
        return [m for m in self.modules() if isinstance(m, EntropyModel)]

    def update(self, scale_table: Tensor | None = None, force: bool = False,
               update_quantiles: bool = False) -> bool:
        """Build every CDF table; needed once after training before real coding.

        update_quantiles=True first solves the entropy bottlenecks' quantiles by bisection
        instead of relying on the aux loss having converged."""
        table = get_scale_table() if scale_table is None else scale_table
        updated = False
        for m in self.entropy_models():
            if isinstance(m, EntropyBottleneck):
                updated |= m.update(force=force, update_quantiles=update_quantiles)
            elif isinstance(m, GaussianConditional):
                updated |= m.update_scale_table(table, force=force)
        self._portable_cache = None
        return updated

    #: the modules whose outputs the decoder must reproduce exactly (see portable.py)
    portable_modules: tuple[str, ...] = ()

    def portable_layers(self, name: str, device: torch.device) -> list:
        """The fixed-point form of one of `portable_modules`, derived from the current float
        weights and rebuilt whenever a parameter changed (in-place updates bump `_version`)."""
        params = [p for n in self.portable_modules for p in getattr(self, n).parameters()]
        key = tuple((p.data_ptr(), p._version) for p in params)
        cache = getattr(self, "_portable_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, {n: self._build_portable(n) for n in self.portable_modules})
            self._portable_cache = cache
        layers = cache[1][name]
        return P.on_device(layers, device)

    def _build_portable(self, name: str) -> list:
        return P.fixed_stack(getattr(self, name))

    def aux_loss(self) -> Tensor:
        return sum(m.loss() for m in self.modules() if isinstance(m, EntropyBottleneck))

    def aux_parameters(self):
        """The quantiles: trained by the aux optimizer only."""
        return [p for n, p in self.named_parameters() if n.endswith("quantiles")]

    def main_parameters(self):
        return [p for n, p in self.named_parameters() if not n.endswith("quantiles")]

    @staticmethod
    def _check_strings(strings, n: int, name: str):
        if not isinstance(strings, (list, tuple)) or len(strings) != n:
            raise ValueError(f"{name}.decompress expects a list of {n} stream lists, "
                             f"got {type(strings).__name__} of length {len(strings) if hasattr(strings, '__len__') else '?'}")


class FactorizedPrior(CompressionModel):
    """bmshj2018-factorized: g_a, a factorized entropy bottleneck on y, g_s."""

    def __init__(self, N: int, M: int):
        super().__init__(N, M)
        self.entropy_bottleneck = EntropyBottleneck(M)
        self.g_a = L.analysis_transform(N, M)
        self.g_s = L.synthesis_transform(N, M)

    def forward(self, x: Tensor) -> dict:
        y = self.g_a(x)
        y_hat, y_lik = self.entropy_bottleneck(y)
        return {"x_hat": self.g_s(y_hat), "likelihoods": {"y": y_lik}}

    @torch.no_grad()
    def compress(self, x: Tensor, return_latents: bool = False, portable: bool = False,
                 order: str = "wavefront") -> dict:
        """{"strings": [y streams], "shape": y size}; return_latents adds the encoder's y_hat.
        portable changes nothing here: the factorized tables depend on no computed value;
        nor does order (the stream has no context model, so both orders are the same bytes)."""
        _check_order(order)
        y = self.g_a(x)
        out = {"strings": [self.entropy_bottleneck.compress(y)], "shape": y.shape[-2:]}
        if return_latents:
            out["y_hat"] = self.entropy_bottleneck.quantize(
                y, "dequantize", self.entropy_bottleneck._medians_like(y.size(0), 2))
        return out

    @torch.no_grad()
    def decompress(self, strings, shape, portable: bool = False, order: str = "wavefront") -> dict:
        _check_order(order)
        self._check_strings(strings, 1, type(self).__name__)
        y_hat = self.entropy_bottleneck.decompress(strings[0], shape)
        return {"x_hat": self.g_s(y_hat).clamp_(0, 1), "y_hat": y_hat}


class ScaleHyperprior(CompressionModel):
    """bmshj2018-hyperprior: a hyper latent z (factorized) predicts the scales of y."""

    downsampling_factor = 64

    def __init__(self, N: int, M: int):
        super().__init__(N, M)
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.g_a = L.analysis_transform(N, M)
        self.g_s = L.synthesis_transform(N, M)
        self.h_a = L.scale_hyper_analysis(N, M)
        self.h_s = L.scale_hyper_synthesis(N, M)
        self.gaussian_conditional = GaussianConditional(None)

    def _hyper_input(self, y: Tensor) -> Tensor:
        return torch.abs(y)

    portable_modules = ("h_s",)

    def _gaussian_params(self, z_hat: Tensor):
        """(scales, means) predicted from the hyper latent."""
        return self.h_s(z_hat), None

    def _coding_params(self, z_hat: Tensor, portable: bool):
        """(scales, means) for coding: the float layers, or their exact fixed-point replay."""
        if not portable:
            return self._gaussian_params(z_hat)
        return self._split_params(P.run_stack(self.portable_layers("h_s", z_hat.device), z_hat))

    def _split_params(self, out: Tensor):
        return out, None

    def forward(self, x: Tensor) -> dict:
        y = self.g_a(x)
        z_hat, z_lik = self.entropy_bottleneck(self.h_a(self._hyper_input(y)))
        scales, means = self._gaussian_params(z_hat)
        y_hat, y_lik = self.gaussian_conditional(y, scales, means=means)
        return {"x_hat": self.g_s(y_hat), "likelihoods": {"y": y_lik, "z": z_lik}}

    def _code_z(self, y: Tensor, portable: bool = False):
        """(z streams, z as the decoder will see it: float z_hat, or portable fixed point)."""
        z = self.h_a(self._hyper_input(y))
        z_strings = self.entropy_bottleneck.compress(z)
        # Decode z exactly as the decoder will, so both sides share the same tables.
        return z_strings, self._decode_z(z_strings, z.shape[-2:], portable)

    def _decode_z(self, strings, shape, portable: bool) -> Tensor:
        if portable:
            return self.entropy_bottleneck.decompress_fixed(strings, shape, P.A_FRAC)
        return self.entropy_bottleneck.decompress(strings, shape)

    @torch.no_grad()
    def compress(self, x: Tensor, return_latents: bool = False, portable: bool = False,
                 order: str = "wavefront") -> dict:
        """{"strings": [y streams, z streams], "shape": z size}; optionally the encoder's y_hat.

        portable=False computes scales and means with the float layers, as CompressAI does
        (the streams decode where the float arithmetic is the same); portable=True with their
        exact fixed-point form (decodes on any CPU, thread count or GPU; portable.py).
        order is accepted for mbt2018's sake: without a context model both are the same bytes."""
        _check_order(order)
        y = self.g_a(x)
        z_strings, z_hat = self._code_z(y, portable)
        scales, means = self._coding_params(z_hat, portable)
        indexes = self.gaussian_conditional.build_indexes(scales)
        y_strings = self.gaussian_conditional.compress(y, indexes, means=means)
        out = {"strings": [y_strings, z_strings], "shape": z_hat.shape[-2:]}
        if return_latents:
            out["y_hat"] = self.gaussian_conditional.quantize(y, "dequantize", means).to(y.dtype)
        return out

    @torch.no_grad()
    def decompress(self, strings, shape, portable: bool = False, order: str = "wavefront") -> dict:
        _check_order(order)
        self._check_strings(strings, 2, type(self).__name__)
        z_hat = self._decode_z(strings[1], shape, portable)
        scales, means = self._coding_params(z_hat, portable)
        indexes = self.gaussian_conditional.build_indexes(scales)
        dtype = self.g_s[0].weight.dtype
        y_hat = self.gaussian_conditional.decompress(strings[0], indexes, dtype, means=means).to(dtype)
        return {"x_hat": self.g_s(y_hat).clamp_(0, 1), "y_hat": y_hat}


class MeanScaleHyperprior(ScaleHyperprior):
    """mbt2018-mean: the hyperprior predicts means and scales (Gaussian mean-scale prior)."""

    def __init__(self, N: int, M: int):
        super().__init__(N, M)
        self.h_a = L.mean_scale_hyper_analysis(N, M)
        self.h_s = L.mean_scale_hyper_synthesis(N, M)

    def _hyper_input(self, y: Tensor) -> Tensor:
        return y

    def _gaussian_params(self, z_hat: Tensor):
        return self.h_s(z_hat).chunk(2, 1)

    def _split_params(self, out: Tensor):
        return out.chunk(2, 1)


class JointAutoregressiveHierarchicalPriors(MeanScaleHyperprior):
    """mbt2018: hyperprior plus a masked 5x5 context model over already-decoded y.

    Coding runs in wavefront order: the mask reaches (h, w-1), (h, w-2) and the two rows
    above up to column w+2, so every position with the same t = 3h + w depends only on
    positions with a smaller t (the top-right neighbour (h-1, w+2) has t-1) and a whole
    wavefront is computed in one batched step: 3(H-1)+W steps instead of H*W. Encoder and decoder run the same _wavefront() code, so the
    entropy parameters of each position are computed identically on both sides.
    """

    KERNEL = 5

    def __init__(self, N: int, M: int):
        super().__init__(N, M)
        self.entropy_parameters = nn.Sequential(
            nn.Conv2d(M * 12 // 3, M * 10 // 3, 1), nn.LeakyReLU(inplace=True),
            nn.Conv2d(M * 10 // 3, M * 8 // 3, 1), nn.LeakyReLU(inplace=True),
            nn.Conv2d(M * 8 // 3, M * 6 // 3, 1),
        )
        self.context_prediction = L.MaskedConv2d(M, 2 * M, kernel_size=5, padding=2, stride=1)

    def forward(self, x: Tensor) -> dict:
        y = self.g_a(x)
        z_hat, z_lik = self.entropy_bottleneck(self.h_a(y))
        params = self.h_s(z_hat)
        y_hat = self.gaussian_conditional.quantize(y, "noise" if self.training else "dequantize")
        ctx = self.context_prediction(y_hat)
        scales, means = self.entropy_parameters(torch.cat((params, ctx), dim=1)).chunk(2, 1)
        _, y_lik = self.gaussian_conditional(y, scales, means=means)
        return {"x_hat": self.g_s(y_hat), "likelihoods": {"y": y_lik, "z": z_lik}}

    portable_modules = ("h_s", "context_prediction", "entropy_parameters")

    def _build_portable(self, name: str) -> list:
        if name == "context_prediction":
            cp = self.context_prediction
            return [P.fixed_layer(cp, None, weight=cp.masked_weight())]
        return super()._build_portable(name)

    def _hyper_params(self, z_hat: Tensor, portable: bool) -> Tensor:
        """h_s(z_hat): float, or (portable, z_hat in fixed point) integers at A_FRAC bits."""
        if not portable:
            return self.h_s(z_hat)
        return P.run_stack(self.portable_layers("h_s", z_hat.device), z_hat, real_output=False)

    @torch.no_grad()
    def compress(self, x: Tensor, return_latents: bool = False, portable: bool = False,
                 order: str = "wavefront") -> dict:
        """order="wavefront" (default, fast) or "raster" (CompressAI's stream order: a stream
        for, or from, a CompressAI deployment; slow like the reference; raster.py)."""
        _check_order(order)
        if order == "raster":
            from .raster import raster_compress

            return raster_compress(self, x, return_latents=return_latents, portable=portable)
        y = self.g_a(x)
        z_strings, z_hat = self._code_z(y, portable)
        params = self._hyper_params(z_hat, portable)
        code = self._wavefront_portable if portable else self._wavefront
        coded = [code(params[i:i + 1], y=y[i:i + 1]) for i in range(y.size(0))]
        out = {"strings": [[c[0] for c in coded], z_strings], "shape": z_hat.shape[-2:]}
        if return_latents:
            out["y_hat"] = torch.cat([c[1] for c in coded])
        return out

    @torch.no_grad()
    def decompress(self, strings, shape, portable: bool = False, order: str = "wavefront") -> dict:
        """order must be the one the streams were made in (see compress)."""
        _check_order(order)
        if order == "raster":
            from .raster import raster_decompress

            return raster_decompress(self, strings, shape, portable=portable)
        self._check_strings(strings, 2, type(self).__name__)
        z_hat = self._decode_z(strings[1], shape, portable)
        params = self._hyper_params(z_hat, portable)
        if len(strings[0]) != z_hat.size(0):
            raise ValueError(f"got {len(strings[0])} y streams for {z_hat.size(0)} z streams")
        code = self._wavefront_portable if portable else self._wavefront
        y_hat = torch.cat([code(params[i:i + 1], data=s)[1] for i, s in enumerate(strings[0])])
        return {"x_hat": self.g_s(y_hat).clamp_(0, 1), "y_hat": y_hat}

    def _wavefront_portable(self, params: Tensor, y: Tensor | None = None, data: bytes | None = None):
        """The wavefront coder on the exact path: context and entropy parameters in fixed
        point (portable.py), so any thread count, kernel or device gives the same indexes and
        means. The masked 5x5 context is one GEMM over the unmasked taps of each position.
        One intra-op thread here is for speed only (the steps are small; threads cost more
        than they give), not for exactness."""
        return _on_one_thread(self._wavefront_portable_1t, params, y, data)

    def _wavefront_portable_1t(self, params: Tensor, y: Tensor | None, data: bytes | None):
        from ..ans import rans

        gc = self.gaussian_conditional
        cdfs, lengths, offsets = gc.coding_tables()
        M, k = self.M, self.KERNEL
        pad = k // 2
        H, W = params.shape[-2:]
        dev = params.device
        ctx_layer = self.portable_layers("context_prediction", dev)[0]
        ep = self.portable_layers("entropy_parameters", dev)
        th, tw = torch.nonzero(self.context_prediction.mask[0, 0], as_tuple=True)
        th, tw = th.to(dev), tw.to(dev)
        w_ctx = ctx_layer.weight[:, :, th, tw].reshape(2 * M, -1).t()  # (M*taps, 2M)
        mats = [(la.weight.reshape(la.weight.shape[0], -1).t(), la.bias) for la in ep]
        rows_p = params[0].reshape(params.shape[1], -1).t()  # (H*W, 2M), A_FRAC integers
        y_fix = torch.zeros(M, (H + 2 * pad) * (W + 2 * pad), dtype=torch.float64, device=dev)
        y_hat = torch.zeros(M, H * W, dtype=torch.float64, device=dev)
        one = 2.0 ** P.A_FRAC
        if y is None:
            decoder = rans.RansDecoder(data)
        else:
            y_rows = y[0].reshape(M, -1).t()  # (H*W, M)
            encoder = rans.RansEncoder()
        with torch.autocast(dev.type, enabled=False):
            for pos, centre, gather in _wavefronts(H, W, k, dev):
                n = pos.numel()
                crops = y_fix.index_select(1, gather).view(M, k, n, k)[:, th, :, tw]  # (taps, M, n)
                acc = torch.addmm(ctx_layer.bias, crops.permute(2, 1, 0).reshape(n, -1), w_ctx)
                h = torch.cat((rows_p.index_select(0, pos), ctx_layer.requantize(acc)), dim=1)
                for i, (layer, (wt, b)) in enumerate(zip(ep, mats)):
                    acc = torch.addmm(b, h, wt)
                    h = layer.requantize(acc) if i < len(ep) - 1 else layer.real(acc)
                scales, means = h.chunk(2, 1)  # (P, M), exact float64
                indexes = gc.build_indexes(scales).cpu().numpy()
                if y is None:
                    sym = decoder.decode(indexes.reshape(-1), cdfs, lengths, offsets).reshape(indexes.shape)
                    sym = torch.from_numpy(np.ascontiguousarray(sym)).to(dev)
                else:
                    sym = gc.quantize(y_rows.index_select(0, pos).double(), "symbols", means)
                    encoder.encode_with_indexes(sym.cpu().numpy().reshape(-1), indexes.reshape(-1),
                                                cdfs, lengths, offsets)
                symf = sym.to(torch.float64)
                y_fix.index_copy_(1, centre, (symf * one + torch.round(means * one)).clamp_(-P.A_LIMIT, P.A_LIMIT).t())
                y_hat.index_copy_(1, pos, (symf + means).t())
        y_hat = y_hat.view(1, M, H, W).to(self.g_s[0].weight.dtype)
        if y is None:
            decoder.finish()
            return data, y_hat
        return encoder.flush(), y_hat

    def _wavefront(self, params: Tensor, y: Tensor | None = None, data: bytes | None = None):
        """Encode y (data=None) or decode data (y=None) for one image; returns (bytes, y_hat).

        Runs on one intra-op thread: a multi-threaded GEMV may split its sums across threads
        (MKL does for the M=320 layers), and the entropy parameters must not depend on the
        thread count of the machine that encodes or decodes."""
        return _on_one_thread(self._wavefront_1t, params, y, data)

    def _wavefront_1t(self, params: Tensor, y: Tensor | None, data: bytes | None):
        from ..ans import rans

        gc = self.gaussian_conditional
        cdfs, lengths, offsets = gc.coding_tables()
        M, k = self.M, self.KERNEL
        pad = k // 2
        H, W = params.shape[-2:]
        dtype = params.dtype
        # y_hat with a zero border; context for a set of positions = masked 5x5 patches.
        y_pad = torch.zeros(1, M, H + 2 * pad, W + 2 * pad, dtype=dtype, device=params.device)
        # The reference computes each position with a batch-1 5x5 convolution and batch-1 1x1
        # convolutions (one GEMM row each). The strided convolution over a strip of crops and
        # a batched matmul with one row per position reproduce that arithmetic bit for bit,
        # so the decoded image equals the reference decoder's (tests/test_codec.py).
        weight = self.context_prediction.masked_weight()
        bias = self.context_prediction.bias
        convs = [m for m in self.entropy_parameters if isinstance(m, nn.Conv2d)]
        ep = [(c.weight.reshape(c.out_channels, -1).t(), c.bias) for c in convs]  # (K, N) views
        rows_p = params[0].reshape(params.shape[1], -1).t().contiguous()  # (H*W, 2M)
        plane = y_pad.view(M, -1)  # (M, Hp*Wp), shares memory with y_pad
        if y is None:
            decoder = rans.RansDecoder(data)
        else:
            y_rows = y[0].reshape(M, -1).t()  # (H*W, M)
            encoder = rans.RansEncoder()
        for pos, centre, gather in _wavefronts(H, W, k, params.device):
            n = pos.numel()
            # The 5x5 crops centred on each position, side by side in one (1, M, 5, 5P) strip:
            # a stride-5 convolution gives each crop's output with the same arithmetic as a
            # batch-1 call on that crop, and runs P independent accumulations at once.
            strip = plane.index_select(1, gather).view(1, M, k, n * k)
            ctx = F.conv2d(strip, weight, bias, stride=(1, k))[0, :, 0, :].t()  # (P, 2M)
            h = torch.cat((rows_p.index_select(0, pos), ctx), dim=1)
            for i, (wt, b) in enumerate(ep):
                h = torch.baddbmm(b.expand(n, 1, -1), h[:, None, :], wt.expand(n, -1, -1))[:, 0]
                if i < len(ep) - 1:
                    h = F.leaky_relu(h)
            scales, means = h.chunk(2, 1)  # (P, M)
            indexes = gc.build_indexes(scales).cpu().numpy()
            if y is None:
                sym = decoder.decode(indexes.reshape(-1), cdfs, lengths, offsets).reshape(indexes.shape)
                sym = torch.from_numpy(np.ascontiguousarray(sym)).to(params.device)
            else:
                sym = gc.quantize(y_rows.index_select(0, pos), "symbols", means)
                encoder.encode_with_indexes(sym.cpu().numpy().reshape(-1), indexes.reshape(-1),
                                            cdfs, lengths, offsets)
            plane.index_copy_(1, centre, (sym.to(dtype) + means).t())
        y_hat = y_pad[:, :, pad:pad + H, pad:pad + W].contiguous()
        if y is None:
            decoder.finish()
            return data, y_hat
        return encoder.flush(), y_hat


def _on_one_thread(fn, *args):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(saved)


@functools.lru_cache(maxsize=8)
def _wavefronts(H: int, W: int, k: int, device: torch.device) -> tuple:
    """Per wavefront t = 3h + w: (positions in the H*W grid, their centres in the padded
    grid, the gather index of their 5x5 crops laid side by side as a (k, P*k) strip)."""
    pad, Wp = k // 2, W + 2 * (k // 2)
    offs = torch.arange(k)
    out = []
    for t in range(3 * (H - 1) + W):
        hs = torch.arange(max(0, (t - W + 3) // 3), min(H - 1, t // 3) + 1)
        ws = t - 3 * hs
        keep = (ws >= 0) & (ws < W)
        hs, ws = hs[keep], ws[keep]
        if hs.numel() == 0:
            continue
        gather = (hs[None, :, None] + offs[:, None, None]) * Wp + ws[None, :, None] + offs[None, None, :]
        out.append((
            (hs * W + ws).to(device),
            ((hs + pad) * Wp + ws + pad).to(device),
            gather.reshape(-1).to(device),
        ))
    return tuple(out)
