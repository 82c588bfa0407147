"""Held-out evaluation in one pass: each row's loss and its greedy answer come from the same forward.

    rows -> prompt ids (as generation tokenizes them) + the tokenized row (prompt + response, as training does)
         -> groups of rows sharing a long token prefix (a chat template's system prompt + the task's instruction):
            the prefix's KV cache is computed ONCE per group and reused by every batch of the group
         -> batches of similar length: ONE forward of (the rest of the prompt + the response) over that cache
              loss:   next-token cross-entropy at the response tokens (what evaluate_loss computes)
              answer: greedy decoding IS teacher forcing for as long as the model predicts the reference, so the
                      argmax at the prompt's last position and at each response position gives the greedy answer
                      up to its first token that differs from the reference (or EOS, or max_new_tokens)
         -> rows that diverged (the wrong answers) continue greedy decoding from the same KV cache: the reference
            tokens after the divergence are masked out and each new token gets its row's own next position

Only the positions that predict a target or an answer token go through the output head. Models this path does
not know (`one_pass_supported`) and rows whose prompt tokens are not a prefix of their training tokens take the
plain route: `model.generate` (batched, left-padded, KV cache) for answers and a padded forward for the loss.
Answers equal `model.generate` one row at a time up to floating-point ties (tests/test_heldout.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.train.data import IGNORE_INDEX, collate, render_prompt, tokenize_records
from lorakit.train.runtime import model_device, to_device
from lorakit.train.step import chunked_head, loss_sum

SHARED_MIN = 8  # a group shares its prefix's KV cache only when the prefix is at least this many tokens
ONE_PASS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2")


@dataclass
class HeldOut:
    """What one pass over the held-out rows measured."""
    answers: list[str | None]  # None where generation was not asked for
    loss_sum: float = 0.0
    target_tokens: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """Mean cross-entropy per target token (nan without targets)."""
        return self.loss_sum / self.target_tokens if self.target_tokens else float("nan")


@dataclass
class _Row:
    index: int
    ids: list[int]                 # the forward's tokens
    labels: list[int] | None       # loss targets, aligned with ids (None: no loss from this row)
    prompt_len: int | None         # the answer starts after ids[:prompt_len] (None: answer by the plain route)
    need: list[int] = field(default_factory=list)  # positions whose next-token logits are needed
    generated: list[int] = field(default_factory=list)
    pending: int | None = None     # the next token to feed when decoding continues
    valid: int = 0                 # tokens of ids (from the start) that the continuation builds on


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Returns the prompt's token ids exactly as training tokenizes its first segment."""
    bos = tokenizer.bos_token or "\0"
    return tokenizer(prompt, add_special_tokens=not prompt.startswith(bos), return_attention_mask=False)["input_ids"]


