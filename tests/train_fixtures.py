"""Tiny training setups for the loop and CLI tests: a random-init Llama, a small BPE tokenizer, Alpaca rows."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rock", "star"]


def alpaca_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """Returns n Alpaca rows of a toy task (name the first word), with a 'task' column."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = (WORDS[int(j)] for j in torch.randint(len(WORDS), (2,), generator=g))
        task = "first" if i % 2 == 0 else "second"
        rows.append({"instruction": f"Say the {task} word.", "input": f"{a} {b}",
                     "output": a if task == "first" else b, "task": task})
    return rows


def tiny_tokenizer():
    """Returns a PreTrainedTokenizerFast: byte-level BPE trained on the toy data and the Alpaca template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorakit.train.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, " ".join(WORDS), "Say the first word. Say the second word."]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model(vocab_size: int, seed: int = 0):
    """Returns a random-init 2-layer Llama (hidden 32) for `vocab_size` tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def write_tiny_model(folder: Path) -> Path:
    """Saves the tiny model + tokenizer as a transformers folder; returns it."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Writes rows as JSONL; returns the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
