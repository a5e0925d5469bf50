"""Entropy models: the factorized EntropyBottleneck and the GaussianConditional.

They give likelihoods for training and, after update(), the 16-bit quantized CDF
tables that the rANS coder uses. Buffer names follow CompressAI.
"""

from __future__ import annotations

import math
import statistics
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LowerBound

SCALES_MIN, SCALES_MAX, SCALES_LEVELS = 0.11, 256.0, 64
CDF_PRECISION = 16


def get_scale_table(lo: float = SCALES_MIN, hi: float = SCALES_MAX,
                    levels: int = SCALES_LEVELS) -> Tensor:
    """64 log-spaced Gaussian scales from 0.11 to 256 (the zoo's table)."""
    return torch.exp(torch.linspace(math.log(lo), math.log(hi), levels))


def pmf_to_quantized_cdf(pmf: np.ndarray, precision: int = CDF_PRECISION) -> np.ndarray:
    """Quantize one pmf (the last entry is the tail mass) to a CDF of integers.

    Every symbol gets frequency >= 1 (stolen from the smallest frequency above 1),
    cdf[0] == 0 and cdf[-1] == 2**precision, so the coder can code any symbol.
    The rounding (half away from zero on float32 * 2**precision) and the stealing
    order follow the reference so tables are bit-identical.
    """
    p = np.asarray(pmf, dtype=np.float32)
    if p.ndim != 1 or p.size == 0 or not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("pmf must be a non-empty 1-D array of finite, non-negative values")
    one = 1 << precision
    counts = np.floor(p.astype(np.float64) * one + 0.5).astype(np.int64)
    total = int(counts.sum())
    if total <= 0:
        raise ValueError("pmf sums to zero after quantization; it cannot be coded")
    cdf = np.zeros(p.size + 1, dtype=np.int64)
    cdf[1:] = np.cumsum((one * counts) // total)
    cdf[-1] = one
    freq = np.diff(cdf)
    for i in np.flatnonzero(freq == 0):
        candidates = np.where(freq > 1, freq, np.iinfo(np.int64).max)
        j = int(np.argmin(candidates))
        if freq[j] <= 1:
            raise ValueError("cannot give every symbol a non-zero frequency; precision too low")
        if j < i:
            cdf[j + 1:i + 1] -= 1
        else:
            cdf[i + 1:j + 1] += 1
        freq[j] -= 1
        freq[i] += 1
    return cdf.astype(np.int32)


def pmfs_to_cdf_table(pmf: Tensor, tail_mass: Tensor, pmf_length: Tensor,
                      max_length: int) -> Tensor:
    """One padded CDF row per pmf: row i holds pmf_length[i] + 2 entries."""
    pmf_np = pmf.detach().cpu().float().numpy()
    tail_np = tail_mass.detach().cpu().float().numpy().reshape(-1)
    lengths = pmf_length.detach().cpu().numpy()
    table = np.zeros((len(lengths), int(max_length) + 2), dtype=np.int32)
    for i, n in enumerate(lengths):
        row = pmf_to_quantized_cdf(np.append(pmf_np[i, :n], tail_np[i]))
        table[i, : row.size] = row
    # A copy, not torch.from_numpy: a tensor over NumPy memory cannot be resized in place,
    # and CompressAI's update_registered_buffers(policy="resize") resizes these buffers.
    return torch.tensor(table, device=pmf.device)


def _tensor_to_int32(t: Tensor) -> np.ndarray:
    """A fresh int32 copy for the coder: never a view sharing the buffer's storage (a
    shared view makes the buffer unresizable; see pmfs_to_cdf_table)."""
    # .numpy() marks the storage it views as unresizable: view a copy, not the buffer.
    return t.detach().to("cpu", torch.int32, copy=True).numpy()


class EntropyModel(nn.Module):
    """Shared parts: likelihood bound, quantization, the CDF buffers and the coding calls.

    compress(inputs, indexes, means)/decompress(strings, indexes, dtype, means) code symbols
    under explicit table indexes with CompressAI's argument checks (ValueError); subclasses
    add the convenient forms. The one coder is rANS with 16-bit tables (`entropy_coder`
    and `entropy_coder_precision` are accepted for CompressAI code and refuse anything else).
    """

    _offset: Tensor
    _quantized_cdf: Tensor
    _cdf_length: Tensor
    _resizable_buffers: tuple[str, ...] = ("_offset", "_quantized_cdf", "_cdf_length")

    def __init__(self, likelihood_bound: float = 1e-9, entropy_coder: str | None = None,
                 entropy_coder_precision: int = CDF_PRECISION):
        super().__init__()
        if entropy_coder not in (None, "ans"):
            raise ValueError(f"entropy_coder {entropy_coder!r} is not available; compresszoo has "
                             "one coder, 'ans' (rANS), the default")
        if entropy_coder_precision != CDF_PRECISION:
            raise ValueError(f"entropy_coder_precision must be {CDF_PRECISION} (the rANS coder's "
                             f"table precision), got {entropy_coder_precision!r}")
        self.entropy_coder_precision = CDF_PRECISION
        self.use_likelihood_bound = likelihood_bound > 0
        if self.use_likelihood_bound:
            self.likelihood_lower_bound = LowerBound(likelihood_bound)
        self.register_buffer("_offset", torch.empty(0, dtype=torch.int32))
        self.register_buffer("_quantized_cdf", torch.empty(0, dtype=torch.int32))
        self.register_buffer("_cdf_length", torch.empty(0, dtype=torch.int32))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # CDF tables have data-dependent sizes: take the incoming size before copying.
        for name in self._resizable_buffers:
            incoming = state_dict.get(prefix + name)
            own = getattr(self, name)
            if incoming is not None and own is not None and incoming.shape != own.shape:
                setattr(self, name, torch.empty(incoming.shape, dtype=own.dtype, device=own.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def offset(self) -> Tensor:
        return self._offset

    @property
    def quantized_cdf(self) -> Tensor:
        return self._quantized_cdf

    @property
    def cdf_length(self) -> Tensor:
        return self._cdf_length

    def is_updated(self) -> bool:
        return self._quantized_cdf.numel() > 0

    def quantize(self, inputs: Tensor, mode: str, means: Tensor | None = None) -> Tensor:
        """'noise' (training proxy), 'dequantize' (round around means) or 'symbols' (int32)."""
        if mode == "noise":
            return inputs + torch.empty_like(inputs).uniform_(-0.5, 0.5)
        if mode not in ("dequantize", "symbols"):
            raise ValueError(f"quantize mode must be noise, dequantize or symbols, got {mode!r}")
        outputs = torch.round(inputs - means if means is not None else inputs)
        if mode == "symbols":
            return outputs.int()
        return outputs + means if means is not None else outputs

    @staticmethod
    def dequantize(symbols: Tensor, means: Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
        out = symbols.to(means.dtype if means is not None else dtype)
        return out + means if means is not None else out

    def _quantize(self, inputs: Tensor, mode: str, means: Tensor | None = None) -> Tensor:
        """CompressAI's deprecated name for quantize()."""
        warnings.warn("_quantize is deprecated; use quantize", UserWarning, stacklevel=2)
        return self.quantize(inputs, mode, means)

    @classmethod
    def _dequantize(cls, inputs: Tensor, means: Tensor | None = None) -> Tensor:
        """CompressAI's deprecated name for dequantize()."""
        warnings.warn("_dequantize is deprecated; use dequantize", UserWarning, stacklevel=2)
        return cls.dequantize(inputs, means)

    def _bound_likelihood(self, likelihood: Tensor) -> Tensor:
        return self.likelihood_lower_bound(likelihood) if self.use_likelihood_bound else likelihood

    def coding_tables(self):
        """(cdfs, cdf_lengths, offsets) as int32 NumPy copies for the coder.

        ValueError (as CompressAI) when the tables were never built or have the wrong rank."""
        name = type(self).__name__
        for buf, what, rank in ((self._quantized_cdf, "CDF table", 2),
                                (self._cdf_length, "CDF lengths", 1), (self._offset, "offsets", 1)):
            if buf.numel() == 0:
                raise ValueError(
                    f"{name} has no {what}: call model.update() after training (or load a "
                    "state dict saved after update()) before compress/decompress")
            if buf.dim() != rank:
                raise ValueError(f"{name}: {what} must be {rank}-D, got size {tuple(buf.shape)}; "
                                 "rebuild them with update(force=True)")
        return (_tensor_to_int32(self._quantized_cdf), _tensor_to_int32(self._cdf_length),
                _tensor_to_int32(self._offset))

    def compress_symbols(self, symbols: Tensor, indexes: Tensor) -> list[bytes]:
        """One rANS stream per batch item."""
        from ..ans import rans

        cdfs, lengths, offsets = self.coding_tables()
        sym = symbols.detach().cpu().numpy().astype(np.int32, copy=False)
        idx = _indexes_to_int32(indexes)
        return [rans.encode(sym[i].reshape(-1), idx[i].reshape(-1), cdfs, lengths, offsets)
                for i in range(sym.shape[0])]

    def decompress_symbols(self, strings: list[bytes], indexes: Tensor) -> Tensor:
        from ..ans import rans

        if len(strings) != indexes.size(0):
            raise ValueError(f"got {len(strings)} streams for a batch of {indexes.size(0)}")
        cdfs, lengths, offsets = self.coding_tables()
        idx = _indexes_to_int32(indexes)
        out = np.empty(idx.shape, dtype=np.int32)
        for i, s in enumerate(strings):
            out[i] = rans.decode(s, idx[i].reshape(-1), cdfs, lengths, offsets).reshape(idx.shape[1:])
        return torch.from_numpy(out).to(indexes.device)

    def compress(self, inputs: Tensor, indexes: Tensor, means: Tensor | None = None) -> list[bytes]:
        """One rANS stream per batch item: round(inputs - means) coded under CDF row indexes."""
        symbols = self.quantize(inputs, "symbols", means)
        if inputs.dim() < 2:
            raise ValueError(f"inputs: need at least 2 dimensions (batch, channels, ...), got "
                             f"size {tuple(inputs.shape)}")
        if inputs.shape != indexes.shape:
            raise ValueError(f"indexes: size {tuple(indexes.shape)} does not match inputs "
                             f"{tuple(inputs.shape)}; one table index per value")
        return self.compress_symbols(symbols, indexes)

    def decompress(self, strings: list[bytes], indexes: Tensor, dtype: torch.dtype = torch.float32,
                   means: Tensor | None = None) -> Tensor:
        """The inverse of compress(): one stream per row of indexes."""
        if not isinstance(strings, (list, tuple)):
            raise ValueError(f"strings: expected a list of bytes (one per batch item), got "
                             f"{type(strings).__name__}")
        if len(strings) != indexes.size(0):
            raise ValueError(f"got {len(strings)} streams for a batch of {indexes.size(0)}")
        if indexes.dim() < 2:
            raise ValueError(f"indexes: need at least 2 dimensions (batch, channels, ...), got "
                             f"size {tuple(indexes.shape)}")
        self.coding_tables()  # the tables' ValueError before the means' checks
        if means is not None and (means.shape[:2] != indexes.shape[:2] or any(
                m not in (1, i) for m, i in zip(means.shape[2:], indexes.shape[2:]))
                or means.dim() != indexes.dim()):
            raise ValueError(f"means: size {tuple(means.shape)} does not fit indexes "
                             f"{tuple(indexes.shape)} (same batch and channels; each other "
                             "dimension equal or 1)")
        return self.dequantize(self.decompress_symbols(strings, indexes), means, dtype)


def _indexes_to_int32(indexes: Tensor) -> np.ndarray:
    if indexes.is_floating_point():
        raise ValueError(f"indexes: expected an integer tensor of CDF rows, got {indexes.dtype}; "
                         "build them with build_indexes()")
    return indexes.detach().cpu().numpy().astype(np.int32, copy=False)


class EntropyBottleneck(EntropyModel):
    """Fully factorized prior: one learned monotone CDF per channel (Balle et al. 2018)."""

    def __init__(self, channels: int, *args, tail_mass: float = 1e-9, init_scale: float = 10.0,
                 filters: tuple[int, ...] = (3, 3, 3, 3), **kwargs):
        super().__init__(*args, **kwargs)
        self.channels = int(channels)
        self.filters = tuple(int(f) for f in filters)
        self.init_scale = float(init_scale)
        self.tail_mass = float(tail_mass)
        dims = (1, *self.filters, 1)
        scale = self.init_scale ** (1.0 / (len(self.filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(self.filters) + 1):
            init = float(np.log(np.expm1(1.0 / scale / dims[i + 1])))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, dims[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(self.filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        self.quantiles = nn.Parameter(
            torch.tensor([-self.init_scale, 0.0, self.init_scale]).repeat(channels, 1, 1))
        target = math.log(2.0 / self.tail_mass - 1.0)
        self.register_buffer("target", torch.tensor([-target, 0.0, target]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before ParameterLists used _matrix0/_bias0/_factor0 keys.
        for old, new in (("_matrix", "matrices."), ("_bias", "biases."), ("_factor", "factors.")):
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def medians(self) -> Tensor:
        return self.quantiles[:, :, 1:2]

    def _get_medians(self) -> Tensor:
        """CompressAI's name for medians()."""
        return self.medians()

    def _logits_cumulative(self, inputs: Tensor, stop_gradient: bool) -> Tensor:
        logits = inputs
        for i, matrix in enumerate(self.matrices):
            bias = self.biases[i]
            if stop_gradient:
                matrix, bias = matrix.detach(), bias.detach()
            logits = torch.matmul(F.softplus(matrix), logits) + bias
            if i < len(self.factors):
                factor = self.factors[i].detach() if stop_gradient else self.factors[i]
                logits = logits + torch.tanh(factor) * torch.tanh(logits)
        return logits

    def _likelihood(self, inputs: Tensor, stop_gradient: bool = False):
        if stop_gradient:
            # Table building: two passes, the reference's exact arithmetic (bit-identical CDFs).
            lower = self._logits_cumulative(inputs - 0.5, True)
            upper = self._logits_cumulative(inputs + 0.5, True)
            return torch.sigmoid(upper) - torch.sigmoid(lower), lower, upper
        # Training: both interval ends in one pass through the density network.
        n = inputs.size(-1)
        both = self._logits_cumulative(torch.cat((inputs - 0.5, inputs + 0.5), dim=-1),
                                       stop_gradient)
        lower, upper = both[..., :n], both[..., n:]
        return torch.sigmoid(upper) - torch.sigmoid(lower), lower, upper

    def loss(self) -> Tensor:
        """Aux loss: pulls the quantiles to the tail_mass/2, 0.5, 1 - tail_mass/2 points."""
        logits = self._logits_cumulative(self.quantiles, stop_gradient=True)
        return torch.abs(logits - self.target).sum()

    def forward(self, x: Tensor, training: bool | None = None):
        training = self.training if training is None else training
        perm = (1, 0, *range(2, x.dim()))
        values = x.permute(*perm).contiguous()
        shape = values.shape
        values = values.reshape(shape[0], 1, -1)
        outputs = self.quantize(values, "noise" if training else "dequantize", self.medians())
        likelihood, _, _ = self._likelihood(outputs)
        likelihood = self._bound_likelihood(likelihood)
        outputs = outputs.reshape(shape).permute(*perm).contiguous()
        likelihood = likelihood.reshape(shape).permute(*perm).contiguous()
        return outputs, likelihood

    @torch.no_grad()
    def update(self, force: bool = False, update_quantiles: bool = False) -> bool:
        """Build the quantized CDF tables from the learned density (after training).

        update_quantiles=True first sets the quantiles by bisection (_update_quantiles)."""
        if self.is_updated() and not force:
            return False
        if update_quantiles:
            self._update_quantiles()
        medians = self.quantiles[:, 0, 1]
        minima = torch.clamp(torch.ceil(medians - self.quantiles[:, 0, 0]).int(), min=0)
        maxima = torch.clamp(torch.ceil(self.quantiles[:, 0, 2] - medians).int(), min=0)
        pmf_start = medians - minima
        pmf_length = maxima + minima + 1
        max_length = int(pmf_length.max().item())
        samples = torch.arange(max_length, device=medians.device)[None, :] + pmf_start[:, None, None]
        pmf, lower, upper = self._likelihood(samples, stop_gradient=True)
        pmf = pmf[:, 0, :]
        tail_mass = torch.sigmoid(lower[:, 0, :1]) + torch.sigmoid(-upper[:, 0, -1:])
        self._quantized_cdf = pmfs_to_cdf_table(pmf, tail_mass, pmf_length, max_length)
        self._offset = -minima
        self._cdf_length = pmf_length + 2
        return True

    @torch.no_grad()
    def _update_quantiles(self, search_radius: float = 1e5, rtol: float = 1e-4,
                          atol: float = 1e-3) -> None:
        """Solve logits_cumulative(q) = target for the three quantiles by bisection.

        The density network's cumulative logits increase with their input, so bisection
        finds, per channel, what the aux loss only approaches: exact to rtol/atol."""
        shape = (self.channels, 1, 1)
        dev = self.quantiles.device
        for i, target in enumerate(self.target):
            low = torch.full(shape, -search_radius, device=dev)
            high = torch.full(shape, search_radius, device=dev)
            while not torch.isclose(low, high, rtol=rtol, atol=atol).all():
                mid = (low + high) / 2
                below = self._logits_cumulative(mid, stop_gradient=True) <= target
                low, high = torch.where(below, mid, low), torch.where(below, high, mid)
            self.quantiles[:, :, i] = ((low + high) / 2)[:, :, 0]

    def build_indexes(self, size: torch.Size) -> Tensor:
        """Channel c of every position uses table c."""
        view = [1] * len(size)
        view[1] = -1
        return torch.arange(size[1], dtype=torch.int32).view(*view).expand(*size).contiguous()

    def _medians_like(self, batch: int, spatial: int) -> Tensor:
        return self.medians().detach().reshape(1, -1, *([1] * spatial))

    def compress(self, x: Tensor) -> list[bytes]:
        means = self._medians_like(x.size(0), x.dim() - 2)
        return super().compress(x, self.build_indexes(x.size()), means)

    def decompress(self, strings: list[bytes], size) -> Tensor:
        full = (len(strings), self._quantized_cdf.size(0), *size)
        symbols = self.decompress_symbols(strings, self.build_indexes(torch.Size(full)))
        return self.dequantize(symbols, self._medians_like(len(strings), len(size)))

    def decompress_fixed(self, strings: list[bytes], size, frac: int) -> Tensor:
        """The decoded values as integers with `frac` fractional bits (float64): symbol *
        2**frac + round(median * 2**frac), computed elementwise without any float sum, so
        every machine gets the same numbers (the input of the portable path)."""
        full = (len(strings), self._quantized_cdf.size(0), *size)
        symbols = self.decompress_symbols(strings, self.build_indexes(torch.Size(full)))
        medians = self._medians_like(len(strings), len(size)).double()
        return symbols.double() * 2.0 ** frac + torch.round(medians * 2.0 ** frac)


class GaussianConditional(EntropyModel):
    """Gaussian likelihood with predicted scales (and means); coded with a table of scales."""

    scale_table: Tensor
    scale_bound: Tensor
    _resizable_buffers = ("_offset", "_quantized_cdf", "_cdf_length", "scale_table")

    def __init__(self, scale_table=None, *args, scale_bound: float = 0.11,
                 tail_mass: float = 1e-9, **kwargs):
        super().__init__(*args, **kwargs)
        if scale_table is not None:
            if not isinstance(scale_table, (list, tuple)):
                # As CompressAI: a tensor here is refused (update_scale_table takes tensors).
                raise ValueError(f"scale_table must be None, a list or a tuple of scales, got "
                                 f"{type(scale_table).__name__}")
            table = [float(s) for s in scale_table]
            if not table or table != sorted(table) or any(s <= 0 for s in table):
                raise ValueError("scale_table must be a non-empty increasing list of positive scales")
        if scale_bound is None or scale_bound <= 0:
            raise ValueError(f"scale_bound must be positive, got {scale_bound!r}")
        self.tail_mass = float(tail_mass)
        self.lower_bound_scale = LowerBound(scale_bound)
        self.register_buffer(
            "scale_table",
            torch.tensor([float(s) for s in scale_table]) if scale_table is not None
            else torch.empty(0))
        self.register_buffer("scale_bound", torch.tensor([float(scale_bound)]))

    @staticmethod
    def _standardized_cumulative(x: Tensor) -> Tensor:
        # erfc keeps precision far in the tails.
        return 0.5 * torch.erfc(-(2**-0.5) * x)

    def update_scale_table(self, scale_table, force: bool = False) -> bool:
        if self.is_updated() and not force:
            return False
        self.scale_table = torch.as_tensor(scale_table, dtype=torch.float32).to(self.scale_table.device)
        self.update()
        return True

    @torch.no_grad()
    def update(self) -> None:
        multiplier = -statistics.NormalDist().inv_cdf(self.tail_mass / 2)
        pmf_center = torch.ceil(self.scale_table * multiplier).int()
        pmf_length = 2 * pmf_center + 1
        max_length = int(pmf_length.max().item())
        samples = torch.abs(torch.arange(max_length, device=pmf_center.device).int()
                            - pmf_center[:, None]).float()
        scales = self.scale_table.unsqueeze(1).float()
        upper = self._standardized_cumulative((0.5 - samples) / scales)
        lower = self._standardized_cumulative((-0.5 - samples) / scales)
        pmf = upper - lower
        tail_mass = 2 * lower[:, :1]
        self._quantized_cdf = pmfs_to_cdf_table(pmf, tail_mass, pmf_length, max_length)
        self._offset = -pmf_center
        self._cdf_length = pmf_length + 2

    def _likelihood(self, inputs: Tensor, scales: Tensor, means: Tensor | None = None) -> Tensor:
        values = torch.abs(inputs - means if means is not None else inputs)
        scales = self.lower_bound_scale(scales)
        upper = self._standardized_cumulative((0.5 - values) / scales)
        lower = self._standardized_cumulative((-0.5 - values) / scales)
        return upper - lower

    def forward(self, inputs: Tensor, scales: Tensor, means: Tensor | None = None,
                training: bool | None = None):
        training = self.training if training is None else training
        outputs = self.quantize(inputs, "noise" if training else "dequantize", means)
        return outputs, self._bound_likelihood(self._likelihood(outputs, scales, means))

    def build_indexes(self, scales: Tensor) -> Tensor:
        """Index of the smallest table scale >= the predicted scale (after the bound)."""
        if self.scale_table.numel() == 0:
            raise ValueError("GaussianConditional has no scale table: call model.update() first")
        scales = self.lower_bound_scale(scales)
        return torch.bucketize(scales, self.scale_table[:-1].to(scales.dtype)).int()
