"""Tests for lorakit.train.data: embedded dataset, loaders, templates, masking, truncation, packing, collation."""
from __future__ import annotations

import json

import pytest
import torch

from lorakit.errors import DataError
from lorakit.train import data as D
from lorakit.train.data import IGNORE_INDEX

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer(chat: bool = False):
    """Returns a tiny character-level fast tokenizer: one token per character, BOS added on request."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(SPECIALS + chars)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    t.decoder = decoders.Fuse()
    t.add_special_tokens(SPECIALS)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="<|im_end|>" if chat else "</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    if chat:
        tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return char_tokenizer(chat=True)


RECORD = {"instruction": "Say yes.", "input": "ok?", "output": "yes"}

# ---------------------------------------------------------------- embedded dataset


@pytest.fixture(scope="module")
def embedded():
    return D.embedded_dataset()


def test_embedded_counts_per_task(embedded):
    for split, idx in (("eval", 0), ("train", 1)):
        counts = {t: sum(r["task"] == t for r in embedded[split]) for t in D.TASKS}
        assert counts == {t: D.SPLIT_SIZES[t][idx] for t in D.TASKS}


def test_embedded_split_is_deterministic_and_disjoint(embedded):
    D.embedded_split.cache_clear()
    again = D.embedded_dataset()
    assert again == embedded
    train_keys = {(r["task"], r["input"]) for r in embedded["train"]}
    assert not any((r["task"], r["input"]) in train_keys for r in embedded["eval"])
    assert len({(r["task"], r["input"]) for r in embedded["eval"]}) == len(embedded["eval"])
    assert D.embedded_dataset(seed=1)["eval"] != embedded["eval"]


def test_embedded_held_out_analogy_pairs_never_trained(embedded):
    def pairs(r):
        a, _, b, _, _, c, _, _, _ = r["input"].split(" ")
        return {(a, b), (c, r["output"])}

    held = {(r["input"].split(" ")[5], r["output"]) for r in embedded["eval"] if r["task"] == "word_analogy"}
    trained = set().union(*(pairs(r) for r in embedded["train"] if r["task"] == "word_analogy"))
    assert held and not held & trained


def test_embedded_answers_are_one_allowed_word(embedded):
    for r in embedded["train"] + embedded["eval"]:
        assert set(r) == {"instruction", "input", "output", "task"}
        assert len(r["output"].split()) == 1
        if r["task"] != "word_analogy":
            assert r["output"] in r["instruction"]  # the instruction spells out the allowed answers
    labels = [r["output"] for r in embedded["eval"] if r["task"] == "tweet_sentiment"]
    assert {l: labels.count(l) for l in set(labels)} == {"positive": 16, "negative": 16, "neutral": 16}


def test_answer_matches_normalizes_case_and_punctuation():
    assert D.answer_matches(" Positive.\nbecause", "positive")
    assert D.answer_matches("Paris", "paris")
    assert not D.answer_matches("The answer is positive", "positive")
    assert not D.answer_matches("", "positive")

# ---------------------------------------------------------------- loading user data


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def jsonl(rows):
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def test_load_alpaca_jsonl(tmp_path):
    p = write(tmp_path, "a.jsonl", jsonl([RECORD, "", {"instruction": "x", "output": "y"}]))
    got = D.load_records(p)
    assert got.kind == "alpaca" and got.skipped == 0
    assert got.records[1] == {"instruction": "x", "output": "y", "input": ""}


@pytest.mark.parametrize("bad, line, fld", [
    ({"instruction": "x"}, 3, "output"),
    ({"instruction": "x", "input": 5, "output": "y"}, 3, "input"),
    ({"instruction": " ", "output": "y"}, 3, "instruction"),
    ("{not json", 3, "<json>"),
    ("[1, 2]", 3, "<row>"),
])
def test_bad_alpaca_row_names_file_line_field(tmp_path, bad, line, fld):
    p = write(tmp_path, "bad.jsonl", jsonl([RECORD, RECORD, bad, RECORD]))
    with pytest.raises(DataError) as e:
        D.load_records(p)
    msg = str(e.value)
    assert str(p) in msg and f"line {line}," in msg and f"field '{fld}'" in msg


def test_skip_bad_rows_counts(tmp_path):
    p = write(tmp_path, "bad.jsonl", jsonl([RECORD, {"instruction": "x"}, "{oops", RECORD]))
    got = D.load_records(p, skip_bad_rows=True)
    assert len(got.records) == 2 and got.skipped == 2
    assert "line 2" in got.problems[0] and "line 3" in got.problems[1]


def test_json_array_error_names_the_rows_line(tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a",\n   "output": 7}\n]\n'
    p = write(tmp_path, "a.json", text)
    with pytest.raises(DataError, match=r"line 3, field 'output': expected a string, got int"):
        D.load_records(p)
    assert len(D.load_records(write(tmp_path, "ok.json", json.dumps([RECORD] * 3))).records) == 3


def test_chat_rows_and_errors(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert D.load_records(write(tmp_path, "c.jsonl", jsonl([good]))).kind == "chat"
    bad_role = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    with pytest.raises(DataError, match=r"line 2, field 'messages\[1\]\.role'"):
        D.load_records(write(tmp_path, "c2.jsonl", jsonl([good, bad_role])))
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match=r"line 1, field 'messages': no assistant"):
        D.load_records(write(tmp_path, "c3.jsonl", jsonl([no_answer])))


def test_text_file_missing_path_unknown_suffix_and_datasets_folder(tmp_path):
    got = D.load_records(write(tmp_path, "t.txt", "hello world\n"))
    assert got.kind == "text" and got.records == [{"text": "hello world\n"}]
    with pytest.raises(DataError, match="does not exist"):
        D.load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown data format"):
        D.load_records(write(tmp_path, "x.csv", "a,b\n"))
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            D.load_records(saved)

# ---------------------------------------------------------------- templates and masking


def test_alpaca_masking_exact_positions(tok):
    segs = D.render_segments(RECORD, tok, "alpaca")
    prompt = D.ALPACA_PROMPT.format(**RECORD)
    assert segs == [(prompt, False), ("yes</s>", True)]
    ex = D.tokenize_example(segs, tok)
    n_prompt = 1 + len(prompt)  # BOS + one token per character
    assert ex["input_ids"][0] == tok.bos_token_id and len(ex["input_ids"]) == n_prompt + 4
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tok.decode(ex["input_ids"][n_prompt:]) == "yes</s>" and ex["input_ids"][-1] == tok.eos_token_id
    full = D.tokenize_example(segs, tok, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]


def test_alpaca_without_input_uses_short_template(tok):
    assert D.render_prompt({"instruction": "Hi", "output": "x"}, tok, "alpaca").startswith(
        "Below is an instruction that describes a task. Write")


def test_chat_template_for_alpaca_record(chat_tok):
    assert D.resolve_template("auto", chat_tok) == "chat"
    segs = D.render_segments(RECORD, chat_tok, "auto", system="Be brief.")
    assert segs[0] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay yes.\n\nok?<|im_end|>\n"
                       "<|im_start|>assistant\n", False)
    assert segs[1] == ("yes<|im_end|>\n", True)
    assert D.render_prompt(RECORD, chat_tok, system="Be brief.") == segs[0][0]
    ex = D.tokenize_example(segs, chat_tok, add_special_tokens=False)
    trained = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]
    assert chat_tok.decode(trained) == "yes<|im_end|>\n"
    [batched], _ = D.tokenize_records([RECORD], chat_tok, system="Be brief.")
    assert batched["input_ids"] == ex["input_ids"]  # no BOS in front of what the template rendered
    assert ex["input_ids"][0] == chat_tok.convert_tokens_to_ids("<|im_start|>")


def test_multi_turn_chat_trains_only_assistant_turns(chat_tok):
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2"}]}
    [ex], _ = D.tokenize_records([rec], chat_tok)
    runs, cur = [], []
    for i, l in zip(ex["input_ids"], ex["labels"]):
        if l == IGNORE_INDEX:
            if cur:
                runs.append(chat_tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    runs.append(chat_tok.decode(cur))
    assert runs == ["a1<|im_end|>\n", "a2<|im_end|>\n"]


def test_truncation_counts_and_drops_rows_without_targets(tok):
    short = {"instruction": "a", "output": "b"}
    long_out = {"instruction": "a", "output": "b" * 200}
    n_prompt = 1 + len(D.render_prompt(short, tok, "alpaca"))
    examples, stats = D.tokenize_records([short, long_out, {"instruction": "a" * 300, "output": "b"}], tok,
                                         template="alpaca", max_seq_len=n_prompt + 10)
    assert stats == {"rows": 3, "truncated": 2, "dropped": 1}
    assert [len(e["input_ids"]) for e in examples] == [n_prompt + 2, n_prompt + 10]


def test_raw_text_is_cut_into_windows(tok):
    examples, stats = D.tokenize_records([{"text": "abcdefghij"}], tok, max_seq_len=4)
    # BOS + 10 chars + EOS = 12 tokens -> three windows of 4, every token trained
    assert [e["input_ids"] for e in examples] == [e["labels"] for e in examples]
    assert [len(e["input_ids"]) for e in examples] == [4, 4, 4] and stats["truncated"] == 0

# ---------------------------------------------------------------- packing and collation


def test_packing_boundaries():
    exs = [{"input_ids": list(range(10 * k, 10 * k + n)), "labels": [IGNORE_INDEX] * (n - 2) + [7, 8]}
           for k, n in enumerate([5, 4, 6, 3, 8])]
    blocks = D.pack_examples(exs, block_size=10)
    assert [len(b["input_ids"]) for b in blocks] == [9, 9, 8]  # greedy, whole examples only
    assert blocks[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert sum((b["input_ids"] for b in blocks), []) == sum((e["input_ids"] for e in exs), [])
    for b in blocks:
        starts = [i for i, p in enumerate(b["position_ids"]) if p == 0]
        assert all(b["labels"][i] == IGNORE_INDEX for i in starts)
    # train_on_inputs style labels: only each example's first token is masked
    full = D.pack_examples([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2, block_size=6)
    assert full[0]["labels"] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 2, 3]


def test_collate_right_left_and_packed():
    exs = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    r = D.collate(exs, pad_token_id=0)
    assert r["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert r["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert r["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    l = D.collate(exs, pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    assert l["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert l["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    p = D.collate(D.pack_examples(exs, 4), pad_token_id=0)
    assert "attention_mask" not in p and p["position_ids"].tolist() == [[0, 1, 2, 0]]


def test_packed_forward_matches_separate_forwards():
    """The block-diagonal attention claim in pack_examples, checked on a tiny random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    exs = [{"input_ids": torch.randint(1, 64, (n,)).tolist(), "labels": [1] * n} for n in (5, 7, 3)]
    batch = D.collate(D.pack_examples(exs, block_size=20), pad_token_id=0)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        naive = model(input_ids=batch["input_ids"]).logits[0]  # plain causal: leaks across examples
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in exs])
    torch.testing.assert_close(packed[:15], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(naive[5:15], alone[5:], atol=1e-3)
