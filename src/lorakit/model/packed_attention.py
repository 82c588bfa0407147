"""Attention for padding-free rows: each packed example attends to itself at the cost of its own length.

A padding-free batch (lorakit.train.batching.collate_padding_free) is ONE row holding the examples back to back.
transformers' `sdpa` masks that row block-diagonally, so every example sees only itself, but the kernel still
computes the whole (T x T) score matrix: 8 examples of ~70 tokens cost 8x the attention they need (25% of a
SmolLM2 step on CPU, measured with torch.profiler). Here the examples are cut back out of the row and run
through one causal `scaled_dot_product_attention` call, as a (examples, heads, longest, head_dim) batch:

    q, k, v  (1, H, T, D) ──pad by cu_seq_lens──> (n, H, L, D) ──sdpa(is_causal)──> (n, H, L, D)
                                                                                │ unpad (drop each tail)
    output   (1, T, H, D) <─────────────────────────────────────────────────────┘

Right padding under a causal mask is never attended by a real token, so each example's output is exactly its
own attention; the pad rows' outputs are dropped. Cost: n·L² score entries instead of T² (L <= T).

The sequence boundaries come from the batch as transformers' flash-attention kwargs (`cu_seq_lens_q`,
`max_length_q`, ...: the names DataCollatorWithFlattening uses), which every Llama-style model passes down to
its attention function. The implementation is registered with transformers' AttentionInterface under
PACKED_SDPA and switched on only around a training step whose batch is packed (`packed_attention`); any call
without the boundaries (padded eval batches, generation, a sliding window shorter than an example) is plain
`sdpa`, mask and all.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PACKED_SDPA = "lorakit_packed_sdpa"
_registered = False


def sequence_boundaries(position_ids: Sequence[int]) -> dict:
    """Returns the flash-attention kwargs {cu_seq_lens_q/k, max_length_q/k} of a packed row's position ids.

    A sequence starts wherever the position does not continue the previous one (as transformers'
    find_packed_sequence_indices reads a packed row), so the boundaries are the ones its mask would use.
    """
    starts = [i for i, p in enumerate(position_ids) if i == 0 or p != position_ids[i - 1] + 1]
    cu = starts + [len(position_ids)]
    longest = max((b - a for a, b in zip(cu[:-1], cu[1:])), default=0)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    return {"cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": longest, "max_length_k": longest}


def packed_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: per-example causal attention for a packed row, else plain sdpa.

    query: (1, H, T, D); key, value: (1, H_kv, T, D). Returns ((1, T, H, D), None) like sdpa_attention_forward.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    layout = _layout(tuple(cu.tolist()), query.device) if cu is not None else None
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if (layout is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]  # a KV cache: not a packed row
            or layout[0].numel() != query.shape[2] or (window and layout[2] > window)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    index, n, longest = layout

    def pad(x: torch.Tensor) -> torch.Tensor:  # (1, h, T, D) -> (n, h, longest, D)
        tokens = x[0].transpose(0, 1)  # (T, h, D)
        out = tokens.new_zeros(n * longest, *tokens.shape[1:]).index_copy(0, index, tokens)
        return out.view(n, longest, *tokens.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(pad(query), pad(key), pad(value), is_causal=True, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0,
                                         enable_gqa=query.shape[1] != key.shape[1])
    out = out.transpose(1, 2).reshape(n * longest, out.shape[1], out.shape[3]).index_select(0, index)
    return out.unsqueeze(0), None


@functools.lru_cache(maxsize=8)
def _layout(bounds: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, int, int]:
    """Returns (index, examples, longest) for a packed row: token t of the row sits at index[t] of the padded
    (examples * longest) layout (example i's j-th token at i * longest + j). Cached: every layer of a forward
    (and its checkpoint recompute) asks for the same row's layout."""
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    longest = max(lengths)
    index = torch.cat([torch.arange(k) + i * longest for i, k in enumerate(lengths)]).to(device)
    return index, len(lengths), longest


def register() -> None:
    """Registers PACKED_SDPA with transformers (attention function, and sdpa's masks for unpacked calls)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    _registered = True


def _pretrained(model: nn.Module) -> nn.Module | None:
    while not hasattr(model, "set_attn_implementation") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # DDP and similar wrappers
    return model if hasattr(model, "set_attn_implementation") else None


@contextlib.contextmanager
def packed_attention(model: nn.Module) -> Iterator[bool]:
    """Within the block, an sdpa model attends per example on packed rows; yields whether it was switched.

    Models on another attention implementation (eager, flex, flash) are left as they are: their own masking of
    a packed row is exact, only slower or already variable-length.
    """
    inner = _pretrained(model)
    if inner is None or getattr(inner.config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    register()
    inner.set_attn_implementation(PACKED_SDPA)
    try:
        yield True
    finally:
        inner.set_attn_implementation("sdpa")
