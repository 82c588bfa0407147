"""Mixture-of-experts support: `target_parameters` matching (PEFT's rules), `all-linear` on MoE models, and the
PEFT file-layout details of parameter targets.

    LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"])   the routed experts
    LoraConfig(target_modules="all-linear")     on a MoE model: every plain linear layer + the routed experts

Matching follows PEFT 0.21: a parameter `<module>.<param>` is a target when it equals an entry or ends with
`.<entry>`. A target that is the `weight` of a plain nn.Linear is wrapped as an ordinary LoraLinear (same keys,
same math as PEFT's ParamWrapper on it); every other target becomes a LoraParam. Several targets on one module
nest like PEFT's wrappers: the first registered parameter is innermost, so its keys carry `.base_layer`.

`all-linear` on a MoE model adds the fused experts' 3-D parameters exactly as PEFT 0.21 does for Qwen3-MoE,
Mixtral and DeepSeek-V3 (`gate_up_proj` gets rank 2r and alpha 2·alpha: it fuses two projections), on every
MoE architecture, and keeps the dense layers' MLPs adapted (PEFT's conversion drops DeepSeek-V3's). Routers
are never adapted unless named, and an nn.Linear subclass with its own forward (Llama 4's router returns a
tuple) is skipped with a warning, or refused when named explicitly.
"""
from __future__ import annotations

import copy
import re
import warnings

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.layers.param import LoraParam, owner_of

# Leaf names that PEFT's transformers-v5 conversion renames to expert parameters on MoE models whose checkpoint
# conversion is "mixtral" or "qwen2_moe" (see transformers.conversion_mapping): a module of that name listed in
# target_modules would be re-targeted by PEFT, so lorakit exports such modules as `<name>.weight` parameters.
_PEFT_CONVERTED_LEAVES = {"gate", "router", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"}
_QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")
FUSED_PAIRS = ("gate_up_proj",)  # expert tensors that fuse two projections: all-linear gives them 2r, 2·alpha


def is_plain_linear(module: nn.Module) -> bool:
    """Returns False for an nn.Linear subclass whose forward is not the plain map x·Wᵀ + b (Llama 4's router
    returns a tuple); True for nn.Linear, Conv1D, bitsandbytes' quantized linears and subclasses that only
    re-implement the same map (Falcon's FalconLinear), which is checked once on a small probe input."""
    if not isinstance(module, nn.Linear) or type(module).__name__ in _QUANTIZED_LINEARS:
        return True
    if type(module).forward is nn.Linear.forward:
        return True
    cached = _PLAIN_PROBES.get(type(module))
    if cached is None:
        cached = _probe_plain(module)
        _PLAIN_PROBES[type(module)] = cached
    return cached


_PLAIN_PROBES: dict[type, bool] = {}


def _probe_plain(module: nn.Linear) -> bool:
    import torch
    w = module.weight
    if w.device.type == "meta" or not w.dtype.is_floating_point:
        return False
    x = torch.randn(2, 3, module.in_features, dtype=w.dtype, device=w.device,
                    generator=torch.Generator(device=w.device).manual_seed(0))
    try:
        with torch.no_grad():
            out = module(x)
    except Exception:
        return False
    if not isinstance(out, torch.Tensor) or out.shape != (2, 3, module.out_features):
        return False
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, w, module.bias)
    return bool(torch.allclose(out, ref, rtol=1e-3, atol=1e-4))


def is_router(name: str, module: nn.Module) -> bool:
    """Returns True for a MoE router (token-to-expert gate): a module named `gate`/`router` or a *Router class."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("gate", "router") or "Router" in type(module).__name__


def expert_parameters(module: nn.Module) -> list[str]:
    """Returns the names of `module`'s routed-expert tensors: its 3-D parameters (experts first), in
    registration order; empty for anything else."""
    owner = owner_of(module)
    n = getattr(owner, "num_experts", None)
    params = [(k, p) for k, p in owner._parameters.items() if p is not None and p.dim() == 3]
    if not params or not (n is None or all(p.shape[0] == n for _, p in params)):
        return []
    if n is None and not type(owner).__name__.endswith("Experts"):
        return []
    return [k for k, _ in params]


def expert_modules(model: nn.Module, plain_modules) -> list[tuple[str, list[str]]]:
    """Returns [(module name, [expert parameter names])] for the model's routed-expert modules."""
    return [(n, ps) for n, m in plain_modules(model) if n for ps in [expert_parameters(m)] if ps]


