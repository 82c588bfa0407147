"""fuse_shared_inputs: the same logits and gradients as the unfused model, with fewer passes over x."""
from __future__ import annotations

import copy

import pytest
import torch

import lorakit
import lorakit.ops.lora as F_
from lorakit.model.shared_input import SharedInputGroup, fuse_shared_inputs, unfuse
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pair(dropout: float = 0.0, **cfg):
    model = tiny_llama().double()
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout,
                                             init_lora_weights=False, rank_pattern={"k_proj": 2}, **cfg))
    unfuse(model)  # inject fuses by default; these tests fuse explicitly
    fused = copy.deepcopy(model)
    return model, fused, fuse_shared_inputs(fused)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def _count_shared_calls(monkeypatch):
    calls = []
    real = F_.lora_linear_shared

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr("lorakit.model.shared_input.lora_linear_shared", spy)
    return calls


def test_fused_model_matches_unfused_logits_and_grads(monkeypatch):
    plain, fused, n = _pair()
    assert n == 2 * 2  # (q,k,v) and (gate,up) in each of 2 layers
    calls = _count_shared_calls(monkeypatch)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    plain.train(), fused.train()
    logits_p, grads_p = _loss_and_grads(plain, ids)
    logits_f, grads_f = _loss_and_grads(fused, ids)
    assert len(calls) == 4
    torch.testing.assert_close(logits_f, logits_p, rtol=1e-12, atol=1e-12)
    assert grads_f.keys() == grads_p.keys()
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-10, atol=1e-12)
    # nothing left pending after the forward: no tensors kept alive between steps
    groups = {id(m.shared_group): m.shared_group for m in fused.modules() if getattr(m, "shared_group", None)}
    assert all(g._pending == {} and g._x is None for g in groups.values())


def test_fused_eval_no_grad_and_checkpointing(monkeypatch):
    plain, fused, _ = _pair()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-12, atol=1e-12)
    for m in (plain, fused):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, grads_p = _loss_and_grads(plain, ids)
    _, grads_f = _loss_and_grads(fused, ids)
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-10, atol=1e-12)


def test_falls_back_with_dropout_disabled_or_merged(monkeypatch):
    plain, fused, _ = _pair(dropout=0.3)
    calls = _count_shared_calls(monkeypatch)
    ids = torch.randint(0, 101, (1, 5), generator=torch.Generator().manual_seed(2))
    fused.train()
    fused(input_ids=ids)
    assert calls == []  # dropout active in training: per-layer path (own masks)
    fused.eval()
    with torch.no_grad():
        fused(input_ids=ids)
        assert len(calls) == 4  # eval: dropout off, fused
        with lorakit.disable_adapters(fused):
            fused(input_ids=ids)
        assert len(calls) == 4  # disabled: base path
    lorakit.merge(fused)
    with torch.no_grad():
        n = len(calls)
        torch.testing.assert_close(fused(input_ids=ids).logits, plain.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-6)  # merging rounds through fp32
        assert len(calls) == n  # merged: nothing live, base path


def test_different_input_objects_are_not_confused():
    lin = [torch.nn.Linear(6, 5, dtype=torch.float64) for _ in range(2)]
    parent = torch.nn.Module()
    parent.gate_proj, parent.up_proj = lin
    lorakit.inject(parent, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj"],
                                              init_lora_weights=False))
    unfuse(parent)  # inject fuses by default; these tests fuse explicitly
    ref = copy.deepcopy(parent)
    assert fuse_shared_inputs(parent) == 1
    x1, x2 = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    g1 = parent.gate_proj(x1)
    u2 = parent.up_proj(x2)  # another input: must not reuse x1's pending up output
    torch.testing.assert_close(g1, ref.gate_proj(x1))
    torch.testing.assert_close(u2, ref.up_proj(x2))
    x1.mul_(2)  # in-place change after the first call: the pending output is stale, recompute
    g = parent.gate_proj(x1)
    u = parent.up_proj(x1)
    torch.testing.assert_close(u, ref.up_proj(x1))
    torch.testing.assert_close(g, ref.gate_proj(x1))
    assert unfuse(parent) == 2
    assert isinstance(SharedInputGroup([parent.gate_proj]), SharedInputGroup)


def test_group_turns_itself_off_when_siblings_read_different_inputs(monkeypatch):
    # cross-attention shape: q reads the decoder states, k and v the encoder states
    parent = torch.nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = [torch.nn.Linear(6, 4, dtype=torch.float64) for _ in range(3)]
    lorakit.inject(parent, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                              init_lora_weights=False))
    unfuse(parent)  # inject fuses by default; these tests fuse explicitly
    ref = copy.deepcopy(parent)
    assert fuse_shared_inputs(parent) == 1
    calls = _count_shared_calls(monkeypatch)
    group = parent.q_proj.shared_group
    for _ in range(3):
        dec, enc = torch.randn(3, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
        for name, x in (("q_proj", dec), ("k_proj", enc), ("v_proj", enc)):
            torch.testing.assert_close(getattr(parent, name)(x), getattr(ref, name)(x), rtol=1e-12, atol=1e-12)
    assert group.misses == 2 and group.eligible() is None
    assert len(calls) == 2  # two wasted guesses in the first forward, then the per-layer path only
    assert group._pending == {} and group._x is None


def test_inject_fuses_by_default_and_unfuse_undoes_it():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=TARGETS))
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.shared_group is layer.self_attn.v_proj.shared_group is not None
    assert layer.mlp.gate_proj.shared_group is not None and layer.mlp.down_proj.shared_group is None
    assert unfuse(model) == 2 * 5
