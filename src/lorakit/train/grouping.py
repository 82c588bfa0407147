"""Batches without padding waste: length-grouped batch order, and padding-free collation.

    grouped_batch_order(lengths, batch_size, seed, epoch)
        shuffle (seed, epoch) -> windows of 50 batches -> sort each window by length -> cut into batches
        -> shuffle the batch order (same generator)
        Rows of similar length share a batch, so padding to the batch's longest row costs ~nothing; which
        rows a batch holds and the batch order still depend only on (seed, epoch, the rows' lengths), so a
        run resumed at (epoch, index) sees the batches an uninterrupted one sees.

    collate_padding_free(examples)
        the batch's rows concatenated into ONE row with per-row position_ids (0.. for each row) and no
        attention_mask: transformers then attends block-diagonally (each row sees only itself, at its own
        positions), so every row's loss is the one it has in a padded batch, with zero padding. The first
        token of each row after the first gets label -100 (predicting it from the previous row's last token is
        not a target in a padded batch either).
"""
from __future__ import annotations

from typing import Sequence

import torch

from lorakit.train.data import IGNORE_INDEX

GROUP_WINDOW = 50  # batches per sorted window (as transformers' LengthGroupedSampler's mega-batches)


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


def collate_padding_free(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Returns one (1, sum of lengths) row {input_ids, labels, position_ids}: the examples back to back."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for k, e in enumerate(examples):
        n = len(e["input_ids"])
        lab = list(e.get("labels", e["input_ids"]))
        ids += list(e["input_ids"])
        labels += ([IGNORE_INDEX] + lab[1:]) if k else lab
        positions += list(e.get("position_ids", range(n)))  # a packed block keeps its own
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions])}
