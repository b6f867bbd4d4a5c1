"""Bookings: read from Redis while they are live there, from PostgreSQL (the durable
record) otherwise; listed and cancelled by the admin."""

from __future__ import annotations

import uuid

import msgspec
import sqlalchemy as sa

from service.core import errors, schemas
from service.core.db import bookings
from service.core.keys import event_keys
from service.core.records import BookingRecord, decode_booking
from service.durable import archived, ledger
from service.durable.live import call_loaded, ensure_loaded
from service.hotpath.context import Services
from service.hotpath.scripts import Idempotency
from service.selling.sales import booking_view

MAX_LIMIT = 1000


def _uuid(value: str, what: errors.BoxofficeError) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise what from None


async def _from_postgres(svc: Services, event_id: str, booking_id: str) -> BookingRecord | None:
    bid = _uuid(booking_id, errors.BookingNotFound(f"no booking {booking_id!r} in this event"))
    return await ledger.find(svc, event_id, bid)


async def get_booking(
    svc: Services, event_id: str, booking_id: str, customer: str | None = None
) -> schemas.Booking:
    """`customer`: the customer token's (tokens on): another's booking is not found."""
    missing = errors.BookingNotFound(f"no booking {booking_id!r} in this event")
    raw = await svc.redis.hget(event_keys(event_id).bookings, booking_id)
    if raw is None:
        await ensure_loaded(svc, event_id)  # event_not_found comes before booking_not_found
        stored = await _from_postgres(svc, event_id, booking_id)
        if stored is None or (customer is not None and stored.customer_id != customer):
            raise missing
        return booking_view(event_id, stored, persisted=True)
    live = decode_booking(raw)
    if customer is not None and live.customer_id != customer:
        raise missing
    stored = await _from_postgres(svc, event_id, booking_id)
    # Persisted: PostgreSQL has it, in the state Redis shows (a cancellation counts too).
    return booking_view(
        event_id, live, persisted=stored is not None and stored.status == live.status
    )


async def list_bookings(
    svc: Services,
    event_id: str,
    status: str | None,
    customer_id: str | None,
    limit: int,
    cursor: str | None,
) -> schemas.BookingPage:
    where = [bookings.c.event_id == event_id]
    if status is not None:
        where.append(bookings.c.status == status)
    if customer_id is not None:
        where.append(bookings.c.customer_id == customer_id)
    if cursor is not None:
        try:
            where.append(bookings.c.booking_id > uuid.UUID(cursor))
        except ValueError:
            await ensure_loaded(svc, event_id)  # event_not_found first
            raise errors.ValidationError(
                "`cursor`: not a cursor of this list; pass the `next_cursor` of a page"
            ) from None
    records = await ledger.records(svc, sa.and_(*where), limit + 1)
    if not records:
        await ensure_loaded(svc, event_id)  # event_not_found for an unknown event
    page = records[:limit]
    return schemas.BookingPage(
        bookings=[booking_view(event_id, r, persisted=True) for r in page],
        next_cursor=page[-1].id if len(records) > limit else None,
    )


async def cancel_booking(
    svc: Services, event_id: str, booking_id: str, idem: Idempotency | None
) -> None:
    fallback = b""
    if not await svc.redis.hexists(event_keys(event_id).bookings, booking_id):
        await ensure_loaded(svc, event_id)  # event_not_found comes before booking_not_found
        if await archived.cancel_booking(svc, event_id, booking_id):
            return
        # Redis no longer has it (trimmed or restored): PostgreSQL tells the script what
        # the booking holds, so its tickets still come back.
        stored = await _from_postgres(svc, event_id, booking_id)
        if stored is not None:
            fallback = msgspec.json.encode(stored)
    await call_loaded(svc, "cancel", event_id, booking_id, fallback, idempotency=idem, durable=True)
