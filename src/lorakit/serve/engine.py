"""Continuous batching over many adapters: one thread decodes every running request, one token per step.

    submit(request) ──> pending ──admit──> prefill alone ──join──> running batch ──step──> tokens ──> on_event
                                      (between decode steps)        (rows: any adapter, "__base__" for none)

Each step runs the model once on the last token of every running row, with the row's adapter (the model's
mixed-adapter batches: `adapter_names=[...]`), its own position ids, and a left-padded KV cache
(serve.kv.BatchCache). A new request is prefilled on its own and joins between steps, so its prompt is
computed exactly as if it were served alone; padding is masked and positions count only real tokens, so its
greedy tokens equal those of serving it alone. Adapter loads and unloads (serve.adapters.AdapterPool) also run
on this thread, between steps, so the model never changes under a forward pass.

Events sent to `request.on_event(kind, data)` from the engine thread:
    ("text", str)                          new final text
    ("done", {"finish_reason", "prompt_tokens", "completion_tokens"})
    ("error", Exception)                   the request failed; no "done" follows
"""
from __future__ import annotations

import concurrent.futures
import inspect
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from lorakit.errors import LorakitError
from lorakit.serve.adapters import AdapterBusy, AdapterPool
from lorakit.serve.kv import BatchCache, check_cache
from lorakit.serve.sampling import Sampler, SamplingParams, TextStream

log = logging.getLogger(__name__)
BASE = "__base__"  # the mixed-batch row marker for "no adapter"
_IDS = itertools.count(1)


class QueueFull(LorakitError):
    """More requests are waiting than the server accepts (--max-queued)."""


class ShuttingDown(LorakitError):
    """The engine is draining for shutdown and takes no new requests."""


