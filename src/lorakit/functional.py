"""The hot path: h = W0·x + s·B·(A·x), as fused autograd functions.

        x ──────────────► W0 (frozen) ───────────┐
        │                                        + ──► h
        └─► dropout ─► A (r×k) ─► B (d×r) ─► ×s ─┘

`lora_linear` computes the base projection and the update with two GEMMs into one output buffer and saves
only x (and dropout(x) when p > 0) and A·x for backward. Backward computes the input gradient as ONE fused
addmm, grad_x = g·W0 + (s·g·B)·A, and the factor gradients from the small r-wide products.

`lora_linear_shared` is `lora_linear` for n projections that read the same x (q, k, v; gate, up): one GEMM
x·[A1;…;An]ᵀ for all the A factors, one r-wide product with x for all their gradients, and grad_x as one chain
of addmms, g1·W1 + … + gn·Wn + g_ax·[A1;…;An], with no separate accumulation of n input gradients.

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
        # s·(A·x) is computed once and saved: the forward adds it through B with alpha = 1 and the gradient
        # of B is g·(s·A·x) with no extra scaling pass.
        sax = ((x if lora_x is None else lora_x) @ A.t()).mul_(scale)
        out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        out.addmm_(sax, B.t())
        ctx.scale = scale
        ctx.has_dropout = lora_x is not None
        ctx.save_for_backward(x, lora_x, weight, A, B, sax)
        return out

    @staticmethod
    def backward(ctx, g):
        x, lora_x, weight, A, B, sax = ctx.saved_tensors
        need_x, need_w, need_b, need_lx, need_A, need_B, _ = ctx.needs_input_grad
        g_ax = (g @ B).mul_(ctx.scale)  # (N, r): gradient reaching A·x
        grad_x = grad_w = grad_b = grad_lx = grad_A = grad_B = None
        if need_B:  # (r, N)·(N, d) then a transposed view: MKL is faster this way round than gᵀ·sax
            grad_B = (sax.t() @ g).t()
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


class _LoraLinearShared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scales, *ts):
        # x: (N, k); ts: A_1..A_n (r_i, k), then (W_i, b_i, B_i) for each projection i
        n = len(scales)
        As, wbB = ts[:n], ts[n:]
        ranks = [A.shape[0] for A in As]
        A_cat = torch.cat(As)
        ax = x @ A_cat.t()  # (N, sum r_i): one pass over x for every A
        outs, off = [], 0
        for i in range(n):
            w, b, B = wbB[3 * i: 3 * i + 3]
            out = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
            out.addmm_(ax[:, off: off + ranks[i]], B.t(), alpha=scales[i])
            outs.append(out)
            off += ranks[i]
        ctx.ranks, ctx.scales = ranks, scales
        ctx.save_for_backward(x, A_cat, ax, *wbB)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs):
        x, A_cat, ax, *wbB = ctx.saved_tensors
        need = ctx.needs_input_grad
        ranks, scales, n = ctx.ranks, ctx.scales, len(ctx.scales)
        g_ax = torch.cat([(g @ wbB[3 * i + 2]).mul_(s) for i, (g, s) in enumerate(zip(gs, scales))], dim=1)
        grad_x = grad_A = None
        if need[0]:  # one chain: g_ax·A_cat + g_1·W_1 + ... + g_n·W_n
            grad_x = g_ax @ A_cat
            for i, g in enumerate(gs):
                grad_x.addmm_(g, wbB[3 * i])
        if any(need[2: 2 + n]):
            grad_A = (g_ax.t() @ x).split(ranks)  # one pass over x for every A
        rest, off = [], 0
        for i, (g, r, s) in enumerate(zip(gs, ranks, scales)):
            nw, nb, nB = need[2 + n + 3 * i: 5 + n + 3 * i]
            rest += [g.t() @ x if nw else None, g.sum(0) if nb else None,
                     (g.t() @ ax[:, off: off + r]).mul_(s) if nB else None]
            off += r
        return (grad_x, None, *(grad_A or [None] * n), *rest)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                lora_x: Tensor | None = None) -> Tensor:
    """Returns x·W0ᵀ + b + s·(lora_x·Aᵀ)·Bᵀ for x of any leading shape; lora_x (dropout(x)) defaults to x."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    lx2 = None if lora_x is None else lora_x.reshape(-1, shape[-1])
    out = _LoraLinear.apply(x2, weight, bias, lx2, A, B, float(scale))
    return out.view(*shape[:-1], out.shape[-1])


def lora_linear_shared(x: Tensor, weights, biases, As, Bs, scales) -> tuple[Tensor, ...]:
    """Returns (lora_linear(x, weights[i], biases[i], As[i], Bs[i], scales[i]) for each i), computed together."""
    shape = x.shape
    wbB = [t for i in range(len(As)) for t in (weights[i], biases[i], Bs[i])]
    outs = _LoraLinearShared.apply(x.reshape(-1, shape[-1]), tuple(float(s) for s in scales), *As, *wbB)
    return tuple(o.view(*shape[:-1], o.shape[-1]) for o in outs)


def lora_delta(base_out: Tensor, lora_x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Returns base_out + s·(lora_x·Aᵀ)·Bᵀ for inputs of any leading shape."""
    shape = base_out.shape
    out = _LoraDelta.apply(base_out.reshape(-1, shape[-1]), lora_x.reshape(-1, lora_x.shape[-1]), A, B, float(scale))
    return out.view(shape)


def lora_update(lora_x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Returns s·(lora_x·Aᵀ)·Bᵀ alone (used for row subsets in mixed-adapter batches)."""
    return (lora_x @ A.t()) @ B.t() * scale