def expand_all_linear(model: nn.Module, config: LoraConfig, plain_modules) -> LoraConfig:
    """Returns `config` with all-linear's expert targets made explicit (a copy), or `config` unchanged.

    As PEFT 0.21 writes them: target_parameters gets the experts' leaf names and rank_pattern / alpha_pattern
    give fused gate_up_proj tensors 2r / 2·alpha."""
    if config.target_modules != "all-linear" or config.target_parameters is not None:
        return config
    experts = expert_modules(model, plain_modules)
    if not experts:
        return config
    leaves = sorted({f"{n.rsplit('.', 1)[-1]}.{p}" for n, ps in experts for p in ps})
    if config.lora_dropout > 0:
        raise ConfigError(f"target_modules='all-linear' on {type(model).__name__} adapts its routed experts "
                          f"({', '.join(leaves)}), which needs lora_dropout=0 (as in PEFT); set lora_dropout=0, "
                          f"or list the modules to adapt in target_modules")
    new = copy.deepcopy(config)
    new.target_parameters = leaves
    for leaf in leaves:
        pname = leaf.rsplit(".", 1)[-1]
        if pname in FUSED_PAIRS:
            key = rf".*\.{re.escape(pname)}"
            new.rank_pattern.setdefault(key, config.r * 2)
            new.alpha_pattern.setdefault(key, config.lora_alpha * 2)
    return new


def find_parameter_targets(model: nn.Module, config: LoraConfig, plain_modules) -> list[tuple[str, str]]:
    """Returns [(module name, parameter name)] selected by config.target_parameters, in PEFT's wrapping order."""
    wanted = config.target_parameters or []
    if not wanted:
        return []
    found = []
    for mname, module in plain_modules(model):
        owner = owner_of(module)
        for pname in owner._parameters:
            if owner._parameters[pname] is None:
                continue
            key = f"{mname}.{pname}" if mname else pname
            if key in wanted or any(key.endswith("." + t) for t in wanted):
                if not mname:
                    raise ConfigError(f"target_parameters: {pname!r} belongs to the top-level model; only "
                                      f"parameters of submodules can be targeted (as in PEFT)")
                found.append((mname, pname))
    if not found:
        raise ConfigError(f"LoraConfig.target_parameters={wanted} matched no parameter of {type(model).__name__}; "
                          f"expert tensors here: {', '.join(sorted({'.'.join(n.split('.')[-1:] + [p]) for n, ps in expert_modules(model, plain_modules) for p in ps})) or 'none'}")
    return found


def split_linear_weights(model: nn.Module, targets: list[tuple[str, str]]):
    """Splits parameter targets into (module names whose `weight` is a plain linear layer's, other targets)."""
    linears, params = [], []
    for mname, pname in targets:
        module = model.get_submodule(mname)
        if pname == "weight" and type(module) is nn.Linear:
            linears.append(mname)
        else:
            params.append((mname, pname))
    return linears, params


def wrapper_paths(model: nn.Module, params: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Returns {(module, parameter): the name its LoraParam has (or will have) in the model}."""
    by_module: dict[str, list[str]] = {}
    for mname, pname in params:
        by_module.setdefault(mname, []).append(pname)
    paths = {}
    for mname, pnames in by_module.items():
        chain = existing_chain(model.get_submodule(mname))
        if chain:
            if sorted(chain) != sorted(pnames):
                raise ConfigError(f"target_parameters: {mname} already has LoRA on {chain}; every adapter with "
                                  f"target_parameters must target the same parameters (as in PEFT), got {pnames}")
            order = chain
        else:
            order = [p for p in owner_of(model.get_submodule(mname))._parameters if p in pnames]
        for i, p in enumerate(order):
            paths[(mname, p)] = mname + ".base_layer" * (len(order) - 1 - i)
    return paths


def existing_chain(module: nn.Module) -> list[str]:
    """Returns the parameter names of a nested LoraParam chain, innermost first (empty if none)."""
    names = []
    while isinstance(module, LoraParam):
        names.append(module.parameter_name)
        module = module.base_layer
    return names[::-1]


def inject_parameters(model: nn.Module, config: LoraConfig, adapter_name: str,
                      params: list[tuple[str, str]], set_submodule) -> None:
    """Wraps (or reuses the wrappers of) the parameter targets and adds adapter `adapter_name` to each."""
    by_module: dict[str, list[str]] = {}
    for mname, pname in params:
        by_module.setdefault(mname, []).append(pname)
    for mname, pnames in by_module.items():
        current = model.get_submodule(mname)
        if not existing_chain(current):
            for p in [p for p in current._parameters if p in pnames]:
                current = LoraParam(current, p)
            set_submodule(model, mname, current)
        layer = current
        while isinstance(layer, LoraParam):
            key = f"{mname}.{layer.parameter_name}"
            layer.add_adapter(adapter_name, config.rank_for(key), config.alpha_for(key), config.lora_dropout,
                              config.init_lora_weights, config.use_rslora, config.use_dora)
            layer = layer.base_layer


def check_parameter_config(config: LoraConfig) -> None:
    """Raises ConfigError for LoraConfig options PEFT's ParamWrapper refuses too."""
    for field, bad in (("lora_dropout", config.lora_dropout > 0), ("use_dora", config.use_dora),
                       ("fan_in_fan_out", config.fan_in_fan_out),
                       ("init_lora_weights", config.init_lora_weights in ("pissa", "olora"))):
        if bad:
            raise ConfigError(f"LoraConfig.{field}={getattr(config, field)!r} does not work with target_parameters "
                              f"(LoRA on a parameter), as in PEFT")


def skipped_linears(model: nn.Module, plain_modules) -> list[str]:
    """Returns the names of nn.Linear subclasses that are not plain linear maps (all-linear skips them)."""
    return [n for n, m in plain_modules(model) if n and isinstance(m, nn.Linear) and not is_plain_linear(m)]


def warn_skipped(names: list[str]) -> None:
    if names:
        warnings.warn(f"target_modules='all-linear' skipped {len(names)} nn.Linear subclass(es) whose forward is "
                      f"not a plain linear map: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}",
                      stacklevel=3)


def peft_export(model: nn.Module, config: LoraConfig, adapter_name: str, lora_layers) -> LoraConfig:
    """Returns the config to write for PEFT: all-linear on a MoE model spelled out (PEFT resolves all-linear its
    own way there), and, where PEFT's v5 conversion would re-target them, linear modules written as `.weight`
    parameters (PEFT then wraps the same layer, under the same keys)."""
    from lorakit.layers import LoraLinear
    has_params = any(isinstance(l, LoraParam) and adapter_name in l.r for _, l in lora_layers(model))
    converted = _peft_converts(model)
    if not has_params and not converted and not (config.target_modules == "all-linear"
                                                 and skipped_linears_any(model)):
        return config
    config = copy.deepcopy(config)
    modules = sorted(n for n, l in lora_layers(model) if type(l).__name__ != "LoraParam" and adapter_name in l.r)
    as_params = [n for n in modules if converted and n.rsplit(".", 1)[-1] in _PEFT_CONVERTED_LEAVES
                 and isinstance(model.get_submodule(n), LoraLinear)]
    if config.target_modules == "all-linear" or as_params:
        config.target_modules = [n for n in modules if n not in as_params] or None
    if as_params:
        config.target_parameters = sorted(set(config.target_parameters or []) | {n + ".weight" for n in as_params})
    if config.target_modules is None and not config.target_parameters:
        config.target_modules = modules
    return config


def skipped_linears_any(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) and not is_plain_linear(m) for m in model.modules())


