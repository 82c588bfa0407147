"""Products with a narrower frozen weight (lorakit.ops.upcast) against the dense fp32 equation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit.ops.upcast as up
from lorakit.model.storage_dtype import UpcastEmbedding, UpcastLinear, keep_storage_dtype
from lorakit.ops.cross_entropy import linear_cross_entropy


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(up, "BLOCK_ELEMENTS", 3 * 64)  # several blocks, one short, on tiny shapes


def test_products_equal_the_upcast_equation():
    torch.manual_seed(0)
    w = torch.randn(10, 64).to(torch.bfloat16)
    x, g = torch.randn(7, 64), torch.randn(7, 10)
    torch.testing.assert_close(up.matmul_t(x, w), x @ w.float().t())
    torch.testing.assert_close(up.matmul(g, w), g @ w.float())


def test_upcast_linear_forward_and_input_gradient():
    torch.manual_seed(0)
    w, b = torch.randn(10, 64).to(torch.bfloat16), torch.randn(10).to(torch.bfloat16)
    x = torch.randn(2, 3, 64, requires_grad=True)
    out = up.upcast_linear(x, w, b)
    ref_x = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(ref_x, w.float(), b.float())
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_storage_dtype_modules_and_chunked_loss():
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 64).to(torch.bfloat16), nn.Linear(64, 10, bias=False).to(torch.bfloat16)
    emb.requires_grad_(False), head.requires_grad_(False)
    ids = torch.randint(0, 10, (2, 5))
    ref_rows = nn.functional.embedding(ids, emb.weight.float())
    assert keep_storage_dtype([emb, head, nn.ReLU()]) == 2
    assert type(emb) is UpcastEmbedding and type(head) is UpcastLinear and isinstance(head, nn.Linear)
    assert emb.weight.dtype == torch.bfloat16 and list(head.state_dict()) == ["weight"]
    rows = emb(ids)
    assert rows.dtype == torch.float32 and torch.equal(rows, ref_rows)
    torch.testing.assert_close(head(rows), rows @ head.weight.float().t())
    h = torch.randn(12, 64, requires_grad=True)
    t = torch.randint(0, 10, (12,))
    loss = linear_cross_entropy(h, head.weight, None, t, chunk=5)
    h2 = h.detach().clone().requires_grad_()
    ref = nn.functional.cross_entropy(h2 @ head.weight.float().t(), t, reduction="sum")
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(h.grad, h2.grad)
