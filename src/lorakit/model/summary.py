"""Counting a model's parameters: trainable vs total, and a table of its LoRA modules per kind."""
from __future__ import annotations

from collections import Counter

from torch import nn

from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.model.targets import base_of
from lorakit.ops.nf4 import numel_4bit_aware


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Returns (trainable, total) parameter counts; shared tensors are counted once."""
    trainable = total = 0
    for p in model.parameters():
        n = numel_4bit_aware(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def summary(model: nn.Module) -> str:
    """Returns a printable table of LoRA modules per kind with their trainable parameters."""
    kinds: Counter = Counter()
    params: Counter = Counter()
    for _, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            kind = f"{type(module).__name__}({type(base_of(module) if isinstance(module, LoraLayer) else module.original_module).__name__})"
            kinds[kind] += 1
            params[kind] += sum(p.numel() for p in module.parameters() if p.requires_grad)
    trainable, total = trainable_parameters(model)
    lines = [f"{'module kind':<40} {'count':>6} {'trainable params':>18}"]
    lines += [f"{k:<40} {kinds[k]:>6} {params[k]:>18,}" for k in sorted(kinds)]
    lines.append(f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.4f}%)")
    return "\n".join(lines)
