"""Wrap a model's target modules in LoRA layers: `inject`, the operation that adds an adapter.

`inject` works on any nn.Module: it replaces each target (by name) with the wrapper for its kind (found in
lorakit.layers.registry), freezes every base parameter and leaves trainable exactly the LoRA factors plus what
`bias` and `modules_to_save` ask for. It then installs the mixed-batch hook, links sibling projections that
share an input (lorakit.model.shared_input) and activates the new adapter. merge.py takes wrappers out again.
"""
from __future__ import annotations

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.layers.registry import wrap
from lorakit.model.mixed_batch import install_mixed_batch_hook
from lorakit.model.shared_input import fuse_shared_inputs
from lorakit.model.state import adapter_configs, check_adapter_name, set_adapter, set_adapter_configs, set_submodule
from lorakit.model.targets import base_of, find_targets, matching_modules
from lorakit.variants.dora import DORA
from lorakit.variants.init import BASE_INITS


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Wraps the targets of `config` in place, freezes the base, and returns the model.

    The new adapter becomes active (together with none other) and trainable; existing adapters stay frozen.
    """
    check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ConfigError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
    targets = find_targets(model, config)
    to_save = matching_modules(model, config.modules_to_save)
    if config.modules_to_save and not to_save:
        raise ConfigError(f"LoraConfig.modules_to_save={config.modules_to_save} matched no module")
    overlap = set(targets) & set(to_save)
    if overlap:
        raise ConfigError(f"{sorted(overlap)[0]!r} is both a LoRA target and in modules_to_save; choose one")
    # Build every wrapper before touching the model, so a bad target leaves the model unchanged.
    planned: list[tuple[str, LoraLayer, bool]] = []
    for name in targets:
        current = model.get_submodule(name)
        wrapper = current if isinstance(current, LoraLayer) else wrap(current, name, config)
        if config.use_dora and wrapper.kind not in DORA.layer_kinds:
            raise ConfigError(f"use_dora: {name} is a {type(base_of(wrapper)).__name__}; DoRA needs a linear layer")
        if config.init_lora_weights in BASE_INITS and not wrapper.base_init:
            raise ConfigError(f"init_lora_weights={config.init_lora_weights!r}: {name} is not a plain linear layer")
        planned.append((name, wrapper, wrapper is not current))
    for name, wrapper, is_new in planned:
        wrapper.add_adapter(adapter_name, config.rank_for(name), config.alpha_for(name), config.lora_dropout,
                            config.init_lora_weights, config.use_rslora, config.use_dora)
        if is_new:
            set_submodule(model, name, wrapper)
    for name in to_save:
        current = model.get_submodule(name)
        if not isinstance(current, ModulesToSave):
            current = ModulesToSave(current)
            set_submodule(model, name, current)
        current.add_adapter(adapter_name)
    set_adapter_configs(model, {**configs, adapter_name: config})
    install_mixed_batch_hook(model)
    fuse_shared_inputs(model)  # q,k,v and gate,up share one A GEMM: exact and never slower (shared_input.py)
    set_adapter(model, adapter_name)
    return model
