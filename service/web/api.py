"""The HTTP API: routes, the admin guard, and the one handler that maps errors to problems."""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol

import msgspec
from litestar import Litestar, Request, Response, Router, delete, get, patch, post
from litestar.connection import ASGIConnection
from litestar.datastructures import MutableScopeHeaders, ResponseHeader
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import BaseRouteHandler, HTTPRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPIFormat,
    OpenAPIHeader,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.openapi.spec import Parameter as OpenAPIParameter
from litestar.params import FromPath, FromQuery, JSONBody, Parameter
from litestar.response import ServerSentEvent
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import (
    ASGIApp,
    LifeSpanReceive,
    LifeSpanScope,
    LifeSpanSend,
    Message,
    Receive,
    Scope,
    Send,
)
from litestar.utils import normalize_path

from service.core import errors, schemas
from service.core.settings import Settings
from service.durable import archive, deadletters, findings, reconcile
from service.hotpath import ratelimit
from service.hotpath.context import Services
from service.hotpath.scripts import Idempotency
from service.selling import bookings, catalog, idempotency, sales, waitingroom
from service.web import answers, bodies, customers, dashboard, docsui, livefeed, metrics, started
from service.web.answers import Answer, DrainFirst
from service.web.strictjson import StrictJSON, check_params, plain

log = logging.getLogger("boxoffice.api")

PROBLEM_JSON = answers.PROBLEM_JSON.decode()
_EVENT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")

TicketParam = Annotated[str, Parameter(description="`ticket` of the QueueTicket.")]
EventIdParam = Annotated[
    str, Parameter(description="Event id, `^[a-z0-9][a-z0-9-]{0,63}$`; any other is 404.")
]


class Asking(Protocol):
    """What the hot routes' code reads of a request: Litestar's Request, or the lean
    lane's (service/web/lane.py), which serves those routes without Litestar."""

    @property
    def scope(self) -> Any: ...
    @property
    def app(self) -> Litestar: ...
    @property
    def method(self) -> str: ...
    @property
    def url(self) -> Any: ...
    async def body(self) -> bytes: ...


# --- errors ---------------------------------------------------------------------------


def problem(
    request: Asking,
    exc: errors.BoxofficeError,
    answer: type[Answer[Any]] = Answer,
) -> Answer[Any]:
    """The problem document of `exc` (typed Any: a route answers it in place of its own)."""
    metrics.note_refusal(request.scope, exc.code)
    return answer(exc.problem(), exc.status, exc.headers, answers.PROBLEM_JSON)


_HTTP_ERRORS: dict[int, type[errors.BoxofficeError]] = {
    400: errors.ValidationError,
    401: errors.Unauthorized,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
}


def on_domain_error(request: Request[Any, Any, Any], exc: errors.BoxofficeError) -> Response[Any]:
    return problem(request, exc)


