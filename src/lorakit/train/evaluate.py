"""Held-out measurements: mean token loss, greedy generation, exact-match accuracy per task."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lorakit.train.data import answer_matches, collate, render_prompt
from lorakit.train.runtime import model_device, to_device
from lorakit.train.step import loss_sum


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[dict], batch_size: int, pad_token_id: int) -> float:
    """Returns the mean cross-entropy per target token over `examples` (nan when there are none)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, k = loss_sum(model, to_device(collate(examples[i:i + batch_size], pad_token_id), device))
        total, n = total + float(loss), n + k
    model.train(was_training)
    return total / n if n else float("nan")


# ---------------------------------------------------------------------------------------------- accuracy
def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Returns the prompt's token ids exactly as training tokenizes its first segment."""
    bos = tokenizer.bos_token or "\0"
    return tokenizer(prompt, add_special_tokens=not prompt.startswith(bos), return_attention_mask=False)["input_ids"]


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                    batch_size: int = 16) -> list[str]:
    """Returns the greedy continuation of each prompt (batched, left-padded, special tokens stripped)."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    # Similar lengths together: less padding, and left padding keeps every prompt's end aligned.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        batch = to_device(collate([{"input_ids": encoded[i]} for i in chunk], pad, padding_side="left"),
                          model_device(model))
        gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             generation_config=config)
        for row, i in enumerate(chunk):
            out[i] = tokenizer.decode(gen[row, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return out


def evaluate_accuracy(model: nn.Module, tokenizer, records: Sequence[dict], template: str = "auto",
                      system: str | None = None, batch_size: int = 16, max_new_tokens: int = 8) -> dict:
    """Returns {accuracy, n, per_task: {task: {accuracy, n}}, samples}: exact match of greedy answers."""
    prompts = [render_prompt(r, tokenizer, template, system) for r in records]
    answers = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    per_task: dict[str, list[int]] = {}
    samples = []
    for r, a in zip(records, answers):
        ok = answer_matches(a, r["output"])
        per_task.setdefault(r.get("task", "all"), []).append(int(ok))
        if len(samples) < 5:
            samples.append({"input": r.get("input", ""), "expected": r["output"], "generated": a, "correct": ok})
    hits = [h for v in per_task.values() for h in v]
    return {"accuracy": sum(hits) / len(hits) if hits else float("nan"), "n": len(hits),
            "per_task": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(per_task.items())},
            "samples": samples}
