"""compresszoo: train, tune, validate and ship the CompressAI zoo of learned image codecs.

Importing the package is cheap: heavy parts (ray, mlflow, the compiled coder) load lazily.
"""

__version__ = "0.1.0"
