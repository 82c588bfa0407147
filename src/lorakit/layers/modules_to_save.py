"""Modules trained in full and saved with the adapter (e.g. a classifier head): PEFT's modules_to_save.

The wrapper keeps the original module untouched and one trainable copy per adapter; the active adapter's copy
runs, the original runs when adapters are disabled.
"""
from __future__ import annotations

import copy

import torch

from torch import nn


class ModulesToSave(nn.Module):
    """Holds `original_module` and a trainable copy per adapter in `modules_to_save`."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()
        self.disabled = False
        self.row_adapters: list[str] | None = None  # set only during a mixed-adapter batch

    @property
    def adapter_names(self) -> list[str]:
        """Returns the names of the adapters that have a copy here."""
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str) -> None:
        """Adds a trainable copy of the original module for adapter `name`."""
        new = copy.deepcopy(self.original_module)
        for p in new.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = new

    def delete_adapter(self, name: str) -> None:
        """Drops adapter `name`'s copy."""
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    def set_active(self, names) -> None:
        """Selects the copy of the first of `names` that this wrapper holds."""
        self.active_adapters = tuple(n for n in names if n in self.modules_to_save)

    def set_disabled(self, disabled: bool) -> None:
        """Runs the original module while disabled."""
        self.disabled = disabled

    def begin_mixed_batch(self, rows: list[str]) -> None:
        """Enters a mixed batch: row i runs the copy of adapter rows[i] (the original for any other name)."""
        self.row_adapters = rows

    def end_mixed_batch(self) -> None:
        """Leaves a mixed batch."""
        self.row_adapters = None

    def active_module(self) -> nn.Module:
        """Returns the module that forward runs."""
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, x, *args, **kwargs):
        rows = self.row_adapters
        if rows is None:
            return self.active_module()(x, *args, **kwargs)
        # Mixed batch: every row runs through its adapter's copy (or the original for "__base__").
        result = self.original_module(x, *args, **kwargs)
        for name in dict.fromkeys(rows):
            if name in self.modules_to_save:
                idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
                out = self.modules_to_save[name](x.index_select(0, idx), *args, **kwargs)
                result = result.index_copy(0, idx, out.to(result.dtype))
        return result
