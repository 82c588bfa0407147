"""DoRA (weight-decomposed LoRA): each output row of W0 + s·B·A rescaled to a trained magnitude m.

    W' = m · (W0 + s·B·A) / ||W0 + s·B·A||_row          (norm detached in forward, as PEFT computes it)
    h  = W0·x + (m/||W||_row - 1)·(W0·x) + (m/||W||_row)·s·B·A·x

The magnitude lives on the layer as `lora_magnitude_vector[name]` (PEFT's key name).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.ops.lora import lora_update
from lorakit.variants.base import LoraVariant, register_variant


def row_norm(layer, name: str, w_dk: torch.Tensor) -> torch.Tensor:
    """Returns ||W + s·B·A|| per output row (fp32) for the (d, k) weight w_dk."""
    A, B = layer.factors(name)
    return torch.linalg.norm(w_dk + layer.scaling[name] * (B.detach().float() @ A.detach().float()), dim=1)


class DoRA(LoraVariant):
    """DoRA on linear layers (PEFT's use_dora=True)."""

    name = "dora"
    layer_kinds = ("linear",)

    def init(self, layer, name: str) -> None:
        with torch.no_grad():
            norm = row_norm(layer, name, layer.dense_weight_fp32())
        layer.lora_magnitude_vector[name] = nn.Parameter(norm.to(layer.factors(name)[0].dtype))

    def forward(self, layer, name, result, lx, exact_base):
        A, B = layer.factors(name)
        w_dk = layer.dense_weight_fp32()
        norm = row_norm(layer, name, w_dk).detach()
        mag = layer.lora_magnitude_vector[name] / norm.to(A.dtype)
        lx = lx.to(A.dtype)
        lora_out = lora_update(lx, A, B, layer.scaling[name])
        if exact_base:
            bias = getattr(layer.base_layer, "bias", None)
            base_out = result.to(A.dtype) - (bias.to(A.dtype) if bias is not None else 0)
        else:  # with dropout active the base term is recomputed on dropout(x), as PEFT does
            base_out = F.linear(lx, w_dk.to(A.dtype))
        return ((mag - 1) * base_out + mag * lora_out).to(result.dtype)

    def merged_weight(self, layer, name, w32):
        w_dk = layer.to_base_layout(w32)
        norm = row_norm(layer, name, w_dk)
        scale = layer.lora_magnitude_vector[name].detach().float() / norm
        merged = w_dk + layer.to_base_layout(layer.delta_weight(name))
        return layer.to_base_layout(merged * scale[:, None]), norm

    def unmerged_weight(self, layer, name, w32, norm):
        scale = layer.lora_magnitude_vector[name].detach().float() / norm
        return layer.to_base_layout(layer.to_base_layout(w32) / scale[:, None]) - layer.delta_weight(name)


DORA = register_variant(DoRA())
