"""Many adapters on one model: activation, disabling, deletion, merged switching, combining, mixed batches."""
from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.model.state import adapter_configs
from conftest import model_inputs, randomize_lora, tiny_bert, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj"]


def two_adapters(seed=0):
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "a")
    lorakit.inject(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]), "b")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def test_active_adapters_add_up():
    model = two_adapters()
    x = model_inputs("llama")
    with lorakit.disable_adapters(model):
        base = logits(model, x)
    lorakit.set_adapter(model, "a")
    la = logits(model, x)
    lorakit.set_adapter(model, "b")
    lb = logits(model, x)
    lorakit.set_adapter(model, ["a", "b"])
    both = logits(model, x)
    assert not torch.allclose(la, lb)
    # per-layer updates add; check on one layer where both adapters live
    q = model.model.layers[0].self_attn.q_proj
    h = torch.randn(3, 32)
    with torch.no_grad():
        lorakit.set_adapter(model, ["a", "b"])
        full = q(h)
        expect = h @ (q.base_layer.weight + q.delta_weight("a") + q.delta_weight("b")).t()
    assert torch.allclose(full, expect, atol=1e-5)
    assert not torch.allclose(both, base)


def test_set_adapter_controls_trainability():
    model = two_adapters()
    lorakit.set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    with pytest.raises(ConfigError, match="no adapter named 'c'"):
        lorakit.set_adapter(model, "c")


def test_disable_gives_exact_base_output_even_when_merged():
    base_model = tiny_llama()
    x = model_inputs("llama")
    want = logits(base_model, x)
    model = two_adapters()
    lorakit.merge(model)
    with lorakit.disable_adapters(model):
        got = logits(model, x)
    assert (got - want).abs().max() <= 1e-5
    assert model.model.layers[0].self_attn.q_proj.merged_adapters  # merged again afterwards


def test_delete_adapter():
    model = two_adapters()
    lorakit.set_adapter(model, "a")
    x = model_inputs("llama")
    la = logits(model, x)
    lorakit.delete_adapter(model, "b")
    assert "b" not in adapter_configs(model)
    assert not any(".b." in n or n.endswith(".b") for n, _ in model.named_parameters())
    assert torch.allclose(logits(model, x), la)


def test_switch_merged_adapter_and_drift():
    model = two_adapters()
    x = model_inputs("llama")
    lorakit.set_adapter(model, "a")
    la = logits(model, x)
    lorakit.set_adapter(model, "b")
    lb = logits(model, x)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    assert (logits(model, x) - la).abs().max() <= 1e-5
    lorakit.switch_merged_adapter(model, "b")
    assert (logits(model, x) - lb).abs().max() <= 1e-5
    for _ in range(50):  # 100 switches back and forth
        lorakit.switch_merged_adapter(model, "a")
        lorakit.switch_merged_adapter(model, "b")
    lorakit.unmerge(model)
    worst = max(((p - w0[n]).norm() / w0[n].norm()).item() for n, p in model.named_parameters() if n in w0)
    assert worst < 1e-5, worst


def test_combine_cat_equals_sum_of_adapters():
    model = two_adapters()
    x = model_inputs("llama")
    lorakit.set_adapter(model, ["a", "b"])
    want = logits(model, x)
    lorakit.combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab", method="cat")
    lorakit.set_adapter(model, "ab")
    assert (logits(model, x) - want).abs().max() <= 1e-5
    q = model.model.layers[0].self_attn.q_proj
    assert q.r["ab"] == 6


def test_combine_weights_and_svd():
    model = two_adapters()
    q = model.model.layers[0].self_attn.q_proj
    want = 0.5 * q.delta_weight("a") - 2.0 * q.delta_weight("b")
    lorakit.combine_adapters(model, ["a", "b"], [0.5, -2.0], "cat", method="cat")
    assert torch.allclose(q.delta_weight("cat"), want, atol=1e-6)
    lorakit.combine_adapters(model, ["a", "b"], [0.5, -2.0], "svd6", method="svd", rank=6)
    assert torch.allclose(q.delta_weight("svd6"), want, atol=1e-5)  # rank 6 holds the exact sum
    lorakit.combine_adapters(model, ["a", "b"], [0.5, -2.0], "svd2", method="svd", rank=2)
    S = torch.linalg.svdvals(want)
    err = (q.delta_weight("svd2") - want).norm()
    assert abs(err - S[2:].norm()) < 1e-4  # Eckart-Young: the best rank-2 fit


def test_combine_linear_needs_equal_ranks():
    model = two_adapters()
    with pytest.raises(ConfigError, match="equal ranks"):
        lorakit.combine_adapters(model, ["a", "b"], [1, 1], "lin", method="linear")
    lorakit.inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "c")
    randomize_lora(model, seed=9)
    lorakit.combine_adapters(model, ["a", "c"], [1.0, 1.0], "lin", method="linear")
    q = model.model.layers[0].self_attn.q_proj
    A = q.factors("a")[0] * (2 ** 0.5) + q.factors("c")[0] * (2 ** 0.5)
    B = q.factors("a")[1] * (2 ** 0.5) + q.factors("c")[1] * (2 ** 0.5)
    assert torch.allclose(q.delta_weight("lin"), (B @ A).detach(), atol=1e-5)


def test_saved_combined_adapter_loads_with_per_module_ranks(tmp_path):
    model = two_adapters()
    lorakit.combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab", method="cat")
    lorakit.set_adapter(model, "ab")
    x = model_inputs("llama")
    want = logits(model, x)
    lorakit.save_adapter(model, tmp_path / "ab", adapter_name="ab")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "ab")
    assert (logits(fresh, x) - want).abs().max() <= 1e-5


def test_mixed_batch_rows_equal_single_adapter_runs():
    model = two_adapters()
    x = model_inputs("llama", batch=4)
    names = ["a", "__base__", "b", "a"]
    with torch.no_grad():
        mixed = model(**x, adapter_names=names).logits
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in x.items()}
        if name == "__base__":
            with lorakit.disable_adapters(model):
                want = logits(model, row)
        else:
            lorakit.set_adapter(model, name)
            want = logits(model, row)
        assert (mixed[i:i + 1] - want).abs().max() <= 1e-5, name
    with pytest.raises(ConfigError, match="unknown adapter 'zzz'"):
        model(**x, adapter_names=["zzz"] * 4)


def test_mixed_batch_with_modules_to_save_and_embeddings():
    model = tiny_bert()
    cfg = dict(r=2, target_modules=["query", "word_embeddings"], modules_to_save=["classifier"])
    lorakit.inject(model, LoraConfig(**cfg), "a")
    lorakit.inject(model, LoraConfig(**cfg), "b")
    randomize_lora(model)
    with torch.no_grad():
        model.classifier.modules_to_save["b"].weight.add_(1.0)
    x = model_inputs("bert", batch=3)
    with torch.no_grad():
        mixed = model(**x, adapter_names=["b", "a", "__base__"]).logits
    for i, name in enumerate(["b", "a"]):
        lorakit.set_adapter(model, name)
        with torch.no_grad():
            want = model(**{k: v[i:i + 1] for k, v in x.items()}).logits
        assert (mixed[i] - want[0]).abs().max() <= 1e-5
