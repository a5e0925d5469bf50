"""`compressai.zoo.image`: the four image models by quality and metric.

pretrained=True loads the `champion` of `<arch>-<metric>-q<quality>` from compresszoo's
MLflow registry (CompressAI's published weights once imported with `compresszoo
import-checkpoint`), not a download from CompressAI's servers; `progress` changes nothing.
"""

from __future__ import annotations

from ...models.registry import ARCHITECTURES, QUALITIES
from ...zoo import bmshj2018_factorized, bmshj2018_hyperprior, mbt2018, mbt2018_mean

__all__ = ["bmshj2018_factorized", "bmshj2018_hyperprior", "mbt2018", "mbt2018_mean"]

#: architecture name -> class, as CompressAI's table (only the four compresszoo has)
model_architectures = {name: a.builder for name, a in ARCHITECTURES.items()}

#: architecture name -> {quality: (N, M)}
cfgs = {name: dict(zip(QUALITIES, a.channels)) for name, a in ARCHITECTURES.items()}

_FUNCTIONS = {
    "bmshj2018-factorized": bmshj2018_factorized,
    "bmshj2018-hyperprior": bmshj2018_hyperprior,
    "mbt2018-mean": mbt2018_mean,
    "mbt2018": mbt2018,
}


def _load_model(architecture: str, metric: str, quality: int, pretrained: bool = False,
                progress: bool = True, **kwargs):
    """One zoo model by name; ValueError for an unknown architecture or quality."""
    if architecture not in _FUNCTIONS:
        raise ValueError(f"unknown architecture {architecture!r}; compresszoo has "
                         f"{', '.join(_FUNCTIONS)}")
    return _FUNCTIONS[architecture](quality, metric=metric, pretrained=pretrained,
                                    progress=progress, **kwargs)
