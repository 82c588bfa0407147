"""LoRA on nn.Conv1d / Conv2d / Conv3d: A is a conv with the base kernel, B a 1×1 conv.

    h = conv(x, W0) + s·conv(conv(x, A), B)      A: r×C_in×k..., B: C_out×r×1...

The update's weight is B·A with the kernel dims kept: ΔW[o, i, ...] = s·Σ_j B[o, j]·A[j, i, ...].
"""
from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers.base import LoraLayer

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class LoraConv(LoraLayer):
    """LoRA around an nn.Conv1d, nn.Conv2d or nn.Conv3d (groups == 1)."""

    kind = "conv"

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ConfigError(f"{type(base_layer).__name__} with groups={base_layer.groups}: LoRA supports groups=1 only")
        self.ndim = base_layer.weight.dim() - 2
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def create_factors(self, name: str, r: int) -> None:
        b, conv = self.base_layer, _CONV[self.ndim]
        self.lora_A[name] = conv(b.in_channels, r, b.kernel_size, b.stride, b.padding, b.dilation,
                                 bias=False, padding_mode=b.padding_mode)
        self.lora_B[name] = conv(r, b.out_channels, 1, 1, bias=False)

    def factors(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.factors(name)
        r = self.r[name]
        dense = B.detach().float().reshape(-1, r) @ A.detach().float().reshape(r, -1)
        return self.scaling[name] * dense.reshape(self.base_layer.weight.shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        live = self.live
        result = self.base_layer(x, *args, **kwargs)
        if not live:
            return result
        for name in live:
            lx = self._dropout(name, x)
            lx = x if lx is None else lx
            A = self.lora_A[name]
            upd = self.lora_B[name](A(lx.to(A.weight.dtype))) * self.scaling[name]
            if self.row_adapters is not None:
                mask = torch.tensor([n == name for n in self.row_adapters], device=x.device)
                upd = upd * mask.view(-1, *([1] * (upd.dim() - 1)))
            result = result + upd.to(result.dtype)
        return result
