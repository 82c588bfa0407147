"""The memory plan: from config.json alone, close to a measured run, and a clear refusal when it cannot fit."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.loading.memwatch import run_measured
from lorakit.loading.plan import NF4_DQ_BYTES_PER_PARAM, check_fits, parse_bytes, plan_memory, replan

ROOT = Path(__file__).resolve().parents[2]
CFG = dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False, torch_dtype="float32")
LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                torch_dtype="bfloat16")


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2 ** 30 == parse_bytes("24G")
    assert parse_bytes("16GB") == 16 * 10 ** 9 and parse_bytes("512MiB") == 2 ** 29 and parse_bytes(1000) == 1000
    with pytest.raises(ConfigError):
        parse_bytes("lots")


def test_8b_plan_from_config_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    p = plan_memory(tmp_path, quantize="nf4", batch_size=1, max_seq_len=256, gradient_checkpointing=True,
                    memory="24GiB")
    assert 8.0e9 < p.options["parameters"] < 8.1e9  # Llama-3.1-8B: 8.03B
    frozen = p.frozen_by_dtype
    assert frozen["linear layers, NF4 + double quant"] == pytest.approx(6.98e9 * NF4_DQ_BYTES_PER_PARAM, rel=0.01)
    # the streaming loader maps the bf16 tables (page cache, not in the private peak) ...
    assert p.mapped["embeddings + output head, bfloat16"] == 2 * 128256 * 4096 * 2
    assert p.fits and 3.5 * 2 ** 30 < p.peak < 6 * 2 ** 30 and p.max_batch > 1
    # ... a loader that copies them (not the streaming one) holds them privately
    copied = replan(p, tmp_path, mmap_tables=False)
    assert copied.frozen_by_dtype["embeddings + output head, bfloat16"] == 2 * 128256 * 4096 * 2 and not copied.mapped
    assert copied.peak - p.peak >= 2 * 128256 * 4096 * 2
    full = replan(p, tmp_path, quantize=None, dtype="float32")
    assert not full.fits and full.peak > 30 * 2 ** 30
    text = str(p)
    for word in ("NF4", "memory-mapped", "LoRA gradients", "AdamW", "checkpointing off", "loss head", "dequantization workspace",
                 "loading peak", "fits"):
        assert word in text


def test_refusal_names_the_plan_and_options_that_fit(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    p = plan_memory(tmp_path, dtype="float32", batch_size=4, max_seq_len=1024, memory="24GiB")
    with pytest.raises(ConfigError) as e:
        check_fits(p, tmp_path)
    msg = str(e.value)
    assert "Memory plan" in msg and "--quantize nf4" in msg and "24.00 GiB" in msg
    assert check_fits(replan(p, tmp_path, quantize="nf4", gradient_checkpointing=True, batch_size=1)) is None


def test_cli_plan_from_a_folder_with_only_config_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    assert main(["plan", "--model", str(tmp_path), "--quantize", "nf4", "--gradient-checkpointing",
                 "--memory", "24GiB", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] and d["budget"] == 24 * 2 ** 30
    assert main(["plan", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "hidden_size" in capsys.readouterr().err


@pytest.mark.parametrize("quantize, dtype, gc", [(None, "float32", False), ("nf4", "float32", True)])
def test_plan_matches_a_measured_run(tmp_path, quantize, dtype, gc):
    """The plan's run-time terms within 20% of a measured 1-step run (a model whose weights, LoRA state and
    activations are all tens of MiB, so each term counts). The runtime constant (interpreter + libraries) is
    machine-specific, so the measured one replaces it; 20%: the heap's fragmentation under glibc varies by
    a few MiB between runs, which is several percent here but well under 1% of a real-size run."""
    from transformers import LlamaConfig
    from lorakit.loading.synthetic import write_synthetic_checkpoint
    from train_fixtures import tiny_tokenizer
    folder = write_synthetic_checkpoint(LlamaConfig(**{k: v for k, v in CFG.items() if k != "torch_dtype"}),
                                        tmp_path / "m", dtype=torch.float32)
    tiny_tokenizer().save_pretrained(folder)
    mode = "lorakit-qlora" if quantize else "lorakit-bf16"
    argv = [sys.executable, str(ROOT / "bench" / "big_model.py"), "--worker", mode, "--folder", str(folder),
            "--steps", "1", "--batch", "2", "--seq", "256", "--dtype", dtype] + ([] if gc else ["--no-gc"])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    rc, peak, out, err = run_measured(argv, env=env)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    p = plan_memory(folder, quantize=quantize, dtype=dtype, batch_size=2, max_seq_len=256,
                    gradient_checkpointing=gc, memory="1TiB")
    runtime = p.parts["runtime (interpreter, torch, ...)"]
    measured_runtime = res["after_load_bytes"] - sum(p.frozen_by_dtype.values())
    predicted = p.training_peak - runtime + measured_runtime
    assert abs(predicted - peak) / peak < 0.20, (predicted, peak, str(p))
