"""torch.compile of a model's repeated blocks (regional compilation), used in training steps only.

    embed ──► [block 1] ──► [block 2] ──► ... ──► [block n] ──► norm ──► head/loss
                 └──────────── one compiled graph, reused by every block ──────────┘

A transformers model is n copies of one decoder block; compiling the block (not the whole model) compiles
one graph that every block reuses (its weights are graph inputs), so compile time does not grow with depth
and the loss head (lorakit.functional.linear_cross_entropy), checkpointing and optimizer stay eager. Inductor
fuses the block's elementwise work (RMSNorm, rotary, SiLU·up, the LoRA scale and adds) around the GEMMs.
The compiled path is taken only for training forwards (module.training and grad enabled): evaluation and
generation with a KV cache run the eager forward, so they never trigger recompiles for new cache lengths.
"""
from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from lorakit.errors import LorakitError


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Returns the model's repeated blocks: transformers' `_no_split_modules` classes, else the largest
    ModuleList whose children all share one class."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best if len(best) >= 2 else []


def has_cxx_compiler() -> bool:
    """Returns True when a C++ compiler ($CXX, g++, c++ or clang++), which inductor's CPU kernels need, is found."""
    return any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c)


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Returns the number of blocks whose training forward now runs through torch.compile (`compile_kwargs`
    go to torch.compile); idempotent; `uncompile_blocks` undoes it."""
    if not has_cxx_compiler():
        raise LorakitError("torch.compile needs a C++ compiler for its CPU kernels and found none (g++, c++, "
                           "clang++ or $CXX); install one (e.g. apt install g++) or turn the compile option off")
    blocks = repeated_blocks(model)
    if not blocks:
        raise LorakitError(f"{type(model).__name__}: found no repeated blocks to compile (no _no_split_modules "
                           f"classes and no ModuleList of same-class layers); turn the compile option off")
    for block in blocks:
        if "_lorakit_eager_forward" in block.__dict__:
            continue
        eager = block.forward
        compiled = torch.compile(eager, **compile_kwargs)

        def forward(*args, _eager=eager, _compiled=compiled, _block=block, **kwargs):
            if _block.training and torch.is_grad_enabled():
                return _compiled(*args, **kwargs)
            return _eager(*args, **kwargs)

        block.__dict__["_lorakit_eager_forward"] = eager
        block.forward = forward
    return len(blocks)


def uncompile_blocks(model: nn.Module) -> int:
    """Returns the number of blocks restored to their eager forward."""
    n = 0
    for block in model.modules():
        if block.__dict__.pop("_lorakit_eager_forward", None) is not None:
            del block.forward
            n += 1
    return n
