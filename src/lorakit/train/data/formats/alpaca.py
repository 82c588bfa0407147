"""Alpaca rows: {instruction, input?, output}; the prompt is masked, the output is trained."""
from __future__ import annotations

from lorakit.train.data.formats.base import DataFormat
from lorakit.train.data.templates import alpaca_messages, chat_text, render_prompt, resolve_template


def detect(row: dict) -> bool:
    """Returns True for a row with an instruction or an output."""
    return "instruction" in row or "output" in row


def validate(row: dict) -> dict:
    """Returns the row with input defaulted to ''; ValueError for a missing, empty or non-string field."""
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


def render(record: dict, tokenizer=None, template: str = "auto", system: str | None = None) -> list[tuple[str, bool]]:
    """Returns [(prompt, False), (output + eos, True)] in the Alpaca or chat template."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    prompt = render_prompt(record, tokenizer, template, system)
    if resolve_template(template, tokenizer) == "chat":
        full = chat_text(tokenizer, alpaca_messages(record, system) +
                         [{"role": "assistant", "content": record["output"]}], False)
        if full.startswith(prompt):
            return [(prompt, False), (full[len(prompt):], True)]
    return [(prompt, False), (record["output"] + eos, True)]


FORMAT = DataFormat("alpaca", priority=20, fields="'instruction'/'output' (Alpaca)", detect=detect,
                    validate=validate, render=render, order=0)
