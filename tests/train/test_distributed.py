"""Distributed training on CPU (gloo, 2 processes): DDP and FSDP2 match one process; adapters load; kill + resume.

Two torchrun launches are shared by every test (module fixture), to keep the file under a minute:
  1. `lorakit train --nproc 2 --strategy ddp` (through the CLI's relaunch), SIGKILLed once a checkpoint exists;
  2. this file as a torchrun worker: resume the killed run, then a full DDP run, then a full FSDP2 run.
The single-process reference runs in pytest itself, with per-device batch 4 = 2 ranks x 2.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

# Every run: 8 optimizer steps of 2 accumulated micro-batches; global batch 4 examples per micro-batch.
COMMON = dict(template="alpaca", max_steps=8, grad_accum=2, warmup_steps=0, lr=1e-2, r=4, lora_alpha=8,
              init_lora_weights="gaussian", accuracy=False, baseline_eval=False, progress=False, save_every=2,
              keep_checkpoints=0, eval_data=None)
WORLD = 2
HERE = Path(__file__).resolve().parents[1]  # tests/, where train_fixtures lives


def _options(folder: Path, out: str, batch_size: int, **extra):
    from lorakit.train.options import TrainOptions

    return TrainOptions(model=str(folder / "model"), data=str(folder / "train.jsonl"), out=str(folder / out),
                        batch_size=batch_size, **{**COMMON, **extra})


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return env


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def worker(folder: Path) -> None:
    """Runs under torchrun: resume the killed DDP run, then full DDP and FSDP2 runs (one process group)."""
    from lorakit.train.recipe import train

    torch.set_num_threads(1)
    for out, extra in (("killed", dict(strategy="ddp", resume="latest")), ("ddp", dict(strategy="ddp")),
                       ("fsdp", dict(strategy="fsdp"))):
        train(_options(folder, out, batch_size=4 // WORLD, **extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from train_fixtures import alpaca_rows, write_jsonl, write_tiny_model

    from lorakit.train.recipe import train

    folder = tmp_path_factory.mktemp("dist")
    write_tiny_model(folder / "model")
    write_jsonl(folder / "train.jsonl", alpaca_rows(24))

    # 1. the CLI's --nproc relaunch, killed (SIGKILL: no graceful checkpoint) once step 2's checkpoint is complete
    o = _options(folder, "killed", 2)
    cli = [sys.executable, "-m", "lorakit", "train", "--nproc", str(WORLD), "--strategy", "ddp", "--model", o.model,
           "--data", o.data, "--out", o.out, "--batch-size", "2"] + [f"{k}={v}" for k, v in COMMON.items()]
    log = folder / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cli, cwd=folder, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        marker = Path(o.out) / "checkpoints" / "step-000002" / "complete"
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        killed_while_running = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)  # the whole launch: torchrun and both ranks
        proc.wait()
    assert marker.exists(), log.read_text()[-3000:]

    # 2. this file as the torchrun worker
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
              __file__, str(folder)]
    done = subprocess.run(launch, cwd=folder, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    # the single-process reference: the same global batch (4 = 2 x 2 ranks) and seed
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_options(folder, "single", batch_size=4), console=None)
    finally:
        torch.set_num_threads(n)
    return {"folder": folder, "killed_log": log.read_text(), "killed_while_running": killed_while_running,
            "worker_out": done.stdout}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(runs, strategy):
    single, multi = _adapter(runs["folder"] / "single"), _adapter(runs["folder"] / strategy)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 1e-3 for k, v in multi.items())  # it trained
    assert _max_diff(single, multi) <= 1e-5


def test_effective_batch_is_printed_once_by_rank_0(runs):
    line = "effective batch = 2 per device x 2 accumulation x 2 processes = 8 examples per step"
    text = " ".join(runs["killed_log"].split())  # rich wraps long lines
    assert text.count(line) == 1, runs["killed_log"][-3000:]
    assert "backend gloo" in text


def test_killed_run_resumes_from_its_last_checkpoint(runs):
    folder = runs["folder"]
    assert runs["killed_while_running"], "the run finished before it could be killed"
    assert "resumed from" in runs["worker_out"]
    assert _max_diff(_adapter(folder / "killed"), _adapter(folder / "ddp")) <= 1e-6


def test_adapter_loads_in_one_process_and_in_peft(runs):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    import lorakit

    folder = runs["folder"]
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    base = LlamaForCausalLM.from_pretrained(folder / "model").eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    for strategy in ("ddp", "fsdp"):
        model = LlamaForCausalLM.from_pretrained(folder / "model")
        lorakit.load_adapter(model, folder / strategy / "adapter")
        reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder / "model"),
                                              str(folder / strategy / "adapter")).eval()
        with torch.no_grad():
            a, b = model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits
        assert (a - plain).abs().max() > 1e-4  # the adapter changes the output
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_fsdp_refuses_a_4bit_base_clearly():
    from lorakit.errors import LorakitError
    from lorakit.train.distributed import shard_fsdp

    class Params4bit(nn.Parameter):  # stands in for bitsandbytes' class (matched by name: no GPU needed)
        pass

    model = nn.Linear(4, 4)
    model.weight = Params4bit(model.weight.detach(), requires_grad=False)
    with pytest.raises(LorakitError, match="cannot shard a 4-bit"):
        shard_fsdp(model)


def test_a_strategy_needs_several_processes():
    from lorakit.errors import ConfigError
    from lorakit.train.distributed import effective_batch, resolve_strategy, wrap_for_distributed

    model = nn.Linear(4, 4)
    assert wrap_for_distributed(model, "auto", log=lambda m: None) is model
    assert resolve_strategy("auto", 2) == "ddp" and resolve_strategy("auto", 1) == "none"
    assert effective_batch(4, 8, 2) == 64
    with pytest.raises(ConfigError, match="torchrun"):
        wrap_for_distributed(model, "fsdp", log=lambda m: None)
    with pytest.raises(ConfigError, match="strategy"):
        resolve_strategy("zero3", 2)


if __name__ == "__main__":  # the torchrun worker (see the `runs` fixture)
    worker(Path(sys.argv[1]))
