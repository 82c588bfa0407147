"""Training loop pieces: schedule, LoRA+ groups, accumulation, exact resume, checkpoints, NaN, signals, options."""
from __future__ import annotations

import dataclasses
import math
import os
import signal

import pytest
import torch
import yaml

import lorakit
from lorakit.errors import ConfigError
from lorakit.train import checkpoint as ck
from lorakit.train import loop
from lorakit.train import step as step_module
from lorakit.train.data import tokenize_records
from lorakit.train.options import TrainOptions, dump_yaml, load_options, lora_field_names
from train_fixtures import alpaca_rows, tiny_model, tiny_tokenizer, write_jsonl, write_tiny_model



@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    ex, _ = tokenize_records(alpaca_rows(16), tok, template="alpaca", max_seq_len=256)
    return ex


def lora_model(tok, seed=0, dropout=0.1, **kw):
    model = tiny_model(len(tok), seed=0)
    torch.manual_seed(seed)
    return lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                    target_modules=["q_proj", "v_proj"], **kw))


def setup(tok, steps=6, seed=0, grad_accum=1, **kw):
    model = lora_model(tok, seed, **kw)
    opt = loop.build_optimizer(model, 5e-3, lora_plus_ratio=4.0)
    sched = loop.build_scheduler(opt, 2, steps)
    return model, opt, sched


def run_steps(model, opt, sched, examples, position, n, grad_accum=1, seed=7):
    batches = loop.iterate_batches(examples, 4, seed, position, 0)
    return [loop.train_step(model, [next(batches) for _ in range(grad_accum)], opt, sched, 1.0).loss for _ in range(n)]


# ------------------------------------------------------------------------------------------- schedule, groups
def test_lr_schedule_warmup_then_cosine():
    f = [loop.lr_factor(s, 4, 14, 0.1) for s in range(15)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f[4] == pytest.approx(1.0)
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f[14] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[4:], f[5:]))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = loop.build_scheduler(opt, 4, 14, 0.1)
    seen = []
    for _ in range(15):
        seen.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert seen == pytest.approx(f)


def test_lora_plus_puts_b_in_its_own_group(tok):
    model = lora_model(tok)
    groups = loop.param_groups(model, 1e-3, lora_plus_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    by = {g["name"]: g for g in groups}
    assert by["lora_B"]["lr"] == pytest.approx(1.6e-2) and by["default"]["lr"] == pytest.approx(1e-3)
    assert all("lora_B" in names[id(p)] for p in by["lora_B"]["params"])
    assert all("lora_A" in names[id(p)] for p in by["default"]["params"])
    assert len(by["lora_B"]["params"]) == len(by["default"]["params"]) == 4
    assert len(loop.param_groups(model, 1e-3)) == 1  # ratio 1: plain LoRA, one group


def test_optimizer_is_fused_where_it_applies_and_updates_like_the_plain_one(tok, examples):
    from lorakit.train import optim
    results = []
    for fused in (True, False):
        model, opt, sched = setup(tok, dropout=0.0)
        assert opt.defaults["fused"] is True  # plain fp32 CPU parameters
        if not fused:  # the same groups and settings through the per-tensor loop
            opt = torch.optim.AdamW(loop.param_groups(model, 5e-3, lora_plus_ratio=4.0), lr=5e-3)
            assert not opt.param_groups[0]["fused"]
            sched = loop.build_scheduler(opt, 2, 6)
        results.append((run_steps(model, opt, sched, examples, loop.DataPosition(), 4),
                        torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])))
    (l0, p0), (l1, p1) = results
    assert l0 == pytest.approx(l1, rel=1e-5)
    torch.testing.assert_close(p0, p1, atol=1e-6, rtol=1e-5)
    cpu = torch.nn.Parameter(torch.zeros(2))
    assert optim.fused_applies([cpu]) and not optim.fused_applies([cpu, torch.nn.Parameter(torch.zeros(2, device="meta"))])
    assert not optim.fused_applies([torch.nn.Parameter(torch.zeros(2, dtype=torch.int32), requires_grad=False)])


def test_grad_accumulation_equals_one_big_batch(tok, examples):
    from lorakit.train.data import collate
    a, opt_a, _ = setup(tok, dropout=0.0)
    b, opt_b, _ = setup(tok, dropout=0.0)
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(0.05)
        for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            q.copy_(p)
    loop.train_step(a, [collate(examples[:4], 0), collate(examples[4:8], 0)], opt_a)
    loop.train_step(b, [collate(examples[:8], 0)], opt_b)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("packed", [False, True])
