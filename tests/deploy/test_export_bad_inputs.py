"""Bad input to `lorakit export`: one clear message, exit 2, nothing written (not even a temporary file)."""
from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from deploy_fixtures import add_adapter, save_tiny, tiny_model
from lorakit.cli import main


@pytest.fixture
def env(tmp_path):
    model = save_tiny("llama", tmp_path / "m")
    add_adapter(model, tmp_path / "ad")
    return tmp_path


def _fails(capsys, argv, *words, out=None):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    if out is not None:
        assert not out.exists() or out.is_dir()
        assert not [p for p in out.parent.iterdir() if p.name.startswith("." + out.name)]
    return err


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=320)).save_pretrained(tmp_path / "g")
    _fails(capsys, ["export", "--base", tmp_path / "g", "--out", tmp_path / "g.gguf"],
           "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
           out=tmp_path / "g.gguf")


def test_adapter_of_another_base_is_refused(env, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=320)).save_pretrained(env / "wide")
    shutil.copy(env / "m" / "tokenizer.json", env / "wide")
    for extra in ([], ["--adapter-only"]):
        _fails(capsys, ["export", "--base", env / "wide", "--adapter", env / "ad", "--out", env / "x.gguf", *extra],
               "do not match", out=env / "x.gguf")


def test_existing_output_needs_force(env, capsys):
    out = env / "m.gguf"
    out.write_text("keep me")
    _fails(capsys, ["export", "--base", env / "m", "--out", out], "already exists", "--force")
    assert out.read_text() == "keep me"
    assert main(["export", "--base", str(env / "m"), "--out", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_output_that_is_a_folder_is_refused(env, capsys):
    (env / "dir.gguf").mkdir()
    _fails(capsys, ["export", "--base", env / "m", "--out", env / "dir.gguf"], "is a folder")
    assert not any((env / "dir.gguf").iterdir())


def test_not_enough_disk_is_found_before_writing(env, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1000))
    for extra in ([], ["--adapter", env / "ad"], ["--adapter", env / "ad", "--adapter-only"]):
        _fails(capsys, ["export", "--base", env / "m", "--out", env / "x.gguf", *extra], "not enough free disk space",
               out=env / "x.gguf")


def test_failure_while_writing_leaves_nothing(env, monkeypatch):
    from lorakit.deploy import gguf_arch

    def boom(*a, **k):
        raise RuntimeError("disk went away")
    monkeypatch.setattr(gguf_arch, "transform", boom)
    assert main(["export", "--base", str(env / "m"), "--out", str(env / "x.gguf")]) == 1
    assert not [p for p in env.iterdir() if "x.gguf" in p.name]


def test_missing_adapter_and_bad_quantize(env, capsys, monkeypatch):
    _fails(capsys, ["export", "--base", env / "m", "--adapter", env / "nope", "--out", env / "x.gguf"], "does not exist")
    _fails(capsys, ["export", "--base", env / "m", "--out", env / "x.gguf", "--quantize", "Q9_Z"], "Q4_K_M")
    from lorakit.deploy import llama_cpp
    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    _fails(capsys, ["export", "--base", env / "m", "--out", env / "x.gguf", "--quantize", "q4_k_m"],
           "llama-cpp-python", "gguf-check", out=env / "x.gguf")
