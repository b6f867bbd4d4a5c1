"""Request bodies against slow and vanishing clients, at the ASGI level.

The server's header timeout ends at the request head: a body trickled a few bytes a second
would hold its connection (and whatever waits on it) for as long as the client likes. Each
request with a body gets one timer, armed when the app is called and disarmed by the body's
last part; a timer that fires cancels the read, which becomes a 408 `request_timeout`
before anything was changed (handlers act only on a whole body). A client that closes its
connection mid-body raises ClientGone: its request ends there, with nobody to answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

from service import errors


class ClientGone(Exception):
    """The client closed its connection before its body ended."""


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value != b"0"
        if name == b"transfer-encoding":
            return True
    return False


def guard(timeout: float) -> Callable[[ASGIApp], ASGIApp]:
    def wrap(app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or not _has_body(scope):
                await app(scope, receive, send)
                return
            task = asyncio.current_task()
            assert task is not None
            fired = False

            def expire() -> None:
                nonlocal fired
                fired = True
                task.cancel()

            timer = asyncio.get_running_loop().call_later(timeout, expire)

            async def receiving() -> ReceiveMessage:
                try:
                    message = await receive()
                except asyncio.CancelledError:
                    if not fired or task.uncancel():
                        raise
                    raise errors.RequestTimeout(
                        f"the request body did not arrive within {timeout:g} seconds; "
                        "nothing was changed"
                    ) from None
                if message["type"] == "http.disconnect":
                    timer.cancel()
                    raise ClientGone
                if not message.get("more_body", False):
                    timer.cancel()
                return message

            try:
                await app(scope, receiving, send)
            except asyncio.CancelledError:
                # Fired while the app was not reading (it never is, with a body unread):
                # the connection ends unanswered rather than the worker losing the task.
                if not fired or task.uncancel():
                    raise
            finally:
                timer.cancel()

        return guarded

    return wrap
