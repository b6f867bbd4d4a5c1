"""Events, categories and seats: written to PostgreSQL, loaded into Redis, read back live."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from service.core import errors, schemas
from service.core.db import categories, events
from service.core.keys import event_keys
from service.core.schemas import event_status
from service.core.timefmt import from_ms, now_ms, to_ms
from service.durable import archive, archived, live
from service.hotpath.context import Services
from service.selling import roomstate, waitingroom

MAX_SEATS = 200_000
# Seats written per COPY statement (_insert_seats).
SEATS_PER_COPY = 10_000

log = logging.getLogger("boxoffice.catalog")


# --- create -------------------------------------------------------------------------


def _plan(body: schemas.EventCreate) -> live.Plan:
    currencies = {c.currency for c in body.categories}
    if len(currencies) != 1:
        raise errors.ValidationError("all categories of an event share one currency")
    names = [c.name for c in body.categories]
    if len(set(names)) != len(names):
        raise errors.ValidationError("category names must be unique")
    cats: list[dict[str, Any]] = []
    labels: list[str] = []
    seat_cats: list[str] = []
    places: list[tuple[str | None, int | None]] = []
    for c in body.categories:
        seated = c.seat_blocks is not None or c.seats is not None
        if seated == (c.capacity is not None):
            raise errors.ValidationError(
                f"category {c.name!r} needs either a capacity or seats, not both"
            )
        lo = len(labels)
        for block in c.seat_blocks or []:
            block_places = [
                (row, n) for row in block.rows for n in range(1, block.seats_per_row + 1)
            ]
            labels.extend(f"{row}-{n}" for row, n in block_places)
            places.extend(block_places)
            if len(labels) > MAX_SEATS:
                break
        blocks = len(labels) - lo
        labels.extend(c.seats or [])
        places.extend([(None, None)] * len(c.seats or []))
        if len(labels) > MAX_SEATS:
            raise errors.ValidationError(f"at most {MAX_SEATS} seats per event")
        if seated and len(labels) == lo:
            raise errors.ValidationError(f"seated category {c.name!r} has no seats")
        seat_cats.extend([c.name] * (len(labels) - lo))
        capacity = len(labels) - lo if seated else c.capacity
        cats.append(
            {
                "name": c.name,
                "p": c.price,
                "s": int(seated),
                "cap": capacity,
                "lo": lo,
                "hi": len(labels) - 1,
                "nb": blocks,
            }
        )
    if len(set(labels)) != len(labels):
        raise errors.ValidationError("seat labels must be unique within the event")
    meta = live.meta_hash(
        body.name,
        body.starts_at,
        body.on_sale_at,
        "on_sale",
        body.hold_ttl_seconds,
        body.max_per_order,
        body.max_per_customer,
        body.categories[0].currency,
        names,
        _room(body.waiting_room),
    )
    return live.Plan(meta, cats, labels, seat_cats, places)


def _room(room: schemas.WaitingRoom | None) -> live.Room | None:
    if room is None:
        return None
    return live.Room(room.admit_per_minute, room.pass_ttl_seconds, room.opens_at)


def _room_columns(room: schemas.WaitingRoom | None) -> dict[str, Any]:
    return {
        "waiting_room_admit_per_minute": room and room.admit_per_minute,
        "waiting_room_pass_ttl_seconds": room and room.pass_ttl_seconds,
        "waiting_room_opens_at": room and room.opens_at,
    }


async def create_event(svc: Services, body: schemas.EventCreate) -> schemas.Event:
    """PostgreSQL, Redis's registry of live events and the event's own node are written
    apart, in the order where a failure at any step leaves no event that sells without
    its PostgreSQL row: PostgreSQL first (committed), then the registry, so that no event
    is ever loaded that the workers do not find, then the live state last; a failure
    after PostgreSQL is undone. (Registered just before the load, not before PostgreSQL:
    a worker that found the id earlier would make its outbox group, and the load clears
    the event's keys.)"""
    plan = _plan(body)
    await _insert(svc, body, plan)
    try:
        await live.announce(svc, body.id)
        await live.register(svc, body.id)
        # The load replaces the event's keys; a queue left by an event of the same id
        # (created and undone) goes with them.
        await svc.redis.delete(*event_keys(body.id).queue)
        await live.load(svc, body.id, plan, "create")
    except BaseException:
        await _undo_create(svc, body.id)
        raise
    live.MISSES.forget(body.id)
    return await view_event(svc, body.id)


async def _insert(svc: Services, body: schemas.EventCreate, plan: live.Plan) -> None:
    async with svc.engine.begin() as conn:
        created = await conn.execute(
            insert(events)
            .values(
                id=body.id,
                name=body.name,
                starts_at=body.starts_at,
                on_sale_at=body.on_sale_at,
                status="on_sale",
                hold_ttl_seconds=body.hold_ttl_seconds,
                max_per_order=body.max_per_order,
                max_per_customer=body.max_per_customer,
                currency=plan.meta["currency"],
                **_room_columns(body.waiting_room),
            )
            .on_conflict_do_nothing()
            .returning(events.c.id)
        )
        if created.first() is None:
            raise errors.EventExists(f"event {body.id!r} exists")
        await conn.execute(
            categories.insert(),
            [
                {
                    "event_id": body.id,
                    "name": c["name"],
                    "position": i,
                    "price": c["p"],
                    "seated": bool(c["s"]),
                    "capacity": c["cap"],
                }
                for i, c in enumerate(plan.cats)
            ],
        )
        await _insert_seats(conn, body.id, plan)


async def _undo_create(svc: Services, event_id: str) -> None:
    """After a registration or a load that failed (its answer lost, or the event half
    loaded): the live state goes first, and only once Redis surely has none the
    PostgreSQL rows, so that no moment exists where Redis has the event and PostgreSQL
    does not. When Redis cannot be reached, PostgreSQL keeps the event: Redis may have
    it, and otherwise loads it on first use."""
    try:
        await live.unload(svc, event_id)
        async with svc.engine.begin() as conn:
            await conn.execute(events.delete().where(events.c.id == event_id))
        # A request for the new id may have loaded it from PostgreSQL meanwhile.
        await live.unload(svc, event_id)
    except Exception as e:
        errors.log_failure(
            log, f"undoing the failed create of {event_id!r}: PostgreSQL keeps the event", e
        )
        return
    with contextlib.suppress(Exception):
        await live.unregister(svc, event_id)  # else reconcile --repair prunes it


async def _insert_seats(conn: AsyncConnection, event_id: str, plan: live.Plan) -> None:
    if not plan.labels:
        return
    raw = await conn.get_raw_connection()
    copy = raw.driver_connection.copy_records_to_table  # type: ignore[union-attr]
    # COPY: an event of 200,000 seats is created in a second, not a minute of INSERTs. In
    # statements of SEATS_PER_COPY: the command timeout bounds each statement, to notice a
    # hung server, and one COPY of 200,000 seats met the default 10 s on a busy machine.
    n = len(plan.labels)
    for start in range(0, n, SEATS_PER_COPY):
        await copy(
            "seats",
            records=[
                (event_id, plan.labels[i], plan.seat_cats[i], i, *plan.places[i])
                for i in range(start, min(n, start + SEATS_PER_COPY))
            ],
            columns=["event_id", "label", "category", "position", "row", "number"],
        )


# --- read ---------------------------------------------------------------------------


class _View(msgspec.Struct):
    meta: dict[str, str]
    cats: dict[str, str]
    cap: dict[str, str]
    avail: dict[str, str]
    now: int


class _Cat(msgspec.Struct):
    p: int
    s: int


_decode_view = msgspec.json.Decoder(_View).decode
_decode_cat = msgspec.json.Decoder(_Cat).decode


async def view_event(svc: Services, event_id: str) -> schemas.Event:
    try:
        v = _decode_view(await live.call_loaded(svc, "view", event_id))
    except errors.EventArchived:
        return await archived.view(svc, event_id)
    m = v.meta
    on_sale_at = int(m["on_sale_at"]) if m["on_sale_at"] else None
    cats = []
    for name in msgspec.json.decode(m["order"], type=list[str]):
        c = _decode_cat(v.cats[name])
        cats.append(
            schemas.Category(
                name=name,
                price=c.p,
                currency=m["currency"],
                seated=bool(c.s),
                capacity=int(v.cap[name]),
                available=int(v.avail[name]),
            )
        )
    return schemas.Event(
        id=event_id,
        name=m["name"],
        starts_at=from_ms(int(m["starts_at"])),
        status=event_status(m["status"], on_sale_at, v.now),
        on_sale_at=None if on_sale_at is None else from_ms(on_sale_at),
        hold_ttl_seconds=int(m["ttl"]),
        max_per_order=int(m["mpo"]),
        max_per_customer=int(m["mpc"]) if m["mpc"] else None,
        categories=cats,
        archived=False,
        waiting_room=_room_view(m),
    )


def _room_view(m: dict[str, str]) -> schemas.WaitingRoomView | None:
    # An event loaded by an earlier version has none of the room's fields: no room.
    if not m.get("qapm"):
        return None
    return schemas.WaitingRoomView(
        admit_per_minute=int(m["qapm"]),
        pass_ttl_seconds=int(m["qttl"]),
        opens_at=from_ms(int(m["qopens"])) if m.get("qopens") else None,
    )


async def list_events(svc: Services) -> schemas.EventList:
    async with svc.engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    events.c.id,
                    events.c.name,
                    events.c.starts_at,
                    events.c.status,
                    events.c.on_sale_at,
                ).order_by(events.c.starts_at, events.c.id)
            )
        ).all()
    now = now_ms()
    return schemas.EventList(
        events=[
            schemas.EventSummary(
                id=r.id,
                name=r.name,
                starts_at=from_ms(to_ms(r.starts_at)),
                status=event_status(
                    r.status, None if r.on_sale_at is None else to_ms(r.on_sale_at), now
                ),
            )
            for r in rows
        ]
    )


