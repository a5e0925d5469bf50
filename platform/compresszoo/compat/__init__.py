"""CompressAI's module layout over compresszoo: change `compressai` to `compresszoo.compat`.

Only what compresszoo provides is here: the four zoo architectures, their layers and entropy
models, the rANS coder (`ans`), the RD loss and the zoo functions. The classes are
compresszoo's own (they carry CompressAI's names and behaviour: update(force,
update_quantiles), from_state_dict, _get_medians, ValueErrors, resizable CDF buffers), so a
model from either import is the same object type. What differs, and why: README, "Coming
from CompressAI".
"""

from . import ans, entropy_models, layers, losses, models, ops, zoo
from .version import __version__

__all__ = [
    "__version__", "ans", "available_entropy_coders", "entropy_models", "get_entropy_coder",
    "layers", "losses", "models", "ops", "set_entropy_coder", "zoo",
]

#: compresszoo has one entropy coder; CompressAI's registry functions report and accept it
_CODERS = ("ans",)


def available_entropy_coders() -> list[str]:
    return list(_CODERS)


def get_entropy_coder() -> str:
    return _CODERS[0]


def set_entropy_coder(entropy_coder: str) -> None:
    """Accepts "ans" (the only coder); anything else is a ValueError."""
    if entropy_coder not in _CODERS:
        raise ValueError(f"entropy coder {entropy_coder!r} is not available; choose from "
                         f"{', '.join(_CODERS)}")
