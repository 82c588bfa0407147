"""The FastAPI app: OpenAI-compatible routes in front of one Engine.

    GET  /health                    {"status": "ok", running, waiting, ...}        (no API key needed)
    GET  /v1/models                 the base model and every known adapter
    POST /v1/completions            prompt -> text            (stream: server-sent events, then [DONE])
    POST /v1/chat/completions       messages -> reply, through the tokenizer's chat template
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}   (vLLM's body; path under --adapter-root)
    POST /v1/unload_lora_adapter    {"lora_name"}

A request's `model` is an adapter name or the base model's name. Handlers only validate, tokenize and wait:
the engine thread does all model work and hands events back through the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lorakit.io.adapter_paths import resolve_adapter_dir
from lorakit.serve.paths import path_under_root, require_safetensors
from lorakit.errors import LorakitError
from lorakit.serve import protocol
from lorakit.serve.adapters import AdapterBusy
from lorakit.serve.engine import Engine, QueueFull, Request, ShuttingDown
from lorakit.serve.errors import APIError, error_body, install_error_handlers
from lorakit.serve.guards import Guards
from lorakit.serve.protocol import Limits
from lorakit.serve.schemas import ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest

DEFAULT_MAX_BODY = 1 << 20


def _check_adapter_name(name: str) -> None:
    from lorakit.model.state import check_adapter_name
    try:
        check_adapter_name(name)
    except LorakitError as e:
        raise APIError(400, str(e), "lora_name", "invalid_value") from e


class _Events:
    """Receives engine events on its thread and queues them on the event loop for one handler."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, kind: str, data) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, data))


def _engine_error(e: BaseException) -> APIError:
    if isinstance(e, LorakitError):
        return APIError(400, str(e))
    return APIError(500, f"generation failed ({type(e).__name__}); see the server log")


def create_app(engine: Engine, *, base_name: str, limits: Limits | None = None, api_key: str | None = None,
               adapter_root: str | Path | None = None, max_body: int = DEFAULT_MAX_BODY,
               stop_engine_on_shutdown: bool = True) -> FastAPI:
    """Returns the app serving `engine`; the engine is started with the app and drained when it stops."""
    limits = limits or Limits(context_length=engine.context_length)
    root = Path(adapter_root).expanduser().resolve() if adapter_root else None
    pool = engine.pool
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine.thread is None:
            engine.start()
        yield
        if stop_engine_on_shutdown:
            await asyncio.to_thread(engine.stop)  # uvicorn has finished in-flight requests; this drains the rest

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(Guards, api_key=api_key, max_body=max_body)

    def adapter_for(model: str) -> str | None:
        if model == base_name:
            return None
        if pool.is_known(model):
            return model
        raise APIError(404, f"the model {model!r} does not exist; GET /v1/models lists the base model and adapters",
                       "model", "model_not_found")

    def submit(ids: list[int], adapter: str | None, params) -> tuple[Request, _Events]:
        events = _Events()
        req = Request(ids, adapter, params, events)
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(429, str(e), code="too_many_requests") from e
        except ShuttingDown as e:
            raise APIError(503, str(e), code="shutting_down") from e
        return req, events

    async def collect(req: Request, events: _Events) -> tuple[str, dict]:
        parts = []
        try:
            while True:
                kind, data = await events.queue.get()
                if kind == "text":
                    parts.append(data)
                elif kind == "done":
                    return "".join(parts), data
                else:
                    raise _engine_error(data)
        finally:
            req.cancel()  # no-op when finished; stops the work if this handler is cancelled

    def stream(req: Request, events: _Events, rid: str, model: str, chat: bool, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async def gen():
            try:
                if chat:
                    yield sse(protocol.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
                while True:
                    kind, data = await events.queue.get()
                    if kind == "text":
                        yield sse(protocol.chat_chunk(rid, model, {"content": data}, None) if chat
                                  else protocol.completion_chunk(rid, model, data, None))
                    elif kind == "done":
                        reason = data["finish_reason"]
                        yield sse(protocol.chat_chunk(rid, model, {}, reason) if chat
                                  else protocol.completion_chunk(rid, model, "", reason))
                        if include_usage:
                            yield sse(protocol.usage_chunk(rid, model, obj, data))
                        break
                    else:
                        err = _engine_error(data)
                        yield sse(error_body(err.status, err.message, err.param, err.code, err.type))
                        break
                yield "data: [DONE]\n\n"
            finally:
                req.cancel()

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def generate(body, ids: list[int], chat: bool, default_max: int | None):
        adapter = adapter_for(body.model)
        params = protocol.sampling_params(body, len(ids), limits, default_max)
        req, events = submit(ids, adapter, params)
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(req, events, rid, body.model, chat, include)
        text, done = await collect(req, events)
        make = protocol.chat_object if chat else protocol.completion_object
        return JSONResponse(make(rid, body.model, text, done))

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models():
        entry = {"object": "model", "created": created, "owned_by": "lorakit"}
        data = [{"id": base_name, "root": base_name, "parent": None, **entry}]
        data += [{"id": name, "root": name, "parent": base_name, **entry} for name in pool.names()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        adapter_for(body.model)  # an unknown model is a 404 before any prompt work
        ids = protocol.completion_prompt_ids(body.prompt, engine.tokenizer)
        return await generate(body, ids, chat=False, default_max=16)  # OpenAI's default for completions

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        adapter_for(body.model)
        ids = protocol.chat_prompt_ids(body.messages, engine.tokenizer)
        return await generate(body, ids, chat=True, default_max=None)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest):
        if root is None:
            raise APIError(403, "loading adapters at run time is off; start the server with --adapter-root DIR",
                           "lora_path", "runtime_loading_disabled")
        if body.load_inplace:
            raise APIError(400, "load_inplace is not supported; unload the adapter first", "load_inplace")
        _check_adapter_name(body.lora_name)
        if body.lora_name == base_name:
            raise APIError(400, f"{body.lora_name!r} is the base model's name", "lora_name", "invalid_value")
        try:
            folder = path_under_root(body.lora_path, root)
        except LorakitError as e:
            raise APIError(403, str(e).replace(str(root), "--adapter-root"), "lora_path", "path_not_allowed") from e
        try:
            folder = require_safetensors(path_under_root(resolve_adapter_dir(folder), root))
        except LorakitError as e:
            raise APIError(400, str(e).replace(str(root), "<adapter-root>"), "lora_path", "invalid_adapter") from e
        try:
            pool.register(body.lora_name, folder)
        except LorakitError as e:
            raise APIError(400, str(e), "lora_name", "adapter_exists") from e
        try:
            await asyncio.wrap_future(engine.call(lambda: pool.load(body.lora_name)))
        except AdapterBusy:
            pass  # every slot is busy: it loads when a request needs it and a slot frees up
        except ShuttingDown as e:
            pool.forget(body.lora_name)
            raise APIError(503, str(e), code="shutting_down") from e
        except Exception as e:  # noqa: BLE001 - a bad adapter is the client's error; nothing was changed
            pool.forget(body.lora_name)
            raise APIError(400, f"could not load adapter {body.lora_name!r}: {e}".replace(str(root), "<adapter-root>"),
                           "lora_path", "invalid_adapter") from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterRequest):
        try:
            pool.forget(body.lora_name)
        except KeyError:
            raise APIError(404, f"no adapter named {body.lora_name!r} is loaded", "lora_name",
                           "model_not_found") from None
        with contextlib.suppress(ShuttingDown):
            await asyncio.wrap_future(engine.call(pool.collect))  # unloads now unless rows still use it
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app