def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own errors (routing, parameters, body size) in the same problem shape."""
    cls = _HTTP_ERRORS.get(exc.status_code)
    if cls is None:
        return on_crash(request, exc)
    extra: dict[str, Any] = {}
    detail = None
    allow = (exc.headers or {}).get("allow")
    if isinstance(exc, ValidationException):
        detail, extra = _validation(exc)
    elif cls is errors.NotFound:
        detail = f"no route for {request.method} {request.url.path}"
    elif cls is errors.MethodNotAllowed:
        detail = f"{request.method} is not allowed here; allowed: {allow}"
    elif cls is errors.PayloadTooLarge:
        detail = f"the body is over the limit of {_svc(request).settings.max_body_bytes} bytes"
    err = cls(detail, **extra)
    if allow:
        err.headers = {"allow": allow}
        _note_route(request, allow)
    if cls is errors.PayloadTooLarge:
        # Whatever of the body the drain leaves unread (past 1 MiB, or from a client that
        # stalls) stays in the connection: it cannot carry another request.
        err.headers = {"connection": "close"}
        return problem(request, err, DrainFirst)
    return problem(request, err)


def _validation(exc: ValidationException) -> tuple[str, dict[str, Any]]:
    """Litestar's parameter errors in plain words: which parameter, what it must be;
    never its internals (`ParamType.QUERY`, the regex, the message of a parser)."""
    if not isinstance(exc.extra, list) or not exc.extra:
        return "invalid request", {}
    where: list[dict[str, str]] = []
    for e in exc.extra:
        source = str(e.get("source", "")).rpartition(".")[2].lower() or "request"
        if e.get("key") == "data":  # the handler's name for the body
            return "a JSON body is required", {}
        where.append(
            {
                "key": str(e.get("key")),
                "source": source,
                "message": plain(str(e.get("message")), ""),
            }
        )
    first = where[0]
    return f"{first['source']} parameter `{first['key']}`: {first['message']}", {"errors": where}


def _note_route(request: Request[Any, Any, Any], allow: str) -> None:
    """A 405's route exists: the router, asked again with a method it has, names its
    template for the metrics (it sets the template only for a route it runs)."""
    method = allow.split(",", 1)[0].strip()
    route = request.app.asgi_router.handle_routing(normalize_path(request.scope["path"]), method)
    request.scope["path_template"] = route[4]


# Status of a request whose client left before its body ended: nothing is sent (nginx's
# "client closed request"); /metrics counts it under this status, not as a 500.
CLIENT_GONE = 499


def on_client_gone(request: Request[Any, Any, Any], exc: bodies.ClientGone) -> Response[Any]:
    log.info("%s %s: the client left before its body ended", request.method, request.url.path)
    return Response(None, status_code=CLIENT_GONE)


def on_crash(request: Asking, exc: Exception) -> Response[Any]:
    # Driver errors that escaped the boundary mean Redis or PostgreSQL is unreachable.
    if errors.unavailable(exc):
        log.warning("backend unavailable: %r", exc)
        server = errors.server_of(exc) or "Redis or PostgreSQL"
        return problem(request, errors.Unavailable(f"{server} is unreachable; try again"))
    log.exception("unhandled error")
    return problem(request, errors.BoxofficeError("unexpected error; nothing was changed"))


# What any route may answer: no such route or method, a body too large or not JSON, a
# per-address rate limit, a bug.
_ANY_ROUTE = (
    errors.RateLimited,
    errors.NotFound,
    errors.MethodNotAllowed,
    errors.PayloadTooLarge,
    errors.UnsupportedMediaType,
    errors.BoxofficeError,
)


def _problems(
    *classes: type[errors.BoxofficeError], backends: bool = True
) -> dict[int, ResponseSpec]:
    by_status: dict[int, list[str]] = {}
    # A route that reads Redis or PostgreSQL may find one away (503); every one of them
    # takes parameters or a body that may be invalid (400).
    usual = (errors.ValidationError, errors.Unavailable) if backends else ()
    for cls in sorted((*classes, *usual, *_ANY_ROUTE), key=lambda c: c is errors.NotFound):
        by_status.setdefault(cls.status, []).append(f"`{cls.code}`")
    return {
        status: ResponseSpec(
            data_container=schemas.Problem,
            description="Problem details; code " + " or ".join(dict.fromkeys(codes)),
            media_type=PROBLEM_JSON,
            generate_examples=False,
        )
        for status, codes in sorted(by_status.items())
    }


def _location(template: str) -> ResponseHeader:
    return ResponseHeader(
        name="Location", description=f"The new resource: `{template}`", documentation_only=True
    )


# --- helpers ----------------------------------------------------------------------------


def _svc(request: Asking) -> Services:
    svc: Services = request.app.state.svc
    return svc


def _event(event_id: str) -> str:
    # A malformed id names no event: 404, and it never reaches a Redis key.
    if not _EVENT_ID.fullmatch(event_id):
        raise errors.EventNotFound(f"no event {event_id!r}")
    return event_id


def _known(svc: Services, event_id: str) -> str:
    """_event, and 404 at once, without a Redis call, for an id that no event has: the
    public routes, which a flood of made-up ids may hit (service/hotpath/eventids.py)."""
    if svc.event_ids.surely_unknown(_event(event_id)):
        raise errors.EventNotFound(f"no event {event_id!r}")
    return event_id


def _header(request: Asking, name: bytes) -> str | None:
    """A request header of the hot routes, found without Litestar's Headers (built per
    request, a twentieth of a hold's CPU). These headers are documented by document()."""
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def _idempotency(request: Asking) -> Idempotency | None:
    key = _header(request, b"idempotency-key")
    if key is None:
        return None
    return idempotency.fingerprint(
        key, request.method, request.url.path, await request.body(), customers.of(request)
    )


# Handlers that read their body; for the others the body is read only to apply the limit.
_BODY_METHODS = frozenset({"POST", "PATCH", "PUT"})


def json_media_type(content_type: bytes) -> bool:
    media = content_type.partition(b";")[0].strip().lower()
    return media == b"application/json" or (b"/" in media and media.endswith(b"+json"))


# Where rate_limit() leaves the per-address limit's headers for add_rate_headers() to
# send; present (empty at first) once the request has been counted.
_RATE_HEADERS_OF_SCOPE = "boxoffice.ratelimit"


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
    declared = _header(request, b"content-length")
    limit = _svc(request).settings.max_body_bytes
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return 1
    try:
        return tickets_in(await request.body())
    except ValueError:
        return 1


async def add_rate_headers(message: Message, scope: Scope) -> None:
    """The per-address limit's RateLimit headers on whatever the route answers; beside
    the customer limit's on a hold (each field a list, one item per policy)."""
    found: dict[str, str] | None = scope.get(_RATE_HEADERS_OF_SCOPE)  # type: ignore[assignment]
    if not found or message["type"] != "http.response.start":
        return
    headers = MutableScopeHeaders(message)
    for name, value in found.items():
        given = headers.get(name)
        headers[name] = f"{value}, {given}" if given else value


def sending_rate_headers(send: Send, scope: Any) -> Send:
    """`send`, adding the per-address limit's headers as add_rate_headers does: for the
    lean lane, whose answers do not pass Litestar's before_send."""

    async def sending(message: Message) -> None:
        await add_rate_headers(message, scope)
        await send(message)

    return sending


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


async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    await rate_limit(connection)  # before the token: guessing one is counted
    token: str = connection.app.state.svc.settings.admin_token
    scheme, _sep, given = connection.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not tell how much of the token was right.
    if (
        not token
        or scheme.lower() != "bearer"
        or not hmac.compare_digest(given.strip().encode(), token.encode())
    ):
        raise errors.Unauthorized("a valid `Authorization: Bearer <token>` is required")


# --- public routes ------------------------------------------------------------------------


@get("/events", tags=["events"], responses=_problems())
async def list_events(request: Request[Any, Any, Any]) -> schemas.EventList:
    return await catalog.list_events(_svc(request))


@get("/events/{event_id:str}", tags=["events"], responses=_problems(errors.EventNotFound))
async def get_event(
    request: Request[Any, Any, Any], event_id: EventIdParam
) -> Response[schemas.Event]:
    return Answer(await catalog.view_event(_svc(request), _known(_svc(request), event_id)))


