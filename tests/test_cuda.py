"""On a CUDA device (bench/gpu_check.sh runs these on a lent GPU; skipped without one): the fused LoRA kernels in
bf16 against the dense equation, merge, mixed-adapter batches, gradient checkpointing with CPU offload, the
chunked loss head, the one-pass held-out evaluation, and per-example attention on padding-free rows.

LORAKIT_TEST_DEVICE=cpu runs the same tests on the CPU (bench/gpu_check.sh --device cpu --small: the rehearsal).
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.config import LoraConfig
from lorakit.ops.cross_entropy import linear_cross_entropy
from lorakit.ops.lora import lora_linear, lora_linear_shared

DEVICE = os.environ.get("LORAKIT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                                   reason="needs a CUDA device (LORAKIT_TEST_DEVICE=cpu to rehearse)")]
BF16 = dict(rtol=2e-2, atol=2e-2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0, dtype=torch.bfloat16, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=211, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(DEVICE, dtype).eval()


def randomize(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    return model


def inputs(batch=3, seq=17, vocab=211, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g).to(DEVICE)


def rnd(*shape, seed=0, dtype=torch.bfloat16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def test_fused_lora_linear_bf16_matches_the_dense_equation():
    x = rnd(4, 33, 96, seed=0).requires_grad_()
    w, b = rnd(80, 96, seed=1, scale=0.1), rnd(80, seed=2)
    A, B = rnd(8, 96, seed=3, scale=0.1).requires_grad_(), rnd(80, 8, seed=4, scale=0.1).requires_grad_()
    s = 2.0
    out = lora_linear(x, w, b, A, B, s)
    g = rnd(*out.shape, seed=5)
    got = torch.autograd.grad(out, [x, A, B], g)
    x32, A32, B32 = (t.detach().float().requires_grad_() for t in (x, A, B))
    ref = x32 @ w.float().t() + b.float() + s * (x32 @ A32.t()) @ B32.t()
    want = torch.autograd.grad(ref, [x32, A32, B32], g.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, **BF16)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.float(), e, rtol=3e-2, atol=3e-2 * float(e.abs().max()))


def test_fused_shared_input_bf16_matches_separate_projections():
    x = rnd(2, 9, 64, seed=0).requires_grad_()
    ws = [rnd(d, 64, seed=10 + i, scale=0.1) for i, d in enumerate((64, 32, 32))]
    As = [rnd(4, 64, seed=20 + i, scale=0.1).requires_grad_() for i in range(3)]
    Bs = [rnd(d, 4, seed=30 + i, scale=0.1).requires_grad_() for i, d in enumerate((64, 32, 32))]
    outs = lora_linear_shared(x, ws, [None] * 3, As, Bs, [2.0] * 3)
    for o, w, A, B in zip(outs, ws, As, Bs):
        torch.testing.assert_close(o.float(), (x.float() @ w.float().t() + 2.0 * (x.float() @ A.float().t())
                                               @ B.float().t()).detach(), **BF16)


def test_chunked_loss_head_bf16_matches_cross_entropy():
    h = rnd(50, 64, seed=0).requires_grad_()
    w = rnd(211, 64, seed=1, scale=0.1).requires_grad_()
    t = torch.randint(0, 211, (50,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    loss = linear_cross_entropy(h, w, None, t, chunk=16)
    ref = F.cross_entropy((h.float() @ w.float().t()), t, reduction="sum")
    torch.testing.assert_close(loss.float(), ref, rtol=2e-2, atol=1e-1)
    gh, gw = torch.autograd.grad(loss, [h, w])
    rh, rw = torch.autograd.grad(ref, [h, w])
    torch.testing.assert_close(gh.float(), rh.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=5e-2, atol=5e-2)


def test_merge_and_unmerge_bf16_keep_the_outputs():
    model = randomize(lorakit.inject(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)))
    x = inputs()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        unmerged = model(x).logits.float()
        lorakit.merge(model)
        merged = model(x).logits.float()
        lorakit.unmerge(model)
        again = model(x).logits.float()
    torch.testing.assert_close(merged, unmerged, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(again, unmerged, rtol=2e-2, atol=2e-2)
    for n, p in model.named_parameters():
        if n in base:  # unmerge restores the frozen weights (to bf16 rounding)
            torch.testing.assert_close(p.float(), base[n].float(), rtol=1e-2, atol=1e-2)


def test_mixed_adapter_batch_rows_equal_single_adapter_runs():
    model = tiny_llama(dtype=torch.float32)
    lorakit.inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "a")
    lorakit.inject(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]), "b")
    randomize(model, std=0.1)
    x = inputs(batch=4)
    names = ["a", "__base__", "b", "a"]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with lorakit.disable_adapters(model):
                    want = model(input_ids=x[i:i + 1]).logits
            else:
                lorakit.set_adapter(model, name)
                want = model(input_ids=x[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(offload):
    from lorakit.model.activation_checkpointing import enable_gradient_checkpointing
    grads = []
    for checkpointing in (False, True):
        model = randomize(lorakit.inject(tiny_llama(dtype=torch.float32), LoraConfig(r=4, lora_alpha=8,
                                                                                     target_modules=TARGETS)))
        if checkpointing:
            with warnings.catch_warnings():  # offload on the CPU rehearsal: "nothing changes"
                warnings.simplefilter("ignore", UserWarning)
                enable_gradient_checkpointing(model, offload=offload)
        model.train()
        x = inputs()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        grads.append({n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5)


def test_one_pass_heldout_answers_equal_generate():
    from lorakit.train import heldout
    from lorakit.train.evaluate import greedy_generate
    from train_fixtures import alpaca_rows, tiny_model, tiny_tokenizer
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).to(DEVICE)
    torch.manual_seed(1)
    randomize(lorakit.inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")), std=0.2)
    rows = alpaca_rows(12, seed=3)
    want = [greedy_generate(model, tok, [p], 5, 1)[0]
            for p in (heldout.render_prompt(r, tok, "alpaca") for r in rows)]
    got = heldout.evaluate_heldout(model, tok, rows, "alpaca", batch_size=4, max_new_tokens=5)
    assert got.answers == want and got.target_tokens > 0


def test_packed_rows_attend_per_example_in_bf16():
    from lorakit.model.packed_attention import packed_attention
    from lorakit.train.batching import collate_padding_free
    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": torch.randint(3, 211, (int(n),), generator=g).tolist()} for n in (9, 23, 4, 17)]
    free = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in collate_padding_free(rows).items()
            if k != "labels"}
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]], device=DEVICE)).logits[0] for r in rows])
        masked = model(**free, use_cache=False).logits[0]
        with packed_attention(model) as switched:
            packed = model(**free, use_cache=False).logits[0]
    assert switched
    torch.testing.assert_close(packed.float(), alone.float(), **BF16)
    torch.testing.assert_close(packed.float(), masked.float(), **BF16)


def test_qlora_nf4_layer_trains_on_the_device():
    pytest.importorskip("bitsandbytes")
    from lorakit.model.quantize import quantize
    model = tiny_llama(dtype=torch.float32)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantize(model)
    lorakit.inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize(model)
    model.train()
    x = inputs()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the 4-bit base stays close to the dense model it came from (NF4 rounding only)
    ref = tiny_llama(dtype=torch.float32)
    ref.load_state_dict(dense)
    with torch.no_grad(), lorakit.disable_adapters(model):
        q = model.eval()(input_ids=x).logits
    with torch.no_grad():
        d = ref(input_ids=x).logits
    assert float((q - d).abs().mean()) < 0.1 * float(d.abs().mean()) + 1e-3
