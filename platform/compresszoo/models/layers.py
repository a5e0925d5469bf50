"""Building blocks of the zoo: bounds, GDN, masked convolution, conv helpers.

Parameter and buffer names follow CompressAI so state dicts load both ways. Every module
here compiles with torch.jit.script (deployed CompressAI code scripts its transforms), so
this file has no `from __future__ import annotations`: TorchScript reads the class-level
Tensor annotations as real types, not strings.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _LowerBoundFn(torch.autograd.Function):
    """max(x, bound) whose gradient passes when it pushes x up towards the bound."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: Tensor) -> Tensor:
        ctx.save_for_backward(x, bound)
        return torch.max(x, bound)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, bound = ctx.saved_tensors
        return grad * ((x >= bound) | (grad < 0)), None


class LowerBound(nn.Module):
    """Lower bound with the straight-through gradient used by the entropy models."""

    bound: Tensor

    def __init__(self, bound: float):
        super().__init__()
        self.register_buffer("bound", torch.tensor([float(bound)]))

    @torch.jit.unused
    def _with_gradient(self, x: Tensor) -> Tensor:
        return _LowerBoundFn.apply(x, self.bound)

    def forward(self, x: Tensor) -> Tensor:
        # TorchScript cannot call an autograd.Function: scripted modules are for inference,
        # where the value max(x, bound) is all that matters.
        if torch.jit.is_scripting():
            return torch.max(x, self.bound)
        return self._with_gradient(x)


class NonNegativeParametrizer(nn.Module):
    """Store sqrt(v + pedestal) and return max(p, sqrt(min + pedestal))^2 - pedestal >= min."""

    pedestal: Tensor

    def __init__(self, minimum: float = 0.0, reparam_offset: float = 2.0**-18):
        super().__init__()
        self.minimum = float(minimum)
        self.register_buffer("pedestal", torch.tensor([float(reparam_offset) ** 2]))
        self.lower_bound = LowerBound((self.minimum + float(reparam_offset) ** 2) ** 0.5)

    def init(self, x: Tensor) -> Tensor:
        return torch.sqrt(torch.max(x + self.pedestal, self.pedestal))

    def forward(self, x: Tensor) -> Tensor:
        return self.lower_bound(x) ** 2 - self.pedestal


class GDN(nn.Module):
    """Generalized divisive normalization: x / sqrt(beta + gamma * x^2) (inverse: times)."""

    def __init__(self, channels: int, inverse: bool = False, beta_min: float = 1e-6,
                 gamma_init: float = 0.1):
        super().__init__()
        self.inverse = bool(inverse)
        self.beta_reparam = NonNegativeParametrizer(minimum=beta_min)
        self.beta = nn.Parameter(self.beta_reparam.init(torch.ones(channels)))
        self.gamma_reparam = NonNegativeParametrizer()
        self.gamma = nn.Parameter(self.gamma_reparam.init(gamma_init * torch.eye(channels)))

    def forward(self, x: Tensor) -> Tensor:
        c = x.size(1)
        beta = self.beta_reparam(self.beta)
        gamma = self.gamma_reparam(self.gamma).reshape(c, c, 1, 1)
        norm = F.conv2d(x * x, gamma, beta)
        if not torch.is_grad_enabled():  # inference: same values, two fewer full-size tensors
            return (norm.sqrt_() if self.inverse else norm.rsqrt_()).mul_(x)
        return x * (torch.sqrt(norm) if self.inverse else torch.rsqrt(norm))


class MaskedConv2d(nn.Conv2d):
    """Convolution that only sees already-decoded positions (raster order).

    Type A hides the centre too (the first layer of a context model); type B keeps it.
    """

    mask: Tensor

    def __init__(self, *args, mask_type: str = "A", **kwargs):
        super().__init__(*args, **kwargs)
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        mask = torch.ones_like(self.weight.data)
        _, _, h, w = mask.shape
        mask[:, :, h // 2, w // 2 + (mask_type == "B"):] = 0
        mask[:, :, h // 2 + 1:] = 0
        self.register_buffer("mask", mask)

    def masked_weight(self) -> Tensor:
        return self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


def conv(in_ch: int, out_ch: int, kernel_size: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2)


def deconv(in_ch: int, out_ch: int, kernel_size: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size, stride=stride,
                              output_padding=stride - 1, padding=kernel_size // 2)


def analysis_transform(N: int, M: int) -> nn.Sequential:
    """g_a of all four architectures: 3 -> N -> N -> N -> M, stride 16 in all."""
    return nn.Sequential(conv(3, N), GDN(N), conv(N, N), GDN(N), conv(N, N), GDN(N), conv(N, M))


def synthesis_transform(N: int, M: int) -> nn.Sequential:
    """g_s of all four architectures, the mirror of analysis_transform."""
    return nn.Sequential(
        deconv(M, N), GDN(N, inverse=True), deconv(N, N), GDN(N, inverse=True),
        deconv(N, N), GDN(N, inverse=True), deconv(N, 3),
    )


def scale_hyper_analysis(N: int, M: int) -> nn.Sequential:
    return nn.Sequential(conv(M, N, 3, 1), nn.ReLU(inplace=True), conv(N, N),
                         nn.ReLU(inplace=True), conv(N, N))


def scale_hyper_synthesis(N: int, M: int) -> nn.Sequential:
    return nn.Sequential(deconv(N, N), nn.ReLU(inplace=True), deconv(N, N),
                         nn.ReLU(inplace=True), conv(N, M, 3, 1), nn.ReLU(inplace=True))


def mean_scale_hyper_analysis(N: int, M: int) -> nn.Sequential:
    return nn.Sequential(conv(M, N, 3, 1), nn.LeakyReLU(inplace=True), conv(N, N),
                         nn.LeakyReLU(inplace=True), conv(N, N))


def mean_scale_hyper_synthesis(N: int, M: int) -> nn.Sequential:
    """Outputs 2M channels: scales then means."""
    return nn.Sequential(deconv(N, M), nn.LeakyReLU(inplace=True), deconv(M, M * 3 // 2),
                         nn.LeakyReLU(inplace=True), conv(M * 3 // 2, M * 2, 3, 1))
