"""What training will see: rows rendered and tokenized exactly as `lorakit train` does, trained tokens marked.

    preview = data_preview(records, tokenizer, template="auto", max_seq_len=256)
    preview["counts"]      {rows, examples, tokens, trained_tokens, truncated, dropped}
    preview["examples"]    tokenized examples ({input_ids, labels}) in data order
    token_runs(example, tokenizer) -> [(text, trained), ...]      consecutive tokens of one kind, decoded
    plain_text(runs)       the text with trained runs in ⟦ ⟧ (for logs and pipes; `lorakit data --show` on a
                           terminal colours them instead)

Used by `lorakit data --show N FILE`, so a user sees the masking before spending hours on a run.
"""
from __future__ import annotations

from typing import Sequence

from lorakit.train.data import IGNORE_INDEX, tokenize_records

OPEN, CLOSE = "⟦", "⟧"


def data_preview(records: Sequence[dict], tokenizer, *, template: str = "auto", max_seq_len: int | None = 256,
                 train_on_inputs: bool = False, system: str | None = None) -> dict:
    """Returns {"examples", "counts"} for the records, tokenized as training tokenizes them."""
    examples, stats = tokenize_records(records, tokenizer, template=template, max_seq_len=max_seq_len,
                                       train_on_inputs=train_on_inputs, system=system)
    tokens = sum(len(e["input_ids"]) for e in examples)
    trained = sum(sum(1 for label in e["labels"] if label != IGNORE_INDEX) for e in examples)
    counts = {"rows": stats["rows"], "examples": len(examples), "tokens": tokens, "trained_tokens": trained,
              "truncated": stats["truncated"], "dropped": stats["dropped"]}
    return {"examples": examples, "counts": counts}


def token_runs(example: dict, tokenizer) -> list[tuple[str, bool]]:
    """Returns [(text, trained)]: runs of consecutive tokens that are (not) trained, decoded with special tokens."""
    runs: list[tuple[list[int], bool]] = []
    for tok, label in zip(example["input_ids"], example["labels"]):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], trained))
    return [(tokenizer.decode(ids, skip_special_tokens=False), trained) for ids, trained in runs]


def plain_text(runs: Sequence[tuple[str, bool]]) -> str:
    """Returns the runs as one string with each trained run inside ⟦ ⟧."""
    return "".join(f"{OPEN}{text}{CLOSE}" if trained else text for text, trained in runs)


def counts_line(counts: dict, max_seq_len: int | None) -> str:
    """Returns the counts as one line of text."""
    share = 100 * counts["trained_tokens"] / max(counts["tokens"], 1)
    return (f"rows {counts['rows']:,}, examples {counts['examples']:,}, tokens {counts['tokens']:,}, trained tokens "
            f"{counts['trained_tokens']:,} ({share:.1f}%), truncated {counts['truncated']:,} "
            f"(max_seq_len {max_seq_len}), dropped {counts['dropped']:,}")
