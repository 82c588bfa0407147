"""Held-out measurements: mean token loss, greedy generation, exact-match accuracy per task.

The work is done by lorakit.train.heldout: one forward per held-out row gives both its loss and its greedy
answer (prompt prefixes shared by many rows computed once); `greedy_generate` is model.generate, batched.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lorakit.train.data import answer_matches
from lorakit.train.heldout import encode_prompt, evaluate_heldout, examples_loss, generate_ids


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[dict], batch_size: int, pad_token_id: int) -> float:
    """Returns the mean cross-entropy per target token over `examples` (nan when there are none): batches
    sorted by length, shared prompt prefixes computed once (lorakit.train.heldout.examples_loss)."""
    total, n = examples_loss(model, examples, batch_size, pad_token_id)
    return total / n if n else float("nan")


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                    batch_size: int = 16) -> list[str]:
    """Returns the greedy continuation of each prompt (model.generate: batched by similar length, left-padded,
    KV cache; special tokens stripped)."""
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
    held = evaluate_heldout(model, tokenizer, records, template, system, batch_size, max_new_tokens,
                            max_seq_len=max_seq_len, loss=with_loss)
    per_task: dict[str, list[int]] = {}
    samples = []
    for r, a in zip(records, held.answers):
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
