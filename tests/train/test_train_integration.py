"""The recipe end to end with adaptive rank (issue 7 item 4), device placement and cross-rank step agreement."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.compiling import has_cxx_compiler
from lorakit.train import checkpoint as ck
from lorakit.train import heldout as heldout_module
from lorakit.train import loop, recipe
from lorakit.train import step as step_module
from lorakit.train.options import TrainOptions
from lorakit.train.report import read_metrics
from train_fixtures import alpaca_rows, write_jsonl, write_tiny_model

TARGETS = ["q_proj", "v_proj", "o_proj"]  # 6 modules on the 2-layer tiny llama



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("integration")
    return {"model": str(write_tiny_model(d / "model")), "train": str(write_jsonl(d / "train.jsonl", alpaca_rows(16)))}


def options(files, out, **kw) -> TrainOptions:
    base = dict(model=files["model"], data=files["train"], out=str(out), max_steps=8, batch_size=4, lr=2e-2, r=4,
                lora_alpha=8, target_modules=TARGETS, save_every=4, warmup_steps=1, accuracy=False, progress=False,
                adaptive_rank=True, adaptive_target_r=2, adaptive_warmup=1, adaptive_final=2, adaptive_orth_reg=0.5)
    base.update(kw)
    return TrainOptions(**base)


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


@pytest.fixture(scope="module")
def adaptive_run(files, tmp_path_factory):
    return recipe.train(options(files, tmp_path_factory.mktemp("ada") / "out"))


def test_adaptive_run_ends_at_the_budget_and_loads_in_peft(adaptive_run):
    res = adaptive_run
    out = res["out"]
    ranks = res["adaptive_ranks"]
    assert sum(ranks.values()) == 2 * 6  # target_r x adapted modules
    saved = json.loads(open(os.path.join(out, "adapter", "adapter_config.json")).read())
    assert saved["rank_pattern"] == ranks
    assert [r["rank_budget"] for r in read_metrics(out) if "loss" in r][-1] == 12

    x = {"input_ids": torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))}
    model = res["model"].eval()
    with torch.no_grad():
        ours = model(**x).logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(res["options"]["model"])
    peft_model = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(**x).logits
    assert float((theirs - ours).abs().max()) <= 1e-5
    # the checkpoints keep the triplet form (a resume needs it) and their adapter is still a valid full-rank one
    last = ck.find_latest_checkpoint(out)
    names = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(last / "trainable.safetensors")))
    assert any(n.endswith("lora_A.default.E") for n in names)
    lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(res["options"]["model"]), last / "adapter")


def test_adaptive_resume_gives_the_same_next_losses(files, tmp_path, adaptive_run, monkeypatch):
    real, calls = loop.train_step, []

    def signalling(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # after the step-2 update the loop checkpoints and stops, mid-pruning
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(recipe, "train_step", signalling)
    first = recipe.train(options(files, tmp_path / "out"))
    assert first["exit_code"] == 143 and first["steps_done"] == 3
    monkeypatch.setattr(recipe, "train_step", real)
    torch.rand(100)  # the checkpoint restores the RNG
    second = recipe.train(options(files, tmp_path / "out", resume="latest"))
    straight = losses(adaptive_run["out"])
    resumed = losses(tmp_path / "out")
    assert sorted(resumed) == list(range(1, 9))
    assert max(abs(resumed[s] - straight[s]) for s in straight) <= 1e-6, (resumed, straight)
    assert second["adaptive_ranks"] == adaptive_run["adaptive_ranks"]


def test_adaptive_checkpoint_refused_by_a_plain_run(files, tmp_path, adaptive_run):
    with pytest.raises(ck.CheckpointError):
        recipe.train(options(files, tmp_path / "plain", adaptive_rank=False,
                             resume=str(ck.find_latest_checkpoint(adaptive_run["out"]))))


def test_bad_adaptive_options_are_clear():
    from lorakit.errors import ConfigError
    with pytest.raises(ConfigError, match="adaptive_target_r"):
        TrainOptions(adaptive_rank=True, r=4, adaptive_target_r=8)
    with pytest.raises(ConfigError, match="device"):
        TrainOptions(device="gpu")


# ------------------------------------------------------------------------------------------- device
def test_batches_follow_the_model_device(monkeypatch):
    from train_fixtures import tiny_model
    model = lorakit.inject(tiny_model(100), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    opt = loop.build_optimizer(model, 1e-3)
    batch = {"input_ids": torch.randint(3, 100, (2, 6)), "labels": torch.randint(3, 100, (2, 6))}
    moved = loop.to_device(batch, torch.device("meta"))
    assert all(v.device.type == "meta" for v in moved.values()) and loop.to_device(batch, torch.device("cpu")) is batch
    # "meta" stands in for an accelerator: every batch of training and evaluation goes to the model's device
    calls, real = [], loop.to_device
    for module in (step_module, heldout_module):  # evaluation runs through lorakit.train.heldout
        monkeypatch.setattr(module, "model_device", lambda m: torch.device("meta"))
        monkeypatch.setattr(module, "to_device", lambda b, d: calls.append(d) or real(b, torch.device("cpu")))
    loop.train_step(model, [batch, batch], opt)
    loop.evaluate_loss(model, [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}], 4, 0)
    assert calls == [torch.device("meta")] * 3
    assert loop.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert loop.resolve_device("auto") == torch.device("cpu")


# ------------------------------------------------------------------------------------------- rank agreement
def test_a_nan_on_another_rank_skips_the_step_here(monkeypatch):
    from train_fixtures import tiny_model
    model = lorakit.inject(tiny_model(100), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    opt = loop.build_optimizer(model, 1e-2)
    batch = {"input_ids": torch.randint(3, 100, (2, 6)), "labels": torch.randint(3, 100, (2, 6))}
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    sums = []

    def other_rank_bad(*values):  # as if a second rank reported a NaN loss and its tokens in the all-reduce
        sums.append(values)
        return values[0] + float("nan"), values[1] + 1.0, values[2] + 10

    monkeypatch.setattr(step_module, "global_sums", other_rank_bad)
    r = loop.train_step(model, [batch], opt)
    assert len(sums) == 1 and sums[0][1] == 0.0  # this rank was fine and said so
    assert not r.finite and r.input_tokens == 12 + 10
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n])

    monkeypatch.setattr(step_module, "global_sums", lambda *v: v)
    real = loop.loss_sum
    monkeypatch.setattr(step_module, "loss_sum", lambda m, b: (lambda loss, n: (loss * float("nan"), n))(*real(m, b)))
    r = loop.train_step(model, [batch, batch], opt)  # every micro-batch still runs its backward (collectives)
    assert not r.finite and r.bad == "the loss (parameters are finite)"


def test_a_nan_on_one_of_two_ddp_ranks_stops_both_without_hanging(tmp_path):
    # a real 2-process gloo group (this file as torchrun's worker): rank 1 alone sees a NaN loss
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                                             os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["first"] == {"finite": False, "input_tokens": 2 * 2 * 12}  # both skipped; tokens: 2 ranks x 2 batches
        assert r["second"] is True and r["same_after_skip"]  # nothing moved on the skipped step
    assert results[0]["weights"] == results[1]["weights"]  # and the next step kept the ranks in sync


def _nan_worker(folder: Path) -> None:
    """Runs under torchrun: one NaN step on rank 1 only, then a normal step; writes what each rank saw."""
    from lorakit.train.distributed import wrap_for_distributed
    from train_fixtures import tiny_model

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    model = lorakit.inject(tiny_model(100), lorakit.LoraConfig(r=2, target_modules=["q_proj"],
                                                               init_lora_weights="gaussian"))
    ddp = wrap_for_distributed(model, "ddp", log=lambda m: None)
    opt = loop.build_optimizer(model, 1e-2)
    g = torch.Generator().manual_seed(rank)
    batches = [{"input_ids": (ids := torch.randint(3, 100, (2, 6), generator=g)), "labels": ids.clone()}
               for _ in range(2)]
    real = loop.loss_sum
    step_module.loss_sum = lambda m, b: (lambda loss, n: (loss * float("nan") if rank == 1 else loss, n))(*real(m, b))
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    first = loop.train_step(ddp, batches, opt)
    same = all(torch.equal(a, p) for a, p in zip(before, (p for p in model.parameters() if p.requires_grad)))
    step_module.loss_sum = real
    second = loop.train_step(ddp, batches, opt)
    out = {"first": {"finite": first.finite, "input_tokens": first.input_tokens}, "second": second.finite,
           "same_after_skip": same, "weights": [p.detach().sum().item() for p in model.parameters() if p.requires_grad]}
    (folder / f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    _nan_worker(Path(sys.argv[1]))


@pytest.mark.skipif(not has_cxx_compiler(), reason="torch.compile's CPU kernels need a C++ compiler")
def test_compiled_run_follows_the_eager_run(files, tmp_path):
    # `lorakit train --compile`: the decoder blocks run compiled (dynamic shapes: padded batches change length),
    # the loss head, optimizer and eval stay eager; the run's losses are the eager run's.
    kw = dict(adaptive_rank=False, max_steps=3, save_every=0, eval_data=files["train"])
    eager = recipe.train(options(files, tmp_path / "eager", **kw))
    compiled = recipe.train(options(files, tmp_path / "compiled", compile=True, **kw))
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    assert compiled["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-5)
    assert "forward" in vars(compiled["model"].model.layers[0])  # the run really used the compiled blocks