def test_loss_sum_projects_only_target_positions_exactly(tok, examples, packed):
    import torch.nn.functional as F

    from lorakit.train.data import collate, pack_examples
    model = tiny_model(len(tok)).train()
    batch = collate(pack_examples(examples[:6], 300) if packed else examples[:5], 0)
    loss, n = loop.loss_sum(model, batch)
    # use_cache=False matters for packed batches: with a cache, transformers does not build the block mask
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                          reduction="sum")
    assert n == int((batch["labels"][:, 1:] != -100).sum()) > 0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_loss_sum_chunked_head_gradients_equal_the_logits_path(tok, examples, packed, monkeypatch):
    from lorakit.train.data import collate, pack_examples
    model = lora_model(tok, dropout=0.0, init_lora_weights=False).train()
    model.lm_head.weight.requires_grad_(True)  # the head's own gradient goes through the chunked path too
    assert loop.chunked_head(model) == (model.model, model.lm_head)
    monkeypatch.setattr(step_module, "HEAD_BLOCK_ELEMENTS", 16 * len(tok))  # 16 rows per block: several blocks
    batch = collate(pack_examples(examples[:6], 300) if packed else examples[:5], 0)
    results = []
    for split in (True, False):
        if not split:
            monkeypatch.setattr(step_module, "chunked_head", lambda m: None)
        model.zero_grad()
        loss, n = loop.loss_sum(model, batch)
        loss.backward()
        assert n > 16
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-4)
    assert set(g1) == set(g2) and "lm_head.weight" in g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6, msg=k)


def test_chunked_head_only_where_logits_are_exactly_the_head_of_the_hidden_states(tok):
    from conftest import tiny_gpt2
    assert loop.chunked_head(tiny_gpt2()) is None  # not a listed architecture
    headed = lorakit.inject(tiny_model(len(tok)), lorakit.LoraConfig(r=2, target_modules=["lm_head"]))
    assert loop.chunked_head(headed) is None  # the head has its own LoRA update: the model's forward runs it
    capped = tiny_model(len(tok))
    capped.config.final_logit_softcapping = 30.0
    assert loop.chunked_head(capped) is None
    wrapped = torch.nn.Module()
    wrapped.module = tiny_model(len(tok))  # a DDP-style wrapper: its own forward must run
    assert loop.chunked_head(wrapped) is None


def test_batch_order_depends_only_on_seed_and_epoch():
    assert loop.batch_order(10, 3, 1, 0) == loop.batch_order(10, 3, 1, 0)
    assert loop.batch_order(10, 3, 1, 0) != loop.batch_order(10, 3, 1, 1)
    assert sorted(i for b in loop.batch_order(10, 3, 1, 0) for i in b) == list(range(10))
    # two ranks of batch 2 together see exactly what one process of batch 4 sees
    ex = [{"input_ids": [i, i], "labels": [i, i]} for i in range(9)]
    one = loop.iterate_batches(ex, 4, 3, loop.DataPosition(), 0)
    r0 = loop.iterate_batches(ex, 2, 3, loop.DataPosition(), 0, rank=0, world_size=2)
    r1 = loop.iterate_batches(ex, 2, 3, loop.DataPosition(), 0, rank=1, world_size=2)
    for _ in range(2):
        assert next(one)["input_ids"].tolist() == next(r0)["input_ids"].tolist() + next(r1)["input_ids"].tolist()


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_gives_the_same_next_losses(tok, examples, tmp_path, grad_accum):
    steps = 4
    model, opt, sched = setup(tok, steps)
    straight = run_steps(model, opt, sched, examples, loop.DataPosition(), steps, grad_accum)

    model, opt, sched = setup(tok, steps)
    pos = loop.DataPosition()
    first = run_steps(model, opt, sched, examples, pos, 2, grad_accum)
    ck.save_checkpoint(tmp_path, 2, model, opt, sched, pos, {"tokens_seen": 1})
    torch.rand(100)  # disturb the RNG: the checkpoint must restore it (dropout masks)

    model, opt, sched = setup(tok, steps, seed=99)  # a fresh process: different LoRA init
    state, pos = ck.load_checkpoint(ck.find_latest_checkpoint(tmp_path), model, opt, sched)
    assert state["step"] == 2 and state["tokens_seen"] == 1
    rest = run_steps(model, opt, sched, examples, pos, steps - 2, grad_accum)
    assert first == straight[:2]
    assert max(abs(a - b) for a, b in zip(rest, straight[2:])) <= 1e-6, (rest, straight[2:])


