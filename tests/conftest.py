"""Shared fixtures: tiny random-init transformers models built from configs (no downloads)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
# Tiny models gain nothing from threads, and on a busy 2-core machine 2 threads run ~30x slower.
torch.set_num_threads(1)


def tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                        max_position_embeddings=64)).eval()


def tiny_gpt2(seed: int = 0, cls: str = "GPT2LMHeadModel"):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64, num_labels=3,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return getattr(transformers, cls)(cfg).eval()


def tiny_bert(seed: int = 0, cls: str = "BertForSequenceClassification"):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=101, max_position_embeddings=64, num_labels=3)
    return getattr(transformers, cls)(cfg).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert}


def model_inputs(kind: str, batch: int = 2, seq: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 101, (batch, seq), generator=g)}


def output_of(model, inputs):
    out = model(**inputs)
    return out.logits


def randomize_lora(model, seed: int = 123, std: float = 0.1):
    """Gives every LoRA factor (and DoRA magnitude) random non-zero values, so tests do not pass only at init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                if "magnitude" in name:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
