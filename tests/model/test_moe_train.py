"""`lorakit train --model <tiny MoE folder>` end to end: experts adapted, adapter loads in PEFT."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_fixtures import alpaca_rows, tiny_tokenizer, write_jsonl  # noqa: E402

from lorakit.cli import main  # noqa: E402


def write_tiny_moe(folder: Path, aux: bool = True) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=len(tok),
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, output_router_logits=aux, router_aux_loss_coef=0.01)
    Qwen3MoeForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    return {"model": str(write_tiny_moe(d / "model")), "train": str(write_jsonl(d / "train.jsonl", alpaca_rows(16)))}


def test_train_tiny_moe_end_to_end_adapts_the_experts(files, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--model", files["model"], "--data", files["train"], "--out", str(out), "--max-steps", "3",
               "--batch-size", "4", "--lr", "5e-3", "--r", "4", "--no-progress", "--no-baseline-eval",
               "--no-accuracy", "warmup_steps=1"])
    assert rc == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    from safetensors.torch import load_file
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    assert any(k.endswith("experts.lora_B.weight") and v.abs().sum() > 0 for k, v in keys.items())
    import peft
    from transformers import AutoModelForCausalLM
    import lorakit
    ids = torch.randint(3, 200, (2, 7))
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["model"]), str(out / "adapter"))
    lk = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(files["model"]), str(out / "adapter"))
    with torch.no_grad():
        assert (pm(input_ids=ids).logits - lk(input_ids=ids).logits).abs().max() <= 1e-5


def test_router_aux_loss_enters_the_training_loss(files):
    from transformers import AutoModelForCausalLM
    from lorakit.train.router_aux import set_router_aux_loss
    from lorakit.train.step import loss_sum
    model = AutoModelForCausalLM.from_pretrained(files["model"]).train()
    ids = torch.randint(3, 200, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    torch.manual_seed(0)
    set_router_aux_loss(model, 0.0)
    plain, n = loss_sum(model, batch)
    assert set_router_aux_loss(model, None) == 0.01  # the folder's config: output_router_logits, coef 0.01
    with_aux, _ = loss_sum(model, batch)
    aux = model(input_ids=ids, output_router_logits=True).aux_loss
    assert float(with_aux) == pytest.approx(float(plain) + 0.01 * float(aux) * n, rel=1e-5)
    model.eval()
    assert float(loss_sum(model, batch)[0]) == pytest.approx(float(plain), rel=1e-5)  # evaluation: no router term


def test_train_tiny_moe_with_quantize_nf4_stores_the_experts_4bit(files, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from lorakit.ops import nf4_experts
    stored = []
    real = nf4_experts.quantize_experts
    monkeypatch.setattr(nf4_experts, "quantize_experts", lambda *a, **k: stored.append(a[1]) or real(*a, **k))
    import lorakit.model.quantize as mq
    monkeypatch.setattr(mq, "quantize_experts", nf4_experts.quantize_experts)
    out = tmp_path / "run"
    rc = main(["train", "--model", files["model"], "--data", files["train"], "--out", str(out), "--max-steps", "2",
               "--batch-size", "4", "--lr", "5e-3", "--r", "4", "--quantize", "nf4", "--no-progress",
               "--no-baseline-eval", "--no-accuracy", "warmup_steps=1"])
    assert rc == 0
    assert sorted(set(stored)) == ["down_proj", "gate_up_proj"] and len(stored) == 4  # 2 layers x 2 tensors
    from safetensors.torch import load_file
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("experts.lora_B.weight") and v.abs().sum() > 0 for k, v in keys.items())
