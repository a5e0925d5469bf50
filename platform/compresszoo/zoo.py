"""Zoo functions named like CompressAI's: bmshj2018_factorized(quality, metric, pretrained).

pretrained=True loads the `champion` version of `<arch>-<metric>-q<quality>` from the MLflow
registry at MLFLOW_TRACKING_URI (default ./mlflow.db), verified and cached locally. `progress`
is accepted for CompressAI code and changes nothing (no download bar: no download).
"""

from __future__ import annotations

from .models.registry import CompressionModel, create_model


def _zoo(name: str, quality: int, metric: str, pretrained: bool, **kwargs) -> CompressionModel:
    if pretrained:
        from .models.registry import model_spec
        from .registry_client import load_registered

        spec = model_spec(name, quality, metric, N=kwargs.get("N"), M=kwargs.get("M"))
        return load_registered(f"{spec.registry_name}@{kwargs.get('alias', 'champion')}",
                               kwargs.get("tracking_uri"))
    return create_model(name, quality=quality, metric=metric, **kwargs)


def bmshj2018_factorized(quality: int, metric: str = "mse", pretrained: bool = False,
                         progress: bool = True, **kw):
    return _zoo("bmshj2018-factorized", quality, metric, pretrained, **kw)


def bmshj2018_hyperprior(quality: int, metric: str = "mse", pretrained: bool = False,
                         progress: bool = True, **kw):
    return _zoo("bmshj2018-hyperprior", quality, metric, pretrained, **kw)


def mbt2018_mean(quality: int, metric: str = "mse", pretrained: bool = False,
                 progress: bool = True, **kw):
    return _zoo("mbt2018-mean", quality, metric, pretrained, **kw)


def mbt2018(quality: int, metric: str = "mse", pretrained: bool = False,
            progress: bool = True, **kw):
    return _zoo("mbt2018", quality, metric, pretrained, **kw)
