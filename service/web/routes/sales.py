"""The public sales routes: events and their seat maps, holds, bookings.

The hold's, the hold read's, the confirm's and the release's work are functions of their
own (hold, read_hold, confirm, release): the Litestar handlers here run them, and so does
the lean lane (service/web/lane.py), with its own request (asking.Asking)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Response, Router, delete, get, post
from litestar.params import FromPath, FromQuery, JSONBody, Parameter

from service.core import errors, schemas
from service.selling import bookings, catalog, sales, waitingroom
from service.web import customers
from service.web.answers import Answer
from service.web.asking import Asked, Asking, EventIdParam, header, idempotency_of, known
from service.web.openapi import location, problems
from service.web.problems import problem


def router(tokens: bool) -> Router:
    """`tokens`: customer tokens are on (the hold's body may leave `customer_id` out)."""
    return Router(
        "/events",
        route_handlers=[
            Router("/", tags=["events"], route_handlers=[list_events, get_event, list_seats]),
            Router(
                "/{event_id:str}/holds",
                tags=["holds"],
                route_handlers=[
                    create_customer_hold if tokens else create_hold,
                    get_hold,
                    confirm_hold,
                    release_hold,
                ],
                **customers.layer(tokens),
            ),
            Router(
                "/{event_id:str}/bookings",
                tags=["bookings"],
                route_handlers=[get_booking],
                **customers.layer(tokens),
            ),
        ],
    )


# --- events -------------------------------------------------------------------------------


@get("/", responses=problems())
async def list_events(request: Asked) -> schemas.EventList:
    return await catalog.list_events(request.svc)


@get("/{event_id:str}", responses=problems(errors.EventNotFound))
async def get_event(request: Asked, event_id: EventIdParam) -> Response[schemas.Event]:
    svc = request.svc
    return Answer(await catalog.view_event(svc, known(svc, event_id)))


@get("/{event_id:str}/seats", responses=problems(errors.EventNotFound, errors.UnknownCategory))
async def list_seats(
    request: Asked,
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
    svc = request.svc
    return await sales.list_seats(svc, known(svc, event_id), category, status, limit, cursor)


# --- holds --------------------------------------------------------------------------------


# The hold route, as each of its two handlers below declares it.
_HOLD_ROUTE: dict[str, Any] = {
    "path": "/",
    "status_code": 201,
    "response_headers": [location("/events/{event_id}/holds/{hold_id}")],
    "responses": problems(
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
    svc = request.svc
    customer = customers.body_customer(request, data.customer_id)
    if customer is not None:
        data.customer_id = customer
    try:
        given = header(request, b"boxoffice-pass")
        await waitingroom.require_pass(svc, known(svc, event_id), data.customer_id, given)
        idem = await idempotency_of(request)
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
    request: Asked,
    event_id: EventIdParam,
    data: JSONBody[schemas.HoldCreate],
) -> Response[schemas.Hold]:
    return await hold(request, event_id, data)


# The same route when customer tokens are on: the body may leave `customer_id` out.
@post(**_HOLD_ROUTE)
async def create_customer_hold(
    request: Asked,
    event_id: EventIdParam,
    data: JSONBody[schemas.CustomerHoldCreate],
) -> Response[schemas.Hold]:
    return await hold(request, event_id, data)


@get(
    "/{hold_id:str}",
    responses=problems(errors.Unauthorized, errors.EventNotFound, errors.HoldNotFound),
)
async def get_hold(
    request: Asked, event_id: EventIdParam, hold_id: FromPath[str]
) -> Response[schemas.Hold]:
    return await read_hold(request, event_id, hold_id)


async def read_hold(request: Asking, event_id: str, hold_id: str) -> Response[schemas.Hold]:
    svc = request.svc
    return Answer(await sales.get_hold(svc, known(svc, event_id), hold_id, customers.of(request)))


@post(
    "/{hold_id:str}/confirm",
    status_code=200,
    responses=problems(
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
    request: Asked,
    event_id: EventIdParam,
    hold_id: FromPath[str],
    data: JSONBody[schemas.HoldConfirm | None] = None,
) -> Response[schemas.Booking]:
    return await confirm(request, event_id, hold_id, data)


async def confirm(
    request: Asking, event_id: str, hold_id: str, data: schemas.HoldConfirm | None
) -> Response[schemas.Booking]:
    svc = request.svc
    booking = await sales.confirm_hold(
        svc,
        known(svc, event_id),
        hold_id,
        data or schemas.HoldConfirm(),
        await idempotency_of(request),
        customers.of(request),
    )
    return Answer(booking)


@delete(
    "/{hold_id:str}",
    responses=problems(
        errors.Unauthorized,
        errors.EventNotFound,
        errors.HoldNotFound,
        errors.HoldConfirmed,
        errors.IdempotencyKeyReused,
        errors.RateLimited,
    ),
)
async def release_hold(request: Asked, event_id: EventIdParam, hold_id: FromPath[str]) -> None:
    await release(request, event_id, hold_id)


async def release(request: Asking, event_id: str, hold_id: str) -> None:
    svc = request.svc
    await sales.release_hold(
        svc, known(svc, event_id), hold_id, await idempotency_of(request), customers.of(request)
    )


# --- bookings -----------------------------------------------------------------------------


@get(
    "/{booking_id:str}",
    responses=problems(errors.Unauthorized, errors.EventNotFound, errors.BookingNotFound),
)
async def get_booking(
    request: Asked,
    event_id: EventIdParam,
    booking_id: FromPath[str],
) -> Response[schemas.Booking]:
    svc = request.svc
    booking = await bookings.get_booking(
        svc, known(svc, event_id), booking_id, customers.of(request)
    )
    return Answer(booking)