@get(
    "/events/{event_id:str}/seats",
    tags=["events"],
    responses=_problems(errors.EventNotFound, errors.UnknownCategory),
)
async def list_seats(
    request: Request[Any, Any, Any],
    event_id: EventIdParam,
    category: Annotated[
        str | None, Parameter(min_length=1, description="Only this category")
    ] = None,
    status: FromQuery[schemas.SeatStatus | None] = None,
    limit: Annotated[
        int, Parameter(ge=1, le=sales.MAX_SEAT_LIMIT, description="Seats examined for this page")
    ] = 1000,
    cursor: Annotated[str | None, Parameter(description="`next_cursor` of the page before")] = None,
) -> schemas.SeatList:
    """The seat map in seat order, a page at a time. With `status`, a page may hold fewer
    than `limit` seats (even none) and still have a `next_cursor`: follow it to the end."""
    svc = _svc(request)
    return await sales.list_seats(svc, _known(svc, event_id), category, status, limit, cursor)


# The hold route, as each of its two handlers below declares it.
_HOLD_ROUTE: dict[str, Any] = {
    "path": "/events/{event_id:str}/holds",
    "tags": ["holds"],
    "status_code": 201,
    "opt": customers.ROUTE,
    "response_headers": [_location("/events/{event_id}/holds/{hold_id}")],
    "responses": _problems(
        errors.UnknownCategory,
        errors.UnknownSeat,
        errors.Unauthorized,
        errors.CustomerMismatch,
        errors.EventNotFound,
        errors.NotOnSale,
        errors.SoldOut,
        errors.SeatsUnavailable,
        errors.CustomerLimit,
        errors.AdmissionRequired,
        errors.PayloadTooLarge,
        errors.IdempotencyKeyReused,
        errors.RateLimited,
    ),
}


async def hold(request: Asking, event_id: str, data: schemas.HoldCreate) -> Response[schemas.Hold]:
    """The hold route's work, for Litestar's handlers below and the lean lane alike."""
    customer = customers.body_customer(request, data.customer_id)
    if customer is not None:
        data.customer_id = customer
    svc = _svc(request)
    try:
        given = _header(request, b"boxoffice-pass")
        await waitingroom.require_pass(svc, _known(svc, event_id), data.customer_id, given)
        idem = await _idempotency(request)
        hold, quota = await sales.create_hold_counted(svc, event_id, data, idem)
    except errors.BoxofficeError as e:
        # Answered here rather than by the exception handler: the same problem, without
        # Litestar's search for a handler (a sixth of a refusal's CPU; most answers of a
        # drop after the sell-out are refusals).
        return problem(request, e)
    headers = {"location": f"/events/{event_id}/holds/{hold.hold_id}"}
    if quota is not None:
        headers.update(quota.headers())
    return Answer(hold, 201, headers)


@post(**_HOLD_ROUTE)
async def create_hold(
    request: Request[Any, Any, Any],
    event_id: EventIdParam,
    data: JSONBody[schemas.HoldCreate],
) -> Response[schemas.Hold]:
    return await hold(request, event_id, data)


# The same route when customer tokens are on: the body may leave `customer_id` out.
@post(**_HOLD_ROUTE)
async def create_customer_hold(
    request: Request[Any, Any, Any],
    event_id: EventIdParam,
    data: JSONBody[schemas.CustomerHoldCreate],
) -> Response[schemas.Hold]:
    return await hold(request, event_id, data)


@get(
    "/events/{event_id:str}/holds/{hold_id:str}",
    tags=["holds"],
    opt=customers.ROUTE,
    responses=_problems(errors.Unauthorized, errors.EventNotFound, errors.HoldNotFound),
)
async def get_hold(
    request: Request[Any, Any, Any], event_id: EventIdParam, hold_id: FromPath[str]
) -> Response[schemas.Hold]:
    return await read_hold(request, event_id, hold_id)


async def read_hold(request: Asking, event_id: str, hold_id: str) -> Response[schemas.Hold]:
    svc = _svc(request)
    return Answer(await sales.get_hold(svc, _known(svc, event_id), hold_id, customers.of(request)))


@post(
    "/events/{event_id:str}/holds/{hold_id:str}/confirm",
    tags=["holds"],
    status_code=200,
    opt=customers.ROUTE,
    responses=_problems(
        errors.Unauthorized,
        errors.EventNotFound,
        errors.HoldNotFound,
        errors.HoldReleased,
        errors.HoldExpired,
        errors.PayloadTooLarge,
        errors.IdempotencyKeyReused,
        errors.RateLimited,
    ),
)
async def confirm_hold(
    request: Request[Any, Any, Any],
    event_id: EventIdParam,
    hold_id: FromPath[str],
    data: JSONBody[schemas.HoldConfirm | None] = None,
) -> Response[schemas.Booking]:
    return await confirm(request, event_id, hold_id, data)


async def confirm(
    request: Asking, event_id: str, hold_id: str, data: schemas.HoldConfirm | None
) -> Response[schemas.Booking]:
    booking = await sales.confirm_hold(
        _svc(request),
        _known(_svc(request), event_id),
        hold_id,
        data or schemas.HoldConfirm(),
        await _idempotency(request),
        customers.of(request),
    )
    return Answer(booking)


@delete(
    "/events/{event_id:str}/holds/{hold_id:str}",
    tags=["holds"],
    opt=customers.ROUTE,
    responses=_problems(
        errors.Unauthorized,
        errors.EventNotFound,
        errors.HoldNotFound,
        errors.HoldConfirmed,
        errors.IdempotencyKeyReused,
        errors.RateLimited,
    ),
)
async def release_hold(
    request: Request[Any, Any, Any], event_id: EventIdParam, hold_id: FromPath[str]
) -> None:
    await release(request, event_id, hold_id)


async def release(request: Asking, event_id: str, hold_id: str) -> None:
    await sales.release_hold(
        _svc(request),
        _known(_svc(request), event_id),
        hold_id,
        await _idempotency(request),
        customers.of(request),
    )


@get(
    "/events/{event_id:str}/bookings/{booking_id:str}",
    tags=["bookings"],
    opt=customers.ROUTE,
    responses=_problems(errors.Unauthorized, errors.EventNotFound, errors.BookingNotFound),
)
async def get_booking(
    request: Request[Any, Any, Any], event_id: EventIdParam, booking_id: FromPath[str]
) -> Response[schemas.Booking]:
    svc = _svc(request)
    event_id = _known(svc, event_id)
    booking = await bookings.get_booking(svc, event_id, booking_id, customers.of(request))
    return Answer(booking)


# --- the waiting room ------------------------------------------------------------------


# The join route, as each of its two handlers below declares it.
_JOIN_ROUTE: dict[str, Any] = {
    "path": "/events/{event_id:str}/queue",
    "tags": ["waiting room"],
    "status_code": 201,
    "opt": customers.ROUTE,
    "response_headers": [_location("/events/{event_id}/queue/{ticket}")],
    "responses": _problems(
        errors.Unauthorized,
        errors.CustomerMismatch,
        errors.EventNotFound,
        errors.NoWaitingRoom,
        errors.QueueNotOpen,
        errors.NotOnSale,
        errors.PayloadTooLarge,
        errors.IdempotencyKeyReused,
        errors.RateLimited,
    ),
}


async def join(
    request: Asking, event_id: str, data: schemas.QueueJoin
) -> Response[schemas.QueueTicket]:
    """The join route's work, for Litestar's handlers below and the lean lane alike."""
    customer = customers.body_customer(request, data.customer_id) or data.customer_id
    try:
        idem = await _idempotency(request)
        svc = _svc(request)
        ticket, _new = await waitingroom.join(svc, _known(svc, event_id), customer, idem)
    except errors.BoxofficeError as e:
        return problem(request, e)  # as a hold's refusals (see hold)
    location = f"/events/{event_id}/queue/{ticket.ticket}"
    return Answer(ticket, 201, {"location": location})


@post(**_JOIN_ROUTE)
async def join_queue(
    request: Request[Any, Any, Any], event_id: EventIdParam, data: JSONBody[schemas.QueueJoin]
) -> Response[schemas.QueueTicket]:
    """Join the event's waiting room. The same customer joining again gets the same
    ticket (also `201`). Before the on-sale moment a ticket joins the pre-queue, which is
    put in a uniformly random order at that moment, ahead of later arrivals."""
    return await join(request, event_id, data)


# The same route when customer tokens are on: the body may leave `customer_id` out.
@post(**_JOIN_ROUTE)
async def join_customer_queue(
    request: Request[Any, Any, Any],
    event_id: EventIdParam,
    data: JSONBody[schemas.CustomerQueueJoin],
) -> Response[schemas.QueueTicket]:
    """Join the event's waiting room. The same customer joining again gets the same
    ticket (also `201`). Before the on-sale moment a ticket joins the pre-queue, which is
    put in a uniformly random order at that moment, ahead of later arrivals."""
    return await join(request, event_id, data)


@get(
    "/events/{event_id:str}/queue/{ticket:str}",
    tags=["waiting room"],
    opt=customers.ROUTE,
    responses=_problems(errors.Unauthorized, errors.EventNotFound, errors.TicketNotFound),
)
async def poll_queue(
    request: Request[Any, Any, Any], event_id: EventIdParam, ticket: TicketParam
) -> Response[schemas.QueueTicket]:
    """The ticket now. Once `admitted` it carries the pass that holds need; ask again
    after `poll_after_seconds` until then. Answered from the signed ticket and the API
    process's view of the room (at most a quarter second old): a leave, a sell-out or
    returned stock shows on every process within a second."""
    return await poll(request, event_id, ticket)


async def poll(request: Asking, event_id: str, ticket: str) -> Response[schemas.QueueTicket]:
    svc = _svc(request)
    try:
        found = await waitingroom.poll(svc, _known(svc, event_id), ticket, customers.of(request))
    except errors.BoxofficeError as e:
        return problem(request, e)  # as a hold's refusals (see hold)
    return Answer(found)


@delete(
    "/events/{event_id:str}/queue/{ticket:str}",
    tags=["waiting room"],
    opt=customers.ROUTE,
    responses=_problems(
        errors.Unauthorized,
        errors.EventNotFound,
        errors.TicketNotFound,
        errors.IdempotencyKeyReused,
        errors.RateLimited,
    ),
)
async def leave_queue(
    request: Request[Any, Any, Any], event_id: EventIdParam, ticket: TicketParam
) -> None:
    """Leave the waiting room (again: `204`, nothing changes). An admitted ticket's pass
    stays valid until it expires."""
    await waitingroom.leave(
        _svc(request),
        _known(_svc(request), event_id),
        ticket,
        await _idempotency(request),
        customers.of(request),
    )


# --- admin routes -----------------------------------------------------------------------


