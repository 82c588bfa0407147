"""The data order: which examples make up each micro-batch, resumable at (epoch, batch index).

Data order depends only on (seed, epoch), so a run resumed at (epoch, batch index) sees the same batches as
an uninterrupted one. Two ways to carry no padding:

    grouped_batch_order(lengths, batch_size, seed, epoch)          (option group_by_length)
        shuffle (seed, epoch) -> windows of 50 batches -> sort each window by length -> cut into batches
        -> shuffle the batch order (same generator; a short last batch stays last)
        Rows of similar length share a batch, so padding to the batch's longest row costs ~nothing; which
        rows a batch holds and the batch order still depend only on (seed, epoch, the rows' lengths).

    collate_padding_free(examples)                                 (option padding_free)
        the batch's rows concatenated into ONE row with per-row position_ids (0.. for each row) and no
        attention_mask: transformers then attends block-diagonally (each row sees only itself, at its own
        positions), so every row's loss is the one it has in a padded batch, with zero padding. The first
        token of each row after the first gets label -100 (predicting it from the previous row's last token is
        not a target in a padded batch either).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from lorakit.model.packed_attention import sequence_boundaries
from lorakit.train.data import IGNORE_INDEX, collate

GROUP_WINDOW = 50  # batches per sorted window (as transformers' LengthGroupedSampler's mega-batches)


def batch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Returns the epoch's global batches (lists of example indices) in a (seed, epoch)-determined order."""
    g = order_generator(seed, epoch)
    perm = torch.randperm(n_examples, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n_examples, batch_size)]


def order_generator(seed: int, epoch: int) -> torch.Generator:
    """Returns the generator the epoch's data order is drawn from (the same seeding as the ungrouped order)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def grouped_batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                        window: int = GROUP_WINDOW) -> list[list[int]]:
    """Returns the epoch's batches (lists of row indices): rows of similar length together, order from (seed, epoch).

    Within a window of `window` batches the rows are sorted by length (ties keep their shuffled order), so
    only the window's last batch can mix lengths from far apart; every batch is full except possibly the
    epoch's last one.
    """
    g = order_generator(seed, epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    span = batch_size * max(1, window)
    batches: list[list[int]] = []
    for s in range(0, len(perm), span):
        rows = sorted(perm[s:s + span], key=lambda i: lengths[i])
        batches += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    # a short batch stays last, as in the ungrouped order (under torchrun its slices may be empty on some ranks)
    tail = [b for b in batches if len(b) < batch_size]
    full = [b for b in batches if len(b) == batch_size]
    return [full[i] for i in torch.randperm(len(full), generator=g).tolist()] + tail


def padding_stats(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> dict:
    """Returns {real_tokens, padded_tokens, ratio}: tokens computed when each batch pads to its longest row."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return {"real_tokens": real, "padded_tokens": padded, "ratio": padded / max(real, 1)}


# Models whose attention masks a packed row by its position ids (transformers' create_causal_mask finds the
# sequence starts where position ids restart), so each example of a padding-free row attends only to itself.
PADDING_FREE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def resolve_padding_free(option: bool | None, model) -> bool:
    """Returns the run's padding_free: the option when set, else True where it is exact for `model` (its type is
    in PADDING_FREE_MODEL_TYPES and it uses sdpa or eager attention)."""
    if option is not None:
        return bool(option)
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "model_type", None) in PADDING_FREE_MODEL_TYPES
            and getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager"))


def collate_padding_free(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Returns one (1, sum of lengths) row {input_ids, labels, position_ids}: the examples back to back, with the
    row's sequence boundaries as transformers' flash-attention kwargs (cu_seq_lens_q/k, max_length_q/k)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for k, e in enumerate(examples):
        n = len(e["input_ids"])
        lab = list(e.get("labels", e["input_ids"]))
        ids += list(e["input_ids"])
        labels += ([IGNORE_INDEX] + lab[1:]) if k else lab
        positions += list(e.get("position_ids", range(n)))  # a packed block keeps its own
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions]),
            **sequence_boundaries(positions)}


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
                    pad_token_id: int, rank: int = 0, world_size: int = 1, group_by_length: bool = False,
                    padding_free: bool = False) -> Iterator[dict]:
    """Yields this rank's collated micro-batches forever from `position`, advancing it after each one.

    A global batch of batch_size * world_size examples is cut into one slice per rank, so the examples that
    make up a step do not depend on how many processes share it. group_by_length: rows of similar length
    share a batch (grouped_batch_order); padding_free: each batch is one row (collate_padding_free).
    """
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


