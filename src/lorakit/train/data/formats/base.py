"""What a data format declares (the registry in formats/__init__ collects one per module)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class DataFormat:
    """How one row format is recognised, checked and rendered into prompt/response segments."""
    name: str
    priority: int  # lower is tried first when telling a row's format
    fields: str  # what a row of this format has, for error messages
    detect: Callable[[dict], bool]
    validate: Callable[[dict], dict]  # returns the row normalized; ValueError('field: what is wrong')
    render: Callable[..., list[tuple[str, bool]]]  # (record, tokenizer, template, system) -> segments
    order: int = 0  # where `fields` appears in the "no ... field" message