def one_pass_supported(model: nn.Module) -> bool:
    """Returns True for the decoder-only models whose cache, masks and positions this pass is tested with."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in ONE_PASS_MODEL_TYPES:
        return False
    sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    return not sliding and callable(getattr(model, "get_output_embeddings", None))


def _on_model_device(model: nn.Module, batch: dict) -> dict:
    """Returns the batch's tensors on the model's device (runtime.model_device / to_device)."""
    return to_device(batch, model_device(model))


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(rows: list[_Row]) -> list[tuple[int, list[_Row]]]:
    """Returns [(shared prefix length, rows)]: rows sorted by their tokens, grouped where sharing saves most.

    A group's prefix is the tokens all its rows start with, cut to before the first position whose logits any
    of them needs. A row joins the group while (group size - 1) x prefix (the tokens not recomputed) grows.
    """
    rows = sorted(rows, key=lambda r: r.ids)
    groups: list[tuple[int, list[_Row]]] = []
    cur: list[_Row] = []
    shared = 0
    for r in rows:
        limit = min(r.need) if r.need else len(r.ids) - 1
        if cur:
            new = min(shared, _lcp(cur[0].ids, r.ids), limit)
            if len(cur) * new >= (len(cur) - 1) * shared and new >= SHARED_MIN:
                cur.append(r)
                shared = new
                continue
            groups.append((shared if len(cur) > 1 and shared >= SHARED_MIN else 0, cur))
        cur, shared = [r], limit
    if cur:
        groups.append((shared if len(cur) > 1 and shared >= SHARED_MIN else 0, cur))
    return groups


def _cache_arg(module: nn.Module) -> str:
    """Returns the name a forward takes its KV cache by: `cache` (newer transformers) or `past_key_values`."""
    import inspect
    try:
        return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _expand(cache, n: int):
    """Returns a copy of a batch-1 cache repeated n times along the batch."""
    out = copy.deepcopy(cache)
    if n > 1:
        out.batch_repeat_interleave(n)
    return out


@torch.no_grad()
def evaluate_heldout(model: nn.Module, tokenizer, records: Sequence[dict], template: str = "auto",
                     system: str | None = None, batch_size: int = 16, max_new_tokens: int = 8,
                     max_seq_len: int | None = None, loss: bool = True, generate: bool = True) -> HeldOut:
    """Returns the greedy answers (generate) and the response loss (loss) of `records`, in one forward per row."""
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, tokenizer, records, template, system, batch_size, max_new_tokens, max_seq_len,
                         loss, generate)
    finally:
        model.train(was_training)


def _evaluate(model, tokenizer, records, template, system, batch_size, max_new_tokens, max_seq_len, want_loss,
              want_answers) -> HeldOut:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    one_pass = one_pass_supported(model)
    result = HeldOut(answers=[None] * len(records))
    rows: list[_Row] = []
    plain_generate: list[tuple[int, list[int]]] = []
    plain_loss: list[dict] = []
    for i, record in enumerate(records):
        prompt = encode_prompt(tokenizer, render_prompt(record, tokenizer, template, system)) if want_answers else None
        ex = None
        if want_loss or one_pass:
            examples, _ = tokenize_records([record], tokenizer, template=template, max_seq_len=max_seq_len,
                                           system=system)
            ex = examples[0] if examples else None
        if not one_pass:
            if ex is not None and want_loss:
                plain_loss.append(ex)
            if want_answers:
                plain_generate.append((i, prompt))
            continue
        fits = prompt is not None and ex is not None and ex["input_ids"][:len(prompt)] == prompt
        if want_answers and not fits:
            plain_generate.append((i, prompt))
        if fits:
            ids = ex["input_ids"] if want_loss else ex["input_ids"][:len(prompt) + max_new_tokens]
            rows.append(_Row(i, ids, ex["labels"] if want_loss else None, len(prompt)))
        elif want_loss and ex is not None:
            rows.append(_Row(i, ex["input_ids"], ex["labels"], None))
        elif want_answers and ex is None:  # nothing to score: the prompt alone, for its answer
            rows.append(_Row(i, prompt, None, len(prompt)))
            plain_generate.pop()
    for r in rows:
        need = set()
        if r.labels is not None:
            need.update(t - 1 for t in range(1, len(r.ids)) if r.labels[t] != IGNORE_INDEX)
        if r.prompt_len is not None:
            last = min(len(r.ids), r.prompt_len + max_new_tokens) - 1
            need.update(range(r.prompt_len - 1, last + 1))
        r.need = sorted(need)
    rows = [r for r in rows if r.need]
    result.stats = _run_rows(model, rows, batch_size, pad, eos, max_new_tokens, result)
    result.stats.update(rows=len(records), plain_rows=len(plain_generate))
    for r in rows:
        if r.prompt_len is not None and want_answers:
            result.answers[r.index] = tokenizer.decode(r.generated, skip_special_tokens=True)
    if plain_generate:
        texts = generate_ids(model, [p for _, p in plain_generate], max_new_tokens, batch_size, pad, eos)
        for (i, _), ids in zip(plain_generate, texts):
            result.answers[i] = tokenizer.decode(ids, skip_special_tokens=True)
    if plain_loss:
        total, n = _plain_loss(model, plain_loss, batch_size, pad)
        result.loss_sum += total
        result.target_tokens += n
    return result


def _run_rows(model, rows: list[_Row], batch_size: int, pad: int, eos: int | None, max_new: int,
              result: HeldOut) -> dict:
    """Runs the grouped, batched forwards (and continued decoding) over rows; returns what it computed."""
    groups = prefix_groups(rows)
    shared_tokens = sum(p * (len(g) - 1) for p, g in groups)
    stats = {"one_pass_rows": len(rows), "groups": len(groups), "shared_prefix_tokens": shared_tokens,
             "forward_tokens": sum(len(r.ids) for r in rows) - shared_tokens,
             "matched_tokens": 0, "continued_rows": 0, "decode_steps": 0}
    for shared, group in groups:
        cache = _prefix_cache(model, group[0].ids[:shared]) if shared else None
        group = sorted(group, key=lambda r: len(r.ids))
        for s in range(0, len(group), batch_size):
            _forward_batch(model, group[s:s + batch_size], shared, cache, pad, eos, max_new, result, stats)
    return stats


@torch.no_grad()
def examples_loss(model: nn.Module, examples: Sequence[dict], batch_size: int, pad_token_id: int) -> tuple[float, int]:
    """Returns (summed loss, target tokens) of tokenized examples: shared prefixes computed once where supported."""
    was_training = model.training
    model.eval()
    try:
        if not one_pass_supported(model) or any("position_ids" in e for e in examples):
            return _plain_loss(model, list(examples), batch_size, pad_token_id)
        rows = []
        for i, e in enumerate(examples):
            labels = list(e.get("labels", e["input_ids"]))
            need = [t - 1 for t in range(1, len(e["input_ids"])) if labels[t] != IGNORE_INDEX]
            if need:
                rows.append(_Row(i, list(e["input_ids"]), labels, None, need=need))
        result = HeldOut(answers=[])
        _run_rows(model, rows, batch_size, pad_token_id, None, 0, result)
        return result.loss_sum, result.target_tokens
    finally:
        model.train(was_training)


def _prefix_cache(model, ids: list[int]):
    """Returns the KV cache of one token sequence (batch 1)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    split = _head(model)  # the backbone alone when it can: the prefix's logits are never needed
    module = split[0] if split is not None else model
    module(**_on_model_device(model, {"input_ids": torch.tensor([ids])}), **{_cache_arg(module): cache}, use_cache=True)
    return cache


