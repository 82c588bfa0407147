"""Bad inputs, one case each: the CLI prints ONE line saying what was wrong, where, and what to do, exits 2, never
shows a traceback, and leaves every file (and every model in memory) exactly as it was.

Cases already tried elsewhere (tests/test_io.py, test_data.py, test_inject.py, test_loop.py, test_models.py,
test_cli_train.py, test_cli_adapters.py, test_rank.py) are not repeated here; see the README for the count.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigError, ModelLoadError
from lorakit.models import load_model
from train_fixtures import alpaca_rows, tiny_model, tiny_tokenizer, write_jsonl, write_tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr would hide what the user sees
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Model conversions (GGUF) would land in $LORAKIT_CACHE: keep it inside the test's folder, to check it too."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A read-only world: tiny model, good and bad data files, an adapter, a wider model, remote-code models."""
    d = tmp_path_factory.mktemp("bad")
    model_dir = write_tiny_model(d / "model")
    write_jsonl(d / "train.jsonl", alpaca_rows(8))
    tok = tiny_tokenizer()
    # data: one file per kind of bad
    (d / "empty.jsonl").write_text("")
    (d / "emptydir").mkdir()
    (d / "blank.txt").write_text("  \n\n")
    rows = alpaca_rows(4)
    write_jsonl(d / "missing_output.jsonl", [rows[0], {"instruction": "Say the first word.", "input": "red cat"}])
    write_jsonl(d / "int_instruction.jsonl", [rows[0], rows[1], {"instruction": 7, "output": "red"}])
    write_jsonl(d / "empty_output.jsonl", [rows[0], {"instruction": "Say the first word.", "output": ""}, rows[2]])
    write_jsonl(d / "no_fields.jsonl", [{"prompt": "a", "completion": "b"}])
    (d / "broken.json").write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "c"}\n]\n')
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    write_jsonl(d / "chat.jsonl", [chat] * 4)
    write_jsonl(d / "chat_bad_content.jsonl", [chat, {"messages": [{"role": "user", "content": "hi"},
                                                                   {"role": "assistant", "content": ["yo"]}]}])
    write_jsonl(d / "chat_empty.jsonl", [{"messages": []}])
    (d / "text.txt").write_text("plain text for a causal LM\n")
    # configs
    (d / "list.yaml").write_text("- lr\n- r\n")
    (d / "malformed.yaml").write_text("lr: 0.001\nr: [4\nseed: 3\n")
    (d / "wrong_type.yaml").write_text("r: sixteen\n")
    # models
    (d / "weights.bin").write_bytes(b"\0" * 64)
    (d / "nomodel").mkdir()
    (d / "garbage.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    no_weights = shutil.copytree(model_dir, d / "no_weights")
    (no_weights / "model.safetensors").unlink()
    bad_cfg = shutil.copytree(model_dir, d / "bad_config")
    (bad_cfg / "config.json").write_text("{not json")
    remote = shutil.copytree(model_dir, d / "remote")
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "evil.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('PWNED').write_text('remote code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tok))).save_pretrained(d / "wider")
    tok.save_pretrained(d / "wider")
    tiny_model(len(tok) - 50).save_pretrained(d / "small_vocab")  # the tokenizer has 50 ids the model lacks
    tok.save_pretrained(d / "small_vocab")
    # an adapter trained (here: randomised) on the tiny model
    model, _ = load_model(model_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    lorakit.save_adapter(model, d / "adapter")
    (d / "afile").write_text("keep me\n")
    return d


def tree(root: Path) -> dict[str, str]:
    """Returns {relative path: content hash or '<dir>'} for everything under root."""
    return {str(p.relative_to(root)): "<dir>" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_model_unchanged(model, before, n_modules):
    after = dict(model.named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    assert len(list(model.modules())) == n_modules  # nothing injected or unwrapped


def cli_error(capsys, argv, *messages, roots=(), ignore=(), one_line=True) -> str:
    """Runs the CLI; asserts exit 2, no traceback, the messages, and that nothing under `roots` changed."""
    argv = [str(a) for a in argv]
    before = {r: tree(r) for r in roots}
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    assert "Traceback" not in out + err and "unexpected error" not in err
    assert err.startswith(f"lorakit {argv[0]}: error: "), err
    if one_line:
        assert len(err.strip().splitlines()) == 1, err
    for m in messages:
        assert m in err, (m, err)
    for r in roots:
        after = {k: v for k, v in tree(r).items() if not any(k == i or k.startswith(i + "/") for i in ignore)}
        want = {k: v for k, v in before[r].items() if not any(k == i or k.startswith(i + "/") for i in ignore)}
        assert after == want, f"files changed under {r}: {set(after.items()) ^ set(want.items())}"
    return err


def train_argv(env, out, *extra):
    return ["train", "--model", env / "model", "--data", env / "train.jsonl", "--out", out, "--max-steps", "1",
            "--batch-size", "4", "--no-progress", "--no-accuracy", "--target-modules", "q_proj", *extra]


def train_error(env, tmp_path, capsys, extra, *messages):
    """`lorakit train` with a bad input: exit 2, one line, no files changed. The run's own out/config.yaml is
    tolerated here (the recipe writes it before it reads model and data; see test_failed_train_writes_no_out)."""
    out = tmp_path / "out"
    err = cli_error(capsys, train_argv(env, out, *extra), *messages, roots=(env, tmp_path), ignore=("out",))
    if out.exists():
        assert {p.name for p in out.iterdir()} <= {"config.yaml"}, list(out.iterdir())
    return err


# ------------------------------------------------------------------------------------------------ train: data
DATA_CASES = {
    "missing data file": (["--data", "{env}/nope.jsonl"], ["Data path", "nope.jsonl does not exist"]),
    "folder with no data": (["--data", "{env}/emptydir"], ["emptydir is a folder but not one saved by `datasets`",
                                                           "pass a .json, .jsonl, .parquet, .csv or .txt file"]),
    "empty jsonl": (["--data", "{env}/empty.jsonl"], ["empty.jsonl: no usable rows"]),
    "empty text file": (["--data", "{env}/blank.txt"], ["blank.txt: the text file is empty"]),
    "row missing output": (["--data", "{env}/missing_output.jsonl"],
                           ["missing_output.jsonl, line 2, field 'output': missing", "--skip-bad-rows"]),
    "instruction not a string": (["--data", "{env}/int_instruction.jsonl"],
                                 ["int_instruction.jsonl, line 3, field 'instruction': expected a string, got int"]),
    "row of no known format": (["--data", "{env}/no_fields.jsonl"],
                               ["no_fields.jsonl, line 1, field '<row>'", "'messages' (chat)"]),
    "broken JSON array": (["--data", "{env}/broken.json"], ["broken.json:3: invalid JSON"]),
    "chat content not a string": (["--data", "{env}/chat_bad_content.jsonl"],
                                  ["line 2, field 'messages[1].content': expected a string, got list"]),
    "chat messages empty": (["--data", "{env}/chat_empty.jsonl"],
                            ["line 1, field 'messages': expected a non-empty list"]),
    "missing eval data": (["--eval-data", "{env}/held.jsonl"], ["held.jsonl does not exist"]),
    "every row longer than max_seq_len": (["--max-seq-len", "20"],
                                          ["no training examples left", "8 rows lost their whole response",
                                           "max_seq_len=20"]),
    "chat data, tokenizer without chat template": (["--data", "{env}/chat.jsonl"],
                                                   ["needs a tokenizer with a chat template"]),
    "template chat without chat template": (["--template", "chat"], ["use template 'alpaca'"]),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_train_bad_data(env, tmp_path, capsys, case):
    extra, messages = DATA_CASES[case]
    train_error(env, tmp_path, capsys, [a.format(env=env) for a in extra], *messages)


def test_train_empty_output_string(env, tmp_path, capsys):
    train_error(env, tmp_path, capsys, ["--data", env / "empty_output.jsonl"],
                "empty_output.jsonl, line 2, field 'output'")


def test_rows_longer_than_max_seq_len_are_counted(env, tmp_path, capsys):
    rows = alpaca_rows(8)
    rows[3]["input"] = " ".join(["red green blue"] * 150)
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    assert main([str(a) for a in train_argv(env, tmp_path / "out", "--data", data, "--max-seq-len", "200")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "1 of 8 rows were longer than max_seq_len=200 and were truncated" in out


# ------------------------------------------------------------------------------------------------ train: options
OPTION_CASES = {
    "config file missing": (["--config", "{env}/nocfg.yaml"], ["config file", "nocfg.yaml does not exist"]),
    "config not a mapping": (["--config", "{env}/list.yaml"], ["list.yaml: expected a mapping of option: value, got list"]),
    "config malformed YAML": (["--config", "{env}/malformed.yaml"], ["malformed.yaml, line 3: invalid YAML"]),
    "config wrong type": (["--config", "{env}/wrong_type.yaml"],
                          ["wrong_type.yaml: option r: expected an integer, got 'sixteen'"]),
    "--lr abc": (["--lr", "abc"], ["option lr: expected a number, got 'abc'"]),
    "--lr negative": (["--lr=-1e-3"], ["option lr: must be > 0, got -0.001"]),
    "--r 0": (["--r", "0"], ["LoraConfig.r: the rank must be a positive integer, got 0"]),
    "--epochs 0": (["--max-steps", "none", "--epochs", "0"], ["option epochs: must be > 0"]),
    "--adam-betas one number": (["--adam-betas", "0.9"], ["option adam_betas: need two numbers in [0, 1)"]),
    "--template typo": (["--template", "chatml"], ["option template: must be one of auto, chat, alpaca",
                                                  "Did you mean: chat?"]),
    "--strategy unknown": (["--strategy", "zero3"], ["option strategy: must be one of auto, none, ddp, fsdp"]),
    "rank_pattern not a mapping": (["rank_pattern=[1, 2]"], ["option rank_pattern: expected a mapping like {a: 1}"]),
    "--resume path missing": (["--resume", "{env}/no_run"], ["--resume:", "no_run does not exist"]),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_train_bad_options(env, tmp_path, capsys, case):
    extra, messages = OPTION_CASES[case]
    cli_error(capsys, train_argv(env, tmp_path / "out", *[a.format(env=env) for a in extra]), *messages,
              roots=(env, tmp_path))  # refused before anything is written: no out/ folder either
    assert not (tmp_path / "out").exists()


def test_train_argparse_errors_exit_2_without_traceback(env, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in train_argv(env, tmp_path / "out", "--nproc", "two")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --nproc: invalid int value: 'two'" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'frobnicate'" in err and "Traceback" not in err
    assert main([]) == 2 and "COMMAND" in capsys.readouterr().out  # no command: the help, status 2
    assert not (tmp_path / "out").exists()


def test_resume_with_only_an_incomplete_checkpoint(env, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoints" / "step-000004").mkdir(parents=True)
    (out / "checkpoints" / "step-000004" / "state.json").write_text("{}")
    cli_error(capsys, train_argv(env, out, "--resume"), "--resume: no complete checkpoint in",
              roots=(env, tmp_path))


def test_unknown_target_module_lists_the_linear_layers(env, tmp_path, capsys):
    train_error(env, tmp_path, capsys, ["--target-modules", "q_prj"],
                "target_modules=['q_prj'] matched no module of LlamaForCausalLM", "Did you mean: q_proj",
                "Linear layers in this model: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")


# ------------------------------------------------------------------------------------------------ train: models
MODEL_CASES = {
    "missing model path": ("{env}/no_model_here", ["Model path", "no_model_here does not exist",
                                                   "Pass an existing transformers model folder"]),
    "file that is not .gguf": ("{env}/weights.bin", ["weights.bin is not a .gguf file", "(with config.json)"]),
    "folder without config.json": ("{env}/nomodel", ["nomodel has no config.json", "save_pretrained"]),
    "corrupt .gguf": ("{env}/garbage.gguf", ["Could not read GGUF file", "garbage.gguf"]),
    "folder without weights": ("{env}/no_weights", ["Could not load the model in", "no_weights",
                                                    "model.safetensors"]),
    "config.json not JSON": ("{env}/bad_config", ["Could not load the model in", "bad_config",
                                                  "not a valid JSON file"]),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_train_bad_model(env, tmp_path, capsys, case):
    spec, messages = MODEL_CASES[case]
    train_error(env, tmp_path, capsys, ["--model", spec.format(env=env)], *messages)
    assert not (tmp_path / "cache").exists()  # nothing half-converted is left in the model cache


def test_remote_code_model_is_refused_and_its_code_never_runs(env, tmp_path, capsys):
    cli_error(capsys, ["merge", "--base", env / "remote", "--adapter", env / "adapter", "--out", tmp_path / "m"],
                    "Could not load the model in", "remote", "trust_remote_code", roots=(env, tmp_path),
                    one_line=False)
    assert not (env / "remote" / "PWNED").exists() and not (tmp_path / "m").exists()
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(env / "remote")
    assert not (env / "remote" / "PWNED").exists()


def test_remote_code_refusal_is_one_line_naming_the_flag(env, tmp_path, capsys):
    cli_error(capsys, ["merge", "--base", env / "remote", "--adapter", env / "adapter", "--out", tmp_path / "m"],
              "--trust-remote-code", roots=(env, tmp_path))


def test_tokenizer_larger_than_embedding_is_refused(env):
    with pytest.raises(ModelLoadError, match="vocab"):
        load_model(env / "small_vocab")


# ------------------------------------------------------------------------------------------------ eval / generate / merge / inspect
def test_eval_missing_adapter(env, tmp_path, capsys):
    cli_error(capsys, ["eval", "--model", env / "model", "--adapter", env / "no_adapter", "--data", env / "train.jsonl"],
              "adapter folder", "no_adapter does not exist", roots=(env,))


def test_eval_data_without_answers(env, capsys):
    cli_error(capsys, ["eval", "--model", env / "model", "--data", env / "text.txt"],
              "text.txt: eval needs Alpaca rows with an 'output'", roots=(env,))


def test_eval_batch_size_zero(env, capsys):
    cli_error(capsys, ["eval", "--model", env / "model", "--data", env / "train.jsonl", "--batch-size", "0"],
              "--batch-size must be >= 1, got 0", roots=(env,))


def test_generate_with_adapter_of_another_base(env, capsys):
    cli_error(capsys, ["generate", "--model", env / "wider", "--adapter", env / "adapter", "hi"],
              "adapter: wrong base model", "hidden_size=32", "but this model has hidden_size=48", roots=(env,))


def test_generate_max_new_tokens_zero(env, capsys):
    cli_error(capsys, ["generate", "--model", env / "model", "--max-new-tokens", "0", "hi"],
              "--max-new-tokens must be >= 1, got 0", roots=(env,))


def test_merge_missing_adapter(env, tmp_path, capsys):
    cli_error(capsys, ["merge", "--base", env / "model", "--adapter", env / "no_adapter", "--out", tmp_path / "m"],
              "no_adapter does not exist", roots=(env, tmp_path))
    assert not (tmp_path / "m").exists()


def test_merge_out_inside_a_file(env, tmp_path, capsys):
    cli_error(capsys, ["merge", "--base", env / "model", "--adapter", env / "adapter", "--out", env / "afile" / "m"],
              "afile", roots=(env, tmp_path))


def test_merge_out_is_an_existing_file(env, tmp_path, capsys):
    target = shutil.copy(env / "afile", tmp_path / "notes.txt")
    cli_error(capsys, ["merge", "--base", env / "model", "--adapter", env / "adapter", "--out", target],
              "notes.txt", roots=(env, tmp_path))


def test_inspect_on_a_file(env, capsys):
    cli_error(capsys, ["inspect", env / "adapter" / "adapter_config.json"],
              "adapter_config.json is a file; an adapter is a folder holding adapter_config.json and "
              "adapter_model.safetensors", roots=(env,))


def _adapter_copy(env, tmp_path, edit_config=None, edit_tensors=None, drop_weights=False) -> Path:
    d = shutil.copytree(env / "adapter", tmp_path / "ad")
    if edit_config is not None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps(edit_config(cfg)))
    if edit_tensors is not None:
        save_file(edit_tensors(load_file(d / "adapter_model.safetensors")), d / "adapter_model.safetensors")
    if drop_weights:
        (d / "adapter_model.safetensors").unlink()
    return d


ADAPTER_CASES = {
    "config is a JSON list": (dict(edit_config=lambda c: [c]), ["adapter_config.json must hold a JSON object, got list"]),
    "config field misspelt": (dict(edit_config=lambda c: {**{k: v for k, v in c.items() if k != "lora_alpha"},
                                                          "lora_alpah": 4}),
                              ["unknown field 'lora_alpah'", "Did you mean: lora_alpha?"]),
    "not a LoRA adapter": (dict(edit_config=lambda c: {**c, "peft_type": "IA3"}),
                           ["peft_type is 'IA3'; lorakit reads LoRA adapters only"]),
    "config without weights": (dict(drop_weights=True), ["has no adapter_model.safetensors"]),
    "bad value in config": (dict(edit_config=lambda c: {**c, "lora_dropout": 1.5}),
                            ["LoraConfig.lora_dropout: must be in [0, 1)"]),
}


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_bad_adapter_files(env, tmp_path, capsys, case):
    kw, messages = ADAPTER_CASES[case]
    d = _adapter_copy(env, tmp_path, **kw)
    cli_error(capsys, ["inspect", d], str(d), *messages, roots=(env, tmp_path))
    model, _ = load_model(env / "model")
    before, n = params(model), len(list(model.modules()))
    with pytest.raises(lorakit.AdapterFileError) as e:
        lorakit.load_adapter(model, d)
    assert all(m in str(e.value) for m in messages)
    assert_model_unchanged(model, before, n)


# ------------------------------------------------------------------------------------------------ Python API
@pytest.fixture
def loaded(env):
    model, _ = load_model(env / "model")
    return model


def test_adapter_keys_without_peft_prefix(env, tmp_path, loaded):
    d = _adapter_copy(env, tmp_path, edit_tensors=lambda t: {k.replace("base_model.model.", ""): v for k, v in t.items()})
    before, n = params(loaded), len(list(loaded.modules()))
    with pytest.raises(lorakit.AdapterFileError, match=r"keys must start with 'base_model\.model\.'"):
        lorakit.load_adapter(loaded, d)
    assert_model_unchanged(loaded, before, n)


@pytest.mark.parametrize("name", ["../x", "../../etc/evil", "/abs", "a/b", "x\\..\\y", "."])
def test_adapter_name_with_path_is_refused_everywhere(env, tmp_path, loaded, name):
    before, n, files = params(loaded), len(list(loaded.modules())), tree(tmp_path)
    with pytest.raises(ConfigError, match="adapter name .* is not allowed: use 1-64 letters, digits"):
        lorakit.load_adapter(loaded, env / "adapter", adapter_name=name)
    assert_model_unchanged(loaded, before, n)
    lorakit.load_adapter(loaded, env / "adapter", adapter_name="good")
    before, n = params(loaded), len(list(loaded.modules()))
    with pytest.raises(ConfigError, match="is not allowed"):
        lorakit.combine_adapters(loaded, ["good"], [1.0], name)
    with pytest.raises(ConfigError, match="no adapter named"):
        lorakit.save_adapter(loaded, tmp_path / "saved", adapter_name=name)
    assert_model_unchanged(loaded, before, n)
    assert tree(tmp_path) == files and not (tmp_path.parent / "x").exists()


def test_loading_the_same_adapter_name_twice(env, loaded):
    lorakit.load_adapter(loaded, env / "adapter")
    before, n = params(loaded), len(list(loaded.modules()))
    with pytest.raises(ConfigError, match="adapter 'default' is already loaded; delete it first or choose another"):
        lorakit.load_adapter(loaded, env / "adapter")
    assert_model_unchanged(loaded, before, n)


# ------------------------------------------------------------------------------------------------ a failed run leaves no trace
@pytest.fixture(scope="module")
def finished_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    argv = train_argv(env, out, "--max-steps", "2", "--save-every", "1", "--r", "2")
    assert main([str(a) for a in argv]) == 0
    return out


def test_resume_with_changed_lora_options_is_refused(env, tmp_path, capsys, finished_run):
    run = shutil.copytree(finished_run, tmp_path / "run")
    cli_error(capsys, train_argv(env, run, "--resume", "--r", "4"), "q_proj.lora_A.default.weight has shape (2, 32), "
              "the model has (4, 32) (were the LoRA options changed?)", roots=(env, tmp_path))


def test_failed_train_writes_no_out(env, tmp_path, capsys):
    cli_error(capsys, train_argv(env, tmp_path / "out", "--data", env / "nope.jsonl"), "does not exist",
              roots=(env, tmp_path))
    assert not (tmp_path / "out").exists()


def test_refused_resume_keeps_the_runs_config(env, tmp_path, capsys, finished_run):
    run = shutil.copytree(finished_run, tmp_path / "run")
    cli_error(capsys, train_argv(env, run, "--resume", "--data", env / "nope.jsonl"), "does not exist",
              roots=(env, tmp_path))
