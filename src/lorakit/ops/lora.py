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

Order of the forward GEMMs: the rank-r update s·(A·x)·Bᵀ is written first into a fresh output and the base GEMM
then accumulates into it (beta = 1), so the large (N, d) output is written once and read back only inside the
big GEMM's cache blocking; the other order (base first, then an in-place rank-r addmm) costs one more full
pass over the output (bench/ measures both).
When no gradient is needed (no_grad / inference_mode, or nothing requires grad) every function skips the
autograd.Function and runs the same ops, so eval logits equal training-mode logits bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor


def needs_grad(*ts) -> bool:
    """Returns True when autograd must record an op on `ts` (grad mode on and some tensor requires grad)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in ts)


def _dense(w):
    # The frozen weight as a (d, k) tensor: the tensor itself, or a 4-bit weight dequantized on demand into a
    # reused buffer (lorakit.ops.nf4.Dequantized), read at once by the GEMM that needs it and never saved.
    return w if isinstance(w, Tensor) else w.dense()


def _saveable(ts):
    # save_for_backward takes tensors (or None) only; on-demand weights are kept on ctx instead.
    return [t if t is None or isinstance(t, Tensor) else None for t in ts]


def _linear_forward(x, weight, bias, lora_x, A, B, scale):
    # x, lora_x: (N, k); weight: (d, k); A: (r, k); B: (d, r)
    # s·(A·x) is computed once (and saved by the autograd path: the gradient of B is g·(s·A·x) with no extra
    # scaling pass); the update is written first and the base GEMM accumulates into it (module docstring).
    sax = ((x if lora_x is None else lora_x) @ A.t()).mul_(scale)
    out = torch.addmm(bias, sax, B.t()) if bias is not None else sax @ B.t()
    return out.addmm_(x, _dense(weight).t()), sax


def _shared_forward(x, scales, As, wbB):
    # x: (N, k); As: A_1..A_n (r_i, k); wbB: (W_i, b_i, B_i) for each projection i
    ranks = [A.shape[0] for A in As]
    A_cat = torch.cat(As)
    sax = x @ A_cat.t()  # (N, sum r_i): one pass over x for every A
    outs, off = [], 0
    for i, s in enumerate(scales):
        w, b, B = wbB[3 * i: 3 * i + 3]
        sx = sax[:, off: off + ranks[i]].mul_(s)
        out = torch.addmm(b, sx, B.t()) if b is not None else sx @ B.t()
        outs.append(out.addmm_(x, _dense(w).t()))
        off += ranks[i]
    return tuple(outs), ranks, A_cat, sax


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_x, A, B, scale):
        out, sax = _linear_forward(x, weight, bias, lora_x, A, B, scale)
        ctx.scale = scale
        ctx.has_dropout = lora_x is not None
        ctx.lazy_weight = None if isinstance(weight, Tensor) else weight
        ctx.save_for_backward(x, lora_x, *_saveable([weight]), A, B, sax)
        return out

    @staticmethod
    def backward(ctx, g):
        x, lora_x, weight, A, B, sax = ctx.saved_tensors
        weight = _dense(ctx.lazy_weight) if ctx.lazy_weight is not None else weight
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
            else:  # g_ax·A first, then g·W0 accumulated into it by the big GEMM (the forward's order)
                grad_x = (g_ax @ A).addmm_(g, weight)
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
        n = len(scales)
        outs, ranks, A_cat, sax = _shared_forward(x, scales, ts[:n], ts[n:])
        ctx.ranks, ctx.scales = ranks, scales
        ctx.lazy = {j: t for j, t in enumerate(ts[n:]) if t is not None and not isinstance(t, Tensor)}
        ctx.save_for_backward(x, A_cat, sax, *_saveable(ts[n:]))
        return outs

    @staticmethod
    def backward(ctx, *gs):
        x, A_cat, sax, *wbB = ctx.saved_tensors
        wbB = [ctx.lazy.get(j, t) for j, t in enumerate(wbB)]
        need = ctx.needs_input_grad
        ranks, scales, n = ctx.ranks, ctx.scales, len(ctx.scales)
        g_ax = torch.cat([(g @ wbB[3 * i + 2]).mul_(s) for i, (g, s) in enumerate(zip(gs, scales))], dim=1)
        grad_x = grad_A = None
        if need[0]:  # one chain: g_ax·A_cat + g_1·W_1 + ... + g_n·W_n
            grad_x = g_ax @ A_cat
            for i, g in enumerate(gs):
                grad_x.addmm_(g, _dense(wbB[3 * i]))  # one 4-bit weight dequantized at a time
        if any(need[2: 2 + n]):
            grad_A = (g_ax.t() @ x).split(ranks)  # one pass over x for every A
        rest, off = [], 0
        for i, (g, r, s) in enumerate(zip(gs, ranks, scales)):
            nw, nb, nB = need[2 + n + 3 * i: 5 + n + 3 * i]
            rest += [g.t() @ x if nw else None, g.sum(0) if nb else None,
                     (sax[:, off: off + r].t() @ g).t() if nB else None]
            off += r
        return (grad_x, None, *(grad_A or [None] * n), *rest)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                lora_x: Tensor | None = None) -> Tensor:
    """Returns x·W0ᵀ + b + s·(lora_x·Aᵀ)·Bᵀ for x of any leading shape; lora_x (dropout(x)) defaults to x."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    lx2 = None if lora_x is None else lora_x.reshape(-1, shape[-1])
    if needs_grad(x, weight, bias, lora_x, A, B):
        out = _LoraLinear.apply(x2, weight, bias, lx2, A, B, float(scale))
    else:  # inference: the same ops without autograd's bookkeeping
        out = _linear_forward(x2, weight, bias, lx2, A, B, float(scale))[0]
    return out.view(*shape[:-1], out.shape[-1])


def lora_linear_shared(x: Tensor, weights, biases, As, Bs, scales) -> tuple[Tensor, ...]:
    """Returns (lora_linear(x, weights[i], biases[i], As[i], Bs[i], scales[i]) for each i), computed together."""
    shape = x.shape
    wbB = [t for i in range(len(As)) for t in (weights[i], biases[i], Bs[i])]
    x2, scales = x.reshape(-1, shape[-1]), tuple(float(s) for s in scales)
    if needs_grad(x, *As, *wbB):
        outs = _LoraLinearShared.apply(x2, scales, *As, *wbB)
    else:
        outs = _shared_forward(x2, scales, As, wbB)[0]
    return tuple(o.view(*shape[:-1], o.shape[-1]) for o in outs)


def lora_delta(base_out: Tensor, lora_x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Returns base_out + s·(lora_x·Aᵀ)·Bᵀ for inputs of any leading shape."""
    shape = base_out.shape
    b2, lx2 = base_out.reshape(-1, shape[-1]), lora_x.reshape(-1, lora_x.shape[-1])
    if needs_grad(base_out, lora_x, A, B):
        out = _LoraDelta.apply(b2, lx2, A, B, float(scale))
    else:
        out = torch.addmm(b2, lx2 @ A.t(), B.t(), alpha=float(scale))
    return out.view(shape)


def lora_update(lora_x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Returns s·(lora_x·Aᵀ)·Bᵀ alone (used for row subsets in mixed-adapter batches)."""
    return (lora_x @ A.t()) @ B.t() * scale
