"""The four zoo architectures, built from the shared transforms in layers.py.

forward() gives x_hat and likelihoods; compress()/decompress() go through the
project's rANS coder. Parameter names follow CompressAI so checkpoints load both ways.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import layers as L
from .entropy import EntropyBottleneck, EntropyModel, GaussianConditional, get_scale_table


class CompressionModel(nn.Module):
    """Base: update(), aux_loss() and the metadata saved with every checkpoint."""

    #: total downsampling from image to the deepest latent; inputs are padded to it
    downsampling_factor = 16

    def __init__(self, N: int, M: int):
        super().__init__()
        self.N, self.M = int(N), int(M)
        self.meta: dict = {"N": self.N, "M": self.M}

    def entropy_models(self):
        return [m for m in self.modules() if isinstance(m, EntropyModel)]

    def update(self, scale_table: Tensor | None = None, force: bool = False) -> bool:
        """Build every CDF table; needed once after training before real coding."""
        table = get_scale_table() if scale_table is None else scale_table
        updated = False
        for m in self.entropy_models():
            if isinstance(m, EntropyBottleneck):
                updated |= m.update(force=force)
            elif isinstance(m, GaussianConditional):
                updated |= m.update_scale_table(table, force=force)
        return updated

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
    def compress(self, x: Tensor, return_latents: bool = False) -> dict:
        """{"strings": [y streams], "shape": y size}; return_latents adds the encoder's y_hat."""
        y = self.g_a(x)
        out = {"strings": [self.entropy_bottleneck.compress(y)], "shape": y.shape[-2:]}
        if return_latents:
            out["y_hat"] = self.entropy_bottleneck.quantize(
                y, "dequantize", self.entropy_bottleneck._medians_like(y.size(0), 2))
        return out

    @torch.no_grad()
    def decompress(self, strings, shape) -> dict:
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

    def _gaussian_params(self, z_hat: Tensor):
        """(scales, means) predicted from the hyper latent."""
        return self.h_s(z_hat), None

    def forward(self, x: Tensor) -> dict:
        y = self.g_a(x)
        z_hat, z_lik = self.entropy_bottleneck(self.h_a(self._hyper_input(y)))
        scales, means = self._gaussian_params(z_hat)
        y_hat, y_lik = self.gaussian_conditional(y, scales, means=means)
        return {"x_hat": self.g_s(y_hat), "likelihoods": {"y": y_lik, "z": z_lik}}

    def _code_z(self, y: Tensor):
        z = self.h_a(self._hyper_input(y))
        z_strings = self.entropy_bottleneck.compress(z)
        # Decode z exactly as the decoder will, so both sides share the same tables.
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        return z_strings, z_hat

    @torch.no_grad()
    def compress(self, x: Tensor, return_latents: bool = False) -> dict:
        """{"strings": [y streams, z streams], "shape": z size}; optionally the encoder's y_hat."""
        y = self.g_a(x)
        z_strings, z_hat = self._code_z(y)
        scales, means = self._gaussian_params(z_hat)
        indexes = self.gaussian_conditional.build_indexes(scales)
        y_strings = self.gaussian_conditional.compress(y, indexes, means=means)
        out = {"strings": [y_strings, z_strings], "shape": z_hat.shape[-2:]}
        if return_latents:
            out["y_hat"] = self.gaussian_conditional.quantize(y, "dequantize", means)
        return out

    @torch.no_grad()
    def decompress(self, strings, shape) -> dict:
        self._check_strings(strings, 2, type(self).__name__)
        z_hat = self.entropy_bottleneck.decompress(strings[1], shape)
        scales, means = self._gaussian_params(z_hat)
        indexes = self.gaussian_conditional.build_indexes(scales)
        y_hat = self.gaussian_conditional.decompress(strings[0], indexes, z_hat.dtype, means=means)
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

    @torch.no_grad()
    def compress(self, x: Tensor, return_latents: bool = False) -> dict:
        y = self.g_a(x)
        z_strings, z_hat = self._code_z(y)
        params = self.h_s(z_hat)
        coded = [self._wavefront(params[i:i + 1], y=y[i:i + 1]) for i in range(y.size(0))]
        out = {"strings": [[c[0] for c in coded], z_strings], "shape": z_hat.shape[-2:]}
        if return_latents:
            out["y_hat"] = torch.cat([c[1] for c in coded])
        return out

    @torch.no_grad()
    def decompress(self, strings, shape) -> dict:
        self._check_strings(strings, 2, type(self).__name__)
        z_hat = self.entropy_bottleneck.decompress(strings[1], shape)
        params = self.h_s(z_hat)
        if len(strings[0]) != z_hat.size(0):
            raise ValueError(f"got {len(strings[0])} y streams for {z_hat.size(0)} z streams")
        y_hat = torch.cat([self._wavefront(params[i:i + 1], data=s)[1]
                           for i, s in enumerate(strings[0])])
        return {"x_hat": self.g_s(y_hat).clamp_(0, 1), "y_hat": y_hat}

    def _wavefront(self, params: Tensor, y: Tensor | None = None, data: bytes | None = None):
        """Encode y (data=None) or decode data (y=None) for one image; returns (bytes, y_hat)."""
        from ..codec import rans

        gc = self.gaussian_conditional
        cdfs, lengths, offsets = gc.coding_tables()
        M, k = self.M, self.KERNEL
        pad = k // 2
        H, W = params.shape[-2:]
        dtype = params.dtype
        # y_hat with a zero border; context for a set of positions = masked 5x5 patches.
        y_pad = torch.zeros(1, M, H + 2 * pad, W + 2 * pad, dtype=dtype, device=params.device)
        weight = self.context_prediction.masked_weight().reshape(2 * M, -1)  # (2M, M*25)
        bias = self.context_prediction.bias
        convs = [m for m in self.entropy_parameters if isinstance(m, nn.Conv2d)]
        ep = [(c.weight.reshape(c.out_channels, -1), c.bias) for c in convs]
        params_flat = params[0].reshape(params.shape[1], -1)  # (2M, H*W)
        offs = torch.arange(k, device=params.device)
        if y is None:
            decoder = rans.RansDecoder(data)
        else:
            encoder = rans.RansEncoder()
        for t in range(3 * (H - 1) + W):
            hs = torch.arange(max(0, (t - W + 3) // 3), min(H - 1, t // 3) + 1, device=params.device)
            ws = t - 3 * hs
            keep = (ws >= 0) & (ws < W)
            hs, ws = hs[keep], ws[keep]
            if hs.numel() == 0:
                continue
            # (P, M, 5, 5) patches centred on each position in the padded grid
            rows = (hs[:, None] + offs[None, :])[:, :, None].expand(-1, k, k)
            cols = (ws[:, None] + offs[None, :])[:, None, :].expand(-1, k, k)
            patches = y_pad[0][:, rows, cols].permute(1, 0, 2, 3).reshape(hs.numel(), -1)
            ctx = F.linear(patches, weight, bias)  # (P, 2M)
            h = torch.cat((params_flat[:, hs * W + ws].t(), ctx), dim=1)
            for i, (wt, b) in enumerate(ep):
                h = F.linear(h, wt, b)
                if i < len(ep) - 1:
                    h = F.leaky_relu(h)
            scales, means = h.chunk(2, 1)  # (P, M)
            indexes = gc.build_indexes(scales).cpu().numpy()
            if y is None:
                sym = decoder.decode(indexes.reshape(-1), cdfs, lengths, offsets).reshape(indexes.shape)
                sym = torch.from_numpy(np.ascontiguousarray(sym)).to(params.device)
            else:
                sym = gc.quantize(y[0][:, hs, ws].t(), "symbols", means)
                encoder.encode_with_indexes(sym.cpu().numpy().reshape(-1), indexes.reshape(-1),
                                            cdfs, lengths, offsets)
            y_pad[0][:, hs + pad, ws + pad] = (sym.to(dtype) + means).t()
        y_hat = y_pad[:, :, pad:pad + H, pad:pad + W].contiguous()
        if y is None:
            decoder.finish()
            return data, y_hat
        return encoder.flush(), y_hat
