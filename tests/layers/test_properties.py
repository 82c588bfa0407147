"""Property-based tests (hypothesis): random shapes, ranks and configs keep the invariants."""
from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _fill(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters("default"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@SETTINGS
@given(k=st.integers(1, 24), d=st.integers(1, 24), r=st.integers(1, 9), batch=st.lists(st.integers(1, 4), min_size=0, max_size=2),
       alpha=st.floats(0.5, 64), rslora=st.booleans(), bias=st.booleans(), seed=st.integers(0, 10_000))
def test_linear_merged_equals_unmerged(k, d, r, batch, alpha, rslora, bias, seed):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(k, d, bias=bias))
    layer.add_adapter("default", r, alpha, use_rslora=rslora)
    layer.set_active(["default"])
    _fill(layer, seed)
    x = torch.randn(*batch, k)
    with torch.no_grad():
        a = layer(x)
        layer.merge()
        b = layer(x)
    assert a.shape == (*batch, d)
    assert torch.allclose(a, b, atol=1e-4 * max(1.0, a.abs().max().item()))


@SETTINGS
@given(V=st.integers(2, 40), d=st.integers(1, 16), r=st.integers(1, 6), seq=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_embedding_merged_equals_unmerged(V, d, r, seq, seed):
    torch.manual_seed(seed)
    layer = LoraEmbedding(nn.Embedding(V, d))
    layer.add_adapter("default", r, 2 * r)
    layer.set_active(["default"])
    _fill(layer, seed)
    x = torch.randint(0, V, (2, seq))
    with torch.no_grad():
        a = layer(x)
        layer.merge()
        assert torch.allclose(a, layer(x), atol=1e-5)


@SETTINGS
@given(cin=st.integers(1, 4), cout=st.integers(1, 4), ks=st.integers(1, 3), r=st.integers(1, 4), seed=st.integers(0, 1000))
def test_conv2d_merged_equals_unmerged(cin, cout, ks, r, seed):
    torch.manual_seed(seed)
    layer = LoraConv(nn.Conv2d(cin, cout, ks, padding=ks // 2))
    layer.add_adapter("default", r, r)
    layer.set_active(["default"])
    _fill(layer, seed)
    x = torch.randn(2, cin, 5, 5)
    with torch.no_grad():
        a = layer(x)
        layer.merge()
        assert torch.allclose(a, layer(x), atol=1e-4)


@SETTINGS
@given(r=st.integers(1, 8), alpha=st.integers(1, 32), targets=st.sets(st.sampled_from(
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), min_size=1),
    dora=st.booleans(), seed=st.integers(0, 1000))
def test_save_load_round_trip_is_exact(r, alpha, targets, dora, seed):
    from conftest import tiny_llama
    model = lorakit.inject(tiny_llama(), LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(targets), use_dora=dora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))
    with tempfile.TemporaryDirectory() as d:
        lorakit.save_adapter(model, d)
        again = lorakit.load_adapter(tiny_llama(), d)
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = dict(again.named_parameters())
    assert ours and all(torch.equal(p, theirs[n]) for n, p in ours.items())


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(["r", "lora_alpha", "lora_dropout", "bias", "init_lora_weights", "use_rslora"]),
                            st.one_of(st.integers(-3, 70), st.floats(-1, 2), st.just(float("nan")), st.text(max_size=8),
                                      st.booleans(), st.none())))
def test_config_parsing_accepts_valid_or_names_the_field(data):
    try:
        cfg = LoraConfig.from_dict(data)
    except ConfigError as e:
        assert "LoraConfig." in str(e) and any(k in str(e) for k in data)
        return
    except TypeError:  # a field given a value of a type the dataclass cannot take at all
        pytest.fail(f"LoraConfig.from_dict({data!r}) raised TypeError instead of ConfigError")
    assert cfg.r > 0 and 0 <= cfg.lora_dropout < 1 and cfg.bias in ("none", "all", "lora_only")
    assert isinstance(cfg.use_rslora, bool)
    assert LoraConfig.from_peft_dict(cfg.to_peft_dict()) == cfg
