"""bench/vs_trl.py end to end on the tiny model (--small): both trainers run, see the same batches, get scored.

Timings are never asserted (they live in bench/results/vs_trl.json and docs/JOB.md); what is asserted is what
the comparison rests on: TRL's collated batches carry lorakit's token ids and loss masks in lorakit's order,
both adapters are scored by the same evaluator, and every recorded number is there.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train_fixtures import alpaca_rows, write_jsonl, write_tiny_model

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_vs_trl_small_runs_both_jobs_on_the_same_batches(tmp_path):
    pytest.importorskip("trl")
    model = write_tiny_model(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(40))
    held = write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(8, seed=1))
    proc = subprocess.run([sys.executable, str(BENCH / "vs_trl.py"), "--small", "--steps", "2", "--model", str(model),
                           "--data", str(train), "--eval-data", str(held), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "work" / "vs_trl.json").read_text())
    (run,) = report["runs"]
    assert run["trl"]["same_batches_as_lorakit"] and run["trl"]["padded_tokens"] == run["padded_tokens"]
    for who in ("lorakit", "trl"):
        m = run[who]
        assert m["wall_s"] > m["train_seconds"] > 0 and m["peak_rss_anon_mib"] > 0 and m["tokens_per_s"] > 0
        assert m["eval"]["n"] == 8 and 0 <= m["accuracy"] <= 1 and m["final_loss"] > 0
        assert "loadavg_1m" in m["load_before"] and m["others_cores"] >= 0
    assert run["lorakit"]["trainable_parameters"] == run["trl"]["trainable_parameters"]  # the same LoRA
    assert set(report["summary"]["targets"]) == {"wall", "train", "peak_rss", "accuracy", "pad_ratio"}
    assert "| **lorakit / TRL** |" in report["markdown"]
