"""lorakit.gptq (NF4 with GPTQ rounding): bitsandbytes' exact layout, RTN when inputs are uncorrelated, less
output error than round-to-nearest on correlated inputs, whole-model quantization and QLoRA training on it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.ops import gptq
from lorakit import quant as Q

from conftest import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402


def correlated_inputs(n=512, k=128, seed=0):
    # activations with a few strong shared directions, as in real models (not white noise)
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k)[None, :]
    return torch.randn(n, k, generator=g) @ mix.t() + 0.05 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("double_quant", [True, False])
def test_pack_4bit_reproduces_bitsandbytes_layout(double_quant):
    w = torch.randn(48, 128) * 0.03
    ref_q, ref_state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    levels = gptq.nf4_levels()
    absmax = w.reshape(-1, 64).abs().amax(1)
    codes = gptq.nearest_code((w.reshape(-1, 64) / absmax[:, None]).reshape(48, 128), levels)
    packed, state = gptq.pack_4bit(codes, absmax, torch.float32, 64, double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == ref_q.shape
    assert torch.equal(packed, ref_q)
    assert torch.equal(BF.dequantize_4bit(packed, state), BF.dequantize_4bit(ref_q, ref_state))


def test_gptq_with_uncorrelated_unit_inputs_is_round_to_nearest():
    w = torch.randn(32, 128) * 0.02
    codes, absmax = gptq.gptq_codes(w, torch.eye(128), damp=0.0)
    ref_q, ref_state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed, state = gptq.pack_4bit(codes, absmax, torch.float32, 64, double_quant=False)
    assert torch.equal(packed, ref_q)


def test_gptq_cuts_the_output_error_of_nearest_rounding():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.02
    x = correlated_inputs()
    layer_rtn = Q.quantize_linear(nn.Linear(128, 64, bias=False).requires_grad_(False))
    layer_rtn.weight = Q.quantize_linear(_linear(w)).weight
    layer_gptq = Q.quantize_linear(_linear(w), hessian=x.t() @ x)
    err = {}
    for name, layer in (("rtn", layer_rtn), ("gptq", layer_gptq)):
        wq = Q.dequantize_weight(layer)
        err[name] = ((x @ (w - wq).t()).norm() / (x @ w.t()).norm()).item()
    assert err["gptq"] < 0.75 * err["rtn"], err
    # the same format and size: bitsandbytes' Linear4bit with double-quantized statistics
    assert Q.is_quantized_layer(layer_gptq) and layer_gptq.weight.quant_state.nested
    assert layer_gptq.weight.numel() == w.numel() // 2


def _linear(w, bias=None):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def calib(n=8, seq=16, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 101, (1, seq), generator=g) for _ in range(n)]


def test_quantize_with_calibration_keeps_the_model_closer_than_nearest_rounding():
    fp32 = tiny_llama(hidden_size=64, intermediate_size=128)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # token embeddings on a few shared directions: correlated activations, as trained LMs have
        low_rank = torch.randn(101, 6, generator=g) @ torch.randn(6, 64, generator=g)
        fp32.model.embed_tokens.weight.copy_(low_rank + 0.05 * torch.randn(101, 64, generator=g))
    x = torch.cat(calib(4, seed=9))  # not the calibration rows
    with torch.no_grad():
        ref = fp32(input_ids=x).logits
    rtn = Q.quantize(copy.deepcopy(fp32))
    small_budget = 3 * 4 * 64 ** 2  # a few layers per calibration pass: several passes, earlier layers quantized
    cal = Q.quantize(copy.deepcopy(fp32), calibration=calib(), hessian_budget=small_budget)
    kinds = {type(m).__name__ for n, m in cal.named_modules() if n.endswith(("q_proj", "down_proj"))}
    assert kinds == {"Linear4bit"}
    err = {}
    for name, model in (("rtn", rtn), ("gptq", cal)):
        with torch.no_grad():
            err[name] = ((model(input_ids=x).logits - ref).norm() / ref.norm()).item()
    assert err["gptq"] < 0.8 * err["rtn"], err
    assert abs(Q.memory_report(cal)["bits_per_quantized_param"] - Q.memory_report(rtn)["bits_per_quantized_param"]) < 1e-9


def test_quantize_with_calibration_after_inject_then_qlora_trains():
    model = lorakit.inject(tiny_llama(hidden_size=64, intermediate_size=128),
                           lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    Q.quantize(model, calibration=calib())
    q = model.model.layers[0].self_attn.q_proj
    assert Q.is_quantized_layer(q.base_layer) and q.fusable
    x = torch.randint(3, 101, (4, 16), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_quantize_calibration_errors_are_clear():
    with pytest.raises(lorakit.ConfigError, match="calibration is empty"):
        Q.quantize(tiny_llama(hidden_size=64, intermediate_size=128), calibration=[])
    with pytest.warns(UserWarning, match="not a multiple of block_size"):  # hidden 32: half a block per row
        model = Q.quantize(tiny_llama(), calibration=calib())
    assert Q.is_quantized_layer(model.model.layers[0].self_attn.q_proj)  # rounded to nearest instead
