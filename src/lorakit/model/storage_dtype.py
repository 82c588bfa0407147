"""Big frozen tables kept in their stored dtype while the model computes in another (fp32 on a CPU without
bf16 arithmetic): the embedding returns its rows upcast, the output head upcasts its weight block by block.

    embed_tokens  (V, k) bf16   ids -> rows -> .to(fp32)                 only the looked-up rows are converted
    lm_head       (V, k) bf16   x (fp32) -> x·W[block]ᵀ, block by block    lorakit.ops.upcast, never W.float()

The modules keep their classes' state (same parameters, names, state_dict, isinstance nn.Embedding/nn.Linear);
only their forward changes. An 8B model with a 49k vocabulary saves 0.75 GiB this way (bf16 instead of fp32),
and with the streaming loader the bf16 tables are views of the checkpoint's memory map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.ops.upcast import upcast_linear


class UpcastEmbedding(nn.Embedding):
    """nn.Embedding whose output is cast to `compute_dtype` (set by keep_storage_dtype)."""

    compute_dtype = torch.float32

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        return out.to(self.compute_dtype)


class UpcastLinear(nn.Linear):
    """A frozen nn.Linear (the output head) that multiplies inputs of a wider dtype without a wide weight copy."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype == self.weight.dtype:
            return F.linear(input, self.weight, self.bias)
        return upcast_linear(input, self.weight, self.bias)


def keep_storage_dtype(modules, compute_dtype: torch.dtype = torch.float32) -> int:
    """Makes each nn.Embedding / nn.Linear in `modules` compute in `compute_dtype` over its stored weight (see
    the module docstring); returns how many changed. Other modules are left alone."""
    n = 0
    for m in modules:
        if type(m) is nn.Embedding:
            m.__class__ = UpcastEmbedding
            m.compute_dtype = compute_dtype
            n += 1
        elif type(m) is nn.Linear:
            m.__class__ = UpcastLinear
            n += 1
    return n


def is_plain_head(module: nn.Module) -> bool:
    """True for an nn.Linear output head whose forward is a plain linear map (nn.Linear or UpcastLinear)."""
    return type(module) in (nn.Linear, UpcastLinear)
