"""The check of one event: does Redis (the live state) agree with PostgreSQL (the durable
record)? Everything is read a chunk at a time (service/durable/scans.py), so memory stays
bounded by the chunk, plus a set of ids per event to count each record once (HSCAN may
return an element twice); the seat map by a read-only script a chunk at a time
(lua/check_seats.lua), each call short however big the event."""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import redis.exceptions
import sqlalchemy as sa

from service.core import bookingrules
from service.core.db import bookings, categories, driver, events
from service.core.keys import OUTBOX_GROUP, event_keys
from service.core.records import decode_booking, decode_hold
from service.core.timefmt import from_ms
from service.durable import ledger, live, outbox, scans
from service.durable.findings import (
    CategoryReport,
    EventReport,
    Findings,
    OutboxReport,
    SeatReport,
    many,
)
from service.durable.outbox import outbox_state, stream_id, text
from service.hotpath.context import Services
from service.hotpath.scripts import NO_ORDER

# Seats, and hold or booking records, that one check_seats.lua call reads at most: about
# a millisecond of Redis time, so that a check never holds up the sales it checks.
SEATS_PER_CALL = 250
RECORDS_PER_CALL = 100
# An outbox entry waiting longer than this is stuck, not just waiting.
STUCK_SECONDS = 60
# A hold this long past its deadline and still held has leaked: the sweeper runs every
# couple of seconds, so only a dead worker fleet (or a bug) leaves one this long.
LEAK_GRACE_MS = 10_000


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


async def _outbox_bookings(svc: Services, event_id: str, found: Findings) -> _Changes:
    """The booking changes in the outbox and in the dead letters; each dead letter is a
    finding (its booking is reported there, not again as not persisted)."""
    changes = _Changes()
    keys = event_keys(event_id)
    acknowledged = await _acknowledged(svc, keys.outbox)
    async for chunk in scans.stream(svc, keys.outbox):
        for entry_id, fields in chunk:
            if not acknowledged(entry_id):
                changes.add(fields)
    async for chunk in scans.stream(svc, keys.deadletter):
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
        rows: Any = await svc.redis.xpending_range(stream, OUTBOX_GROUP, start, "+", scans.CHUNK)
        pending.update(r["message_id"] for r in rows)
        if len(rows) < scans.CHUNK:
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

    async def settle(self, svc: Services, event_id: str, found: Findings) -> None:
        if not self.confirms and not self.cancels:
            return
        changes = await _outbox_bookings(svc, event_id, Findings())
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
        for start in range(0, len(ids), scans.CHUNK):
            rows = await conn.execute(
                sa.select(bookings.c.booking_id, bookings.c.status).where(
                    bookings.c.booking_id.in_(ids[start : start + scans.CHUNK])
                )
            )
            found.update((str(r.booking_id), r.status) for r in rows)
    return found


def _describe(entry_id: bytes, fields: dict[bytes, bytes]) -> str:
    def field(name: bytes) -> str:
        return fields.get(name, b"?").decode(errors="replace")

    attempts = fields.get(b"attempts", b"")
    tried = many(int(attempts), "attempt") if attempts.isdigit() else "attempts unknown"
    return (
        f"dead letter {entry_id.decode()}: {field(b'op')} of booking"
        f" {outbox.booking_id(fields) or '?'}, {tried}: {field(b'error')}"
    )


async def check_event(svc: Services, event_id: str) -> EventReport:
    found = Findings()
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
    now = await scans.redis_time(svc)

    # PostgreSQL's bookings, against Redis's. Their ids and statuses are kept (a few
    # dozen bytes a booking) to tell Redis's bookings which are persisted.
    in_postgres: dict[str, str] = {}
    async for every in ledger.briefs(svc, event_id):
        in_postgres.update((r.id, r.status) for r in every)
        # A booking that breaks the rules counts for nothing: no stock comes from it.
        chunk = await _valid(svc, event_id, every, found)
        live = await scans.hmget(svc, keys.bookings, [r.id for r in chunk])
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
    async for pairs in scans.hscan(svc, keys.bookings):
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
    async for pairs in scans.hscan(svc, keys.holds):
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
    svc: Services, event_id: str, chunk: list[ledger.Brief], found: Findings
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
    found: Findings,
    from_redis: bool = True,
) -> None:
    """Each seat in `expected` has that state ("b:<booking>" or "h:<hold>") in Redis.
    `from_redis`: the expectations come from Redis's own records (else PostgreSQL's)."""
    if not expected:
        return
    states = await scans.hmget(svc, event_keys(event_id).seatstate, list(expected))
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
    found: Findings,
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


async def _outbox(svc: Services, event_id: str, now: int, found: Findings) -> OutboxReport:
    state = await outbox_state(svc, event_id)
    oldest = None if state.oldest_ms is None else max(0.0, (now - state.oldest_ms) / 1000)
    stuck = oldest is not None and oldest > STUCK_SECONDS
    if stuck:
        waiting = many(state.backlog, "entry", "entries")
        found.add("outbox_stuck", f"{waiting} waiting, the oldest for {oldest:.0f} s")
    return OutboxReport(state.backlog, oldest, stuck, state.dead_letters)


def _report(
    event_id: str,
    found: Findings,
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
