"""Which modules an adapter targets: name matching, per-architecture defaults, and THE output-head finder.

Also which module PARAMETERS it targets (LoraConfig.target_parameters, PEFT 0.21's rules): `<module>.<param>`
is a target when it equals an entry or ends with `.<entry>`. On a mixture-of-experts model `all-linear` adds
the routed experts' 3-D tensors as PEFT 0.21 does for Qwen3-MoE, Mixtral and DeepSeek-V3 (`gate_up_proj` with
rank 2r and alpha 2·alpha: it fuses two projections), on every MoE architecture, and keeps the dense MLPs
(PEFT's v5 conversion drops DeepSeek-V3's). Routers are never adapted unless named, and an nn.Linear subclass
whose forward is not a plain linear map (Llama 4's router returns a tuple) is skipped with a warning.
"""
from __future__ import annotations

import copy
import re
import warnings

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, did_you_mean
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.layers.param import owner_of
from lorakit.layers.registry import is_linear
from lorakit.ops.nf4_experts import expert_tensors

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
        base = base_of(module)
        return is_linear(base) and name not in head_names and is_plain_linear(base) and not is_router(name, base)
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
    """Returns the names of the modules `config` selects; raises ConfigError with near misses when none.

    With target_parameters set and target_modules None, no module is selected (as in PEFT)."""
    if config.target_modules is None and config.target_parameters:
        return []
    targets = config.target_modules if config.target_modules is not None else _default_targets(model)
    heads = output_head_names(model)
    if config.task_type == "SEQ_CLS" and output_head(model) is None:
        # as PEFT: the sequence-classification head ("classifier" or "score") is not an all-linear target
        head = next((getattr(model, n) for n in ("classifier", "score") if getattr(model, n, None) is not None), None)
        heads |= {n for n, m in model.named_modules() if head is not None and m is head}
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


def drop_inside_saved(targets: list[str], to_save: list[str]) -> list[str]:
    """Returns `targets` without those inside a modules_to_save module (as PEFT: the module saved whole wins)."""
    return [t for t in targets if not any(t.startswith(s + ".") for s in to_save)]


# ---------------------------------------------------------------------------- parameter targets, MoE
_QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")
FUSED_PAIRS = ("gate_up_proj",)  # expert tensors that fuse two projections: all-linear gives them 2r, 2·alpha
_PLAIN_PROBES: dict[type, bool] = {}


def is_plain_linear(module: nn.Module) -> bool:
    """Returns False for an nn.Linear subclass whose forward is not the plain map x·Wᵀ + b (Llama 4's router
    returns a tuple); True for nn.Linear, Conv1D, bitsandbytes' quantized linears and subclasses that only
    re-implement the same map (Falcon's FalconLinear), which is checked once per class on a small probe input."""
    if not isinstance(module, nn.Linear) or type(module).__name__ in _QUANTIZED_LINEARS:
        return True
    if type(module).forward is nn.Linear.forward:
        return True
    if type(module) not in _PLAIN_PROBES:
        _PLAIN_PROBES[type(module)] = _probe_plain(module)
    return _PLAIN_PROBES[type(module)]


