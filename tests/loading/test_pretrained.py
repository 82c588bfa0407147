"""Tests for lorakit.models: local folders, errors for missing paths and an unreachable hub, identity, embedded files."""
from __future__ import annotations

import json

import pytest
import torch

from lorakit.loading import pretrained as M
from lorakit.errors import ModelLoadError


def tiny_llama():
    """Returns a tiny random-init Llama (2 layers, hidden 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=None))


def tiny_tokenizer():
    """Returns a tiny word-level fast tokenizer with eos but no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "hello", "world"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", unk_token="<unk>")


@pytest.fixture()
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_load_local_folder_sets_pad_and_dtype(tiny_folder):
    model, tok = M.load_model(str(tiny_folder))
    assert tok.pad_token == "</s>" and model.config.pad_token_id == tok.eos_token_id
    assert not model.training
    ident = M.model_identity(model)
    assert ident == {"name_or_path": str(tiny_folder.resolve()), "architecture": "LlamaForCausalLM",
                     "model_type": "llama", "num_parameters": sum(p.numel() for p in model.parameters()),
                     "dtype": "float32"}
    bf16, _ = M.load_model(tiny_folder, dtype=torch.bfloat16)
    assert M.model_identity(bf16)["dtype"] == "bfloat16"


def test_identity_ignores_adapter_weights(tiny_folder):
    from peft import LoraConfig, get_peft_model

    model, _ = M.load_model(tiny_folder)
    before = M.model_identity(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert M.model_identity(wrapped) == before


def test_missing_local_paths_get_their_own_error(tmp_path):
    for spec in (str(tmp_path / "nope"), "./nope", "~/nope.gguf", "a/b/c"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            M.load_model(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        M.load_model(tmp_path / "empty")
    (tmp_path / "w.bin").write_bytes(b"0")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        M.load_model(tmp_path / "w.bin")


def test_hub_id_without_network_says_hub_unreachable(monkeypatch, tmp_path):
    monkeypatch.setattr(M, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty HF cache: nothing to fall back on
    with pytest.raises(ModelLoadError) as e:
        M.load_model("some-org/some-model")
    msg = str(e.value)
    assert "hub is unreachable" in msg and "local transformers folder" in msg and ".gguf" in msg


def test_hub_reachable_respects_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert M.hub_reachable() is False


def test_embedded_files_and_cache_root(monkeypatch, tmp_path):
    gguf = M.embedded_model_path()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50_000_000
    enc = M.embedded_encoder_path()
    assert json.loads((enc / "config.json").read_text())["model_type"] == "bert"
    assert (enc / "model.safetensors").exists() and (enc / "tokenizer.json").exists()
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert M.cache_root() == tmp_path
    assert M._gguf_cache_dir(gguf, None) == tmp_path / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_embedded_default_loads_cached_and_renders_its_chat_template():
    from lorakit.train.data import embedded_dataset, tokenize_records

    model, tok = M.load_model()  # converts once into the cache (~20 s), then loads from it
    cached = M.cached_gguf_folder(M.embedded_model_path())
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".SmolLM2")]  # no temp leftovers
    ident = M.model_identity(model)
    assert ident["name_or_path"] == "smollm2" and ident["architecture"] == "LlamaForCausalLM"
    assert 130e6 < ident["num_parameters"] < 140e6 and tok.pad_token is not None
    record = next(r for r in embedded_dataset()["eval"] if r["task"] == "review_polarity")
    [ex], _ = tokenize_records([record], tok)
    target = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
    assert tok.decode(target) == record["output"] + "<|im_end|>\n"
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss
    assert loss.item() < 5  # a working instruct model, not random weights (ln 49152 = 10.8)


@pytest.mark.slow
def test_embedded_tokenizer_comes_from_the_cache_and_equals_the_gguf_one(monkeypatch, tmp_path):
    """load_tokenizer reads the converted folder's saved tokenizer (0.3 s) instead of the GGUF (4.5 s): same ids."""
    from transformers import AutoTokenizer

    from lorakit.loading.tokenizer import load_tokenizer
    from lorakit.train.data import embedded_dataset, tokenize_records

    M.load_model()  # the cache folder exists
    gguf = M.embedded_model_path()
    assert M.cached_tokenizer_folder(gguf) == M.cached_gguf_folder(gguf)
    assert M.cached_tokenizer_folder(gguf, cache_dir=tmp_path) is None  # nothing converted there: read the GGUF
    from_gguf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from_gguf.pad_token = from_gguf.pad_token or from_gguf.eos_token
    seen = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    tok = load_tokenizer(None)
    assert seen == [((M.cached_gguf_folder(gguf),), {})]
    records = embedded_dataset()["train"][:200] + embedded_dataset()["eval"]
    assert tokenize_records(records, tok)[0] == tokenize_records(records, from_gguf)[0]
    assert (tok.chat_template, tok.pad_token, tok.eos_token) == (from_gguf.chat_template, from_gguf.pad_token,
                                                                 from_gguf.eos_token)
