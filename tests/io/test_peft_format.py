"""PEFT-format adapter files: round trips with the real `peft` package, validation, safety, atomic writes."""
from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterFileError, LoraConfig
from lorakit.io import atomic_write_dir
from conftest import MODELS, model_inputs, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

PEFT_CASES = {
    "llama-mixed-kinds": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], r=4, lora_alpha=8)),
    "llama-rslora": ("llama", dict(target_modules=["q_proj", "k_proj"], r=4, lora_alpha=8, use_rslora=True)),
    "llama-dora": ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, use_dora=True)),
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8, fan_in_fan_out=True)),
    "bert-modules_to_save": ("bert", dict(target_modules=["query", "value"], r=4, lora_alpha=8,
                                          modules_to_save=["classifier"])),
    "llama-rank-pattern": ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                                         rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})),
}


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before):
    after = dict(model.named_parameters())
    return set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)


def _randomize_peft(pm, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_loads_in_lorakit_with_same_logits(case, tmp_path):
    kind, cfg = PEFT_CASES[case]
    base = MODELS[kind]()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    _randomize_peft(pm)
    pm.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    x = model_inputs(kind)
    with torch.no_grad():
        assert (ours(**x).logits - pm(**x).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_lorakit_adapter_loads_in_peft_with_same_logits(case, tmp_path):
    kind, cfg = PEFT_CASES[case]
    base = MODELS[kind]()
    ours = lorakit.inject(copy.deepcopy(base), LoraConfig(**cfg))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    lorakit.save_adapter(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = model_inputs(kind)
    with torch.no_grad():
        assert (ours(**x).logits - pm(**x).logits).abs().max() <= 1e-5


def test_fused_slices_save_as_plain_lora_for_peft(tmp_path):
    base = tiny_gpt2()
    ours = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                         enable_lora={"c_attn": [True, False, True]}))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    lorakit.save_adapter(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    x = model_inputs("gpt2")
    with torch.no_grad():
        want = ours(**x).logits
        assert (pm(**x).logits - want).abs().max() <= 1e-5
        assert (again(**x).logits - want).abs().max() <= 1e-5


def test_saved_files_use_peft_keys_and_fields(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    lorakit.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_dora"] is True
    assert cfg["init_lora_weights"] is True


def test_adapter_is_a_tiny_fraction_of_the_model(tmp_path):
    model = tiny_llama(hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=2000)
    lorakit.inject(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, tmp_path)
    adapter_bytes = (tmp_path / "adapter_model.safetensors").stat().st_size
    model_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    assert adapter_bytes / model_bytes < 0.02


# ---------------------------------------------------------------------------- bad files
@pytest.fixture
def saved(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    d = tmp_path / "adapter"
    lorakit.save_adapter(model, d)
    return d


def _expect_refusal(directory, match, model=None, **kw):
    model = model or tiny_llama()
    before = _params(model)
    with pytest.raises(AdapterFileError, match=match):
        lorakit.load_adapter(model, directory, **kw)
    assert _unchanged(model, before)
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())


def test_corrupted_file(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)
    _expect_refusal(saved, "corrupted or truncated")


def test_truncated_file(saved):
    f = saved / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _expect_refusal(saved, "corrupted or truncated")


def test_wrong_shapes(saved):
    f = saved / "adapter_model.safetensors"
    t = load_file(f)
    key = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
    t[key] = torch.zeros(7, 4)
    save_file(t, f)
    _expect_refusal(saved, r"q_proj\.lora_B\.weight: shape \(7, 4\) but the model needs \(32, 4\)")


def test_rank_in_file_differs_from_config(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["r"] = 8
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_refusal(saved, r"rank 4 in the file but the config says r=8")


def test_missing_keys(saved):
    f = saved / "adapter_model.safetensors"
    t = {k: v for k, v in load_file(f).items() if "layers.1.self_attn.v_proj" not in k}
    save_file(t, f)
    _expect_refusal(saved, r"missing keys for targeted modules: .*layers\.1\.self_attn\.v_proj\.lora_A")


def test_extra_keys(saved):
    f = saved / "adapter_model.safetensors"
    t = load_file(f)
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(t, f)
    _expect_refusal(saved, r"mlp\.up_proj\.lora_A\.weight: unexpected key")


def test_wrong_base_model(saved):
    other = tiny_llama(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    _expect_refusal(saved, r"wrong base model: .*hidden_size=32.*hidden_size=48", model=other)


def test_wrong_base_model_without_metadata_is_caught_by_shapes(tmp_path):
    base = tiny_llama()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    other = tiny_llama(hidden_size=48, intermediate_size=64)
    _expect_refusal(tmp_path, r"different base model", model=other)


def test_missing_folder_and_not_an_adapter(tmp_path):
    _expect_refusal(tmp_path / "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    _expect_refusal(tmp_path / "empty", "no adapter_config.json")
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    _expect_refusal(bad, "not valid JSON")


def test_unsupported_peft_option(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["lora_bias"] = True
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_refusal(saved, "lora_bias is set")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['LORAKIT_PAYLOAD_MARK']}",))


def test_pickle_adapter_is_refused_and_payload_never_runs(saved, tmp_path, monkeypatch):
    mark = tmp_path / "PWNED"
    monkeypatch.setenv("LORAKIT_PAYLOAD_MARK", str(mark))
    (saved / "adapter_model.safetensors").unlink()
    with open(saved / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    _expect_refusal(saved, "pickle file, which can run arbitrary code")
    # even with the explicit opt-in, torch.load(weights_only=True) refuses the payload
    _expect_refusal(saved, "refused by the safe loader", allow_pickle=True)
    assert not mark.exists()


def test_pickle_adapter_with_opt_in_loads_plain_tensors(saved):
    t = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    torch.save(t, saved / "adapter_model.bin")
    model = lorakit.load_adapter(tiny_llama(), saved, allow_pickle=True)
    assert any(isinstance(m, lorakit.LoraLayer) for m in model.modules())


def test_interrupted_save_keeps_previous_adapter(saved, monkeypatch):
    before = (saved / "adapter_model.safetensors").read_bytes()
    model = lorakit.inject(tiny_llama(seed=5), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("lorakit.io.peft_format.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, saved)
    assert (saved / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_atomic_write_replaces_whole_folder(tmp_path):
    d = tmp_path / "out"
    atomic_write_dir(d, lambda t: (t / "a.txt").write_text("1"))
    atomic_write_dir(d, lambda t: (t / "b.txt").write_text("2"))
    assert sorted(p.name for p in d.iterdir()) == ["b.txt"]


def test_load_keeps_active_adapter_and_is_frozen_by_default(saved):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), "first")
    lorakit.load_adapter(model, saved, adapter_name="second")
    assert lorakit.active_adapters(model) == ("first",)
    lorakit.load_adapter(model, saved, adapter_name="third", is_trainable=True, activate=True)
    assert lorakit.active_adapters(model) == ("third",)
    assert all(".third" in n for n, p in model.named_parameters() if p.requires_grad)
