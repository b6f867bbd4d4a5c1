"""The HTTP API: routes, the admin guard, and the one handler that maps errors to problems."""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from litestar import Litestar, Request, Response, delete, get, patch, post
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import RedocRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import RequestBody
from litestar.params import Parameter
from litestar.response.base import ASGIResponse
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import Receive, Scope, Send

from service import (
    bookings,
    catalog,
    deadletters,
    errors,
    idempotency,
    metrics,
    reconcile,
    sales,
    schemas,
)
from service.context import Services
from service.scripts import Idempotency
from service.settings import Settings
from service.strictjson import StrictJSON

log = logging.getLogger("boxoffice.api")

PROBLEM_JSON = "application/problem+json"
_EVENT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")

EventIdParam = Annotated[
    str, Parameter(description="Event id, `^[a-z0-9][a-z0-9-]{0,63}$`; any other is 404.")
]


# --- errors ---------------------------------------------------------------------------


def problem(
    exc: errors.BoxofficeError, response: type[Response[Any]] = Response
) -> Response[schemas.Problem]:
    return response(
        exc.problem(),
        status_code=exc.status,
        media_type=PROBLEM_JSON,
        headers=exc.headers,
    )


_HTTP_ERRORS: dict[int, type[errors.BoxofficeError]] = {
    400: errors.ValidationError,
    401: errors.Unauthorized,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
}


def on_domain_error(_: Request[Any, Any, Any], exc: errors.BoxofficeError) -> Response[Any]:
    return problem(exc)


def on_http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own errors (routing, parameters, body size) in the same problem shape."""
    cls = _HTTP_ERRORS.get(exc.status_code)
    if cls is None:
        return on_crash(_, exc)
    extra: dict[str, Any] = {}
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list):
        extra["errors"] = [{k: str(v) for k, v in e.items()} for e in exc.extra]
    err = cls(exc.detail if cls is errors.ValidationError else None, **extra)
    if exc.headers and "allow" in exc.headers:
        err.headers = {"allow": exc.headers["allow"]}
    if cls is errors.PayloadTooLarge:
        # Whatever of the body the drain leaves unread (past 1 MiB, or from a client that
        # stalls) stays in the connection: it cannot carry another request.
        err.headers = {"connection": "close"}
        return problem(err, TooLarge)
    return problem(err)


# A refused body is read and thrown away up to this much before the 413 goes out.
_DRAIN_BYTES = 1024 * 1024
_DRAIN_WAIT = 0.25


async def drain(receive: Receive) -> None:
    """Read what the client is still sending of a refused body. The server closes the
    connection after a 413; closing a socket with unread bytes in it makes the kernel
    reset the connection, and the reset can destroy the 413 before the client reads it."""
    left = _DRAIN_BYTES
    while left > 0:
        try:
            message = await asyncio.wait_for(receive(), _DRAIN_WAIT)
        except TimeoutError:  # nothing more is coming (or the client stalls): answer now
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        left -= len(message.get("body", b""))


class _DrainFirst(ASGIResponse):
    """An ASGIResponse that reads the refused body before it answers. It wraps the real one
    instead of building itself: the exception middleware only ever calls it."""

    __slots__ = ("_response",)

    def __init__(self, response: ASGIResponse) -> None:
        self._response = response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await drain(receive)
        await self._response(scope, receive, send)


class TooLarge(Response[schemas.Problem]):
    """The 413 problem, sent once the rest of the refused body has been read."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        return _DrainFirst(super().to_asgi_response(*args, **kwargs))


def on_crash(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # Driver errors that escaped the boundary mean Redis or PostgreSQL is unreachable.
    if errors.unavailable(exc):
        log.warning("backend unavailable: %r", exc)
        return problem(errors.Unavailable("Redis or PostgreSQL is unreachable; try again"))
    log.exception("unhandled error")
    return problem(errors.BoxofficeError("unexpected error; nothing was changed"))


def _problems(*classes: type[errors.BoxofficeError]) -> dict[int, ResponseSpec]:
    by_status: dict[int, list[str]] = {}
    for cls in (*classes, errors.ValidationError, errors.Unavailable):
        by_status.setdefault(cls.status, []).append(f"`{cls.code}`")
    return {
        status: ResponseSpec(
            data_container=schemas.Problem,
            description="Problem details; code " + " or ".join(dict.fromkeys(codes)),
            media_type=PROBLEM_JSON,
            generate_examples=False,
        )
        for status, codes in by_status.items()
    }


# --- helpers ----------------------------------------------------------------------------


def _svc(request: Request[Any, Any, Any]) -> Services:
    svc: Services = request.app.state.svc
    return svc


def _event(event_id: str) -> str:
    # A malformed id names no event: 404, and it never reaches a Redis key.
    if not _EVENT_ID.fullmatch(event_id):
        raise errors.EventNotFound(f"no event {event_id!r}")
    return event_id


async def _idempotency(request: Request[Any, Any, Any]) -> Idempotency | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    return idempotency.fingerprint(key, request.method, request.url.path, await request.body())


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
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
async def get_event(request: Request[Any, Any, Any], event_id: EventIdParam) -> schemas.Event:
    return await catalog.view_event(_svc(request), _event(event_id))


@get(
    "/events/{event_id:str}/seats",
    tags=["events"],
    responses=_problems(errors.EventNotFound),
)
async def list_seats(
    request: Request[Any, Any, Any],
    event_id: EventIdParam,
    category: str | None = None,
    status: schemas.SeatStatus | None = None,
) -> schemas.SeatList:
    return await sales.list_seats(_svc(request), _event(event_id), category, status)


@post(
    "/events/{event_id:str}/holds",
    tags=["holds"],
    status_code=201,
    responses=_problems(
        errors.UnknownCategory,
        errors.UnknownSeat,
        errors.EventNotFound,
        errors.NotOnSale,
        errors.SoldOut,
        errors.SeatsUnavailable,
        errors.CustomerLimit,
        errors.PayloadTooLarge,
        errors.IdempotencyKeyReused,
    ),
)
async def create_hold(
    request: Request[Any, Any, Any], event_id: EventIdParam, data: schemas.HoldCreate
) -> schemas.Hold:
    return await sales.create_hold(
        _svc(request), _event(event_id), data, await _idempotency(request)
    )


@get(
    "/events/{event_id:str}/holds/{hold_id:str}",
    tags=["holds"],
    responses=_problems(errors.EventNotFound, errors.HoldNotFound),
)
async def get_hold(
    request: Request[Any, Any, Any], event_id: EventIdParam, hold_id: str
) -> schemas.Hold:
    return await sales.get_hold(_svc(request), _event(event_id), hold_id)


@post(
    "/events/{event_id:str}/holds/{hold_id:str}/confirm",
    tags=["holds"],
    status_code=200,
    responses=_problems(
        errors.EventNotFound,
        errors.HoldNotFound,
        errors.HoldReleased,
        errors.HoldExpired,
        errors.PayloadTooLarge,
        errors.IdempotencyKeyReused,
    ),
)
async def confirm_hold(
    request: Request[Any, Any, Any],
    event_id: EventIdParam,
    hold_id: str,
    data: schemas.HoldConfirm | None = None,
) -> schemas.Booking:
    return await sales.confirm_hold(
        _svc(request),
        _event(event_id),
        hold_id,
        data or schemas.HoldConfirm(),
        await _idempotency(request),
    )


@delete(
    "/events/{event_id:str}/holds/{hold_id:str}",
    tags=["holds"],
    responses=_problems(
        errors.EventNotFound, errors.HoldNotFound, errors.HoldConfirmed, errors.IdempotencyKeyReused
    ),
)
async def release_hold(
    request: Request[Any, Any, Any], event_id: EventIdParam, hold_id: str
) -> None:
    await sales.release_hold(_svc(request), _event(event_id), hold_id, await _idempotency(request))


@get(
    "/events/{event_id:str}/bookings/{booking_id:str}",
    tags=["bookings"],
    responses=_problems(errors.EventNotFound, errors.BookingNotFound),
)
async def get_booking(
    request: Request[Any, Any, Any], event_id: EventIdParam, booking_id: str
) -> schemas.Booking:
    return await bookings.get_booking(_svc(request), _event(event_id), booking_id)


# --- admin routes -----------------------------------------------------------------------


@post(
    "/admin/events",
    tags=["admin"],
    status_code=201,
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
    request: Request[Any, Any, Any], data: schemas.EventCreate
) -> Response[schemas.Event]:
    svc = _svc(request)
    return await idempotency.once(
        svc, await _idempotency(request), 201, lambda: catalog.create_event(svc, data)
    )


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
    request: Request[Any, Any, Any], event_id: EventIdParam, data: schemas.EventPatch
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
    status: schemas.BookingStatus | None = None,
    customer_id: str | None = None,
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
    ),
)
async def cancel_booking(
    request: Request[Any, Any, Any], event_id: EventIdParam, booking_id: str
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
) -> reconcile.Report:
    """Does Redis agree with PostgreSQL? The report of `boxoffice reconcile --event ID
    --json`; read-only (repairing is the command's `--repair`)."""
    report = await reconcile.reconcile(_svc(request), _event(event_id))
    if not report.events:
        raise errors.EventNotFound(f"no event {event_id!r}")
    return report


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
    responses=_problems(errors.Unauthorized, errors.EventNotFound, errors.DeadLetterNotFound),
)
async def replay_dead_letter(
    request: Request[Any, Any, Any], event_id: EventIdParam, dead_letter_id: str
) -> None:
    """Put the entry back in the outbox (after fixing its cause): the write-behind writes
    it again, and dead-letters it again if it still fails."""
    await deadletters.replay(_svc(request), _event(event_id), dead_letter_id)


