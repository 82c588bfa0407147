"""The tokenizer as GGUF metadata (tokenizer.ggml.*), the way llama.cpp's convert_hf_to_gguf.py writes it:

    byte-level BPE (tokenizer.json: GPT-2 style; SmolLM2, Llama 3, Qwen)  model "gpt2", merges, and the
        pre-tokenizer name detected from how the tokenizer splits a check text (deploy.bpe_pre)
    SentencePiece (tokenizer.model; Llama 2, Mistral, Gemma, Phi-3)       model "llama" with scores, through
        the sentencepiece package, else from the tokenizer.json that transformers converted it to
special tokens, add_bos/add_eos and the chat template via gguf.SpecialVocab. The token list is padded to the
model's vocab_size with unused [PADn] entries, so token_embd's rows and the vocabulary agree.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

from lorakit.errors import LorakitError

log = logging.getLogger(__name__)


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>") or (
        token.startswith("<unused") and token.endswith(">"))


def _gpt2_tokens(tokenizer, vocab_size: int):
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            if i in decoder and not decoder[i].normalized:
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if (i in decoder and decoder[i].special) or _looks_special(tok):
                types.append(gguf.TokenType.CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return tokens, types


def bpe_pre_name(tokenizer) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, None when the tokenizer is not known."""
    from lorakit.deploy.bpe_pre import CHECK_TEXT, PRE_BY_HASH
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    return PRE_BY_HASH.get(digest)


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether the HF tokenizer prepends BOS / appends EOS when encoding with special tokens."""
    ids = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    plain = tokenizer.encode("a", add_special_tokens=False)
    return (bos is not None and len(ids) > len(plain) and ids[0] == bos,
            eos is not None and len(ids) > len(plain) and ids[-1] == eos)


def add_vocab(w, folder: Path, hp: dict):
    """Adds the tokenizer of model folder `folder` to GGUFWriter `w`; returns the gguf.SpecialVocab it used."""
    import gguf
    from transformers import AutoTokenizer

    vocab_size = hp["vocab_size"]
    tj = folder / "tokenizer.json"
    model = {}
    if tj.is_file():
        model = json.loads(tj.read_text()).get("model", {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds; the user needs the folder and the reason
        raise LorakitError(f"the tokenizer in {folder} cannot be loaded ({e}); GGUF export needs it.") from None
    spm = (folder / "tokenizer.model").is_file() and importlib.util.find_spec("sentencepiece") is not None
    if model.get("type") == "BPE" and not model.get("byte_fallback") and not spm:
        tokens, types = _gpt2_tokens(tokenizer, vocab_size)
        pre = bpe_pre_name(tokenizer)
        if pre is None:
            log.warning("the BPE pre-tokenizer of %s is not one llama.cpp knows; writing 'default' (llama.cpp may "
                        "split text differently from transformers)", folder)
            pre = "default"
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        merges = True
    else:
        vocab = gguf.SentencePieceVocab(folder) if spm else _llama_hf_vocab(folder)
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens[:vocab_size])
        w.add_token_scores(scores[:vocab_size])
        w.add_token_types(types[:vocab_size])
        merges = False
    if len(tokens) > vocab_size:
        raise LorakitError(f"the tokenizer in {folder} has {len(tokens)} tokens but the model's vocab_size is "
                           f"{vocab_size}: the tokenizer does not belong to this model.")
    special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=vocab_size)
    add_bos, add_eos = _adds(tokenizer)
    special.add_special_token["bos"] = add_bos
    special.add_special_token["eos"] = add_eos
    special.add_to_gguf(w, quiet=True)
    if str(hp.get("model_type", "")).startswith("gemma"):
        w.add_add_space_prefix(False)
    return special


def _llama_hf_vocab(folder: Path):
    import gguf
    try:
        return gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError, ValueError) as e:
        raise LorakitError(f"the tokenizer in {folder} is neither byte-level BPE nor SentencePiece-style ({e}); "
                           f"GGUF export cannot write it (install sentencepiece if the folder has tokenizer.model).") from None
