"""Outbox entries as PostgreSQL rows, and their writing: whole batches in one transaction,
idempotently (INSERT ... ON CONFLICT DO NOTHING on the booking id; a cancellation is an
UPDATE that only moves confirmed to cancelled), so that an entry written twice changes
nothing. Used by the write-behind and by reconcile's repair."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncConnection

from service.core import bookingrules
from service.core.db import driver
from service.core.records import BookingRecord
from service.durable import outbox
from service.durable.outbox import Entry

_encode = msgspec.json.encode


def _ts(ms: int | bytes) -> datetime:
    return datetime.fromtimestamp(int(ms) / 1000, UTC)


# Whole batches as arrays, one statement per table: a round trip and a plan per batch,
# however many rows, and no per-row work in the database driver.
_INSERT_BOOKINGS = """
INSERT INTO bookings (booking_id, event_id, hold_id, customer_id, status, total, currency,
                      payment_ref, seats, confirmed_at)
SELECT b, e, h, c, 'confirmed', t, cu, pr, ARRAY(SELECT jsonb_array_elements_text(s::jsonb)), ca
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::text[],
            $8::text[], $9::timestamptz[]) AS u(b, e, h, c, t, cu, pr, s, ca)
ON CONFLICT DO NOTHING
"""
_INSERT_ITEMS = """
INSERT INTO booking_items (booking_id, category, position, quantity, tickets)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::int4[], $5::int4[])
ON CONFLICT DO NOTHING
"""
# Only a confirmed booking becomes cancelled: a replayed cancellation changes nothing.
_CANCEL = """
UPDATE bookings SET status = 'cancelled', cancelled_at = u.at
FROM unnest($1::uuid[], $2::timestamptz[]) AS u(b, at)
WHERE booking_id = u.b AND status = 'confirmed'
"""


class Poison(Exception):
    """An outbox entry that can never be written as it is: its own fault, not a server's."""


class Rows(msgspec.Struct):
    """One entry as the rows of the batch statements (and a confirmation's record, for
    the catalog's check)."""

    booking: tuple[Any, ...] | None = None
    items: list[tuple[Any, ...]] = []
    cancel: tuple[Any, ...] | None = None
    event_id: str = ""
    record: BookingRecord | None = None


def _convert(fields: dict[bytes, bytes], event_id: str) -> Rows:
    change = outbox.decode(fields)
    if isinstance(change, outbox.Cancel):
        return Rows(cancel=(uuid.UUID(change.booking_id), _ts(change.at_ms)))
    b = change.booking
    if (why := bookingrules.shape(b)) is not None:
        raise ValueError(why)
    booking_id = uuid.UUID(b.id)
    booking = (
        booking_id,
        event_id,
        b.hold_id,
        b.customer_id,
        b.total_cents,
        b.currency,
        b.payment_ref,
        _encode(b.seats).decode(),
        _ts(b.created_ms),
    )
    asked = dict(b.items)
    order = [c for c, _ in b.items] + sorted(set(b.quantities) - set(asked))
    items = [(booking_id, c, i, asked.get(c, 0), b.quantities[c]) for i, c in enumerate(order)]
    return Rows(booking=booking, items=items, event_id=event_id, record=b)


def convert(entry: Entry) -> Rows:
    """The rows of one entry, before any server is asked: whatever fails here (malformed
    JSON, a missing field, an unknown op, a time out of range) is the entry's own fault,
    whatever Python type the failure has, and trying again cannot help."""
    try:
        return _convert(entry[2], entry[0])
    except Exception as e:  # no I/O above: nothing here is a server's failure
        # `from None`: an OSError inside must not make the chain look like a server away.
        raise Poison(f"{type(e).__name__}: {e}") from None


def _append(columns: list[list[Any]], values: tuple[Any, ...]) -> None:
    for column, value in zip(columns, values, strict=True):
        column.append(value)


async def _refusals(raw: Any, batch: list[Rows]) -> list[str | None]:
    """Why the catalog refuses each entry (bookingrules); None for one it allows."""
    confirms = [(i, r.event_id, r.record) for i, r in enumerate(batch) if r.record is not None]
    why = await bookingrules.refusals(raw, [(e, b) for _, e, b in confirms])
    out: list[str | None] = [None] * len(batch)
    for (i, _, _), reason in zip(confirms, why, strict=True):
        out[i] = None if reason is None else f"refused: {reason}"
    return out


async def _insert(raw: Any, batch: list[Rows]) -> None:
    rows: list[list[Any]] = [[] for _ in range(9)]
    items: list[list[Any]] = [[] for _ in range(5)]
    cancels: list[list[Any]] = [[], []]
    for entry in batch:
        if entry.booking is not None:
            _append(rows, entry.booking)
        for item in entry.items:
            _append(items, item)
        if entry.cancel is not None:
            _append(cancels, entry.cancel)
    if rows[0]:
        await raw.execute(_INSERT_BOOKINGS, *rows)
        await raw.execute(_INSERT_ITEMS, *items)
    if cancels[0]:
        await raw.execute(_CANCEL, *cancels)


async def write_rows(conn: AsyncConnection, batch: list[Rows]) -> list[str | None]:
    """Write converted entries in the caller's transaction, each that the event's catalog
    allows; returns why each of the others was refused (None: written). One entry's
    fault is that entry's alone: the rest of the batch is written."""
    raw = await driver(conn)
    # SQLAlchemy begins its transaction only when it runs a statement itself: the driver's
    # statements alone would each commit on their own, and a crash between two of them
    # would leave bookings without their items.
    async with raw.transaction():
        refused = await _refusals(raw, batch)
        await _insert(raw, [r for r, why in zip(batch, refused, strict=True) if why is None])
    return refused


async def write(conn: AsyncConnection, entries: list[Entry]) -> None:
    """Write a batch of outbox entries in the caller's transaction; Poison for an entry
    that cannot be converted or that the catalog refuses (nothing is written then)."""
    batch = [convert(e) for e in entries]
    raw = await driver(conn)
    async with raw.transaction():
        refused = [why for why in await _refusals(raw, batch) if why is not None]
        if refused:
            raise Poison(refused[0])
        await _insert(raw, batch)
