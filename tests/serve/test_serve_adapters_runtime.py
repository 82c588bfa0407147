"""Adapters at run time: vLLM's load/unload routes, at most K in the model with the least recently used out."""
from __future__ import annotations

import httpx
import openai
import pytest

import serve_helpers
from serve_helpers import adapter_root  # noqa: F401 (fixtures)

PROMPT = "Say the second word. blue dog"


def ask(live, model):
    return live.client().completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text


def loaded(live):
    return httpx.get(live.root + "/health", timeout=10).json()["loaded_adapters"]


def test_load_unload_and_lru(adapter_root):
    live = serve_helpers.start({"a": adapter_root / "a", "b": adapter_root / "b"}, adapter_root=adapter_root,
                               max_loaded=2)
    try:
        want = {m: ask(live, m) for m in ("a", "b")}
        assert loaded(live) == ["a", "b"]
        r = httpx.post(live.url + "/load_lora_adapter", json={"lora_name": "d", "lora_path": str(adapter_root / "d")},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert loaded(live) == ["b", "d"]  # a was least recently used
        assert [m.id for m in live.client().models.list().data] == ["tiny", "a", "b", "d"]
        want["d"] = ask(live, "d")
        assert ask(live, "a") == want["a"]  # loads a again, evicting b
        assert loaded(live) == ["d", "a"]
        assert ask(live, "b") == want["b"] and loaded(live) == ["a", "b"]
        assert len(set(want.values())) == 3

        r = httpx.post(live.url + "/unload_lora_adapter", json={"lora_name": "b"}, timeout=30)
        assert r.status_code == 200 and loaded(live) == ["a"]
        with pytest.raises(openai.NotFoundError):
            ask(live, "b")
        # the same name can come back from another folder (relative to --adapter-root)
        r = httpx.post(live.url + "/load_lora_adapter", json={"lora_name": "b", "lora_path": "c"}, timeout=30)
        assert r.status_code == 200
        assert ask(live, "b") != want["b"]
        assert ask(live, "tiny") == ask(live, "tiny")
    finally:
        live.close()


def test_a_checkpoint_or_run_folder_is_accepted(adapter_root, tmp_path):
    import shutil
    run = adapter_root / "run1"
    step = run / "checkpoints" / "step-000004"
    shutil.copytree(adapter_root / "c", step / "adapter")
    (step / "state.json").write_text("{}")
    (step / "complete").write_text("ok\n")
    live = serve_helpers.start({"c": adapter_root / "c"}, adapter_root=adapter_root)
    try:
        for name, path in (("ckpt", str(step)), ("run", "run1")):
            r = httpx.post(live.url + "/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=30)
            assert r.status_code == 200, r.text
            assert ask(live, name) == ask(live, "c")
    finally:
        live.close()


def test_unload_while_in_use_finishes_the_running_request(adapter_root):
    live = serve_helpers.start({"a": adapter_root / "a"}, adapter_root=adapter_root)
    try:
        want = live.client().completions.create(model="a", prompt=PROMPT, max_tokens=60, temperature=0)
        body = {"model": "a", "prompt": PROMPT, "max_tokens": 60, "temperature": 0, "stream": True}
        lines = []
        with httpx.stream("POST", live.url + "/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 1:  # in flight: unload now
                    u = httpx.post(live.url + "/unload_lora_adapter", json={"lora_name": "a"}, timeout=30)
                    assert u.status_code == 200
        import json
        text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1])
        assert lines[-1] == "data: [DONE]" and text == want.choices[0].text  # finished with its adapter
        assert loaded(live) == []  # and the adapter left the model afterwards
        with pytest.raises(openai.NotFoundError):
            ask(live, "a")
    finally:
        live.close()