@post(
    "/admin/events",
    tags=["admin"],
    status_code=201,
    response_headers=[_location("/events/{id}")],
    guards=[admin_guard],
    responses=_problems(
        errors.Unauthorized,
        errors.EventExists,
        errors.PayloadTooLarge,
        errors.IdempotencyInProgress,
        errors.IdempotencyKeyReused,
    ),
)
async def create_event(
    request: Request[Any, Any, Any], data: JSONBody[schemas.EventCreate]
) -> Response[schemas.Event]:
    svc = _svc(request)
    response = await idempotency.once(
        svc, await _idempotency(request), 201, lambda: catalog.create_event(svc, data)
    )
    if response.status_code == 201:  # a replay too: the same body names the same event
        response.headers["location"] = f"/events/{data.id}"
    return response


@patch(
    "/admin/events/{event_id:str}",
    tags=["admin"],
    guards=[admin_guard],
    responses=_problems(
        errors.Unauthorized,
        errors.EventNotFound,
        errors.UnknownCategory,
        errors.CapacityBelowCommitted,
        errors.PayloadTooLarge,
        errors.IdempotencyInProgress,
        errors.IdempotencyKeyReused,
    ),
)
async def patch_event(
    request: Request[Any, Any, Any], event_id: EventIdParam, data: JSONBody[schemas.EventPatch]
) -> Response[schemas.Event]:
    svc = _svc(request)
    return await idempotency.once(
        svc,
        await _idempotency(request),
        200,
        lambda: catalog.patch_event(svc, _event(event_id), data),
    )


@get(
    "/admin/events/{event_id:str}/bookings",
    tags=["admin"],
    guards=[admin_guard],
    responses=_problems(errors.Unauthorized, errors.EventNotFound),
)
async def list_bookings(
    request: Request[Any, Any, Any],
    event_id: EventIdParam,
    status: FromQuery[schemas.BookingStatus | None] = None,
    customer_id: FromQuery[str | None] = None,
    limit: Annotated[int, Parameter(ge=1, le=bookings.MAX_LIMIT)] = 100,
    cursor: Annotated[str | None, Parameter(description="`next_cursor` of the page before")] = None,
) -> schemas.BookingPage:
    """Bookings as PostgreSQL has them, in booking (time) order."""
    return await bookings.list_bookings(
        _svc(request), _event(event_id), status, customer_id, limit, cursor
    )


@delete(
    "/admin/events/{event_id:str}/bookings/{booking_id:str}",
    tags=["admin"],
    guards=[admin_guard],
    responses=_problems(
        errors.Unauthorized,
        errors.EventNotFound,
        errors.BookingNotFound,
        errors.IdempotencyKeyReused,
        errors.RateLimited,
    ),
)
async def cancel_booking(
    request: Request[Any, Any, Any], event_id: EventIdParam, booking_id: FromPath[str]
) -> None:
    """Cancel (refund): the tickets are on sale again at once; PostgreSQL follows."""
    await bookings.cancel_booking(
        _svc(request), _event(event_id), booking_id, await _idempotency(request)
    )


@get(
    "/admin/events/{event_id:str}/reconcile",
    tags=["admin"],
    guards=[admin_guard],
    responses=_problems(errors.Unauthorized, errors.EventNotFound),
)
async def reconcile_event(
    request: Request[Any, Any, Any], event_id: EventIdParam
) -> findings.Report:
    """Does Redis agree with PostgreSQL? The report of `boxoffice reconcile --event ID
    --json`; read-only (repairing is the command's `--repair`)."""
    report = await reconcile.reconcile(_svc(request), _event(event_id))
    if not report.events:
        raise errors.EventNotFound(f"no event {event_id!r}")
    return report


@post(
    "/admin/events/{event_id:str}/archive",
    tags=["admin"],
    status_code=202,
    guards=[admin_guard],
    responses=_problems(
        errors.Unauthorized,
        errors.EventNotFound,
        errors.EventNotOver,
        errors.IdempotencyInProgress,
        errors.IdempotencyKeyReused,
    ),
)
async def archive_event(
    request: Request[Any, Any, Any], event_id: EventIdParam
) -> Response[schemas.ArchiveState]:
    """Take an event that is over (closed, or started more than
    `BOXOFFICE_ARCHIVE_AFTER_SECONDS` ago, or reopened that long ago) out of Redis now:
    its outbox is written to PostgreSQL here, and its live state goes at once if no hold
    is live; else `waiting_for` says what it waits for, and the worker finishes it as soon
    as it may. Repeats answer `202` too. Afterwards the event, its bookings and reconcile
    are read from PostgreSQL without loading it back; `PATCH` `{"status": "on_sale"}`
    brings it back. Hold records of an archived event are gone (`hold_not_found`);
    Idempotency-Key records stay until their TTL."""
    svc = _svc(request)
    return await idempotency.once(
        svc, await _idempotency(request), 202, lambda: archive.ask(svc, _event(event_id))
    )


@get(
    "/admin/events/{event_id:str}/queue",
    tags=["admin"],
    guards=[admin_guard],
    responses=_problems(errors.Unauthorized, errors.EventNotFound),
)
async def queue_figures(
    request: Request[Any, Any, Any], event_id: EventIdParam
) -> schemas.QueueStats:
    """The waiting room now: tickets waiting, admitted (the frontier, in ranks), passes
    not yet expired. All zero, and `admit_per_minute` null, for an event without one."""
    return await waitingroom.figures(_svc(request), _event(event_id))


_DEAD_LETTER_ERRORS = (
    errors.Unauthorized,
    errors.EventNotFound,
    errors.DeadLetterNotFound,
    errors.IdempotencyInProgress,
    errors.IdempotencyKeyReused,
)