def test_checkpoint_is_complete_and_incomplete_one_is_skipped(tok, examples, tmp_path):
    model, opt, sched = setup(tok)
    run_steps(model, opt, sched, examples, loop.DataPosition(), 1)
    folder = ck.save_checkpoint(tmp_path, 2, model, opt, sched, loop.DataPosition(0, 2))
    assert folder.name == "step-000002"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter", "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json",
            "complete"} <= names
    assert {p.name for p in (folder / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert ck.is_complete(folder)
    # the checkpoint's adapter is a normal adapter
    fresh = tiny_model(len(tok))
    lorakit.load_adapter(fresh, folder / "adapter")
    # a newer folder without the marker (a copy cut short) is skipped, with a message
    broken = ck.checkpoint_dir(tmp_path, 4)
    broken.mkdir()
    for f in ("trainable.safetensors", "state.json"):
        (broken / f).write_bytes((folder / f).read_bytes())
    messages = []
    assert ck.find_latest_checkpoint(tmp_path, messages.append) == folder
    assert "step-000004" in messages[0] and "incomplete" in messages[0]
    with pytest.raises(ck.CheckpointError, match="incomplete"):
        ck.load_checkpoint(broken, model, opt, sched)
    # pruning keeps the newest complete ones
    ck.save_checkpoint(tmp_path, 3, model, opt, sched, loop.DataPosition(0, 3))
    ck.prune_checkpoints(tmp_path, 1)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_checkpoint_of_other_lora_setup_is_refused(tok, examples, tmp_path):
    model, opt, sched = setup(tok)
    ck.save_checkpoint(tmp_path, 1, model, opt, sched, loop.DataPosition())
    other = lorakit.inject(tiny_model(len(tok)), lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    opt2 = loop.build_optimizer(other, 1e-3)
    with pytest.raises(ck.CheckpointError, match="shape"):
        ck.load_checkpoint(ck.checkpoint_dir(tmp_path, 1), other, opt2, loop.build_scheduler(opt2, 0, 4))


# ------------------------------------------------------------------------------------------- faults
def test_nan_loss_is_detected_and_named(tok, examples):
    from lorakit.train.data import collate
    model, opt, sched = setup(tok)
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        p[0, 0] = float("nan")
    before = {n: q.clone() for n, q in model.named_parameters() if q.requires_grad}
    r = loop.train_step(model, [collate(examples[:4], 0)], opt, sched)
    assert not r.finite and r.bad == f"parameter {name}"
    for n, q in model.named_parameters():  # the update was skipped
        if q.requires_grad:
            assert torch.equal(q.nan_to_num(), before[n].nan_to_num())


@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_trains_lora_on_frozen_base(tok, examples, offload):
    from lorakit.train.data import collate
    batch = collate(examples[:4], 0)
    ref, opt_ref, _ = setup(tok, dropout=0.0)
    gc, opt_gc, _ = setup(tok, dropout=0.0)
    if offload:  # on a CPU model the saved tensors already are in CPU memory: it warns, and must change nothing
        with pytest.warns(UserWarning, match="not on a CUDA device"):
            lorakit.enable_gradient_checkpointing(gc, offload=True)
        assert gc._lorakit_offload is not None
    else:
        lorakit.enable_gradient_checkpointing(gc)
    assert gc.model.gradient_checkpointing
    for m in (ref, gc):
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
    grads = []
    for m in (ref, gc):
        m.train()
        loss, n = loop.loss_sum(m, batch)
        (loss / n).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in m.parameters() if not p.requires_grad)  # base stays frozen
    for k in grads[0]:
        assert grads[1][k].abs().sum() > 0
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-4)
    if offload:  # the saved-tensor hooks are scoped to the model's forward: nothing leaks after it
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _cli_options(tmp_path, **kw):
    model_dir = tmp_path / "model"
    if not model_dir.exists():
        write_tiny_model(model_dir)
        write_jsonl(tmp_path / "train.jsonl", alpaca_rows(16))
    base = dict(model=str(model_dir), data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "out"), max_steps=5,
                batch_size=4, lr=5e-3, r=4, target_modules=["q_proj", "v_proj"], save_every=2, warmup_steps=1,
                accuracy=False, progress=False, max_seq_len=256)
    base.update(kw)
    return TrainOptions(**base)


