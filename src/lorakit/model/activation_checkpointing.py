"""Activation (gradient) checkpointing for LoRA on a frozen base, with optional CPU offload of what it keeps.

    forward:   block 1 ──► block 2 ──► ... ──► block n        only each block's input is kept
                  │ x1        │ x2                │ xn         (offload=True: moved to CPU memory, pinned)
    backward:  recompute block n from xn, backpropagate, free; then block n-1; ...

Peak activation memory drops from n blocks' worth to one block plus the n inputs (a 168M Llama, batch
4 x 256: see bench/bench_train.py mode lorakit-gc-ce). With offload the inputs live in CPU memory while the
forward pass runs on the GPU (torch.autograd.graph.save_on_cpu); on a CPU-only model it changes nothing.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.errors import LorakitError


def enable_gradient_checkpointing(model: nn.Module, offload: bool = False) -> nn.Module:
    """Returns `model` with non-reentrant activation checkpointing on (transformers models), gradients reaching
    LoRA factors inside blocks whose input does not require grad; offload=True keeps saved tensors on the CPU."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LorakitError(f"{type(model).__name__} does not support gradient checkpointing; turn the option off "
                           f"or use a transformers model that does")
    # use_reentrant=False: gradients flow to LoRA parameters inside a block even when the block's input
    # (the frozen embedding output) does not require grad. enable_input_require_grads covers reentrant
    # implementations a model may still force.
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    if offload:
        offload_saved_activations(model)
    return model


def offload_saved_activations(model: nn.Module) -> None:
    """Makes every forward of `model` keep the tensors autograd saves in CPU memory (pinned on CUDA)."""
    if getattr(model, "_lorakit_offload", None) is not None:
        return
    if not any(p.is_cuda for p in model.parameters()):
        warnings.warn("offload: the model is not on a CUDA device, so its activations already live in CPU memory; "
                      "nothing changes", stacklevel=3)
    state = {}

    def enter(module, args, kwargs):
        if torch.is_grad_enabled():
            ctx = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
            ctx.__enter__()
            state["ctx"] = ctx

    def leave(module, args, kwargs, output):
        ctx = state.pop("ctx", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    model._lorakit_offload = (model.register_forward_pre_hook(enter, with_kwargs=True),
                              model.register_forward_hook(leave, with_kwargs=True, always_call=True))
