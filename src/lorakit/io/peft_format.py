"""Adapters on disk, in PEFT's format: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's (`base_model.model.<module>.lora_A.weight`, `...lora_embedding_A`, `...lora_magnitude_vector`,
`base_model.model.<modules_to_save module>.<param>`; parameter targets as PEFT's ParamWrapper names them,
`...mlp.experts[.base_layer].lora_A.weight`), so an adapter written here loads in PEFT, vLLM and
llama.cpp's converter, and one written by PEFT loads here. Writes are atomic (lorakit.io.atomic: temporary folder, fsync,
rename): an interrupted save never leaves a half-written adapter. Loading validates everything before it
touches the model, so a bad file leaves the model unchanged.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.config import LoraConfig, alpha_for_scale
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.io.atomic import atomic_write_dir
from lorakit.layers import LoraLayer, LoraLinear, LoraMergedLinear, LoraParam, ModulesToSave
from lorakit.layers.param import owner_of
from lorakit.layers.registry import KINDS, kind_of_base, kind_of_layer
from lorakit.model.inject import inject, wrapper_paths
from lorakit.model.state import active_adapters, adapter_configs, check_adapter_name, lora_layers, set_adapter
from lorakit.model.targets import (base_of, drop_inside_saved, expand_all_linear, find_parameter_targets,
                                   find_targets, matching_modules, output_head, plain_modules, skipped_linears,
                                   split_linear_weights)
from lorakit.ops.nf4 import numel_4bit_aware
from lorakit.ops.nf4_experts import quantized_numel
from lorakit.variants.init import BASE_INITS

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def write_adapter(directory: str | os.PathLike, config: LoraConfig | dict, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> Path:
    """Writes a PEFT-format adapter folder atomically; returns its path."""
    cfg = config.to_peft_dict() if isinstance(config, LoraConfig) else dict(config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {})}

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
    return atomic_write_dir(directory, write)


# ---------------------------------------------------------------------------- reading
def read_adapter(directory: str | os.PathLike, allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Returns (config, tensors keyed as in PEFT's file) of an adapter folder, after checking the files."""
    config_dict, tensors, _ = _read(directory, allow_pickle)
    return _config_from(config_dict, directory), tensors


def read_metadata(directory: str | os.PathLike) -> dict[str, str]:
    """Returns the safetensors metadata of an adapter (lorakit stores the base model's identity there)."""
    from safetensors import safe_open
    try:
        with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, FileNotFoundError):
        return {}


def _config_from(config_dict: dict, directory) -> LoraConfig:
    try:
        return LoraConfig.from_peft_dict(config_dict)
    except (ConfigError, TypeError) as e:
        raise AdapterFileError(f"{Path(directory) / CONFIG_NAME}: {e}") from None


