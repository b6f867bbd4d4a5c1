"""The waiting room's public routes: join, poll, leave. The join's and the poll's work
are functions of their own (join, poll), run by the handlers here and by the lean lane
(service/web/lane.py) alike."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Response, Router, delete, get, post
from litestar.params import JSONBody, Parameter

from service.core import errors, schemas
from service.selling import waitingroom
from service.web import customers
from service.web.answers import Answer
from service.web.asking import Asked, Asking, EventIdParam, idempotency_of, known
from service.web.openapi import location, problems
from service.web.problems import problem

TicketParam = Annotated[str, Parameter(description="`ticket` of the QueueTicket.")]


def router(tokens: bool) -> Router:
    """`tokens`: customer tokens are on (the join's body may leave `customer_id` out)."""
    return Router(
        "/events/{event_id:str}/queue",
        tags=["waiting room"],
        route_handlers=[join_customer_queue if tokens else join_queue, poll_queue, leave_queue],
        **customers.layer(tokens),
    )


# The join route, as each of its two handlers below declares it.
# Join the event's waiting room. The same customer joining again gets the same ticket
# (also `201`). Before the on-sale moment a ticket joins the pre-queue, which is put in a
# uniformly random order at that moment, ahead of later arrivals.
_JOIN_ROUTE: dict[str, Any] = {
    "path": "/",
    "status_code": 201,
    "response_headers": [location("/events/{event_id}/queue/{ticket}")],
    "responses": problems(
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
    svc = request.svc
    customer = customers.body_customer(request, data.customer_id) or data.customer_id
    try:
        idem = await idempotency_of(request)
        ticket, _new = await waitingroom.join(svc, known(svc, event_id), customer, idem)
    except errors.BoxofficeError as e:
        return problem(request, e)  # as a hold's refusals (see routes/sales.py hold)
    location = f"/events/{event_id}/queue/{ticket.ticket}"
    return Answer(ticket, 201, {"location": location})


@post(**_JOIN_ROUTE)
async def join_queue(
    request: Asked,
    event_id: EventIdParam,
    data: JSONBody[schemas.QueueJoin],
) -> Response[schemas.QueueTicket]:
    return await join(request, event_id, data)


# The same route when customer tokens are on: the body may leave `customer_id` out.
@post(**_JOIN_ROUTE)
async def join_customer_queue(
    request: Asked,
    event_id: EventIdParam,
    data: JSONBody[schemas.CustomerQueueJoin],
) -> Response[schemas.QueueTicket]:
    return await join(request, event_id, data)


@get(
    "/{ticket:str}",
    responses=problems(errors.Unauthorized, errors.EventNotFound, errors.TicketNotFound),
)
async def poll_queue(
    request: Asked, event_id: EventIdParam, ticket: TicketParam
) -> Response[schemas.QueueTicket]:
    """The ticket now. Once `admitted` it carries the pass that holds need; ask again
    after `poll_after_seconds` until then. Answered from the signed ticket and the API
    process's view of the room (at most a quarter second old): a leave, a sell-out or
    returned stock shows on every process within a second."""
    return await poll(request, event_id, ticket)


async def poll(request: Asking, event_id: str, ticket: str) -> Response[schemas.QueueTicket]:
    svc = request.svc
    try:
        found = await waitingroom.poll(svc, known(svc, event_id), ticket, customers.of(request))
    except errors.BoxofficeError as e:
        return problem(request, e)  # as a hold's refusals (see routes/sales.py hold)
    return Answer(found)


@delete(
    "/{ticket:str}",
    responses=problems(
        errors.Unauthorized,
        errors.EventNotFound,
        errors.TicketNotFound,
        errors.IdempotencyKeyReused,
        errors.RateLimited,
    ),
)
async def leave_queue(request: Asked, event_id: EventIdParam, ticket: TicketParam) -> None:
    """Leave the waiting room (again: `204`, nothing changes). An admitted ticket's pass
    stays valid until it expires."""
    svc = request.svc
    await waitingroom.leave(
        svc, known(svc, event_id), ticket, await idempotency_of(request), customers.of(request)
    )
