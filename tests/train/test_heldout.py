"""Held-out evaluation in one pass (lorakit.train.heldout): the answers `model.generate` gives one row at a time,
and the loss evaluate_loss gives, from one forward per row with shared prompt prefixes computed once."""
from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.train import evaluate, heldout, step
from lorakit.train.data import render_prompt
from train_fixtures import alpaca_rows, tiny_model, tiny_tokenizer

MAX_NEW = 5


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny_gpt2(vocab: int):
    import transformers
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)).eval()


def lora(model):
    torch.manual_seed(1)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a trained-looking adapter: B non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def one_by_one(model, tok, records):
    return [evaluate.greedy_generate(model, tok, [render_prompt(r, tok, "alpaca")], MAX_NEW, 1)[0] for r in records]


def records_for(model, tok, n=18, monkeypatch=None):
    """Rows whose reference response is, for some rows, the model's own greedy tokens: every third row all of
    them (teacher forcing gives the whole answer), every third + 1 its first two then EOS (it diverges after
    two), the rest the toy task's answer (it diverges at once). Set at the token level, through the tokenizer
    call evaluate_heldout makes (a decoded random answer does not always tokenize back to the same ids)."""
    rows = alpaca_rows(n, seed=3)
    prompts = [heldout.encode_prompt(tok, render_prompt(r, tok, "alpaca")) for r in rows]
    greedy = heldout.generate_ids(model, prompts, MAX_NEW, 1, tok.pad_token_id, tok.eos_token_id)
    for i, (r, g) in enumerate(zip(rows, greedy)):
        if i % 3 < 2:
            r["forced"] = (prompts[i], g if i % 3 == 0 else g[:2] + [tok.eos_token_id])
    real = heldout.tokenize_records

    def tokenize(records, tokenizer, **kw):
        ex, stats = real(records, tokenizer, **kw)
        if len(records) == 1 and "forced" in records[0]:
            p, response = records[0]["forced"]
            ex = [{"input_ids": p + response, "labels": [-100] * len(p) + response}]
        return ex, stats
    if monkeypatch is not None:
        monkeypatch.setattr(heldout, "tokenize_records", tokenize)
    return rows


def reference_loss(model, examples):
    """Returns the mean response loss of examples in one padded batch (the recipe's loss_sum)."""
    from lorakit.train.data import collate
    with torch.no_grad():
        total, n = step.loss_sum(model.eval(), collate(examples, 0))
    return float(total) / n


def examples_of(rows, tok):
    """Returns the rows tokenized as evaluate_heldout sees them (forced responses included)."""
    return [heldout.tokenize_records([r], tok, template="alpaca")[0][0] for r in rows]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_one_pass_gives_generate_answers_and_evaluate_loss(tok, kind, batch_size, monkeypatch):
    model = lora(tiny_model(len(tok)) if kind == "llama" else tiny_gpt2(len(tok)))
    rows = records_for(model, tok, monkeypatch=monkeypatch)
    want = one_by_one(model, tok, rows)
    got = heldout.evaluate_heldout(model, tok, rows, "alpaca", batch_size=batch_size, max_new_tokens=MAX_NEW)
    assert got.answers == want
    s = got.stats
    assert s["one_pass_rows"] == len(rows) and s["plain_rows"] == 0
    # both routes ran: answers straight from the forward (every third row), and continued decoding
    assert s["shared_prefix_tokens"] > 0 and s["matched_tokens"] >= 6 * (MAX_NEW - 1) + 6 * 2
    assert 0 < s["continued_rows"] <= len(rows) - 6
    examples = examples_of(rows, tok)
    assert got.target_tokens == sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
    assert got.loss == pytest.approx(reference_loss(model, examples), rel=1e-5)


def test_loss_only_and_answers_only(tok, monkeypatch):
    model = lora(tiny_model(len(tok)))
    rows = records_for(model, tok, 10, monkeypatch)
    examples = examples_of(rows, tok)
    only_loss = heldout.evaluate_heldout(model, tok, rows, "alpaca", batch_size=3, generate=False)
    assert only_loss.answers == [None] * len(rows)
    assert only_loss.loss == pytest.approx(reference_loss(model, examples), rel=1e-5)
    acc = evaluate.evaluate_accuracy(model, tok, rows, "alpaca", batch_size=3, max_new_tokens=MAX_NEW, with_loss=True)
    plain = heldout.evaluate_heldout(model, tok, rows, "alpaca", batch_size=3, max_new_tokens=MAX_NEW, loss=False)
    assert plain.answers == one_by_one(model, tok, rows) and plain.target_tokens == 0
    assert acc["loss"] == pytest.approx(only_loss.loss, rel=1e-5) and acc["target_tokens"] == only_loss.target_tokens
    assert evaluate.evaluate_loss(model, examples, 3, 0) == pytest.approx(only_loss.loss, rel=1e-5)


def test_unknown_models_take_the_plain_route_with_the_same_results(tok, monkeypatch):
    model = lora(tiny_model(len(tok)))
    rows = records_for(model, tok, 8, monkeypatch)
    fast = heldout.evaluate_heldout(model, tok, rows, "alpaca", batch_size=4, max_new_tokens=MAX_NEW)
    monkeypatch.setattr(heldout, "one_pass_supported", lambda m: False)
    slow = heldout.evaluate_heldout(model, tok, rows, "alpaca", batch_size=4, max_new_tokens=MAX_NEW)
    assert slow.stats["plain_rows"] == len(rows) and slow.answers == fast.answers
    assert slow.loss == pytest.approx(fast.loss, rel=1e-5)


def test_prefix_groups_share_only_what_every_member_can_skip():
    mk = lambda ids, need: heldout._Row(0, ids, None, None, need=need)  # noqa: E731
    a = list(range(20))
    rows = [mk(a + [50, 51], [20]), mk(a + [60, 61, 62], [21]), mk(a[:12] + [70] * 9, [15]), mk([99] * 30, [29])]
    groups = heldout.prefix_groups(rows)
    shared = {tuple(r.ids[:3]): p for p, g in groups for r in g}
    assert [len(g) for _, g in groups] == [3, 1]
    assert groups[0][0] == 12 and shared[(99, 99, 99)] == 0
