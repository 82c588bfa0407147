"""Quantize a whole model's frozen base to 4 bits (NF4, round-to-nearest or GPTQ) and back.

`quantize(model)` swaps nn.Linear layers (not embeddings, norms, MoE routers or the output head) for
bitsandbytes `Linear4bit` and stores routed experts' 3-D tensors as NF4 per expert (lorakit.ops.nf4_experts),
before or after `lorakit.inject` (a wrapper's base layer is swapped under it). With calibration inputs the codes are chosen by GPTQ (lorakit.ops.gptq). One weight at a time is lorakit.ops.nf4's job.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.layers.param import owner_of
from lorakit.model.state import set_submodule
from lorakit.model.targets import expert_modules, is_router, output_head_names
from lorakit.ops.gptq import HessianCollector, hessian_bytes, run_calibration
from lorakit.ops.nf4 import (QUANT_TYPES, dequantize_linear, is_quantized_layer, quantize_linear, release_freed_memory,
                             require_backend)
from lorakit.ops.nf4_experts import dequantize_experts, quantize_experts, quantized_experts


def _named_in(name: str, spec: str) -> bool:
    # "mlp" skips model.layers.0.mlp.up_proj; "layers.0" skips everything under layer 0; whole dotted parts only.
    return f".{spec}." in f".{name}."


def _quantizable(model: nn.Module, skip) -> list[tuple[str, nn.Module, nn.Module]]:
    """Returns (name, owner, linear) for each plain nn.Linear to quantize; owner is its parent or LoRA wrapper."""
    heads = output_head_names(model)
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    found, inside = [], []
    moe = bool(expert_modules(model))
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, LoraLayer):
            inside.append(name + ".")  # only its base layer, never the trainable factors
            base = module.base_layer
            # Exactly nn.Linear: subclasses (e.g. attention's out_proj) are read through .weight by their owner.
            if type(base) is nn.Linear and not getattr(module, "fan_in_fan_out", False):
                found.append((name, module, base))
            continue
        if isinstance(module, ModulesToSave):
            inside.append(name + ".")  # trainable copies stay full precision
            continue
        if type(module) is nn.Linear and not (moe and is_router(name, module)):  # a router picks experts: exact
            found.append((name, None, module))
    return [(n, o, m) for n, o, m in found
            if n not in heads and not any(_named_in(n, s) for s in skip)]


def _replace(model: nn.Module, name: str, owner: nn.Module | None, new: nn.Module) -> None:
    if owner is not None:  # a LoRA wrapper: it swaps its base layer and re-decides whether the fused path applies
        owner.replace_base(new)
        return
    set_submodule(model, name, new)


def quantize(model: nn.Module, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, skip: list[str] | str | None = None,
             block_size: int = 64, calibration=None, damp: float = 0.01,
             hessian_budget: int = 256 * 2 ** 20) -> nn.Module:
    """Returns `model` with its nn.Linear layers replaced in place by 4-bit bitsandbytes Linear4bit layers.

    Embeddings, norms, MoE routers and the output head (`get_output_embeddings()` / `lm_head`) stay in full
    precision, as do modules whose dotted name contains an entry of `skip` and LoRA factors. Routed experts'
    3-D tensors are stored NF4 per expert (lorakit.ops.nf4_experts; round to nearest, also with calibration). Works before and after
    `lorakit.inject` (a LoRA wrapper's base layer is quantized under it). Quantization runs on each weight's
    own device: move the model to CUDA first to quantize there.

    calibration: None rounds each weight to its nearest NF4 value (QLoRA). An iterable of model inputs (token
    id tensors, or dicts of model inputs) chooses the codes with GPTQ instead (lorakit.ops.gptq): same format and
    bits, less change in each layer's output. `hessian_budget` bounds the bytes of XᵀX held at once (layers
    are quantized a group at a time, one calibration pass per group); `damp` is GPTQ's diagonal damping.
    """
    if bits != 4:
        raise ConfigError(f"quantize: bits={bits} is not supported; lorakit quantizes frozen bases to 4 bits")
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quantize: quant_type={quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
    if block_size not in (64, 128, 256, 512, 1024, 2048, 4096):
        raise ConfigError(f"quantize: block_size={block_size}; use a power of two from 64 to 4096")
    targets = _quantizable(model, skip)
    for device in {str(m.weight.device) for _, _, m in targets}:
        require_backend(device)
    if calibration is None:
        for name, owner, linear in targets:
            _replace(model, name, owner, quantize_linear(linear, quant_type, double_quant, compute_dtype, block_size))
    else:
        _quantize_gptq(model, targets, calibration, quant_type, double_quant, compute_dtype, block_size, damp,
                       hessian_budget)
    experts = _quantize_experts(model, skip, quant_type, double_quant, block_size)
    if targets or experts:
        release_freed_memory()
    return model


def _quantize_experts(model: nn.Module, skip, quant_type: str, double_quant: bool, block_size: int) -> int:
    # Routed experts' 3-D tensors: NF4 per expert (lorakit.ops.nf4_experts), rounded to nearest also under GPTQ
    # (its Hessians are per linear layer). The router is an ordinary module and stays full precision.
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    done = 0
    for name, pnames in expert_modules(model):
        owner = owner_of(model.get_submodule(name))
        if any(_named_in(name, s) for s in skip):
            continue
        for pname in pnames:
            if pname in owner._parameters and not any(_named_in(f"{name}.{pname}", s) for s in skip):
                require_backend(owner._parameters[pname].device)
                quantize_experts(owner, pname, quant_type, double_quant, block_size)
                done += 1
    return done


def _quantize_gptq(model, targets, calibration, quant_type, double_quant, compute_dtype, block_size, damp, budget):
    calibration = list(calibration)
    if not calibration:
        raise ConfigError("quantize: calibration is empty; give some model inputs, or calibration=None")
    partial = [name for name, _, linear in targets if linear.in_features % block_size]
    if partial:  # GPTQ works on whole blocks per row; bitsandbytes' blocks of these layers straddle rows
        warnings.warn(f"quantize: {len(partial)} layer(s) have in_features not a multiple of block_size={block_size} "
                      f"(e.g. {partial[0]}); they are rounded to nearest instead of GPTQ", stacklevel=3)
    was_training = model.training
    model.eval()
    try:
        i = 0
        while i < len(targets):
            group, used = [], 0
            while i < len(targets) and (not group or used + hessian_bytes(targets[i][2]) <= budget):
                group.append(targets[i])
                used += hessian_bytes(targets[i][2])
                i += 1
            # the input reaches the LoRA wrapper (its fused path reads the base weight without calling it)
            collector = HessianCollector({name: owner if owner is not None else linear for name, owner, linear in group})
            try:
                run_calibration(model, calibration)
            finally:
                collector.remove()
            for name, owner, linear in group:
                hessian = collector.h.pop(name, None)  # None: never called on calibration data -> nearest rounding
                if name in partial:
                    hessian = None
                _replace(model, name, owner, quantize_linear(linear, quant_type, double_quant, compute_dtype,
                                                             block_size, hessian, damp))
    finally:
        model.train(was_training)


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Returns `model` with every 4-bit linear layer replaced in place by an nn.Linear (dequantized weight)."""
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and is_quantized_layer(module.base_layer):
            swaps.append((name, module, module.base_layer))
        elif is_quantized_layer(module) and not name.endswith("base_layer"):
            swaps.append((name, None, module))
    for name, owner, layer in swaps:
        _replace(model, name, owner, dequantize_linear(layer, dtype))
    for module in list(model.modules()):
        dequantize_experts(module, dtype)
    return model


def is_quantized(model: nn.Module) -> bool:
    """Returns True when any layer of `model` has a 4-bit weight (4-bit expert tensors included)."""
    return any(is_quantized_layer(m) or quantized_experts(m) for m in model.modules())
