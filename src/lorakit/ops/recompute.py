"""Saved tensors rebuilt in backward instead of kept: the full-size weights a forward builds only for itself.

A LoRA experts module reads an effective weight W + s·B·A (lorakit.layers.param), and a 4-bit experts module a
weight dequantized into a reused workspace (lorakit.ops.nf4_experts). Autograd saves views of those tensors
for the input's gradient; keeping them would cost a full-size tensor per layer (and the workspace is
overwritten by the next layer). `register(t, rebuild)` marks t's storage for the duration of a forward; under
`hooks()` a saved view of that storage is stored as (rebuild, shape, stride, offset) and rebuilt on unpack.
"""
from __future__ import annotations

from typing import Callable

import torch

_RECIPES: dict[int, Callable] = {}  # storage pointer of a live tensor -> rebuild(shape, stride, offset)


def pack(t: torch.Tensor):
    """The saved-tensor pack hook: a recipe for registered storages, the tensor itself otherwise."""
    rebuild = _RECIPES.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
    if rebuild is None:
        return t
    return (pack, rebuild, t.shape, t.stride(), t.storage_offset())


def unpack(packed):
    """The saved-tensor unpack hook: rebuilds what `pack` turned into a recipe."""
    if isinstance(packed, tuple) and packed and packed[0] is pack:
        _, rebuild, shape, stride, offset = packed
        with torch.no_grad():
            return rebuild(shape, stride, offset)
    return packed


def hooks():
    """Returns the saved_tensors_hooks context that applies the registered recipes."""
    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def whole(full: Callable[[], torch.Tensor]) -> Callable:
    """Returns a recipe that rebuilds the whole tensor with `full()` and takes the saved view of it."""
    return lambda shape, stride, offset: full().as_strided(shape, stride, offset)


def register(t: torch.Tensor, rebuild: Callable) -> int:
    """Marks t's storage: views of it saved under `hooks()` are rebuilt by `rebuild`; returns the key to release."""
    key = t.untyped_storage().data_ptr()
    _RECIPES[key] = rebuild
    return key


def release(key: int) -> None:
    """Forgets a registration (at the end of the forward that made the tensor)."""
    _RECIPES.pop(key, None)


def hook_state() -> str:
    """Returns "none" (no saved-tensor hooks active), "ours" (these hooks on top) or "foreign" (another one, e.g.
    non-reentrant activation checkpointing, which must keep control of every tensor saved under it)."""
    try:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except Exception:  # private API moved: treat as foreign, i.e. do not recompute
        return "foreign"
    if top is None:
        return "none"
    return "ours" if top[0] is pack else "foreign"
