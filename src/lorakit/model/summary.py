"""Counting a model's parameters: trainable vs total, and a table of its LoRA modules per kind."""
from __future__ import annotations

from collections import Counter

from torch import nn

from lorakit.layers import LoraLayer, LoraParam, ModulesToSave
from lorakit.model.targets import base_of
from lorakit.ops.nf4 import numel_4bit_aware
from lorakit.ops.nf4_experts import quantized_numel


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Returns (trainable, total) parameter counts; shared tensors are counted once."""
    trainable = total = 0
    for p in model.parameters():
        n = numel_4bit_aware(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total + quantized_numel(model)  # 4-bit MoE experts are buffers: counted as their weights


def summary(model: nn.Module) -> str:
    """Returns a printable table of LoRA modules per kind with their trainable parameters."""
    kinds: Counter = Counter()
    params: Counter = Counter()
    for _, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inner = base_of(module) if isinstance(module, LoraLayer) else module.original_module
            if isinstance(module, LoraParam):  # a parameter target: the module kind and the parameter
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
