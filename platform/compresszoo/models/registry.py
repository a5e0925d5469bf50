"""The zoo in one table: architecture -> builder, quality -> (N, M, lambda), debug flavors.

create_model() is the one factory; it validates a request once and says how to fix it.
spec_from_dict() is the one parser of a spec that came from a file (weights metadata).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

from ..limits import MAX_CHANNELS
from .architectures import (
    CompressionModel,
    FactorizedPrior,
    JointAutoregressiveHierarchicalPriors,
    MeanScaleHyperprior,
    ScaleHyperprior,
)

METRICS = ("mse", "ms-ssim")
QUALITIES = tuple(range(1, 9))
#: CompressAI's lambdas for the MSE zoo, quality 1..8
MSE_LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483, 0.0932, 0.1800)
#: CompressAI's lambdas for the MS-SSIM zoo (loss = lambda * (1 - MS-SSIM) + bpp)
MS_SSIM_LAMBDAS = (2.40, 4.58, 8.73, 16.64, 31.73, 60.50, 115.37, 220.00)
DEBUG_CHANNELS = (8, 12)


@dataclass(frozen=True)
class Architecture:
    name: str
    builder: Callable[[int, int], CompressionModel]
    #: (N, M) for qualities 1..8
    channels: tuple[tuple[int, int], ...]
    paper: str


def _ch(small: tuple[int, int], large: tuple[int, int], n_small: int):
    return tuple([small] * n_small + [large] * (8 - n_small))


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("bmshj2018-factorized", FactorizedPrior, _ch((128, 192), (192, 320), 5),
                     "Balle et al., Variational image compression with a scale hyperprior, ICLR 2018"),
        Architecture("bmshj2018-hyperprior", ScaleHyperprior, _ch((128, 192), (192, 320), 5),
                     "Balle et al., Variational image compression with a scale hyperprior, ICLR 2018"),
        Architecture("mbt2018-mean", MeanScaleHyperprior, _ch((128, 192), (192, 320), 4),
                     "Minnen et al., Joint autoregressive and hierarchical priors, NeurIPS 2018"),
        Architecture("mbt2018", JointAutoregressiveHierarchicalPriors, _ch((192, 192), (192, 320), 4),
                     "Minnen et al., Joint autoregressive and hierarchical priors, NeurIPS 2018"),
    )
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything that identifies one zoo entry; stored with every checkpoint."""

    architecture: str
    quality: int
    metric: str
    N: int
    M: int
    lmbda: float

    @property
    def is_zoo_default(self) -> bool:
        return (self.N, self.M) == ARCHITECTURES[self.architecture].channels[self.quality - 1]

    @property
    def registry_name(self) -> str:
        """`<arch>-<metric>-q<quality>`, plus N/M when they differ from the zoo table."""
        base = f"{self.architecture}-{self.metric}-q{self.quality}"
        return base if self.is_zoo_default else f"{base}-N{self.N}-M{self.M}"

    def to_dict(self) -> dict:
        return asdict(self)


def _check_choice(kind: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(map(str, valid))}")


def lambda_for(quality: int, metric: str = "mse") -> float:
    _check_choice("metric", metric, METRICS)
    _check_choice("quality", quality, QUALITIES)
    return (MSE_LAMBDAS if metric == "mse" else MS_SSIM_LAMBDAS)[quality - 1]


def model_spec(name: str, quality: int, metric: str = "mse", *, N: int | None = None,
               M: int | None = None, lmbda: float | None = None, debug: bool = False) -> ModelSpec:
    """Resolve (architecture, quality, metric) to channels and lambda, with overrides.

    debug=True gives the tiny CPU flavor (N=8, M=12) of the same architecture.
    """
    _check_choice("architecture", name, tuple(ARCHITECTURES))
    _check_choice("quality", quality, QUALITIES)
    _check_choice("metric", metric, METRICS)
    n, m = DEBUG_CHANNELS if debug else ARCHITECTURES[name].channels[quality - 1]
    n, m = (N or n), (M or m)
    if n <= 0 or m <= 0:
        raise ValueError(f"channel counts must be positive, got N={n}, M={m}")
    return ModelSpec(name, quality, metric, n, m, float(lmbda if lmbda is not None else lambda_for(quality, metric)))


def spec_from_dict(d) -> ModelSpec:
    """A ModelSpec from untrusted data (e.g. a weights file's metadata), every field checked.

    Raises ValueError naming the bad field, or limits.LimitError (a ValueError) when N or M
    exceeds limits.MAX_CHANNELS: no model is built from a spec this has not passed.
    """
    if not isinstance(d, dict):
        raise ValueError(f"the spec is {type(d).__name__}, expected an object")
    fields = tuple(ModelSpec.__dataclass_fields__)
    missing = [k for k in fields if k not in d]
    unknown = [k for k in d if k not in fields]
    if missing or unknown:
        wrong = ", ".join([f"missing {k!r}" for k in missing] + [f"unknown {_short(k)}" for k in unknown[:5]])
        raise ValueError(f"spec fields: {wrong}; expected {', '.join(fields)}")
    arch, metric, quality = d["architecture"], d["metric"], d["quality"]
    for kind, value, valid in (("architecture", arch, tuple(ARCHITECTURES)), ("metric", metric, METRICS)):
        if not isinstance(value, str) or value not in valid:
            raise ValueError(f"unknown {kind} {_short(value)}; valid: {', '.join(valid)}")
    if not _is_int(quality) or quality not in QUALITIES:
        raise ValueError(f"quality {_short(quality)} is not an integer in {QUALITIES[0]}..{QUALITIES[-1]}")
    for key in ("N", "M"):
        if not _is_int(d[key]) or d[key] <= 0:
            raise ValueError(f"{key}={_short(d[key])} is not a positive integer channel count")
        MAX_CHANNELS.check(d[key], f"spec {key}")
    lmbda = d["lmbda"]
    if not isinstance(lmbda, (int, float)) or isinstance(lmbda, bool) or not math.isfinite(lmbda) or lmbda <= 0:
        raise ValueError(f"lmbda={_short(lmbda)} is not a positive finite number")
    return ModelSpec(arch, quality, metric, d["N"], d["M"], float(lmbda))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    text = repr(value)  # repr escapes control characters: safe to print
    return text if len(text) <= 60 else text[:57] + "..."


def build(spec: ModelSpec) -> CompressionModel:
    model = ARCHITECTURES[spec.architecture].builder(spec.N, spec.M)
    model.meta = spec.to_dict()
    return model


def create_model(name: str, quality: int = 1, metric: str = "mse", *, N: int | None = None,
                 M: int | None = None, debug: bool = False) -> CompressionModel:
    """Build a zoo model with random weights: create_model("mbt2018", quality=3)."""
    return build(model_spec(name, quality, metric, N=N, M=M, debug=debug))


def spec_of(model: nn.Module) -> ModelSpec:
    meta = getattr(model, "meta", None) or {}
    try:
        return ModelSpec(**{k: meta[k] for k in ModelSpec.__dataclass_fields__})
    except KeyError as e:
        raise ValueError(f"model has no zoo metadata ({e} missing); build it with create_model()") from e
