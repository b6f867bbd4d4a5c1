"""Loading an event into Redis (create, or restore after Redis lost it): a chunk of seats
per script call, then one short call that makes the whole event visible at once. No call
blocks Redis for long, no request sees or sells from a half-loaded event, and a load
that died half-way is redone."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa

from service.core import errors, schemas
from service.core.db import seats
from service.core.keys import event_keys
from service.core.records import BookingRecord
from service.core.settings import Settings
from service.durable import live, reconcile
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services
from service.hotpath.scripts import LUA_DIR, NAMES, NOT_LOADED, script_text
from service.selling import catalog, sales
from service.selling.sales import hold_call
from tests.conftest import event_body, services_with
from tests.servers import RedisServer

ROWS = [f"R{i}" for i in range(20)]
PER_ROW = 10_000  # 200,000 seats: the most an event may have
# Redis time of the script calls of a load, as SLOWLOG measures it: wall time, so on a
# busy machine a call the scheduler preempted shows more than its own cost. Almost every
# call stays under the first; none comes near the second (one call took 1.7 s before).
P99_CALL_MICROSECONDS = 20_000
MAX_CALL_MICROSECONDS = 100_000


@pytest.fixture
async def own(settings: Settings, slowlog_redis: RedisServer) -> AsyncIterator[Services]:
    async with services_with(settings, redis_url=slowlog_redis.url) as services:
        yield services


def big_body(rows: list[str] = ROWS, per_row: int = PER_ROW) -> schemas.EventCreate:
    stalls = {
        "name": "Stalls",
        "price": 1000,
        "currency": "EUR",
        "seat_blocks": [{"rows": rows, "seats_per_row": per_row}],
    }
    ga = {"name": "GA", "price": 500, "currency": "EUR", "capacity": 100}
    body = event_body(categories=[stalls, ga])
    return msgspec.convert(body, schemas.EventCreate)


def _script_names() -> dict[str, str]:
    """Each script's SHA, as the service sends it (lib.lua first), to its name."""
    lib = (LUA_DIR / "lib.lua").read_text()
    return {hashlib.sha1(script_text(lib, n).encode()).hexdigest(): n for n in NAMES}


async def script_micros(svc: Services) -> list[tuple[int, str]]:
    """(Redis time, script) of every script call since the last SLOWLOG RESET, slowest
    first."""
    names = _script_names()
    entries: Any = await svc.redis.slowlog_get(100_000)
    out = []
    for e in entries:
        command = e["command"]
        command = command.decode() if isinstance(command, bytes) else command
        if command.startswith("EVALSHA "):
            out.append((int(e["duration"]), names.get(command.split()[1], "?")))
    return sorted(out, reverse=True)


async def forget(svc: Services, event_id: str) -> None:
    """What a Redis restart without persistence does to an event: every key gone."""
    keys = event_keys(event_id)
    await svc.redis.unlink(*keys.all, keys.seat_order)


async def hold(svc: Services, event_id: str, **body: Any) -> schemas.Hold:
    payload = msgspec.convert({"customer_id": "c", **body}, schemas.HoldCreate)
    return (await sales.create_hold_counted(svc, event_id, payload, None))[0]


async def assert_complete(
    svc: Services, event_id: str, held: int, seats: int = len(ROWS) * PER_ROW
) -> None:
    report = await reconcile.reconcile(svc, event_id)
    assert report.consistent, report
    event = await catalog.view_event(svc, event_id)
    avail = {c.name: c.available for c in event.categories}
    assert avail == {"Stalls": seats - held, "GA": 100}
    keys = event_keys(event_id)
    assert await svc.redis.hlen(keys.seatmap) == seats
    assert await svc.redis.llen(keys.seat_order) == seats
    assert await svc.redis.zcard(keys.free) == seats - held
    lease, *staged = keys.load_keys[1:]
    assert await svc.redis.exists(lease, *staged) == 0  # nothing left behind
    for key in (keys.seatmap, keys.free, keys.seat_order):
        assert await svc.redis.ttl(key) == -1  # the staging's TTL went with it


