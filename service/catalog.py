"""Events, categories and seats: written to PostgreSQL, loaded into Redis, read back live."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter, OrderedDict
from datetime import datetime
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from service import errors, ledger, schemas
from service.context import Services
from service.db import categories, events, seats
from service.keys import EVENTS, event_keys
from service.scripts import NO_ORDER, NOT_LOADED, RETRY, Idempotency, raise_for_error
from service.timefmt import from_ms, now_ms, to_ms

MAX_SEATS = 200_000
# Unknown event ids a process remembers (briefly) at most.
MISSES_CACHED = 10_000
# A script asks to be called again after the event was loaded, or after a reclaim; more
# than a few rounds means something else keeps interfering.
MAX_ROUNDS = 8
# Seats per load_seats.lua call: a few ms of Redis time each, whatever the event's size.
LOAD_CHUNK = 500
# A load that stops renewing its lease this long (its process died) is taken over.
LOAD_LEASE_MS = 5000
# How long a load waits for another process's load of the same event to finish.
LOAD_WAIT_SECONDS = 30


async def call(
    svc: Services,
    name: str,
    event_id: str,
    *args: str | bytes | int,
    extra_keys: tuple[str, ...] = (),
    idempotency: Idempotency | None = None,
) -> bytes:
    """Call an event script, loading the event from PostgreSQL first when Redis lost it
    and reclaiming overdue holds when the script says they may be in the way."""
    for _ in range(MAX_ROUNDS):
        reply = await svc.scripts.call(
            name, event_id, *args, extra_keys=extra_keys, idempotency=idempotency
        )
        if reply == NOT_LOADED:
            await restore(svc, event_id)
        elif reply == RETRY:
            await reclaim_all(svc, event_id)
        elif reply == NO_ORDER:
            await load_seat_order(svc, event_id)
        else:
            raise_for_error(reply)
            return reply
    raise errors.Unavailable("the event's live state kept changing; try again")


async def reclaim_all(svc: Services, event_id: str) -> None:
    """Expire every overdue hold of the event, a bounded batch per script call."""
    while await svc.scripts.call("reclaim", event_id):
        pass


# --- create -------------------------------------------------------------------------


class _Plan(msgspec.Struct):
    """An event as the load script wants it."""

    meta: dict[str, str | int]
    cats: list[dict[str, Any]]
    labels: list[str]
    seat_cats: list[str]
    # Per seat, where it stands: (row, number) for a seat from a block, else (None, None).
    places: list[tuple[str | None, int | None]]


def _plan(body: schemas.EventCreate) -> _Plan:
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
    meta = _meta(
        body.name,
        body.starts_at,
        body.on_sale_at,
        "on_sale",
        body.hold_ttl_seconds,
        body.max_per_order,
        body.max_per_customer,
        body.categories[0].currency,
        names,
    )
    return _Plan(meta, cats, labels, seat_cats, places)


def _meta(
    name: str,
    starts_at: datetime,
    on_sale_at: datetime | None,
    status: str,
    ttl: int,
    max_per_order: int,
    max_per_customer: int | None,
    currency: str,
    category_names: list[str],
) -> dict[str, str | int]:
    """The event's `meta` hash (lua/lib.lua)."""
    return {
        "name": name,
        "starts_at": to_ms(starts_at),
        "on_sale_at": "" if on_sale_at is None else to_ms(on_sale_at),
        "status": status,
        "ttl": ttl,
        "mpo": max_per_order,
        "mpc": "" if max_per_customer is None else max_per_customer,
        "currency": currency,
        "order": msgspec.json.encode(category_names).decode(),
    }


async def create_event(svc: Services, body: schemas.EventCreate) -> schemas.Event:
    plan = _plan(body)
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
        # Redis is loaded before the commit: if loading fails, PostgreSQL rolls back too.
        await _load(svc, body.id, plan, "create")
    MISSES.forget(body.id)
    return await view_event(svc, body.id)


