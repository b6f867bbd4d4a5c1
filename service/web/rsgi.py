"""The app on granian's RSGI interface (`BOXOFFICE_INTERFACE=rsgi`, the default).

On ASGI every request costs granian two or three Rust futures (the body's `receive`, the
answer's two `send`s), each a wake-up of the event loop from granian's own threads: about
8-10 us of CPU a request more than RSGI, where the body is one awaitable and the answer
one plain call (`protocol.response_bytes`), and a request without a body awaits nothing
of granian's at all (loadtest/bare.py, bench rows bare_asgi and bare_rsgi).

The app itself stays an ASGI app (service/web/app.py: the lean lane in front of Litestar,
inside the metrics and the body deadlines). A request the lean lane takes (a hold, a
confirm, a poll: service/web/lane.py) is served straight from the protocol: the lane's
own checks and route work, the same body deadline and metrics, one `response_bytes`
(RSGIApp.lean). Any other is handed to the ASGI app with the scope granian's ASGI side
would have built (service/web/rsgiscope.py), a `receive` that reads the body from the
protocol and a `send` that turns the answer's messages into the protocol's response
calls. So every answer is the one the ASGI interface gives, byte for byte: the same code
makes it (tests/test_rsgi.py compares both servers' answers).

The app's lifespan (the process's connections, the metrics flusher) is run from RSGI's
`__rsgi_init__` and `__rsgi_del__` hooks, as granian runs an ASGI app's: started before
the process takes a connection, a failed start-up ends the process (exit status 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import Any, cast

from granian._granian import RSGIHTTPProtocol as HTTPProtocol
from granian._granian import RSGIProtocolClosed as ProtocolClosed
from granian.rsgi import Scope
from litestar.types import ASGIApp

from service.core import errors
from service.core.settings import Settings
from service.web import problems
from service.web.answers import Answer
from service.web.app import App, create_app
from service.web.lane import (
    CLIENT_GONE_BODY,
    CLIENT_GONE_HEADERS,
    Call,
    HandBack,
    Lane,
    Route,
    text_head,
)
from service.web.problems import CLIENT_GONE
from service.web.rsgiscope import asgi_scope, has_body_of_size, text_headers, text_pairs

granian_log = logging.getLogger("_granian")  # granian.log.logger

_DISCONNECT = {"type": "http.disconnect"}
_CLIENT_GONE_HEADERS = text_pairs(CLIENT_GONE_HEADERS)
_EVENT_STREAM = b"text/event-stream"


class Exchange:
    """One request's `receive` and `send`, for the ASGI app, on the RSGI protocol.

    The body: read whole with one `await protocol()` when its declared length is within
    the app's limit (a hold's, a join's), else as it comes (chunked, or over the limit:
    the app reads what its limit allows and refuses the rest, as on ASGI). After the body,
    `receive` waits for the client to leave, as granian's ASGI `receive` does.

    The answer: one `response_bytes` for an answer in one message; a stream for one in
    several (or for `text/event-stream`, started with its head as granian's ASGI side
    starts it)."""

    __slots__ = ("body", "head", "out", "parts", "protocol", "read", "whole")

    def __init__(self, protocol: HTTPProtocol, whole: bool, body: bytes | None = None) -> None:
        self.protocol = protocol
        self.whole = whole
        self.body = body  # the body, when read already (by the lane)
        self.read = False  # the body has been read to its end
        self.parts: Any = None  # the body's iterator, when read as it comes
        self.head: Any = None  # the answer's http.response.start
        self.out: Any = None  # the transport of an answer sent in parts

    async def receive(self) -> Any:
        if self.read:
            await self.protocol.client_disconnect()
            return _DISCONNECT
        if not self.whole:
            return await self._part()
        self.read = True
        body = self.body
        if body is None:
            try:
                body = await self.protocol()
            except ProtocolClosed:  # the client left mid-body
                return _DISCONNECT
        return {"type": "http.request", "body": body, "more_body": False}

    async def _part(self) -> Any:
        """The next part of a body read as it comes (granian's async iterator gives a
        part, or b"" at the end; at an error b"" too, but then once more b"" where the
        end of a whole body stops the iteration)."""
        if self.parts is None:
            self.parts = self.protocol.__aiter__()
        chunk = await self.parts.__anext__()
        if chunk:
            return {"type": "http.request", "body": chunk, "more_body": True}
        self.read = True
        try:
            await self.parts.__anext__()
        except StopAsyncIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
        return _DISCONNECT  # the body broke off: the client left

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.head = message
            if _streamed(message["headers"]):
                self._start_stream()
        elif kind == "http.response.body":
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.out is None:
                if not more:
                    head = self.head
                    self.protocol.response_bytes(head["status"], text_headers(head), body)
                    return
                self._start_stream()
            if body:
                # The client gone: ignored, as granian's ASGI send ignores it (the app
                # learns it from `receive`).
                with contextlib.suppress(ProtocolClosed):
                    await self.out.send_bytes(body)
            if not more:
                self.out = None  # the transport dropped: the answer ends
        elif kind == "http.response.pathsend":
            head = self.head
            self.protocol.response_file(head["status"], text_headers(head), message["path"])

    def _start_stream(self) -> None:
        head = self.head
        self.out = self.protocol.response_stream(head["status"], text_headers(head))


def _streamed(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(_EVENT_STREAM)
    return False


class Lifespan:
    """The ASGI app's lifespan, run as granian runs an ASGI app's: in a task of its own
    (Litestar's start-up enters contexts that must be left by the task that entered them),
    told to start, then later to stop."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.state: dict[str, Any] = {}
        self.task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        """Raises RuntimeError with the app's words when it fails to start."""
        scope: dict[str, Any] = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
        }
        scope["state"] = self.state
        self.task = asyncio.get_running_loop().create_task(
            self.app(scope, self.inbox.get, self.outbox.put)
        )
        await self.inbox.put({"type": "lifespan.startup"})
        await self._answer("lifespan.startup.complete")

    async def shutdown(self) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self._answer("lifespan.shutdown.complete")

    async def _answer(self, expected: str) -> None:
        assert self.task is not None
        got = asyncio.ensure_future(self.outbox.get())
        await asyncio.wait((got, self.task), return_when=asyncio.FIRST_COMPLETED)
        if not got.done():
            got.cancel()
            exc = None if self.task.cancelled() else self.task.exception()
            raise RuntimeError(f"the app's lifespan ended before {expected}") from exc
        message = got.result()
        if message["type"] != expected:
            raise RuntimeError(message.get("message") or message["type"])


