"""The portable entropy-parameter path: the layers whose outputs the decoder must reproduce
exactly (hyper-synthesis, context model, entropy parameters) replayed in fixed point.

Why: a float convolution's summation order depends on the CPU's instruction set, the thread
count, the backend and the GPU, so scales and means differ by ~1e-6 (~1e-3 on GPUs) between
machines, and one flipped scale index desynchronises the rANS decoder. Here every weight,
bias and activation is an integer held in a float64 tensor (a scaled fixed-point number), and
the magnitudes are bounded so that every partial sum of a convolution stays below 2**53:
every sum of such integers is exact, so every summation order (any CPU kernel, any thread
count, cuDNN) gives the same result. Elementwise steps (scaling by powers of two, rounding,
clamping, the activations) are single correctly rounded IEEE operations, the same everywhere.
(Integer networks for compression: Ballé, Johnston, Minnen, ICLR 2019.)

Design, per layer: activations carry A_FRAC = 12 fractional bits and are clamped to
|a| <= 2**12 (in real units); weights get the most fractional bits (<= 24) for which
sum|w_int| * 2**24 + |b_int| < 2**53 on every output channel, checked on the integers
themselves, so the bound holds by construction. A layer's integer output (scale 2**-(A_FRAC +
w_frac)) is rounded back to A_FRAC bits before the next layer; the last layer's output is
returned at full precision. Training stays float: these tables are derived by update().
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

A_FRAC = 12                    # fractional bits of every activation
A_LIMIT = float(2 ** 24)       # |activation| bound in integer units (4096.0 in real units)
W_FRAC_MAX = 24                # finest weight step 2**-24
EXACT = 2 ** 53                # integers below this are exact in float64
LEAK_NUM, LEAK_SHIFT = 655, 16  # LeakyReLU's 0.01 slope as 655 / 2**16 (0.009995)


def to_fixed(x: Tensor) -> Tensor:
    """Real values -> integers at A_FRAC fractional bits (float64), clamped to the bound."""
    return torch.round(x.double() * 2.0 ** A_FRAC).clamp_(-A_LIMIT, A_LIMIT)


def _activate(q: Tensor, act: str | None) -> Tensor:
    if act == "relu":
        return q.clamp_(min=0.0)
    if act == "leaky":
        # floor(q * 655 / 2**16) on the negative side: |q| * 655 < 2**35, exact.
        return torch.where(q < 0, torch.floor(q * LEAK_NUM / 2.0 ** LEAK_SHIFT), q)
    return q


@dataclass
class FixedLayer:
    """One convolution in fixed point; weight and bias are float64 tensors of integers."""

    kind: str  # "conv" or "deconv"
    weight: Tensor
    bias: Tensor
    w_frac: int
    stride: tuple
    padding: tuple
    output_padding: tuple
    act: str | None

    def accumulate(self, x: Tensor) -> Tensor:
        """Exact integer result at scale 2**-(A_FRAC + w_frac) for x at A_FRAC bits."""
        if self.kind == "deconv":
            return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def requantize(self, acc: Tensor) -> Tensor:
        """Back to A_FRAC bits (round half up), activation, clamp: the next layer's input."""
        q = torch.floor(acc / 2.0 ** self.w_frac + 0.5).clamp_(-A_LIMIT, A_LIMIT)
        return _activate(q, self.act)

    def real(self, acc: Tensor) -> Tensor:
        """The last layer's output as real float64 values (exact: a power-of-two scaling)."""
        out = acc / 2.0 ** (A_FRAC + self.w_frac)
        if self.act == "relu":
            return out.clamp_(min=0.0)
        if self.act == "leaky":
            return torch.where(out < 0, out * (LEAK_NUM / 2.0 ** LEAK_SHIFT), out)
        return out


def _weights_per_output(weight: Tensor, kind: str) -> Tensor:
    """(out_channels, fan_in) view: conv weights are (out, in, kh, kw), deconv (in, out, kh, kw)."""
    w = weight.transpose(0, 1) if kind == "deconv" else weight
    return w.reshape(w.shape[0], -1)


def fixed_layer(module: nn.Module, act: str | None, weight: Tensor | None = None) -> FixedLayer:
    """Quantize one Conv2d / ConvTranspose2d (weight overrides the module's, e.g. a masked one)."""
    kind = "deconv" if isinstance(module, nn.ConvTranspose2d) else "conv"
    w = (module.weight if weight is None else weight).detach().double().cpu()
    b = module.bias.detach().double().cpu() if module.bias is not None else torch.zeros(w.shape[1 if kind == "deconv" else 0], dtype=torch.float64)
    per_out = _weights_per_output(w, kind)
    # A float estimate only skips candidates that fail by a wide margin; the choice itself is
    # made by the exact integer check, so every machine picks the same w_frac.
    l1_est = float(per_out.abs().sum(1).max())
    fan_in = per_out.shape[1]
    for w_frac in range(W_FRAC_MAX, -64, -1):
        if (l1_est * 2.0 ** w_frac * (1 - 1e-6) - fan_in) * A_LIMIT > 2 * EXACT:
            continue
        w_int = torch.round(w * 2.0 ** w_frac)
        b_int = torch.round(b * 2.0 ** (A_FRAC + w_frac))
        # The bound is checked on the integers (int64 sums are exact): any input within
        # A_LIMIT keeps every partial sum of every output below 2**53.
        l1 = _weights_per_output(w_int, kind).abs().to(torch.int64).sum(1)
        worst = int((l1 * int(A_LIMIT) + b_int.abs().to(torch.int64)).max())
        if worst < EXACT:
            break
    else:  # pragma: no cover - only weights beyond 2**60 get here
        raise ValueError(f"{type(module).__name__} weights too large for the portable path")
    pad = module.padding if isinstance(module.padding, tuple) else (module.padding,) * 2
    out_pad = getattr(module, "output_padding", (0, 0))
    return FixedLayer(kind, w_int, b_int, w_frac, tuple(module.stride), tuple(pad), tuple(out_pad), act)


def fixed_stack(seq: nn.Sequential) -> list[FixedLayer]:
    """A Sequential of convolutions, each optionally followed by ReLU / LeakyReLU."""
    layers: list[FixedLayer] = []
    mods = list(seq)
    for i, m in enumerate(mods):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            act = "relu" if isinstance(nxt, nn.ReLU) else "leaky" if isinstance(nxt, nn.LeakyReLU) else None
            if isinstance(nxt, nn.LeakyReLU) and nxt.negative_slope != 0.01:
                raise ValueError(f"LeakyReLU slope {nxt.negative_slope} has no portable form")
            layers.append(fixed_layer(m, act))
        elif not isinstance(m, (nn.ReLU, nn.LeakyReLU)):
            raise ValueError(f"{type(m).__name__} has no portable form")
    return layers


def run_stack(layers: list[FixedLayer], x_fixed: Tensor, *, real_output: bool = True) -> Tensor:
    """Run a fixed-point stack on A_FRAC inputs: real float64 output, or A_FRAC integers."""
    # cuDNN may pick FFT or Winograd algorithms, which are not sums of products: the native
    # kernels (im2col + GEMM) are. Autocast never touches float64, but is switched off anyway.
    with torch.autocast(x_fixed.device.type, enabled=False), torch.backends.cudnn.flags(enabled=False):
        x = x_fixed
        for i, layer in enumerate(layers):
            acc = layer.accumulate(x)
            if i == len(layers) - 1 and real_output:
                return layer.real(acc)
            x = layer.requantize(acc)
        return x


def on_device(layers: list[FixedLayer], device: torch.device) -> list[FixedLayer]:
    if all(layer.weight.device == device for layer in layers):
        return layers
    return [FixedLayer(la.kind, la.weight.to(device), la.bias.to(device), la.w_frac, la.stride,
                       la.padding, la.output_padding, la.act) for la in layers]
