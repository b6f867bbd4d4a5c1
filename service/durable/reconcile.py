"""Reconciliation: does Redis (the live state) agree with PostgreSQL (the durable record)?

The check reads everything a chunk at a time (HSCAN, a server-side cursor), so memory
stays bounded by the chunk, plus a set of ids per event to count each record once (HSCAN
may return an element twice). The repair adopts into Redis the bookings it lacks, writes to
PostgreSQL the outbox entries that are stuck, and then recounts the event's live state from
its records in one atomic script (lua/repair.lua): it is safe while the event is selling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import redis.exceptions
import sqlalchemy as sa

from service.core import bookingrules, errors
from service.core.db import bookings, categories, driver, events
from service.core.keys import OUTBOX_GROUP, event_keys
from service.core.records import decode_booking, decode_hold
from service.core.timefmt import from_ms, redis_ms
from service.durable import ledger, live, outbox
from service.durable.writebehind import (
    Entry,
    Poison,
    WriteBehind,
    outbox_state,
    stream_id,
    text,
    write,
)
from service.hotpath.context import Services
from service.hotpath.scripts import NO_ORDER

log = logging.getLogger("boxoffice.reconcile")

# Elements one Redis read returns at most (HSCAN, XRANGE, HMGET): a reply of a few
# hundred kB at most, so that no read holds Redis up for more than a millisecond or so.
CHUNK = 1000
# Seats, and hold or booking records, that one check_seats.lua call reads at most: about
# a millisecond of Redis time, so that a check never holds up the sales it checks.
SEATS_PER_CALL = 250
RECORDS_PER_CALL = 100
# An outbox entry waiting longer than this is stuck, not just waiting.
STUCK_SECONDS = 60
# A hold this long past its deadline and still held has leaked: the sweeper runs every
# couple of seconds, so only a dead worker fleet (or a bug) leaves one this long.
LEAK_GRACE_MS = 10_000
# Problems listed per event; all are counted.
MAX_LISTED = 50
# The check reads a live event a chunk at a time, not in one snapshot: a hold that expires
# between two reads looks like drift for an instant. Drift counts only when each of these
# checks, this far apart, finds it.
CHECKS = 3
RECHECK_SECONDS = 1.0


class Finding(msgspec.Struct, omit_defaults=True):
    """One inconsistency; named apart from the problem details of errors (schemas.Problem)."""

    kind: str
    detail: str


class CategoryReport(msgspec.Struct):
    name: str
    capacity: int | None  # None: not in Redis
    available: int | None
    held: int | None
    sold: int | None
    expected: dict[str, int]  # capacity, available, held, sold from the records
    consistent: bool


class OutboxReport(msgspec.Struct):
    waiting: int
    oldest_seconds: float | None
    stuck: bool
    dead_letters: int


class SeatReport(msgspec.Struct):
    total: int
    available: int
    held: int
    sold: int


class EventReport(msgspec.Struct):
    event_id: str
    consistent: bool
    in_redis: bool
    categories: list[CategoryReport]
    seats: SeatReport
    bookings_in_postgres: int
    outbox: OutboxReport
    leaked_holds: int
    problem_counts: dict[str, int]
    problems: list[Finding]
    repairs: list[str] = msgspec.field(default_factory=list)
    # Over and out of Redis (service/durable/archive.py): checked against PostgreSQL alone.
    archived: bool = False


class Report(msgspec.Struct):
    consistent: bool
    checked_at: str
    repaired: bool
    events: list[EventReport]


class _Findings:
    """What a check of one event found, as it goes."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.listed: list[Finding] = []

    def add(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append(Finding(kind, detail))


async def _hscan(svc: Services, key: str) -> AsyncIterator[list[tuple[bytes, bytes]]]:
    """A hash a chunk at a time, each field once."""
    seen: set[bytes] = set()
    cursor = 0
    while True:
        reply: Any = await svc.redis.hscan(key, cursor, count=CHUNK)
        cursor, chunk = reply
        fresh = [(k, v) for k, v in chunk.items() if k not in seen]
        seen.update(k for k, _ in fresh)
        if fresh:
            yield fresh
        if cursor == 0:
            return


async def _hmget(svc: Services, key: str, fields: list[str]) -> list[Any]:
    """HMGET, CHUNK fields a call."""
    out: list[Any] = []
    for start in range(0, len(fields), CHUNK):
        out += await svc.redis.hmget(key, fields[start : start + CHUNK])
    return out


async def _redis_time(svc: Services) -> int:
    return redis_ms(await svc.redis.time())


class _Changes:
    """Booking changes on their way to PostgreSQL (in the outbox) or stopped on it (dead
    letters): booking ids of confirmations and of cancellations."""

    def __init__(self) -> None:
        self.confirms: set[str] = set()
        self.cancels: set[str] = set()

    def add(self, fields: dict[bytes, bytes]) -> None:
        booking_id = outbox.booking_id(fields)
        if booking_id is None:  # too broken to name its booking: the worker dead-letters it
            return
        if outbox.op(fields) == outbox.CONFIRM:
            self.confirms.add(booking_id)
        elif outbox.op(fields) == outbox.CANCEL:
            self.cancels.add(booking_id)


async def _stream(svc: Services, key: str) -> AsyncIterator[list[tuple[bytes, dict[bytes, bytes]]]]:
    """A stream a chunk at a time."""
    start = "-"
    while True:
        chunk: Any = await svc.redis.xrange(key, min=start, count=CHUNK)
        if chunk:
            yield chunk
        if len(chunk) < CHUNK:
            return
        start = "(" + chunk[-1][0].decode()


async def _outbox_bookings(svc: Services, event_id: str, found: _Findings) -> _Changes:
    """The booking changes in the outbox and in the dead letters; each dead letter is a
    finding (its booking is reported there, not again as not persisted)."""
    changes = _Changes()
    keys = event_keys(event_id)
    acknowledged = await _acknowledged(svc, keys.outbox)
    async for chunk in _stream(svc, keys.outbox):
        for entry_id, fields in chunk:
            if not acknowledged(entry_id):
                changes.add(fields)
    async for chunk in _stream(svc, keys.deadletter):
        for entry_id, fields in chunk:
            changes.add(fields)
            found.add("dead_letters", _describe(entry_id, fields))
    return changes


async def _acknowledged(svc: Services, stream: str) -> Callable[[bytes], bool]:
    """Whether an outbox entry is done with (written, or dead-lettered): delivered to the
    write-behind and no longer pending. The stream keeps some of those until it is
    trimmed; they are not on their way to PostgreSQL."""
    try:
        groups: Any = await svc.redis.xinfo_groups(stream)
    except redis.exceptions.ResponseError:  # no stream yet: nothing was delivered
        return lambda _: False
    group = next((g for g in groups if text(g["name"]) == OUTBOX_GROUP), None)
    if group is None:
        return lambda _: False
    last = stream_id(group["last-delivered-id"])
    pending: set[bytes] = set()
    start = "-"
    while True:
        rows: Any = await svc.redis.xpending_range(stream, OUTBOX_GROUP, start, "+", CHUNK)
        pending.update(r["message_id"] for r in rows)
        if len(rows) < CHUNK:
            break
        start = "(" + rows[-1]["message_id"].decode()
    return lambda entry_id: stream_id(entry_id) <= last and entry_id not in pending


class _Unsure:
    """Booking changes that Redis has and that neither PostgreSQL nor the outbox had when
    they were read: confirmed (or cancelled) since, or lost. Looked for again once the
    rest is checked: the outbox first, then PostgreSQL, so that a change the worker
    writes in between is found in one or the other."""

    def __init__(self) -> None:
        self.confirms: dict[str, tuple[str, str]] = {}  # booking id -> (kind, detail)
        self.cancels: dict[str, tuple[str, str]] = {}

    async def settle(self, svc: Services, event_id: str, found: _Findings) -> None:
        if not self.confirms and not self.cancels:
            return
        changes = await _outbox_bookings(svc, event_id, _Findings())
        confirms = {i: f for i, f in self.confirms.items() if i not in changes.confirms}
        cancels = {i: f for i, f in self.cancels.items() if i not in changes.cancels}
        stored = await _statuses(svc, [*confirms, *cancels])
        for booking_id, (kind, detail) in confirms.items():
            if booking_id not in stored:
                found.add(kind, detail)
        for booking_id, (kind, detail) in cancels.items():
            if stored.get(booking_id) != "cancelled":
                found.add(kind, detail)


async def _statuses(svc: Services, booking_ids: list[str]) -> dict[str, str]:
    """Booking id -> status in PostgreSQL, of those of `booking_ids` it has."""
    ids = []
    for booking_id in booking_ids:
        with contextlib.suppress(ValueError):  # not an id PostgreSQL could have
            ids.append(uuid.UUID(booking_id))
    if not ids:
        return {}
    found: dict[str, str] = {}
    async with svc.engine.connect() as conn:
        for start in range(0, len(ids), CHUNK):
            rows = await conn.execute(
                sa.select(bookings.c.booking_id, bookings.c.status).where(
                    bookings.c.booking_id.in_(ids[start : start + CHUNK])
                )
            )
            found.update((str(r.booking_id), r.status) for r in rows)
    return found


def _describe(entry_id: bytes, fields: dict[bytes, bytes]) -> str:
    def field(name: bytes) -> str:
        return fields.get(name, b"?").decode(errors="replace")

    attempts = fields.get(b"attempts", b"")
    tried = _many(int(attempts), "attempt") if attempts.isdigit() else "attempts unknown"
    return (
        f"dead letter {entry_id.decode()}: {field(b'op')} of booking"
        f" {outbox.booking_id(fields) or '?'}, {tried}: {field(b'error')}"
    )


async def check_event(svc: Services, event_id: str) -> EventReport:
    found = _Findings()
    keys = event_keys(event_id)
    async with svc.engine.connect() as conn:
        cats = {
            r.name: r.capacity
            for r in await conn.execute(
                sa.select(categories.c.name, categories.c.capacity)
                .where(categories.c.event_id == event_id)
                .order_by(categories.c.position)
            )
        }
        archived_at = (
            await conn.execute(sa.select(events.c.archived_at).where(events.c.id == event_id))
        ).scalar_one_or_none()
    in_redis = bool(await svc.redis.exists(keys.meta))
    archived = archived_at is not None and not in_redis
    sold: Counter[str] = Counter()
    held: Counter[str] = Counter()
    changes = await _outbox_bookings(svc, event_id, found)
    now = await _redis_time(svc)

    # PostgreSQL's bookings, against Redis's. Their ids and statuses are kept (a few
    # dozen bytes a booking) to tell Redis's bookings which are persisted.
    in_postgres: dict[str, str] = {}
    async for every in ledger.briefs(svc, event_id):
        in_postgres.update((r.id, r.status) for r in every)
        # A booking that breaks the rules counts for nothing: no stock comes from it.
        chunk = await _valid(svc, event_id, every, found)
        live = await _hmget(svc, keys.bookings, [r.id for r in chunk])
        for r, raw in zip(chunk, live, strict=True):
            if raw is None:
                if in_redis:
                    found.add("booking_unknown_to_redis", f"booking {r.id} ({r.status})")
                if r.status == "confirmed":
                    sold.update(r.quantities)
            elif r.status == "cancelled" and decode_booking(raw).status == "confirmed":
                found.add("booking_status", f"booking {r.id} is cancelled in PostgreSQL only")
        if in_redis:
            sold_seats = {
                label: f"b:{r.id}"
                for r in chunk
                if r.status == "confirmed" and r.id not in changes.cancels
                for label in r.seats
            }
            await _seats_are(
                svc, event_id, sold_seats, "seat_not_sold_in_redis", found, from_redis=False
            )
    outbox = await _outbox(svc, event_id, now, found)
    if archived:
        # Out of Redis on purpose: PostgreSQL's figures are the event's.
        figures = {
            "capacity": dict(cats),
            "available": {name: cap - sold[name] for name, cap in cats.items()},
            "held": dict.fromkeys(cats, 0),
            "sold": {name: sold[name] for name in cats},
        }
        report = _report(
            event_id, found, cats, figures, sold, held, len(in_postgres), outbox, 0, None
        )
        report.in_redis = False
        report.archived = True
        return report
    if not in_redis:
        found.add("event_missing_in_redis", "PostgreSQL has the event, Redis has none of it")
        return _report(event_id, found, cats, None, sold, held, len(in_postgres), outbox, 0, None)

    # Redis's bookings: the sold tickets, each persisted or on its way there (or confirmed
    # after the outbox was read: unsure ones are looked for again at the end).
    unsure = _Unsure()
    async for pairs in _hscan(svc, keys.bookings):
        records = [decode_booking(raw) for _, raw in pairs]
        for b in records:
            if b.status == "confirmed":
                sold.update(b.quantities)
            if b.id not in in_postgres and b.id not in changes.confirms:
                unsure.confirms[b.id] = (
                    "booking_not_persisted",
                    f"booking {b.id}: not in PostgreSQL nor in the outbox",
                )
            elif (
                b.status == "cancelled"
                and in_postgres.get(b.id) == "confirmed"
                and b.id not in changes.cancels
            ):
                unsure.cancels[b.id] = (
                    "booking_not_persisted",
                    f"cancellation of {b.id}: not in PostgreSQL nor in the outbox",
                )
        taken = {
            label: f"b:{b.id}" for b in records if b.status == "confirmed" for label in b.seats
        }
        await _seats_are(svc, event_id, taken, "seat_not_sold", found)

    # Live holds: the held tickets; and the leaked ones.
    leaked = 0
    async for pairs in _hscan(svc, keys.holds):
        holds = [h for h in (decode_hold(raw) for _, raw in pairs) if h.status == "held"]
        for h in holds:
            held.update(h.quantities)
            if h.expires_ms < now - LEAK_GRACE_MS:
                leaked += 1
                found.add(
                    "leaked_hold", f"hold {h.id} expired at {from_ms(h.expires_ms)}, still held"
                )
        taken = {label: f"h:{h.id}" for h in holds for label in h.seats}
        await _seats_are(svc, event_id, taken, "seat_not_held", found)

    seats = await _check_seats(svc, event_id, in_postgres, changes.confirms, unsure, found)
    await unsure.settle(svc, event_id, found)
    counters = await _counters(svc, event_id)
    return _report(
        event_id, found, cats, counters, sold, held, len(in_postgres), outbox, leaked, seats
    )


async def _valid(
    svc: Services, event_id: str, chunk: list[ledger.Brief], found: _Findings
) -> list[ledger.Brief]:
    """The bookings of `chunk` that keep the booking rules; each other is a finding."""
    async with svc.engine.connect() as conn:
        why = await bookingrules.refusals(await driver(conn), [(event_id, r.sale()) for r in chunk])
    for r, reason in zip(chunk, why, strict=True):
        if reason is not None:
            found.add("booking_invalid", f"booking {r.id} in PostgreSQL: {reason}")
    return [r for r, reason in zip(chunk, why, strict=True) if reason is None]


async def _seats_are(
    svc: Services,
    event_id: str,
    expected: dict[str, str],
    kind: str,
    found: _Findings,
    from_redis: bool = True,
) -> None:
    """Each seat in `expected` has that state ("b:<booking>" or "h:<hold>") in Redis.
    `from_redis`: the expectations come from Redis's own records (else PostgreSQL's)."""
    if not expected:
        return
    states = await _hmget(svc, event_keys(event_id).seatstate, list(expected))
    differ = {
        label: want
        for (label, want), state in zip(expected.items(), states, strict=True)
        if (state.decode() if state else "available") != want
    }
    wrong = await _still_wrong(svc, event_id, differ, from_redis) if differ else {}
    for label, (want, have) in wrong.items():
        found.add(kind, f"seat {label} should be {want}, Redis has {have}")


async def _still_wrong(
    svc: Services, event_id: str, wrong: dict[str, str], from_redis: bool
) -> dict[str, tuple[str, str]]:
    """Of seats whose state disagreed with a record read a moment before, those that still
    disagree with their record read again in the same step (a sale meanwhile changes both
    together): label -> (wanted, found). A record that no longer claims the seat (the
    hold ended, the booking was cancelled, or is gone from Redis) wants nothing of it;
    a PostgreSQL booking that Redis lacks still does."""
    keys = event_keys(event_id)
    owners = sorted(set(wrong.values()))
    pipe = svc.redis.pipeline(transaction=True)
    pipe.hmget(keys.seatstate, list(wrong))
    pipe.hmget(keys.holds, [o[2:] for o in owners if o.startswith("h:")] or ["-"])
    pipe.hmget(keys.bookings, [o[2:] for o in owners if o.startswith("b:")] or ["-"])
    states, holds, books = await pipe.execute()
    records = dict(zip([o for o in owners if o.startswith("h:")], holds, strict=False))
    records.update(zip([o for o in owners if o.startswith("b:")], books, strict=False))
    out = {}
    for (label, want), state in zip(wrong.items(), states, strict=True):
        have = state.decode() if state else "available"
        raw = records.get(want)
        if raw is None:
            claims = not from_redis
        elif want.startswith("h:"):
            hold = decode_hold(raw)
            claims = hold.status == "held" and label in hold.seats
        else:
            booking = decode_booking(raw)
            claims = booking.status == "confirmed" and label in booking.seats
        if claims and have != want:
            out[label] = (want, have)
    return out


class _SeatChunk(msgspec.Struct):
    next: int
    total: int
    available: int
    held: int
    sold: int
    problems: list[tuple[str, str]] = []
    booked: list[str] = []


_decode_seats = msgspec.json.Decoder(_SeatChunk).decode


async def _check_seats(
    svc: Services,
    event_id: str,
    in_postgres: dict[str, str],
    on_the_way: set[str],
    unsure: _Unsure,
    found: _Findings,
) -> SeatReport:
    """Every seat in exactly one state, and a held or sold one backed by its record:
    checked by a read-only script a chunk at a time, next to the data, each call short
    (lua/check_seats.lua) however big the event."""
    tally = SeatReport(0, 0, 0, 0)
    order = (event_keys(event_id).seat_order,)
    first, built = 0, False
    while first >= 0:
        args = (first, SEATS_PER_CALL, RECORDS_PER_CALL)
        reply = await svc.scripts.call_event("check_seats", event_id, *args, extra_keys=order)
        if reply == NO_ORDER and not built:  # loaded by an earlier version: build the list
            await live.load_seat_order(svc, event_id)
            built = True
            continue
        if reply == NO_ORDER:  # PostgreSQL has no seats for Redis's seat map
            found.add("seat_order_missing", "Redis has seats, and no seat order to check them by")
            return tally
        chunk = _decode_seats(reply)
        tally.total += chunk.total
        tally.available += chunk.available
        tally.held += chunk.held
        tally.sold += chunk.sold
        for kind, detail in chunk.problems:
            found.add(kind, detail)
        for booking_id in chunk.booked:
            if booking_id not in in_postgres and booking_id not in on_the_way:
                unsure.confirms.setdefault(
                    booking_id,
                    ("seat_without_record", f"booking {booking_id} is nowhere durable"),
                )
        first = chunk.next
    return tally


async def _counters(svc: Services, event_id: str) -> dict[str, dict[str, int]]:
    keys = event_keys(event_id)
    pipe = svc.redis.pipeline(transaction=False)
    for key in (keys.cap, keys.avail, keys.held, keys.sold):
        pipe.hgetall(key)
    cap, avail, held, sold = await pipe.execute()
    return {
        name: {k.decode(): int(v) for k, v in values.items()}
        for name, values in (
            ("capacity", cap),
            ("available", avail),
            ("held", held),
            ("sold", sold),
        )
    }


def _many(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one}" if n == 1 else f"{n} {many or one + 's'}"


async def _outbox(svc: Services, event_id: str, now: int, found: _Findings) -> OutboxReport:
    state = await outbox_state(svc, event_id)
    oldest = None if state.oldest_ms is None else max(0.0, (now - state.oldest_ms) / 1000)
    stuck = oldest is not None and oldest > STUCK_SECONDS
    if stuck:
        waiting = _many(state.backlog, "entry", "entries")
        found.add("outbox_stuck", f"{waiting} waiting, the oldest for {oldest:.0f} s")
    return OutboxReport(state.backlog, oldest, stuck, state.dead_letters)


def _report(
    event_id: str,
    found: _Findings,
    cats: dict[str, int],
    counters: dict[str, dict[str, int]] | None,
    sold: Counter[str],
    held: Counter[str],
    pg_count: int,
    outbox: OutboxReport,
    leaked: int,
    seats: SeatReport | None,
) -> EventReport:
    reports = []
    for name, capacity in cats.items():
        expected = {
            "capacity": capacity,
            "available": capacity - held[name] - sold[name],
            "held": held[name],
            "sold": sold[name],
        }
        actual = {k: (counters or {}).get(k, {}).get(name) for k in expected}
        ok = counters is not None and actual == expected
        if counters is not None and not ok:
            found.add(
                "counter_mismatch",
                f"{name}: Redis has {actual}, the records say {expected}",
            )
        if any(v is not None and v < 0 for v in actual.values()):
            found.add("negative_counter", f"{name}: {actual}")
        reports.append(CategoryReport(name, **actual, expected=expected, consistent=ok))
    return EventReport(
        event_id=event_id,
        consistent=not found.counts,
        in_redis=counters is not None,
        categories=reports,
        seats=seats or SeatReport(0, 0, 0, 0),
        bookings_in_postgres=pg_count,
        outbox=outbox,
        leaked_holds=leaked,
        problem_counts=dict(found.counts),
        problems=found.listed,
    )


# --- repair -----------------------------------------------------------------------------


async def repair_event(svc: Services, event_id: str) -> list[str]:
    """Put Redis back in line with the records; returns what it changed."""
    keys = event_keys(event_id)
    done: list[str] = []
    if not await svc.redis.exists(keys.meta):
        try:
            await live.restore(svc, event_id)
        except errors.EventArchived:
            return ["none: the event is archived (out of Redis on purpose)"]
        return ["loaded the event from PostgreSQL (catalog and bookings)"]
    added, refused = await ledger.adopt(svc, event_id)
    if added:
        done.append(f"adopted {_many(added, 'booking')} that only PostgreSQL had")
    if refused:
        done.append(f"left out {_many(len(refused), 'booking')} that break the rules")
    done += await _redrive(svc, event_id)
    done += await _align_capacity(svc, event_id)
    summary = msgspec.json.decode(await live.call_loaded(svc, "repair", event_id))
    for name, after in summary["categories"].items():
        before = summary["before"][name]
        if before != after:
            done.append(f"{name}: counters {before} -> {after}")
    if summary["expired"]:
        done.append(f"released {_many(summary['expired'], 'hold')} past their deadline")
    if summary.get("released"):
        held = "hold" if len(summary["released"]) == 1 else "holds"
        done.append(f"released {held} {', '.join(summary['released'])}: their seats are sold")
    return done


async def _redrive(svc: Services, event_id: str) -> list[str]:
    """Write to PostgreSQL what should be there and is not: the outbox (whatever a dead or
    absent worker left), dead letters, and Redis's bookings whose entries were lost or
    dead-lettered. Idempotent, like the worker itself. What PostgreSQL still refuses is
    left as it is (reported, and the check that follows finds the drift); only a server
    that is away stops the repair."""
    keys = event_keys(event_id)
    done: list[str] = []
    if drained := await WriteBehind(svc, "reconcile").drain(event_id):
        done.append(f"wrote {_many(drained, 'outbox entry', 'outbox entries')} to PostgreSQL")
    redriven = 0
    async for chunk in _stream(svc, keys.deadletter):
        for entry_id, fields in chunk:
            if (
                await _try_write(svc, [(event_id, entry_id, outbox.original_fields(fields))])
                is None
            ):
                await svc.redis.xdel(keys.deadletter, entry_id)
                redriven += 1
    if redriven:
        done.append(f"re-drove {_many(redriven, 'dead letter')} into PostgreSQL")
    done += await _write_lost(svc, event_id)
    if resolved := await _resolve_dead_letters(svc, event_id):
        done.append(f"removed {_many(resolved, 'dead letter')} whose change PostgreSQL now has")
    return done


async def _try_write(svc: Services, entries: list[Entry]) -> str | None:
    """Write entries in one transaction; None when done, else why PostgreSQL (or the
    conversion) refused them. A server that is away raises."""
    try:
        async with svc.engine.begin() as conn:
            await write(conn, entries)
    except Exception as e:
        if errors.unavailable(e) and not isinstance(e, Poison):
            raise
        return f"{type(e).__name__}: {e}"
    return None


async def _stored(svc: Services, event_id: str) -> dict[str, str]:
    """Booking id -> status, as PostgreSQL has them."""
    stored: dict[str, str] = {}
    async for chunk in ledger.briefs(svc, event_id):
        stored.update((r.id, r.status) for r in chunk)
    return stored


async def _write_lost(svc: Services, event_id: str) -> list[str]:
    """Redis's bookings (and cancellations) that PostgreSQL lacks, written from Redis's own
    records: whatever happened to their outbox entries (lost, or dead-lettered because the
    entry itself was damaged). A cancellation carries its own time (`xa`)."""
    stored = await _stored(svc, event_id)
    now = await _redis_time(svc)
    lost: list[Entry] = []
    async for pairs in _hscan(svc, event_keys(event_id).bookings):
        for _, raw in pairs:
            r = decode_booking(raw)
            if r.id not in stored:
                confirmed = msgspec.structs.replace(r, status="confirmed")
                lost.append((event_id, b"0-0", outbox.confirm_entry(confirmed)))
            if r.status == "cancelled" and stored.get(r.id) != "cancelled":
                at = _cancelled_at(raw) or now
                lost.append((event_id, b"0-0", outbox.cancel_entry(r.id, at)))
    if not lost or await _try_write(svc, lost) is None:
        return [f"wrote {_many(len(lost), 'booking change')} the outbox had lost"] if lost else []
    # One of them is refused: the rest go in one by one, and the refused ones are said.
    done, refused = 0, []
    for entry in lost:
        if (why := await _try_write(svc, [entry])) is None:
            done += 1
        else:
            refused.append(
                f"PostgreSQL refuses {entry[2][b'op'].decode()} of booking"
                f" {outbox.booking_id(entry[2])}: {why}"
            )
    wrote = [f"wrote {_many(done, 'booking change')} the outbox had lost"] if done else []
    return wrote + refused


class _CancelTime(msgspec.Struct):
    xa: int | None = None  # set by lua/cancel.lua


_decode_cancel_time = msgspec.json.Decoder(_CancelTime).decode


def _cancelled_at(raw: bytes) -> int | None:
    """When a booking was cancelled, as its Redis record says; None for a record that does
    not say (then the repair's own time stands in: the cancellation happened by then)."""
    return _decode_cancel_time(raw).xa


async def _resolve_dead_letters(svc: Services, event_id: str) -> int:
    """Dead letters whose change PostgreSQL now has (written from Redis's record) are done
    with: a confirmation whose booking is stored, a cancellation whose booking is
    cancelled. The rest stay for an operator."""
    keys = event_keys(event_id)
    stored = await _stored(svc, event_id)
    done = []
    async for chunk in _stream(svc, keys.deadletter):
        for entry_id, fields in chunk:
            booking_id = outbox.booking_id(fields)
            status = stored.get(booking_id or "")
            op = outbox.op(fields)
            if (op == outbox.CONFIRM and status) or (op == outbox.CANCEL and status == "cancelled"):
                done.append(entry_id)
    if done:
        await svc.redis.xdel(keys.deadletter, *done)
    return len(done)


async def _align_capacity(svc: Services, event_id: str) -> list[str]:
    """PostgreSQL holds the catalog: a capacity Redis has otherwise is put back."""
    keys = event_keys(event_id)
    async with svc.engine.connect() as conn:
        caps = {
            r.name: r.capacity
            for r in await conn.execute(
                sa.select(categories.c.name, categories.c.capacity).where(
                    categories.c.event_id == event_id, ~categories.c.seated
                )
            )
        }
    raw: Any = await svc.redis.hgetall(keys.cap)
    live = {k.decode(): int(v) for k, v in raw.items()}
    wrong = {name: cap for name, cap in caps.items() if live.get(name) != cap}
    if not wrong:
        return []
    await svc.redis.hset(keys.cap, mapping=wrong)  # the recount that follows fixes the rest
    return [f"capacity of {name} back to {cap}" for name, cap in wrong.items()]


# --- all events -------------------------------------------------------------------------


async def event_ids(svc: Services, only: str | None) -> list[str]:
    async with svc.engine.connect() as conn:
        query = sa.select(events.c.id).order_by(events.c.id)
        if only is not None:
            query = query.where(events.c.id == only)
        return [r.id for r in await conn.execute(query)]


async def _settled_check(svc: Services, event_id: str) -> EventReport:
    report = await check_event(svc, event_id)
    for _ in range(CHECKS - 1):
        if report.consistent:
            break
        await asyncio.sleep(RECHECK_SECONDS)
        report = await check_event(svc, event_id)
    return report


async def reconcile(
    svc: Services,
    only: str | None = None,
    repair: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> Report:
    ids = await event_ids(svc, only)
    if repair and only is None:
        # Ids registered by a create that then failed: no event of theirs is anywhere.
        await live.prune_registry(svc)
    reports = []
    for i, event_id in enumerate(ids):
        if progress is not None:
            progress(i, len(ids), event_id)
        report = await _settled_check(svc, event_id)
        if repair and not report.consistent:
            repairs = await repair_event(svc, event_id)
            report = await _settled_check(svc, event_id)
            report.repairs = repairs
        reports.append(report)
    return Report(
        consistent=all(r.consistent for r in reports),
        checked_at=from_ms(await _redis_time(svc)),
        repaired=repair,
        events=reports,
    )


def render(report: Report) -> str:
    """The report as a table for people."""
    lines = []
    for e in report.events:
        verdict = "consistent" if e.consistent else "DRIFT"
        where = "" if e.in_redis else " (archived)" if e.archived else " (not in Redis)"
        lines.append(f"event {e.event_id}: {verdict}{where}")
        lines.append(
            f"  {'category':<20} {'capacity':>9} {'available':>10} {'held':>7} {'sold':>7}"
            "   expected (available/held/sold)"
        )
        for c in e.categories:
            x = c.expected
            values = [c.capacity, c.available, c.held, c.sold]
            shown = ["-" if v is None else str(v) for v in values]
            mark = "" if c.consistent else "  <-"
            lines.append(
                f"  {c.name:<20} {shown[0]:>9} {shown[1]:>10} {shown[2]:>7} {shown[3]:>7}"
                f"   {x['available']}/{x['held']}/{x['sold']}{mark}"
            )
        s, o = e.seats, e.outbox
        if s.total:
            lines.append(
                f"  seats: {s.total} ({s.available} available, {s.held} held, {s.sold} sold)"
            )
        oldest = "" if o.oldest_seconds is None else f", oldest {o.oldest_seconds:.1f} s"
        lines.append(
            f"  bookings in PostgreSQL: {e.bookings_in_postgres}; outbox: {o.waiting} waiting"
            f"{oldest}, {_many(o.dead_letters, 'dead letter')}; leaked holds: {e.leaked_holds}"
        )
        for kind, n in sorted(e.problem_counts.items()):
            lines.append(f"  ! {kind}: {n}")
        lines.extend(f"    - {p.detail}" for p in e.problems)
        lines.extend(f"  repaired: {r}" for r in e.repairs)
    total = len(report.events)
    drift = sum(not e.consistent for e in report.events)
    lines.append(
        f"{_many(total, 'event')} checked, {drift} with drift"
        + (" after repair" if report.repaired else "")
    )
    return "\n".join(lines) + "\n"
