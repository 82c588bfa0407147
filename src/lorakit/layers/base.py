"""What every LoRA wrapper shares: named adapters, which ones are live, and merging in fp32.

A wrapper HOLDS the frozen base layer (`self.base_layer`) and adds, per adapter name, the factors A and B,
a scale, an optional dropout and optionally a variant (DoRA, lorakit.variants). Subclasses supply the math of
one base-layer kind: `create_factors(name, r)`, `factors(name)`, `delta_weight(name)` and `forward`.

The forward pass reads one precomputed tuple, `self.live`: the adapters that are active, not merged and not
disabled. Everything that changes that set (activate, merge, disable, delete, a mixed batch) goes through a
method here that recomputes it, so the hot path does no bookkeeping. Other modules read the public
attributes (`live`, `row_adapters`, `shared_group`, `fusable`) and change them only through these methods.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.config import lora_scale
from lorakit.errors import ConfigError
from lorakit.variants.base import LoraVariant
from lorakit.variants.dora import DORA
from lorakit.variants.init import init_adapter


class LoraLayer(nn.Module):
    """Base of all wrappers: adapter bookkeeping, merge/unmerge, activation. Not used directly."""

    kind = ""  # the registry's name for this layer kind (lorakit.layers.registry)
    base_init = False  # True where inits that start from W0 (pissa, olora) apply

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.variant: dict[str, LoraVariant | None] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._merge_state: dict[str, object] = {}  # what a variant's unmerge needs (DoRA: the row norms)
        self.row_adapters: list[str] | None = None  # one adapter name per batch row, only inside a mixed batch
        self.live: tuple[str, ...] = ()
        self.shared_group = None  # a lorakit.model.shared_input group computing siblings in one call
        self.fusable = False  # whether the fused kernels can read the base weight (linear layers decide)

    # ---------------------------------------------------------------- subclass hooks
    def create_factors(self, name: str, r: int) -> None:
        """Creates adapter `name`'s factor modules (uninitialised)."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """Returns scale·B·A for adapter `name` in fp32, shaped like the base weight."""
        raise NotImplementedError

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the (A, B) parameters of adapter `name` (A: r×k, B: d×r; conv kernels keep their dims)."""
        raise NotImplementedError

    def init_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (the factor drawn at random, the factor that starts at zero) as stored (lorakit.variants.init)."""
        return self.factors(name)

    def draw_(self, t: torch.Tensor, name: str, gaussian: bool = False) -> None:
        """Fills `t` as this kind draws its random factor: kaiming-uniform, or normal with std 1/r."""
        if gaussian:
            nn.init.normal_(t, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))

    # ---------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        """Returns the names of all adapters held by this layer."""
        return list(self.r)

    @property
    def base_weight(self) -> torch.Tensor:
        """Returns the base layer's weight parameter (what merging writes into)."""
        return self.base_layer.weight

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                    use_rslora: bool = False, use_dora: bool = False) -> None:
        """Adds adapter `name` with rank r; the base output is unchanged (B = 0, or W0 corrected for pissa/olora)."""
        if name in self.r:
            raise ConfigError(f"adapter {name!r} already exists on this layer")
        variant = DORA if use_dora else None
        if variant is not None and self.kind not in variant.layer_kinds:
            raise ConfigError(f"use_dora: DoRA is supported on plain linear layers only, not on "
                              f"{type(self).__name__}({type(self.base_layer).__name__})")
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = lora_scale(alpha, r, use_rslora)
        self.dropout_p[name] = float(dropout)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.variant[name] = variant
        self.use_dora[name] = variant is DORA
        self.create_factors(name, r)
        self._move_like_base(name)
        init_adapter(self, name, init)
        if variant is not None:
            variant.init(self, name)

    def _move_like_base(self, name: str) -> None:
        # Factors live on the base weight's device; they stay fp32 unless the base is a float type.
        w = self.base_weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32
        for p in self.adapter_parameters(name):
            p.data = p.data.to(device=w.device, dtype=dtype)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Returns the trainable parameters of adapter `name` (factors and variant parameters)."""
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.") and
                (n.endswith(f".{name}") or f".{name}." in n)]

    def delete_adapter(self, name: str) -> None:
        """Removes adapter `name` (unmerging it first if merged)."""
        if name in self.merged_adapters:
            self.unmerge([name])
        for container in (self.r, self.lora_alpha, self.scaling, self.dropout_p, self.variant, self.use_dora,
                          self._merge_state):
            container.pop(name, None)
        for _, child in list(self.named_children()):
            if isinstance(child, (nn.ModuleDict, nn.ParameterDict)) and name in child:
                del child[name]
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)
        self._refresh()

    def set_active(self, names: tuple[str, ...] | list[str]) -> None:
        """Makes exactly `names` (those this layer holds) the active adapters."""
        self.active_adapters = tuple(n for n in names if n in self.r)
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        """Turns every adapter off (base output only) or back on."""
        self.disabled = disabled
        self._refresh()

    def begin_mixed_batch(self, rows: list[str]) -> None:
        """Enters a mixed batch: row i runs adapter rows[i]; every adapter held here may be needed."""
        self.row_adapters = rows
        self.live = tuple(self.r)

    def end_mixed_batch(self) -> None:
        """Leaves a mixed batch: back to the active adapters."""
        self.row_adapters = None
        self._refresh()

    def set_shared_group(self, group) -> None:
        """Links this layer to a shared-input group (None unlinks it)."""
        self.shared_group = group

    def replace_base(self, new: nn.Module) -> None:
        """Swaps the base layer (e.g. for its 4-bit version) and re-decides whether the fused path applies."""
        self.base_layer = new

    def _refresh(self) -> None:
        self.live = () if self.disabled else tuple(a for a in self.active_adapters if a not in self.merged_adapters)

    # ---------------------------------------------------------------- merging (fp32 arithmetic)
    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Folds the given (default: active) adapters into the base weight, in fp32."""
        names = [n for n in (self.active_adapters if names is None else names)
                 if n in self.r and n not in self.merged_adapters]
        for name in names:
            w32 = self.read_base_fp32()
            variant = self.variant[name]
            if variant is not None:
                merged, self._merge_state[name] = variant.merged_weight(self, name, w32)
                self.write_base_fp32(merged)
            else:
                self.write_base_fp32(w32.add_(self.delta_weight(name)))
            self.merged_adapters.append(name)
        self._refresh()

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtracts merged adapters (default: all, newest first) from the base weight, in fp32."""
        names = list(reversed(self.merged_adapters)) if names is None else [n for n in names if n in self.merged_adapters]
        for name in names:
            w32 = self.read_base_fp32()
            variant = self.variant[name]
            if variant is not None:
                self.write_base_fp32(variant.unmerged_weight(self, name, w32, self._merge_state.pop(name)))
            else:
                self.write_base_fp32(w32.sub_(self.delta_weight(name)))
            self.merged_adapters.remove(name)
        self._refresh()

    @torch.no_grad()
    def switch_merged(self, old: str, new: str) -> None:
        """Replaces merged adapter `old` by `new` in one fp32 update: W += ΔW_new - ΔW_old."""
        if self.variant.get(old) is not None or self.variant.get(new) is not None:
            self.unmerge([old])
            self.merge([new])
            return
        w32 = self.read_base_fp32()
        w32.add_(self.delta_weight(new) - self.delta_weight(old))
        self.write_base_fp32(w32)
        self.merged_adapters[self.merged_adapters.index(old)] = new
        self._refresh()

    def read_base_fp32(self) -> torch.Tensor:
        """Returns a fp32 copy of the base weight in its stored layout."""
        return self.base_weight.detach().to(torch.float32, copy=True)

    def write_base_fp32(self, w32: torch.Tensor) -> None:
        """Writes a fp32 weight (stored layout) into the base weight, in the base's dtype."""
        self.base_weight.data.copy_(w32.to(self.base_weight.dtype))

    def to_base_layout(self, w: torch.Tensor) -> torch.Tensor:
        """Returns a (d, k) weight in the base's stored layout (identity except for transposed bases)."""
        return w

    def dense_weight_fp32(self) -> torch.Tensor:
        """Returns W0 as an fp32 tensor in (d, k) layout."""
        return self.to_base_layout(self.read_base_fp32())

    # ---------------------------------------------------------------- helpers for subclasses
    def _dropout(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        # None means "identity": the fused kernel then reuses x instead of saving a copy.
        return self.lora_dropout[name](x) if self.dropout_p[name] > 0 and self.training else None

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, scale={self.scaling[n]:g}" for n in self.r)
