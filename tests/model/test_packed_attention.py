"""Per-example attention on packed rows (lorakit.model.packed_attention): exact, and n·L² instead of T² work."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.model import packed_attention as pa
from lorakit.model.activation_checkpointing import enable_gradient_checkpointing
from lorakit.train import optim, step
from lorakit.train.batching import collate_padding_free
from lorakit.train.data import IGNORE_INDEX


def tiny(kind: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM
    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=256, pad_token_id=0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:  # a sliding window shorter than the longest example: the per-example call would ignore it
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=6))
    model.config._attn_implementation = "sdpa"
    return model.eval()


def rows(n=5, seed=0, lo=4, hi=30):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(lo, hi)
        ids = [rng.randint(3, 90) for _ in range(k)]
        cut = rng.randint(1, k - 1)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return out


def test_sequence_boundaries_follow_the_position_ids():
    b = pa.sequence_boundaries([0, 1, 2, 0, 1, 0, 1, 2, 3])
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and b["max_length_q"] == 4
    assert b["cu_seq_lens_k"].dtype == torch.int32
    # a row that does not start at 0 (a continued document) is one sequence; a restart anywhere is a new one
    assert pa.sequence_boundaries([5, 6, 7, 0, 1])["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert pa.sequence_boundaries([0, 1, 2, 3, 7, 8])["cu_seq_lens_q"].tolist() == [0, 4, 6]
    free = collate_padding_free(rows(3, seed=4))
    assert free["cu_seq_lens_q"].tolist()[-1] == free["input_ids"].shape[1]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_packed_row_logits_equal_each_example_alone(kind):
    model = tiny(kind)
    ex = rows(5, seed=1)
    free = collate_padding_free(ex)
    inputs = {k: v for k, v in free.items() if k != "labels"}
    with torch.no_grad(), pa.packed_attention(model) as switched:
        assert switched and model.config._attn_implementation == pa.PACKED_SDPA
        got = model(**inputs, use_cache=False).logits[0]
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        want = torch.cat([model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in ex])
        masked = model(**inputs, use_cache=False).logits[0]  # transformers' own block-diagonal mask
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, masked, atol=1e-5, rtol=1e-5)


def spy_sdpa(monkeypatch):
    shapes = []
    real = F.scaled_dot_product_attention

    def spy(q, *a, **k):
        shapes.append(tuple(q.shape))
        return real(q, *a, **k)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    import transformers.integrations.sdpa_attention as sd
    monkeypatch.setattr(sd.torch.nn.functional, "scaled_dot_product_attention", spy)
    return shapes


def test_packed_row_attends_per_example_not_over_the_whole_row(monkeypatch):
    model = tiny("llama")
    ex = rows(6, seed=2)
    free = collate_padding_free(ex)
    inputs = {k: v for k, v in free.items() if k != "labels"}
    shapes = spy_sdpa(monkeypatch)
    longest, total = max(len(e["input_ids"]) for e in ex), free["input_ids"].shape[1]
    with torch.no_grad(), pa.packed_attention(model):
        model(**inputs, use_cache=False)
    assert shapes == [(6, 4, longest, 8)] * 2  # one call per layer: (examples, heads, longest, head_dim)
    shapes.clear()
    with torch.no_grad():
        model(**inputs, use_cache=False)
    assert shapes == [(1, 4, total, 8)] * 2  # plain sdpa: the whole row


def test_sliding_window_shorter_than_an_example_keeps_the_masked_path(monkeypatch):
    model = tiny("mistral")
    free = collate_padding_free(rows(3, seed=3, lo=10, hi=20))
    shapes = spy_sdpa(monkeypatch)
    with torch.no_grad(), pa.packed_attention(model):
        model(**{k: v for k, v in free.items() if k != "labels"}, use_cache=False)
    assert shapes and all(s[0] == 1 for s in shapes)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_on_packed_rows_equals_the_masked_one(checkpointing):
    ex = rows(6, seed=5)
    free = collate_padding_free(ex)
    results = []
    for use_packed in (True, False):
        model = tiny("llama", seed=1)
        torch.manual_seed(0)
        lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        if checkpointing:
            enable_gradient_checkpointing(model)
        batch = dict(free) if use_packed else {k: free[k] for k in ("input_ids", "labels", "position_ids")}
        opt = optim.build_optimizer(model, 1e-2)
        r = step.train_step(model, [batch], opt, None, 1.0)
        assert model.config._attn_implementation == "sdpa"
        results.append((r.loss, torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])))
    (l0, p0), (l1, p1) = results
    assert l0 == pytest.approx(l1, abs=1e-5)
    torch.testing.assert_close(p0, p1, atol=1e-5, rtol=1e-4)


def test_the_switch_is_undone_on_error_and_skips_other_implementations():
    model = tiny("llama")
    with pytest.raises(RuntimeError):
        with pa.packed_attention(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    with pa.packed_attention(model) as switched:
        assert not switched and model.config._attn_implementation == "eager"

    class Wrapper(torch.nn.Module):  # DDP-like: the model under .module
        def __init__(self, m):
            super().__init__()
            self.module = m
    model.config._attn_implementation = "sdpa"
    with pa.packed_attention(Wrapper(model)) as switched:
        assert switched and model.config._attn_implementation == pa.PACKED_SDPA


def test_padded_batches_and_generation_are_plain_sdpa_inside_the_switch():
    model = tiny("llama")
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        with pa.packed_attention(model):
            got = model(input_ids=ids, attention_mask=mask).logits
            gen2 = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(got, want)
    assert torch.equal(gen, gen2)
