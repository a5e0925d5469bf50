"""compresszoo: train, tune, validate and ship the CompressAI zoo of learned image codecs.

Importing the package is cheap: heavy parts (ray, mlflow, the compiled coder) load lazily.
read_image / write_image turn image files into the (3, H, W) tensors the codec takes and back.
"""

from .imagefiles import read_image, write_image

__all__ = ["read_image", "write_image"]
__version__ = "0.1.0"
