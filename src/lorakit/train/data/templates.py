"""Prompt templates: Alpaca text or the tokenizer's chat template, and the prompt an Alpaca record renders to."""
from __future__ import annotations

from lorakit.errors import ConfigError


# ----------------------------------------------------------------------------------------------------------

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
TEMPLATES = ("auto", "chat", "alpaca")


def resolve_template(template: str, tokenizer) -> str:
    """Returns 'chat' or 'alpaca': 'auto' picks chat when the tokenizer has a chat template."""
    if template not in TEMPLATES:
        raise ConfigError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if template == "auto":
        # An instruct model was tuned on its own chat format: prompting in it gives a much better untuned
        # baseline and fine-tunes faster than teaching it a second (Alpaca) format (measured: docs/train_notes.md).
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("template 'chat' needs a tokenizer with a chat template; use template 'alpaca'.")
    return template


def alpaca_messages(record: dict, system: str | None = None) -> list[dict]:
    """Returns the chat messages for an Alpaca record: [system?], user (instruction + input)."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def chat_text(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    """Returns messages rendered to text by the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_prompt(record: dict, tokenizer=None, template: str = "auto", system: str | None = None) -> str:
    """Returns the prompt text for an Alpaca record, exactly as training renders it (for generation)."""
    if resolve_template(template, tokenizer) == "chat":
        return chat_text(tokenizer, alpaca_messages(record, system), True)
    fmt = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return fmt.format(instruction=record["instruction"], input=record.get("input", ""))
