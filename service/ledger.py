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

from service import bookingrules
from service.context import Services
from service.db import booking_items, bookings, driver
from service.keys import event_keys
from service.records import BookingRecord
from service.timefmt import to_ms

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
        h=row.hold_id,
        c=row.customer_id,
        q={category: tickets for category, _, tickets in items},
        n=sum(tickets for _, _, tickets in items),
        t=row.total,
        cu=row.currency,
        ca=to_ms(row.confirmed_at),
        s=row.status,
        it=[(category, asked) for category, asked, _ in items if asked],
        st=list(row.seats),
        pr=row.payment_ref,
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
    s: str
    st: list[str]
    items: str | None  # [[category, asked, tickets], ...] as JSON text
    t: int
    cu: str

    @property
    def q(self) -> dict[str, int]:
        return {c: tickets for c, _, tickets in _decode_items(self.items)} if self.items else {}

    def sale(self) -> BookingRecord:
        """What the booking rules look at (service/bookingrules.py), as a record."""
        items = _decode_items(self.items) if self.items else []
        q = {c: tickets for c, _, tickets in items}
        it = [(c, asked) for c, asked, _ in items if asked]
        return BookingRecord(
            self.id, "", "", q, sum(q.values()), self.t, self.cu, 0, self.s, it, self.st
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
