"""The tokenizer of a model spec, without loading (or converting) its weights: data is checked before the model.

    spec                          load_tokenizer(spec)
    None / "default" / "smollm2"  the embedded SmolLM2's tokenizer, read from its GGUF file (no conversion)
    a .gguf file                  the tokenizer stored in the GGUF file
    a folder                      AutoTokenizer.from_pretrained(folder) (config.json + tokenizer files)
    a hub id                      AutoTokenizer.from_pretrained(id), from the local cache when the hub is unreachable

The pad token is set as lorakit.models.load_model sets it (EOS when the tokenizer has none), so data
tokenized with this tokenizer is token for token what the model's own tokenizer gives.
"""
from __future__ import annotations

import os
from pathlib import Path

from lorakit.errors import ModelLoadError


def load_tokenizer(spec: str | os.PathLike | None = None, *, trust_remote_code: bool = False):
    """Returns the tokenizer for a model spec (as lorakit.models.load_model takes it), without the weights."""
    from transformers import AutoTokenizer

    from lorakit.models import EMBEDDED_NAMES, embedded_model_path, hub_reachable

    text = "default" if spec is None else str(spec)
    path = Path(text).expanduser()
    try:
        if text.lower() in EMBEDDED_NAMES or (path.is_file() and path.suffix.lower() == ".gguf"):
            gguf = embedded_model_path() if text.lower() in EMBEDDED_NAMES else path
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        elif path.is_dir():
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        elif path.exists():
            raise ModelLoadError(f"Model file {path} is not a .gguf file; pass a model folder or a .gguf file.")
        else:
            tok = AutoTokenizer.from_pretrained(text, trust_remote_code=trust_remote_code,
                                                local_files_only=not hub_reachable())
    except ModelLoadError:
        raise
    except Exception as e:  # transformers raises many kinds; name the spec and the reason
        raise ModelLoadError(f"Could not load the tokenizer of model {text!r} (needed to check the data before "
                             f"the model loads): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok
