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

Speed: float64 GEMMs cost about twice float32 ones. A 3x3 stride-1 convolution (the last layer
of every hyper-synthesis) may run as Winograd F(2x2, 3x3) instead, 2.25x fewer products
(Lavin & Gray, CVPR 2016), with its transforms scaled to integers (2G instead of G, so the
output comes out times 4 and is divided by 4 exactly). It computes the same integer sums as the
direct convolution, so its results are identical, not close: it is used only when a bound,
checked on the integers of the layer and of the actual input, proves that every intermediate
of the transformed computation stays below 2**53; otherwise the direct convolution runs.

The 5x5 stride-2 transposed convolutions before it (CompressAI's `deconv`: padding 2, output
padding 1) are sub-pixel convolutions: output pixel (2m + ry, 2n + rx) only sees inputs
m-1..m+1, n-1..n+1, through taps (4, 2, 0) of the kernel for an even row or column and
(-, 3, 1) for an odd one. So the layer is one 3x3 stride-1 convolution with 4x the output
channels (the four phases, zero taps where a phase has none) followed by a pixel shuffle, and
that convolution runs as the same exact Winograd: 16 products per input pixel and channel pair
instead of the 25 of the direct transposed convolution, with float64's slow col2im gone. The
integers are again the same sums (the zero taps add exact zeros), under the same bound check.
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
        # floor(q * 655 / 2**16) on the negative side: |q| * 655 < 2**35, so one multiplication
        # by 655 * 2**-16 is exact. As the slope is below 1 and q an integer, that floor is >= q
        # for q < 0 and <= q for q >= 0: the leaky ReLU is their maximum.
        return torch.maximum(q, torch.mul(q, LEAK_NUM * 2.0 ** -LEAK_SHIFT).floor_(), out=q)
    return q


# Winograd F(2x2, 3x3) over the integers: input transform B^T, filter transform 2G, output A^T.
_WG = ((2, 0, 0), (1, 1, 1), (1, -1, 1), (0, 0, 2))


def _winograd_filters(weight: Tensor) -> tuple[Tensor, int]:
    """(U, bound): U = (2G) g (2G)^T for every (out, in) pair as (16, out, in) float64 integers,
    and max over output channels of the sum of |U| over inputs and the 16 tile positions (an
    exact int64 sum). Each U entry is a signed sum of the 9 weights with coefficients <= 4, so
    it stays below 2**53 whenever the weights do (<= 36 max|w|)."""
    g = torch.tensor(_WG, dtype=torch.float64)
    u = torch.einsum("ak,oikl,bl->aboi", g, weight, g).reshape(16, weight.shape[0], weight.shape[1])
    bound = int(u.abs().to(torch.int64).sum(dim=(0, 2)).max())
    return u.contiguous(), bound


_BT = torch.tensor(((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)), dtype=torch.float64)
_AT = torch.tensor(((1, 1, 1, 0), (0, 1, -1, -1)), dtype=torch.float64)
_IN_T = torch.kron(_BT, _BT).contiguous()  # a flattened 4x4 tile -> its 16 transformed values
_OUT_T = torch.kron(_AT, _AT).contiguous()  # 16 products -> the flattened 2x2 output tile


def _winograd_conv(x: Tensor, u: Tensor, bias: Tensor) -> Tensor:
    """conv2d(x, w, bias, stride 1, padding 1) for a 3x3 w given as its transform u: exact when
    FixedLayer.winograd_fits(x) holds (every step sums a few exact integers: the transforms'
    coefficients are 0 and +-1)."""
    n, c, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    # pad 1 on every side (the convolution's padding) plus 1 more where h or w is odd
    tiles = F.pad(x, (1, 1 + w % 2, 1, 1 + h % 2)).unfold(2, 4, 2).unfold(3, 4, 2)  # n c th tw 4 4
    tiles = tiles.reshape(n, c, th * tw, 16).permute(3, 1, 0, 2).reshape(16, -1)  # (16, in*n*tiles)
    v = (_IN_T.to(x.device) @ tiles).view(16, c, n * th * tw)
    m = torch.bmm(u, v).view(16, -1)  # (16, out * tiles)
    y = (_OUT_T.to(x.device) @ m).view(2, 2, u.shape[1], n, th, tw)  # 4 x the convolution
    out = y.permute(3, 2, 4, 0, 5, 1).reshape(n, u.shape[1], 2 * th, 2 * tw)[:, :, :h, :w]
    return torch.add(bias.view(1, -1, 1, 1), out, alpha=0.25)  # /4 exact, + bias exact


