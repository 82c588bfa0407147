"""`lorakit train / eval / generate` end to end, in-process, on a tiny random-init Llama and a tiny data file."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml

import lorakit
from lorakit.cli import main
from lorakit.train import checkpoint as ck
from lorakit.train.options import option_fields
from lorakit.train.report import read_metrics
from train_fixtures import alpaca_rows, write_jsonl, write_tiny_model



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return {"model": str(write_tiny_model(d / "model")), "train": str(write_jsonl(d / "train.jsonl", alpaca_rows(16))),
            "eval": str(write_jsonl(d / "eval.jsonl", alpaca_rows(6, seed=1))), "dir": d}


def train_args(files, out, *extra):
    return ["train", "--model", files["model"], "--data", files["train"], "--out", str(out), "--max-steps", "4",
            "--batch-size", "4", "--lr", "5e-3", "--r", "4", "--target-modules", "q_proj,v_proj", "--no-progress",
            "--save-every", "2", "warmup_steps=1", *extra]


def losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def test_train_end_to_end_writes_every_artifact(files, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(train_args(files, out, "--eval-data", files["eval"], "--eval-every", "2", "--max-new-tokens", "3",
                         "lora_dropout=0.1", "--lora-plus-ratio", "4"))
    printed = capsys.readouterr().out
    assert rc == 0
    assert "before" in printed and "after" in printed and "overall" in printed  # the before/after table
    assert {"adapter", "checkpoints", "metrics.jsonl", "plot.png", "config.yaml", "README.md", "results.json"} <= \
        {p.name for p in out.iterdir()}
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["lr"], cfg["r"], cfg["lora_dropout"], cfg["lora_plus_ratio"], cfg["target_modules"]) == \
        (5e-3, 4, 0.1, 4.0, ["q_proj", "v_proj"])
    records = read_metrics(out)
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in records if "loss" in r)
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert [r["phase"] for r in records if "accuracy" in r] == ["before", "after"]
    assert "Held-out accuracy" in (out / "README.md").read_text()
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-000002", "step-000004"]
    # the adapter loads into a fresh base model and in PEFT's format
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(files["model"])
    lorakit.load_adapter(base, out / "adapter")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4


def test_resume_after_interrupt_matches_uninterrupted_run(files, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert main(train_args(files, straight, "lora_dropout=0.1", "--grad-accum", "2")) == 0

    from lorakit.train import recipe
    real, calls = recipe.train_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(recipe, "train_step", interrupted)
    cut = tmp_path / "cut"
    assert main(train_args(files, cut, "lora_dropout=0.1", "--grad-accum", "2")) == 130
    assert ck.find_latest_checkpoint(cut).name == "step-000003"
    assert not (cut / "adapter").exists()
    monkeypatch.setattr(recipe, "train_step", real)
    # a half-written newer checkpoint (a crash mid-copy) is skipped
    (ck.checkpoint_dir(cut, 4)).mkdir()
    # resume takes the run's config.yaml: only --out and --resume are needed
    assert main(["train", "--out", str(cut), "--resume", "--no-progress"]) == 0
    a, b = losses(straight), losses(cut)
    assert sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)
    assert (cut / "adapter").is_dir()


def test_help_documents_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in option_fields():
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert text.count("(default:") >= len(option_fields())
    for flag in ("--model", "--data", "--eval-data", "--out", "--max-steps", "--epochs", "--batch-size",
                 "--grad-accum", "--lr", "--r ", "--lora-alpha", "--lora-dropout", "--target-modules", "--max-seq-len",
                 "--seed", "--resume", "--config", "--train-on-inputs", "--packing", "--quantize", "--skip-bad-rows",
                 "--gradient-checkpointing", "--eval-every", "--save-every", "--lora-plus-ratio"):
        assert flag in text, flag


@pytest.mark.parametrize("argv, message", [
    (["lora_alhpa=1"], "unknown option 'lora_alhpa'. Did you mean: lora_alpha"),
    (["--lr", "fast"], "option lr: expected a number, got 'fast'"),
    (["--max-steps", "-3"], "max_steps: must be >= 1"),
    (["--quantize", "int3"], "quantize: must be one of none, nf4, nf4-gptq"),
    (["--resume"], "no complete checkpoint"),
])
def test_bad_options_exit_2_with_one_line(files, tmp_path, capsys, argv, message):
    args = ["train", "--model", files["model"], "--out", str(tmp_path / "o"), *argv]
    if argv == ["--resume"]:
        (tmp_path / "o" / "checkpoints").mkdir(parents=True)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_config_file_and_did_you_mean(files, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {files['model']}\nmax_step: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown option 'max_step'. Did you mean: max_steps" in capsys.readouterr().err
    cfg.write_text(f"model: {files['model']}\ndata: {files['train']}\nmax_steps: 2\nbatch_size: 4\n"
                   f"target_modules: [q_proj]\nr: 2\nprogress: false\naccuracy: false\n")
    out = tmp_path / "o"
    assert main(["train", "--config", str(cfg), "--out", str(out), "r=3"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["r"], saved["max_steps"], saved["target_modules"]) == (3, 2, ["q_proj"])


def test_bad_data_row_names_file_line_and_field(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = alpaca_rows(4)
    rows[2] = {"instruction": "x", "output": 5}
    write_jsonl(bad, rows)
    args = ["train", "--model", files["model"], "--data", str(bad), "--out", str(tmp_path / "o"), "--max-steps", "1",
            "--no-progress", "--no-accuracy", "--target-modules", "q_proj"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 3, field 'output'" in err
    assert main(args + ["--skip-bad-rows"]) == 0
    assert "skipped 1 malformed row" in capsys.readouterr().out


def test_eval_json_and_generate(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(train_args(files, out, "--no-accuracy")) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", files["eval"], "--json",
                 "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"accuracy", "loss", "n", "per_task"} <= set(result)
    assert 0 <= result["accuracy"] <= 1 and result["loss"] > 0 and result["n"] == 6
    assert set(result["per_task"]) == {"first", "second"}
    assert main(["eval", "--model", files["model"], "--adapter", str(out / "adapter"), "--data", files["eval"],
                 "--max-new-tokens", "3"]) == 0
    assert "overall" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(out / "adapter"), "--max-new-tokens", "4", "Say the first word.",
                 "--input", "red cat"]) == 0
    capsys.readouterr()
    # chat mode reads prompts until an empty line; a checkpoint folder works as --adapter (model from the run)
    import io
    import sys
    monkeypatch.setattr(sys, "stdin", io.StringIO("Say the first word.\nSay the second word.\n\n"))
    assert main(["generate", "--adapter", str(out / "checkpoints" / "step-000004"), "--chat",
                 "--max-new-tokens", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) <= 2
    assert main(["generate", "--adapter", str(out / "adapter")]) == 2
    assert "give a prompt" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["nf4", "nf4-gptq"])
def test_qlora_run_then_eval_rebuilds_the_same_4bit_base(files, tmp_path, capsys, how):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    assert main(train_args(files, out, "--no-accuracy", "--eval-data", files["eval"], "--quantize", how,
                           "quant_calibration=4")) == 0
    printed = capsys.readouterr().out
    assert ("GPTQ rounding on 4 calibration rows" in printed) == (how == "nf4-gptq")
    assert ("--quantize nf4-gptq keeps" in " ".join(printed.split())) == (how == "nf4")  # the small-model hint
    assert "optimizer state" in printed and "bits/param" in printed  # the memory report, with the 4-bit base
    report = json.loads((out / "results.json").read_text())["memory"]
    assert 4.0 < report["bits_per_quantized_param"] < 5 and report["quantized_params"] > 0  # tiny: codebooks weigh
    run_loss = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r][-1]
    # eval reads the run's config.yaml: the same quantization (and, for GPTQ, the same calibration rows)
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", files["eval"], "--json", "--max-new-tokens", "2"]) == 0
    quantized = json.loads(capsys.readouterr().out)["loss"]
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", files["eval"], "--json", "--max-new-tokens", "2",
                 "--quantize", "none"]) == 0
    full = json.loads(capsys.readouterr().out)["loss"]
    assert quantized == pytest.approx(run_loss, rel=1e-5) and full != pytest.approx(run_loss, rel=1e-5)
