"""Answers encoded when they are made, and sent as they are.

Litestar's own `Response` keeps its content until the route returns, then builds a header
dict, a cookie list and an `ASGIResponse` (with headers parsed again) for every answer:
on a hold refused `sold_out` by the process itself that was a fifth of the request's CPU
(measured in-process: docs/benchmarks.md). An `Answer` is a `Response` to Litestar (a
route still declares `Response[schemas.Hold]`, and the OpenAPI schema is generated from
it), but its body is encoded once, by msgspec, when it is made, and `to_asgi_response`
returns the answer itself: two ASGI messages and nothing else. Hooks that act on the
messages (`before_send`, the metrics middleware) see them as they would any other.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import msgspec
from litestar import Response
from litestar.types import HTTPResponseStartEvent, Receive, Scope, Send

from service.web import bodies

T = TypeVar("T")

JSON = b"application/json"
PROBLEM_JSON = b"application/problem+json"

_encode = msgspec.json.Encoder().encode


class Answer(Response[T]):
    __slots__ = ("body", "extra", "media")

    def __init__(
        self,
        content: T,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        media_type: bytes = JSON,
    ) -> None:
        # Response's slots that Litestar reads of a returned response; nothing else is.
        self.content = content
        self.status_code = status_code
        self.background = None
        self.body = _encode(content)
        self.media = media_type
        self.extra = headers  # beside Content-Type and Content-Length

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers as an ASGI message carries them."""
        raw = [(b"content-type", self.media), (b"content-length", b"%d" % len(self.body))]
        if self.extra:
            raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.extra.items()]
        return raw

    def text_headers(self) -> list[tuple[str, str]]:
        """The same headers as RSGI takes them (the lean lane's answers on RSGI)."""
        text = [("content-type", self.media.decode()), ("content-length", str(len(self.body)))]
        if self.extra:
            text += self.extra.items()
        return text

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        return self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": self.status_code or 200,
            "headers": self.raw_headers,
        }
        await send(start)
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


# A refused body is read and thrown away up to this much before the 413 goes out.
_DRAIN_BYTES = 1024 * 1024
_DRAIN_WAIT = 0.25


class DrainFirst(Answer[T]):
    """An answer sent once what the client is still sending of a refused body is read.
    The server closes the connection after a 413; closing a socket with unread bytes in
    it makes the kernel reset the connection, and the reset can destroy the 413 before
    the client reads it."""

    __slots__ = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        left = _DRAIN_BYTES
        while left > 0:
            try:
                message = await asyncio.wait_for(receive(), _DRAIN_WAIT)
            except TimeoutError:  # nothing more is coming (or the client stalls): answer now
                break
            except bodies.ClientGone:  # nobody left to answer: the send goes nowhere
                break
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
            left -= len(message.get("body", b""))
        await super().__call__(scope, receive, send)
