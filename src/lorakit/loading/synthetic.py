"""Synthetic checkpoints of any transformers architecture: random weights written shard by shard.

`write_synthetic_checkpoint(config, folder)` builds the model on the meta device (no memory), then writes
random tensors in the checkpoint layout of `save_pretrained` (model-0000i-of-0000n.safetensors + index), one
shard in memory at a time, so an 8B-shaped checkpoint needs ~one shard of RAM, not 16 GB. Used by
bench/big_model.py and the loader's tests.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def write_synthetic_checkpoint(config, folder: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                               shard_bytes: int = 5 * 10 ** 9, seed: int = 0, std: float = 0.02,
                               tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Writes config.json, sharded safetensors (+ index) and optionally a tokenizer into `folder`; returns it.

    Weights are N(0, std) (norm weights 1); tied parameters are stored once, as save_pretrained does. The
    folder is written under a temporary name and renamed into place, so a half-written one is never used.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.loading.streaming import empty_parameters

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    tmp.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    with empty_parameters():
        model = AutoModelForCausalLM.from_config(config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    names = list(dict(model.named_parameters()).items())  # tied parameters once
    persistent = set(model.state_dict().keys())
    names += [(n, b) for n, b in model.named_buffers() if n in persistent]
    g = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    size = 0
    for name, p in names:
        nbytes = p.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    shapes = dict(names)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            shape = shapes[name].shape
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("ln_f.weight"):
                t = torch.ones(shape, dtype=dtype)
            else:
                t = torch.empty(shape, dtype=dtype).normal_(0, std, generator=g)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * dtype.itemsize
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    if tokenizer_from is not None:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tmp)
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    return folder