@dataclass(eq=False)
class Request:
    """One generation request: prompt token ids, an adapter name (None = base), sampling, an event callback."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    on_event: Callable[[str, object], None]
    id: int = field(default_factory=lambda: next(_IDS))
    cancelled: bool = False
    completion_tokens: int = 0

    def cancel(self) -> None:
        """Asks the engine to drop this request at the next step (the client went away)."""
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    req: Request
    sampler: Sampler
    stream: TextStream
    last: int = 0
    position: int = 0


class Engine:
    """Owns the model: decodes all running requests together on one background thread."""

    def __init__(self, model, tokenizer, pool: AdapterPool | None = None, *, max_batch: int = 32,
                 max_queued: int = 256, context_length: int | None = None) -> None:
        if max_batch < 1 or max_queued < 1:
            raise LorakitError(f"max_batch and max_queued must be >= 1, got {max_batch} and {max_queued}")
        self.model, self.tokenizer = model, tokenizer
        self.pool = pool or AdapterPool(model)
        self.max_batch, self.max_queued = max_batch, max_queued
        self.context_length = context_length or getattr(model.config, "max_position_embeddings", None)
        self.eos = _eos_ids(model, tokenizer)
        # transformers >= 5.2x names the KV cache argument `cache`; older versions `past_key_values`
        from transformers import DynamicCache
        check_cache(DynamicCache(config=model.config), filled=False)  # refuse unsupported models at start
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.device = next(model.parameters()).device
        self.pending: deque[Request] = deque()
        self.commands: deque[tuple[Callable, concurrent.futures.Future]] = deque()
        self.rows: list[_Row] = []
        self.batch = BatchCache()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.steps = 0
        self.served = 0
        self.peak_batch = 0  # the most rows decoded in one step so far

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self.thread.start()
        return self

    def submit(self, request: Request) -> Request:
        """Queues a request; QueueFull when --max-queued are waiting, ShuttingDown while draining."""
        with self.cond:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.pending) >= self.max_queued:
                raise QueueFull(f"{len(self.pending)} requests are already waiting; retry later")
            self.pending.append(request)
            self.cond.notify()
        return request

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Runs fn() on the engine thread between decode steps; returns a future with its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if self.stopping and not (self.thread and self.thread.is_alive()):
                raise ShuttingDown("the server is shutting down")
            self.commands.append((fn, future))
            self.cond.notify()
        return future

    def stop(self, timeout: float | None = None) -> bool:
        """Takes no new requests, finishes those queued and running, then ends the thread; True if it ended."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True

    def stats(self) -> dict:
        return {"running": len(self.rows), "waiting": len(self.pending), "steps": self.steps,
                "served": self.served, "peak_batch": self.peak_batch, "loaded_adapters": list(self.pool.loaded)}

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.pending or self.commands or self.rows or self.stopping):
                    self.cond.wait(1.0)
                if self.stopping and not (self.pending or self.commands or self.rows):
                    return
                commands = list(self.commands)
                self.commands.clear()
            for fn, future in commands:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller, never kills the engine
                        future.set_exception(e)
            try:
                admitted = self._admit()
                if self.rows:
                    self._step()
                elif self.pending and not admitted:
                    time.sleep(0.01)  # waiting for an adapter slot: rows in other threads will free one
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                log.exception("decode step failed")
                for row in self.rows:
                    self._fail(row.req, e)
                self.rows, self.batch = [], BatchCache()

    def _admit(self) -> int:
        """Prefills waiting requests (in arrival order) while the batch has room; returns how many joined."""
        joined, skipped = 0, []
        while len(self.rows) < self.max_batch:
            with self.cond:
                if not self.pending:
                    break
                req = self.pending.popleft()
            if req.cancelled:
                continue
            try:
                self.pool.acquire(req.adapter)
            except AdapterBusy:
                skipped.append(req)
                continue
            except Exception as e:  # noqa: BLE001 - e.g. an adapter folder that no longer loads
                self._fail(req, e)
                continue
            try:
                self._prefill(req)
                joined += 1
            except Exception as e:  # noqa: BLE001
                self.pool.release(req.adapter)
                self._fail(req, e)
        if skipped:
            with self.cond:
                self.pending.extendleft(reversed(skipped))
        return joined

    def _forward(self, names: list[str], cache, **kw):
        kw[self.cache_kw] = cache  # updated in place: the batch keeps its own reference
        if self.pool.ever_loaded:
            kw["adapter_names"] = names
        with torch.no_grad():
            return self.model(use_cache=True, logits_to_keep=1, **kw)

    def _prefill(self, req: Request) -> None:
        from transformers import DynamicCache

        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        out = self._forward([req.adapter or BASE], cache, input_ids=ids)
        row = _Row(req, Sampler(req.params), TextStream(self.tokenizer, req.params.stop), position=ids.shape[1])
        if self._advance(row, row.sampler(out.logits[0, -1])):
            self.pool.release(req.adapter)
            return
        self.batch.join(cache, torch.ones(1, ids.shape[1], dtype=torch.long, device=self.device))
        self.rows.append(row)

    def _step(self) -> None:
        gone = [i for i, r in enumerate(self.rows) if r.req.cancelled]
        if gone:
            self._drop(gone)
            if not self.rows:
                return
        self.peak_batch = max(self.peak_batch, len(self.rows))
        mask = self.batch.grow()
        ids = torch.tensor([[r.last] for r in self.rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.position] for r in self.rows], dtype=torch.long, device=self.device)
        out = self._forward([r.req.adapter or BASE for r in self.rows], self.batch.cache, input_ids=ids,
                            attention_mask=mask, position_ids=pos)
        self.steps += 1
        logits = out.logits[:, -1]
        greedy = logits.argmax(-1).tolist()  # one call for every greedy row
        for r in self.rows:
            r.position += 1
        done = [i for i, r in enumerate(self.rows)
                if self._advance(r, greedy[i] if r.sampler.greedy else r.sampler(logits[i]))]
        if done:
            self._drop(done)

    def _drop(self, indices: list[int]) -> None:
        leaving = set(indices)
        for i in indices:
            self.pool.release(self.rows[i].req.adapter)
        keep = [i for i in range(len(self.rows)) if i not in leaving]
        self.batch.keep(keep)
        self.rows = [self.rows[i] for i in keep]

    def _advance(self, row: _Row, token: int) -> bool:
        """Takes the row's next token and sends its text; returns True when the request is finished."""
        req = row.req
        req.completion_tokens += 1
        row.last = token
        reason, stopped = None, False
        if token in self.eos:
            reason = "stop"
        else:
            delta, stopped = row.stream.push(token)
            self._emit(req, "text", delta)
            if stopped:
                reason = "stop"
        if reason is None and (req.completion_tokens >= req.params.max_tokens
                               or (self.context_length and row.position + 1 >= self.context_length)):
            reason = "length"
        if reason is None:
            return False
        if not stopped:
            self._emit(req, "text", row.stream.finish())
        self.served += 1
        self._emit(req, "done", {"finish_reason": reason, "prompt_tokens": len(req.prompt_ids),
                                 "completion_tokens": req.completion_tokens})
        return True

    def _emit(self, req: Request, kind: str, data) -> None:
        if kind == "text" and not data:
            return
        try:
            req.on_event(kind, data)
        except Exception:  # noqa: BLE001 - a broken callback must not stop the engine
            log.exception("event callback failed")
            req.cancelled = True

    def _fail(self, req: Request, error: Exception) -> None:
        self._emit(req, "error", error)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
