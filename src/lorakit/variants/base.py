"""The LoRA-variant interface (in the spirit of PEFT's LoraVariant) and the registry of variants.

A variant changes how one adapter's update enters the layer; plain LoRA (h = W0·x + s·B·A·x) is no variant.
It has three hooks, each given the layer and the adapter name, and a variant holds no state of its own:

    init(layer, name)                     create the variant's extra parameters once the factors exist
    forward(layer, name, result, lx, exact_base) -> delta added to `result` (the base output)
    merged_weight(layer, name, w32) -> (W', state)      unmerged_weight(layer, name, w32, state) -> W0

A layer with a variant on an adapter takes the per-adapter path (never the fused kernels) for that adapter.
"""
from __future__ import annotations

import torch


class LoraVariant:
    """How one adapter's update is initialised, applied in forward and merged; subclasses fill in the hooks."""

    name = ""
    layer_kinds: tuple[str, ...] = ()  # LoraLayer.kind values this variant supports

    def init(self, layer, name: str) -> None:
        """Creates the variant's parameters for adapter `name` (after its factors are initialised)."""

    def forward(self, layer, name: str, result: torch.Tensor, lx: torch.Tensor, exact_base: bool) -> torch.Tensor:
        """Returns what adapter `name` adds to `result` (the base output for input lx; exact_base: no dropout)."""
        raise NotImplementedError

    def merged_weight(self, layer, name: str, w32: torch.Tensor):
        """Returns (the fp32 base weight with the adapter folded in, the state unmerging needs)."""
        raise NotImplementedError

    def unmerged_weight(self, layer, name: str, w32: torch.Tensor, state) -> torch.Tensor:
        """Returns the fp32 base weight with the adapter taken out again."""
        raise NotImplementedError


VARIANTS: dict[str, LoraVariant] = {}


def register_variant(variant: LoraVariant) -> LoraVariant:
    """Adds `variant` to VARIANTS under its name; returns it."""
    VARIANTS[variant.name] = variant
    return variant