async def _insert_seats(conn: AsyncConnection, event_id: str, plan: _Plan) -> None:
    if not plan.labels:
        return
    raw = await conn.get_raw_connection()
    # COPY: an event of 200,000 seats is created in a second, not a minute of INSERTs.
    await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
        "seats",
        records=[
            (event_id, label, plan.seat_cats[i], i, *plan.places[i])
            for i, label in enumerate(plan.labels)
        ],
        columns=["event_id", "label", "category", "position", "row", "number"],
    )


async def _load(svc: Services, event_id: str, plan: _Plan, mode: str) -> None:
    """Load the event into Redis (mode: lua/load.lua), a chunk of seats or bookings per
    call. Another process's load of the same event is waited for; one that died is
    taken over."""
    deadline = time.monotonic() + LOAD_WAIT_SECONDS
    token = secrets.token_hex(8)
    while not await _load_once(svc, event_id, plan, mode, token):
        if time.monotonic() > deadline:
            raise errors.Unavailable("the event is being loaded; try again")
        await asyncio.sleep(0.05)
    if mode != "order":
        await svc.redis.sadd(EVENTS, event_id)


async def _load_once(svc: Services, event_id: str, plan: _Plan, mode: str, token: str) -> bool:
    """One try: True when the event is loaded (by this load or another), False while
    another load holds the event's lease."""
    enc = msgspec.json.encode
    ranges = enc([[c["name"], c["lo"], c["hi"]] for c in plan.cats])
    keys = event_keys(event_id).load_keys
    firsts = [""] + [str(i) for i in range(0, len(plan.labels), LOAD_CHUNK)]
    for first in firsts:
        chunk = plan.labels[int(first) : int(first) + LOAD_CHUNK] if first else []
        reply = await svc.scripts.call(
            "load_seats",
            event_id,
            mode,
            token,
            LOAD_LEASE_MS,
            ranges,
            first,
            *chunk,
            extra_keys=keys,
        )
        if reply != b"ok":
            return reply == b"loaded"
    cursor = b"0" if mode == "restore" else b"done"
    while cursor != b"done":
        cursor = await svc.scripts.call(
            "load_bookings", event_id, token, LOAD_LEASE_MS, cursor, extra_keys=keys
        )
        if cursor == b"busy":
            return False
    meta, cats = (enc(plan.meta), enc(plan.cats)) if mode != "order" else (b"", b"")
    reply = await svc.scripts.call(
        "load", event_id, mode, token, len(plan.labels), meta, cats, extra_keys=keys
    )
    return reply != b"busy"


async def load_seat_order(svc: Services, event_id: str) -> None:
    """Build the seat order list of an event that an earlier version loaded without one."""
    async with svc.engine.connect() as conn:
        labels = (
            await conn.execute(
                sa.select(seats.c.label)
                .where(seats.c.event_id == event_id)
                .order_by(seats.c.position)
            )
        ).scalars()
        plan = _Plan({}, [], list(labels), [], [])
    await _load(svc, event_id, plan, "order")


async def ensure_loaded(svc: Services, event_id: str) -> None:
    """Raise EventNotFound for an unknown event; load one that Redis lost."""
    if not await svc.redis.exists(event_keys(event_id).meta):
        await restore(svc, event_id)


async def live_event_ids(svc: Services) -> list[str]:
    """Events loaded into Redis, for the background workers and /metrics to visit."""
    members: set[Any] = await svc.redis.smembers(EVENTS)
    return sorted(m.decode() for m in members)


# --- restore ------------------------------------------------------------------------


