"""Wrap a model's target modules in LoRA layers: `inject`, the operation that adds an adapter.

`inject` works on any nn.Module: it replaces each target (by name) with the wrapper for its kind (found in
lorakit.layers.registry), freezes every base parameter and leaves trainable exactly the LoRA factors plus what
`bias` and `modules_to_save` ask for. It then installs the mixed-batch hook, links sibling projections that
share an input (lorakit.model.shared_input) and activates the new adapter. merge.py takes wrappers out again.

Parameter targets (LoraConfig.target_parameters: MoE experts' 3-D tensors) get a LoraParam around the module
that holds them. Several on one module nest like PEFT's ParamWrapper: the first registered parameter is the
innermost wrapper, so its keys carry `.base_layer` exactly as PEFT's do; a later adapter reuses the chain.
"""
from __future__ import annotations

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer, LoraParam, ModulesToSave
from lorakit.layers.param import owner_of
from lorakit.layers.registry import is_linear, wrap
from lorakit.model.mixed_batch import install_mixed_batch_hook
from lorakit.model.shared_input import fuse_shared_inputs
from lorakit.model.state import adapter_configs, check_adapter_name, set_adapter, set_adapter_configs, set_submodule
from lorakit.model.targets import (base_of, drop_inside_saved, expand_all_linear, find_parameter_targets,
                                   find_targets, is_plain_linear, matching_modules, skipped_linears,
                                   split_linear_weights, warn_skipped)
from lorakit.ops.nf4_experts import expert_tensors
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
    config = expand_all_linear(model, config)
    if config.target_modules == "all-linear":
        warn_skipped(skipped_linears(model))
    linear_params, param_targets = split_linear_weights(model, find_parameter_targets(model, config))
    if param_targets:
        check_parameter_config(config)
        wrapper_paths(model, param_targets)  # refuses a parameter set that differs from existing wrappers
    targets = find_targets(model, config)
    targets += [n for n in linear_params if n not in targets]
    to_save = matching_modules(model, config.modules_to_save)
    if config.modules_to_save and not to_save:
        raise ConfigError(f"LoraConfig.modules_to_save={config.modules_to_save} matched no module")
    targets = drop_inside_saved(targets, to_save)
    overlap = set(targets) & set(to_save)
    if overlap:
        raise ConfigError(f"{sorted(overlap)[0]!r} is both a LoRA target and in modules_to_save; choose one")
    # Build every wrapper before touching the model, so a bad target leaves the model unchanged.
    planned: list[tuple[str, LoraLayer, bool]] = []
    for name in targets:
        current = model.get_submodule(name)
        if is_linear(current) and not is_plain_linear(current):
            raise ConfigError(f"target {name!r} is a {type(current).__name__}, an nn.Linear subclass whose forward is "
                              f"not a plain linear map (e.g. a MoE router returning a tuple); LoRA cannot wrap it")
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
    inject_parameters(model, config, adapter_name, param_targets)
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


# ---------------------------------------------------------------------------- parameter targets
def check_parameter_config(config: LoraConfig) -> None:
    """Raises ConfigError for LoraConfig options that PEFT's ParamWrapper refuses too."""
    for field, bad in (("lora_dropout", config.lora_dropout > 0), ("use_dora", config.use_dora),
                       ("fan_in_fan_out", config.fan_in_fan_out),
                       ("init_lora_weights", config.init_lora_weights in BASE_INITS)):
        if bad:
            raise ConfigError(f"LoraConfig.{field}={getattr(config, field)!r} does not work with target_parameters "
                              f"(LoRA on a parameter), as in PEFT")


def existing_chain(module: nn.Module) -> list[str]:
    """Returns the parameter names of a nested LoraParam chain, innermost first (empty if none)."""
    names = []
    while isinstance(module, LoraParam):
        names.append(module.parameter_name)
        module = module.base_layer
    return names[::-1]


def _by_module(params: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for mname, pname in params:
        out.setdefault(mname, []).append(pname)
    return out


def wrapper_paths(model: nn.Module, params: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Returns {(module, parameter): the name its LoraParam has (or will have) in the model}."""
    paths = {}
    for mname, pnames in _by_module(params).items():
        module = model.get_submodule(mname)
        order = existing_chain(module)
        if order and sorted(order) != sorted(pnames):
            raise ConfigError(f"target_parameters: {mname} already has LoRA on {order}; every adapter with "
                              f"target_parameters must target the same parameters (as in PEFT), got {pnames}")
        order = order or [p for p in expert_tensors(owner_of(module)) if p in pnames]
        for i, p in enumerate(order):
            paths[(mname, p)] = mname + ".base_layer" * (len(order) - 1 - i)
    return paths


def inject_parameters(model: nn.Module, config: LoraConfig, adapter_name: str, params: list[tuple[str, str]]) -> None:
    """Wraps (or reuses the wrappers of) the parameter targets and adds adapter `adapter_name` to each."""
    for mname, pnames in _by_module(params).items():
        current = model.get_submodule(mname)
        if not existing_chain(current):
            for p in [p for p in expert_tensors(current) if p in pnames]:
                current = LoraParam(current, p)
            set_submodule(model, mname, current)
        layer = current
        while isinstance(layer, LoraParam):
            key = f"{mname}.{layer.parameter_name}"
            layer.add_adapter(adapter_name, config.rank_for(key), config.alpha_for(key), config.lora_dropout,
                              config.init_lora_weights, config.use_rslora, config.use_dora)
            layer = layer.base_layer