@get(
    "/admin/events/{event_id:str}/dead-letters",
    tags=["admin"],
    guards=[admin_guard],
    responses=_problems(errors.Unauthorized, errors.EventNotFound),
)
async def list_dead_letters(
    request: Request[Any, Any, Any], event_id: EventIdParam
) -> deadletters.DeadLetterList:
    """Outbox entries that failed to reach PostgreSQL again and again, oldest first."""
    return await deadletters.list_dead_letters(_svc(request), _event(event_id))


@post(
    "/admin/events/{event_id:str}/dead-letters/{dead_letter_id:str}/replay",
    tags=["admin"],
    status_code=202,
    guards=[admin_guard],
    responses=_problems(*_DEAD_LETTER_ERRORS),
)
async def replay_dead_letter(
    request: Request[Any, Any, Any], event_id: EventIdParam, dead_letter_id: FromPath[str]
) -> Response[None]:
    """Put the entry back in the outbox (after fixing its cause): the write-behind writes
    it again, and dead-letters it again if it still fails."""
    svc = _svc(request)
    return await idempotency.once(
        svc,
        await _idempotency(request),
        202,
        lambda: deadletters.replay(svc, _event(event_id), dead_letter_id),
    )


@delete(
    "/admin/events/{event_id:str}/dead-letters/{dead_letter_id:str}",
    tags=["admin"],
    guards=[admin_guard],
    responses=_problems(*_DEAD_LETTER_ERRORS),
)
async def discard_dead_letter(
    request: Request[Any, Any, Any], event_id: EventIdParam, dead_letter_id: FromPath[str]
) -> Response[None]:
    """Drop the entry for good. Reconcile then reports its booking as drift until
    `boxoffice reconcile --repair` writes it from what Redis has (if PostgreSQL takes it)."""
    svc = _svc(request)
    return await idempotency.once(
        svc,
        await _idempotency(request),
        204,
        lambda: deadletters.discard(svc, _event(event_id), dead_letter_id),
    )


# --- live view ----------------------------------------------------------------------------


@get(
    "/admin/events/{event_id:str}/live",
    tags=["admin"],
    guards=[admin_guard],
    media_type="text/event-stream",
    responses={
        **_problems(errors.Unauthorized, errors.EventNotFound),
        200: ResponseSpec(
            livefeed.LiveFigures,
            description="Server-Sent Events, one a second: each `data` is a LiveFigures"
            " document; while Redis is away, `event: problem` with a problem document instead."
            " Asked with `Accept: application/json` (and not `text/event-stream`): one"
            " LiveFigures document, now, as `application/json`",
            media_type="text/event-stream",
            generate_examples=False,
        ),
    },
)
async def live_view(request: Request[Any, Any, Any], event_id: EventIdParam) -> Response[Any]:
    """The event's figures once a second: per category capacity, available, held, sold;
    holds, confirmations, releases, expiries, cancellations and refusals (by code) per
    second; the waiting room; the write-behind backlog and lag. However many watch, each
    API process reads an event once a second."""
    feed: livefeed.Feed = request.app.state.feed
    queue, first = await livefeed.first_reading(feed, _event(event_id))
    if livefeed.wants_snapshot(request.headers.get("accept", "")):
        feed.leave(event_id, queue)
        return Response(first, media_type="application/json")
    return ServerSentEvent(livefeed.stream(feed, event_id, queue, first))


@get(
    "/admin/dashboard",
    tags=["admin"],
    media_type="text/html",  # Litestar adds "; charset=utf-8" to text/*
    responses=_problems(backends=False),
)
async def dashboard_route() -> Response[bytes]:
    """The operator's live page (HTML). Served to anyone: it holds no figures, and the
    admin token never reaches the server in a page request (the page reads it from the
    URL fragment, `#token=…`, or asks, and keeps it in the browser session). Every figure
    it shows comes from admin calls made with the token: without a valid one the page
    shows that it was refused, and nothing else."""
    return Response(dashboard.page(), headers=dashboard.HEADERS)


# --- operations -------------------------------------------------------------------------


@get("/health", tags=["operations"], responses=_problems(backends=False))
async def health() -> schemas.Health:
    return schemas.Health(status="ok")


@get(
    "/ready",
    tags=["operations"],
    responses={**_problems(backends=False), 503: ResponseSpec(schemas.Readiness)},
)
async def ready(request: Request[Any, Any, Any]) -> Response[schemas.Readiness]:
    state = await metrics.readiness(_svc(request))
    if state.missing:
        return Response(state, status_code=503, headers=dict(errors.Unavailable.always))
    return Response(state)


@get(
    "/metrics",
    tags=["operations"],
    media_type="text/plain; version=0.0.4",
    responses=_problems(backends=False),
)
async def metrics_route(request: Request[Any, Any, Any]) -> bytes:
    return await metrics.render(_svc(request))


# --- the app ----------------------------------------------------------------------------


@get("/{path:str}", include_in_schema=False)
async def schema_not_found(path: FromPath[str]) -> None:
    # Litestar answers an unknown path under /schema with an HTML page of its own.
    raise errors.NotFound(f"no page {path!r} under /schema")