class _Misses:
    """Event ids that PostgreSQL did not have a moment ago, in this process: requests for
    an unknown event would otherwise each cost a query. Only a restore asks, and a restore
    only runs for an event Redis does not have: an event created since (by any process)
    is in Redis at once, so this never hides it."""

    def __init__(self, size: int) -> None:
        self._until: OrderedDict[str, float] = OrderedDict()
        self._size = size

    def missing(self, event_id: str) -> bool:
        until = self._until.get(event_id)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._until[event_id]
        return False

    def add(self, event_id: str, seconds: float) -> None:
        if seconds <= 0:
            return
        self._until[event_id] = time.monotonic() + seconds
        self._until.move_to_end(event_id)
        if len(self._until) > self._size:
            self._until.popitem(last=False)

    def forget(self, event_id: str) -> None:
        self._until.pop(event_id, None)

    def __len__(self) -> int:
        return len(self._until)


MISSES = _Misses(MISSES_CACHED)


async def restore(svc: Services, event_id: str) -> None:
    """Load an event that PostgreSQL has and Redis lost (or never had). Its bookings are
    adopted first, so that the load counts them as sold: never more stock than
    PostgreSQL allows."""
    if MISSES.missing(event_id):
        raise errors.EventNotFound(f"no event {event_id!r}")
    async with svc.engine.connect() as conn:
        ev = (await conn.execute(sa.select(events).where(events.c.id == event_id))).first()
        if ev is None:
            MISSES.add(event_id, svc.settings.unknown_event_cache_seconds)
            raise errors.EventNotFound(f"no event {event_id!r}")
        cats = (
            await conn.execute(
                sa.select(categories)
                .where(categories.c.event_id == event_id)
                .order_by(categories.c.position)
            )
        ).all()
        seat_rows = (
            await conn.execute(
                sa.select(seats.c.label, seats.c.category, seats.c.row)
                .where(seats.c.event_id == event_id)
                .order_by(seats.c.position)
            )
        ).all()
    per_category = Counter(r.category for r in seat_rows)
    # A category's block seats come first in its seat order: counting them is enough.
    in_blocks = Counter(r.category for r in seat_rows if r.row is not None)
    plan_cats: list[dict[str, Any]] = []
    pos = 0
    for c in cats:
        n = per_category[c.name]
        plan_cats.append(
            {
                "name": c.name,
                "p": c.price,
                "s": int(c.seated),
                "cap": c.capacity,
                "lo": pos,
                "hi": pos + n - 1,
                "nb": in_blocks[c.name],
            }
        )
        pos += n
    meta = _meta(
        ev.name,
        ev.starts_at,
        ev.on_sale_at,
        ev.status,
        ev.hold_ttl_seconds,
        ev.max_per_order,
        ev.max_per_customer,
        ev.currency,
        [c.name for c in cats],
    )
    await ledger.adopt(svc, event_id)
    plan = _Plan(meta, plan_cats, [r.label for r in seat_rows], [], [])
    await _load(svc, event_id, plan, "restore")


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


def event_status(status: str, on_sale_at_ms: int | None, now: int) -> schemas.EventStatus:
    if status == "on_sale" and on_sale_at_ms is not None and now < on_sale_at_ms:
        return "scheduled"
    return status  # type: ignore[return-value]


async def view_event(svc: Services, event_id: str) -> schemas.Event:
    v = _decode_view(await call(svc, "view", event_id))
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
    caps = {c.name: c.capacity for c in body.categories or []}
    if len(caps) != len(body.categories or []):
        raise errors.ValidationError("a category appears at most once")
    if caps:
        changes["caps"] = caps
    async with svc.engine.begin() as conn:
        # The row lock serialises admin changes of one event between PostgreSQL and Redis.
        found = await conn.execute(
            sa.select(events.c.id).where(events.c.id == event_id).with_for_update()
        )
        if found.first() is None:
            raise errors.EventNotFound(f"no event {event_id!r}")
        if values:
            await conn.execute(events.update().where(events.c.id == event_id).values(**values))
        for name, cap in caps.items():
            await conn.execute(
                categories.update()
                .where(categories.c.event_id == event_id, categories.c.name == name)
                .values(capacity=cap)
            )
        # Redis refuses (and PostgreSQL rolls back) a capacity below what is committed.
        await call(svc, "configure", event_id, msgspec.json.encode(changes))
    return await view_event(svc, event_id)
