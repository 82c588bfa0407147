"""The hot path: h = W0·x + s·B·(A·x), as fused autograd functions.

        x ──────────────► W0 (frozen) ───────────┐
        │                                        + ──► h
        └─► dropout ─► A (r×k) ─► B (d×r) ─► ×s ─┘

`lora_linear` computes the base projection and the update with two GEMMs into one output buffer and saves
only x (and dropout(x) when p > 0) and A·x for backward. Backward computes the input gradient as ONE fused
addmm, grad_x = g·W0 + (s·g·B)·A, and the factor gradients from the small r-wide products.

`lora_delta` is the same update added to a base output computed elsewhere (GPT-2 Conv1D, 4-bit bases, DoRA
off): it saves lora_x and A·x and lets autograd handle the base.
"""
from __future__ import annotations

import torch
from torch import Tensor


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_x, A, B, scale):
        # x, lora_x: (N, k); weight: (d, k); A: (r, k); B: (d, r)
        ax = (x if lora_x is None else lora_x) @ A.t()
        out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        out.addmm_(ax, B.t(), alpha=scale)
        ctx.scale = scale
        ctx.has_dropout = lora_x is not None
        ctx.save_for_backward(x, lora_x, weight, A, B, ax)
        return out

    @staticmethod
    def backward(ctx, g):
        x, lora_x, weight, A, B, ax = ctx.saved_tensors
        need_x, need_w, need_b, need_lx, need_A, need_B, _ = ctx.needs_input_grad
        s = ctx.scale
        g_ax = (g @ B).mul_(s)  # (N, r): gradient reaching A·x
        grad_x = grad_w = grad_b = grad_lx = grad_A = grad_B = None
        if need_B:
            grad_B = (g.t() @ ax).mul_(s)
        if need_A:
            grad_A = g_ax.t() @ (x if lora_x is None else lora_x)
        if need_x:
            if ctx.has_dropout:
                grad_x = g @ weight
            else:  # one fused GEMM: g·W0 + g_ax·A
                grad_x = (g @ weight).addmm_(g_ax, A)
        if need_lx:
            grad_lx = g_ax @ A
        if need_w:
            grad_w = g.t() @ x
        if need_b:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, grad_lx, grad_A, grad_B, None


class _LoraDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, lora_x, A, B, scale):
        ax = lora_x @ A.t()
        ctx.scale = scale
        ctx.save_for_backward(lora_x, A, B, ax)
        return torch.addmm(base_out, ax, B.t(), alpha=scale)

    @staticmethod
    def backward(ctx, g):
        lora_x, A, B, ax = ctx.saved_tensors
        need_base, need_lx, need_A, need_B, _ = ctx.needs_input_grad
        s = ctx.scale
        g_ax = (g @ B).mul_(s)
        return (
            g if need_base else None,
            g_ax @ A if need_lx else None,
            g_ax.t() @ lora_x if need_A else None,
            (g.t() @ ax).mul_(s) if need_B else None,
            None,
        )


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                lora_x: Tensor | None = None) -> Tensor:
    """Returns x·W0ᵀ + b + s·(lora_x·Aᵀ)·Bᵀ for x of any leading shape; lora_x (dropout(x)) defaults to x."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    lx2 = None if lora_x is None else lora_x.reshape(-1, shape[-1])
    out = _LoraLinear.apply(x2, weight, bias, lx2, A, B, float(scale))
    return out.view(*shape[:-1], out.shape[-1])


def lora_delta(base_out: Tensor, lora_x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Returns base_out + s·(lora_x·Aᵀ)·Bᵀ for inputs of any leading shape."""
    shape = base_out.shape
    out = _LoraDelta.apply(base_out.reshape(-1, shape[-1]), lora_x.reshape(-1, lora_x.shape[-1]), A, B, float(scale))
    return out.view(shape)


def lora_update(lora_x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Returns s·(lora_x·Aᵀ)·Bᵀ alone (used for row subsets in mixed-adapter batches)."""
    return (lora_x @ A.t()) @ B.t() * scale
