"""Row formats beyond Alpaca, chat and text: ShareGPT conversations, column mapping, end-of-turn tokens.

    ShareGPT      {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}]}  -> chat "messages"
                  (also "user"/"assistant" as `from`, and "role"/"content" keys inside a turn)
    --columns     instruction=question,output=answer: a format's field read from another column
    end of turn   every assistant turn ends in the token that stops generation (the template's end-of-turn
                  marker, else EOS), and that token is trained

Each function raises ValueError("field: what is wrong") for a bad row; the loader adds the file and row.
"""
from __future__ import annotations

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def sharegpt_messages(row: dict) -> dict:
    """Returns the row with its ShareGPT `conversations` turned into chat `messages` ({role, content})."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise ValueError(f"conversations: expected a list of {{from, value}} objects, got {type(turns).__name__}")
    if not turns:
        raise ValueError("conversations: empty (a conversation needs at least one human and one gpt turn)")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{i}]: expected an object with 'from' and 'value'")
        who = turn.get("from", turn.get("role"))
        if who not in SHAREGPT_ROLES:
            raise ValueError(f"conversations[{i}].from: unknown role {who!r} (expected human, gpt or system)")
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise ValueError(f"conversations[{i}].value: expected a string, got {type(text).__name__}")
        messages.append({"role": SHAREGPT_ROLES[who], "content": text})
    out = {k: v for k, v in row.items() if k != "conversations"}
    out["messages"] = messages
    return out


def parse_columns(text: str | dict | None) -> dict[str, str]:
    """Returns {field: column} from 'instruction=question,output=answer' (or a mapping); ValueError if malformed."""
    if not text:
        return {}
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    out = {}
    for part in str(text).split(","):
        target, sep, source = part.partition("=")
        if not sep or not target.strip() or not source.strip():
            raise ValueError(f"expected FIELD=COLUMN pairs like instruction=question,output=answer, got {part!r}")
        out[target.strip()] = source.strip()
    return out


def rename_columns(row, columns: dict[str, str]):
    """Returns `row` with each mapped column copied to its format field ({"instruction": "question"})."""
    if not isinstance(row, dict):
        return row
    out = dict(row)
    for target, source in columns.items():
        if source not in row:
            raise ValueError(f"{source}: missing (--columns maps it to '{target}'); the row's columns are "
                             f"{', '.join(map(str, row))}")
        out[target] = row[source]
    return out


def with_end_of_turn(reply: str, tokenizer) -> str:
    """Returns an assistant turn as a chat template rendered it, plus EOS when the template wrote no special
    token (no end-of-turn marker) into it: a model must learn to stop after each of its turns.

    The marker the template wrote (ChatML's <|im_end|>, Llama 3's <|eot_id|>) is trained as it is, also when
    it is the pad token: labels come from the segments, never from comparing ids with the pad id.
    """
    specials = [t for t in getattr(tokenizer, "all_special_tokens", ()) if t]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and not any(t in reply for t in specials):
        return reply + eos
    return reply