# Sub-pixel form of a 5x5 stride-2 transposed convolution (padding 2, output padding 1): output
# row 2m + r takes input row m - 1 + a through kernel row _PHASE_TAP[r][a] (None: no tap), since a
# transposed convolution adds x[i] * w[k] into output o = 2i - 2 + k.
_PHASE_TAP = ((4, 2, 0), (None, 3, 1))


def _subpixel_weight(weight: Tensor) -> Tensor:
    """(in, out, 5, 5) transposed-convolution weights -> (4 out, in, 3, 3) convolution weights,
    output channel 4c + 2ry + rx being phase (ry, rx) of channel c (F.pixel_shuffle's order)."""
    cin, cout = weight.shape[:2]
    sub = weight.new_zeros(cout, 2, 2, cin, 3, 3)
    for ry in range(2):
        for rx in range(2):
            for a, ky in enumerate(_PHASE_TAP[ry]):
                for b, kx in enumerate(_PHASE_TAP[rx]):
                    if ky is not None and kx is not None:
                        sub[:, ry, rx, :, a, b] = weight[:, :, ky, kx].t()
    return sub.reshape(4 * cout, cin, 3, 3)


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
    # _winograd_filters of the 3x3 stride-1 padding-1 convolution this layer is (conv), or of
    # its sub-pixel form (a 5x5 stride-2 deconv)
    winograd: Tensor | None = None
    winograd_bound: int = 0
    subpixel: Tensor | None = None  # a 5x5 stride-2 deconv's _subpixel_weight(weight)

    def winograd_fits(self, x: Tensor) -> bool:
        """True when every intermediate of _winograd_conv(x) is provably below 2**53: the input
        transform sums 4 inputs, so |V| <= 4 max|x|; each product sum and the output transform's
        sums of them are bounded by winograd_bound * 4 max|x|; the bias is added to the exact
        convolution, whose bound fixed_layer() already checked."""
        if self.winograd is None or x.numel() == 0:
            return False
        return self.winograd_bound * 4 * int(x.abs().max()) < EXACT

    def accumulate(self, x: Tensor) -> Tensor:
        """Exact integer result at scale 2**-(A_FRAC + w_frac) for x at A_FRAC bits."""
        if self.subpixel is not None:
            # the four phases' channels, interleaved into the 2x output. Below ~256 input pixels
            # (8x12 tiles) the batched products are too small for Winograd to pay.
            bias = self.bias.repeat_interleave(4)
            if x.shape[-2] * x.shape[-1] >= 256 and self.winograd_fits(x):
                return F.pixel_shuffle(_winograd_conv(x, self.winograd, bias), 2)
            return F.pixel_shuffle(F.conv2d(x, self.subpixel, bias, 1, 1), 2)
        if self.winograd_fits(x):
            return _winograd_conv(x, self.winograd, self.bias)
        if self.kind == "deconv":
            return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def requantize(self, acc: Tensor) -> Tensor:
        """Back to A_FRAC bits (round half up), activation, clamp: the next layer's input.
        (Scaling by a power of two is exact, so the multiplication equals the division.)"""
        q = torch.mul(acc, 2.0 ** -self.w_frac).add_(0.5).floor_().clamp_(-A_LIMIT, A_LIMIT)
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
    layer = FixedLayer(kind, w_int, b_int, w_frac, tuple(module.stride), tuple(pad), tuple(out_pad), act)
    if (kind == "conv" and tuple(w_int.shape[2:]) == (3, 3) and layer.stride == (1, 1) and layer.padding == (1, 1)
            and tuple(module.dilation) == (1, 1) and module.groups == 1):
        layer.winograd, layer.winograd_bound = _winograd_filters(w_int)
    elif (kind == "deconv" and tuple(w_int.shape[2:]) == (5, 5) and layer.stride == (2, 2)
            and layer.padding == (2, 2) and layer.output_padding == (1, 1)
            and tuple(module.dilation) == (1, 1) and module.groups == 1):
        layer.subpixel = _subpixel_weight(w_int)
        layer.winograd, layer.winograd_bound = _winograd_filters(layer.subpixel)
    return layer


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
                       la.padding, la.output_padding, la.act,
                       None if la.winograd is None else la.winograd.to(device), la.winograd_bound,
                       None if la.subpixel is None else la.subpixel.to(device))
            for la in layers]