_IDEMPOTENCY_KEY = OpenAPIParameter(
    name="Idempotency-Key",
    param_in="header",
    required=False,
    schema=Schema(type=OpenAPIType.STRING, min_length=1, max_length=128),
    description="1-128 printable ASCII characters. A repeat with the same body within "
    "24 hours gets the first response and changes nothing; with another body, 422 "
    "`idempotency_key_reused`; while the first still runs, 409 `idempotency_in_progress`.",
)
_PASS = OpenAPIParameter(
    name="Boxoffice-Pass",
    param_in="header",
    required=False,
    schema=Schema(type=OpenAPIType.STRING),
    description="The admission pass of the event's waiting room (when it has one): "
    "`pass` of an admitted QueueTicket.",
)
_RETRY_AFTER = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER), description="Seconds to wait before trying again"
)
_RETRY_AFTER_IN_PROGRESS = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER),
    description="Seconds to wait before trying again; sent with `idempotency_in_progress`"
    " only, not with the other codes of this status",
)
_RATELIMIT_POLICY = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.STRING),
    description='The rate limits that apply (IETF draft "RateLimit header fields for HTTP"),'
    ' e.g. `"address";q=600;w=60, "tickets";q=40;w=60, "customer";q=20;w=60`: q attempts'
    " (tickets, for `tickets`) per w seconds. Policies: `address` (every request of the"
    " client address), `joins` (its joins of a waiting room), `tickets` (the tickets its"
    " holds ask for), `admin` (its admin requests), `customer` (the customer's hold"
    " attempts in the event). Sent by a rate limit, not with the Idempotency-Key budget's"
    " 429",
)
_RATELIMIT = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.STRING),
    description='What is left of each, e.g. `"customer";r=0;t=12`: r attempts left, t seconds'
    " until the quota is whole again (on a 429: until the next attempt, as Retry-After)",
)
_RATE_HEADERS = {"RateLimit-Policy": _RATELIMIT_POLICY, "RateLimit": _RATELIMIT}
_HEADERS_OF_STATUS = {
    "401": {"WWW-Authenticate": OpenAPIHeader(schema=Schema(const="Bearer"))},
    "409": {"Retry-After": _RETRY_AFTER},
    "429": {"Retry-After": _RETRY_AFTER, **_RATE_HEADERS},
    "503": {"Retry-After": _RETRY_AFTER},
}


def _operations(app: Litestar) -> list[tuple[str, str, Operation]]:
    found = []
    for path, item in (app.openapi_schema.paths or {}).items():
        for method in ("get", "post", "patch", "put", "delete"):
            op = getattr(item, method)
            if isinstance(op, Operation):
                found.append((path, method, op))
    return found


_CUSTOMER_SCHEME = SecurityScheme(
    type="http",
    scheme="bearer",
    bearer_format="JWT",
    description="A customer token: a JWT signed HS256 with `BOXOFFICE_CUSTOMER_TOKEN_SECRET` "
    "(issued by the shop's login), `sub` the customer id, `exp` in the future. Needed only "
    "when that secret is set; then a body's `customer_id` may be left out and must otherwise "
    "be `sub` (403 `customer_mismatch`), and another customer's holds and bookings answer "
    "404. Without the secret the service trusts the body's `customer_id` (a trusted backend).",
)


def _customer_operations(app: Litestar) -> set[tuple[str, str]]:
    """(path, method) of the routes marked `opt=customers.ROUTE`."""
    found = set()
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            if isinstance(handler, HTTPRouteHandler) and customers.is_customer_route(handler.opt):
                found |= {(route.path_format, m.lower()) for m in handler.http_methods}
    return found


def document(app: Litestar, customer_tokens: bool = False) -> None:
    """What Litestar cannot be told per route: the admin's and the customers' bearer
    schemes, the Idempotency-Key header of every state-changing operation, the headers of
    answers. Run at start-up (and by service.web.apidoc); a second run changes nothing.
    `customer_tokens`: BOXOFFICE_CUSTOMER_TOKEN_SECRET is set, so the customer operations
    require the customer scheme (without it they require nothing, and the scheme is only
    described, for the deployment with tokens)."""
    schema = app.openapi_schema
    if schema.components and schema.components.security_schemes:
        return
    schema.components = schema.components or Components()
    schema.components.security_schemes = {
        "bearer": SecurityScheme(
            type="http", scheme="bearer", description="The admin token, `BOXOFFICE_ADMIN_TOKEN`"
        ),
        "customer": _CUSTOMER_SCHEME,
    }
    # Without the secret no customer route asks for anything: its document says so.
    customer_ops = _customer_operations(app) if customer_tokens else set()
    for path, method, op in _operations(app):
        # The dashboard page is static and holds no figures: its data calls need the token.
        if path.startswith("/admin/") and path != "/admin/dashboard":
            op.security = [{"bearer": []}]
        elif (path, method) in customer_ops:
            op.security = [{"customer": []}]
        if method == "post" and path.endswith("/holds"):
            op.parameters = [*(op.parameters or []), _PASS]
        if method != "get":
            op.parameters = [*(op.parameters or []), _IDEMPOTENCY_KEY]
        for status, response in (op.responses or {}).items():
            if not isinstance(response, OpenAPIResponse):
                continue
            headers = _HEADERS_OF_STATUS.get(status, {})
            # Of the 409s, only idempotency_in_progress says when to come back.
            if status == "409" and "idempotency_in_progress" not in response.description:
                headers = {}
            elif status == "409" and "` or `" in response.description:
                headers = {"Retry-After": _RETRY_AFTER_IN_PROGRESS}
            if status == "201" and path.endswith("/holds"):
                headers = _RATE_HEADERS  # the customer's hold-attempt limit, when on
            response.headers = {**(response.headers or {}), **headers} or None
            location = (response.headers or {}).get("Location")
            if isinstance(location, OpenAPIHeader):  # Litestar gives it no schema
                location.schema = Schema(
                    type=OpenAPIType.STRING, format=OpenAPIFormat.URI_REFERENCE
                )
    # "" is how CustomerHoldCreate and CustomerQueueJoin say "left out", not a value to send.
    for name in ("CustomerHoldCreate", "CustomerQueueJoin"):
        body = (schema.components.schemas or {}).get(name)
        if body is not None and body.properties:
            customer_id = body.properties["customer_id"]
            if isinstance(customer_id, Schema):
                customer_id.default = None
    # Litestar documents every `data` as required; the confirm body may be left out.
    confirm = schema.paths["/events/{event_id}/holds/{hold_id}/confirm"]  # type: ignore[index]
    if confirm.post is not None and isinstance(confirm.post.request_body, RequestBody):
        confirm.post.request_body.required = False


