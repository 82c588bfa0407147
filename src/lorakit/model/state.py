"""What lorakit keeps on a model: its adapters' configs, which are active and trainable, and its LoRA layers."""
from __future__ import annotations

import re

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer, ModulesToSave

CONFIG_ATTR = "lorakit_config"  # model attribute: {adapter name: LoraConfig}


_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


_RESERVED = {"weight", "bias", "__base__", "base_layer", "original_module"}
_ACTIVE_ATTR = "lorakit_active"


def check_adapter_name(name: str) -> str:
    """Returns `name` if it is a safe adapter name (letters, digits, '_' and '-'); raises ConfigError otherwise."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED:
        raise ConfigError(f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-' "
                          f"(and not one of {sorted(_RESERVED)})")
    return name


def lora_layers(model: nn.Module):
    """Yields (name, layer) for every LoRA wrapper in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """Returns the model's {adapter name: LoraConfig} (empty when nothing was injected)."""
    return getattr(model, CONFIG_ATTR, {})


def set_adapter_configs(model: nn.Module, configs: dict[str, LoraConfig]) -> None:
    """Stores the model's {adapter name: LoraConfig} (an empty dict removes it)."""
    if configs:
        setattr(model, CONFIG_ATTR, dict(configs))
    elif hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replaces the submodule called `name` by `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrappers(model: nn.Module):
    """Yields every lorakit wrapper of the model (LoRA layers and modules_to_save copies)."""
    for _, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield module


def check_known(model: nn.Module, names: list[str]) -> None:
    """Raises ConfigError naming the first of `names` that is not an adapter of the model."""
    known = adapter_configs(model)
    for name in names:
        if name not in known:
            raise ConfigError(f"no adapter named {name!r}; this model has: {', '.join(known) or 'none'}")


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Returns the names of the active adapters."""
    return getattr(model, _ACTIVE_ATTR, ())


def set_active_names(model: nn.Module, names) -> None:
    """Records `names` as the model's active adapters (the layers are told separately)."""
    setattr(model, _ACTIVE_ATTR, tuple(names))


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Makes `names` the active adapters (their updates add up) and the trainable ones."""
    names = [names] if isinstance(names, str) else list(names)
    check_known(model, names)
    for module in wrappers(model):
        module.set_active(names)
    set_active_names(model, names)
    mark_trainable(model, names)


def mark_trainable(model: nn.Module, adapter_names: list[str]) -> None:
    """Freezes everything, then unfreezes the factors of `adapter_names` and what their bias mode asks for."""
    configs = adapter_configs(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in adapter_names:
        config = configs[name]
        if config.inference_mode:
            continue
        for _, module in model.named_modules():
            if isinstance(module, LoraLayer) and name in module.r:
                for p in module.adapter_parameters(name):
                    p.requires_grad_(True)
                if config.bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                    module.base_layer.bias.requires_grad_(True)
            elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
                for p in module.modules_to_save[name].parameters():
                    p.requires_grad_(True)
        if config.bias == "all":
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.requires_grad_(True)
