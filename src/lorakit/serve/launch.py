"""Building a server from options: the model, its adapters, the engine, the app; and running it with uvicorn."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.io.adapter_paths import resolve_adapter_dir
from lorakit.serve.paths import require_safetensors
from lorakit.errors import ConfigError
from lorakit.serve.adapters import AdapterPool
from lorakit.serve.app import DEFAULT_MAX_BODY, create_app
from lorakit.serve.engine import Engine
from lorakit.serve.protocol import Limits

log = logging.getLogger("lorakit.serve")


@dataclass
class ServeOptions:
    """What `lorakit serve` takes (see cli/serve.py for the flags)."""

    model: str | None = None
    adapters: list[tuple[str, str]] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    quantize: str | None = None
    max_batch: int = 32
    max_loaded_adapters: int | None = None
    adapter_root: str | None = None
    max_queued: int = 256
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_body_bytes: int = DEFAULT_MAX_BODY
    served_model_name: str | None = None
    trust_remote_code: bool = False


def parse_adapter_arg(text: str) -> tuple[str, str]:
    """Splits NAME=DIR; ConfigError when malformed."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise ConfigError(f"--adapter {text!r}: write NAME=DIR (an adapter, checkpoint or run folder)")
    return name, folder


def base_model_name(spec: str | None) -> str:
    """Returns the name clients use for the base model: 'smollm2' for the embedded default, else the folder name."""
    if spec is None or spec.lower() in ("default", "smollm2"):
        return "smollm2"
    p = Path(spec)
    return p.stem if p.suffix.lower() == ".gguf" else (p.name if p.exists() else spec)


def build_engine(model, tokenizer, adapters: list[tuple[str, str]] = (), *, max_loaded: int | None = None,
                 max_batch: int = 32, max_queued: int = 256) -> Engine:
    """Returns an (unstarted) Engine for `model` with `adapters` registered and the first K of them loaded."""
    from lorakit.model.state import check_adapter_name

    pool = AdapterPool(model, max_loaded)
    for name, folder in adapters:
        check_adapter_name(name)
        pool.register(name, require_safetensors(resolve_adapter_dir(folder)))
    for name, _ in adapters[:max_loaded or len(adapters)]:
        pool.load(name)
    return Engine(model, tokenizer, pool, max_batch=max_batch, max_queued=max_queued)


def build_app(o: ServeOptions, log_fn=print):
    """Loads the model and adapters of `o`; returns (app, engine, base model name)."""
    from lorakit.loading.pretrained import load_model

    if o.quantize not in (None, "none", "nf4"):
        raise ConfigError(f"--quantize {o.quantize!r}: choose none or nf4")
    if o.adapter_root is not None and not Path(o.adapter_root).expanduser().is_dir():
        raise ConfigError(f"--adapter-root {o.adapter_root} is not a folder")
    adapters = [parse_adapter_arg(a) if isinstance(a, str) else a for a in o.adapters]
    names = [n for n, _ in adapters]
    base = o.served_model_name or base_model_name(o.model)
    if len(set(names)) != len(names) or base in names:
        raise ConfigError(f"adapter names must be unique and differ from the base model's name {base!r}: {names}")
    # every adapter folder is checked before the (slow) model load
    adapters = [(n, str(require_safetensors(resolve_adapter_dir(f)))) for n, f in adapters]
    log_fn(f"loading model {o.model or 'smollm2 (embedded default)'}")
    model, tokenizer = load_model(o.model, trust_remote_code=o.trust_remote_code)
    if o.quantize == "nf4":
        import lorakit
        model = lorakit.quantize(model) or model
    engine = build_engine(model, tokenizer, adapters, max_loaded=o.max_loaded_adapters, max_batch=o.max_batch,
                          max_queued=o.max_queued)
    limits = Limits(o.max_prompt_tokens, o.max_tokens, engine.context_length)
    app = create_app(engine, base_name=base, limits=limits, api_key=o.api_key, adapter_root=o.adapter_root,
                     max_body=o.max_body_bytes)
    return app, engine, base


def run_server(app, host: str, port: int, log_level: str = "info") -> int | None:
    """Runs uvicorn until SIGINT/SIGTERM: it stops accepting, finishes in-flight requests, then the engine drains.

    Returns the number of the signal that stopped it (None if it stopped otherwise), instead of re-raising it as
    uvicorn does, so the command can report a clean stop and exit with 128 + signal like `lorakit train`.
    """
    import signal
    import threading

    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None,
                            access_log=False)
    server = _Server(config)
    server.run()
    if not server.started and not server._captured_signals:  # noqa: SLF001 - uvicorn's own record of signals
        raise ConfigError(f"the server could not start on {host}:{port} (is the port in use?)")
    return server._captured_signals[0] if server._captured_signals else None  # noqa: SLF001
