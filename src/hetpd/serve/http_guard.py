"""HTTP limits in front of the API: what one connection or request may cost before it is refused.

``hetpd serve`` runs the API on uvicorn with h11, which on its own lets a client hold a
connection forever by sending half a request head (slowloris: h11 has no header timeout),
trickle a body forever, or send a body of any size. Here:

* :class:`HeadTimeoutProtocol`: a connection that has not sent a complete request head within
  ``header_timeout_s`` of connecting (or of its previous response) is closed.
* :class:`RequestGuard` (ASGI, in front of the app): the API key, compared in constant time;
  a body over ``max_body_bytes`` is refused with 413 (by its Content-Length before any of it
  is read, or counted as it streams in); a body not complete within ``body_timeout_s`` of its
  head with 408. The body is read whole before the app sees the request, so the app never
  waits on a slow client.
* the JSON shape: the app parses a body on the event loop (json.loads, then pydantic), holding
  the GIL throughout, and parsing cost grows with the number of arrays and objects, not bytes:
  16 MB of ``[[]],`` took 2.5 s here, a freeze for every client. A request needs a few
  thousand of them at most (messages, content parts) and at most a context of token ids, so a
  larger body with more (:data:`MAX_JSON_CONTAINERS`, :data:`MAX_JSON_VALUES`) is refused
  with 413 before it is parsed, by a scan that runs in a thread in short steps
  (:func:`json_shape_problem`).
* :func:`server_config`: uvicorn with both, a bounded request head and a keep-alive timeout.

Refusals are OpenAI error bodies and close the connection: what is left of a refused body is
never read, and a client cannot keep the connection by trickling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import re
import time
from typing import ClassVar

import h11
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from hetpd.serve.deploy import RouterConfig
from hetpd.serve.openai_protocol import error_body

# At most this many JSON arrays and objects (2048 messages with content parts fit easily), and
# this many values (a token-id prompt of a 256k context), in a body the app will parse.
MAX_JSON_CONTAINERS = 16_384
MAX_JSON_VALUES = 262_144
# A body smaller than this parses within ~10 ms whatever its shape: not scanned.
SCAN_ABOVE_BYTES = 64 * 1024
# The scan's steps: a run outside strings, or a run inside one (escapes included), each at
# most 256 KiB, so no single regex call holds the GIL for more than a millisecond or two.
_OUTSIDE_STRING = re.compile(rb'[^"\[{,]{1,65536}')
_INSIDE_STRING = re.compile(rb'(?:[^"\\]{1,256}|\\.){1,1024}', re.DOTALL)
# Request line plus headers, in bytes (h11's default, stated): a larger head is refused with 400.
MAX_HEAD_BYTES = 16 * 1024
# An idle keep-alive connection is closed after this (uvicorn's default), or the header timeout if shorter.
KEEP_ALIVE_S = 5.0


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a timer on the request head.

    Armed when the connection opens and after each response; disarmed when a complete head
    arrives (h11 then leaves IDLE for the client's side). When it fires with the client's side
    still IDLE, the connection is closed: bytes of a partial head do not keep it open, unlike
    uvicorn's keep-alive timer, which any byte received cancels."""

    header_timeout_s: ClassVar[float] = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a complete head arrived (or the connection is ending)
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may take a pipelined request's head already buffered
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()


def json_shape_problem(body: bytes) -> str | None:
    """Why ``body`` has too much structure to parse on the event loop, or None.

    Counts the arrays and objects (``[``, ``{``) and the values (``,``) outside strings, and
    stops at the first limit passed. It does not check that ``body`` is JSON: the parser will.
    Pure Python over C regex steps, so in a thread it lets the event loop run."""
    position, end, in_string = 0, len(body), False
    containers = values = 0
    while position < end:
        run = (_INSIDE_STRING if in_string else _OUTSIDE_STRING).match(body, position)
        if run is not None:
            position = run.end()
            continue
        byte = body[position]
        position += 1
        if byte == 0x22:  # '"'
            in_string = not in_string
        elif in_string:
            continue  # a backslash ending the body: invalid JSON, the parser's to refuse
        elif byte == 0x2C:  # ','
            values += 1
            if values > MAX_JSON_VALUES:
                return f"more than {MAX_JSON_VALUES} JSON values"
        else:  # '[' or '{'
            containers += 1
            if containers > MAX_JSON_CONTAINERS:
                return f"more than {MAX_JSON_CONTAINERS} JSON arrays and objects"
    return None


class _Refusal(Exception):
    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


async def refuse(send: Send, status: int, message: str, kind: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send an OpenAI error body with ``status`` and close the connection after it."""
    # ensure_ascii: a message quoting client input stays encodable whatever the input held
    body = json.dumps(error_body(message, kind, code=status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestGuard:
    """ASGI middleware: arrival time, API key, body size, body time, JSON shape (see the module's doc)."""

    def __init__(self, app: ASGIApp, limits: RouterConfig, api_key: str | None) -> None:
        self.app = app
        self.limits = limits
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    def needs_key(self, path: str) -> bool:
        """/v1/* and, unless ``metrics_public``, /metrics; /health stays public for probes."""
        metrics = path == "/metrics" or path.startswith("/metrics/")
        return path.startswith("/v1/") or (metrics and not self.limits.metrics_public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # A request's trace starts when its head reached us, not when its body or parsing finished.
        scope.setdefault("state", {})["arrived"] = time.time()
        headers = dict(scope["headers"])  # names are lower case (ASGI); the first value of a repeated one wins
        if self.expected is not None and self.needs_key(scope["path"]):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no timing oracle on the key
                await refuse(send, 401, "invalid or missing API key (Authorization: Bearer ...)",
                             "authentication_error", [(b"www-authenticate", b"Bearer")])
                return
        try:
            body = await self._read_body(headers.get(b"content-length"), receive)
        except _Refusal as refusal:
            await refuse(send, refusal.status, refusal.message, refusal.kind)
            return
        if body is None:
            return  # the client went away before its body was complete: nobody to answer
        if len(body) > SCAN_ABOVE_BYTES and (problem := await asyncio.to_thread(json_shape_problem, body)):
            await refuse(send, 413, f"request body has {problem}: more than any request needs", "request_too_large")
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, content_length: bytes | None, receive: Receive) -> bytes | None:
        limit = self.limits.max_body_bytes
        too_large = _Refusal(413, f"request body over the limit of {limit} bytes", "request_too_large")
        if content_length is not None and int(content_length) > limit:  # h11 checked it is a number
            raise too_large
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk: bytes = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:  # chunked bodies have no Content-Length: count what arrives
                        raise too_large
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise _Refusal(408, f"request body not complete within {self.limits.body_timeout_s:g} s "
                                f"({size} bytes arrived)", "request_timeout") from None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The app's receive: the whole body at once, then the connection's own (for disconnects)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def install(app: FastAPI, limits: RouterConfig, api_key: str | None) -> None:
    """Put :class:`RequestGuard` in front of ``app`` (outermost of its middleware)."""
    app.add_middleware(RequestGuard, limits=limits, api_key=api_key)


def server_config(app: FastAPI, router: RouterConfig, port: int) -> uvicorn.Config:
    """The uvicorn configuration ``hetpd serve`` runs ``app`` with on ``router.host:port``."""
    protocol = type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"header_timeout_s": router.header_timeout_s})
    return uvicorn.Config(app, host=router.host, port=port, log_level="warning", http=protocol,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                          timeout_keep_alive=max(1, math.ceil(min(KEEP_ALIVE_S, router.header_timeout_s))))
