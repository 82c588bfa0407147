"""How many bytes training will spend on a model: frozen and trainable weights, grads, optimizer state."""
from __future__ import annotations

import torch
from torch import nn

from lorakit.ops.nf4 import is_4bit, quant_stat_bytes
from lorakit.ops.nf4_experts import quantized_experts


def _nbytes(t: torch.Tensor | None) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Returns bytes of frozen weights, trainable weights, grads, optimizer state, and bits per 4-bit parameter.

    Grads are counted as one per trainable parameter in its dtype (what backward will allocate). Optimizer
    state is measured from `optimizer` once it has stepped; before that (or without one) it is AdamW's two
    fp32 moments per trainable parameter. The fixed NF4 and double-quant codebooks (a few hundred floats,
    the same in every layer) are counted once per model, as a format constant.
    """
    seen: set[int] = set()
    frozen = trainable = trainable_numel = quant_params = quant_bytes = 0
    codebook = 0
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        if is_4bit(p):
            stats, codes = quant_stat_bytes(p.quant_state)
            n = int(torch.Size(p.quant_state.shape).numel())
            quant_params += n
            quant_bytes += _nbytes(p) + stats
            codebook = max(codebook, codes)
            frozen += _nbytes(p) + stats
        elif p.requires_grad:
            trainable += _nbytes(p)
            trainable_numel += p.numel()
        else:
            frozen += _nbytes(p)
    expert_buffers = set()
    for module in model.modules():  # 4-bit routed experts (lorakit.ops.nf4_experts): codes + statistics in buffers
        for store in quantized_experts(module).values():
            n = int(store.shape.numel())
            quant_params += n
            quant_bytes += store.nbytes()
            frozen += store.nbytes()
            expert_buffers.update(id(b) for b in store.buffers())
    frozen += codebook
    buffers = sum(_nbytes(b) for b in model.buffers() if id(b) not in expert_buffers)
    grads = trainable
    opt_state = 0
    if optimizer is not None:
        opt_state = sum(_nbytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    if not opt_state:
        opt_state = 2 * 4 * trainable_numel
    report = {
        "frozen_bytes": frozen, "trainable_bytes": trainable, "grad_bytes": grads, "optimizer_bytes": opt_state,
        "buffer_bytes": buffers, "total_bytes": frozen + trainable + grads + opt_state + buffers,
        "trainable_params": trainable_numel, "quantized_params": quant_params,
        "bits_per_quantized_param": 8 * (quant_bytes + codebook) / quant_params if quant_params else None,
    }
    return report


def format_memory_report(report: dict) -> str:
    """Returns the memory report as a small aligned table in MiB (what the CLI prints)."""
    mib = 2 ** 20
    rows = [("frozen weights", "frozen_bytes"), ("trainable weights", "trainable_bytes"), ("gradients", "grad_bytes"),
            ("optimizer state", "optimizer_bytes"), ("buffers", "buffer_bytes"), ("total (no activations)", "total_bytes")]
    lines = [f"{label:<24} {report[key] / mib:>10.1f} MiB" for label, key in rows]
    bits = report.get("bits_per_quantized_param")
    if bits is not None:
        lines.append(f"{'4-bit base':<24} {report['quantized_params']:>10,} params at {bits:.3f} bits/param")
    lines.append(f"{'trainable params':<24} {report['trainable_params']:>10,}")
    return "\n".join(lines)
