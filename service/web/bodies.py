"""Request bodies against slow and vanishing clients, at the ASGI level.

The server's header timeout ends at the request head: a body trickled a few bytes a second
would hold its connection (and whatever waits on it) for as long as the client likes. Each
request with a body gets a deadline, set when the app is called and dropped with the body's
last part; a deadline that passes cancels the read, which becomes a 408 `request_timeout`
before anything was changed (handlers act only on a whole body). A client that closes its
connection mid-body raises ClientGone: its request ends there, with nobody to answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import litestar
from litestar.enums import ScopeType
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send
from litestar.types.empty import Empty

from service.core import errors
from service.hotpath.loops import KeptLoop


class ClientGone(Exception):
    """The client closed its connection before its body ended."""


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value != b"0"
        if name == b"transfer-encoding":
            return True
    return False


class Deadlines:
    """The bodies still arriving, by task, in the order they must end by (one timeout for
    all: the order they started). One timer ticks while any is pending and cancels the
    tasks past their deadline: per request a dictionary entry, not a timer of its own (a
    uvloop timer per request cost 8 us, a tenth of a whole hold)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.tick = min(0.5, timeout / 4)
        self.pending: dict[asyncio.Task[Any], float] = {}
        self.fired: set[asyncio.Task[Any]] = set()
        self.ticking = False
        # The words of a 408, made once.
        self.error = errors.RequestTimeout(
            f"the request body did not arrive within {timeout:g} seconds; nothing was changed"
        ).detail
        # Kept: asyncio.current_task() without its loop looks the loop up (a system call).
        self.loop = KeptLoop()

    def arm(self) -> asyncio.Task[Any]:
        """The current task given a deadline for its body (returned, to be ended())."""
        loop = self.loop.running()
        task = asyncio.current_task(loop)
        assert task is not None
        self.pending[task] = time.monotonic() + self.timeout
        if not self.ticking:
            self.ticking = True
            loop.call_later(self.tick, self.expire)
        return task

    def expire(self) -> None:
        now = time.monotonic()
        late = []
        for task, deadline in self.pending.items():
            if deadline > now:
                break
            late.append(task)
        for task in late:
            del self.pending[task]
            self.fired.add(task)
            task.cancel()
        self.ticking = bool(self.pending)
        if self.ticking:
            asyncio.get_running_loop().call_later(self.tick, self.expire)

    def timed_out(self, task: asyncio.Task[Any]) -> bool:
        """Whether the deadline (rather than anyone else) cancelled the task; then the task
        is itself again, no longer cancelled."""
        if task not in self.fired:
            return False
        self.fired.discard(task)
        return task.uncancel() == 0

    def ended(self, task: asyncio.Task[Any]) -> None:
        """The task's request is over: its deadline with it."""
        self.pending.pop(task, None)
        self.fired.discard(task)


def guard(deadlines: Deadlines) -> Callable[[ASGIApp], ASGIApp]:
    def wrap(app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or not _has_body(scope):
                await app(scope, receive, send)
                return
            task = deadlines.arm()

            async def receiving() -> ReceiveMessage:
                try:
                    message = await receive()
                except asyncio.CancelledError:
                    if deadlines.timed_out(task):
                        raise errors.RequestTimeout(deadlines.error) from None
                    raise
                if message["type"] == "http.disconnect":
                    deadlines.pending.pop(task, None)
                    raise ClientGone
                if not message.get("more_body", False):
                    deadlines.pending.pop(task, None)
                return message

            try:
                await app(scope, receiving, send)
            except asyncio.CancelledError:
                # Fired while the app was not reading (it never is, with a body unread):
                # the connection ends unanswered rather than the worker losing the task.
                if not deadlines.timed_out(task):
                    raise
            finally:
                deadlines.ended(task)

        return guarded

    return wrap


class Request(litestar.Request[Any, Any, Any]):
    """Litestar's Request, with a body that comes in one ASGI message (a hold's, a join's:
    any small body) taken as it is. Litestar reads every body through an async generator
    that joins its chunks, a tenth of a sold-out refusal's CPU; a body in several messages
    still goes that way, its first message handed back to it."""

    __slots__ = ()

    async def body(self) -> bytes:
        if self._body is not Empty or self._connection_state.body is not Empty:
            return await super().body()
        first = await self.receive()
        if first["type"] == "http.request" and not first.get("more_body", False):
            body = first.get("body", b"")
            limit = self.route_handler.resolve_request_max_body_size()
            if limit is not None and len(body) > limit:
                raise RequestEntityTooLarge
            self.is_connected = False
            self._body = self._connection_state.body = body
            return body
        rest = self.receive
        handed_back = False

        async def again() -> ReceiveMessage:
            nonlocal handed_back
            if handed_back:
                return await rest()
            handed_back = True
            return first

        self.receive = again
        return await super().body()
