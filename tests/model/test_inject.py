"""Injection into real transformers architectures, checked against the real `peft` package."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import ConfigError, LoraConfig
from conftest import MODELS, model_inputs, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

CASES = {
    "llama": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen2": dict(target_modules=["q_proj", "v_proj"]),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc", "wte"]),
    "bert": dict(target_modules=["query", "value", "dense"], modules_to_save=["classifier"]),
}


def peft_name(name: str) -> str:
    """Maps a lorakit parameter name to PEFT's name for the same tensor."""
    name = "base_model.model." + name
    return name.replace("lora_magnitude_vector.default", "lora_magnitude_vector.default.weight")


def copy_into_peft(ours: nn.Module, theirs: nn.Module) -> int:
    """Copies every adapter tensor of `ours` into the PEFT model; returns how many were copied."""
    params = dict(theirs.named_parameters())
    n = 0
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                params[peft_name(name)].copy_(p)
                n += 1
    return n


def both(kind: str, **cfg):
    base = MODELS[kind]()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    lorakit.inject(ours, LoraConfig(**cfg))
    pm = peft.get_peft_model(ref, peft.LoraConfig(**cfg))
    return base, ours, pm


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("variant", ["plain", "rslora", "dora"])
def test_logits_match_peft(kind, variant):
    cfg = dict(CASES[kind], r=4, lora_alpha=8)
    if variant == "rslora":
        cfg["use_rslora"] = True
    if variant == "dora":
        cfg["use_dora"] = True
        cfg["target_modules"] = [t for t in cfg["target_modules"] if t != "wte"]
    _, ours, pm = both(kind, **cfg)
    randomize_lora(ours)
    assert copy_into_peft(ours, pm) > 0
    x = model_inputs(kind)
    with torch.no_grad():
        a, b = ours(**x).logits, pm(**x).logits
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", list(CASES))
def test_trainable_counts_match_peft(kind):
    cfg = dict(CASES[kind], r=4, lora_alpha=8, bias="lora_only" if kind == "bert" else "none")
    _, ours, pm = both(kind, **cfg)
    assert lorakit.trainable_parameters(ours) == tuple(pm.get_nb_trainable_parameters())


def test_all_linear_matches_peft_targets_and_excludes_head():
    _, ours, pm = both("llama", target_modules="all-linear", r=2)
    ours_targets = {n for n, m in ours.named_modules() if isinstance(m, lorakit.LoraLayer)}
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
              if type(m).__name__ == "Linear" and hasattr(m, "lora_A")}
    assert ours_targets == theirs
    assert "lm_head" not in ours_targets and len(ours_targets) == 14


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "qwen2"])
def test_whole_model_merge_equals_unmerged(kind):
    base = MODELS[kind]()
    lorakit.inject(base, LoraConfig(r=4, lora_alpha=16, **{k: v for k, v in CASES[kind].items()}))
    randomize_lora(base)
    x = model_inputs(kind)
    with torch.no_grad():
        unmerged = base(**x).logits
        lorakit.merge(base)
        merged = base(**x).logits
        lorakit.unmerge(base)
        again = base(**x).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (again - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unload_leaves_plain_model(kind):
    model = MODELS[kind]()
    lorakit.inject(model, LoraConfig(r=4, **CASES[kind]))
    randomize_lora(model)
    x = model_inputs(kind)
    with torch.no_grad():
        want = model(**x).logits
        plain = lorakit.merge_and_unload(model)
        got = plain(**x).logits
    assert not any("lora" in type(m).__name__.lower() or "ModulesToSave" == type(m).__name__ for m in plain.modules())
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    assert (got - want).abs().max() <= 1e-5


def test_unload_restores_base_outputs():
    model = tiny_llama()
    x = model_inputs("llama")
    with torch.no_grad():
        want = model(**x).logits
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    plain = lorakit.unload(model)
    with torch.no_grad():
        assert torch.equal(plain(**x).logits, want)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_keep_output_at_step0(init):
    model = tiny_llama()
    x = model_inputs("llama")
    with torch.no_grad():
        want = model(**x).logits
    lorakit.inject(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules="all-linear"))
    A, B = model.model.layers[0].self_attn.q_proj.factors("default")
    assert A.abs().sum() > 0 and B.abs().sum() > 0  # starts non-zero, on W0's principal directions
    with torch.no_grad():
        assert (model(**x).logits - want).abs().max() <= 1e-4


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_match_peft(init):
    base = tiny_llama()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    cfg = dict(r=4, lora_alpha=8, init_lora_weights=init, target_modules=["q_proj", "v_proj"])
    lorakit.inject(ours, LoraConfig(**cfg))
    pm = peft.get_peft_model(ref, peft.LoraConfig(**cfg))
    ours_q = ours.model.layers[0].self_attn.q_proj
    theirs_q = pm.base_model.model.model.layers[0].self_attn.q_proj
    # same residual W0 and same product B·A (SVD/QR signs may differ per vector, the product may not)
    assert torch.allclose(ours_q.base_layer.weight, theirs_q.base_layer.weight, atol=1e-5)
    A, B = ours_q.factors("default")
    assert torch.allclose(B @ A, theirs_q.lora_B["default"].weight @ theirs_q.lora_A["default"].weight, atol=1e-5)