async def test_200000_seats_load_in_short_calls(own: Services) -> None:
    await own.redis.slowlog_reset()
    started = time.perf_counter()
    event = await catalog.create_event(own, big_body())
    created = time.perf_counter() - started
    on_create = await script_micros(own)
    await assert_complete(own, event.id, held=0)

    await forget(own, event.id)
    await own.redis.slowlog_reset()
    started = time.perf_counter()
    await live.ensure_loaded(own, event.id)
    restored = time.perf_counter() - started
    on_restore = await script_micros(own)
    print(
        f"\n200,000 seats: created in {created:.2f} s, slowest script call"
        f" {on_create[0]} µs of {len(on_create)}; restored in {restored:.2f} s,"
        f" slowest {on_restore[0]} µs, median {on_restore[len(on_restore) // 2][0]} µs"
        f" of {len(on_restore)} (total"
        f" {sum(m for m, _ in on_restore) / 1000:.0f} ms of Redis time)"
    )
    for calls in (on_create, on_restore):
        assert len(calls) > 400, calls  # a chunk of seats per call
        assert calls[0][0] < MAX_CALL_MICROSECONDS, calls[:10]
        assert calls[len(calls) // 100][0] < P99_CALL_MICROSECONDS, calls[:10]
    await assert_complete(own, event.id, held=0)
    last = await hold(own, event.id, seats=["R19-10000", "R19-9999"])
    best = await hold(own, event.id, items=[{"category": "Stalls", "quantity": 2}])
    assert sorted(last.seats or []) == ["R19-10000", "R19-9999"]
    assert best.seats == ["R0-1", "R0-2"]
    await assert_complete(own, event.id, held=4)


async def copy_all_seats_seconds(svc: Services) -> float:
    """How long one COPY of the 200,000 seats takes on this machine now: into a table like
    `seats` (its indexes too, written to the log as `seats` is), rolled back."""
    rows = [
        ("scratch", f"{row}-{n}", "Stalls", i * PER_ROW + n, row, n)
        for i, row in enumerate(ROWS)
        for n in range(1, PER_ROW + 1)
    ]
    async with svc.engine.connect() as conn:
        await conn.exec_driver_sql("CREATE TABLE scratch_seats (LIKE seats INCLUDING ALL)")
        raw = await conn.get_raw_connection()
        started = time.perf_counter()
        await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
            "scratch_seats",
            records=rows,
            columns=["event_id", "label", "category", "position", "row", "number"],
        )
        seconds = time.perf_counter() - started
        await conn.rollback()
    return seconds


async def test_the_largest_event_is_created_in_statements_shorter_than_the_timeout(
    settings: Settings, slowlog_redis: RedisServer
) -> None:
    """The command timeout bounds each PostgreSQL statement, to notice a hung server; an
    event's seats go in several COPY statements, so that creating the largest event does not
    meet it on a slow or busy server. Here the timeout is a little over half of what one
    COPY of all 200,000 seats takes now (measured first): one statement would meet it."""
    async with services_with(settings, redis_url=slowlog_redis.url) as svc:
        whole = await copy_all_seats_seconds(svc)
    timeout = max(0.6 * whole, 0.2)
    async with services_with(
        settings, redis_url=slowlog_redis.url, database_command_timeout_seconds=timeout
    ) as svc:
        event = await catalog.create_event(svc, big_body())
        async with svc.engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).select_from(seats).where(seats.c.event_id == event.id)
            )
    print(f"\none COPY of 200,000 seats: {whole:.2f} s; created under a {timeout:.2f} s timeout")
    assert count == catalog.MAX_SEATS
    assert catalog.MAX_SEATS // catalog.SEATS_PER_COPY >= 10  # each well under the timeout


