"""Exact-match scoring of generated answers."""
from __future__ import annotations


def normalize_answer(text: str) -> str:
    """Returns the first line of a generated answer, lower-cased, without surrounding spaces/punctuation."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return first.strip().strip(" .,!?;:'\"`*").lower()


def answer_matches(generated: str, expected: str) -> bool:
    """Returns True when the generated answer equals the expected one after normalize_answer."""
    return normalize_answer(generated) == normalize_answer(expected)
