"""The grouped LoRA forward of a transformers-5 experts module: base and low-rank paths in grouped matmuls.

For an experts module built with transformers' `use_experts_implementation` (Qwen3-MoE, Mixtral,
DeepSeek-V3, gpt-oss, ...), the routed pairs (token, expert) are sorted by expert once, then each adapted
projection computes

    y = grouped(x, W) + Σ_adapters s · grouped(grouped(x, A), B)          per expert e: x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ

with W frozen. Backward therefore never forms the full-size gradient of the expert tensor (the effective-weight
path, and PEFT's, compute dW for every expert only to contract it to dA, dB), and no (experts, out, in)
effective weight is built. The result equals the module's own forward with W + s·B·A up to float rounding.
`supports(owner)` says when this path applies; LoraParam falls back to the effective weight otherwise.
"""
from __future__ import annotations

import torch

from lorakit.ops.nf4_experts import expert_tensors

_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def supports(owner) -> bool:
    """Returns True for a transformers experts module this grouped forward reproduces exactly."""
    cfg = getattr(owner, "config", None)
    return (all(hasattr(owner, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts"))
            and "down_proj" in expert_tensors(owner)  # a parameter, or its 4-bit store
            and not getattr(owner, "has_post_expert_norm", False) and not getattr(owner, "_is_expert_parallel", False)
            and getattr(cfg, "_experts_implementation", None) in ("eager", "grouped_mm", "batched_mm")
            and _grouped_linear() is not None)


def _grouped_linear():
    try:
        from transformers.integrations.moe import _grouped_linear as fn
    except ImportError:  # transformers moved it: use the effective-weight path
        return None
    return fn


def _project(x, owner, name: str, bias, offsets, loras, pair_masks) -> torch.Tensor:
    grouped = _grouped_linear()
    W = owner.__dict__.get(name)  # 4-bit experts: bound to the dequantized tensor for this call
    W = owner._parameters[name] if W is None else W
    out = grouped(x, W, offsets, bias=bias, is_transposed=owner.is_transposed)
    for A3, B3, scale, adapter in loras:  # A3: (E, r, in), B3: (E, out, r), both in (experts, out, in) layout
        low = _low_rank(x.to(A3.dtype), A3, offsets)
        if pair_masks is not None:  # mixed-adapter batch: this adapter's update only on its rows' tokens
            low = low * pair_masks[adapter].to(low.dtype).unsqueeze(-1)
        out = torch.add(out, _low_rank(low, B3, offsets).to(out.dtype), alpha=scale)  # one pass, no scaled copy
    return out


def _low_rank(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    # torch's grouped_mm needs 16-byte aligned rows; a rank like 6 (fp32) is not: use transformers' fallback op.
    step = 16 // x.element_size()
    if x.shape[-1] % step == 0 and w.shape[1] % step == 0 and x.device.type != "meta":
        return _grouped_linear()(x, w, offsets)
    return torch.ops.transformers.grouped_mm_fallback(x, w.transpose(-2, -1).contiguous(), offsets)


def lora_experts_forward(owner, loras: dict, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor, row_adapters: list[str] | None = None) -> torch.Tensor:
    """Runs `owner` (an experts module) with the LoRA factors `loras` = {parameter name: [(A3, B3, scale, adapter)]}.

    row_adapters (a mixed-adapter batch): the adapter of each batch row; the module's tokens are the rows'
    tokens in order (batch × sequence flattened), so token t belongs to row t // (tokens / rows)."""
    device = hidden_states.device
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    x = hidden_states[perm // num_top_k]
    counts = torch.bincount(expert_ids_g, minlength=owner.num_experts)[:owner.num_experts]
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    pair_masks = None
    if row_adapters is not None:
        rows = len(row_adapters)
        if num_tokens % rows:
            raise ValueError(f"mixed-adapter batch: {num_tokens} tokens do not split into {rows} rows")
        pair_rows = (perm // num_top_k) // (num_tokens // rows)
        pair_masks = {}
        for name in dict.fromkeys(e[3] for entries in loras.values() for e in entries):
            row_mask = torch.tensor([n == name for n in row_adapters], device=device)
            pair_masks[name] = row_mask[pair_rows]
    first = "gate_up_proj" if owner.has_gate else "up_proj"
    bias = getattr(owner, f"{first}_bias")[expert_ids_g] if owner.has_bias else None
    h = _project(x, owner, first, bias, offsets, loras.get(first, ()), pair_masks)
    h = owner._apply_gate(h) if owner.has_gate else owner.act_fn(h)
    bias = owner.down_proj_bias[expert_ids_g] if owner.has_bias else None
    h = _project(h, owner, "down_proj", bias, offsets, loras.get("down_proj", ()), pair_masks)
    h = h * sample_weights[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    out = h[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return out.to(hidden_states.dtype)


def projection_names() -> tuple[str, ...]:
    """Returns the expert tensor names the grouped path knows."""
    return _PROJECTIONS
