"""Real compression: the rANS coder, the container format, image codec and the bitrate gate.

Attributes load lazily so `import compresszoo.codec` never needs the compiled extension.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "encode_image": "compresszoo.codec.image",
    "decode_image": "compresszoo.codec.image",
    "read_header": "compresszoo.codec.container",
    "ContainerError": "compresszoo.codec.container",
    "ContainerLimitError": "compresszoo.codec.container",
    "validate_bitrate": "compresszoo.codec.gate",
    "GateThresholds": "compresszoo.codec.gate",
    "apply_gate": "compresszoo.codec.gate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compresszoo.codec' has no attribute {name!r}")
