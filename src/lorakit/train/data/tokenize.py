"""Tokenization with label masking, truncation, packing and collation of examples into tensors."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from lorakit.train.data.formats import render_segments
from lorakit.train.data.templates import resolve_template

IGNORE_INDEX = -100


def tokenize_example(segments: Sequence[tuple[str, bool]], tokenizer, *, max_seq_len: int | None = None,
                     train_on_inputs: bool = False, add_special_tokens: bool = True) -> dict:
    """Returns {input_ids, labels, truncated}: labels are -100 on non-trainable segments unless train_on_inputs.

    Set add_special_tokens=False for text rendered by a chat template: the template already wrote every
    special token it wants, and a tokenizer-added BOS would be one the model never saw in its own format.
    """
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trainable) in enumerate(segments):
        # Segments are tokenized one by one, as generation tokenizes the prompt alone: the prompt tokens
        # seen in training are exactly the ones seen at inference. Only the first segment may get a BOS.
        piece = tokenizer(text, add_special_tokens=add_special_tokens and i == 0,
                          return_attention_mask=False)["input_ids"]
        ids += piece
        labels += piece if (trainable or train_on_inputs) else [IGNORE_INDEX] * len(piece)
    truncated = max_seq_len is not None and len(ids) > max_seq_len
    if truncated:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def tokenize_records(records: Iterable[dict], tokenizer, *, template: str = "auto", max_seq_len: int | None = None,
                     train_on_inputs: bool = False, system: str | None = None) -> tuple[list[dict], dict]:
    """Returns (examples, stats) with stats {rows, truncated, dropped}; rows left with no target are dropped."""
    examples, stats = [], {"rows": 0, "truncated": 0, "dropped": 0}
    for record in records:
        stats["rows"] += 1
        segs = render_segments(record, tokenizer, template, system)
        if max_seq_len and len(segs) == 1 and segs[0][1]:
            # Raw text is a stream, not a row: cut it into windows instead of throwing the tail away.
            ids = tokenizer(segs[0][0], return_attention_mask=False)["input_ids"]
            examples += [{"input_ids": ids[i:i + max_seq_len], "labels": ids[i:i + max_seq_len]}
                         for i in range(0, len(ids), max_seq_len) if len(ids[i:i + max_seq_len]) > 1]
            continue
        chat = "messages" in record or resolve_template(template, tokenizer) == "chat"
        ex = tokenize_example(segs, tokenizer, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs,
                              add_special_tokens=not chat)
        stats["truncated"] += ex.pop("truncated")
        if all(label == IGNORE_INDEX for label in ex["labels"][1:]):
            stats["dropped"] += 1  # truncation cut the whole response: nothing left to learn from
            continue
        examples.append(ex)
    return examples, stats


def pack_examples(examples: Sequence[dict], block_size: int) -> list[dict]:
    """Returns blocks of <= block_size tokens, whole examples greedily packed, with per-example position_ids.

    Attention: position_ids restart at 0 for each example, and the collated batch carries no attention_mask;
    transformers (>= 4.53, `find_packed_sequence_indices`) then builds a block-diagonal causal mask, so an
    example never attends to the one before it and sees the positions it would see alone. Call the model
    with use_cache=False: with a KV cache transformers skips that detection and the mask is plain causal. Loss: the first
    token of every example gets label -100, since predicting it from the previous example's last token
    would train a cross-example (prompt) token.
    """
    blocks, cur = [], {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        ids, labels = ex["input_ids"][:block_size], ex["labels"][:block_size]
        if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > block_size:
            blocks.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ids
        cur["labels"] += [IGNORE_INDEX] + list(labels[1:])
        cur["position_ids"] += list(range(len(ids)))
    if cur["input_ids"]:
        blocks.append(cur)
    return blocks


def collate(examples: Sequence[dict], pad_token_id: int, *, padding_side: str = "right",
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Returns a padded batch {input_ids, labels, attention_mask | position_ids}; labels are padded with -100."""
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    packed = "position_ids" in examples[0]
    out = {"input_ids": [], "labels": [], "position_ids" if packed else "attention_mask": []}
    for e in examples:
        n, pad = len(e["input_ids"]), width - len(e["input_ids"])
        rows = {"input_ids": (list(e["input_ids"]), [pad_token_id] * pad),
                "labels": (list(e.get("labels", e["input_ids"])), [IGNORE_INDEX] * pad)}
        if packed:
            # Padding becomes one more "sequence" (positions from 0), so it is masked off like any neighbour.
            rows["position_ids"] = (list(e["position_ids"]), list(range(pad)))
        else:
            rows["attention_mask"] = ([1] * n, [0] * pad)
        for key, (real, fill) in rows.items():
            out[key].append(real + fill if padding_side == "right" or packed else fill + real)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
