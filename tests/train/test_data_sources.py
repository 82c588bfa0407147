"""Issue 21 data: Parquet/CSV/folders/hub ids through datasets.load_dataset, ShareGPT, --columns, multi-turn
masking with end-of-turn tokens, the `lorakit data` preview, and bad inputs (one clear message, exit 2)."""
from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.errors import DataError
from lorakit.train import data as D
from lorakit.train.data import IGNORE_INDEX
from test_data import char_tokenizer, trained_runs

pd = pytest.importorskip("pandas")
datasets = pytest.importorskip("datasets")

SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"},
                              {"from": "gpt", "value": "ciao"}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- files and ids through datasets.load_dataset


def test_parquet_and_csv_go_through_load_dataset_with_column_mapping(tmp_path, monkeypatch):
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    pd.DataFrame({"question": ["Say a", "Say b"], "answer": ["a", "b"]}).to_parquet(tmp_path / "t.parquet")
    got = D.load_records(tmp_path / "t.parquet", columns={"instruction": "question", "output": "answer"})
    assert got.kind == "alpaca" and [(r["instruction"], r["output"]) for r in got.records] == [("Say a", "a"),
                                                                                                ("Say b", "b")]
    pd.DataFrame({"instruction": ["count", "count"], "output": [1, 22]}).to_csv(tmp_path / "t.csv", index=False)
    got = D.load_records(tmp_path / "t.csv")
    assert [r["output"] for r in got.records] == ["1", "22"]  # CSV cells stay text
    assert [c[0][0] for c in calls] == ["parquet", "csv"]


def test_dataset_folder_split_and_config(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    pd.DataFrame({"text": ["train one", "train two"]}).to_parquet(folder / "train.parquet")
    pd.DataFrame({"text": ["held out"]}).to_parquet(folder / "test.parquet")
    assert [r["text"] for r in D.load_records(folder).records] == ["train one", "train two"]
    assert [r["text"] for r in D.load_records(folder, split="test").records] == ["held out"]
    assert [r["text"] for r in D.load_records(folder, prefer="eval").records] == ["held out"]
    assert [r["text"] for r in D.load_records(folder, split="train[1:]").records] == ["train two"]
    with pytest.raises(DataError, match="no split 'nope'; it has train, test"):
        D.load_records(folder, split="nope")
    hub_like = tmp_path / "configs"  # a hub-style repo whose README declares two configurations
    (hub_like / "en").mkdir(parents=True)
    (hub_like / "de").mkdir()
    pd.DataFrame({"text": ["hello"]}).to_parquet(hub_like / "en" / "train.parquet")
    pd.DataFrame({"text": ["hallo"]}).to_parquet(hub_like / "de" / "train.parquet")
    (hub_like / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files: en/*.parquet\n"
                                        "- config_name: de\n  data_files: de/*.parquet\n---\n")
    assert [r["text"] for r in D.load_records(hub_like, config="de").records] == ["hallo"]
    assert [r["text"] for r in D.load_records(hub_like, config="en").records] == ["hello"]


def test_hub_id_without_network_is_one_clear_message(capsys):
    with pytest.raises(DataError, match="hub is unreachable"):
        D.load_records("tatsu-lab/alpaca")
    rc, out, err = cli(capsys, "data", "--show", "1", "no-such-org/no-such-data")
    assert rc == 2 and err.count("\n") == 1 and "'no-such-org/no-such-data'" in err and "unreachable" in err


# ---------------------------------------------------------------- ShareGPT and column mapping


def test_sharegpt_rows_become_chat_messages(tmp_path):
    got = D.load_records(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT]))
    assert got.kind == "sharegpt"
    assert got.records[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                          {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    tok = char_tokenizer(chat=True)
    [ex], _ = D.tokenize_records(got.records, tok)
    assert trained_runs(ex, tok) == ["hello<|im_end|>\n", "ciao<|im_end|>\n"]


@pytest.mark.parametrize("row, argv, where", [
    ({"question": "q", "output": "a"}, ["--columns", "instruction=prompt"], "line 1, field 'prompt': missing"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, [],
     "line 1, field 'conversations[1].from': unknown role 'bot'"),
    ({"conversations": []}, [], "line 1, field 'conversations': empty"),
    ({"prompt": "q", "completion": "a"}, [], "line 1, field '<row>': no 'instruction'"),
])
def test_bad_rows_exit_2_naming_file_row_and_field(tmp_path, capsys, row, argv, where):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    rc, out, err = cli(capsys, "data", path, "--show", "1", *argv)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{path}, {where}" in err and "Traceback" not in err


# ---------------------------------------------------------------- multi-turn masking and end-of-turn tokens


@pytest.fixture(scope="module")
def smollm2_tok():
    from lorakit.loading.tokenizer import load_tokenizer
    return load_tokenizer(None)


def test_every_assistant_turn_and_its_end_token_is_trained_with_smollm2(smollm2_tok):
    tok = smollm2_tok
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")  # pad == eos
    rec = D.validate_row(SHAREGPT, "sharegpt")
    [ex], _ = D.tokenize_records([rec], tok)
    assert trained_runs(ex, tok) == ["hello<|im_end|>\n", "ciao<|im_end|>\n"]
    ends = [i for i, t in enumerate(ex["input_ids"]) if t == tok.eos_token_id]
    # each turn ends in <|im_end|>; the two assistant ones are targets although <|im_end|> is the pad token
    assert [ex["labels"][i] == tok.eos_token_id for i in ends] == [False, False, True, False, True]
    batch = D.collate([ex, {"input_ids": ex["input_ids"][:5], "labels": ex["labels"][:5]}], tok.pad_token_id)
    assert (batch["labels"][0] == tok.eos_token_id).sum() == 2  # padding does not mask the trained ends away


def test_a_template_without_end_marker_gets_eos_trained_after_each_turn():
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    assert tok.pad_token != tok.eos_token
    rec = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    [ex], _ = D.tokenize_records([rec], tok)
    assert trained_runs(ex, tok) == ["a1\n</s>", "a2\n</s>"]
    tok.pad_token = tok.eos_token  # pad == eos: still trained
    [ex2], _ = D.tokenize_records([rec], tok)
    assert ex2 == ex and sum(label == tok.eos_token_id for label in ex2["labels"]) == 2


# ---------------------------------------------------------------- lorakit data --show


def test_data_show_marks_trained_tokens_and_counts(tmp_path, capsys, smollm2_tok):
    path = write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, SHAREGPT])
    rc, out, err = cli(capsys, "data", path, "--show", "1")
    assert rc == 0, err
    assert "⟦hello<|im_end|>\n⟧" in out and "⟦ciao<|im_end|>\n⟧" in out and out.count("--- example") == 1
    assert "rows 2, examples 2" in out and "truncated 0" in out
    rc, out, _ = cli(capsys, "data", path, "--show", "2", "--json", "--max-seq-len", "24")
    got = json.loads(out)
    assert got["format"] == "sharegpt" and got["counts"]["rows"] == 2 and got["counts"]["truncated"] == 2
    assert len(got["rows"]) == 2 and got["counts"]["trained_tokens"] < got["counts"]["tokens"]


def test_data_show_on_a_terminal_colours_the_trained_tokens(tmp_path, capsys, monkeypatch, smollm2_tok):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats the output as a terminal
    monkeypatch.delenv("NO_COLOR", raising=False)
    rc, out, err = cli(capsys, "data", write_jsonl(tmp_path / "s.jsonl", [SHAREGPT]), "--show", "1")
    assert rc == 0, err
    assert "\x1b[1;32mhello<|im_end|>" in out and "⟦" not in out and "trained tokens in green" in out
