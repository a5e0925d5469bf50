"""`compressai.models.utils`: finding modules and buffers, resizing buffers to a state dict.

compresszoo's entropy models resize their CDF buffers to an incoming state dict by themselves
(EntropyModel._load_from_state_dict); these helpers are for models written CompressAI's way,
which call update_registered_buffers from their own load_state_dict.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...models.layers import conv, deconv

__all__ = [
    "conv", "deconv", "find_named_buffer", "find_named_module", "update_registered_buffers",
]

POLICIES = ("resize_if_empty", "resize", "register")


def find_named_module(module: nn.Module, query: str) -> nn.Module | None:
    """The submodule called `query` (as named_modules() names it), or None."""
    return dict(module.named_modules()).get(query)


def find_named_buffer(module: nn.Module, query: str) -> Tensor | None:
    """The buffer called `query` (as named_buffers() names it), or None."""
    return dict(module.named_buffers()).get(query)


def _update_registered_buffer(module: nn.Module, buffer_name: str, state_dict_key: str,
                              state_dict: dict, policy: str = "resize_if_empty",
                              dtype: torch.dtype = torch.int) -> None:
    """Give one buffer the size of state_dict[state_dict_key].

    "resize" always resizes in place, "resize_if_empty" only an empty buffer (both need the
    buffer to exist: RuntimeError otherwise), "register" adds a zero buffer of that size
    (RuntimeError if it already exists)."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    size = state_dict[state_dict_key].size()
    buf = find_named_buffer(module, buffer_name)
    if policy == "register":
        if buf is not None:
            raise RuntimeError(f"buffer {buffer_name!r} is already registered")
        module.register_buffer(buffer_name, torch.zeros(size, dtype=dtype))
        return
    if buf is None:
        raise RuntimeError(f"buffer {buffer_name!r} is not registered in {type(module).__name__}")
    if policy == "resize" or buf.numel() == 0:
        buf.resize_(size)


def update_registered_buffers(module: nn.Module, module_name: str, buffer_names,
                              state_dict: dict, policy: str = "resize_if_empty",
                              dtype: torch.dtype = torch.int) -> None:
    """Size the buffers `buffer_names` of `module` (called `module_name` in the state dict) to
    the state dict's tensors, so that load_state_dict can copy them (torch copies only into
    tensors of the same size). ValueError names a buffer the module does not have."""
    names = list(buffer_names)
    known = {n for n, _ in module.named_buffers()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{type(module).__name__} has no buffer {', '.join(map(repr, unknown))}")
    for name in names:
        _update_registered_buffer(module, name, f"{module_name}.{name}", state_dict, policy, dtype)
