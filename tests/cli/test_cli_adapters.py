"""`lorakit inspect` and `lorakit merge` end to end, in-process through lorakit.cli.main."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import LoraConfig
from lorakit.cli import main
from train_fixtures import write_tiny_model


@pytest.fixture
def base_folder(tmp_path):
    return write_tiny_model(tmp_path / "base")


def _adapter(folder, out, trained=True):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    lorakit.inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if trained:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    lorakit.save_adapter(model, out)
    return model


def test_inspect_json_reports_modules_sizes_and_ratio(base_folder, tmp_path, capsys):
    _adapter(base_folder, tmp_path / "ad")
    assert main(["inspect", str(tmp_path / "ad"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_modules"] == 4 and report["ranks"] == [4]
    assert report["problems"] == []
    assert 0 < report["parameter_ratio"] < 1
    assert report["file_bytes"] == (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size


def test_inspect_flags_untrained_and_nan(base_folder, tmp_path, capsys):
    _adapter(base_folder, tmp_path / "zero", trained=False)
    assert main(["inspect", str(tmp_path / "zero"), "--strict"]) == 1
    assert "untrained" in capsys.readouterr().out
    _adapter(base_folder, tmp_path / "nan")
    f = tmp_path / "nan" / "adapter_model.safetensors"
    t = load_file(f)
    k = next(iter(t))
    t[k][0, 0] = float("nan")
    save_file(t, f)
    main(["inspect", str(tmp_path / "nan")])
    assert "NaN/Inf" in capsys.readouterr().out


def test_inspect_bad_folder_is_a_clean_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_merge_writes_plain_model_that_loads_without_lorakit(base_folder, tmp_path):
    model = _adapter(base_folder, tmp_path / "ad")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert main(["merge", "--base", str(base_folder), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 0
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - want).abs().max() <= 1e-4
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "tokenizer.json").exists()


def test_merge_refuses_when_disk_is_full(base_folder, tmp_path, monkeypatch, capsys):
    _adapter(base_folder, tmp_path / "ad")
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 0))
    assert main(["merge", "--base", str(base_folder), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 2
    assert "not enough free disk space" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_merge_quantize_nf4_folds_into_the_4bit_base_the_adapter_trained_on(base_folder, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM
    _adapter(base_folder, tmp_path / "ad")
    qlora = lorakit.quantize(AutoModelForCausalLM.from_pretrained(base_folder))  # the QLoRA model, unmerged
    lorakit.load_adapter(qlora, tmp_path / "ad")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = qlora(input_ids=ids).logits
    assert main(["merge", "--base", str(base_folder), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "q"),
                 "--quantize", "nf4"]) == 0
    assert main(["merge", "--base", str(base_folder), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "f")]) == 0
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "q")(input_ids=ids).logits
        full = AutoModelForCausalLM.from_pretrained(tmp_path / "f")(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-4  # the 4-bit model's outputs, in a plain fp32 folder
    assert (full - want).abs().max() > 1e-3  # merging into the original weights gives another model
