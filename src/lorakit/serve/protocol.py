"""Between OpenAI request bodies and the engine: prompts to token ids, limits, sampling, response objects."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from lorakit.serve.errors import APIError
from lorakit.serve.sampling import SamplingParams

MAX_STOPS = 4


@dataclass
class Limits:
    """Per-request limits (CLI flags of `lorakit serve`)."""

    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    context_length: int | None = None  # the model's positions; prompt + max_tokens must fit


def completion_prompt_ids(prompt, tokenizer) -> list[int]:
    """Returns the token ids of a /v1/completions prompt: a string or token ids, one prompt per request."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: {len(prompt)} prompts given; this server answers one prompt per request",
                           "prompt", "invalid_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = list(prompt)
        vocab = len(tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt",
                           "invalid_value")
    if not ids:
        raise APIError(400, "prompt: the prompt is empty", "prompt", "invalid_value")
    return ids


def chat_prompt_ids(messages, tokenizer) -> list[int]:
    """Returns the token ids of a chat rendered with the tokenizer's chat template (ending in the assistant turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages",
                       "no_chat_template")
    plain = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        plain.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - templates raise their own errors (role order, ...)
        raise APIError(400, f"messages: the chat template rejected them: {e}", "messages", "invalid_value") from e
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise APIError(400, "messages: the rendered prompt is empty", "messages", "invalid_value")
    return ids


def sampling_params(body, prompt_len: int, limits: Limits, default_max: int | None) -> SamplingParams:
    """Returns SamplingParams for a request, checking max_tokens and the prompt against the limits."""
    if prompt_len > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this server accepts at most "
                            f"{limits.max_prompt_tokens}", "prompt", "context_length_exceeded")
    room = None if limits.context_length is None else limits.context_length - prompt_len
    if room is not None and room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens, which fills this model's context of "
                            f"{limits.context_length}", "prompt", "context_length_exceeded")
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is not None:
        if asked > limits.max_tokens:
            raise APIError(400, f"max_tokens={asked} is over this server's limit of {limits.max_tokens}",
                           "max_tokens", "invalid_value")
        if room is not None and asked > room:
            raise APIError(400, f"this model's context is {limits.context_length} tokens; the prompt has "
                                f"{prompt_len} and max_tokens asks for {asked}", "max_tokens",
                           "context_length_exceeded")
        max_tokens = asked
    else:
        max_tokens = min(x for x in (default_max or limits.max_tokens, limits.max_tokens, room) if x is not None)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOPS or any(not s for s in stop):
        raise APIError(400, f"stop: give at most {MAX_STOPS} non-empty strings", "stop", "invalid_value")
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stop)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(done: dict) -> dict:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_object(rid: str, model: str, text: str, done: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": done["finish_reason"]}],
            "usage": usage(done)}


def chat_object(rid: str, model: str, text: str, done: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": done["finish_reason"]}],
            "usage": usage(done)}


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, obj: str, done: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(done)}
