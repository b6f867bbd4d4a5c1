"""An event's live state in Redis: script calls that load an event Redis lacks, reclaim
overdue holds, and the loading itself (from PostgreSQL, which holds the catalog)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from service.core import errors
from service.core.db import categories, events, seats
from service.core.keys import EVENT_CREATED, EVENTS, event_keys
from service.core.timefmt import to_ms
from service.durable import ledger
from service.hotpath.context import Services
from service.hotpath.scripts import NO_ORDER, NOT_LOADED, RETRY, Idempotency, raise_for_error

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


# Replies that ask for something first: the event loaded, overdue holds reclaimed, the
# seat order loaded. Nothing was done; the call is made again once that is done.
DETOURS = frozenset({NOT_LOADED, RETRY, NO_ORDER})


async def call_loaded(
    svc: Services,
    name: str,
    event_id: str,
    *args: str | bytes | int,
    extra_keys: tuple[str, ...] = (),
    idempotency: Idempotency | None = None,
    durable: bool = False,
    reply: bytes | None = None,
) -> bytes:
    """Call an event script and have the event loaded for it (Scripts.call_event gives the
    reply as it is): loaded from PostgreSQL first when Redis lost it, overdue holds
    reclaimed when the script says they may be in the way, an error reply raised as its
    domain error. `durable`: see Scripts.call_event. `reply`: the first call's, when the
    caller made it (service/selling/sales.py, which comes here only for a detour)."""
    for _ in range(MAX_ROUNDS):
        if reply is None:
            reply = await svc.scripts.call_event(
                name,
                event_id,
                *args,
                extra_keys=extra_keys,
                idempotency=idempotency,
                durable=durable,
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
        reply = None
    raise errors.Unavailable("the event's live state kept changing; try again")


async def reclaim_all(svc: Services, event_id: str) -> None:
    """Expire every overdue hold of the event, a bounded batch per script call."""
    while await svc.scripts.call_event("reclaim", event_id):
        pass


# --- load ---------------------------------------------------------------------------


class Plan(msgspec.Struct):
    """An event as the load script wants it."""

    meta: dict[str, str | int]
    cats: list[dict[str, Any]]
    labels: list[str]
    seat_cats: list[str]
    # Per seat, where it stands: (row, number) for a seat from a block, else (None, None).
    places: list[tuple[str | None, int | None]]


def meta_hash(
    name: str,
    starts_at: datetime,
    on_sale_at: datetime | None,
    status: str,
    ttl: int,
    max_per_order: int,
    max_per_customer: int | None,
    currency: str,
    category_names: list[str],
    room: Room | None = None,
) -> dict[str, str | int]:
    """The event's `meta` hash (lua/lib.lua)."""
    return {
        **room_meta(room),
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


class Room(msgspec.Struct, frozen=True):
    """An event's waiting room, as PostgreSQL keeps it."""

    admit_per_minute: int
    pass_ttl_seconds: int
    opens_at: datetime | None


def room_meta(room: Room | None) -> dict[str, str | int]:
    """The waiting room's fields of the `meta` hash (lua/lib.lua): "" for none."""
    if room is None:
        return {"qapm": "", "qttl": "", "qopens": ""}
    return {
        "qapm": room.admit_per_minute,
        "qttl": room.pass_ttl_seconds,
        "qopens": "" if room.opens_at is None else to_ms(room.opens_at),
    }


async def load(svc: Services, event_id: str, plan: Plan, mode: str) -> None:
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
        await register(svc, event_id)


async def _load_once(svc: Services, event_id: str, plan: Plan, mode: str, token: str) -> bool:
    """One try: True when the event is loaded (by this load or another), False while
    another load holds the event's lease."""
    enc = msgspec.json.encode
    ranges = enc([[c["name"], c["lo"], c["hi"]] for c in plan.cats])
    keys = event_keys(event_id).load_keys
    firsts = [""] + [str(i) for i in range(0, len(plan.labels), LOAD_CHUNK)]
    for first in firsts:
        chunk = plan.labels[int(first) : int(first) + LOAD_CHUNK] if first else []
        reply = await svc.scripts.call_event(
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
        cursor = await svc.scripts.call_event(
            "load_bookings", event_id, token, LOAD_LEASE_MS, cursor, extra_keys=keys
        )
        if cursor == b"busy":
            return False
    meta, cats = (enc(plan.meta), enc(plan.cats)) if mode != "order" else (b"", b"")
    reply = await svc.scripts.call_event(
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
        plan = Plan({}, [], list(labels), [], [])
    await load(svc, event_id, plan, "order")


async def ensure_loaded(svc: Services, event_id: str) -> None:
    """Raise EventNotFound for an unknown event; load one that Redis lost. An archived
    event exists and stays out of Redis: its readers ask PostgreSQL."""
    if not await svc.redis.exists(event_keys(event_id).meta):
        with contextlib.suppress(errors.EventArchived):
            await restore(svc, event_id)


# --- the registry of live events ----------------------------------------------------
# It sits on some node of its own (a cluster puts it apart from every event), so it is
# written apart from an event's keys: before the event is loaded (an id there without an
# event is skipped by its readers, and pruned), so that no loaded event is missing from
# it, and again once the event is loaded (in load()), in case a prune took it out.


async def register(svc: Services, event_id: str) -> None:
    await svc.redis.sadd(EVENTS, event_id)


async def unregister(svc: Services, event_id: str) -> None:
    """Take the id out of the registry, unless PostgreSQL has the event: looked at after
    the removal, so that an event created meanwhile is put back (its own create registers
    it again once loaded, too)."""
    await svc.redis.srem(EVENTS, event_id)
    if await in_postgres(svc, event_id):
        await svc.redis.sadd(EVENTS, event_id)


async def unregister_archived(svc: Services, event_id: str) -> None:
    """Take an archived event's id out of the registry, unless Redis has the event again
    (a reader that loaded it just before the archive was committed): looked at after the
    removal, and a load registers once more when it ends, so no loaded event is left out."""
    await svc.redis.srem(EVENTS, event_id)
    if await svc.redis.exists(event_keys(event_id).meta):
        await svc.redis.sadd(EVENTS, event_id)


async def prune_registry(svc: Services) -> list[str]:
    """Forget the registered ids of events that neither PostgreSQL nor Redis has (a create
    that failed half-way); the ids pruned."""
    pruned = []
    for event_id in await live_event_ids(svc):
        if await svc.redis.exists(event_keys(event_id).meta) or await in_postgres(svc, event_id):
            continue
        await unregister(svc, event_id)
        pruned.append(event_id)
    return pruned


async def in_postgres(svc: Services, event_id: str) -> bool:
    async with svc.engine.connect() as conn:
        found = await conn.execute(sa.select(events.c.id).where(events.c.id == event_id))
        return found.first() is not None


async def announce(svc: Services, event_id: str) -> None:
    """Tell every API process that the event exists (service/hotpath/eventids.py): after its
    PostgreSQL commit, before it is loaded (a process that misses it reads PostgreSQL)."""
    svc.event_ids.add(event_id)
    await svc.redis.publish(EVENT_CREATED, event_id)


async def unload(svc: Services, event_id: str) -> None:
    """Delete the event's live state (its keys share one slot: one command)."""
    k = event_keys(event_id)
    await svc.redis.delete(*k.all, *k.load_keys, *k.queue)


async def live_event_ids(svc: Services) -> list[str]:
    """Events loaded into Redis, for the background workers and /metrics to visit."""
    members: set[Any] = await svc.redis.smembers(EVENTS)
    return sorted(m.decode() for m in members)


def room_of(row: Any) -> Room | None:
    """The waiting room of an `events` row."""
    if row.waiting_room_admit_per_minute is None:
        return None
    return Room(
        row.waiting_room_admit_per_minute,
        row.waiting_room_pass_ttl_seconds,
        row.waiting_room_opens_at,
    )


async def event_categories(conn: AsyncConnection, event_id: str) -> Sequence[Row[Any]]:
    """The event's category rows, in their order."""
    query = sa.select(categories).where(categories.c.event_id == event_id)
    return (await conn.execute(query.order_by(categories.c.position))).all()


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
    PostgreSQL allows. An archived event is not loaded (EventArchived): only a reopening
    brings it back (catalog.patch_event)."""
    if MISSES.missing(event_id) or not await svc.event_ids.may_exist(svc, event_id):
        raise errors.EventNotFound(f"no event {event_id!r}")
    async with svc.engine.connect() as conn:
        ev = (await conn.execute(sa.select(events).where(events.c.id == event_id))).first()
        if ev is None:
            MISSES.add(event_id, svc.settings.unknown_event_cache_seconds)
            raise errors.EventNotFound(f"no event {event_id!r}")
        if ev.archived_at is not None:
            raise errors.EventArchived(
                f"event {event_id!r} is over and archived; reopen it (status on_sale) to sell"
            )
        cats = await event_categories(conn, event_id)
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
    meta = meta_hash(
        ev.name,
        ev.starts_at,
        ev.on_sale_at,
        ev.status,
        ev.hold_ttl_seconds,
        ev.max_per_order,
        ev.max_per_customer,
        ev.currency,
        [c.name for c in cats],
        room_of(ev),
    )
    await register(svc, event_id)
    await ledger.adopt(svc, event_id)
    plan = Plan(meta, plan_cats, [r.label for r in seat_rows], [], [])
    await load(svc, event_id, plan, "restore")
