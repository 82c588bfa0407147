"""LoRA on linear maps: nn.Linear, GPT-2's Conv1D (fan_in_fan_out), fused-slice projections, 4-bit bases.

    h = W0·x + s·B·(A·x)            A: r×k (kaiming-uniform), B: d×r (zero), s = alpha/r

A and B have the same layout whatever the base stores: only merging needs to know that Conv1D keeps its
weight as k×d (`fan_in_fan_out`). DoRA rescales each output row by m / ||W0 + s·B·A||.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError
from lorakit.functional import lora_delta, lora_linear, lora_update
from lorakit.layers.base import LoraLayer


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

    _shared_group = None  # set by lorakit.fuse.fuse_shared_inputs: siblings computed in one call

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool | None = None):
        super().__init__(base_layer)
        self.in_features, self.out_features, detected = linear_shape(base_layer)
        self.fan_in_fan_out = detected if fan_in_fan_out is None else fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self._fusable = self.fusable_base(base_layer)

    def fusable_base(self, base_layer: nn.Module) -> bool:
        """Returns True when the fused kernel can read `base_layer`'s W0 in (d, k) layout: a plain float weight,
        or a bitsandbytes 4-bit one it dequantizes itself (not Conv1D's (k, d) weights)."""
        weight_kind = type(getattr(base_layer, "weight", None))
        return (isinstance(base_layer, nn.Linear) and not self.fan_in_fan_out
                and (weight_kind in (torch.Tensor, nn.Parameter) or weight_kind.__name__ == "Params4bit"))

    # ---------------------------------------------------------------- creation
    def _create(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def factors(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    @torch.no_grad()
    def _init(self, name: str, init: str) -> None:
        A, B = self.factors(name)
        if init in ("kaiming", "none"):
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init == "kaiming":
                nn.init.zeros_(B)
            else:  # "none" (init_lora_weights=False): both random, for tests, as in PEFT
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[name])
            nn.init.zeros_(B)
        elif init in ("pissa", "olora"):
            self._init_from_base(name, init)
        else:
            raise ConfigError(f"init_lora_weights: unknown init {init!r}")

    @torch.no_grad()
    def _init_from_base(self, name: str, init: str) -> None:
        # PiSSA / OLoRA: start the adapter on W0's principal directions and remove that part from W0,
        # so W0' + s·B·A == W0 exactly as at step 0.
        if self._is_quantized():
            raise ConfigError(f"init_lora_weights={init!r} needs a full-precision base; quantize after init")
        r, s = self.r[name], self.scaling[name]
        w = self._dense_weight_fp32()  # (d, k)
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            Sr = S[:r] / s
            A = torch.diag(Sr.sqrt()) @ Vh[:r]
            B = U[:, :r] @ torch.diag(Sr.sqrt())
        else:
            Q, R = torch.linalg.qr(w)
            A, B = R[:r], Q[:, :r]
        pA, pB = self.factors(name)
        pA.copy_(A)
        pB.copy_(B)
        self._write_base(self._read_base_fp32() - self._to_base_layout(s * (pB.float() @ pA.float())))

    def _create_magnitude(self, name: str) -> None:
        with torch.no_grad():
            norm = self._dora_norm(name, self._dense_weight_fp32())
        self.lora_magnitude_vector[name] = nn.Parameter(norm.to(self.factors(name)[0].dtype))

    # ---------------------------------------------------------------- weights
    def _is_quantized(self) -> bool:
        return type(self.base_weight).__name__ == "Params4bit"

    def _dense_weight_fp32(self) -> torch.Tensor:
        """Returns W0 as an fp32 (d, k) tensor (dequantized for 4-bit bases)."""
        if self._is_quantized():
            from lorakit.quant import dequantize_weight
            return dequantize_weight(self.base_layer).float()
        w = self.base_weight.detach().float()
        return w.t() if self.fan_in_fan_out else w

    def _to_base_layout(self, w: torch.Tensor) -> torch.Tensor:
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.factors(name)
        return self._to_base_layout(self.scaling[name] * (B.detach().float() @ A.detach().float()))

    def _dora_norm(self, name: str, w_dk: torch.Tensor) -> torch.Tensor:
        A, B = self.factors(name)
        return torch.linalg.norm(w_dk + self.scaling[name] * (B.detach().float() @ A.detach().float()), dim=1)

    def _dora_merged_weight(self, name, w32):
        w_dk = self._to_base_layout(w32)
        norm = self._dora_norm(name, w_dk)
        scale = self.lora_magnitude_vector[name].detach().float() / norm
        merged = w_dk + self._to_base_layout(self.delta_weight(name))
        return self._to_base_layout(merged * scale[:, None]), norm

    def _dora_unmerged_weight(self, name, w32, norm):
        scale = self.lora_magnitude_vector[name].detach().float() / norm
        return self._to_base_layout(self._to_base_layout(w32) / scale[:, None]) - self.delta_weight(name)

    def _read_base_fp32(self) -> torch.Tensor:
        if self._is_quantized():
            return self._to_base_layout(self._dense_weight_fp32())
        return super()._read_base_fp32()

    def _write_base(self, w32: torch.Tensor) -> None:
        if self._is_quantized():
            from lorakit.quant import requantize_weight
            requantize_weight(self.base_layer, self._to_base_layout(w32))
        else:
            super()._write_base(w32)

    # ---------------------------------------------------------------- forward (the hot path)
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        live = self._live
        if not live:
            return self.base_layer(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self._mixed_forward(x)
        if self._shared_group is not None and not args and not kwargs:
            out = self._shared_group(self, x)
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
        if not self._fusable or self.use_dora[name] or x.dtype != self.lora_A[name].weight.dtype:
            return None
        base = self.base_layer
        if self._is_quantized():
            from lorakit.quant import fused_weight
            return fused_weight(base, x)
        return base.weight if base.weight.dtype == x.dtype else None

    def _add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.factors(name)
        lx = self._dropout(name, x)
        if self.use_dora[name]:
            return result + self._dora_output(result, x if lx is None else lx, name, exact_base=lx is None)
        lx = x if lx is None else lx
        if result.dtype == A.dtype == lx.dtype:
            return lora_delta(result, lx, A, B, self.scaling[name])
        return result + lora_update(lx.to(A.dtype), A, B, self.scaling[name]).to(result.dtype)

    def _dora_output(self, result, lx, name, exact_base):
        # DoRA (as PEFT computes it): (m/||W||_row - 1)·(W0·x) + (m/||W||_row)·s·B·A·x, with ||W|| detached.
        A, B = self.factors(name)
        w_dk = self._dense_weight_fp32()
        norm = self._dora_norm(name, w_dk).detach()
        mag = (self.lora_magnitude_vector[name] / norm.to(A.dtype))
        lx = lx.to(A.dtype)
        lora_out = lora_update(lx, A, B, self.scaling[name])
        if exact_base:
            bias = getattr(self.base_layer, "bias", None)
            base_out = result.to(A.dtype) - (bias.to(A.dtype) if bias is not None else 0)
        else:  # with dropout active the base term is recomputed on dropout(x), as PEFT does
            base_out = F.linear(lx, w_dk.to(A.dtype))
        return ((mag - 1) * base_out + mag * lora_out).to(result.dtype)

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        # One adapter per row: each group of rows gets its own update, added with index_add (no Python per row).
        result = self.base_layer(x)
        rows = self._row_adapters
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

    def __init__(self, base_layer: nn.Module, enable_lora: list[bool], fan_in_fan_out: bool | None = None):
        super().__init__(base_layer, fan_in_fan_out)
        if self.out_features % len(enable_lora):
            raise ConfigError(f"enable_lora: {len(enable_lora)} slices do not divide out_features={self.out_features}")
        self.enable_lora = list(enable_lora)
        self.slice_size = self.out_features // len(enable_lora)
        rows = [i * self.slice_size + j for i, on in enumerate(enable_lora) if on for j in range(self.slice_size)]
        self.register_buffer("_rows", torch.tensor(rows, dtype=torch.long), persistent=False)
        self._fusable = False

    def _create(self, name: str, r: int) -> None:
        n = sum(self.enable_lora)
        self.lora_A[name] = nn.Linear(self.in_features, r * n, bias=False)
        self.lora_B[name] = nn.Linear(r, self.slice_size * n, bias=False)

    def _create_magnitude(self, name):
        raise ConfigError("use_dora: DoRA is not supported on fused-slice (enable_lora) layers")

    def full_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (A, B_full): the equivalent plain LoRA pair, B_full being (d, r·n) block-diagonal."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        block = torch.block_diag(*B.split(self.slice_size, dim=0))
        full = B.new_zeros(self.out_features, block.shape[1]).index_copy(0, self._rows.to(B.device), block)
        return A, full

    def factors(self, name):
        return self.full_factors(name)

    @torch.no_grad()
    def _init(self, name: str, init: str) -> None:
        if init in ("pissa", "olora"):
            raise ConfigError(f"init_lora_weights={init!r} is not supported on fused-slice (enable_lora) layers")
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        nn.init.kaiming_uniform_(A, a=math.sqrt(5)) if init != "gaussian" else nn.init.normal_(A, std=1 / self.r[name])
        nn.init.zeros_(B) if init != "none" else nn.init.kaiming_uniform_(B, a=math.sqrt(5))
