"""Find target modules, wrap them in LoRA layers, and unwrap them again.

`inject` works on any nn.Module: it replaces each target (by name) with the wrapper for its kind, freezes
every base parameter and leaves trainable exactly the LoRA factors plus what `bias` and `modules_to_save`
ask for. `merge_and_unload` / `unload` give back a plain model with no lorakit modules in it.
"""
from __future__ import annotations

import re
from collections import Counter

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, did_you_mean
from lorakit.layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, LoraMergedLinear, ModulesToSave

CONFIG_ATTR = "lorakit_config"  # model attribute: {adapter name: LoraConfig}
SUPPORTED = "nn.Linear, transformers Conv1D, bitsandbytes Linear4bit, nn.Embedding, nn.Conv1d/2d/3d"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RESERVED = {"weight", "bias", "__base__", "base_layer", "original_module"}
_LAYER_RE = r".*\.(?:{})\.(\d+)(?:\.|$)"
_DEFAULT_LAYER_NAMES = "layers|h|layer|blocks|block"

# Default targets when target_modules is None: the attention query and value projections, as in the LoRA paper.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "opt": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "t5": ["q", "v"],
}


def is_linear(module: nn.Module) -> bool:
    """Returns True for nn.Linear, transformers' Conv1D and bitsandbytes 4/8-bit linear layers."""
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


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


# ---------------------------------------------------------------------------- matching
def _plain_modules(model: nn.Module):
    # Named modules of the original model: skip lorakit internals (a wrapper counts under its own name).
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, module


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _output_head_names(model: nn.Module) -> set[str]:
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.split(".")[-1] in ("lm_head",):
            names.add(name)
    return names


def drop_inside_saved(targets: list[str], to_save: list[str]) -> list[str]:
    """Returns `targets` without those inside a modules_to_save module (as PEFT: the module saved whole wins)."""
    return [t for t in targets if not any(t.startswith(s + ".") for s in to_save)]


