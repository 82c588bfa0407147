"""load_base: which models stream, --dtype, and the memory plan that refuses a run before loading (issue 16)."""
from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main
from lorakit.loading.pretrained import load_model
from lorakit.train.options import load_options
from lorakit.train.prepare import load_base, plan_or_refuse, resolve_dtype, streamable
from train_fixtures import alpaca_rows, write_jsonl, write_tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("load_base")
    return {"model": str(write_tiny_model(d / "model")), "train": str(write_jsonl(d / "train.jsonl", alpaca_rows(8))),
            "dir": d}


def test_which_models_stream(files, tmp_path):
    m = files["model"]
    assert streamable(None, None) and streamable("default", "nf4") and streamable(m, None) and streamable(m, "nf4")
    assert not streamable(m, "nf4-gptq") and not streamable(m, None, trust_remote_code=True)
    (tmp_path / "x.bin").write_text("")
    assert not streamable(str(tmp_path / "x.bin"), None) and not streamable("some/hub-id", None)
    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = json.loads((files["dir"] / "model" / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    (remote / "model.safetensors").write_bytes(b"")
    assert not streamable(str(remote), None)


def test_dtype_semantics():
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", torch.device("cuda", 0)) is None  # the checkpoint's stored dtype
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16" and resolve_dtype("float16", "cuda") == "float16"


def test_bad_dtype_is_refused():
    with pytest.raises(Exception, match="dtype"):
        load_options(base={"dtype": "int8"})


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_streamed_base_gives_the_same_logits_as_the_whole_model_path(files, quantize):
    o = load_options(base={"model": files["model"], "quantize": quantize, "device": "cpu"})
    model, _ = load_base(o, log=lambda *a: None)
    ref, _ = load_model(files["model"])
    if quantize == "nf4":
        from lorakit.model.quantize import quantize as quantize_model
        ref = quantize_model(ref) or ref
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())


def test_dtype_bfloat16_keeps_the_weights_in_bf16(files):
    o = load_options(base={"model": files["model"], "dtype": "bfloat16", "device": "cpu"})
    model, _ = load_base(o, log=lambda *a: None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_normal_tiny_run_is_planned_and_not_refused(files):
    o = load_options(base={"model": files["model"], "device": "cpu"})
    plan = plan_or_refuse(o, "float32", "cpu")
    assert plan is not None and plan.fits
    assert plan_or_refuse(load_options(base={"device": "cpu"}), "float32", "cpu") is None  # embedded default


def test_train_refuses_a_run_over_the_memory_limit_before_making_the_run_folder(files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", files["model"], "--data", files["train"], "--out", str(out), "--max-steps", "1",
            "--no-progress", "--memory-limit", "1MiB"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "this run needs about" in err and "only 1 MiB is available" in err and "Traceback" not in err
    assert "frozen weights" in err and "training peak" in err  # the plan's breakdown
    assert not out.exists()


def test_bad_memory_limit_exits_2(files, tmp_path, capsys):
    argv = ["train", "--model", files["model"], "--data", files["train"], "--out", str(tmp_path / "o"),
            "--memory-limit", "lots", "--no-progress"]
    assert main(argv) == 2
    assert "memory size" in capsys.readouterr().err
