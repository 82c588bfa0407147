"""The tokenizer of a model spec, without loading (or converting) its weights: data is checked before the model.

    spec                          load_tokenizer(spec)
    None / "default" / "smollm2"  the embedded SmolLM2's tokenizer: from its converted cache folder when there is
                                  one (0.3 s), else read from its GGUF file (4.5 s; no conversion)
    a .gguf file                  the same: the cache folder's copy, else the tokenizer stored in the GGUF file
    a folder                      AutoTokenizer.from_pretrained(folder) (config.json + tokenizer files)
    a hub id                      AutoTokenizer.from_pretrained(id), from the local cache when the hub is unreachable

The pad token is set as lorakit.loading.pretrained.load_model sets it (EOS when the tokenizer has none), so data
tokenized with this tokenizer is token for token what the model's own tokenizer gives.
"""
from __future__ import annotations

import os
from pathlib import Path

from lorakit.errors import ModelLoadError


def load_tokenizer(spec: str | os.PathLike | None = None, *, trust_remote_code: bool = False):
    """Returns the tokenizer for a model spec (as lorakit.loading.pretrained.load_model takes it), without the weights.

    A spec whose tokenizer does not load on its own (a missing path, a broken file) goes to load_model, so
    the error is the one `lorakit train` has always given for it (ModelLoadError naming the path and why).
    """
    from transformers import AutoTokenizer

    from lorakit.loading.pretrained import EMBEDDED_NAMES, cached_tokenizer_folder, embedded_model_path, \
        hub_reachable, load_model

    text = "default" if spec is None else str(spec)
    path = Path(text).expanduser()
    embedded = text.lower() in EMBEDDED_NAMES
    hub_id = not path.exists() and not text.startswith(("/", ".", "~")) and text.count("/") <= 1
    try:
        if embedded or (path.is_file() and path.suffix.lower() == ".gguf"):
            gguf = embedded_model_path() if embedded else path
            cached = cached_tokenizer_folder(gguf)  # the tokenizer load_model returns, saved at conversion
            tok = (AutoTokenizer.from_pretrained(cached) if cached is not None
                   else AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
        elif path.is_dir() and (path / "config.json").is_file():
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        elif hub_id:
            tok = AutoTokenizer.from_pretrained(text, trust_remote_code=trust_remote_code,
                                                local_files_only=not hub_reachable())
        else:
            raise ModelLoadError(text)
    except Exception:  # load_model names what is wrong with the spec (and loads it when only the tokenizer failed)
        return load_model(spec, trust_remote_code=trust_remote_code)[1]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok
