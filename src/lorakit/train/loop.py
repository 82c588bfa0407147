"""The training loop's pieces, as plain functions: optimizer, schedule, data order, step, eval, faults.

    examples --batch_order(seed, epoch)--> micro-batches --train_step--> AdamW step (LoRA+ groups) + LR schedule
                                                                         |  NaN/Inf loss -> StepResult.finite=False
    held-out records --greedy_generate--> answers --normalize/compare--> accuracy per task
    held-out examples --evaluate_loss--> mean loss per target token

The recipe that composes them top to bottom is `lorakit.train.recipe.train`. Nothing here writes files.
Data order depends only on (seed, epoch), so a run resumed at (epoch, batch index) sees the same batches as
an uninterrupted one; `rng_state` / `set_rng_state` carry the python, numpy and torch generators (dropout).
"""
from __future__ import annotations

import inspect
import math
import os
import random
import signal
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.checkpointing import enable_gradient_checkpointing  # noqa: F401  (re-exported)
from lorakit.errors import LorakitError
from lorakit.functional import linear_cross_entropy
from lorakit.train.data import IGNORE_INDEX, answer_matches, collate, render_prompt  # noqa: F401
from lorakit.train.heldout import encode_prompt  # noqa: F401  (re-exported)


class TrainingDiverged(LorakitError):
    """The loss (or a parameter or gradient) became NaN/Inf."""


# ---------------------------------------------------------------------------------------------- processes
def dist_env() -> tuple[int, int]:
    """Returns (rank, world_size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Returns True on rank 0, the only process that prints progress and writes files."""
    return dist_env()[0] == 0


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Returns the python, numpy and torch RNG states as data `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores the RNG states captured by rng_state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str = "auto") -> torch.device:
    """Returns the device to train on: auto = cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if name == "auto":
        from lorakit.train.distributed import local_device
        return local_device()
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        # plain "cuda" under torchrun: each process takes its own GPU, not all of them cuda:0
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


def model_device(model: nn.Module) -> torch.device:
    """Returns the device of the model's first parameter (cpu for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """Returns the batch with every tensor on `device` (the same dict when it is already there)."""
    if all(not isinstance(v, torch.Tensor) or v.device == device for v in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- optimizer
def is_lora_b(name: str) -> bool:
    """Returns True for a LoRA B factor (the matrix LoRA+ trains at a larger learning rate)."""
    return ".lora_B." in name or name.endswith(".lora_B") or ".lora_embedding_B." in name


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, lora_plus_ratio: float = 1.0) -> list[dict]:
    """Returns AdamW param groups over trainable parameters: B factors at lr * lora_plus_ratio, the rest at lr."""
    groups = {"default": [], "lora_B": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["lora_B" if lora_plus_ratio != 1.0 and is_lora_b(name) else "default"].append(p)
    out = [{"params": groups["default"], "lr": lr, "weight_decay": weight_decay, "name": "default"}]
    if groups["lora_B"]:
        out.append({"params": groups["lora_B"], "lr": lr * lora_plus_ratio, "weight_decay": weight_decay,
                    "name": "lora_B"})
    if not any(g["params"] for g in out):
        raise LorakitError("the model has no trainable parameters; did the LoRA targets match any module?")
    return [g for g in out if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, lora_plus_ratio: float = 1.0,
                    betas: Sequence[float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """Returns AdamW over the trainable parameters (LoRA+ groups when lora_plus_ratio != 1)."""
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, lora_plus_ratio), lr=lr, betas=tuple(betas),
                             weight_decay=weight_decay)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Returns the LR multiplier at `step`: linear warmup to 1, then cosine decay to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Schedule:
    """A picklable lr_lambda (so scheduler.state_dict() holds its settings, not None)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Returns a LambdaLR with warmup + cosine (step() once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(warmup_steps, total_steps, min_lr_ratio))


# ---------------------------------------------------------------------------------------------- data order
def batch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Returns the epoch's global batches (lists of example indices) in a (seed, epoch)-determined order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_examples, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n_examples, batch_size)]


def batches_per_epoch(n_examples: int, batch_size: int, world_size: int = 1) -> int:
    """Returns how many optimizer micro-batches one epoch has for a global batch of batch_size*world_size."""
    return max(1, math.ceil(n_examples / (batch_size * world_size)))


def total_steps(n_examples: int, batch_size: int, grad_accum: int, max_steps: int | None, epochs: float,
                world_size: int = 1) -> int:
    """Returns the number of optimizer steps: max_steps, else ceil(epochs * batches per epoch / grad_accum)."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * batches_per_epoch(n_examples, batch_size, world_size) / grad_accum))


@dataclass
class DataPosition:
    """Where the data stream is: the next micro-batch is batch `index` of epoch `epoch`."""
    epoch: int = 0
    index: int = 0


def iterate_batches(examples: Sequence[dict], batch_size: int, seed: int, position: DataPosition,
                    pad_token_id: int, rank: int = 0, world_size: int = 1,
                    group_by_length: bool = False, padding_free: bool = False) -> Iterator[dict]:
    """Yields this rank's collated micro-batches forever from `position`, advancing it after each one.

    A global batch of batch_size * world_size examples is cut into one slice per rank, so the examples that
    make up a step do not depend on how many processes share it. group_by_length: rows of similar length
    share a batch (lorakit.train.grouping.grouped_batch_order), still determined by (seed, epoch).
    padding_free: each batch is one row, its examples back to back with per-example position_ids
    (lorakit.train.grouping.collate_padding_free): no padding at all, the same loss per example.
    """
    from lorakit.train.grouping import collate_padding_free, grouped_batch_order
    lengths = [len(e["input_ids"]) for e in examples] if group_by_length else None
    while True:
        order = (grouped_batch_order(lengths, batch_size * world_size, seed, position.epoch) if group_by_length
                 else batch_order(len(examples), batch_size * world_size, seed, position.epoch))
        while position.index < len(order):
            idx = order[position.index][rank * batch_size:(rank + 1) * batch_size]
            position.index += 1
            if idx:
                rows = [examples[i] for i in idx]
                yield collate_padding_free(rows) if padding_free else collate(rows, pad_token_id)
        position.epoch, position.index = position.epoch + 1, 0


# ---------------------------------------------------------------------------------------------- step
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
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(backbone, nn.Module) or type(head) is not nn.Linear:
        return None
    if type(head.weight) is not nn.Parameter or type(backbone).__name__.startswith("FSDP"):
        return None  # sharded (DTensor) weights are gathered by the wrapper's own forward hooks
    return backbone, head


def loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Returns (sum of next-token cross-entropy over target tokens, number of target tokens).

    Where `chunked_head` allows, only the hidden states that predict a target go through the output head, a
    block of rows at a time (`lorakit.functional.linear_cross_entropy`): the (tokens x vocabulary) logits,
    their softmax and their gradient never exist whole. Elsewhere: the model's logits, restricted to target
    positions with `logits_to_keep` when the model accepts it.
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
        logits = model(**inputs, use_cache=False, logits_to_keep=mask).logits
        if logits.numel() == n * logits.size(-1):
            return F.cross_entropy(logits.reshape(n, -1).float(), targets[keep], reduction="sum"), n
    logits = model(**inputs, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


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
    Batches are moved to the model's device.
    """
    model.train()
    device = model_device(model)
    micro_batches = [to_device(b, device) for b in micro_batches]
    n_total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    # distributed (lorakit.train.distributed): normalise by the GLOBAL batch's target tokens, times the number of
    # ranks because DDP/FSDP average gradients over them; (n_total, 1) in a single process.
    from lorakit.train.distributed import global_tokens
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
    total, bad_ranks, input_tokens = _global_sums(total, float(not finite), input_tokens)
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


def _global_sums(*values: float) -> tuple[float, ...]:
    """Returns the values summed over ranks in one all-reduce (the values themselves in a single process)."""
    import torch.distributed as dist

    from lorakit.train.distributed import _comm_device, is_distributed
    if not is_distributed() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return tuple(t.tolist())


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[dict], batch_size: int, pad_token_id: int) -> float:
    """Returns the mean cross-entropy per target token over `examples` (nan when there are none)."""
    from lorakit.train.heldout import examples_loss  # batches sorted by length, shared prompt prefixes once
    total, n = examples_loss(model, examples, batch_size, pad_token_id)
    return total / n if n else float("nan")


# ---------------------------------------------------------------------------------------------- accuracy
@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                    batch_size: int = 16) -> list[str]:
    """Returns the greedy continuation of each prompt (model.generate: batched by similar length, left-padded,
    KV cache; special tokens stripped)."""
    from lorakit.train.heldout import generate_ids
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = generate_ids(model, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens, batch_size, pad,
                       tokenizer.eos_token_id)
    model.train(was_training)
    return [tokenizer.decode(x, skip_special_tokens=True) for x in ids]


def evaluate_accuracy(model: nn.Module, tokenizer, records: Sequence[dict], template: str = "auto",
                      system: str | None = None, batch_size: int = 16, max_new_tokens: int = 8,
                      with_loss: bool = False, max_seq_len: int | None = None) -> dict:
    """Returns {accuracy, n, per_task: {task: {accuracy, n}}, samples}: exact match of greedy answers.

    with_loss: also {loss, target_tokens}, the held-out loss per response token, from the same forward as
    the answers (lorakit.train.heldout: one forward per row, shared prompt prefixes computed once).
    """
    from lorakit.train.heldout import evaluate_heldout
    held = evaluate_heldout(model, tokenizer, records, template, system, batch_size, max_new_tokens,
                            max_seq_len=max_seq_len, loss=with_loss)
    answers = held.answers
    per_task: dict[str, list[int]] = {}
    samples = []
    for r, a in zip(records, answers):
        ok = answer_matches(a, r["output"])
        per_task.setdefault(r.get("task", "all"), []).append(int(ok))
        if len(samples) < 5:
            samples.append({"input": r.get("input", ""), "expected": r["output"], "generated": a, "correct": ok})
    hits = [h for v in per_task.values() for h in v]
    out = {"accuracy": sum(hits) / len(hits) if hits else float("nan"), "n": len(hits),
           "per_task": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(per_task.items())},
           "samples": samples}
    if with_loss:
        out.update(loss=held.loss, target_tokens=held.target_tokens)
    return out


# ---------------------------------------------------------------------------------------------- signals
class StopRequest:
    """Catches SIGINT/SIGTERM while training: the loop checkpoints at the next step boundary and exits.

    A second signal of the same kind falls through to the default behaviour (immediate interrupt).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str | None:
        """Returns 'SIGINT' / 'SIGTERM' once a signal arrived, else None."""
        return signal.Signals(self.signum).name if self.signum else None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
