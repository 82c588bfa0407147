"""ASGI middleware in front of every route: the Bearer token check and the request-body size limit.

Both answer in OpenAI's error shape before any handler runs. The token is compared with
hmac.compare_digest (constant time); /health stays open so that load balancers can probe it.
"""
from __future__ import annotations

import hmac
import json

from lorakit.serve.errors import error_body

OPEN_PATHS = ("/health",)


async def _send_error(send, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guards:
    """Rejects requests without the right Bearer token (when api_key is set) and bodies over max_body bytes."""

    def __init__(self, app, api_key: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope.get("path") not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return await _send_error(send, 401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                         "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
            if too_big:
                return await _send_error(send, 413, f"request body over {self.max_body} bytes", "body_too_large")
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # Read the (small) body here, so a chunked body without Content-Length meets the same limit.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_body:
                return await _send_error(send, 413, f"request body over {self.max_body} bytes", "body_too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