class App(Litestar):
    """Litestar, with the lean lane (service/web/lane.py) in front of it when on: the lane,
    inside the metrics and the body deadlines, gets every HTTP request first, and hands
    what it does not serve to Litestar. A hot route's request then never enters Litestar
    at all (its scope set-up and before_send wrapper cost a sold-out refusal a tenth)."""

    lean: ASGIApp | None = None

    async def __call__(
        self,
        scope: Scope | LifeSpanScope,
        receive: Receive | LifeSpanReceive,
        send: Send | LifeSpanSend,
    ) -> None:
        if self.lean is not None and scope["type"] == ScopeType.HTTP:
            await self.lean(scope, receive, send)  # type: ignore[arg-type]
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, lean: bool | None = None) -> Litestar:
    """`lean`: the hot routes go the lean lane (service/web/lane.py); by default as
    settings.lean_lane says (the tests and benchmarks compare both)."""
    lean = settings.lean_lane if lean is None else lean
    stats = metrics.HttpStats()
    tokens = bool(settings.customer_token_secret)
    verifier = customers.Verifier(settings.customer_token_secret) if tokens else None

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        svc = Services.open(settings)
        app.state.svc = svc
        flusher = asyncio.get_running_loop().create_task(stats.flush_every())
        app.state.feed = livefeed.Feed(svc)
        tallier = asyncio.get_running_loop().create_task(livefeed.flush_every(svc, stats.tally))
        try:
            try:
                await svc.start()
                await svc.scripts.load()
            except Exception as e:  # /ready says so; every call loads what it misses
                if not errors.unavailable(e):
                    raise
                log.warning("Redis unreachable at start-up: %r", e)
            svc.sold_out.start(svc.scripts)
            svc.event_ids.start(svc)
            # Everything built so far lives as long as the process. Left to the collector,
            # it is traversed again by every full collection, a 50 ms pause about once a
            # second under load (the p99 of a hold); frozen, it is never traversed again.
            gc.collect()
            gc.freeze()
            # After start(): on a cluster, svc.scripts is the cluster's.
            app.state.limits = ratelimit.AddressLimits(settings, svc.scripts)
            started.mark_started()
            yield
        finally:
            flusher.cancel()
            tallier.cancel()
            await app.state.feed.close()
            await svc.close()

    app = App(
        route_handlers=[
            list_events,
            get_event,
            list_seats,
            create_customer_hold if tokens else create_hold,
            get_hold,
            confirm_hold,
            release_hold,
            get_booking,
            join_customer_queue if tokens else join_queue,
            poll_queue,
            leave_queue,
            create_event,
            patch_event,
            list_bookings,
            cancel_booking,
            reconcile_event,
            archive_event,
            queue_figures,
            list_dead_letters,
            replay_dead_letter,
            discard_dead_letter,
            health,
            ready,
            metrics_route,
            live_view,
            dashboard_route,
        ],
        lifespan=[lifespan],
        on_startup=[functools.partial(document, customer_tokens=tokens)],
        before_request=door if verifier is None else customer_door(verifier),
        before_send=[add_rate_headers],
        dto=StrictJSON,
        request_class=bodies.Request,
        request_max_body_size=settings.max_body_bytes,
        exception_handlers={
            errors.BoxofficeError: on_domain_error,
            bodies.ClientGone: on_client_gone,
            HTTPException: on_http_error,
            HTTP_500_INTERNAL_SERVER_ERROR: on_crash,
            Exception: on_crash,
        },
        openapi_config=OpenAPIConfig(
            title="Boxoffice",
            version="0.1.0",
            description="Ticket reservations for ticket drops: instant, atomic holds in Redis.",
            path="/schema",
            # Redoc also at /schema/redoc, where Litestar's own default puts it. Their
            # scripts and styles from the service itself, under /schema/assets/.
            render_plugins=docsui.render_plugins("/schema"),
            openapi_router=Router(
                "/schema",
                route_handlers=[schema_not_found, *docsui.asset_routers()],
                include_in_schema=False,
            ),
        ),
    )
    # Around the whole app, not as route middleware: requests that match no route (404,
    # 405) are answered before any route's middleware runs, and they count too.
    # The body guard inside it, so that a 408 is counted as one.
    around = metrics.middleware(stats), bodies.guard(settings.http_body_timeout_seconds)
    if not lean:
        app.asgi_handler = around[0](around[1](app.asgi_handler))
        return app
    from service.web import lane  # it serves the route functions of this module: imported late

    async def litestar(scope: Scope, receive: Receive, send: Send) -> None:
        await Litestar.__call__(app, scope, receive, send)

    app.lean = around[0](around[1](lane.lane(app, settings)(litestar)))
    return app


def create_app_from_env() -> Litestar:
    """Entry point for the ASGI server's workers: each builds its own app and connections."""
    return create_app(Settings.from_env())
