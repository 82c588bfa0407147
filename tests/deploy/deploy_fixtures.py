"""Tiny random models of every GGUF-exportable architecture, saved as transformers folders with a small
byte-level BPE tokenizer (ChatML chat template), built in the test itself: no downloads."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 320
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDS = [3, 17, 90, 45, 200, 11, 64, 150, 7, 99, 250, 31]


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
            "low rank adaptation of large language models"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)


def config(arch: str):
    import transformers as t
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    if arch == "llama":
        return t.LlamaConfig(**common), t.LlamaForCausalLM
    if arch == "mistral":
        return t.MistralConfig(**common, sliding_window=None), t.MistralForCausalLM
    if arch == "qwen2":
        return t.Qwen2Config(**common), t.Qwen2ForCausalLM
    if arch == "qwen3":
        return t.Qwen3Config(**common, head_dim=16), t.Qwen3ForCausalLM
    if arch == "gemma":
        return t.GemmaConfig(**common, head_dim=16), t.GemmaForCausalLM
    if arch == "gemma2":
        return t.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=64), t.Gemma2ForCausalLM
    if arch == "gemma3":
        return t.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=64), t.Gemma3ForCausalLM
    if arch == "phi3":
        return t.Phi3Config(**common), t.Phi3ForCausalLM
    raise KeyError(arch)


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")


def tiny_model(arch: str, seed: int = 0):
    cfg, cls = config(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms away from their init values, so a missed +1 or permutation shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tiny(arch: str, folder: Path, max_shard_size: str | None = None, dtype=None, seed: int = 0):
    model = tiny_model(arch, seed)
    if dtype is not None:
        model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)
    save_tokenizer(folder)
    return model


def add_adapter(model, folder: Path, seed: int = 1, **cfg):
    """Injects a LoRA adapter with random non-zero factors into `model`, saves it to `folder`, returns the model."""
    import lorakit
    lorakit.inject(model, lorakit.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **cfg}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and "magnitude" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lorakit.save_adapter(model, folder)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_cpp_logits(path, ids=IDS, lora=None):
    import numpy as np
    import llama_cpp
    kw = {"lora_path": str(lora)} if lora else {}
    # f32 KV cache: llama.cpp's default f16 cache alone moves logits by ~1e-3
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kw)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def read_gguf(path):
    """Returns (metadata {key: value}, tensors {name: shape in torch order}) of a GGUF file."""
    import gguf
    r = gguf.GGUFReader(str(path))
    meta = {}
    for k, f in r.fields.items():
        try:
            meta[k] = f.contents()
        except Exception:
            meta[k] = None
    tensors = {t.name: tuple(int(d) for d in reversed(list(t.shape))) for t in r.tensors}
    return meta, tensors, r


def config_json(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def save_spm_tokenizer(folder: Path) -> None:
    """A SentencePiece-style tokenizer.json (BPE with byte fallback, '▁' for spaces), as transformers converts
    Llama-2 / Mistral / Gemma / Phi-3 tokenizers: exported through the "llama" GGUF tokenizer model."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "a"), ("o", "w"), ("▁", "c"), ("▁c", "a"), ("▁ca", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    fast.save_pretrained(folder)
