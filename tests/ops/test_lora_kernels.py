"""The fused hot path against the plain equation h = x·W0ᵀ + b + s·(lx·Aᵀ)·Bᵀ, differentiated by autograd."""
from __future__ import annotations

import pytest
import torch

from lorakit.ops.lora import lora_delta, lora_linear, lora_linear_shared, lora_update

K, D, R, S = 12, 10, 3, 1.75


def _tensors(shape, bias: bool, train_base: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rnd(*shape, K).requires_grad_()
    w = rnd(D, K).requires_grad_(train_base)
    b = rnd(D).requires_grad_(train_base) if bias else None
    A, B = rnd(R, K).requires_grad_(), rnd(D, R).requires_grad_()
    return x, w, b, A, B


def _mask(x, p: float, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(x.shape, generator=g, dtype=x.dtype) >= p).to(x.dtype) / (1 - p)


def _grads(out, inputs, seed: int = 2):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    live = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, live, g)


@pytest.mark.parametrize("shape", [(7,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.4], ids=["p0", "p0.4"])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trainbase"])
def test_lora_linear_matches_plain_equation(shape, bias, dropout, train_base):
    x, w, b, A, B = _tensors(shape, bias, train_base)
    mask = _mask(x, dropout) if dropout else None

    lx = x * mask if dropout else None
    fused = lora_linear(x, w, b, A, B, S, lx)
    lx_ref = x * mask if dropout else x
    ref = x @ w.t() + (b if b is not None else 0) + S * (lx_ref @ A.t()) @ B.t()

    assert fused.shape == (*shape, D)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(fused, [x, w, b, A, B]), _grads(ref, [x, w, b, A, B])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_lora_linear_saves_no_copy_of_a_contiguous_input():
    # reshape of a contiguous input must be a view: the function saves x itself, not a copy.
    x, w, b, A, B = _tensors((2, 5), False, False)
    out = lora_linear(x, w, b, A, B, S)
    saved = out.grad_fn.next_functions[0][0].saved_tensors  # ViewBackward -> _LoraLinearBackward
    assert any(t.data_ptr() == x.data_ptr() for t in saved)


def test_lora_linear_non_contiguous_input():
    x, w, b, A, B = _tensors((5, 2), True, False)
    xt = x.transpose(0, 1)  # (2, 5, K), not contiguous
    fused = lora_linear(xt, w, b, A, B, S)
    ref = xt @ w.t() + b + S * (xt @ A.t()) @ B.t()
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(fused, [x, A, B]), _grads(ref, [x, A, B])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(7,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("dropout", [0.0, 0.4], ids=["p0", "p0.4"])
def test_lora_delta_matches_plain_equation(shape, dropout):
    x, w, b, A, B = _tensors(shape, True, True)
    mask = _mask(x, dropout) if dropout else 1.0
    fused = lora_delta(x @ w.t() + b, x * mask, A, B, S)
    ref = x @ w.t() + b + S * ((x * mask) @ A.t()) @ B.t()
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(fused, [x, w, b, A, B]), _grads(ref, [x, w, b, A, B])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_lora_update_is_the_delta_alone():
    x, w, b, A, B = _tensors((4,), False, False)
    torch.testing.assert_close(lora_update(x, A, B, S), S * x @ (B @ A).t(), rtol=1e-12, atol=1e-12)


def test_fp32_matches_fp64_reference():
    x, w, b, A, B = _tensors((3, 4), True, False)
    out32 = lora_linear(x.float(), w.float(), b.float(), A.float(), B.float(), S)
    ref = x @ w.t() + b + S * (x @ A.t()) @ B.t()
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(7,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trainbase"])
def test_lora_linear_shared_matches_separate_equations(shape, bias, train_base):
    # q, k, v-like projections of one input, with different widths, ranks and scales
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rnd(*shape, K).requires_grad_()
    dims, ranks, scales = (D, 6, D), (R, 2, 5), (S, 0.5, 2.0)
    ws = [rnd(d, K).requires_grad_(train_base) for d in dims]
    bs = [rnd(d).requires_grad_(train_base) if bias else None for d in dims]
    As = [rnd(r, K).requires_grad_() for r in ranks]
    Bs = [rnd(d, r).requires_grad_() for d, r in zip(dims, ranks)]

    outs = lora_linear_shared(x, ws, bs, As, Bs, scales)
    refs = [x @ w.t() + (b if b is not None else 0) + s * (x @ A.t()) @ B.t()
            for w, b, A, B, s in zip(ws, bs, As, Bs, scales)]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    inputs = [x, *ws, *bs, *As, *Bs]
    cot = [torch.randn(r.shape, generator=g, dtype=r.dtype) for r in refs]
    live = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(outs, live, cot)
    want = torch.autograd.grad(refs, live, cot)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lora_linear_shared_with_an_unused_output():
    x, w, b, A, B = _tensors((2, 5), True, False)
    q, k = lora_linear_shared(x, [w, w], [b, None], [A, A * 2], [B, B], [S, S])
    (gx,) = torch.autograd.grad(q.sum(), [x])  # k unused: its gradient arrives as zeros
    (want,) = torch.autograd.grad((x @ w.t() + b + S * (x @ A.t()) @ B.t()).sum(), [x])
    torch.testing.assert_close(gx, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- no-grad fast path
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_no_grad_path_skips_autograd_and_equals_the_grad_path(bias, monkeypatch):
    import lorakit.ops.lora as F_
    x, w, b, A, B = _tensors((2, 5), bias, train_base=False)
    with_grad = lora_linear(x, w, b, A, B, S)
    lx = x * _mask(x, 0.3)
    shared_grad = lora_linear_shared(x, [w, w], [b, b], [A, A[:2]], [B, B[:, :2]], [S, 0.5])
    delta_grad = lora_delta(with_grad, lx, A, B, S)

    def refuse(*a, **k):
        raise AssertionError("autograd.Function used without a gradient")
    for fn in ("_LoraLinear", "_LoraLinearShared", "_LoraDelta"):
        monkeypatch.setattr(getattr(F_, fn), "apply", refuse)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            assert torch.equal(lora_linear(x, w, b, A, B, S), with_grad)  # same ops: bit for bit
            for o, r in zip(lora_linear_shared(x, [w, w], [b, b], [A, A[:2]], [B, B[:, :2]], [S, 0.5]), shared_grad):
                assert torch.equal(o, r)
            torch.testing.assert_close(lora_delta(with_grad, lx, A, B, S), delta_grad, rtol=1e-12, atol=1e-12)
    # grad enabled but nothing requires grad: also the plain path
    d = [t.detach() if t is not None else None for t in (x, w, b, A, B)]
    assert not lora_linear(*d, S).requires_grad


# ------------------------------------------------------------------------------------------- linear_cross_entropy
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("train_head", [False, True], ids=["frozen", "trained"])
@pytest.mark.parametrize("chunk", [4, 64])
def test_linear_cross_entropy_matches_full_logits(bias, train_head, chunk):
    from lorakit.ops.cross_entropy import linear_cross_entropy
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, K, generator=g, requires_grad=True)
    w = torch.randn(50, K, generator=g).requires_grad_(train_head)
    b = torch.randn(50, generator=g).requires_grad_(train_head) if bias else None
    t = torch.randint(0, 50, (3, 7), generator=g)
    t[0, 2] = t[2, 6] = -100
    ins = [v for v in (h, w, b) if v is not None and v.requires_grad]
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b).reshape(-1, 50), t.reshape(-1),
                                            reduction="sum")
    out = linear_cross_entropy(h, w, b, t, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    for a_, r_ in zip(torch.autograd.grad(out * 0.3, ins), torch.autograd.grad(ref * 0.3, ins)):
        torch.testing.assert_close(a_, r_, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, b, t, chunk=chunk), ref, rtol=1e-6, atol=1e-5)
