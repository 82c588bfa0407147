"""A real `lorakit train` process killed with SIGKILL after a checkpoint resumes to the losses of an uninterrupted run.

Single process (tests/test_distributed.py does the same under torchrun). The killed run and the reference are
subprocesses; the resume runs in-process (saves a start-up). All use one thread, so losses compare to 1e-6.
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

from lorakit.cli import main
from lorakit.train import checkpoint as ck
from lorakit.train.report import read_metrics
from train_fixtures import alpaca_rows, write_jsonl, write_tiny_model

STEPS = 12


def _train(files: dict, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", "train", "--model", str(files["model"]), "--data", str(files["train"]),
            "--out", str(out), "--max-steps", str(STEPS), "--batch-size", "4", "--lr", "5e-3", "--r", "4",
            "--target-modules", "q_proj,v_proj", "--save-every", "3", "--keep-checkpoints", "0", "--seed", "7",
            "--no-progress", "--no-accuracy", "lora_dropout=0.1", "warmup_steps=2", *extra]


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error", "COLUMNS": "300", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    return {"model": write_tiny_model(d / "model"), "train": write_jsonl(d / "train.jsonl", alpaca_rows(24))}


def test_sigkill_after_a_checkpoint_then_resume_matches_uninterrupted(files, tmp_path, capsys):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("straight", "cut")}
    # both runs start together (the start-up, importing torch, is most of the time); one is killed mid-run
    reference = subprocess.Popen(_train(files, straight), env=_env(), stdout=logs["straight"], stderr=subprocess.STDOUT)
    victim = subprocess.Popen(_train(files, cut), env=_env(), stdout=logs["cut"], stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not any(ck.is_complete(p) for p in ck.list_checkpoints(cut)):
            assert victim.poll() is None, (tmp_path / "cut.log").read_text()
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        # resume must pick the newest complete checkpoint (a later one may have completed before the kill landed)
        resume_point = int(ck.find_latest_checkpoint(cut, log=lambda m: None).name.split("-")[1])
        assert resume_point < STEPS and not (cut / "adapter").exists(), "the run finished before it was killed"

        # the resume runs in this process (start-up already paid), one thread like the subprocesses
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            status = main(_train(files, cut, "--resume")[3:])
        finally:
            torch.set_num_threads(threads)
        log = " ".join(capsys.readouterr().out.split())
        assert status == 0, log
        assert "resumed from" in log and f"at step {resume_point}" in log, log
        assert reference.wait(timeout=120) == 0, (tmp_path / "straight.log").read_text()
    finally:
        for proc in (victim, reference):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in logs.values():
            f.close()

    a, b = _losses(straight), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))  # no step lost, none logged twice
    after = [s for s in a if s > resume_point]
    assert after and max(abs(a[s] - b[s]) for s in after) <= 1e-6, {s: (a[s], b[s]) for s in after}
    assert (cut / "adapter" / "adapter_model.safetensors").exists()