def _head(model):
    """Returns (backbone, head) when the logits are exactly head(backbone's last hidden state), else None."""
    return chunked_head(model)  # the training step's rule (lorakit.train.step)


def _forward_batch(model, batch: list[_Row], shared: int, cache, pad: int, eos: int | None, max_new: int,
                   result: HeldOut, stats: dict) -> None:
    n = len(batch)
    width = max(len(r.ids) for r in batch) - shared
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for b, r in enumerate(batch):
        k = len(r.ids) - shared
        ids[b, :k] = torch.tensor(r.ids[shared:])
        mask[b, shared:shared + k] = 1
    positions = torch.arange(shared, shared + width).expand(n, width)
    placed = _on_model_device(model, {"input_ids": ids, "attention_mask": mask, "position_ids": positions})
    mask = placed["attention_mask"]
    decoding = any(r.prompt_len is not None for r in batch)
    kv = _expand(cache, n) if cache is not None else None
    if decoding and kv is None:
        from transformers import DynamicCache
        kv = DynamicCache()
    split = _head(model)
    inputs = dict(placed, use_cache=decoding, **{_cache_arg(split[0] if split is not None else model): kv})
    rows_at = [b for b, r in enumerate(batch) for _ in r.need]
    cols_at = [q - shared for r in batch for q in r.need]
    if split is not None:
        backbone, head = split
        hidden = backbone(**inputs).last_hidden_state[rows_at, cols_at]
        logits = head(hidden).float()
    else:
        logits = model(**inputs).logits[rows_at, cols_at].float()
    k = 0
    to_continue: list[int] = []
    for b, r in enumerate(batch):
        at = {q: logits[k + j] for j, q in enumerate(r.need)}
        k += len(r.need)
        if r.labels is not None:
            ts = [t for t in range(1, len(r.ids)) if r.labels[t] != IGNORE_INDEX]
            if ts:
                lg = torch.stack([at[t - 1] for t in ts])
                result.loss_sum += float(F.cross_entropy(lg, torch.tensor([r.labels[t] for t in ts], device=lg.device),
                                                         reduction="sum"))
                result.target_tokens += len(ts)
        if r.prompt_len is not None:
            if _greedy_from_forced(r, at, eos, max_new):
                to_continue.append(b)
            stats["matched_tokens"] += len(r.generated) - 1  # answer tokens the teacher-forced forward gave
    if to_continue:
        stats["continued_rows"] += len(to_continue)
        stats["decode_steps"] += _continue(model, [batch[b] for b in to_continue], to_continue, kv, mask, eos, max_new)


