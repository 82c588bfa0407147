"""Mixed-adapter batches: `model(x, adapter_names=[...])` runs one adapter per row (installed by inject).

    model(x, adapter_names=["math", "__base__", "style"])   row 0 gets "math", row 1 the base, row 2 "style"

A forward pre-hook hands the row names to every wrapper (`begin_mixed_batch`) and a forward hook takes them
back (`end_mixed_batch`), so the layers' ordinary forward needs no extra argument.
"""
from __future__ import annotations

from torch import nn

from lorakit.errors import ConfigError
from lorakit.model.state import adapter_configs, lora_layers, wrappers

BASE = "__base__"  # the row marker for "no adapter" in mixed batches
_HOOK_ATTR = "_lorakit_hooks"


def _pre_hook(model, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return args, kwargs
    names = list(names)
    known = adapter_configs(model)
    for n in names:
        if n != BASE and n not in known:
            raise ConfigError(f"adapter_names: unknown adapter {n!r}; known: {', '.join(known)} (or {BASE!r})")
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise ConfigError("adapter_names: unmerge the model first; mixed batches need unmerged adapters")
    for module in wrappers(model):
        module.begin_mixed_batch(names)
    return args, kwargs


def _post_hook(model, args, kwargs, output):
    for module in wrappers(model):
        if module.row_adapters is not None:
            module.end_mixed_batch()
    return output


def install_mixed_batch_hook(model: nn.Module) -> None:
    """Lets `model(..., adapter_names=[...])` run one adapter per row (installed once by inject)."""
    if getattr(model, _HOOK_ATTR, None):
        return
    handles = (model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
               model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True))
    object.__setattr__(model, _HOOK_ATTR, handles)


def remove_mixed_batch_hook(model: nn.Module) -> None:
    """Removes the mixed-batch hook (done by merge_and_unload / unload)."""
    for h in getattr(model, _HOOK_ATTR, None) or ():
        h.remove()
    if hasattr(model, _HOOK_ATTR):
        object.__delattr__(model, _HOOK_ATTR)