def test_recipe_stops_on_nan_keeping_last_good_checkpoint(tmp_path, monkeypatch):
    from lorakit.train import recipe
    real, calls = loop.loss_sum, []

    def flaky(model, batch):
        calls.append(1)
        loss, n = real(model, batch)
        return (loss * float("nan") if len(calls) == 3 else loss), n

    monkeypatch.setattr(step_module, "loss_sum", flaky)
    with pytest.raises(loop.TrainingDiverged, match=r"step 3: .*step-000002"):
        recipe.train(_cli_options(tmp_path), console=None)
    assert [p.name for p in ck.list_checkpoints(tmp_path / "out")] == ["step-000002"]
    calls.clear()
    res = recipe.train(_cli_options(tmp_path, out=str(tmp_path / "skip"), nan_policy="skip"))
    assert res["exit_code"] == 0 and (tmp_path / "skip" / "adapter").is_dir()


def test_sigterm_writes_a_checkpoint_and_exits(tmp_path, monkeypatch):
    from lorakit.train import recipe
    real, calls = loop.train_step, []

    def signalling(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(recipe, "train_step", signalling)
    res = recipe.train(_cli_options(tmp_path, save_every=0))
    assert res["exit_code"] == 143 and "SIGTERM at step 3" in res["stopped"]
    assert ck.find_latest_checkpoint(tmp_path / "out").name == "step-000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


# ------------------------------------------------------------------------------------------- options
def test_options_defaults_overrides_and_yaml(tmp_path):
    o = load_options(None, ["lr=1e-4", "r=4", "target_modules=q_proj,v_proj", "max_steps=none", "packing=true",
                            "rank_pattern={q_proj: 2}"])
    assert (o.lr, o.r, o.target_modules, o.max_steps, o.packing, o.rank_pattern) == \
        (1e-4, 4, ["q_proj", "v_proj"], None, True, {"q_proj": 2})
    assert load_options(None, ["target_modules=all-linear"]).target_modules == "all-linear"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.002\nr: 8\nlora_dropout: 0.05\nquantize: nf4\n")
    o = load_options(cfg, ["r=32"])
    assert (o.lr, o.r, o.lora_dropout, o.quantize) == (0.002, 32, 0.05, "nf4")  # overrides win over the file
    assert o.lora_config().r == 32
    # the resolved YAML reads back to equal options
    (tmp_path / "resolved.yaml").write_text(dump_yaml(o))
    assert load_options(tmp_path / "resolved.yaml") == o
    assert TrainOptions() == load_options()


def test_every_lora_field_is_an_option():
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    assert set(lora_field_names()) <= fields
    assert {"base_model_name_or_path", "inference_mode"}.isdisjoint(lora_field_names())


@pytest.mark.parametrize("override, message", [
    ("lrr=1", "unknown option 'lrr'. Did you mean: lr"),
    ("epoch=2", "Did you mean: epochs"),
    ("lora_alpah=4", "Did you mean: lora_alpha"),
    ("lr=fast", "option lr: expected a number, got 'fast'"),
    ("r=2.5", "option r: expected an integer"),
    ("packing=maybe", "option packing: expected true or false"),
    ("quantize=nf8", "quantize: must be one of none, nf4, nf4-gptq"),
    ("offload_activations=true", "offload_activations: needs gradient_checkpointing"),
    ("quant_calibration=0", "quant_calibration: must be >= 1"),
    ("nan_policy=skp", "Did you mean: skip"),
    ("batch_size=0", "batch_size: must be >= 1"),
    ("r=0", "LoraConfig.r"),
    ("lr", "expected key=value"),
])
def test_bad_options_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_options(None, [override])


def test_bad_config_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lr: 0.1\nmax_step: 10\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown option 'max_step'\. Did you mean: max_steps"):
        load_options(f)
    f.write_text("lr: [0.1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_options(f)
    f.write_text("- lr\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_options(f)
    assert yaml.safe_load(dump_yaml(TrainOptions()))["lr"] == TrainOptions().lr
    assert math.isclose(load_options(None, ["lr=1e-4"]).lr, 1e-4)
