"""The output head and its loss in chunks: cross-entropy of h·Wᵀ + b without holding all N x V logits."""
from __future__ import annotations

import torch
from torch import Tensor

from lorakit.ops.lora import needs_grad
from lorakit.ops.upcast import matmul, matmul_t


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, ignore_index):
        # h: (N, k); weight: (V, k). The gradients are computed here, chunk by chunk, while each chunk's logits
        # exist; backward only scales them by the incoming gradient. Peak: one (chunk, V) block, not (N, V) x 3.
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc, tc = h[i: i + chunk], targets[i: i + chunk]
            g = _chunk_loss(hc, weight, bias, tc, ignore_index, total, grads=True)
            if need_h:
                matmul(g.to(h.dtype), weight, out=grad_h[i: i + chunk])  # weight upcast by blocks if narrower
            if need_w:
                grad_w.addmm_(g.t(), hc.float())
            if need_b:
                grad_b += g.sum(0)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, go):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        wd, bd = ctx.dtypes
        return (None if grad_h is None else grad_h * go.to(grad_h.dtype),
                None if grad_w is None else (grad_w * go).to(wd),
                None if grad_b is None else (grad_b * go).to(bd), None, None, None)


def _chunk_loss(hc, weight, bias, tc, ignore_index, total, grads):
    # adds the chunk's summed cross-entropy to total; returns d(loss)/d(logits) = softmax - onehot (fp32) if grads
    if weight.dtype == hc.dtype:
        logits = (torch.addmm(bias, hc, weight.t()) if bias is not None else hc @ weight.t()).float()
    else:  # a bf16 head under fp32 compute: upcast by blocks of rows (lorakit.ops.upcast)
        logits = matmul_t(hc, weight)
        logits = logits + bias.to(logits.dtype) if bias is not None else logits
    valid = tc != ignore_index
    t = torch.where(valid, tc, 0)[:, None]
    lse = torch.logsumexp(logits, dim=1)
    total += ((lse - logits.gather(1, t).squeeze(1)) * valid).sum()
    if not grads:
        return None
    g = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' buffer
    g.scatter_add_(1, t, torch.full_like(t, -1, dtype=g.dtype))
    return g.mul_(valid[:, None])


def linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int = 256,
                         ignore_index: int = -100) -> Tensor:
    """Returns the summed cross-entropy of logits h·Wᵀ + b against targets, never holding all N x V logits.

    Equal to F.cross_entropy(F.linear(h, W, b).float(), targets, reduction="sum") up to summation order.
    """
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if needs_grad(h, weight, bias):
        return _LinearCrossEntropy.apply(h2, weight, bias, t2, int(chunk), ignore_index)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for i in range(0, h2.shape[0], chunk):
        _chunk_loss(h2[i: i + chunk], weight, bias, t2[i: i + chunk], ignore_index, total, grads=False)
    return total
