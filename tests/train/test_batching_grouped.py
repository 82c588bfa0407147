"""Batches without padding waste: length-grouped order (deterministic, resumable) and padding-free batches (exact)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lorakit.train import batching, optim, step
from lorakit.train.batching import collate_padding_free, grouped_batch_order, padding_stats
from lorakit.train.data import IGNORE_INDEX, collate
from train_fixtures import tiny_model


def rows(n=203, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(5, 60)
        ids = [rng.randint(3, 90) for _ in range(k)]
        cut = rng.randint(1, k - 1)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return out


def test_grouped_order_is_a_deterministic_permutation_with_little_padding():
    ex = rows()
    lengths = [len(e["input_ids"]) for e in ex]
    a = grouped_batch_order(lengths, 8, seed=3, epoch=0)
    assert a == grouped_batch_order(lengths, 8, seed=3, epoch=0)
    assert a != grouped_batch_order(lengths, 8, seed=3, epoch=1) != grouped_batch_order(lengths, 8, seed=4, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(len(ex)))
    assert all(len(b) == 8 for b in a[:-1])  # only the epoch's last batch can be short
    grouped = padding_stats(a, lengths)["ratio"]
    plain = padding_stats(batching.batch_order(len(ex), 8, 3, 0), lengths)["ratio"]
    assert grouped < 1.05 < plain


def test_grouped_batches_resume_exactly_across_epochs():
    ex = rows(40)
    straight = batching.iterate_batches(ex, 4, 7, batching.DataPosition(), 0, group_by_length=True)
    want = [next(straight)["input_ids"].tolist() for _ in range(25)]  # 10 batches per epoch: crosses two epochs
    pos = batching.DataPosition()
    first = batching.iterate_batches(ex, 4, 7, pos, 0, group_by_length=True)
    got = [next(first)["input_ids"].tolist() for _ in range(13)]
    assert (pos.epoch, pos.index) == (1, 3)
    resumed = batching.iterate_batches(ex, 4, 7, batching.DataPosition(pos.epoch, pos.index), 0, group_by_length=True)
    got += [next(resumed)["input_ids"].tolist() for _ in range(12)]
    assert got == want


def test_grouped_batches_split_over_ranks_like_one_process():
    ex = rows(30)
    one = batching.iterate_batches(ex, 4, 3, batching.DataPosition(), 0, group_by_length=True)
    r0 = batching.iterate_batches(ex, 2, 3, batching.DataPosition(), 0, rank=0, world_size=2, group_by_length=True)
    r1 = batching.iterate_batches(ex, 2, 3, batching.DataPosition(), 0, rank=1, world_size=2, group_by_length=True)
    for _ in range(7):
        a, b, c = next(one), next(r0), next(r1)
        assert [r[m.bool()].tolist() for r, m in zip(a["input_ids"], a["attention_mask"])] == \
            [r[m.bool()].tolist() for x in (b, c) for r, m in zip(x["input_ids"], x["attention_mask"])]


def per_row_losses(logits, labels):
    """Returns each row's summed next-token loss over its targets."""
    t = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), t.clamp(min=0), reduction="none") * (t != IGNORE_INDEX)
    return ce.sum(1)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padding_free_batch_gives_each_row_its_padded_loss(impl):
    model = tiny_model(101)
    model.config._attn_implementation = impl
    ex = rows(5, seed=1)
    padded = collate(ex, 0)
    free = collate_padding_free(ex)
    assert free["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in ex))
    with torch.no_grad():
        want = per_row_losses(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                              padded["labels"])
        logits = model(input_ids=free["input_ids"], position_ids=free["position_ids"], use_cache=False).logits
    got, start = [], 0
    for e in ex:  # cut the one row back into the examples; each one's loss is the padded row's
        n = len(e["input_ids"])
        lab = free["labels"][:, start:start + n]
        got.append(per_row_losses(logits[:, start:start + n], lab)[0])
        start += n
    torch.testing.assert_close(torch.stack(got), want, atol=1e-5, rtol=1e-5)
    # and the recipe's loss (loss_sum, chunked head) sees the same total and target count
    with torch.no_grad():
        s_pad, n_pad = step.loss_sum(model, padded)
        s_free, n_free = step.loss_sum(model, free)
    assert n_pad == n_free
    torch.testing.assert_close(s_free, s_pad, atol=1e-4, rtol=1e-5)


def test_padding_free_training_step_equals_the_padded_one():
    import lorakit
    ex = rows(6, seed=2)
    results = []
    for batch in (collate(ex, 0), collate_padding_free(ex)):
        model = tiny_model(101)
        torch.manual_seed(0)
        lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        opt = optim.build_optimizer(model, 1e-2)
        r = step.train_step(model, [batch], opt, None, 1.0)
        results.append((r.loss, r.target_tokens, r.input_tokens,
                        torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])))
    (l0, t0, i0, p0), (l1, t1, i1, p1) = results
    assert (t0, i0) == (t1, i1) and l0 == pytest.approx(l1, abs=1e-5)
    torch.testing.assert_close(p1, p0, atol=1e-5, rtol=1e-4)


def test_padding_free_is_the_default_where_it_is_exact():
    from transformers import GPT2Config, GPT2LMHeadModel
    llama = tiny_model(101)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=101))
    assert batching.resolve_padding_free(None, llama) is True  # Llama-style: exact (tests above)
    assert batching.resolve_padding_free(None, gpt2) is False  # no packed-row masking: padded batches
    assert batching.resolve_padding_free(False, llama) is False and batching.resolve_padding_free(True, gpt2) is True
    llama.config._attn_implementation = "flex_attention"
    assert batching.resolve_padding_free(None, llama) is False
