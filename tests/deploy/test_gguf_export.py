"""Every exportable architecture, tiny and random: the GGUF reads back with llama.cpp's names, shapes and
metadata, and (when llama-cpp-python is installed) llama.cpp computes the same logits as transformers."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from deploy_fixtures import ARCHS, IDS, add_adapter, llama_cpp_logits, logits, read_gguf, save_tiny
from lorakit.cli import main

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}


def expected_names(arch: str, model) -> dict[str, tuple]:
    import gguf
    from lorakit.deploy.gguf_arch import ARCHS as SPEC
    spec = SPEC[type(model).__name__]
    tmap = gguf.get_tensor_name_map(spec.model_arch, model.config.num_hidden_layers)
    out = {}
    for n, p in model.state_dict().items():
        if n == "lm_head.weight" and (arch.startswith("gemma") or model.config.tie_word_embeddings):
            continue
        out[tmap.get_name(n, try_suffixes=(".weight", ".bias"))] = tuple(p.shape)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_export_reads_back_with_llama_cpp_names_shapes_and_metadata(arch, tmp_path):
    model = save_tiny(arch, tmp_path / "m")
    out = tmp_path / "m.gguf"
    assert main(["export", "--base", str(tmp_path / "m"), "--out", str(out), "--outtype", "f32"]) == 0
    meta, tensors, reader = read_gguf(out)
    name = GGUF_ARCH[arch]
    assert meta["general.architecture"] == name and meta["general.type"] == "model"
    assert meta[f"{name}.block_count"] == 2 and meta[f"{name}.embedding_length"] == 64
    assert meta[f"{name}.attention.head_count"] == 4 and meta[f"{name}.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 320
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    assert tensors == expected_names(arch, model)
    data = {t.name: np.array(t.data) for t in reader.tensors}
    sd = model.state_dict()
    norm = sd["model.norm.weight"].numpy()
    shift = 1.0 if arch.startswith("gemma") else 0.0
    assert np.allclose(data["output_norm.weight"], norm + shift)        # Gemma stores 1 + w
    q = sd["model.layers.0.self_attn.q_proj.weight"] if arch != "phi3" else sd["model.layers.0.self_attn.qkv_proj.weight"]
    got_q = data["blk.0.attn_q.weight" if arch != "phi3" else "blk.0.attn_qkv.weight"].reshape(q.shape)
    if arch in ("llama", "mistral"):                                       # rotate-half -> interleaved rows
        assert not np.allclose(got_q, q.numpy())
        from lorakit.deploy.gguf_arch import permute_rows
        assert np.allclose(got_q, permute_rows(q, 4).numpy())
    else:
        assert np.allclose(got_q, q.numpy())


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'lorakit[gguf-check]')")
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_computes_the_same_logits_as_transformers(arch, tmp_path):
    model = save_tiny(arch, tmp_path / "m")
    out = tmp_path / "m.gguf"
    assert main(["export", "--base", str(tmp_path / "m"), "--out", str(out), "--outtype", "f32"]) == 0
    want, got = logits(model), llama_cpp_logits(out)
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max()), (arch, np.abs(got - want).max())


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3"])
def test_merged_export_folds_the_adapter_in(arch, tmp_path):
    model = save_tiny(arch, tmp_path / "m")
    base_logits = logits(model)
    add_adapter(model, tmp_path / "ad")
    out = tmp_path / "merged.gguf"
    assert main(["export", "--base", str(tmp_path / "m"), "--adapter", str(tmp_path / "ad"), "--out", str(out),
                 "--outtype", "f32"]) == 0
    _, tensors, _ = read_gguf(out)
    assert not any("lora" in n for n in tensors)
    if HAS_LLAMA_CPP:
        want, got = logits(model), llama_cpp_logits(out)
        assert np.abs(want - base_logits).max() > 1e-2                    # the adapter matters here
        assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("outtype,ggml", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_outtypes_keep_norms_in_f32(outtype, ggml, tmp_path):
    save_tiny("llama", tmp_path / "m")
    out = tmp_path / "m.gguf"
    assert main(["export", "--base", str(tmp_path / "m"), "--out", str(out), "--outtype", outtype]) == 0
    _, _, reader = read_gguf(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == ggml and types["output_norm.weight"] == "F32"
    if HAS_LLAMA_CPP:
        from transformers import AutoModelForCausalLM
        want = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m"))
        assert np.abs(llama_cpp_logits(out) - want).max() <= 0.05 * max(1.0, np.abs(want).max())


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'lorakit[gguf-check]')")
@pytest.mark.parametrize("arch,rope", [
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}),
    ("phi3", {"rope_type": "longrope", "long_factor": [1.0 + i / 4 for i in range(8)],
              "short_factor": [1.0 + i / 8 for i in range(8)], "original_max_position_embeddings": 64,
              "rope_theta": 10000.0}),
])
def test_rope_scaling_exports_match_in_llama_cpp(arch, rope, tmp_path):
    import json
    from transformers import AutoModelForCausalLM
    save_tiny(arch, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_parameters"] = rope
    cfg.pop("rope_scaling", None)
    if arch == "phi3":
        cfg["original_max_position_embeddings"] = 64
    cfg_path.write_text(json.dumps(cfg))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    out = tmp_path / "m.gguf"
    assert main(["export", "--base", str(tmp_path / "m"), "--out", str(out), "--outtype", "f32"]) == 0
    want, got = logits(model), llama_cpp_logits(out)
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())


def test_sentencepiece_style_tokenizer_is_written_as_llama_vocab(tmp_path):
    import gguf
    from deploy_fixtures import save_spm_tokenizer, tiny_model
    model = tiny_model("mistral")
    model.save_pretrained(tmp_path / "m")
    save_spm_tokenizer(tmp_path / "m")
    out = tmp_path / "m.gguf"
    assert main(["export", "--base", str(tmp_path / "m"), "--out", str(out), "--outtype", "f32"]) == 0
    meta, _, _ = read_gguf(out)
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.tokens"]) == 320
    assert meta["tokenizer.ggml.tokens"][3 + 0x41] == "<0x41>"
    assert meta["tokenizer.ggml.token_type"][3 + 0x41] == gguf.TokenType.BYTE
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and "[INST]" in meta["tokenizer.chat_template"]
    if HAS_LLAMA_CPP:
        want, got = logits(model), llama_cpp_logits(out)
        assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
        import llama_cpp
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(tmp_path / "m")
        llm = llama_cpp.Llama(str(out), n_ctx=32, verbose=False, vocab_only=True)
        assert llm.tokenize(b"the cat", add_bos=False) == hf.encode("the cat", add_special_tokens=False)
        llm.close()