def _probe_plain(module: nn.Linear) -> bool:
    import torch
    w = module.weight
    if w.device.type == "meta" or not w.dtype.is_floating_point:
        return False
    x = torch.randn(2, 3, module.in_features, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            out = module(x)
            ref = torch.nn.functional.linear(x, w, module.bias)
    except Exception:  # a forward that cannot take a plain input is not a plain linear map
        return False
    return isinstance(out, torch.Tensor) and out.shape == ref.shape and bool(torch.allclose(out, ref, 1e-3, 1e-4))


def is_router(name: str, module: nn.Module) -> bool:
    """Returns True for a MoE router (token-to-expert gate): a module named `gate`/`router` or a *Router class."""
    return name.rsplit(".", 1)[-1] in ("gate", "router") or "Router" in type(module).__name__


def expert_parameters(module: nn.Module) -> list[str]:
    """Returns the names of `module`'s routed-expert tensors (3-D parameters, experts first) in registration
    order; empty for anything else."""
    owner = owner_of(module)
    n = getattr(owner, "num_experts", None)
    params = [(k, p) for k, p in expert_tensors(owner).items() if p.dim() == 3]  # 4-bit stores too
    if not params or (n is None and not type(owner).__name__.endswith("Experts")):
        return []
    return [k for k, p in params if n is None or p.shape[0] == n]


def expert_modules(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Returns [(module name, [expert parameter names])] for the model's routed-expert modules."""
    return [(n, ps) for n, m in plain_modules(model) if n for ps in [expert_parameters(m)] if ps]


def expand_all_linear(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Returns `config` with all-linear's expert targets made explicit (a copy), or `config` unchanged.

    As PEFT 0.21 writes them: target_parameters gets the experts' leaf names, and rank_pattern / alpha_pattern
    give fused gate_up_proj tensors 2r / 2·alpha."""
    if config.target_modules != "all-linear" or config.target_parameters is not None:
        return config
    experts = expert_modules(model)
    if not experts:
        return config
    leaves = sorted({f"{n.rsplit('.', 1)[-1]}.{p}" for n, ps in experts for p in ps})
    if config.lora_dropout > 0:
        raise ConfigError(f"target_modules='all-linear' on {type(model).__name__} adapts its routed experts "
                          f"({', '.join(leaves)}), which needs lora_dropout=0 (as in PEFT); set lora_dropout=0, "
                          f"or list the modules to adapt in target_modules")
    new = copy.deepcopy(config)
    new.target_parameters = leaves
    for pname in {leaf.rsplit(".", 1)[-1] for leaf in leaves} & set(FUSED_PAIRS):
        key = rf".*\.{re.escape(pname)}"
        new.rank_pattern.setdefault(key, config.r * 2)
        new.alpha_pattern.setdefault(key, config.lora_alpha * 2)
    return new


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """Returns [(module name, parameter name)] selected by config.target_parameters, in registration order."""
    wanted = config.target_parameters or []
    found = []
    for mname, module in plain_modules(model) if wanted else ():
        owner = owner_of(module)
        for pname, p in expert_tensors(owner).items():
            key = f"{mname}.{pname}" if mname else pname
            if p is not None and (key in wanted or any(key.endswith("." + t) for t in wanted)):
                if not mname:
                    raise ConfigError(f"target_parameters: {pname!r} belongs to the top-level model; only "
                                      f"parameters of submodules can be targeted (as in PEFT)")
                found.append((mname, pname))
    if wanted and not found:
        here = sorted({f"{n.rsplit('.', 1)[-1]}.{p}" for n, ps in expert_modules(model) for p in ps})
        raise ConfigError(f"LoraConfig.target_parameters={wanted} matched no parameter of {type(model).__name__}; "
                          f"expert tensors here: {', '.join(here) or 'none'}")
    return found


def split_linear_weights(model: nn.Module, targets: list[tuple[str, str]]):
    """Splits parameter targets into (names of plain nn.Linear modules whose `weight` is targeted: they get an
    ordinary LoRA linear layer, same keys and math as PEFT's wrapper), [the other (module, parameter)]."""
    linears, params = [], []
    for mname, pname in targets:
        if pname == "weight" and type(model.get_submodule(mname)) is nn.Linear:
            linears.append(mname)
        else:
            params.append((mname, pname))
    return linears, params


def skipped_linears(model: nn.Module) -> list[str]:
    """Returns the names of nn.Linear subclasses that are not plain linear maps (all-linear skips them)."""
    return [n for n, m in plain_modules(model) if n and isinstance(m, nn.Linear) and not is_plain_linear(m)]


def warn_skipped(names: list[str]) -> None:
    """Warns that all-linear left out the named non-plain nn.Linear subclasses."""
    if names:
        warnings.warn(f"target_modules='all-linear' skipped {len(names)} nn.Linear subclass(es) whose forward is "
                      f"not a plain linear map: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}",
                      stacklevel=3)
