"""LoRA on linear maps: nn.Linear, GPT-2's Conv1D (fan_in_fan_out), fused-slice projections, 4-bit bases.

    h = W0·x + s·B·(A·x)            A: r×k (kaiming-uniform), B: d×r (zero), s = alpha/r

A and B have the same layout whatever the base stores: only merging needs to know that Conv1D keeps its
weight as k×d (`fan_in_fan_out`). DoRA rescales each output row by m / ||W0 + s·B·A||.
"""
from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers.base import LoraLayer
from lorakit.ops.lora import lora_delta, lora_linear, lora_update
from lorakit.ops.nf4 import dequantize_weight, fused_weight, is_4bit, requantize_weight


def linear_shape(base: nn.Module) -> tuple[int, int, bool]:
    """Returns (in_features, out_features, fan_in_fan_out) of a linear-like base layer."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight is (in, out)
        k, d = base.weight.shape
        return k, d, True
    if hasattr(base, "in_features") and hasattr(base, "out_features"):  # bitsandbytes Linear4bit/8bit
        return base.in_features, base.out_features, False
    raise ConfigError(f"{type(base).__name__} is not a linear layer")


class LoraLinear(LoraLayer):
    """LoRA around a linear-like base layer (nn.Linear, Conv1D, bitsandbytes Linear4bit)."""

    kind = "linear"
    base_init = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool | None = None):
        super().__init__(base_layer)
        self.in_features, self.out_features, detected = linear_shape(base_layer)
        self.fan_in_fan_out = detected if fan_in_fan_out is None else fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.fusable = self.fusable_base(base_layer)

    def fusable_base(self, base_layer: nn.Module) -> bool:
        """Returns True when the fused kernel can read `base_layer`'s W0 in (d, k) layout: a plain float weight,
        or a bitsandbytes 4-bit one it dequantizes itself (not Conv1D's (k, d) weights)."""
        weight = getattr(base_layer, "weight", None)
        return (isinstance(base_layer, nn.Linear) and not self.fan_in_fan_out
                and (type(weight) in (torch.Tensor, nn.Parameter) or is_4bit(weight)))

    def replace_base(self, new: nn.Module) -> None:
        self.base_layer = new
        self.fusable = self.fusable_base(new)

    # ---------------------------------------------------------------- creation
    def create_factors(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def factors(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    # ---------------------------------------------------------------- weights
    def dense_weight_fp32(self) -> torch.Tensor:
        """Returns W0 as an fp32 (d, k) tensor (dequantized for 4-bit bases)."""
        if is_4bit(self.base_weight):
            return dequantize_weight(self.base_layer).float()
        w = self.base_weight.detach().float()
        return w.t() if self.fan_in_fan_out else w

    def to_base_layout(self, w: torch.Tensor) -> torch.Tensor:
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.factors(name)
        return self.to_base_layout(self.scaling[name] * (B.detach().float() @ A.detach().float()))

    def read_base_fp32(self) -> torch.Tensor:
        if is_4bit(self.base_weight):
            return self.to_base_layout(self.dense_weight_fp32())
        return super().read_base_fp32()

    def write_base_fp32(self, w32: torch.Tensor) -> None:
        if is_4bit(self.base_weight):
            requantize_weight(self.base_layer, self.to_base_layout(w32))
        else:
            super().write_base_fp32(w32)

    # ---------------------------------------------------------------- forward (the hot path)
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        live = self.live
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._mixed_forward(x)
        if self.shared_group is not None and not args and not kwargs:
            out = self.shared_group(self, x)
            if out is not None:
                return out
        first = live[0]
        weight = self.fused_weight(x, first)
        if weight is not None:
            A, B = self.factors(first)
            result = lora_linear(x, weight, self.base_layer.bias, A, B, self.scaling[first], self._dropout(first, x))
            rest = live[1:]
        else:
            result = self.base_layer(x, *args, **kwargs)
            rest = live
        for name in rest:
            result = self._add_adapter_output(result, x, name)
        return result

    def fused_weight(self, x: torch.Tensor, name: str):
        """Returns W0 as the fused path takes it for input x and adapter `name` (the tensor, or a Dequantized view
        of a 4-bit weight), or None when that path cannot compute this call exactly (DoRA, dtypes differ, ...)."""
        if not self.fusable or self.variant[name] is not None or x.dtype != self.lora_A[name].weight.dtype:
            return None
        base = self.base_layer
        if is_4bit(base.weight):
            return fused_weight(base, x)
        return base.weight if base.weight.dtype == x.dtype else None

    def _add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.factors(name)
        lx = self._dropout(name, x)
        variant = self.variant[name]
        if variant is not None:
            return result + variant.forward(self, name, result, x if lx is None else lx, exact_base=lx is None)
        lx = x if lx is None else lx
        if result.dtype == A.dtype == lx.dtype:
            return lora_delta(result, lx, A, B, self.scaling[name])
        return result + lora_update(lx.to(A.dtype), A, B, self.scaling[name]).to(result.dtype)

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        # One adapter per row: each group of rows gets its own update, added with index_add (no Python per row).
        result = self.base_layer(x)
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ConfigError(f"adapter_names has {len(rows)} entries but the batch has {x.shape[0]} rows")
        for name in dict.fromkeys(rows):
            if name not in self.r or name in self.merged_adapters:
                continue
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            sub = x.index_select(0, idx)
            out = self._add_adapter_output(result.index_select(0, idx), sub, name)
            result = result.index_copy(0, idx, out)
        return result


class LoraMergedLinear(LoraLinear):
    """LoRA on chosen equal slices of a fused projection (loralib's MergedLinear), e.g. q and v of a qkv.

    enable_lora=[True, False, True] splits the output into 3 slices and adapts slices 0 and 2, each with its
    own rank-r pair. Parameters keep loralib's layout: A is (r·n, k), B is (d/3·n, r) for n enabled slices.
    The update equals a plain rank-r·n LoRA whose B is block-diagonal on the enabled rows (`full_factors`).
    """

    kind = "merged_linear"
    base_init = False

    def __init__(self, base_layer: nn.Module, enable_lora: list[bool], fan_in_fan_out: bool | None = None):
        super().__init__(base_layer, fan_in_fan_out)
        if self.out_features % len(enable_lora):
            raise ConfigError(f"enable_lora: {len(enable_lora)} slices do not divide out_features={self.out_features}")
        self.enable_lora = list(enable_lora)
        self.slice_size = self.out_features // len(enable_lora)
        rows = [i * self.slice_size + j for i, on in enumerate(enable_lora) if on for j in range(self.slice_size)]
        self.register_buffer("_rows", torch.tensor(rows, dtype=torch.long), persistent=False)
        self.fusable = False

    def replace_base(self, new: nn.Module) -> None:
        self.base_layer = new  # never fused: the slices' B is block-diagonal

    def create_factors(self, name: str, r: int) -> None:
        n = sum(self.enable_lora)
        self.lora_A[name] = nn.Linear(self.in_features, r * n, bias=False)
        self.lora_B[name] = nn.Linear(r, self.slice_size * n, bias=False)

    def full_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (A, B_full): the equivalent plain LoRA pair, B_full being (d, r·n) block-diagonal."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        block = torch.block_diag(*B.split(self.slice_size, dim=0))
        full = B.new_zeros(self.out_features, block.shape[1]).index_copy(0, self._rows.to(B.device), block)
        return A, full

    def factors(self, name):
        return self.full_factors(name)

    def init_pair(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight  # as stored, not the block-diagonal B