def _greedy_from_forced(r: _Row, at: dict, eos: int | None, max_new: int) -> bool:
    """Fills r.generated from the teacher-forced logits; returns True when decoding must go on from r.pending."""
    p = r.prompt_len
    j = 0
    while True:
        tok = int(at[p - 1 + j].argmax())
        r.generated.append(tok)
        if tok == eos or len(r.generated) >= max_new:
            return False
        if p + j < len(r.ids) and tok == r.ids[p + j] and (p + j) in at:
            j += 1  # the model predicted the reference token: its next prediction is in the forward too
            continue
        r.pending, r.valid = tok, p + j  # builds on ids[:p + j] (+ the pending token at position p + j)
        return True


def _continue(model, rows: list[_Row], which: list[int], kv, mask: torch.Tensor, eos: int | None, max_new: int) -> int:
    """Greedy decoding for `rows` (batch positions `which` of the forward) from its KV cache; returns the steps."""
    device = mask.device
    idx = torch.tensor(which, device=device)
    if len(which) < mask.shape[0]:
        kv.batch_select_indices(idx)
    mask = mask[idx].clone()
    for b, r in enumerate(rows):
        mask[b, r.valid:] = 0  # the reference tokens from the divergence on (and padding) are not this row's past
    tok = torch.tensor([[r.pending] for r in rows], device=device)
    pos = torch.tensor([[r.valid] for r in rows], device=device)
    live = [True] * len(rows)
    steps = 0
    while any(live):
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
        logits = model(input_ids=tok, attention_mask=mask, position_ids=pos, **{_cache_arg(model): kv},
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        steps += 1
        nxt = logits.argmax(-1).tolist()
        for b, r in enumerate(rows):
            if live[b]:
                r.generated.append(nxt[b])
                live[b] = nxt[b] != eos and len(r.generated) < max_new
        tok, pos = torch.tensor(nxt, device=device)[:, None], pos + 1
    return steps


def generate_ids(model: nn.Module, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int, pad: int,
                 eos: int | None) -> list[list[int]]:
    """Returns the greedy continuation ids of each prompt via model.generate (batched, left-padded, KV cache)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    out: list[list[int]] = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        batch = _on_model_device(model, collate([{"input_ids": prompts[i]} for i in chunk], pad, padding_side="left"))
        gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             generation_config=config)
        for row, i in enumerate(chunk):
            out[i] = gen[row, batch["input_ids"].shape[1]:].tolist()
    return out


def _plain_loss(model, examples: list[dict], batch_size: int, pad: int) -> tuple[float, int]:
    """Returns (summed loss, target tokens) of examples by padded forwards, batches sorted by length."""
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    total, n = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = _on_model_device(model, collate(examples[s:s + batch_size], pad))
        loss, k = loss_sum(model, batch)
        total, n = total + float(loss), n + k
    return total, n
