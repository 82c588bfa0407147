"""--adapter-only: a GGUF LoRA that llama.cpp applies to the base GGUF with the same result as PEFT's formula;
adapters llama.cpp cannot apply are refused with the reason and the alternative."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from deploy_fixtures import add_adapter, llama_cpp_logits, logits, read_gguf, save_tiny
from lorakit.cli import main

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def _export(tmp_path, *extra):
    return main(["export", "--base", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"), "--out",
                 str(tmp_path / "ad.gguf"), "--adapter-only", "--outtype", "f32", *extra])


def _base(tmp_path):
    assert main(["export", "--base", str(tmp_path / "m"), "--out", str(tmp_path / "base.gguf"), "--outtype", "f32"]) == 0
    return tmp_path / "base.gguf"


def test_adapter_gguf_has_llama_cpp_lora_names_and_metadata(tmp_path):
    model = save_tiny("llama", tmp_path / "m")
    add_adapter(model, tmp_path / "ad")
    assert _export(tmp_path) == 0
    meta, tensors, reader = read_gguf(tmp_path / "ad.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8.0 and meta["general.architecture"] == "llama"
    assert tensors["blk.0.attn_q.weight.lora_a"] == (4, 64) and tensors["blk.0.attn_q.weight.lora_b"] == (64, 4)
    assert tensors["blk.1.ffn_down.weight.lora_a"] == (4, 128) and len(tensors) == 2 * 2 * 7
    q_b = model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.detach()
    data = {t.name: np.array(t.data) for t in reader.tensors}
    from lorakit.deploy.gguf_arch import permute_rows
    assert np.allclose(data["blk.0.attn_q.weight.lora_b"].reshape(64, 4), permute_rows(q_b, 4).numpy())


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'lorakit[gguf-check]')")
@pytest.mark.parametrize("arch,cfg", [
    ("llama", {}), ("qwen2", {}), ("gemma", {}), ("phi3", {}),
    ("llama", {"use_rslora": True}),                                           # alpha/sqrt(r): folded into B
    ("llama", {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"v_proj": 2}}),  # per-module scales: folded
    ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),                  # embedding LoRA: lora_a transposed
])
def test_llama_cpp_applies_the_adapter_like_transformers(arch, cfg, tmp_path):
    model = save_tiny(arch, tmp_path / "m")
    base = _base(tmp_path)
    add_adapter(model, tmp_path / "ad", **cfg)
    assert _export(tmp_path) == 0
    want, got = logits(model), llama_cpp_logits(base, lora=tmp_path / "ad.gguf")
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("cfg,words", [
    ({"use_dora": True}, ["DoRA", "Export the merged model instead"]),
    ({"modules_to_save": ["lm_head"]}, ["lm_head", "modules_to_save", "Export the merged model instead"]),
])
def test_adapters_llama_cpp_cannot_apply_are_refused(cfg, words, tmp_path, capsys):
    model = save_tiny("llama", tmp_path / "m")
    add_adapter(model, tmp_path / "ad", **cfg)
    capsys.readouterr()
    assert _export(tmp_path) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ad.gguf").exists() and not list(tmp_path.glob(".ad.gguf*"))
    # the merged export of the same adapter works
    assert main(["export", "--base", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"), "--out",
                 str(tmp_path / "merged.gguf"), "--outtype", "f32"]) == 0
    if HAS_LLAMA_CPP:
        want, got = logits(model), llama_cpp_logits(tmp_path / "merged.gguf")
        assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())


def test_run_and_checkpoint_folders_are_accepted(tmp_path):
    model = save_tiny("llama", tmp_path / "m")
    add_adapter(model, tmp_path / "run" / "checkpoints" / "step-000002" / "adapter")
    (tmp_path / "run" / "checkpoints" / "step-000002" / "complete").write_text("ok\n")
    for src in ("run", "run/checkpoints/step-000002"):
        out = tmp_path / (src.replace("/", "_") + ".gguf")
        assert main(["export", "--base", str(tmp_path / "m"), "--adapter", str(tmp_path / src), "--out", str(out),
                     "--adapter-only"]) == 0
        assert read_gguf(out)[0]["general.type"] == "adapter"