async def raw_hold(svc: Services, event_id: str, seat: str) -> bytes:
    """The hold script itself, without the restore path: what a request meets in Redis."""
    hold_id = uuid.uuid4().hex
    hold = hold_call(event_id, hold_id, "racer", b"[]", f'["{seat}"]'.encode())
    return await svc.scripts.call_event("hold", event_id, *hold.args, extra_keys=hold.extra_keys)


async def test_holds_racing_a_restore_never_see_a_half_loaded_event(
    own: Services, settings: Settings, slowlog_redis: RedisServer
) -> None:
    """While one process restores the event, the hold script says not_loaded (never
    unknown_seat, never a sale from a partial map); another process's restore waits for
    the first and does not load it again; the last seat is sold exactly once."""
    event = await catalog.create_event(own, big_body())
    await forget(own, event.id)
    other = Services.open(msgspec.structs.replace(settings, redis_url=slowlog_redis.url))
    try:
        await own.redis.slowlog_reset()
        loading = asyncio.create_task(live.ensure_loaded(own, event.id))
        await asyncio.sleep(0.05)
        # Another API process: its hold finds the event not loaded, restores, and holds.
        through_restore = asyncio.create_task(hold(other, event.id, seats=["R19-10000"]))
        replies = []
        while not loading.done():
            replies.append(await raw_hold(own, event.id, "R19-9999"))
        await loading
        won = await through_restore
    finally:
        await other.close()
    replies.append(await raw_hold(own, event.id, "R19-9999"))
    kinds = [json.loads(r).get("err", "held") for r in replies]
    assert kinds.count("not_loaded") > 10, kinds  # the race did happen, for a while
    assert set(kinds) == {"not_loaded", "held", "seats_unavailable"}, kinds
    assert kinds.count("held") == 1  # the seat once, after the load, never before
    held_at = kinds.index("held")
    assert set(kinds[:held_at]) == {"not_loaded"}
    assert set(kinds[held_at + 1 :]) == {"seats_unavailable"}
    assert won.seats == ["R19-10000"]
    calls = [name for _, name in await script_micros(own)]
    assert calls.count("load") == 1  # loaded once: the second restore waited for it
    assert calls.count("load_seats") < 2 * 401  # the waiter's tries are short
    await assert_complete(own, event.id, held=2)


async def test_a_load_that_died_half_way_is_redone(own: Services) -> None:
    """A restore that staged some chunks and died (its lease runs out) leaves the event
    not loaded; the next restore takes over, drops what it staged, and loads it all,
    the seats PostgreSQL has as sold included."""
    rows, per_row = ["A", "B", "C"], 1000
    event = await catalog.create_event(own, big_body(rows, per_row))
    sold = await hold(own, event.id, seats=["A-2", "C-1000"])
    confirm = schemas.HoldConfirm(payment_ref="p")
    booking = await sales.confirm_hold(own, event.id, sold.hold_id, confirm, None)
    assert await WriteBehind(own, "test-load").drain(event.id) == 1
    await forget(own, event.id)
    keys = event_keys(event.id).load_keys
    labels = [f"{r}-{n}" for r in rows for n in range(1, per_row + 1)]
    ranges = json.dumps([["Stalls", 0, len(labels) - 1], ["GA", len(labels), len(labels) - 1]])

    async def stage(first: str, chunk: list[str], token: str = "dead") -> bytes:
        return await own.scripts.call_event(
            "load_seats", event.id, "restore", token, 500, ranges, first, *chunk, extra_keys=keys
        )

    assert await stage("", []) == b"ok"
    assert await stage("0", labels[:1000]) == b"ok"
    assert await stage("0", labels[:1000]) == b"ok"  # a repeat changes nothing
    assert await stage("2000", labels[2000:2500]) == b"busy"  # not the next chunk
    assert await stage("1000", labels[1000:1500]) == b"ok"
    assert await stage("", [], token="other") == b"busy"  # the lease is the dead one's
    assert await own.redis.llen(keys[4]) == 1500
    assert await raw_hold(own, event.id, "A-1") == NOT_LOADED  # staged is not loaded
    started = time.monotonic()
    await live.ensure_loaded(own, event.id)
    assert time.monotonic() - started < 5
    await assert_complete(own, event.id, held=2, seats=len(labels))
    ev = event_keys(event.id)
    state = await own.redis.hmget(ev.seatstate, ["A-1", "A-2", "C-1000"])
    assert state == [None, *[f"b:{booking.booking_id}".encode()] * 2]
    assert await stage("1500", labels[1500:2000]) == b"busy"  # the dead load is over
    assert await own.redis.lrange(ev.seat_order, 0, -1) == [x.encode() for x in labels]
    assert await own.redis.hget(ev.seatmap, "C-1000") == b"2999:Stalls"


