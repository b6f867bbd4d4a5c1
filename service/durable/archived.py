"""An archived event (service/durable/archive.py), read and changed in PostgreSQL alone: its
live state has left Redis, and only a reopening loads it again. Nothing is held once an
event is archived, so what is committed is what its confirmed bookings sold."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from service.core import errors, schemas
from service.core.db import booking_items, bookings, categories, events, seats
from service.core.schemas import event_status
from service.core.timefmt import from_ms, now_ms, to_ms
from service.durable import live
from service.hotpath.context import Services


async def sold(conn: AsyncConnection, event_id: str) -> dict[str, int]:
    """Tickets sold per category, as PostgreSQL's confirmed bookings say."""
    rows = await conn.execute(
        sa.select(booking_items.c.category, sa.func.sum(booking_items.c.tickets).label("n"))
        .join(bookings, bookings.c.booking_id == booking_items.c.booking_id)
        .where(bookings.c.event_id == event_id, bookings.c.status == "confirmed")
        .group_by(booking_items.c.category)
    )
    return {r.category: int(r.n) for r in rows}


async def view(svc: Services, event_id: str) -> schemas.Event:
    """An archived event as PostgreSQL has it, without loading it into Redis: nothing is
    held once it is archived, so what is available is the capacity less what is sold."""
    async with svc.engine.connect() as conn:
        ev = (await conn.execute(sa.select(events).where(events.c.id == event_id))).first()
        if ev is None:
            raise errors.EventNotFound(f"no event {event_id!r}")
        cats = await live.event_categories(conn, event_id)
        taken = await sold(conn, event_id)
    on_sale_at = None if ev.on_sale_at is None else to_ms(ev.on_sale_at)
    room = live.room_of(ev)
    return schemas.Event(
        id=event_id,
        name=ev.name,
        starts_at=from_ms(to_ms(ev.starts_at)),
        status=event_status(ev.status, on_sale_at, now_ms()),
        on_sale_at=None if on_sale_at is None else from_ms(on_sale_at),
        hold_ttl_seconds=ev.hold_ttl_seconds,
        max_per_order=ev.max_per_order,
        max_per_customer=ev.max_per_customer,
        categories=[
            schemas.Category(
                name=c.name,
                price=c.price,
                currency=ev.currency,
                seated=c.seated,
                capacity=c.capacity,
                available=c.capacity - taken.get(c.name, 0),
            )
            for c in cats
        ],
        archived=ev.archived_at is not None,
        waiting_room=None
        if room is None
        else schemas.WaitingRoomView(
            admit_per_minute=room.admit_per_minute,
            pass_ttl_seconds=room.pass_ttl_seconds,
            opens_at=None if room.opens_at is None else from_ms(to_ms(room.opens_at)),
        ),
    )


async def patch(
    conn: AsyncConnection, event_id: str, values: dict[str, Any], caps: dict[str, int]
) -> None:
    """A PATCH of an archived event that leaves it archived: PostgreSQL alone, checked as
    Redis would check it (nothing is held: what is committed is what is sold)."""
    if values:
        await conn.execute(events.update().where(events.c.id == event_id).values(**values))
    if not caps:
        return
    found = {
        r.name: r.seated
        for r in await conn.execute(
            sa.select(categories.c.name, categories.c.seated).where(
                categories.c.event_id == event_id
            )
        )
    }
    taken = await sold(conn, event_id)
    for name, cap in caps.items():
        if name not in found:
            raise errors.UnknownCategory(f"no category {name!r} in this event")
        if found[name]:
            raise errors.ValidationError(
                f"category {name!r} is seated: its capacity is its seat count"
            )
        if cap < taken.get(name, 0):
            raise errors.CapacityBelowCommitted(
                f"category {name!r} has {taken.get(name, 0)} tickets held or sold"
            )
        await conn.execute(
            categories.update()
            .where(categories.c.event_id == event_id, categories.c.name == name)
            .values(capacity=cap)
        )


async def list_seats(
    svc: Services, event_id: str, category: str | None, status: str | None, limit: int, first: int
) -> schemas.SeatList:
    """A page of the seat map, as the live one pages it (`limit` positions of the seat
    order examined from `first`, then filtered): a seat is sold or available."""
    where = [seats.c.event_id == event_id, seats.c.position >= first]
    async with svc.engine.connect() as conn:
        if category is not None:
            known = await conn.execute(
                sa.select(categories.c.seated).where(
                    categories.c.event_id == event_id, categories.c.name == category
                )
            )
            if known.first() is None:
                raise errors.UnknownCategory(f"no category {category!r} in this event")
            where.append(seats.c.category == category)
        rows = (
            await conn.execute(
                sa.select(seats).where(*where).order_by(seats.c.position).limit(limit + 1)
            )
        ).all()
        page = rows[:limit]
        labels = [r.label for r in page]
        # The confirmed bookings that hold any seat of the page (an index-free scan of
        # the event's bookings, as reading its bookings is).
        page_labels = sa.literal(labels, type_=ARRAY(sa.Text))
        booked = await conn.execute(
            sa.select(bookings.c.seats).where(
                bookings.c.event_id == event_id,
                bookings.c.status == "confirmed",
                bookings.c.seats.op("&&")(page_labels),
            )
        )
        sold_labels = {label for (row,) in booked for label in row}
    out = [
        schemas.Seat(
            label=r.label,
            category=r.category,
            status="sold" if r.label in sold_labels else "available",
            row=r.row,
            number=r.number,
        )
        for r in page
    ]
    if status is not None:
        out = [s for s in out if s.status == status]
    more = len(rows) > limit
    return schemas.SeatList(seats=out, next_cursor=str(page[-1].position + 1) if more else None)


async def cancel_booking(svc: Services, event_id: str, booking_id: str) -> bool:
    """Cancel a booking of an archived event, without loading the event: its tickets count
    as on sale again when it is reopened (a load counts only confirmed bookings). False
    when the event is not archived (then Redis does it). The event's row is share-locked:
    a reopening waits, and never loads it half-way."""
    missing = errors.BookingNotFound(f"no booking {booking_id!r} in this event")
    try:
        bid = uuid.UUID(booking_id)
    except ValueError:
        raise missing from None
    async with svc.engine.begin() as conn:
        archived_at = (
            await conn.execute(
                sa.select(events.c.archived_at)
                .where(events.c.id == event_id)
                .with_for_update(read=True)
            )
        ).scalar_one_or_none()
        if archived_at is None:
            return False
        found = await conn.execute(
            sa.select(bookings.c.status).where(
                bookings.c.event_id == event_id, bookings.c.booking_id == bid
            )
        )
        if found.first() is None:
            raise missing
        await conn.execute(
            bookings.update()
            .where(bookings.c.booking_id == bid, bookings.c.status == "confirmed")
            .values(status="cancelled", cancelled_at=sa.func.now())
        )
    return True
