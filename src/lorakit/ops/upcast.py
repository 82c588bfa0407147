"""Products with a frozen matrix stored in a narrower dtype than the compute (a bf16 output head on a CPU that
computes in fp32), upcast one block of rows at a time: the full-precision copy never exists whole.

    W: (V, k) stored bf16        x: (N, k) fp32
    x·Wᵀ = [x·W[0:b]ᵀ | x·W[b:2b]ᵀ | ...]        each W block upcast to fp32 just before its GEMM
    g·W  = g[:, 0:b]·W[0:b] + g[:, b:2b]·W[b:2b] + ...

Upcasting is exact (bf16 -> fp32), so the result equals x·W.float()ᵀ up to the GEMM's summation order.
"""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK_ELEMENTS = 1 << 23  # 32 MiB of fp32 per upcast block


def _rows(w: Tensor) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))


def matmul_t(x: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """Returns x·wᵀ in x's dtype for x (N, k), w (V, k) of any float dtype (w upcast block by block)."""
    if w.dtype == x.dtype:
        return torch.mm(x, w.t(), out=out) if out is not None else x @ w.t()
    out = x.new_empty(x.shape[0], w.shape[0]) if out is None else out
    b = _rows(w)
    for i in range(0, w.shape[0], b):
        torch.mm(x, w[i: i + b].to(x.dtype).t(), out=out[:, i: i + b])
    return out


def matmul(g: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """Returns g·w in g's dtype for g (N, V), w (V, k) of any float dtype (w upcast block by block)."""
    if w.dtype == g.dtype:
        return torch.mm(g, w, out=out) if out is not None else g @ w
    out = g.new_zeros(g.shape[0], w.shape[1]) if out is None else out.zero_()
    b = _rows(w)
    for i in range(0, w.shape[0], b):
        out.addmm_(g[:, i: i + b], w[i: i + b].to(g.dtype))
    return out


class _UpcastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias):
        ctx.w = w  # frozen: only the input's gradient is computed, nothing full-precision is saved
        return _forward_only(x, w, bias)

    @staticmethod
    def backward(ctx, g):
        return matmul(g.contiguous(), ctx.w), None, None


def upcast_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Returns F.linear(x, weight.to(x.dtype), bias) for a frozen `weight` without its full-precision copy."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if torch.is_grad_enabled() and x.requires_grad:
        out = _UpcastLinear.apply(x2, weight, bias)
    else:
        out = _forward_only(x2, weight, bias)
    return out.view(*shape[:-1], weight.shape[0])


def _forward_only(x, w, bias):
    out = matmul_t(x, w)
    return out.add_(bias.to(out.dtype)) if bias is not None else out
