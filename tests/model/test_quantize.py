"""lorakit.quant (QLoRA): NF4 error level, LoRA on a 4-bit base vs the dense equation, training, adapters that
move to the fp32 base, merge paths, memory accounting and the no-backend error. Tiny random-init Llamas, CPU."""
from __future__ import annotations

import copy
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import quant as Q  # the old path: also checks the compat shim
from lorakit.ops import nf4
from lorakit.layers import LoraLayer, LoraLinear

from conftest import tiny_llama

pytest.importorskip("bitsandbytes")

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ids(batch=2, seq=9, seed=1):
    return torch.randint(3, 101, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def qlora(seed=0, r=8, init="kaiming", **cfg):
    """Returns (fp32 copy of the base, 4-bit model with LoRA on every projection)."""
    base = tiny_llama(seed, **cfg)
    fp32 = copy.deepcopy(base)
    model = Q.quantize(base)
    lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                             init_lora_weights=init))
    return fp32, model


def train(model, steps=8, lr=2e-2, x=None):
    """Returns the losses of `steps` AdamW steps on one fixed batch."""
    x = ids(4, 16, seed=3) if x is None else x
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------------- NF4 itself
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nf4_roundtrip_error_on_gaussian_weight(seed):
    torch.manual_seed(seed)
    linear = nn.Linear(1024, 512, bias=False)
    nn.init.normal_(linear.weight, std=0.02)
    w = linear.weight.detach().clone()
    layer = Q.quantize_linear(linear, block_size=64)
    err = (Q.dequantize_weight(layer) - w).norm() / w.norm()
    assert 0.090 < err.item() < 0.094  # measured 0.0920-0.0921: QLoRA's NF4 level at block size 64
    coarse = Q.quantize_linear(linear, block_size=256)  # bigger blocks, larger absmax, coarser grid
    assert (Q.dequantize_weight(coarse) - w).norm() / w.norm() > err


def test_requantize_roundtrip_is_idempotent():
    for double_quant, tol in ((False, 0.0), (True, 3e-4)):
        torch.manual_seed(0)
        layer = Q.quantize_linear(nn.Linear(256, 128), double_quant=double_quant)
        w = Q.dequantize_weight(layer)
        Q.requantize_weight(layer, w)
        # NF4 values are fixed points; only the 8-bit re-quantized absmax moves a little under double quant.
        err = (Q.dequantize_weight(layer) - w).norm() / w.norm()
        assert err <= tol, (double_quant, err)


def test_bits_per_parameter_with_double_quant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048, bias=False), nn.Linear(2048, 2048, bias=False))
    dq = Q.memory_report(Q.quantize(copy.deepcopy(model), double_quant=True))["bits_per_quantized_param"]
    plain = Q.memory_report(Q.quantize(model, double_quant=False))["bits_per_quantized_param"]
    assert 4.127 <= dq <= 4.13  # 4 + 8/64 + 32/(64*256) = 4.127, plus one codebook per model
    assert 4.5 <= plain <= 4.51  # an fp32 absmax per 64 weights


# ---------------------------------------------------------------------------- which layers, and when
def test_quantize_skips_embeddings_norms_head_and_named_modules():
    model = Q.quantize(tiny_llama(), skip=["mlp", "layers.1.self_attn.q_proj"])
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear" and kinds["model.embed_tokens"] == "Embedding"
    assert kinds["model.norm"] == "LlamaRMSNorm"
    assert kinds["model.layers.0.self_attn.q_proj"] == "Linear4bit"
    assert kinds["model.layers.1.self_attn.q_proj"] == "Linear" and kinds["model.layers.1.self_attn.k_proj"] == "Linear4bit"
    assert all(kinds[f"model.layers.{i}.mlp.{p}"] == "Linear" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj"))
    with pytest.raises(lorakit.ConfigError, match="bits=8"):
        Q.quantize(tiny_llama(), bits=8)


def test_quantize_before_or_after_inject_gives_the_same_model():
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="none")
    torch.manual_seed(5)
    before = lorakit.inject(Q.quantize(tiny_llama()), cfg)
    torch.manual_seed(5)
    after = Q.quantize(lorakit.inject(tiny_llama(), cfg))
    for model in (before, after):
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, LoraLinear) and Q.is_quantized_layer(q.base_layer) and q.fusable  # fused 4-bit path
        assert type(q.lora_A["default"]).__name__ == "Linear"  # the factors are never quantized
        assert Q.is_quantized_layer(model.model.layers[0].mlp.up_proj)  # untargeted layers too
    x = ids()
    torch.testing.assert_close(logits(before, x), logits(after, x), rtol=0, atol=0)
    trainable = {n for n, p in after.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


# ---------------------------------------------------------------------------- the equation on a 4-bit base
@pytest.mark.parametrize("training", [True, False])
def test_lora_on_4bit_base_equals_dense_equation_on_dequantized_weight(training):
    torch.manual_seed(0)
    layer = LoraLinear(Q.quantize_linear(nn.Linear(96, 80)))
    layer.add_adapter("default", r=4, alpha=8, init="none")
    layer.set_active(["default"])
    layer.train(training)
    A, B = layer.factors("default")
    W, b = Q.dequantize_weight(layer.base_layer), layer.base_layer.bias
    x = torch.randn(3, 5, 96, requires_grad=training)
    with torch.set_grad_enabled(training):
        got = layer(x)
        want = F.linear(x, W, b) + 2.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if training:
        g = torch.randn_like(got)
        grads = torch.autograd.grad(got, (x, A, B), g)
        ref = torch.autograd.grad(want, (x, A, B), g)
        for a, r in zip(grads, ref):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quant_type,nested,shape", [("nf4", True, (80, 96)), ("nf4", False, (130, 64)),
                                                     ("fp4", True, (64, 192))])