def _peft_converts(model: nn.Module) -> bool:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return False
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as patterns
    except ImportError:
        return False
    return patterns.get(model_type, model_type) in ("mixtral", "qwen2_moe") or model_type in ("mixtral", "qwen2_moe")


def expected_param_shapes(model: nn.Module, config: LoraConfig, params: list[tuple[str, str]]):
    """Returns {wrapper name: {key suffix: shape}} for the parameter targets (PEFT's ParamWrapper layout)."""
    out = {}
    for (mname, pname), path in wrapper_paths(model, params).items():
        p = owner_of(model.get_submodule(mname))._parameters[pname]
        key = f"{mname}.{pname}"
        r = config.rank_for(key)
        transposed = bool(getattr(owner_of(model.get_submodule(mname)), "is_transposed", False))
        if p.dim() == 3:
            E, a, b = p.shape
            k, d = (a, b) if transposed else (b, a)
        else:
            E, (d, k) = 1, p.shape
        out[path] = ({".lora_A.weight": (r * E, k), ".lora_B.weight": (d, r * E)}, r)
    return out


# ---------------------------------------------------------------------------- router auxiliary loss (training)
AUX_ATTR = "lorakit_router_aux_loss"


def set_router_aux_loss(model: nn.Module, option: float | None) -> float:
    """Sets and returns the weight of the router's load-balancing loss in training: `option`, or (None) the
    model config's router_aux_loss_coef when the config sets output_router_logits, else 0."""
    cfg = getattr(model, "config", None)
    if option is None:
        option = getattr(cfg, "router_aux_loss_coef", 0.0) if getattr(cfg, "output_router_logits", False) else 0.0
    coef = float(option or 0.0)
    if coef < 0:
        raise ConfigError(f"router_aux_loss must be >= 0, got {coef}")
    if coef and not hasattr(cfg, "output_router_logits"):
        raise ConfigError(f"router_aux_loss={coef}: {type(model).__name__} reports no router auxiliary loss "
                          f"(its config has no output_router_logits)")
    object.__setattr__(model, AUX_ATTR, coef)
    return coef


def router_aux_kwargs(model: nn.Module) -> dict:
    """Returns the forward keyword that makes the model report its router loss (training with a weight only)."""
    return {"output_router_logits": True} if model.training and getattr(model, AUX_ATTR, 0.0) else {}


def add_router_aux(loss_sum, output, n: int, model: nn.Module):
    """Returns loss_sum + weight · aux_loss · n (loss_sum is a sum over n target tokens) when it applies."""
    coef = getattr(model, AUX_ATTR, 0.0)
    aux = getattr(output, "aux_loss", None)
    if not (model.training and coef) or aux is None:
        return loss_sum
    return loss_sum + coef * aux.to(loss_sum.dtype) * n