# --- change -------------------------------------------------------------------------


async def patch_event(svc: Services, event_id: str, body: schemas.EventPatch) -> schemas.Event:
    changes: dict[str, Any] = {}
    values: dict[str, Any] = {}
    if body.status is not None:
        changes["status"] = values["status"] = body.status
    if body.name is not None:
        changes["name"] = values["name"] = body.name
    if body.on_sale_at is not msgspec.UNSET:
        values["on_sale_at"] = body.on_sale_at
        changes["on_sale_at"] = "" if body.on_sale_at is None else to_ms(body.on_sale_at)
    if body.waiting_room is not msgspec.UNSET:
        room = body.waiting_room
        values.update(_room_columns(room))
        changes.update(live.room_meta(_room(room)))
    caps = {c.name: c.capacity for c in body.categories or []}
    if len(caps) != len(body.categories or []):
        raise errors.ValidationError("a category appears at most once")
    if caps:
        changes["caps"] = caps
    if body.status == "on_sale":
        await _reopen(svc, event_id)
    configured: dict[str, Any] | None = None
    try:
        async with svc.engine.begin() as conn:
            # The row lock serialises admin changes of one event between PostgreSQL and Redis.
            found = (
                await conn.execute(
                    sa.select(events).where(events.c.id == event_id).with_for_update()
                )
            ).first()
            if found is None:
                raise errors.EventNotFound(f"no event {event_id!r}")
            if found.archived_at is not None:  # and this PATCH does not reopen it
                await archived.patch(conn, event_id, values, caps)
            else:
                configured = await _patch_live(svc, conn, found, values, caps, changes)
    except BaseException:
        if configured is not None:
            # Redis took the change and PostgreSQL did not (the commit failed): put Redis
            # back. If that fails too, reconcile aligns the capacities with PostgreSQL.
            with contextlib.suppress(Exception):
                await _configure(svc, event_id, configured)
        raise
    finally:
        waitingroom.ROOMS.forget(event_id)
        roomstate.ROOMS.stale(event_id)
    return await view_event(svc, event_id)


