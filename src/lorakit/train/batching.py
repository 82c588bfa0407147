"""The data order: which examples make up each micro-batch, resumable at (epoch, batch index).

Data order depends only on (seed, epoch), so a run resumed at (epoch, batch index) sees the same batches as
an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from lorakit.train.data import collate


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
                    pad_token_id: int, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Yields this rank's collated micro-batches forever from `position`, advancing it after each one.

    A global batch of batch_size * world_size examples is cut into one slice per rank, so the examples that
    make up a step do not depend on how many processes share it.
    """
    while True:
        order = batch_order(len(examples), batch_size * world_size, seed, position.epoch)
        while position.index < len(order):
            idx = order[position.index][rank * batch_size:(rank + 1) * batch_size]
            position.index += 1
            if idx:
                yield collate([examples[i] for i in idx], pad_token_id)
        position.epoch, position.index = position.epoch + 1, 0


