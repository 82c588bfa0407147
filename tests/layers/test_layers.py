"""Every wrapper against the dense equation h = W0·x + s·(B·A)·x, computed independently, and against loralib."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear, LoraMergedLinear


def _randomize(layer, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer


def _grads(out, tensors):
    g = torch.Generator().manual_seed(7)
    upstream = torch.randn(out.shape, generator=g)
    return torch.autograd.grad(out, tensors, upstream)


def _conv1d_gpt2(k, d):
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    layer = Conv1D(d, k)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_dense_equation(shape, bias, rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=4, alpha=6, use_rslora=rslora)
    layer.set_active(["default"])
    _randomize(layer)
    A, B = layer.factors("default")
    s = 6 / math.sqrt(4) if rslora else 6 / 4
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    dense = x @ (base.weight + s * B @ A).t() + (base.bias if bias else 0)
    assert torch.allclose(out, dense, atol=1e-5)
    got = _grads(out, [x, A, B])
    want = _grads(dense, [x, A, B])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_linear_dropout_grads_match_dense_with_same_mask():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=4, alpha=8, dropout=0.5)
    layer.set_active(["default"])
    layer.train()
    _randomize(layer)
    A, B = layer.factors("default")
    x = torch.randn(6, 12, requires_grad=True)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    dense = base(x) + 2 * (dropped @ A.t()) @ B.t()
    assert torch.allclose(out, dense, atol=1e-5)
    for a, b in zip(_grads(out, [x, A, B]), _grads(dense, [x, A, B])):
        assert torch.allclose(a, b, atol=1e-5)


def test_gpt2_conv1d_fan_in_fan_out_detected_and_exact():
    base = _conv1d_gpt2(12, 9)
    layer = LoraLinear(base)
    assert layer.fan_in_fan_out
    layer.add_adapter("default", r=3, alpha=3)
    layer.set_active(["default"])
    _randomize(layer)
    A, B = layer.factors("default")
    x = torch.randn(2, 4, 12, requires_grad=True)
    out = layer(x)
    dense = x @ (base.weight.t() + B @ A).t() + base.bias
    assert torch.allclose(out, dense, atol=1e-5)
    for a, b in zip(_grads(out, [x, A, B]), _grads(dense, [x, A, B])):
        assert torch.allclose(a, b, atol=1e-5)
    layer.merge()
    assert torch.allclose(layer(x), dense, atol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_merged_linear_slices_match_dense(conv1d):
    torch.manual_seed(0)
    base = _conv1d_gpt2(8, 12) if conv1d else nn.Linear(8, 12)
    layer = LoraMergedLinear(base, [True, False, True])
    layer.add_adapter("default", r=2, alpha=4)
    layer.set_active(["default"])
    _randomize(layer)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W0 = base.weight.t() if conv1d else base.weight
    delta = torch.zeros(12, 8)
    delta[0:4] = B[0:4] @ A[0:2]       # q slice: first r rows of A, first d/3 rows of B
    delta[8:12] = B[4:8] @ A[2:4]      # v slice
    x = torch.randn(3, 8, requires_grad=True)
    out = layer(x)
    dense = x @ (W0 + 2 * delta).t() + base.bias
    assert torch.allclose(out, dense, atol=1e-5)
    assert torch.allclose(out[:, 4:8], (x @ W0.t() + base.bias)[:, 4:8], atol=1e-6)  # k slice untouched
    for a, b in zip(_grads(out, [x, A, B]), _grads(dense, [x, A, B])):
        assert torch.allclose(a, b, atol=1e-5)


def test_embedding_matches_dense():
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = LoraEmbedding(base)
    layer.add_adapter("default", r=3, alpha=6)
    layer.set_active(["default"])
    _randomize(layer)
    A, B = layer.factors("default")
    x = torch.tensor([[1, 5, 0], [19, 2, 2]])
    out = layer(x)
    table = base.weight + 2 * (B @ A).t()
    dense = table[x]
    assert torch.allclose(out, dense, atol=1e-5)
    gA, gB = _grads(out, [A, B])
    wA, wB = _grads(dense, [A, B])
    assert torch.allclose(gB, wB, atol=1e-5)
    # the padding token's column gets no gradient, as nn.Embedding(padding_idx=0) does for its own row
    assert torch.equal(gA[:, 0], torch.zeros(3))
    assert torch.allclose(gA[:, 1:], wA[:, 1:], atol=1e-5)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_matches_dense(dim):
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    base = conv(3, 5, 3, padding=1, stride=1)
    layer = LoraConv(base)
    layer.add_adapter("default", r=2, alpha=4)
    layer.set_active(["default"])
    _randomize(layer)
    A, B = layer.factors("default")
    x = torch.randn(2, 3, *([6] * dim), requires_grad=True)
    out = layer(x)
    delta = (B.reshape(5, 2) @ A.reshape(2, -1)).reshape(base.weight.shape)
    dense = fn(x, base.weight + 2 * delta, base.bias, padding=1)
    assert torch.allclose(out, dense, atol=1e-4)
    for a, b in zip(_grads(out, [x, A, B]), _grads(dense, [x, A, B])):
        assert torch.allclose(a, b, atol=1e-4)
    layer.merge()
    assert torch.allclose(layer(x), dense, atol=1e-4)


def test_dora_matches_dense_formula():
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=3, alpha=6, use_dora=True)
    layer.set_active(["default"])
    _randomize(layer)
    A, B = layer.factors("default")
    m = layer.lora_magnitude_vector["default"]
    x = torch.randn(4, 10)
    W = base.weight + 2 * B @ A
    dense = x @ (m[:, None] * W / W.norm(dim=1, keepdim=True)).t() + base.bias
    assert torch.allclose(layer(x), dense, atol=1e-5)
    layer.merge()
    assert torch.allclose(layer(x), dense, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer(x), dense, atol=1e-5)


def _all_kinds():
    torch.manual_seed(0)
    yield "linear", LoraLinear(nn.Linear(12, 10)), torch.randn(3, 12)
    yield "conv1d_gpt2", LoraLinear(_conv1d_gpt2(12, 10)), torch.randn(3, 12)
    yield "merged", LoraMergedLinear(nn.Linear(12, 9), [True, False, True]), torch.randn(3, 12)
    yield "embedding", LoraEmbedding(nn.Embedding(30, 8)), torch.randint(0, 30, (3, 5))
    yield "conv2d", LoraConv(nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 7, 7)


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "merged", "embedding", "conv2d"])
def test_merge_equals_unmerged_and_round_trip(kind):
    name, layer, x = next(item for item in _all_kinds() if item[0] == kind)
    w0 = layer.base_weight.detach().clone()
    layer.add_adapter("default", r=2, alpha=5)
    layer.set_active(["default"])
    _randomize(layer)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["default"]
        merged = layer(x)
        assert (merged - unmerged).abs().max() <= 1e-5
        layer.unmerge()
    rel = (layer.base_weight - w0).norm() / w0.norm()
    assert rel <= 1e-6


def test_merge_in_fp32_for_bf16_weights():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 16).to(torch.bfloat16))
    layer.add_adapter("default", r=2, alpha=2)
    layer.set_active(["default"])
    _randomize(layer)
    A, B = layer.factors("default")
    expected = (layer.base_weight.float() + (B.float() @ A.float())).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.base_weight, expected)  # one rounding, from the fp32 sum


def test_disabled_or_merged_forward_is_base_only():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=2, alpha=2)
    layer.set_active(["default"])
    _randomize(layer)
    x = torch.randn(2, 8)
    layer.set_disabled(True)
    assert torch.equal(layer(x), base(x))
    assert layer.live == ()
    layer.set_disabled(False)
    layer.merge()
    assert layer.live == ()  # merged: no adapter work in forward


def test_train_eval_never_merges():
    layer = LoraLinear(nn.Linear(8, 8))
    layer.add_adapter("default", r=2, alpha=2)
    layer.set_active(["default"])
    w = layer.base_weight.detach().clone()
    _randomize(layer)
    layer.eval()
    layer.train()
    layer.eval()
    assert torch.equal(layer.base_weight, w) and layer.merged_adapters == []


# ---------------------------------------------------------------------------- loralib as reference
loralib = pytest.importorskip("loralib")


def _copy_factors_from_loralib(ours, ref, embedding=False):
    with torch.no_grad():
        A, B = ours.factors("default") if not isinstance(ours, LoraMergedLinear) else (
            ours.lora_A["default"].weight, ours.lora_B["default"].weight)
        A.copy_(ref.lora_A if not embedding else ref.lora_A)
        B.copy_(ref.lora_B if ref.lora_B.dim() == 2 else ref.lora_B.squeeze(-1))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_agrees_with_loralib(fan_in_fan_out):
    torch.manual_seed(0)
    ref = loralib.Linear(12, 10, r=4, lora_alpha=8, fan_in_fan_out=fan_in_fan_out, merge_weights=False)
    nn.init.normal_(ref.lora_B)
    ref.eval()
    base = nn.Linear(12, 10)
    with torch.no_grad():
        base.weight.copy_(ref.weight.t() if fan_in_fan_out else ref.weight)
        base.bias.copy_(ref.bias)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D
        conv = Conv1D(10, 12)
        with torch.no_grad():
            conv.weight.copy_(ref.weight)
            conv.bias.copy_(ref.bias)
        base = conv
    ours = LoraLinear(base)
    ours.add_adapter("default", r=4, alpha=8)
    ours.set_active(["default"])
    _copy_factors_from_loralib(ours, ref)
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_embedding_agrees_with_loralib():
    torch.manual_seed(0)
    ref = loralib.Embedding(30, 8, r=4, lora_alpha=8, merge_weights=False)
    nn.init.normal_(ref.lora_A)
    ref.eval()
    base = nn.Embedding(30, 8)
    with torch.no_grad():
        base.weight.copy_(ref.weight)
    ours = LoraEmbedding(base)
    ours.add_adapter("default", r=4, alpha=8)
    ours.set_active(["default"])
    with torch.no_grad():
        ours.lora_embedding_A["default"].copy_(ref.lora_A)
        ours.lora_embedding_B["default"].copy_(ref.lora_B)
    x = torch.randint(0, 30, (2, 6))
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_merged_linear_agrees_with_loralib():
    torch.manual_seed(0)
    ref = loralib.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True],
                               merge_weights=False)
    nn.init.normal_(ref.lora_B)
    ref.eval()
    base = nn.Linear(8, 12)
    with torch.no_grad():
        base.weight.copy_(ref.weight)
        base.bias.copy_(ref.bias)
    ours = LoraMergedLinear(base, [True, False, True])
    ours.add_adapter("default", r=2, alpha=4)
    ours.set_active(["default"])
    with torch.no_grad():
        ours.lora_A["default"].weight.copy_(ref.lora_A)
        ours.lora_B["default"].weight.copy_(ref.lora_B)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)
