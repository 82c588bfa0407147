"""A left-padded batch of KV caches that rows join and leave between decode steps.

    row 0:  [pad pad  k0  k1  k2  k3]      mask  0 0 1 1 1 1
    row 1:  [ k0  k1  k2  k3  k4  k5]      mask  1 1 1 1 1 1

Each row keeps its own positions (position_ids count only its real tokens), so padding changes nothing but
which columns the attention mask hides. Joining pads the shorter side on the left; leaving selects rows and
drops the columns no remaining row uses. Works on transformers' DynamicCache (one keys/values tensor of shape
(batch, kv_heads, length, head_dim) per layer).
"""
from __future__ import annotations

import torch

from lorakit.errors import ConfigError


def check_cache(cache, filled: bool = True) -> list:
    """Returns the cache's layers if this module can pad and slice them; ConfigError otherwise."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ConfigError(f"serving needs transformers' DynamicCache with per-layer tensors, got {type(cache).__name__}")
    for layer in layers:
        keys = getattr(layer, "keys", None)
        if getattr(layer, "sliding_window", None) or (filled and (keys is None or keys.dim() != 4)):
            raise ConfigError("serving supports models with a plain KV cache only (no sliding-window attention "
                              "layers, no quantized cache)")
    return layers



def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3])
    return torch.cat([pad, t], dim=2)


class BatchCache:
    """The running batch's cache plus its (batch, length) attention mask; rows are in join order."""

    def __init__(self) -> None:
        self.cache = None
        self.mask: torch.Tensor | None = None  # long, 1 = real token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, cache, mask: torch.Tensor) -> None:
        """Appends the rows of another cache (with its own mask) below the current rows."""
        check_cache(cache)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        length = max(self.length, mask.shape[1])
        mine, theirs = length - self.length, length - mask.shape[1]
        for a, b in zip(check_cache(self.cache), check_cache(cache)):
            a.keys = torch.cat([_pad_left(a.keys, mine), _pad_left(b.keys, theirs)], dim=0)
            a.values = torch.cat([_pad_left(a.values, mine), _pad_left(b.values, theirs)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask[:, None, :, None], mine)[:, 0, :, 0],
                               _pad_left(mask[:, None, :, None], theirs)[:, 0, :, 0]], dim=0)

    def keep(self, rows: list[int]) -> None:
        """Keeps only `rows` (in that order) and drops leading columns that no kept row uses."""
        if not rows:
            self.cache, self.mask = None, None
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        for layer in check_cache(self.cache):
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:].contiguous()
            layer.values = layer.values.index_select(0, idx)[:, :, start:].contiguous()
        self.mask = mask[:, start:].contiguous()

    def grow(self) -> torch.Tensor:
        """Extends the mask by one real column for the token about to be decoded; returns the new mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask
