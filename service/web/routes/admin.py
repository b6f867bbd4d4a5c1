"""The admin routes (`/admin/events…`): events, bookings, reconcile, archive, the waiting
room's figures, dead letters. Every one behind the admin token (admin_guard), tagged
`admin` and documented as requiring the admin bearer scheme: ADMIN, once per router."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from litestar import Response, Router, delete, get, patch, post
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath, FromQuery, JSONBody, Parameter

from service.core import errors, schemas
from service.durable import archive, deadletters, findings, reconcile
from service.selling import bookings, catalog, waitingroom
from service.web.asking import Asked, EventIdParam, event, idempotency_of, once
from service.web.door import rate_limit
from service.web.openapi import location, problems


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


# The options of a router of admin routes (also the live view's, service/web/routes/operations.py).
ADMIN: dict[str, Any] = {"guards": [admin_guard], "tags": ["admin"], "security": [{"bearer": []}]}


def router() -> Router:
    return Router(
        "/admin/events",
        route_handlers=[
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
        ],
        **ADMIN,
    )


@post(
    "/",
    status_code=201,
    response_headers=[location("/events/{id}")],
    responses=problems(
        errors.Unauthorized,
        errors.EventExists,
        errors.PayloadTooLarge,
        errors.IdempotencyInProgress,
        errors.IdempotencyKeyReused,
    ),
)
async def create_event(
    request: Asked, data: JSONBody[schemas.EventCreate]
) -> Response[schemas.Event]:
    svc = request.svc
    response = await once(request, 201, lambda: catalog.create_event(svc, data))
    if response.status_code == 201:  # a replay too: the same body names the same event
        response.headers["location"] = f"/events/{data.id}"
    return response


@patch(
    "/{event_id:str}",
    responses=problems(
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
    request: Asked,
    event_id: EventIdParam,
    data: JSONBody[schemas.EventPatch],
) -> Response[schemas.Event]:
    svc = request.svc
    return await once(
        request,
        200,
        lambda: catalog.patch_event(svc, event(event_id), data),
    )


@get("/{event_id:str}/bookings", responses=problems(errors.Unauthorized, errors.EventNotFound))
async def list_bookings(
    request: Asked,
    event_id: EventIdParam,
    status: FromQuery[schemas.BookingStatus | None] = None,
    customer_id: FromQuery[str | None] = None,
    limit: Annotated[int, Parameter(ge=1, le=bookings.MAX_LIMIT)] = 100,
    cursor: Annotated[str | None, Parameter(description="`next_cursor` of the page before")] = None,
) -> schemas.BookingPage:
    """Bookings as PostgreSQL has them, in booking (time) order."""
    return await bookings.list_bookings(
        request.svc, event(event_id), status, customer_id, limit, cursor
    )


@delete(
    "/{event_id:str}/bookings/{booking_id:str}",
    responses=problems(
        errors.Unauthorized,
        errors.EventNotFound,
        errors.BookingNotFound,
        errors.IdempotencyKeyReused,
        errors.RateLimited,
    ),
)
async def cancel_booking(
    request: Asked,
    event_id: EventIdParam,
    booking_id: FromPath[str],
) -> None:
    """Cancel (refund): the tickets are on sale again at once; PostgreSQL follows."""
    await bookings.cancel_booking(
        request.svc, event(event_id), booking_id, await idempotency_of(request)
    )


@get("/{event_id:str}/reconcile", responses=problems(errors.Unauthorized, errors.EventNotFound))
async def reconcile_event(request: Asked, event_id: EventIdParam) -> findings.Report:
    """Does Redis agree with PostgreSQL? The report of `boxoffice reconcile --event ID
    --json`; read-only (repairing is the command's `--repair`)."""
    report = await reconcile.reconcile(request.svc, event(event_id))
    if not report.events:
        raise errors.EventNotFound(f"no event {event_id!r}")
    return report


@post(
    "/{event_id:str}/archive",
    status_code=202,
    responses=problems(
        errors.Unauthorized,
        errors.EventNotFound,
        errors.EventNotOver,
        errors.IdempotencyInProgress,
        errors.IdempotencyKeyReused,
    ),
)
async def archive_event(request: Asked, event_id: EventIdParam) -> Response[schemas.ArchiveState]:
    """Take an event that is over (closed, or started more than
    `BOXOFFICE_ARCHIVE_AFTER_SECONDS` ago, or reopened that long ago) out of Redis now:
    its outbox is written to PostgreSQL here, and its live state goes at once if no hold
    is live; else `waiting_for` says what it waits for, and the worker finishes it as soon
    as it may. Repeats answer `202` too. Afterwards the event, its bookings and reconcile
    are read from PostgreSQL without loading it back; `PATCH` `{"status": "on_sale"}`
    brings it back. Hold records of an archived event are gone (`hold_not_found`);
    Idempotency-Key records stay until their TTL."""
    svc = request.svc
    return await once(request, 202, lambda: archive.ask(svc, event(event_id)))


@get("/{event_id:str}/queue", responses=problems(errors.Unauthorized, errors.EventNotFound))
async def queue_figures(request: Asked, event_id: EventIdParam) -> schemas.QueueStats:
    """The waiting room now: tickets waiting, admitted (the frontier, in ranks), passes
    not yet expired. All zero, and `admit_per_minute` null, for an event without one."""
    return await waitingroom.figures(request.svc, event(event_id))


_DEAD_LETTER_ERRORS = (
    errors.Unauthorized,
    errors.EventNotFound,
    errors.DeadLetterNotFound,
    errors.IdempotencyInProgress,
    errors.IdempotencyKeyReused,
)


@get("/{event_id:str}/dead-letters", responses=problems(errors.Unauthorized, errors.EventNotFound))
async def list_dead_letters(request: Asked, event_id: EventIdParam) -> deadletters.DeadLetterList:
    """Outbox entries that failed to reach PostgreSQL again and again, oldest first."""
    return await deadletters.list_dead_letters(request.svc, event(event_id))


@post(
    "/{event_id:str}/dead-letters/{dead_letter_id:str}/replay",
    status_code=202,
    responses=problems(*_DEAD_LETTER_ERRORS),
)
async def replay_dead_letter(
    request: Asked,
    event_id: EventIdParam,
    dead_letter_id: FromPath[str],
) -> Response[None]:
    """Put the entry back in the outbox (after fixing its cause): the write-behind writes
    it again, and dead-letters it again if it still fails."""
    svc = request.svc
    return await once(
        request,
        202,
        lambda: deadletters.replay(svc, event(event_id), dead_letter_id),
    )


@delete(
    "/{event_id:str}/dead-letters/{dead_letter_id:str}", responses=problems(*_DEAD_LETTER_ERRORS)
)
async def discard_dead_letter(
    request: Asked,
    event_id: EventIdParam,
    dead_letter_id: FromPath[str],
) -> Response[None]:
    """Drop the entry for good. Reconcile then reports its booking as drift until
    `boxoffice reconcile --repair` writes it from what Redis has (if PostgreSQL takes it)."""
    svc = request.svc
    return await once(
        request,
        204,
        lambda: deadletters.discard(svc, event(event_id), dead_letter_id),
    )
