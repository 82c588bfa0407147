"""Raw text rows: {text}; every token is trained (causal LM on plain text)."""
from __future__ import annotations

from lorakit.train.data.formats.base import DataFormat


def detect(row: dict) -> bool:
    """Returns True for a row with a text field."""
    return "text" in row


def validate(row: dict) -> dict:
    """Returns the row; ValueError when text is not a string."""
    if not isinstance(row.get("text"), str):
        raise ValueError(f"text: expected a string, got {type(row.get('text')).__name__}")
    return row


def render(record: dict, tokenizer=None, template: str = "auto", system: str | None = None) -> list[tuple[str, bool]]:
    """Returns [(text + eos, True)]."""
    return [(record["text"] + (getattr(tokenizer, "eos_token", None) or ""), True)]


FORMAT = DataFormat("text", priority=30, fields="'text'", detect=detect, validate=validate, render=render, order=2)