def test_dequantize_into_workspace_equals_bitsandbytes(quant_type, nested, shape):
    from bitsandbytes.functional import dequantize_4bit
    layer = Q.quantize_linear(nn.Linear(shape[1], shape[0]), quant_type=quant_type, double_quant=nested)
    want = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    got = Q.Dequantized(layer.weight).dense()
    assert got.shape == shape and torch.equal(got, want)


def _bitsandbytes_path(model):
    # The reference: every 4-bit base runs bitsandbytes' own Linear4bit forward, LoRA added on top.
    from lorakit.model.shared_input import unfuse
    unfuse(model)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.fusable = False
    return model


def test_fused_4bit_path_matches_bitsandbytes_linear4bit_forward_and_grads():
    _, fused = qlora(init="none")
    ref = _bitsandbytes_path(copy.deepcopy(fused))
    assert fused.model.layers[0].self_attn.q_proj.shared_group is not None  # q,k,v share one A GEMM here too
    x = ids(2, 12, seed=6)
    outs = []
    for model in (fused, ref):
        model.train()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        outs.append(out.logits.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    named = dict(ref.named_parameters())
    grads = [(p.grad, named[n].grad) for n, p in fused.named_parameters() if p.requires_grad]
    assert len(grads) == 2 * 7 * 2
    for g, r in grads:
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_fused_4bit_path_reuses_one_buffer_for_every_layer():
    _, model = qlora()
    Q.free_workspace()
    model.train()
    x = ids(2, 12)
    model(input_ids=x, labels=x).loss.backward()
    pool = nf4._local.pool
    largest = max(m.in_features * m.out_features for m in model.modules() if Q.is_quantized_layer(m))
    assert list(pool) == [(torch.device("cpu"), torch.float32)] and pool[list(pool)[0]].numel() == largest


def test_4bit_layer_with_another_compute_dtype_takes_the_bitsandbytes_path():
    torch.manual_seed(0)
    layer = LoraLinear(Q.quantize_linear(nn.Linear(64, 32), compute_dtype=torch.bfloat16))
    layer.add_adapter("default", r=4, alpha=8, init="none")
    layer.set_active(["default"])
    x = torch.randn(4, 64)
    assert layer.fused_weight(x, "default") is None  # bitsandbytes computes the base in bf16, as asked
    A, B = layer.factors("default")
    want = layer.base_layer(x) + 2.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- training
def test_qlora_loss_decreases():
    _, model = qlora()
    losses = train(model, steps=8)
    assert losses[-1] < losses[0] - 0.3, losses
    assert Q.is_quantized_layer(model.model.layers[0].self_attn.q_proj.base_layer)  # the base stayed 4-bit


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_quantized_base(use_reentrant):
    _, plain = qlora(init="none")
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:  # reentrant checkpointing only backpropagates when its inputs require grad
        ckpt.enable_input_require_grads()
    x = ids(2, 12, seed=4)
    for model in (plain, ckpt):
        model.train()
        model(input_ids=x, labels=x).loss.backward()
    named = dict(ckpt.named_parameters())
    grads = [(p.grad, named[n].grad) for n, p in plain.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and c is not None for g, c in grads)
    for g, c in grads:
        torch.testing.assert_close(c, g, rtol=1e-4, atol=1e-6)
    ckpt.zero_grad()
    losses = train(ckpt, steps=6)
    assert losses[-1] < losses[0] - 0.1, losses


# ---------------------------------------------------------------------------- adapters move to the fp32 base
def test_adapter_trained_on_4bit_base_loads_into_fp32_base(tmp_path):
    fp32, model = qlora(hidden_size=64, intermediate_size=128)
    train(model, steps=6)
    lorakit.save_adapter(model, tmp_path / "a")
    _, tensors = lorakit.read_adapter(tmp_path / "a")
    assert tensors and all(".lora_" in k for k in tensors) and all(t.dtype == torch.float32 for t in tensors.values())

    base32 = copy.deepcopy(fp32)
    lorakit.load_adapter(fp32, tmp_path / "a")
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for got, want in zip(fp32.get_submodule(name).factors("default"), module.factors("default")):
                assert torch.equal(got, want)
    x = ids()
    got, want = logits(fp32, x), logits(model, x)
    base_q = Q.quantize(copy.deepcopy(base32))
    rel = (got - want).norm() / got.norm()
    base_rel = (logits(base32, x) - logits(base_q, x)).norm() / logits(base32, x).norm()  # 4 bits on the base alone
    assert 0 < rel <= 2 * base_rel, (rel, base_rel)  # measured: rel 0.10-0.18, base_rel 0.10-0.13
    assert (got - logits(base32, x)).norm() > 3 * (got - want).norm()  # the adapter visibly changed the outputs
    # The whole difference is the base's quantization: fp32 base + adapter, with W0 replaced by dequant(NF4(W0)).
    torch.testing.assert_close(logits(Q.dequantize(Q.quantize(fp32)), x), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- merging
def test_merge_and_unload_default_returns_dequantized_model_with_exact_merge():
    _, model = qlora(init="none")
    x = ids()
    want = logits(model, x)
    merged = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) or Q.is_quantized_layer(m) for m in merged.modules())
    q = merged.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == torch.float32
    torch.testing.assert_close(logits(merged, x), want, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_requantize_warns_with_the_measured_logit_difference():
    _, model = qlora(init="none")
    x = ids(1, 11, seed=7)
    want = logits(model, x)
    with pytest.warns(Q.RequantizationWarning, match=r"max \|logit difference\| = ") as record:
        merged = lorakit.merge_and_unload(model, requantize=True, example_inputs=x)
    assert Q.is_quantized_layer(merged.model.layers[0].self_attn.q_proj)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    printed = float(re.search(r"max \|logit difference\| = ([0-9.eE+-]+)", str(record[0].message)).group(1))
    measured = (logits(merged, x) - want).abs().max().item()
    assert measured > 0 and printed == pytest.approx(measured, rel=1e-3)


def test_merge_requantize_without_inputs_uses_default_token_ids():
    _, model = qlora(init="none")
    with pytest.warns(Q.RequantizationWarning, match=r"max \|logit difference\| = \d"):
        Q.merge_and_unload_quantized(model, requantize=True)


def test_dequantize_model_matches_quantized_outputs():
    model = Q.quantize(tiny_llama())
    x = ids()
    want = logits(model, x)
    Q.dequantize(model)
    assert not Q.is_quantized(model)
    torch.testing.assert_close(logits(model, x), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- memory report
def test_memory_report_counts_frozen_trainable_grads_and_adamw_state():
    fp32_model = tiny_llama(hidden_size=128, intermediate_size=256)
    fp32_report = Q.memory_report(fp32_model)
    fp32_bytes = fp32_report["frozen_bytes"] + fp32_report["trainable_bytes"]  # nothing is frozen before inject
    _, model = qlora(hidden_size=128, intermediate_size=256)
    report = Q.memory_report(model)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["trainable_params"] == lora and report["trainable_bytes"] == 4 * lora
    assert report["grad_bytes"] == 4 * lora and report["optimizer_bytes"] == 8 * lora
    linear = sum(m.weight.numel() for n, m in fp32_model.named_modules() if n.endswith(PROJ))
    assert report["quantized_params"] == linear
    # The projections shrink ~7.7x; embeddings and head stay fp32.
    saved = fp32_bytes - report["frozen_bytes"]
    assert saved == pytest.approx(4 * linear * (1 - report["bits_per_quantized_param"] / 32), rel=0.01)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    train_x = ids(2, 8)
    model(input_ids=train_x, labels=train_x).loss.backward()
    opt.step()
    measured = Q.memory_report(model, opt)["optimizer_bytes"]
    assert 8 * lora <= measured <= 8 * lora + 64 * len(opt.state)  # two fp32 moments (+ step counters)
    text = Q.format_memory_report(report)
    assert "frozen weights" in text and "bits/param" in text and "optimizer state" in text


# ---------------------------------------------------------------------------- no backend
def test_clear_error_when_bitsandbytes_is_missing(monkeypatch):
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes `import` raise ImportError
    with pytest.raises(Q.QuantizationBackendError, match="bitsandbytes") as info:
        Q.quantize(tiny_llama())
    assert isinstance(info.value, lorakit.LorakitError) and "pip install bitsandbytes" in str(info.value)


def test_clear_error_when_the_device_has_no_4bit_kernel(monkeypatch):
    import bitsandbytes.functional as bf

    def unsupported(*a, **k):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(nf4, "_checked_devices", set())
    monkeypatch.setattr(bf, "quantize_4bit", unsupported)
    model = tiny_llama()
    with pytest.raises(Q.QuantizationBackendError, match="device 'cpu'"):
        Q.quantize(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # nothing was half-converted
