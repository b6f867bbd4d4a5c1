"""The door: what the app checks of every request before its route runs (the
per-address rate limits, a customer token, the body's size and media type), and the
rate limits' headers on every answer. The lean lane (service/web/lane.py) applies the
same checks, in the same order, with the pieces it shares from here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import MutableScopeHeaders
from litestar.types import Message, Scope

from service.core import errors
from service.hotpath import ratelimit
from service.web import customers
from service.web.asking import header
from service.web.strictjson import check_params

# Handlers that read their body; for the others the body is read only to apply the limit.
_BODY_METHODS = frozenset({"POST", "PATCH", "PUT"})

# Where rate_limit() leaves the per-address limit's headers for add_rate_headers() to
# send; present (empty at first) once the request has been counted.
_RATE_HEADERS_OF_SCOPE = "boxoffice.ratelimit"


def json_media_type(content_type: bytes) -> bool:
    media = content_type.partition(b";")[0].strip().lower()
    return media == b"application/json" or (b"/" in media and media.endswith(b"+json"))


async def rate_limit(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """The per-address limits (when set), once per request and before anything else about
    it: in the admin guard (which Litestar runs before the door), else in the door, so
    that a wrong admin or customer token is counted too. A refusal costs one Redis call."""
    limits: ratelimit.AddressLimits | None = getattr(connection.app.state, "limits", None)
    tickets = 1
    if (
        limits is not None
        and _RATE_HEADERS_OF_SCOPE not in connection.scope
        and isinstance(connection, Request)
        and limits.counts_tickets(connection.scope)
    ):
        tickets = await _tickets_asked(connection)
    await count_address(connection.scope, limits, tickets)


async def count_address(
    scope: Any, limits: ratelimit.AddressLimits | None, tickets: int = 1
) -> None:
    """rate_limit() of a scope: the lean lane's, and the door's (see rate_limit).
    `tickets`: what a hold asks for (the per-address ticket limit)."""
    if _RATE_HEADERS_OF_SCOPE in scope:
        return
    scope[_RATE_HEADERS_OF_SCOPE] = {}
    if limits is not None and limits.enabled:
        quotas = await limits.check(scope, tickets)
        scope[_RATE_HEADERS_OF_SCOPE] = ratelimit.merge(*(q.headers() for q in quotas))


class _Quantity(msgspec.Struct):
    quantity: int = 1


class _Asked(msgspec.Struct):
    items: list[_Quantity] = []
    seats: list[str] = []


_decode_asked = msgspec.json.Decoder(_Asked).decode


def tickets_in(body: bytes) -> int:
    """The tickets a hold's body asks for, for the per-address ticket limit: 1 when it
    cannot tell (not a hold: the route answers 400 itself, and nothing is held)."""
    try:
        asked = _decode_asked(body)
    except (msgspec.DecodeError, ValueError):
        return 1
    return max(1, sum(max(0, i.quantity) for i in asked.items) + len(asked.seats))


async def _tickets_asked(request: Request[Any, Any, Any]) -> int:
    """tickets_in() of a request's body; 1 for a body declared too large (the route
    answers 413). A chunked body is read too (Litestar's size limit applies): else a bot
    would send its holds chunked to have each counted as one."""
    declared = header(request, b"content-length")
    limit: int = request.app.state.svc.settings.max_body_bytes
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return 1
    try:
        return tickets_in(await request.body())
    except ValueError:
        return 1


async def add_rate_headers(message: Message, scope: Scope) -> None:
    """The per-address limit's RateLimit headers on whatever the route answers; beside
    the customer limit's on a hold (each field a list, one item per policy)."""
    put_rate_headers(message, scope)


def rate_headers_of(scope: Any) -> dict[str, str] | None:
    """The per-address limit's headers that a request's answer must carry."""
    found: dict[str, str] | None = scope.get(_RATE_HEADERS_OF_SCOPE)
    return found


def put_rate_headers(message: Any, scope: Any) -> None:
    """add_rate_headers(), for the lean lane's answers on RSGI (which are not sent as
    ASGI messages)."""
    found = rate_headers_of(scope)
    if not found or message["type"] != "http.response.start":
        return
    headers = MutableScopeHeaders(message)
    for name, value in found.items():
        given = headers.get(name)
        headers[name] = f"{value}, {given}" if given else value


async def door(request: Request[Any, Any, Any]) -> None:
    """The contract's rules for any request, whatever the route does with it: no NUL or
    unpaired surrogate in the path or query; a body over 64 KiB is 413 (Litestar applies
    its limit only to a body that is read), declared as anything but JSON is 415. A body
    without a Content-Type is taken for JSON. First of all, the per-address rate limits."""
    await rate_limit(request)
    await entry(request)


def body_head(scope: Any) -> tuple[bytes | None, bytes | None, bool]:
    """Content-Type, Content-Length and whether the body comes chunked (the door's and
    the lean lane's first look at a body)."""
    content_type = length = None
    chunked = False
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value
        elif name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            chunked = True
    return content_type, length, chunked


async def entry(request: Request[Any, Any, Any]) -> None:
    """The door's checks of the request itself (see door)."""
    await check_params(request)
    content_type, declared, chunked = body_head(request.scope)
    if declared in (None, b"0") and not chunked:
        return
    if content_type is not None and not json_media_type(content_type):
        await request.body()  # 413 first when it is both; and nothing left unread
        media = content_type.decode("latin-1").partition(";")[0].strip()
        raise errors.UnsupportedMediaType(
            f"the body must be JSON (Content-Type: application/json), not {media!r}"
        )
    if request.method not in _BODY_METHODS:
        await request.body()  # raises 413 past the limit


def customer_door(
    verifier: customers.Verifier,
) -> Callable[[Request[Any, Any, Any]], Awaitable[None]]:
    """The door of an app with customer tokens on: after the per-address limit (a flood of
    bad tokens meets it like any other), a customer route's token is verified (401 before
    anything about the request itself), once, its customer kept for the handler. Routes
    not marked `opt=customers.ROUTE` pay nothing more."""

    async def checked(request: Request[Any, Any, Any]) -> None:
        await rate_limit(request)
        if customers.is_customer_route(request.route_handler.opt):
            verifier.check(request.scope)
        await entry(request)

    return checked
