"""The benchmarks still run end to end (--small presets, subprocesses as in real use) and write complete JSON.

Timings are never asserted here (they live in bench/ and the README); what is asserted is what each mode
computes: both QLoRA workers train the same LoRA parameters and their losses fall, the 4-bit base is stored
at about 4.13 bits per weight, and every requested mode of `lorakit bench` reports a step time and memory.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_qlora_small_runs_both_modes(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_qlora.py"), "--small", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    lora, qlora = data["results"]["lora"], data["results"]["qlora"]
    assert lora["trainable_params"] == qlora["trainable_params"] > 0
    for r in (lora, qlora):
        assert r["losses"][-1] < r["losses"][0]
    assert lora["bits_per_quantized_param"] is None
    assert 4.12 < qlora["bits_per_quantized_param"] < 4.2  # small layers: the shared codebooks weigh a little
    assert qlora["memory_report"]["frozen_bytes"] < lora["memory_report"]["frozen_bytes"]
    assert qlora["memory_report"]["quantized_params"] > 0 == lora["memory_report"]["quantized_params"]
    assert {"memory_ratio", "step_time_ratio", "bits_per_param"} <= set(data["ratios"])


def test_lorakit_bench_small_reports_every_mode(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "-m", "lorakit", "bench", "--small", "--threads", "1", "--metric", "cpu",
                           "--modes", "lorakit,peft,floor,lorakit-gc-ce,infer", "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"lorakit", "peft", "floor", "lorakit-gc-ce", "base", "unmerged", "merged"} <= set(data["results"])
    for r in data["results"].values():
        assert r["step_s"] > 0 and r["steps_total"] >= 2 and len(r["round_s"]) == 2 and r["tokens_per_s"] > 0
    assert {"lorakit/peft", "lorakit/floor", "unmerged/base"} <= set(data["ratios"]["time"])
    res = data["results"]
    per_round = [x / y for x, y in zip(res["lorakit"]["round_s"], res["peft"]["round_s"])]
    assert data["ratios"]["time_paired"]["lorakit/peft"] == pytest.approx(sum(per_round) / 2)  # median of two
    assert {"lorakit/peft", "lorakit-gc-ce/peft"} <= set(data["ratios"]["peak_rss"])


def test_gpu_preset_and_device_options_reach_the_workers(capsys):
    import torch
    from lorakit.cli.bench import load_bench_script
    bench = load_bench_script()  # bench/bench_train.py as a module, as `lorakit bench` loads it
    a = bench.parse(["--preset", "1b", "--dtype", "bfloat16"])
    assert (a.hidden, a.layers, a.heads, a.kv_heads, a.vocab) == (2048, 16, 32, 8, 128256)
    argv = bench.worker_argv(a)
    assert argv[argv.index("--kv-heads") + 1] == "8" and argv[argv.index("--dtype") + 1] == "bfloat16"
    assert "--kv-heads" not in bench.worker_argv(bench.parse(["--small"]))  # None: the workers use --heads
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse(["--device", "cuda"])
        assert "CUDA is not available here" in capsys.readouterr().err