class RSGIApp:
    """The service's RSGI application (granian: `__rsgi__`, `__rsgi_init__`, `__rsgi_del__`)
    around its ASGI app (service/web/app.py's `create_app`)."""

    def __init__(self, app: App, settings: Settings) -> None:
        self.app = app
        # The lean lane when on (the app's __call__ would send an HTTP request there): one
        # call fewer per request.
        self.handler: Any = app.lean or app
        self.lane = app.hot_lane
        self.limit = settings.max_body_bytes
        self.lifespan = Lifespan(app)

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Before the process takes a connection, on its loop (not running yet)."""
        try:
            loop.run_until_complete(self.lifespan.startup())
        except Exception as e:
            # What granian does for an ASGI app whose lifespan start-up fails, on granian's
            # logger: the app's own logging may queue the line for a thread that the
            # process's exit never lets write it.
            granian_log.error("RSGI app start-up failed: %s", e)
            sys.exit(1)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        """After the process stopped serving."""
        try:
            loop.run_until_complete(self.lifespan.shutdown())
        except Exception as e:
            granian_log.error("RSGI app shutdown failed: %s", e)

    async def __rsgi__(self, scope: Scope, protocol: HTTPProtocol) -> None:
        if scope.proto != "http":
            # A websocket: the service has none. Refused before the handshake, as
            # Litestar refuses it on ASGI (403, no body).
            protocol.close(403)  # type: ignore[attr-defined]  # RSGIWebsocketProtocol
            return
        asgi = asgi_scope(scope, self.lifespan.state)
        found = None if self.lane is None else self.lane.accept(asgi)
        if found is not None:
            await self.lean(asgi, protocol, *found)
            return
        exchange = Exchange(protocol, has_body_of_size(asgi["headers"], self.limit))
        await self.handler(asgi, exchange.receive, exchange.send)

    async def lean(
        self, scope: Any, protocol: HTTPProtocol, route: Route, params: list[str], has_body: bool
    ) -> None:
        """A request the lane takes, served straight from the protocol: what the ASGI
        side does (the metrics, the body's deadline, the lane: service/web/app.py) without
        its messages, wrappers and sends (a sixth of a hold's CPU on the loop's thread).
        A body that Litestar must answer is handed to Litestar (inside the same metrics
        and deadlines, app.App.handed), read already."""
        lane, app = cast(Lane, self.lane), self.app
        started = time.perf_counter()
        status = 500
        try:
            raw = None
            answer: Answer[Any] | HandBack | None = None
            if has_body:
                deadlines = app.deadlines
                task = deadlines.arm()
                try:
                    raw = await protocol()
                except ProtocolClosed:  # the client left mid-body: nobody to answer
                    status = CLIENT_GONE
                    protocol.response_bytes(status, _CLIENT_GONE_HEADERS, CLIENT_GONE_BODY)
                    return
                except asyncio.CancelledError:
                    if not deadlines.timed_out(task):
                        raise
                    late = errors.RequestTimeout(deadlines.error)
                    answer = problems.problem(Call(app, scope, b""), late)
                finally:
                    deadlines.ended(task)
            if answer is None:
                answer = await lane.answer(route, params, scope, raw)
            if isinstance(answer, HandBack):
                status = 0  # counted by the ASGI side
                exchange = Exchange(protocol, True, raw)
                await cast(ASGIApp, app.handed)(scope, exchange.receive, exchange.send)
                return
            status, headers, body = text_head(scope, answer, route.status)
            protocol.response_bytes(status, headers, body)
        finally:
            if status:
                app.stats.finish(scope, status, started)


def create_rsgi_app(settings: Settings) -> RSGIApp:
    return RSGIApp(cast(App, create_app(settings)), settings)


def create_rsgi_from_env() -> RSGIApp:
    """Entry point for granian's RSGI workers: each builds its own app and connections."""
    return create_rsgi_app(Settings.from_env())