def _read(directory, allow_pickle: bool):
    d = Path(directory)
    if not d.exists():
        raise AdapterFileError(f"adapter folder {d} does not exist")
    if not d.is_dir():
        raise AdapterFileError(f"{d} is a file; an adapter is a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    cfg_path = d / CONFIG_NAME
    if not cfg_path.exists():
        raise AdapterFileError(f"{d} has no {CONFIG_NAME}: not an adapter folder (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config_dict = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(config_dict, dict):
        raise AdapterFileError(f"{cfg_path} must hold a JSON object, got {type(config_dict).__name__}")
    weights = d / WEIGHTS_NAME
    metadata = {}
    if weights.exists():
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterFileError(f"{weights} is corrupted or truncated and cannot be read ({e}); "
                                   f"save the adapter again or restore it from a copy") from None
        metadata = read_metadata(d)
    elif (d / PICKLE_NAME).exists():
        if not allow_pickle:
            raise AdapterFileError(
                f"{d / PICKLE_NAME} is a pickle file, which can run arbitrary code when loaded; lorakit reads "
                f"safetensors only. Convert it where you trust it, or pass allow_pickle=True "
                f"(CLI: --allow-pickle) to read it with torch.load(weights_only=True).")
        try:
            tensors = torch.load(d / PICKLE_NAME, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses code-carrying pickles; say so plainly
            raise AdapterFileError(f"{d / PICKLE_NAME} was refused by the safe loader ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200]})") from None
    else:
        raise AdapterFileError(f"{d} has no {WEIGHTS_NAME}")
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterFileError(f"{d}: the weights file does not hold a mapping of names to tensors")
    return config_dict, tensors, metadata


# ---------------------------------------------------------------------------- model -> tensors
def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Returns the adapter's tensors keyed exactly as PEFT saves them."""
    config = adapter_configs(model)[adapter_name]
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        key = PREFIX + name
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            key_a, key_b = kind_of_layer(module).keys
            out[key + key_a], out[key + key_b] = module.factors(adapter_name)
            if module.use_dora[adapter_name]:
                out[key + ".lora_magnitude_vector"] = module.lora_magnitude_vector[adapter_name]
            if config.bias != "none" and getattr(module.base_layer, "bias", None) is not None:
                out[key + ".base_layer.bias"] = module.base_layer.bias
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for pname, p in module.modules_to_save[adapter_name].named_parameters():
                out[f"{key}.{pname}"] = p
    if config.bias == "all":
        for pname, p in _plain_named_parameters(model):
            if pname.endswith("bias") and PREFIX + pname not in out:
                out[PREFIX + pname] = p
    return {k: v.detach() for k, v in out.items()}


def _plain_named_parameters(model):
    for mname, module in plain_modules(model):
        if isinstance(module, (LoraLayer, ModulesToSave)):
            continue
        for pname, p in module.named_parameters(recurse=False):
            yield (f"{mname}.{pname}" if mname else pname), p


# Leaf names that PEFT's transformers-v5 conversion re-targets to expert parameters on MoE models whose checkpoint
# conversion is "mixtral" or "qwen2_moe" (transformers.conversion_mapping): such a module in target_modules would
# not be adapted by PEFT, so lorakit writes it as a `<module>.weight` target parameter (same layer, same keys).
_PEFT_CONVERTED_LEAVES = {"gate", "router", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"}


def _peft_converts(model: nn.Module) -> bool:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as patterns
    except ImportError:
        return False
    return model_type is not None and patterns.get(model_type, model_type) in ("mixtral", "qwen2_moe")


def peft_targets(model: nn.Module, config: LoraConfig, adapter_name: str) -> LoraConfig:
    """Returns the config to write for PEFT: all-linear spelled out where PEFT would resolve it differently
    (MoE models, skipped nn.Linear subclasses), and modules PEFT's v5 conversion would re-target written as
    `.weight` target parameters."""
    layers = [(n, l) for n, l in lora_layers(model) if adapter_name in l.r]
    has_params = any(isinstance(l, LoraParam) for _, l in layers)
    converted = _peft_converts(model)
    if not (has_params or converted or (config.target_modules == "all-linear" and skipped_linears(model))):
        return config
    config = copy.deepcopy(config)
    modules = sorted(n for n, l in layers if not isinstance(l, LoraParam))
    as_params = [n for n in modules if converted and n.rsplit(".", 1)[-1] in _PEFT_CONVERTED_LEAVES
                 and isinstance(model.get_submodule(n), LoraLinear)]
    if config.target_modules == "all-linear" or as_params:
        config.target_modules = [n for n in modules if n not in as_params] or None
    if as_params:
        config.target_parameters = sorted(set(config.target_parameters or []) | {n + ".weight" for n in as_params})
    return config


def _export_config(model: nn.Module, adapter_name: str) -> LoraConfig:
    # Fused-slice layers are saved as the equivalent plain LoRA of rank r·n with the same scale.
    config = copy.deepcopy(peft_targets(model, adapter_configs(model)[adapter_name], adapter_name))
    for name, module in model.named_modules():
        if isinstance(module, LoraMergedLinear) and adapter_name in module.r:
            n = sum(module.enable_lora)
            r = module.r[adapter_name]
            key = "^" + name.replace(".", r"\.") + "$"
            config.rank_pattern[key] = r * n
            config.alpha_pattern[key] = alpha_for_scale(module.scaling[adapter_name], r * n, config.use_rslora)
    return config


def base_identity(model: nn.Module) -> dict:
    """Returns what identifies a base model: class, name or path, parameter count, config shape fields."""
    cfg = getattr(model, "config", None)
    ident = {"architecture": type(model).__name__}
    if cfg is not None:
        ident["name_or_path"] = getattr(cfg, "_name_or_path", "") or ""
        for field in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "n_embd", "n_layer"):
            if getattr(cfg, field, None) is not None:
                ident[field] = getattr(cfg, field)
    base = sum(numel_4bit_aware(p) for n, p in model.named_parameters()
               if "lora_" not in n and ".modules_to_save." not in n)
    ident["base_parameters"] = int(base + quantized_numel(model))  # 4-bit MoE experts count as their weights
    return ident


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Writes adapter `adapter_name` as PEFT does (config + safetensors), atomically; returns the folder."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(f"no adapter named {adapter_name!r} to save; this model has: {', '.join(configs) or 'none'}")
    config = _export_config(model, adapter_name)
    ident = base_identity(model)
    if not config.base_model_name_or_path and ident.get("name_or_path"):
        config.base_model_name_or_path = ident["name_or_path"]
    peft = config.to_peft_dict()
    peft["inference_mode"] = True
    metadata = {"lorakit.base_model": json.dumps(ident, sort_keys=True), "lorakit.adapter_name": adapter_name}
    return write_adapter(directory, peft, adapter_state_dict(model, adapter_name), metadata)


# ---------------------------------------------------------------------------- tensors -> model
def _expected_shapes(module: nn.Module, r: int, use_dora: bool) -> dict[str, tuple]:
    kind = kind_of_base(base_of(module))
    return kind.shapes(base_of(module), r, use_dora) if kind is not None else {}


def _param_shapes(model: nn.Module, config: LoraConfig, params: list[tuple[str, str]]):
    # [(wrapper name, {key suffix: shape}, r)] of the parameter targets, in PEFT's ParamWrapper layout.
    kind = next(k for k in KINDS if k.name == "param")
    out = []
    for (mname, pname), path in wrapper_paths(model, params).items():
        r = config.rank_for(f"{mname}.{pname}")
        probe = LoraParam(owner_of(model.get_submodule(mname)), pname)  # shapes only; not put in the model
        out.append((path, kind.shapes(probe, r), r))
    return out


def _plan_load(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], where: str):
    """Checks every key and shape against the model; returns {key: (module name, kind)}; raises on any problem."""
    bad_prefix = [k for k in tensors if not k.startswith(PREFIX)]
    if bad_prefix:
        raise AdapterFileError(f"{where}: keys must start with {PREFIX!r}; first offending keys: {bad_prefix[:3]}")
    keys = {k[len(PREFIX):]: k for k in tensors}
    try:
        config = expand_all_linear(model, config)
        linear_params, param_targets = split_linear_weights(model, find_parameter_targets(model, config))
        targets = find_targets(model, config)
        targets += [n for n in linear_params if n not in targets]
        targets = drop_inside_saved(targets, matching_modules(model, config.modules_to_save))
        expected = [(name, _expected_shapes(model.get_submodule(name), config.rank_for(name), config.use_dora),
                     config.rank_for(name)) for name in targets]
        expected += _param_shapes(model, config, param_targets)
    except ConfigError as e:
        raise AdapterFileError(f"{where}: this adapter does not fit the model: {e}") from None
    plan: dict[str, tuple[str, str]] = {}
    problems, missing = [], []
    for name, shapes, r in expected:
        for suffix, shape in shapes.items():
            key = name + suffix
            if key not in keys:
                missing.append(PREFIX + key)
                continue
            got = tuple(tensors[keys[key]].shape)
            if got != shape:
                if suffix in (".lora_A.weight", ".lora_embedding_A") and got[1:] == shape[1:]:
                    problems.append(f"{PREFIX + key}: rank {got[0]} in the file but the config says r={r}")
                else:
                    problems.append(f"{PREFIX + key}: shape {got} but the model needs {shape} "
                                    f"(was the adapter trained for a different base model?)")
            plan[keys[key]] = (name, suffix)
    to_save = matching_modules(model, config.modules_to_save)
    params = dict(_plain_named_parameters(model))
    embed_modules = {id(m) for m in (_call(model, "get_input_embeddings"), output_head(model)) if m is not None}
    embed_params = {f"{n}.weight": m.weight for n, m in plain_modules(model)
                    if id(base_of(m)) in embed_modules or id(m) in embed_modules
                    for m in [base_of(m)] if getattr(m, "weight", None) is not None}
    for key in keys:
        full = keys[key]
        if full in plan:
            continue
        owner = next((n for n in to_save if key.startswith(n + ".")), None)
        pkey = key.replace(".base_layer.", ".")
        if owner is not None:
            sub = key[len(owner) + 1:]
            mod = model.get_submodule(owner)
            mod = mod.original_module if isinstance(mod, ModulesToSave) else mod
            ref = dict(mod.named_parameters()).get(sub)
            if ref is None:
                problems.append(f"{full}: {owner} (modules_to_save) has no parameter {sub!r}")
            elif tuple(ref.shape) != tuple(tensors[full].shape):
                problems.append(f"{full}: shape {tuple(tensors[full].shape)} but the model needs {tuple(ref.shape)}")
            plan[full] = (owner, "save:" + sub)
        elif pkey in embed_params:
            # PEFT saves whole embedding matrices next to an adapter that targets them (resized vocabularies)
            if tuple(embed_params[pkey].shape) != tuple(tensors[full].shape):
                problems.append(f"{full}: shape {tuple(tensors[full].shape)} but the model's embedding is "
                                f"{tuple(embed_params[pkey].shape)} (different vocabulary?)")
            plan[full] = (pkey, "embed")
        elif config.bias != "none" and key.endswith("bias") and (pkey in params or key in params):
            ref = params.get(pkey, params.get(key))
            if tuple(ref.shape) != tuple(tensors[full].shape):
                problems.append(f"{full}: shape {tuple(tensors[full].shape)} but the model needs {tuple(ref.shape)}")
            plan[full] = (pkey if pkey in params else key, "bias")
        else:
            problems.append(f"{full}: unexpected key (no such LoRA target or saved module in {type(model).__name__})")
    if missing:
        problems.insert(0, f"missing keys for targeted modules: {', '.join(missing[:3])}"
                           + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if problems:
        raise AdapterFileError(f"{where}: the adapter does not fit this model; "
                               + "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""))
    return plan


def _call(model, method):
    fn = getattr(model, method, None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        return None


def _check_identity(model: nn.Module, metadata: dict[str, str], where: str) -> None:
    saved = metadata.get("lorakit.base_model")
    if not saved:
        return
    try:
        ident = json.loads(saved)
    except json.JSONDecodeError:
        return
    here = base_identity(model)
    for field in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if field in ident and field in here and ident[field] != here[field]:
            raise AdapterFileError(f"{where}: wrong base model: the adapter was trained on a base with "
                                   f"{field}={ident[field]} ({ident.get('name_or_path') or ident.get('architecture')}) "
                                   f"but this model has {field}={here[field]}")


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 allow_pickle: bool = False, is_trainable: bool = False, activate: bool | None = None) -> nn.Module:
    """Loads an adapter saved by lorakit or PEFT into `model` (injecting it) and returns the model.

    Everything is checked before the model is touched. The adapter is activated when it is the model's first
    one (or when activate=True) and trainable only when is_trainable=True.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise ConfigError(f"adapter {adapter_name!r} is already loaded; delete it first or choose another name")
    config_dict, tensors, metadata = _read(directory, allow_pickle)
    config = _config_from(config_dict, directory)
    config.inference_mode = not is_trainable
    where = str(directory)
    _check_identity(model, metadata, where)
    plan = _plan_load(model, config, tensors, where)
    previous = active_adapters(model)
    init = config.init_lora_weights
    # Factors are overwritten below; pissa/olora must still run to give the same residual base as training had.
    config.init_lora_weights = init if init in BASE_INITS else "kaiming"
    inject(model, config, adapter_name)
    config.init_lora_weights = init
    params = dict(model.named_parameters())
    with torch.no_grad():
        for full, (name, kind) in plan.items():
            t = tensors[full]
            module = model.get_submodule(name) if kind not in ("bias", "embed") else None
            if kind.startswith("save:"):
                dst = dict(module.modules_to_save[adapter_name].named_parameters())[kind[5:]]
            elif kind in ("bias", "embed"):
                owner, _, leaf = name.rpartition(".")
                wrapped = f"{owner}.base_layer.{leaf}"
                dst = params.get(wrapped, params.get(name))
            elif kind == ".lora_magnitude_vector":
                dst = module.lora_magnitude_vector[adapter_name]
            else:
                A, B = module.factors(adapter_name)
                dst = A if kind in (".lora_A.weight", ".lora_embedding_A") else B
            dst.copy_(t.to(dtype=dst.dtype, device=dst.device))
    if activate or (activate is None and not previous):
        set_adapter(model, adapter_name)
    else:
        set_adapter(model, list(previous))
    return model