async def test_bookings_redis_kept_are_counted_in_short_calls(own: Services) -> None:
    """A restore keeps the bookings Redis has (they may be ahead of PostgreSQL) and counts
    them as sold a batch per call: 20,000 bookings never make one long call."""
    rows, per_row, n = [f"R{i}" for i in range(10)], 3000, 20_000
    event = await catalog.create_event(own, big_body(rows, per_row))
    keys = event_keys(event.id)
    labels = [f"{r}-{i}" for r in rows for i in range(1, per_row + 1)]
    pipe = own.redis.pipeline(transaction=False)
    for i in range(n):
        record = BookingRecord(
            id=f"b{i}", hold_id=f"h{i}", customer_id=f"c{i % 100}", quantities={"Stalls": 1},
            quantity=1, total_cents=1000, currency="EUR", created_ms=1,
            status="confirmed" if i % 10 else "cancelled", seats=[labels[i]],
        )  # fmt: skip
        pipe.hset(keys.bookings, record.id, msgspec.json.encode(record))
    await pipe.execute()
    # Redis lost the live state, and kept the records.
    await own.redis.unlink(*keys.all[:-2], keys.seat_order)
    await own.redis.slowlog_reset()
    await live.ensure_loaded(own, event.id)
    calls = await script_micros(own)
    assert calls[0][0] < MAX_CALL_MICROSECONDS, calls[:10]
    assert calls[len(calls) // 100][0] < P99_CALL_MICROSECONDS, calls[:10]
    assert [name for _, name in calls].count("load_bookings") > 100
    sold = n - n // 10
    avail = {c.name: c.available for c in (await catalog.view_event(own, event.id)).categories}
    assert avail == {"Stalls": len(labels) - sold, "GA": 100}
    assert await own.redis.zcard(keys.free) == len(labels) - sold
    assert await own.redis.hlen(keys.seatstate) == sold
    state = await own.redis.hmget(keys.seatstate, [labels[0], labels[1], labels[n]])
    assert state == [None, b"b:b1", None]  # b0 was cancelled; past the bookings, free
    assert await own.redis.hget(keys.cust, "c1") == str(n // 100).encode()
    assert await own.redis.hget(keys.sold, "Stalls") == str(sold).encode()


async def test_reading_a_hold_of_an_event_redis_lost_loads_it(svc: Services) -> None:
    """A hold read (one script call, lua/hold_read.lua) finds the event gone: the event is
    loaded again from PostgreSQL, and the hold, which lived in Redis only, is not found."""
    body = msgspec.convert(event_body(), schemas.EventCreate)
    await catalog.create_event(svc, body)
    item = schemas.HoldItem(category=body.categories[0].name, quantity=1)
    wanted = schemas.HoldCreate(customer_id="c", items=[item])
    hold, _ = await sales.create_hold_counted(svc, body.id, wanted, None)
    read = await sales.get_hold(svc, body.id, hold.hold_id)
    assert (read.hold_id, read.status) == (hold.hold_id, "held")
    keys = event_keys(body.id)
    await svc.redis.delete(keys.meta, keys.holds)
    with pytest.raises(errors.HoldNotFound):
        await sales.get_hold(svc, body.id, hold.hold_id)
    assert await svc.redis.exists(keys.meta) == 1
