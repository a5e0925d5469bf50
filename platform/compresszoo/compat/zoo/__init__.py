"""`compressai.zoo`: the zoo functions and the name -> function tables."""

from .image import bmshj2018_factorized, bmshj2018_hyperprior, mbt2018, mbt2018_mean

__all__ = [
    "bmshj2018_factorized", "bmshj2018_hyperprior", "image_models", "mbt2018", "mbt2018_mean",
    "models",
]

image_models = {
    "bmshj2018-factorized": bmshj2018_factorized,
    "bmshj2018-hyperprior": bmshj2018_hyperprior,
    "mbt2018-mean": mbt2018_mean,
    "mbt2018": mbt2018,
}

#: every model by name (compresszoo has image models only)
models = dict(image_models)
