"""ShareGPT rows: {conversations: [{from: system|human|gpt, value}, ...]}; read as chat messages, so every
assistant (gpt) turn is trained with its end-of-turn token, exactly as chat rows are.

`from` may also be user/assistant, and a turn may use role/content keys (common ShareGPT variants).
"""
from __future__ import annotations

from lorakit.train.data.formats import chat
from lorakit.train.data.formats.base import DataFormat

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def detect(row: dict) -> bool:
    """Returns True for a row with conversations."""
    return "conversations" in row


def messages(row: dict) -> dict:
    """Returns the row with its `conversations` turned into chat `messages` ({role, content})."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise ValueError(f"conversations: expected a list of {{from, value}} objects, got {type(turns).__name__}")
    if not turns:
        raise ValueError("conversations: empty (a conversation needs at least one human and one gpt turn)")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{i}]: expected an object with 'from' and 'value'")
        who = turn.get("from", turn.get("role"))
        if who not in ROLES:
            raise ValueError(f"conversations[{i}].from: unknown role {who!r} (expected human, gpt or system)")
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise ValueError(f"conversations[{i}].value: expected a string, got {type(text).__name__}")
        out.append({"role": ROLES[who], "content": text})
    return {**{k: v for k, v in row.items() if k != "conversations"}, "messages": out}


def validate(row: dict) -> dict:
    """Returns the row as a chat row (messages); ValueError naming conversations[i] for a bad turn."""
    return chat.validate(messages(row))


FORMAT = DataFormat("sharegpt", priority=15, fields="'conversations' (ShareGPT)", detect=detect, validate=validate,
                    render=chat.render, order=2)