def _call_method(model: nn.Module, method: str):
    fn = getattr(model, method, None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        return None


def _matches(spec, name: str, module: nn.Module, head_names: set[str]) -> bool:
    if spec is None:
        return False
    if spec == "all-linear":
        from lorakit.moe import is_plain_linear, is_router
        base = _base_of(module)
        return (is_linear(base) and name not in head_names and is_plain_linear(base)
                and not is_router(name, base))
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


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
    return sorted({n.split(".")[-1] for n, m in _plain_modules(model) if n and is_linear(_base_of(m))})


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Returns the names of the modules `config` selects; raises ConfigError with near misses when none.

    With target_parameters set and target_modules None, no module is selected (as in PEFT)."""
    if config.target_modules is None and config.target_parameters:
        return []
    targets = config.target_modules if config.target_modules is not None else _default_targets(model)
    heads = _output_head_names(model)
    if config.task_type == "SEQ_CLS" and _call_method(model, "get_output_embeddings") is None:
        # as PEFT: the sequence-classification head ("classifier" or "score") is not an all-linear target
        head = next((getattr(model, n) for n in ("classifier", "score") if getattr(model, n, None) is not None), None)
        heads |= {n for n, m in model.named_modules() if head is not None and m is head}
    found, before_layers = [], []
    for name, module in _plain_modules(model):
        if not name or not _matches(targets, name, module, heads):
            continue
        if _matches(config.exclude_modules, name, module, heads):
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
    names = [n for n, _ in _plain_modules(model) if n]
    suffixes = sorted({n.split(".")[-1] for n in names})
    wanted = targets if isinstance(targets, list) else [targets]
    hints = "".join(did_you_mean(t, suffixes) for t in wanted)
    raise ConfigError(f"LoraConfig.target_modules={targets!r} matched no module of {type(model).__name__}.{hints} "
                      f"Linear layers in this model: {', '.join(linear_layer_names(model)[:30]) or 'none'}")


# ---------------------------------------------------------------------------- wrapping
def _wrap(module: nn.Module, name: str, config: LoraConfig) -> LoraLayer:
    slices = config.slices_for(name)
    from lorakit.moe import is_plain_linear
    if is_linear(module) and not is_plain_linear(module):
        raise ConfigError(f"target {name!r} is a {type(module).__name__}, an nn.Linear subclass whose forward is not "
                          f"a plain linear map (it {'is a MoE router' if 'Router' in type(module).__name__ else 'overrides forward'}); "
                          f"LoRA cannot wrap it as a linear layer")
    if is_linear(module):
        if slices is not None:
            return LoraMergedLinear(module, slices, fan_in_fan_out=None)
        fan = True if type(module).__name__ == "Conv1D" else config.fan_in_fan_out
        return LoraLinear(module, fan_in_fan_out=fan)
    if slices is not None:
        raise ConfigError(f"enable_lora: {name} is a {type(module).__name__}, fused slices need a linear layer")
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv(module)
    raise ConfigError(f"target {name!r} is a {type(module).__name__}, which LoRA cannot wrap; supported: {SUPPORTED}")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Wraps the targets of `config` in place, freezes the base, and returns the model.

    The new adapter becomes active (together with none other) and trainable; existing adapters stay frozen.
    """
    check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ConfigError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
    from lorakit import moe
    config = moe.expand_all_linear(model, config, _plain_modules)
    if config.target_modules == "all-linear":
        moe.warn_skipped(moe.skipped_linears(model, _plain_modules))
    param_targets = moe.find_parameter_targets(model, config, _plain_modules)
    linear_params, param_targets = moe.split_linear_weights(model, param_targets)
    if param_targets:
        moe.check_parameter_config(config)
        moe.wrapper_paths(model, param_targets)  # refuses a parameter set that differs from existing wrappers
    targets = find_targets(model, config)
    targets += [n for n in linear_params if n not in targets]
    heads = _output_head_names(model)
    to_save = [n for n, m in _plain_modules(model) if n and _matches(config.modules_to_save, n, m, heads)]
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
        wrapper = current if isinstance(current, LoraLayer) else _wrap(current, name, config)
        if config.use_dora and (not isinstance(wrapper, LoraLinear) or isinstance(wrapper, LoraMergedLinear)):
            raise ConfigError(f"use_dora: {name} is a {type(_base_of(wrapper)).__name__}; DoRA needs a linear layer")
        if config.init_lora_weights in ("pissa", "olora") and not isinstance(wrapper, LoraLinear):
            raise ConfigError(f"init_lora_weights={config.init_lora_weights!r}: {name} is not a linear layer")
        planned.append((name, wrapper, wrapper is not current))
    for name, wrapper, is_new in planned:
        wrapper.add_adapter(adapter_name, config.rank_for(name), config.alpha_for(name), config.lora_dropout,
                            config.init_lora_weights, config.use_rslora, config.use_dora)
        if is_new:
            _set_submodule(model, name, wrapper)
    moe.inject_parameters(model, config, adapter_name, param_targets, _set_submodule)
    for name in to_save:
        current = model.get_submodule(name)
        if not isinstance(current, ModulesToSave):
            current = ModulesToSave(current)
            _set_submodule(model, name, current)
        current.add_adapter(adapter_name)
    configs = dict(configs)
    configs[adapter_name] = config
    setattr(model, CONFIG_ATTR, configs)
    from lorakit.adapters import install_mixed_batch_hook, set_adapter
    from lorakit.fuse import fuse_shared_inputs
    install_mixed_batch_hook(model)
    fuse_shared_inputs(model)  # q,k,v and gate,up share one A GEMM: exact, measured faster (see fuse.py)
    set_adapter(model, adapter_name)
    return model


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
                for p in module._adapter_params(name):
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


# ---------------------------------------------------------------------------- counting
def _numel(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte: count the parameters the layer represents.
    return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Returns (trainable, total) parameter counts; shared tensors are counted once."""
    trainable = total = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def summary(model: nn.Module) -> str:
    """Returns a printable table of LoRA modules per kind with their trainable parameters."""
    kinds: Counter = Counter()
    params: Counter = Counter()
    for _, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inner = _base_of(module) if isinstance(module, LoraLayer) else module.original_module
            if hasattr(module, "parameter_name"):  # a parameter target: name the module kind and the parameter
                inner_name = f"{type(module.owner).__name__}.{module.parameter_name}"
            else:
                inner_name = type(inner).__name__
            kind = f"{type(module).__name__}({inner_name})"
            kinds[kind] += 1
            params[kind] += sum(p.numel() for n, p in module.named_parameters()
                                if p.requires_grad and not n.startswith("base_layer."))
    trainable, total = trainable_parameters(model)
    lines = [f"{'module kind':<40} {'count':>6} {'trainable params':>18}"]
    lines += [f"{k:<40} {kinds[k]:>6} {params[k]:>18,}" for k in sorted(kinds)]
    lines.append(f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.4f}%)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- merging and unwrapping
def _untie_shared_weights(model: nn.Module) -> None:
    # A merged weight that another module shares (GPT-2's wte is also lm_head) would change that module
    # too; give the LoRA layer its own copy first so only the adapted layer sees the update.
    owners = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    for _, layer in lora_layers(model):
        if not hasattr(layer.base_layer, "weight"):  # parameter targets (lorakit.layers.param) own no .weight
            continue
        w = layer.base_layer.weight
        if owners[id(w)] > 1 and type(w) is nn.Parameter:
            layer.base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)


def merge(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Folds the given (default: active) adapters into the base weights, in fp32; returns the model.

    A base weight tied to another module (e.g. an embedding shared with the output head) is untied first.
    """
    _untie_shared_weights(model)
    for _, layer in lora_layers(model):
        layer.merge(adapter_names)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtracts every merged adapter from the base weights again; returns the model."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def _replace_wrappers(model: nn.Module, do_merge: bool) -> nn.Module:
    if do_merge:
        _untie_shared_weights(model)
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(p) for p in replaced):  # nested parameter wrappers: handled with their outer one
            continue
        if isinstance(module, LoraLayer):
            inner = module
            while isinstance(inner, LoraLayer):
                inner.merge() if do_merge else inner.unmerge()
                inner = inner.base_layer
            _set_submodule(model, name, inner)
            replaced.append(name + ".")
        elif isinstance(module, ModulesToSave):
            keep = module.active_module() if do_merge else module.original_module
            for p in keep.parameters():
                p.requires_grad_(False)
            _set_submodule(model, name, keep)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    from lorakit.adapters import remove_mixed_batch_hook
    remove_mixed_batch_hook(model)
    return model


def merge_and_unload(model: nn.Module, requantize: bool = False, example_inputs=None) -> nn.Module:
    """Returns the plain model with the active adapters folded into W0 and no lorakit modules left.

    On a 4-bit base the model comes back dequantized, or re-quantized with a warning giving the measured
    logit change when requantize=True (see lorakit.quant.merge_and_unload_quantized).
    """
    if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        from lorakit.quant import merge_and_unload_quantized
        return merge_and_unload_quantized(model, requantize=requantize, example_inputs=example_inputs)
    return _replace_wrappers(model, do_merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Returns the plain base model: adapters dropped (unmerged first if they were merged)."""
    return _replace_wrappers(model, do_merge=False)
