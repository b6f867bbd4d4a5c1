"""Bookings as PostgreSQL has them (the durable record), read back as the records Redis
keeps, one booking or streamed a chunk at a time, and adopted into Redis."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import aggregate_order_by

from service.core import bookingrules
from service.core.db import booking_items, bookings, driver
from service.core.keys import event_keys
from service.core.records import BookingRecord
from service.core.timefmt import to_ms
from service.hotpath.context import Services

log = logging.getLogger("boxoffice.ledger")

CHUNK = 5000

# Each booking with its items, [category, quantity asked, tickets] in their order.
_ITEMS = (
    sa.select(
        sa.func.json_agg(
            aggregate_order_by(
                sa.func.json_build_array(
                    booking_items.c.category, booking_items.c.quantity, booking_items.c.tickets
                ),
                booking_items.c.position,
            )
        )
    )
    .where(booking_items.c.booking_id == bookings.c.booking_id)
    .scalar_subquery()
)
# As text: msgspec decodes it several times faster than the driver's JSON handling.
_ITEMS_TEXT = sa.cast(_ITEMS, sa.Text).label("items")
_decode_items = msgspec.json.Decoder(list[tuple[str, int, int]]).decode


def _record(row: Any) -> BookingRecord:
    items = _decode_items(row.items) if row.items else []
    return BookingRecord(
        id=str(row.booking_id),
        hold_id=row.hold_id,
        customer_id=row.customer_id,
        quantities={category: tickets for category, _, tickets in items},
        items=[(category, asked) for category, asked, _ in items if asked],
        seats=list(row.seats),
        quantity=sum(tickets for _, _, tickets in items),
        total_cents=row.total,
        currency=row.currency,
        created_ms=to_ms(row.confirmed_at),
        status=row.status,
        payment_ref=row.payment_ref,
    )


def _query(where: Any) -> sa.Select[Any]:
    return sa.select(bookings, _ITEMS_TEXT).where(where).order_by(bookings.c.booking_id)


async def records(svc: Services, where: Any, limit: int | None = None) -> list[BookingRecord]:
    """Bookings matching `where`, in booking-id (time) order."""
    async with svc.engine.connect() as conn:
        rows = await conn.execute(_query(where).limit(limit))
        return [_record(r) for r in rows]


async def find(svc: Services, event_id: str, booking_id: uuid.UUID) -> BookingRecord | None:
    found = await records(
        svc, sa.and_(bookings.c.event_id == event_id, bookings.c.booking_id == booking_id)
    )
    return found[0] if found else None


async def stream(svc: Services, event_id: str) -> AsyncIterator[list[BookingRecord]]:
    """Every booking of the event, a chunk at a time: a server-side cursor, so memory
    stays bounded however many there are."""
    async with svc.engine.connect() as conn:
        result = await conn.stream(
            _query(bookings.c.event_id == event_id).execution_options(yield_per=CHUNK)
        )
        async for chunk in result.partitions(CHUNK):
            yield [_record(r) for r in chunk]


class Brief(msgspec.Struct, frozen=True):
    """What a reconciliation needs of a booking, without building its whole record."""

    id: str
    status: str
    seats: list[str]
    items_json: str | None  # [[category, asked, tickets], ...] as JSON text
    total_cents: int
    currency: str

    @property
    def quantities(self) -> dict[str, int]:
        if not self.items_json:
            return {}
        return {c: tickets for c, _, tickets in _decode_items(self.items_json)}

    def sale(self) -> BookingRecord:
        """What the booking rules look at (service/core/bookingrules.py), as a record."""
        items = _decode_items(self.items_json) if self.items_json else []
        q = {c: tickets for c, _, tickets in items}
        return BookingRecord(
            id=self.id,
            hold_id="",
            customer_id="",
            quantities=q,
            items=[(c, asked) for c, asked, _ in items if asked],
            seats=self.seats,
            quantity=sum(q.values()),
            total_cents=self.total_cents,
            currency=self.currency,
            created_ms=0,
            status=self.status,
        )


async def briefs(svc: Services, event_id: str) -> AsyncIterator[list[Brief]]:
    """Every booking of the event in brief, a chunk at a time (a server-side cursor)."""
    query = (
        sa.select(
            sa.cast(bookings.c.booking_id, sa.Text),
            bookings.c.status,
            bookings.c.seats,
            _ITEMS_TEXT,
            bookings.c.total,
            bookings.c.currency,
        )
        .where(bookings.c.event_id == event_id)
        .execution_options(yield_per=CHUNK)
    )
    async with svc.engine.connect() as conn:
        result = await conn.stream(query)
        async for chunk in result.partitions(CHUNK):
            yield [Brief(*row) for row in chunk]


async def adopt(svc: Services, event_id: str) -> tuple[int, list[str]]:
    """Add to Redis the bookings it lacks (after it lost them). A booking Redis has is
    left alone: Redis is ahead of PostgreSQL, never behind. One that breaks the booking
    rules (written before PostgreSQL checked them) is left out: stock is never counted
    from it. Returns how many it added, and the ids it left out."""
    key = event_keys(event_id).bookings
    added, refused = 0, []
    async with svc.engine.connect() as conn:
        raw = await driver(conn)
        async for chunk in stream(svc, event_id):
            why = await bookingrules.refusals(raw, [(event_id, r) for r in chunk])
            refused += [r.id for r, w in zip(chunk, why, strict=True) if w is not None]
            pipe = svc.redis.pipeline(transaction=False)
            for record, w in zip(chunk, why, strict=True):
                if w is None:
                    pipe.hsetnx(key, record.id, msgspec.json.encode(record))
            added += sum(await pipe.execute())
    if refused:
        log.error(
            "event %s: %d booking(s) in PostgreSQL break the booking rules and were left out"
            " of Redis (reconcile lists them as booking_invalid): %s",
            event_id,
            len(refused),
            ", ".join(refused[:20]),
        )
    return added, refused