@delete(
    "/admin/events/{event_id:str}/dead-letters/{dead_letter_id:str}",
    tags=["admin"],
    guards=[admin_guard],
    responses=_problems(errors.Unauthorized, errors.EventNotFound, errors.DeadLetterNotFound),
)
async def discard_dead_letter(
    request: Request[Any, Any, Any], event_id: EventIdParam, dead_letter_id: str
) -> None:
    """Drop the entry for good. Reconcile then reports its booking as drift until
    `boxoffice reconcile --repair` writes it from what Redis has (if PostgreSQL takes it)."""
    await deadletters.discard(_svc(request), _event(event_id), dead_letter_id)


# --- operations -------------------------------------------------------------------------


@get("/health", tags=["operations"])
async def health() -> schemas.Health:
    return schemas.Health(status="ok")


@get("/ready", tags=["operations"], responses={503: ResponseSpec(schemas.Readiness)})
async def ready(request: Request[Any, Any, Any]) -> Response[schemas.Readiness]:
    state = await metrics.readiness(_svc(request))
    return Response(state, status_code=503 if state.missing else 200)


@get("/metrics", tags=["operations"], media_type="text/plain; version=0.0.4")
async def metrics_route(request: Request[Any, Any, Any]) -> bytes:
    return await metrics.render(_svc(request))


# --- the app ----------------------------------------------------------------------------


def _confirm_body_is_optional(app: Litestar) -> None:
    # Litestar documents every `data` as required; the confirm body may be left out.
    path = app.openapi_schema.paths["/events/{event_id}/holds/{hold_id}/confirm"]  # type: ignore[index]
    if path.post is not None and isinstance(path.post.request_body, RequestBody):
        path.post.request_body.required = False


def create_app(settings: Settings) -> Litestar:
    stats = metrics.HttpStats()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        svc = Services.open(settings)
        app.state.svc = svc
        flusher = asyncio.get_running_loop().create_task(stats.flush_every())
        try:
            try:
                await svc.scripts.load()
            except Exception as e:  # /ready says so; every call loads what it misses
                if not errors.unavailable(e):
                    raise
                log.warning("Redis unreachable at start-up: %r", e)
            # Everything built so far lives as long as the process. Left to the collector,
            # it is traversed again by every full collection, a 50 ms pause about once a
            # second under load (the p99 of a hold); frozen, it is never traversed again.
            gc.collect()
            gc.freeze()
            yield
        finally:
            flusher.cancel()
            await svc.close()

    return Litestar(
        route_handlers=[
            list_events,
            get_event,
            list_seats,
            create_hold,
            get_hold,
            confirm_hold,
            release_hold,
            get_booking,
            create_event,
            patch_event,
            list_bookings,
            cancel_booking,
            reconcile_event,
            list_dead_letters,
            replay_dead_letter,
            discard_dead_letter,
            health,
            ready,
            metrics_route,
        ],
        lifespan=[lifespan],
        on_startup=[_confirm_body_is_optional],
        dto=StrictJSON,
        request_max_body_size=settings.max_body_bytes,
        exception_handlers={
            errors.BoxofficeError: on_domain_error,
            HTTPException: on_http_error,
            HTTP_500_INTERNAL_SERVER_ERROR: on_crash,
            Exception: on_crash,
        },
        middleware=[metrics.middleware(stats)],
        openapi_config=OpenAPIConfig(
            title="Boxoffice",
            version="0.1.0",
            description="Ticket reservations for ticket drops: instant, atomic holds in Redis.",
            path="/schema",
            render_plugins=[RedocRenderPlugin(path="/"), SwaggerRenderPlugin()],
        ),
    )


def create_app_from_env() -> Litestar:
    """Entry point for the ASGI server's workers: each builds its own app and connections."""
    return create_app(Settings.from_env())
