"""Every bad request gets an OpenAI-style error with the right status; the server keeps answering."""
from __future__ import annotations

import httpx
import openai
import pytest

import serve_helpers
from serve_helpers import adapter_root, server  # noqa: F401 (fixtures)

OK = {"model": "a", "prompt": "red cat", "max_tokens": 2}
MSG = [{"role": "user", "content": "hi"}]
BAD = [
    # (method, path, body or raw bytes, status, param)
    ("POST", "/v1/completions", b"{not json", 400, None),
    ("POST", "/v1/completions", b"[1, 2]", 400, None),
    ("POST", "/v1/completions", {"prompt": "x"}, 400, "model"),
    ("POST", "/v1/completions", {"model": "a"}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "model": "nope"}, 404, "model"),
    ("POST", "/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {**OK, "max_tokens": "5"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {**OK, "max_tokens": 65}, 400, "max_tokens"),  # over the server's --max-tokens
    ("POST", "/v1/completions", {**OK, "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/completions", {**OK, "temperature": 3}, 400, "temperature"),
    ("POST", "/v1/completions", {**OK, "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {**OK, "n": 2}, 400, "n"),
    ("POST", "/v1/completions", {**OK, "best_of": 3}, 400, "best_of"),
    ("POST", "/v1/completions", {**OK, "logprobs": 2}, 400, "logprobs"),
    ("POST", "/v1/completions", {**OK, "echo": True}, 400, "echo"),
    ("POST", "/v1/completions", {**OK, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("POST", "/v1/completions", {**OK, "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("POST", "/v1/completions", {**OK, "stop": [""]}, 400, "stop"),
    ("POST", "/v1/completions", {**OK, "seed": 1.5}, 400, "seed"),
    ("POST", "/v1/completions", {**OK, "bogus": 1}, 400, "bogus"),
    ("POST", "/v1/completions", {**OK, "prompt": ""}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "prompt": []}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "prompt": ["x", "y"]}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "prompt": [5, 100000]}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "prompt": [-1]}, 400, "prompt"),
    ("POST", "/v1/completions", {**OK, "prompt": " red" * 120}, 400, "prompt"),  # over --max-prompt-tokens
    ("POST", "/v1/completions", {**OK, "prompt": [5] * 90, "max_tokens": 60}, 400, "max_tokens"),  # past context
    ("POST", "/v1/completions", {**OK, "prompt": "x" * 70000}, 413, None),  # over --max-body-bytes
    ("POST", "/v1/chat/completions", {"model": "a"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "a", "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "a", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role"),
    ("POST", "/v1/chat/completions", {"model": "a", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("POST", "/v1/chat/completions", {"model": "a", "messages": MSG, "max_completion_tokens": 10 ** 6}, 400,
     "max_tokens"),
    ("POST", "/v1/chat/completions", {"model": "zz", "messages": MSG}, 404, "model"),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../../etc"}, 403, "lora_path"),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, 403, "lora_path"),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "missing"}, 400, "lora_path"),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "d"}, 400, "lora_name"),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "../x", "lora_path": "d"}, 400, "lora_name"),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": "d"}, 400, "lora_name"),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "lora_name"),
    ("GET", "/v1/completions", None, 405, None),
    ("GET", "/v1/nothing", None, 404, None),
    ("DELETE", "/v1/models", None, 405, None),
]


@pytest.mark.parametrize("method,path,body,status,param", BAD, ids=[f"{i}-{b[1]}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_request_gets_openai_error(server, method, path, body, status, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        ({"json": body} if body is not None else {})
    r = httpx.request(method, server.root + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and isinstance(err["type"], str)
    assert "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param, err


def test_server_still_answers_after_bad_requests(server):
    r = server.client().completions.create(**OK)
    assert r.choices[0].text is not None


def test_pickle_only_adapter_is_refused(server, adapter_root):
    import shutil
    folder = adapter_root / "pickled"
    shutil.copytree(adapter_root / "d", folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    r = httpx.post(server.url + "/load_lora_adapter", json={"lora_name": "p", "lora_path": "pickled"}, timeout=30)
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]


def test_symlink_out_of_the_root_is_refused(server, adapter_root, tmp_path):
    (adapter_root / "escape").symlink_to(tmp_path)
    r = httpx.post(server.url + "/load_lora_adapter", json={"lora_name": "e", "lora_path": "escape"}, timeout=30)
    assert r.status_code == 403 and str(tmp_path) not in r.text


def test_openai_client_sees_typed_errors(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="a", prompt="x", max_tokens=10 ** 6)
    assert e.value.body["param"] == "max_tokens"


def test_api_key(adapter_root):
    live = serve_helpers.start({"a": adapter_root / "a"}, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="wrong").models.list()
        r = httpx.get(live.url + "/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(live.url + "/models", headers={"Authorization": "Basic s3cret"}, timeout=10).status_code == 401
        assert [m.id for m in live.client(api_key="s3cret").models.list().data] == ["tiny", "a"]
        assert live.client(api_key="s3cret").completions.create(model="a", prompt="red", max_tokens=2).usage
        assert httpx.get(live.root + "/health", timeout=10).status_code == 200  # probes need no key
    finally:
        live.close()


def test_runtime_loading_is_off_without_adapter_root(adapter_root):
    live = serve_helpers.start({})
    try:
        r = httpx.post(live.url + "/load_lora_adapter", json={"lora_name": "d", "lora_path": str(adapter_root / "d")},
                       timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "runtime_loading_disabled"
        assert [m.id for m in live.client().models.list().data] == ["tiny"]
        assert live.client().completions.create(model="tiny", prompt="red", max_tokens=2).usage.completion_tokens
    finally:
        live.close()


def test_queue_limit_answers_429(adapter_root):
    import threading
    live = serve_helpers.start({}, max_batch=1, max_queued=1)
    try:
        statuses = []
        body = {"model": "tiny", "prompt": "red cat", "max_tokens": 64, "temperature": 0}

        def send():
            statuses.append(httpx.post(live.url + "/completions", json=body, timeout=60).status_code)
        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    finally:
        live.close()
