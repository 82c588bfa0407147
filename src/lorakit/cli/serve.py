"""`lorakit serve`: an OpenAI-compatible HTTP server answering with the base model or any of many adapters.

    lorakit serve --adapter math=runs/math --adapter style=runs/style/adapter
    lorakit serve --model DIR --adapter a=DIR --api-key "$KEY" --max-loaded-adapters 8 --adapter-root adapters/
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "math", "prompt": "2+2=", "max_tokens": 8, "temperature": 0}'

A request's "model" names an adapter or the base model (GET /v1/models lists them). Ctrl-C or SIGTERM stops
accepting requests, finishes those in flight, and exits. Details: docs/SERVE.md.
"""
from __future__ import annotations

import argparse
import os
import sys


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `serve` and returns its parser."""
    p = subparsers.add_parser("serve", help="serve a model and many LoRA adapters over an OpenAI-compatible API",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model: folder, .gguf file or hub id (default: embedded smollm2)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to serve as model NAME; DIR is an adapter, checkpoint or run folder (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY; none = no auth)")
    p.add_argument("--quantize", choices=("none", "nf4"), default=None, help="load the base in 4-bit NF4 (QLoRA's)")
    p.add_argument("--max-batch", type=_positive, default=32, help="requests decoded together (default: 32)")
    p.add_argument("--max-loaded-adapters", type=_positive, default=None, metavar="K",
                   help="adapters kept in the model; the least recently used is unloaded first (default: all)")
    p.add_argument("--adapter-root", default=None, metavar="DIR",
                   help="allow POST /v1/load_lora_adapter for folders under DIR (default: off)")
    p.add_argument("--max-queued", type=_positive, default=256, help="requests waiting before 429s (default: 256)")
    p.add_argument("--max-prompt-tokens", type=_positive, default=4096, help="prompt length limit (default: 4096)")
    p.add_argument("--max-tokens", type=_positive, default=1024, help="max_tokens limit per request (default: 1024)")
    p.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="request body limit (default: 1 MiB)")
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: derived)")
    p.add_argument("--trust-remote-code", action="store_true", help="let the model folder run its own Python code")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs `lorakit serve` until interrupted; returns the exit status."""
    from lorakit.serve.launch import ServeOptions, build_app, run_server

    o = ServeOptions(model=args.model, adapters=args.adapter, host=args.host, port=args.port, api_key=args.api_key,
                     quantize=args.quantize, max_batch=args.max_batch, max_loaded_adapters=args.max_loaded_adapters,
                     adapter_root=args.adapter_root, max_queued=args.max_queued,
                     max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                     max_body_bytes=args.max_body_bytes, served_model_name=args.served_model_name,
                     trust_remote_code=args.trust_remote_code)
    log = lambda msg: print(f"lorakit serve: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if o.host not in ("127.0.0.1", "localhost", "::1") and not o.api_key:
        log(f"warning: listening on {o.host} without --api-key: anyone who can reach this port can use the model")
    app, engine, base = build_app(o, log)
    names = ", ".join([base, *engine.pool.names()])
    log(f"models: {names}; listening on http://{o.host}:{o.port}/v1 ({'API key required' if o.api_key else 'no API key'})")
    sig = run_server(app, o.host, o.port, args.log_level)
    if sig is None:
        log("stopped")
        return 0
    import signal
    log(f"stopped by {signal.Signals(sig).name}: in-flight requests finished")
    return 128 + int(sig)
