"""Which modules an adapter targets: name matching, per-architecture defaults, and THE output-head finder."""
from __future__ import annotations

import re

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, did_you_mean
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.layers.registry import is_linear

_LAYER_RE = r".*\.(?:{})\.(\d+)(?:\.|$)"
_DEFAULT_LAYER_NAMES = "layers|h|layer|blocks|block"


# Default targets when target_modules is None: the attention query and value projections, as in the LoRA paper.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "opt": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "t5": ["q", "v"],
}


def plain_modules(model: nn.Module):
    """Yields (name, module) of the original model: a LoRA wrapper counts under its own name, its insides not."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, module


def base_of(module: nn.Module) -> nn.Module:
    """Returns the base layer of a LoRA wrapper, or `module` itself."""
    return module.base_layer if isinstance(module, LoraLayer) else module


def output_head(model: nn.Module) -> nn.Module | None:
    """Returns model.get_output_embeddings() (the output head), or None where the model has none."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def output_head_names(model: nn.Module) -> set[str]:
    """Returns the names of the output head modules: get_output_embeddings(), and any module named lm_head."""
    head = output_head(model)
    return {name for name, module in model.named_modules()
            if (head is not None and module is head) or name.split(".")[-1] == "lm_head"}


def matches(spec, name: str, module: nn.Module, head_names: set[str]) -> bool:
    """Returns True when module `name` is selected by `spec` (a suffix list, a full-name regex or "all-linear")."""
    if spec is None:
        return False
    if spec == "all-linear":
        return is_linear(base_of(module)) and name not in head_names
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def matching_modules(model: nn.Module, spec) -> list[str]:
    """Returns the names of the model's (original) modules that `spec` selects, e.g. modules_to_save."""
    heads = output_head_names(model)
    return [n for n, m in plain_modules(model) if n and matches(spec, n, m, heads)]


def _layer_index(name: str, config: LoraConfig) -> int | None:
    pattern = config.layers_pattern
    names = "|".join(pattern if isinstance(pattern, list) else [pattern]) if pattern else _DEFAULT_LAYER_NAMES
    m = re.match(_LAYER_RE.format(names), name)
    return int(m.group(1)) if m else None


def _default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ConfigError(f"LoraConfig.target_modules: no default targets for model type {model_type!r}; name them, "
                      f"e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'. Linear layers here: "
                      f"{', '.join(linear_layer_names(model)[:20])}")


def linear_layer_names(model: nn.Module) -> list[str]:
    """Returns the distinct last-name parts of the model's linear layers (what target_modules usually lists)."""
    return sorted({n.split(".")[-1] for n, m in plain_modules(model) if n and is_linear(base_of(m))})


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Returns the names of the modules `config` selects; raises ConfigError with near misses when none."""
    targets = config.target_modules if config.target_modules is not None else _default_targets(model)
    heads = output_head_names(model)
    found, before_layers = [], []
    for name, module in plain_modules(model):
        if not name or not matches(targets, name, module, heads):
            continue
        if matches(config.exclude_modules, name, module, heads):
            continue
        before_layers.append(name)
        if config.layers_to_transform is not None and _layer_index(name, config) not in config.layers_to_transform:
            continue
        found.append(name)
    if found:
        return found
    if before_layers:
        raise ConfigError(f"LoraConfig.layers_to_transform={config.layers_to_transform}: target_modules matched "
                          f"{len(before_layers)} modules (e.g. {before_layers[0]}) but none is in those layers")
    names = [n for n, _ in plain_modules(model) if n]
    suffixes = sorted({n.split(".")[-1] for n in names})
    wanted = targets if isinstance(targets, list) else [targets]
    hints = "".join(did_you_mean(t, suffixes) for t in wanted)
    raise ConfigError(f"LoraConfig.target_modules={targets!r} matched no module of {type(model).__name__}.{hints} "
                      f"Linear layers in this model: {', '.join(linear_layer_names(model)[:30]) or 'none'}")
