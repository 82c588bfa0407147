"""One optimizer step: the token-summed loss (chunked output head where it is exact), accumulation, NaN checks."""
from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.model.packed_attention import packed_attention
from lorakit.model.storage_dtype import is_plain_head
from lorakit.model.targets import output_head
from lorakit.ops.cross_entropy import linear_cross_entropy
from lorakit.train.data import IGNORE_INDEX
from lorakit.train.distributed import global_sums, global_tokens
from lorakit.train.router_aux import add_router_aux, router_aux_kwargs
from lorakit.train.runtime import model_device, to_device


class TrainingDiverged(LorakitError):
    """The loss (or a parameter or gradient) became NaN/Inf."""


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    fwd = getattr(model, "module", model).forward  # DDP wraps the model in .module
    try:
        return "logits_to_keep" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False


# Causal LMs whose logits are exactly lm_head(backbone(x).last_hidden_state): no scaling or soft-capping after
# the head, no auxiliary losses. For these the loss is computed from the hidden states with the chunked head.
CHUNKED_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
HEAD_BLOCK_ELEMENTS = 1 << 22  # logits held at once by the chunked head: 16 MiB in fp32


def chunked_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """Returns (backbone, lm_head) when `model`'s loss can be computed by `linear_cross_entropy` on the backbone's
    hidden states, else None (other architectures, a LoRA-wrapped or trained-copy head, DDP/FSDP wrappers)."""
    cfg = getattr(model, "config", None)  # a DDP wrapper has none: its forward must run for gradient sync
    if getattr(cfg, "model_type", None) not in CHUNKED_HEAD_MODEL_TYPES:
        return None
    if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in ("final_logit_softcapping", "logit_scale",
                                                                 "logits_scaling")):
        return None
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
    head = output_head(model)
    if not isinstance(backbone, nn.Module) or not is_plain_head(head):
        return None
    if type(head.weight) is not nn.Parameter or type(backbone).__name__.startswith("FSDP"):
        return None  # sharded (DTensor) weights are gathered by the wrapper's own forward hooks
    return backbone, head


def loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Returns (sum of next-token cross-entropy over target tokens, number of target tokens).

    Where `chunked_head` allows, only the hidden states that predict a target go through the output head, a
    block of rows at a time (`lorakit.functional.linear_cross_entropy`): the (tokens x vocabulary) logits,
    their softmax and their gradient never exist whole. Elsewhere: the model's logits, restricted to target
    positions with `logits_to_keep` when the model accepts it. A MoE model's router loss is added with the
    run's weight (lorakit.train.router_aux).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    split = chunked_head(model)
    if split is not None:
        backbone, head = split
        hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1]
        chunk = max(16, HEAD_BLOCK_ELEMENTS // head.out_features)
        return linear_cross_entropy(hidden[keep], head.weight, head.bias, targets[keep], chunk=chunk), n
    if _accepts_logits_to_keep(model):
        # Project only the positions that predict a target: instruction data is mostly prompt, and the
        # vocabulary projection is a large share of a small model's compute (SmolLM2: 49k x 576 per token).
        mask = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)
        out = model(**inputs, use_cache=False, logits_to_keep=mask, **router_aux_kwargs(model))
        logits = out.logits
        if logits.numel() == n * logits.size(-1):
            loss = F.cross_entropy(logits.reshape(n, -1).float(), targets[keep], reduction="sum")
            return add_router_aux(loss, out, n, model), n
    out = model(**inputs, use_cache=False, **router_aux_kwargs(model))
    logits = out.logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return add_router_aux(loss, out, n, model), n


def first_nonfinite(model: nn.Module) -> str | None:
    """Returns 'parameter X' or 'gradient of X' for the first trainable tensor holding NaN/Inf, else None."""
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            return f"parameter {name}"
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"gradient of {name}"
    return None


@dataclass
class StepResult:
    """What one optimizer step did."""
    loss: float
    target_tokens: int
    input_tokens: int  # summed over ranks, like target_tokens: the progress bar's tokens/s is the whole run's
    grad_norm: float | None = None
    finite: bool = True
    bad: str | None = None  # the first parameter/gradient that went non-finite


def train_step(model: nn.Module, micro_batches: Sequence[dict], optimizer, scheduler=None,
               max_grad_norm: float | None = None, extra_loss: Callable[[], torch.Tensor] | None = None,
               after_update: Callable[[], object] | None = None) -> StepResult:
    """Runs forward/backward over the micro-batches (gradient accumulation) and one optimizer step.

    The loss is normalised by the step's total target tokens, so accumulating k micro-batches gives the
    same update as one batch k times larger. A non-finite loss or gradient skips the update (grads are
    zeroed, the scheduler still advances) and returns finite=False naming the first bad tensor; under
    torchrun every rank skips together. `extra_loss()` (a regulariser, e.g. adaptive rank's orthogonality
    penalty) is added once per step and is not part of the reported loss; `after_update()` runs after a
    successful optimizer.step() while the gradients are still there (adaptive rank's importance update).
    Batches are moved to the model's device. Packed (padding-free) batches attend per example
    (lorakit.model.packed_attention) for the whole step, recomputed forwards of checkpointed layers included.
    """
    packed = any("cu_seq_lens_q" in b for b in micro_batches)
    with packed_attention(model) if packed else contextlib.nullcontext():
        return _train_step(model, micro_batches, optimizer, scheduler, max_grad_norm, extra_loss, after_update)


def _train_step(model, micro_batches, optimizer, scheduler, max_grad_norm, extra_loss, after_update) -> StepResult:
    model.train()
    device = model_device(model)
    micro_batches = [to_device(b, device) for b in micro_batches]
    n_total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    # distributed (lorakit.train.distributed): normalise by the GLOBAL batch's target tokens, times the number of
    # ranks because DDP/FSDP average gradients over them; (n_total, 1) in a single process.
    n_total, n_ranks = global_tokens(n_total)
    input_tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                       for b in micro_batches)
    total, loss_finite = 0.0, True
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(micro_batches):
        loss, _ = loss_sum(model, batch)
        # No early exit on a non-finite loss: under DDP/FSDP every backward is a collective, so a rank that
        # skipped one would hang the others. The poisoned gradients are thrown away below.
        loss_finite = loss_finite and bool(torch.isfinite(loss))
        scaled = loss * n_ranks / max(n_total, 1)
        if i == 0 and extra_loss is not None:
            scaled = scaled + extra_loss()  # the same on every rank, so DDP's averaging leaves it as is
        scaled.backward()
        total += float(loss.detach())
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
    finite = loss_finite and math.isfinite(grad_norm)
    # One all-reduce gives every rank the global loss, token count and whether ANY rank saw NaN/Inf, so all
    # ranks step or skip together (a rank stopping alone would leave the others waiting in a collective).
    total, bad_ranks, input_tokens = global_sums(total, float(not finite), input_tokens)
    finite = bad_ranks == 0
    bad = None
    if finite:
        optimizer.step()
        if after_update is not None:
            after_update()
    else:
        bad = first_nonfinite(model)
        if not loss_finite and (bad is None or bad.startswith("gradient")):  # the NaN loss poisoned the grads
            bad = "the loss (parameters are finite)"
        bad = bad or "the loss or gradients on another rank"
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        with warnings.catch_warnings():  # a skipped update still advances the schedule; torch warns about that
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    return StepResult(total / max(n_total, 1), n_total, int(input_tokens), grad_norm, finite, bad)
