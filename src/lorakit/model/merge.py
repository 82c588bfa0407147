"""Fold adapters into the base weights and take the wrappers out: merge, unmerge, merge_and_unload, unload.

All arithmetic is fp32. On a 4-bit base, merge_and_unload returns a dequantized model (exact), or re-quantizes
on request and warns with the logit change that costs (RequantizationWarning).
"""
from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.model.mixed_batch import remove_mixed_batch_hook
from lorakit.model.quantize import dequantize, is_quantized
from lorakit.model.state import lora_layers, set_adapter_configs, set_submodule
from lorakit.ops.nf4 import dequantize_weight, is_quantized_layer, roundtrip
from lorakit.ops.nf4_experts import NF4Experts


class RequantizationWarning(UserWarning):
    """Re-quantizing merged weights changed the model's outputs (the message says by how much)."""


def _untie_shared_weights(model: nn.Module) -> None:
    # A merged weight that another module shares (GPT-2's wte is also lm_head) would change that module
    # too; give the LoRA layer its own copy first so only the adapted layer sees the update.
    owners = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    for _, layer in lora_layers(model):
        if not hasattr(layer.base_layer, "weight"):  # parameter targets (LoraParam) hold a module with no .weight
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


def unwrap(model: nn.Module, do_merge: bool) -> nn.Module:
    """Returns `model` with every wrapper replaced by its base layer (merged first when do_merge) and no lorakit state."""
    if do_merge:
        _untie_shared_weights(model)
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(p) for p in replaced):  # nested parameter wrappers go with their outer one
            continue
        if isinstance(module, LoraLayer):
            inner = module
            while isinstance(inner, LoraLayer):
                inner.merge() if do_merge else inner.unmerge()
                inner = inner.base_layer
            set_submodule(model, name, inner)
            replaced.append(name + ".")
        elif isinstance(module, ModulesToSave):
            keep = module.active_module() if do_merge else module.original_module
            for p in keep.parameters():
                p.requires_grad_(False)
            set_submodule(model, name, keep)
    set_adapter_configs(model, {})
    remove_mixed_batch_hook(model)
    return model


def merge_and_unload(model: nn.Module, requantize: bool = False, example_inputs=None) -> nn.Module:
    """Returns the plain model with the active adapters folded into W0 and no lorakit modules left.

    On a 4-bit base the model comes back dequantized, or re-quantized with a warning giving the measured
    logit change when requantize=True (merge_and_unload_quantized).
    """
    if is_quantized(model):
        return merge_and_unload_quantized(model, requantize=requantize, example_inputs=example_inputs)
    return unwrap(model, do_merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Returns the plain base model: adapters dropped (unmerged first if they were merged)."""
    return unwrap(model, do_merge=False)


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"merge_and_unload: cannot find logits in the model output ({type(out).__name__})")


def default_example_inputs(model: nn.Module, length: int = 32, seed: int = 0) -> torch.Tensor | None:
    """Returns fixed random token ids (1, length) for a language model (config.vocab_size), else None."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        return None
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=g).to(device)


@torch.no_grad()
def _run(model: nn.Module, inputs) -> torch.Tensor:
    if isinstance(inputs, dict):
        return _logits(model(**inputs)).float()
    if isinstance(inputs, (tuple, list)):
        return _logits(model(*inputs)).float()
    return _logits(model(inputs)).float()


def merge_and_unload_quantized(model: nn.Module, requantize: bool = False, example_inputs=None) -> nn.Module:
    """Returns the plain model with the active adapters merged in fp32: dequantized, or re-quantized on request.

    requantize=False: every 4-bit layer becomes an nn.Linear holding dequant(W0) + s·B·A (exact merge).
    requantize=True: merged weights are quantized again; that rounds the adapter's update away in part, so a
    RequantizationWarning states the max |logit| change measured on `example_inputs` (default: fixed random
    token ids when the model has config.vocab_size; else the max weight change is reported instead).
    """
    if not requantize:
        return unwrap(dequantize(model), do_merge=True)
    inputs = example_inputs if example_inputs is not None else default_example_inputs(model)
    was_training = model.training
    model.eval()
    before = _run(model, inputs) if inputs is not None else None
    weight_change = 0.0
    if inputs is None:  # no way to run the model: measure what re-quantization does to the weights instead
        for _, layer in lora_layers(model):
            if is_quantized_layer(layer.base_layer) and layer.live:
                exact = dequantize_weight(layer.base_layer) + sum(layer.delta_weight(n) for n in layer.live)
                weight_change = max(weight_change, (exact - roundtrip(layer.base_layer, exact)).abs().max().item())
            elif isinstance(layer.base_weight, NF4Experts) and layer.live:  # 4-bit MoE expert tensors
                exact = layer.read_base_fp32() + sum(layer.delta_weight(n) for n in layer.live)
                change = (exact - layer.base_weight.roundtrip(exact).float()).abs().max().item()
                weight_change = max(weight_change, change)
    model = unwrap(model, do_merge=True)  # LoraLinear merges through requantize_weight
    if before is not None:
        after = _run(model, inputs)
        diff = (after - before).abs().max().item()
        what = (f"max |logit difference| = {diff:.4g} on the example inputs "
                f"(logits span ±{before.abs().max().item():.3g})")
    else:
        what = f"max |weight difference| = {weight_change:.4g} (pass example_inputs to measure logits)"
    msg = f"merge_and_unload(requantize=True): re-quantizing the merged weights to 4 bits changes outputs: {what}"
    warnings.warn(msg, RequantizationWarning, stacklevel=2)
    model.train(was_training)
    return model
