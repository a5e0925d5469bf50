"""The sweep's search space: architectures x lambdas x (N, M) x seeds, as a list of named trials.

The zoo's own (N, M) for each (architecture, quality) is always among the channel choices, so
every tuned point has a baseline trained in the same sweep (the anchor of its BD-rate).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..models.registry import (
    ARCHITECTURES,
    METRICS,
    MS_SSIM_LAMBDAS,
    MSE_LAMBDAS,
    QUALITIES,
    model_spec,
)


@dataclass(frozen=True)
class TrialSpec:
    """One training of the sweep; `overrides()` turns it into TrainConfig fields."""

    architecture: str
    quality: int  # the zoo entry it stands for: picks the default (N, M) and the registry name
    lmbda: float
    N: int
    M: int
    seed: int = 0
    zoo_default: bool = False  # (N, M) is the zoo's own choice: the baseline, never early-stopped

    @property
    def name(self) -> str:
        """Deterministic, filesystem-safe, unique within a sweep: a restored sweep finds its trials."""
        return f"{self.architecture}-l{self.lmbda:g}-N{self.N}-M{self.M}-s{self.seed}"

    def overrides(self) -> dict:
        return {"architecture": self.architecture, "quality": self.quality, "lmbda": self.lmbda,
                "N": self.N, "M": self.M, "seed": self.seed}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrialSpec:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class SearchSpace:
    """Which trials a sweep runs.

    Lambdas come either from `qualities` (the zoo's lambda of each) or from a log-uniform
    `lambda_range` cut into `num_lambdas` log-spaced values. A grid, not random draws: early
    stopping and the BD-rate both compare trials at the same lambda, so every channel choice
    must be trained at each lambda. `channels` are extra (N, M) candidates; the zoo's (N, M)
    (the debug flavor's when `debug`) is always added.
    """

    architectures: tuple[str, ...]
    qualities: tuple[int, ...] = ()
    lambda_range: tuple[float, float] | None = None
    num_lambdas: int = 0
    channels: tuple[tuple[int, int], ...] = ()
    seeds: tuple[int, ...] = (0,)
    metric: str = "mse"
    debug: bool = False

    def __post_init__(self):
        object.__setattr__(self, "architectures", tuple(self.architectures))
        object.__setattr__(self, "qualities", tuple(int(q) for q in self.qualities))
        object.__setattr__(self, "channels", tuple((int(n), int(m)) for n, m in self.channels))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if self.lambda_range is not None:
            object.__setattr__(self, "lambda_range", tuple(float(v) for v in self.lambda_range))
        if not self.architectures:
            raise ValueError("search space: no architectures; give --archs, e.g. "
                             f"--archs {','.join(ARCHITECTURES)}")
        for a in self.architectures:
            if a not in ARCHITECTURES:
                raise ValueError(f"search space: unknown architecture {a!r}; known: {', '.join(ARCHITECTURES)}")
        if self.metric not in METRICS:
            raise ValueError(f"search space: unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        if bool(self.qualities) == (self.lambda_range is not None):
            raise ValueError("search space: give either qualities (the zoo's lambdas, e.g. --qualities 1,8) "
                             "or a lambda range (e.g. --lambda-range 0.002:0.2 --num-lambdas 4), not both")
        for q in self.qualities:
            if q not in QUALITIES:
                raise ValueError(f"search space: quality {q} is not a zoo quality; valid: 1..8")
        if self.lambda_range is not None:
            lo, hi = self.lambda_range
            if not (0 < lo <= hi) or self.num_lambdas < 1 or (lo == hi and self.num_lambdas > 1):
                raise ValueError(f"search space: lambda range {lo}:{hi} with {self.num_lambdas} values is "
                                 "empty; need 0 < lo < hi and num_lambdas >= 1 (lo == hi: one value)")
        for n, m in self.channels:
            if n <= 0 or m <= 0:
                raise ValueError(f"search space: channels {n}x{m} must be positive, e.g. 128x192")
        if not self.seeds:
            raise ValueError("search space: no seeds; give at least one, e.g. --seeds 0")

    # -- lambdas ---------------------------------------------------------------------
    def _zoo_lambdas(self) -> tuple[float, ...]:
        return MSE_LAMBDAS if self.metric == "mse" else MS_SSIM_LAMBDAS

    def lambdas(self) -> list[tuple[int, float]]:
        """(quality, lambda) pairs, lambda rising; a range's values take the nearest zoo quality."""
        zoo = self._zoo_lambdas()
        if self.qualities:
            return sorted({(q, zoo[q - 1]) for q in self.qualities}, key=lambda p: p[1])
        lo, hi = self.lambda_range
        k = self.num_lambdas
        values = [lo] if k == 1 else [float(f"{math.exp(math.log(lo) + i * (math.log(hi) - math.log(lo)) / (k - 1)):.4g}")
                                      for i in range(k)]
        return [(nearest_quality(v, zoo), v) for v in values]

    # -- channels --------------------------------------------------------------------
    def zoo_channels(self, architecture: str, quality: int) -> tuple[int, int]:
        spec = model_spec(architecture, quality, self.metric, debug=self.debug)
        return spec.N, spec.M

    def channel_choices(self, architecture: str, quality: int) -> list[tuple[int, int]]:
        default = self.zoo_channels(architecture, quality)
        return [default] + [c for c in dict.fromkeys(self.channels) if c != default]

    # -- trials ----------------------------------------------------------------------
    def trials(self) -> list[TrialSpec]:
        """Every trial, zoo-default channels first: the baselines set the early-stopping bar
        (ASHA's rungs) before the alternatives reach it, so decisions do not depend on timing."""
        out = []
        for q, lmbda in self.lambdas():
            for arch in self.architectures:
                default = self.zoo_channels(arch, q)
                for n, m in self.channel_choices(arch, q):
                    for seed in self.seeds:
                        out.append(TrialSpec(arch, q, lmbda, n, m, seed, zoo_default=(n, m) == default))
        out.sort(key=lambda t: not t.zoo_default)  # stable: keeps lambda/arch order within each half
        names = [t.name for t in out]
        if len(set(names)) != len(names):
            raise ValueError("search space: two trials share a name (a lambda given twice?); "
                             "make the lambdas distinct")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = [list(c) for c in self.channels]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SearchSpace:
        d = dict(d)
        d["channels"] = tuple(tuple(c) for c in d.get("channels", ()))
        if d.get("lambda_range") is not None:
            d["lambda_range"] = tuple(d["lambda_range"])
        return cls(**d)


def nearest_quality(lmbda: float, zoo: tuple[float, ...] = MSE_LAMBDAS) -> int:
    """The zoo quality whose lambda is closest in log scale."""
    return min(QUALITIES, key=lambda q: abs(math.log(zoo[q - 1]) - math.log(lmbda)))


# -- command-line parsing ------------------------------------------------------------------

def parse_channels(text: str) -> tuple[tuple[int, int], ...]:
    """'8x12,16x24' -> ((8, 12), (16, 24)); '' -> () (the zoo's own channels only)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            n, m = part.lower().split("x")
            out.append((int(n), int(m)))
        except ValueError:
            raise ValueError(f"--channels: {part!r} is not NxM; write e.g. 128x192,192x320") from None
    return tuple(out)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a comma-separated list of integers, e.g. 1,4,8") from None


def parse_lambda_range(text: str) -> tuple[float, float]:
    """'0.002:0.2' -> (0.002, 0.2)."""
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--lambda-range: {text!r} is not LO:HI; write e.g. 0.0018:0.18") from None
    return lo, hi
