"""Rate-distortion objectives and image quality metrics (PSNR, MS-SSIM)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(size: int, sigma: float, channels: int, ref: Tensor) -> Tensor:
    coords = torch.arange(size, dtype=ref.dtype, device=ref.device) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).repeat(channels, 1, 1, 1)  # (C, 1, 1, size)


def _blur(x: Tensor, win: Tensor) -> Tensor:
    c = x.shape[1]
    x = F.conv2d(x, win, groups=c)
    return F.conv2d(x, win.transpose(2, 3), groups=c)


def _ssim_terms(x: Tensor, y: Tensor, win: Tensor, data_range: float):
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _blur(x, win), _blur(y, win)
    sxx = _blur(x * x, win) - mu_x * mu_x
    syy = _blur(y * y, win) - mu_y * mu_y
    sxy = _blur(x * y, win) - mu_x * mu_y
    cs_map = (2 * sxy + c2) / (sxx + syy + c2)
    ssim_map = ((2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)) * cs_map
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)


def ms_ssim(x: Tensor, y: Tensor, data_range: float = 1.0, win_size: int = 11,
            win_sigma: float = 1.5) -> Tensor:
    """Multi-scale SSIM (Wang et al. 2003), 5 scales, mean over batch and channels.

    Images need a side of at least (win_size - 1) * 16 + 1 = 161 pixels.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ms_ssim needs two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    min_side = (win_size - 1) * 2 ** (len(_MS_SSIM_WEIGHTS) - 1)
    if min(x.shape[-2:]) <= min_side:
        raise ValueError(f"ms_ssim needs images larger than {min_side} pixels per side, got {tuple(x.shape[-2:])}")
    win = _gaussian_window(win_size, win_sigma, x.shape[1], x)
    weights = torch.tensor(_MS_SSIM_WEIGHTS, dtype=x.dtype, device=x.device)
    values = []
    for level in range(len(_MS_SSIM_WEIGHTS)):
        ssim, cs = _ssim_terms(x, y, win, data_range)
        if level < len(_MS_SSIM_WEIGHTS) - 1:
            values.append(torch.relu(cs))
            pad = [s % 2 for s in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=pad)
            y = F.avg_pool2d(y, kernel_size=2, padding=pad)
    values.append(torch.relu(ssim))
    stacked = torch.stack(values, dim=0)
    return torch.prod(stacked ** weights.view(-1, 1, 1), dim=0).mean()


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> float:
    return psnr_from_mse(F.mse_loss(x.float(), y.float()).item(), data_range)


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    """PSNR in dB of a mean squared error (the one formula): mse 0 -> inf, non-finite -> nan."""
    if not math.isfinite(mse):
        return float("nan")
    return float("inf") if mse <= 0 else 10 * math.log10(data_range**2 / mse)


def bpp_of(likelihoods: dict[str, Tensor], num_pixels: int) -> Tensor:
    """Estimated bits per pixel: -sum(log2 p) / pixels, over all latents."""
    return sum(torch.log(lik).sum() for lik in likelihoods.values()) / (-math.log(2) * num_pixels)


class RateDistortionLoss(nn.Module):
    """lambda * 255^2 * MSE + bpp (metric="mse") or lambda * (1 - MS-SSIM) + bpp.

    The defaults and return_type follow CompressAI: "all" gives the dict of terms, a term's
    name ("loss", "bpp_loss", "mse_loss", "ms_ssim_loss") gives that tensor alone."""

    def __init__(self, lmbda: float = 1e-2, metric: str = "mse", return_type: str = "all"):
        super().__init__()
        if metric not in ("mse", "ms-ssim"):
            raise ValueError(f"unknown metric {metric!r}; valid: mse, ms-ssim")
        terms = ("all", "loss", "bpp_loss", "mse_loss")
        terms += ("ms_ssim_loss",) if metric == "ms-ssim" else ()
        if return_type not in terms:
            raise ValueError(f"return_type {return_type!r} is not one of {', '.join(terms)}")
        self.lmbda, self.metric, self.return_type = float(lmbda), metric, return_type

    def forward(self, output: dict, target: Tensor) -> dict:
        n, _, h, w = target.shape
        out = {"bpp_loss": bpp_of(output["likelihoods"], n * h * w)}
        out["mse_loss"] = F.mse_loss(output["x_hat"], target)
        if self.metric == "mse":
            distortion = 255**2 * out["mse_loss"]
        else:
            out["ms_ssim_loss"] = ms_ssim(output["x_hat"], target, data_range=1.0)
            distortion = 1 - out["ms_ssim_loss"]
        out["loss"] = self.lmbda * distortion + out["bpp_loss"]
        return out if self.return_type == "all" else out[self.return_type]
