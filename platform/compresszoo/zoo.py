"""Zoo functions named like CompressAI's: bmshj2018_factorized(quality, metric, pretrained)."""

from __future__ import annotations

from .models.registry import CompressionModel, create_model


def _zoo(name: str, quality: int, metric: str, pretrained: bool, **kwargs) -> CompressionModel:
    if pretrained:
        raise NotImplementedError(
            f"pretrained {name} q{quality} ({metric}): downloading from the MLflow registry is not "
            "available yet; use pretrained=False and load a local checkpoint"
        )
    return create_model(name, quality=quality, metric=metric, **kwargs)


def bmshj2018_factorized(quality: int, metric: str = "mse", pretrained: bool = False, **kw):
    return _zoo("bmshj2018-factorized", quality, metric, pretrained, **kw)


def bmshj2018_hyperprior(quality: int, metric: str = "mse", pretrained: bool = False, **kw):
    return _zoo("bmshj2018-hyperprior", quality, metric, pretrained, **kw)


def mbt2018_mean(quality: int, metric: str = "mse", pretrained: bool = False, **kw):
    return _zoo("mbt2018-mean", quality, metric, pretrained, **kw)


def mbt2018(quality: int, metric: str = "mse", pretrained: bool = False, **kw):
    return _zoo("mbt2018", quality, metric, pretrained, **kw)