async def _patch_live(
    svc: Services,
    conn: AsyncConnection,
    found: sa.Row[Any],
    values: dict[str, Any],
    caps: dict[str, int],
    changes: dict[str, Any],
) -> dict[str, Any]:
    """PostgreSQL in the caller's transaction, then Redis; the changes that undo Redis's."""
    event_id = found.id
    if values:
        await conn.execute(events.update().where(events.c.id == event_id).values(**values))
    rows = await conn.execute(
        sa.select(categories.c.name, categories.c.capacity).where(
            categories.c.event_id == event_id, categories.c.name.in_(caps)
        )
    )
    old_caps = {r.name: r.capacity for r in rows}
    for name, cap in caps.items():
        await conn.execute(
            categories.update()
            .where(categories.c.event_id == event_id, categories.c.name == name)
            .values(capacity=cap)
        )
    # Redis refuses (and PostgreSQL rolls back) a capacity below what is committed.
    await _configure(svc, event_id, changes)
    return _undo_changes(found, changes, old_caps)


async def _reopen(svc: Services, event_id: str) -> None:
    """Before a PATCH puts an event on sale: one that is over starts its time afresh (so
    that the worker does not take it straight back out of Redis), and one that is archived
    is archived no more, committed first, so that the PATCH's own call loads it from
    PostgreSQL as any event Redis lacks is loaded."""
    async with svc.engine.begin() as conn:
        row, now = await archive.event_row(conn, event_id, lock=True)
        if row.archived_at is None and not archive.is_over(
            row, now, svc.settings.archive_after_seconds
        ):
            return
        await conn.execute(
            events.update()
            .where(events.c.id == event_id)
            .values(archived_at=None, archive_asked_at=None, reopened_at=now)
        )


async def _configure(svc: Services, event_id: str, changes: dict[str, Any]) -> None:
    """lua/configure.lua: the event's live state changed as PATCH asks (or put back)."""
    await live.call_loaded(
        svc,
        "configure",
        event_id,
        msgspec.json.encode(changes),
        extra_keys=event_keys(event_id).queue,
    )


def _undo_changes(
    before: sa.Row[Any], changes: dict[str, Any], caps: dict[str, int]
) -> dict[str, Any]:
    """The configure changes that put back what `changes` changed."""
    undo: dict[str, Any] = {}
    if "status" in changes:
        undo["status"] = before.status
    if "name" in changes:
        undo["name"] = before.name
    if "on_sale_at" in changes:
        undo["on_sale_at"] = "" if before.on_sale_at is None else to_ms(before.on_sale_at)
    if "qapm" in changes:
        undo.update(live.room_meta(live.room_of(before)))
    if caps:
        undo["caps"] = caps
    return undo
