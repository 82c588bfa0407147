"""The embedded SmolLM2-135M through `lorakit export`: llama.cpp continues held-out prompts token for token as
lorakit does, from the merged GGUF and from base GGUF + adapter GGUF (slow: loads the 135M model)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.deploy.llama_cpp import greedy_tokens

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install 'lorakit[gguf-check]')")]


def test_smollm2_merged_and_adapter_gguf_generate_like_lorakit(tmp_path):
    from lorakit.loading.pretrained import load_model
    from lorakit.train.data import embedded_dataset, render_prompt
    from lorakit.train.evaluate import encode_prompt
    torch.manual_seed(0)
    model, tok = load_model(None)
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    lorakit.save_adapter(model, tmp_path / "ad")
    model.eval()
    prompts = [encode_prompt(tok, render_prompt(r, tok)) for r in embedded_dataset()["eval"][:5]]
    want = []
    with torch.no_grad():
        for ids in prompts:
            want.append(model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist())
    for argv in (["--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged.gguf")],
                 ["--out", str(tmp_path / "base.gguf")],
                 ["--adapter", str(tmp_path / "ad"), "--adapter-only", "--out", str(tmp_path / "ad.gguf")]):
        assert main(["export", "--outtype", "f32", *argv]) == 0
    assert greedy_tokens(tmp_path / "merged.gguf", prompts, 12, tok.eos_token_id) == want
    assert greedy_tokens(tmp_path / "base.gguf", prompts, 12, tok.eos_token_id, tmp_path / "ad.gguf") == want
