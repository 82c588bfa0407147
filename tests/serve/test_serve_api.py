"""lorakit serve through the official openai client: models, completions, chat, streaming, adapters per request."""
from __future__ import annotations

import pytest

import serve_helpers
from serve_helpers import adapter_root, server  # noqa: F401 (fixtures)

PROMPT = "Say the first word. red cat"


def reference_text(adapter_root, name, prompt_ids, n):
    tok = serve_helpers.tokenizer()
    folder = None if name == "tiny" else adapter_root / name
    return tok.decode(serve_helpers.reference_tokens(folder, prompt_ids, n), skip_special_tokens=True)


def test_models_lists_base_and_adapters(server):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == ["tiny", "a", "b", "c"]


@pytest.mark.parametrize("name", ["tiny", "a", "b"])
def test_completion_equals_plain_generate_with_that_adapter(server, adapter_root, name):
    tok = serve_helpers.tokenizer()
    ids = tok(PROMPT)["input_ids"]
    r = server.client().completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == name
    assert r.choices[0].text == reference_text(adapter_root, name, ids, 12)
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids) + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("length", "stop")


def test_adapters_switch_per_request(server):
    c = server.client()
    texts = {m: c.completions.create(model=m, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
             for m in ("tiny", "a", "b", "c")}
    assert len(set(texts.values())) == 4, texts
    # and back again: the same answers in another order
    for m in ("c", "tiny", "b", "a"):
        assert c.completions.create(model=m, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text == texts[m]


def test_token_id_prompt_equals_text_prompt(server):
    tok = serve_helpers.tokenizer()
    c = server.client()
    a = c.completions.create(model="a", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    b = c.completions.create(model="a", prompt=tok(PROMPT)["input_ids"], max_tokens=8, temperature=0).choices[0].text
    assert a == b


def test_chat_uses_the_chat_template(server, adapter_root):
    tok = serve_helpers.tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say the first word."}]
    r = server.client().chat.completions.create(model="b", messages=messages, max_tokens=9, temperature=0)
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference_text(adapter_root, "b", ids, 9)
    assert r.usage.prompt_tokens == len(ids)


def test_streaming_matches_the_whole_answer(server):
    c = server.client()
    whole = c.completions.create(model="a", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(c.completions.create(model="a", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices

    messages = [{"role": "user", "content": "Say the second word."}]
    whole = c.chat.completions.create(model="c", messages=messages, max_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model="c", messages=messages, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stream_ends_with_done_marker(server):
    import httpx
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_seeded_sampling_repeats_and_seeds_differ(server):
    c = server.client()

    def ask(seed):
        return c.completions.create(model="a", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9,
                                    seed=seed).choices[0].text
    first = ask(7)
    assert ask(7) == first
    assert len({first, ask(8), ask(9)}) > 1


def test_stop_strings_cut_the_text(server):
    c = server.client()
    full = c.completions.create(model="b", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = full[5:7]
    assert stop
    r = c.completions.create(model="b", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "\x00zz"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="b", prompt=PROMPT, max_tokens=20, temperature=0, stop=stop,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text


def test_default_max_tokens_and_health(server):
    import httpx
    r = server.client().completions.create(model="tiny", prompt=PROMPT, temperature=0)
    assert r.usage.completion_tokens <= 16  # OpenAI's default for completions
    h = httpx.get(server.root + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["waiting"] == 0
