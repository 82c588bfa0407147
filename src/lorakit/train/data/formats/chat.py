"""Chat rows: {messages: [{role, content}, ...]}; only the assistant turns are trained."""
from __future__ import annotations

from lorakit.errors import ConfigError
from lorakit.train.data.formats.base import DataFormat
from lorakit.train.data.templates import chat_text


def detect(row: dict) -> bool:
    """Returns True for a row with messages."""
    return "messages" in row


def validate(row: dict) -> dict:
    """Returns the row; ValueError for a bad message list or no assistant turn."""
    msgs = row["messages"]
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


def render(record: dict, tokenizer=None, template: str = "auto", system: str | None = None) -> list[tuple[str, bool]]:
    """Returns alternating (prompt, False) / (assistant turn, True) segments via the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat-format data ('messages') needs a tokenizer with a chat template.")
    msgs, segments, done = record["messages"], [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = chat_text(tokenizer, msgs[:i], True)
        full = chat_text(tokenizer, msgs[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ConfigError("the tokenizer's chat template does not render conversations prefix-wise; "
                              "cannot tell prompt tokens from response tokens.")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(t, trainable) for t, trainable in segments if t]


FORMAT = DataFormat("chat", priority=10, fields="'messages' (chat)", detect=detect, validate=validate,
                    render=render, order=1)
