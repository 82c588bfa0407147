"""What every LoRA wrapper shares: named adapters, which ones are live, and merging in fp32.

A wrapper HOLDS the frozen base layer (`self.base_layer`) and adds, per adapter name, the factors A and B,
a scale, an optional dropout and (DoRA) a magnitude vector. Subclasses supply the math of one base-layer
kind: `_create(name, r)`, `_init(name, init)`, `delta_weight(name)` and `forward`.

The forward pass reads one precomputed tuple, `self._live`: the adapters that are active, not merged and
not disabled. Everything that changes that set (activate, merge, disable, delete) recomputes it, so the hot
path does no bookkeeping.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.errors import ConfigError


class LoraLayer(nn.Module):
    """Base of all wrappers: adapter bookkeeping, merge/unmerge, activation. Not used directly."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.use_dora: dict[str, bool] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._dora_norms: dict[str, torch.Tensor] = {}
        self._row_adapters: list[str] | None = None  # set only during a mixed-adapter batch
        self._live: tuple[str, ...] = ()

    # ---------------------------------------------------------------- subclass hooks
    def _create(self, name: str, r: int) -> None:
        raise NotImplementedError

    def _init(self, name: str, init: str) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """Returns scale·B·A for adapter `name` in fp32, shaped like the base weight."""
        raise NotImplementedError

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the (A, B) parameters of adapter `name` (A: r×k, B: d×r; conv kernels keep their dims)."""
        raise NotImplementedError

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
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout_p[name] = float(dropout)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.use_dora[name] = bool(use_dora)
        self._create(name, r)
        self._move_like_base(name)
        self._init(name, init)
        if use_dora:
            self._create_magnitude(name)

    def _move_like_base(self, name: str) -> None:
        # Factors live on the base weight's device; they stay fp32 unless the base is a float type.
        w = self.base_weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32
        for p in self._adapter_params(name):
            p.data = p.data.to(device=w.device, dtype=dtype)

    def _adapter_params(self, name: str) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.") and
                (n.endswith(f".{name}") or f".{name}." in n)]

    def _create_magnitude(self, name: str) -> None:
        raise ConfigError(f"use_dora: DoRA is supported on linear layers only, not on {type(self.base_layer).__name__}")

    def delete_adapter(self, name: str) -> None:
        """Removes adapter `name` (unmerging it first if merged)."""
        if name in self.merged_adapters:
            self.unmerge([name])
        for container in (self.r, self.lora_alpha, self.scaling, self.dropout_p, self.use_dora, self._dora_norms):
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

    def _refresh(self) -> None:
        self._live = () if self.disabled else tuple(a for a in self.active_adapters if a not in self.merged_adapters)

    # ---------------------------------------------------------------- merging (fp32 arithmetic)
    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Folds the given (default: active) adapters into the base weight, in fp32."""
        names = [n for n in (self.active_adapters if names is None else names)
                 if n in self.r and n not in self.merged_adapters]
        for name in names:
            w32 = self._read_base_fp32()
            if self.use_dora[name]:
                merged, norm = self._dora_merged_weight(name, w32)
                self._dora_norms[name] = norm
                self._write_base(merged)
            else:
                self._write_base(w32.add_(self.delta_weight(name)))
            self.merged_adapters.append(name)
        self._refresh()

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtracts merged adapters (default: all, newest first) from the base weight, in fp32."""
        names = list(reversed(self.merged_adapters)) if names is None else [n for n in names if n in self.merged_adapters]
        for name in names:
            w32 = self._read_base_fp32()
            if self.use_dora[name]:
                self._write_base(self._dora_unmerged_weight(name, w32, self._dora_norms.pop(name)))
            else:
                self._write_base(w32.sub_(self.delta_weight(name)))
            self.merged_adapters.remove(name)
        self._refresh()

    @torch.no_grad()
    def switch_merged(self, old: str, new: str) -> None:
        """Replaces merged adapter `old` by `new` in one fp32 update: W += ΔW_new - ΔW_old."""
        if self.use_dora.get(old) or self.use_dora.get(new):
            self.unmerge([old])
            self.merge([new])
            return
        w32 = self._read_base_fp32()
        w32.add_(self.delta_weight(new) - self.delta_weight(old))
        self._write_base(w32)
        self.merged_adapters[self.merged_adapters.index(old)] = new
        self._refresh()

    def _read_base_fp32(self) -> torch.Tensor:
        return self.base_weight.detach().to(torch.float32, copy=True)

    def _write_base(self, w32: torch.Tensor) -> None:
        self.base_weight.data.copy_(w32.to(self.base_weight.dtype))

    def _dora_merged_weight(self, name, w32):
        raise NotImplementedError

    def _dora_unmerged_weight(self, name, w32, norm):
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers for subclasses
    def _dropout(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        # None means "identity": the fused kernel then reuses x instead of saving a copy.
        return self.lora_dropout[name](x) if self.dropout_p[name] > 0 and self.training else None

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, scale={self.scaling[n]:g}" for n in self.r)