def test_init_methods_start_at_zero_update():
    for init in ("kaiming", "gaussian"):
        model = tiny_llama()
        lorakit.inject(model, LoraConfig(r=4, init_lora_weights=init, target_modules=["q_proj"]))
        A, B = model.model.layers[0].self_attn.q_proj.factors("default")
        assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=8, init_lora_weights="gaussian", target_modules=["q_proj"]))
    A, _ = model.model.layers[0].self_attn.q_proj.factors("default")
    assert 0.08 < A.std().item() < 0.17  # N(0, (1/r)^2) with r = 8


def test_freezing_bias_modes_and_modules_to_save():
    model = tiny_bert()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["query"], bias="lora_only", modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "query.base_layer.bias" in n or "classifier.modules_to_save" in n for n in trainable)
    assert any("query.base_layer.bias" in n for n in trainable)
    assert any("classifier.modules_to_save.default.weight" in n for n in trainable)
    assert not model.bert.encoder.layer[0].attention.self.query.base_layer.weight.requires_grad
    model2 = tiny_bert()
    lorakit.inject(model2, LoraConfig(r=2, target_modules=["query"], bias="all"))
    assert model2.bert.encoder.layer[0].attention.self.key.bias.requires_grad
    assert not model2.bert.encoder.layer[0].attention.self.key.weight.requires_grad


def test_layers_to_transform_and_patterns():
    model = tiny_llama(num_hidden_layers=3)
    lorakit.inject(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                     rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 16}))
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)}
    assert set(wrapped) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert wrapped["model.layers.1.self_attn.v_proj"].r["default"] == 2
    assert wrapped["model.layers.1.self_attn.q_proj"].scaling["default"] == 4.0


def test_regex_target_and_exclude():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=2, target_modules=r".*\.mlp\.(gate|up)_proj", exclude_modules=["layers.0.mlp.up_proj"]))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer))
    assert wrapped == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def test_gpt2_fused_qkv_slices_with_enable_lora():
    model = tiny_gpt2()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]}))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, lorakit.LoraMergedLinear) and layer.fan_in_fan_out
    randomize_lora(model)
    x = model_inputs("gpt2")
    with torch.no_grad():
        before = model(**x).logits
        lorakit.merge(model)
        assert (model(**x).logits - before).abs().max() <= 1e-5
        lorakit.unmerge(model)
    # the k slice of the update is exactly zero
    delta = layer.delta_weight("default")  # Conv1D layout: (in, 3·d)
    assert torch.count_nonzero(delta[:, 32:64]) == 0 and torch.count_nonzero(delta[:, :32]) > 0


def test_default_targets_per_architecture():
    model = tiny_gpt2()
    lorakit.inject(model, LoraConfig(r=2))
    assert {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)} == {"c_attn"}


def test_custom_module_without_transformers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    lorakit.inject(net, LoraConfig(r=2, target_modules=["0", "3"]))
    assert isinstance(net[0], lorakit.LoraConv) and isinstance(net[3], lorakit.LoraLinear)
    trainable, total = lorakit.trainable_parameters(net)
    assert trainable == (2 * 3 * 9 + 4 * 2) + (2 * 144 + 5 * 2)
    assert "LoraConv(Conv2d)" in lorakit.summary(net)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"), (dict(r=-3), "r"), (dict(r=2.5), "r"),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(init_lora_weights="kaiming_normal"), "init_lora_weights"), (dict(bias="some"), "bias"),
    (dict(lora_alpha=0), "lora_alpha"), (dict(target_modules="(unclosed"), "target_modules"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"), (dict(layers_to_transform=[-1]), "layers_to_transform"),
    (dict(enable_lora={"c_attn": [False, False]}), "enable_lora"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}"):
        LoraConfig(**kwargs)


def test_targets_that_match_nothing_list_near_misses():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"Did you mean: q_proj.*Linear layers in this model: .*down_proj"):
        lorakit.inject(model, LoraConfig(target_modules=["q_prj"]))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())


def test_regex_and_layers_that_select_nothing():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="layers_to_transform"):
        lorakit.inject(model, LoraConfig(target_modules=r".*q_proj", layers_to_transform=[7]))


def test_unsupported_module_type_is_named():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"LlamaRMSNorm.*supported: nn\.Linear"):
        lorakit.inject(model, LoraConfig(target_modules=["input_layernorm"]))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())


def test_dora_on_embedding_is_refused_before_changes():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="DoRA"):
        lorakit.inject(model, LoraConfig(target_modules=["q_proj", "embed_tokens"], use_dora=True))
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())


def test_bad_adapter_names():
    for bad in ("../evil", "a.b", "", "__base__", "x" * 65):
        with pytest.raises(ConfigError, match="adapter name"):
            lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"]), adapter_name=bad)
