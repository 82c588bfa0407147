"""The data formats registry: one module per row format (alpaca, chat, text, ...), found by import.

    row ──detect (formats by priority)──► format ──validate──► normalized row ──render──► [(text, trainable)]

A format module defines FORMAT = DataFormat(...). Adding one is a new file here plus its test in
tests/train/test_format_<name>.py; nothing else changes.
"""
from __future__ import annotations

import importlib
import pkgutil

from lorakit.train.data.formats.base import DataFormat


def load_formats() -> dict[str, DataFormat]:
    """Returns every format module's FORMAT by name, in detection order."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        fmt = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FORMAT", None)
        if isinstance(fmt, DataFormat):
            found.append(fmt)
    return {f.name: f for f in sorted(found, key=lambda f: f.priority)}


FORMATS = load_formats()
DEFAULT_FORMAT = "alpaca"  # a row that matches no format is read (and rejected) as Alpaca


def row_kind(row: dict) -> str | None:
    """Returns the name of the format a row looks like, or None."""
    return next((f.name for f in FORMATS.values() if f.detect(row)), None)


def known_fields() -> str:
    """Returns "'instruction'/'output' (Alpaca), 'messages' (chat) or 'text'": what a row may have."""
    names = [f.fields for f in sorted(FORMATS.values(), key=lambda f: f.order)]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def validate_row(row, kind: str) -> dict:
    """Returns the row normalized for `kind`; raises ValueError('field: what is wrong') when malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"<row>: expected a JSON object, got {type(row).__name__}")
    if kind not in FORMATS:
        raise ValueError(f"<row>: unknown format {kind!r}")
    return FORMATS[kind].validate(row)


def render_segments(record: dict, tokenizer=None, template: str = "auto",
                    system: str | None = None) -> list[tuple[str, bool]]:
    """Returns [(text, trainable)] for a record: prompt pieces are not trainable, responses are."""
    return FORMATS[row_kind(record) or DEFAULT_FORMAT].render(record, tokenizer, template, system)
