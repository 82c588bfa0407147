"""A live lorakit server on 127.0.0.1 for the serve tests: tiny random Llama, tiny tokenizer, tiny adapters."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
ADAPTERS = ("a", "b", "c", "d")


def tokenizer():
    from train_fixtures import tiny_tokenizer
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def model(tok):
    from train_fixtures import tiny_model
    m = tiny_model(len(tok))
    m.config.max_position_embeddings = 128  # the context limit the server enforces
    return m


def write_adapters(root: Path, tok, names=ADAPTERS) -> dict[str, Path]:
    """Saves one adapter per name (random non-zero A and B, different per name) under root/NAME."""
    import lorakit

    out = {}
    for i, name in enumerate(names):
        m = model(tok)
        lorakit.inject(m, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        out[name] = lorakit.save_adapter(m, root / name)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn running a lorakit app in a background thread; `url` is its /v1 base."""

    def __init__(self, app, engine) -> None:
        import uvicorn

        self.engine, self.port = engine, free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"

    def client(self, api_key: str = "none", **kw):
        import openai
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=60, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start(adapters: dict[str, Path] | None = None, *, adapter_root=None, api_key=None, max_loaded=None,
          max_batch=32, max_queued=256, max_tokens=64, max_prompt_tokens=100, max_body=1 << 16) -> LiveServer:
    from lorakit.serve.app import create_app
    from lorakit.serve.launch import build_engine
    from lorakit.serve.protocol import Limits

    tok = tokenizer()
    engine = build_engine(model(tok), tok, [(n, str(p)) for n, p in (adapters or {}).items()],
                          max_loaded=max_loaded, max_batch=max_batch, max_queued=max_queued)
    app = create_app(engine, base_name="tiny", limits=Limits(max_prompt_tokens, max_tokens, engine.context_length),
                     api_key=api_key, adapter_root=adapter_root, max_body=max_body)
    return LiveServer(app, engine)


def reference_tokens(adapter_dir: Path | None, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens from plain transformers generate() on a fresh model with the adapter loaded (no server)."""
    import lorakit

    tok = tokenizer()
    m = model(tok)
    if adapter_dir is not None:
        lorakit.load_adapter(m, adapter_dir)
    with torch.no_grad():
        out = m.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=tok.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


# ---------------------------------------------------------------------------- fixtures
# (imported by the test modules: a conftest.py here would shadow tests/conftest.py, which other tests import)
@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_adapters(root, tokenizer())
    return root


@pytest.fixture(scope="module")
def server(adapter_root):
    """Adapters a, b, c served; d under --adapter-root for run-time loading; no API key."""
    live = start({n: adapter_root / n for n in ("a", "b", "c")}, adapter_root=adapter_root)
    yield live
    live.close()
