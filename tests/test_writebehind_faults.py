"""The write-behind under faults that once stopped it: a poison entry among good ones, a
PostgreSQL that hangs, and a worker killed mid-backlog. Real worker processes, real Redis
and PostgreSQL; the faults are made for real (a hand-XADDed entry, a table lock held by
another connection, SIGKILL).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import pytest
import redis.exceptions
import sqlalchemy as sa

from service.core.keys import OUTBOX_GROUP, event_keys
from service.core.settings import Settings
from service.hotpath.context import Services
from tests.apiserver import Worker
from tests.conftest import StartWorker, create_event, eventually, worker_env
from tests.test_writebehind import big_event, persisted_ids, sell
from tests.test_writebehind_failures import (
    assert_each_written_once,
    booking_id,
    booking_json,
    dead_letters,
    pending_ids,
    sell_in_process,
    stream,
    until,
    written,
)

# Entries that fail before PostgreSQL is asked anything, each with the error it raises.
POISONS: dict[str, tuple[dict[bytes, bytes], str]] = {
    # datetime.fromtimestamp: OSError, which once passed for "server away".
    "time out of range": ({b"op": b"confirm", b"booking": booking_json(ca=10**20)}, "OSError"),
    "cancel time out of range": (
        {b"op": b"cancel", b"booking": b"0192d3c4-0000-7000-8000-00000000beef", b"at": b"9" * 17},
        "ValueError",
    ),
    "no booking field": ({b"op": b"confirm"}, "KeyError"),
    "not a uuid": ({b"op": b"confirm", b"booking": booking_json(id="nope")}, "ValueError"),
    "not utf-8": ({b"op": b"cancel", b"booking": b"\xff\xfe", b"at": b"1"}, "UnicodeDecodeError"),
}


async def test_a_poison_entry_is_dead_lettered_at_once_and_the_rest_flow(
    client: httpx.AsyncClient, svc: Services, settings: Settings, start_worker: StartWorker
) -> None:
    event_id = await create_event(client, **big_event(100))
    other_event = await create_event(client, **big_event(100))
    keys = event_keys(event_id)
    valid = await sell(client, event_id, 10)
    poison_ids = {}
    for name, (fields, _) in POISONS.items():
        entry: Any = dict(fields)
        poison_ids[await svc.redis.xadd(keys.outbox, entry)] = name
    valid += await sell(client, event_id, 10)
    others = await sell(client, other_event, 10)

    w = start_worker(worker_env(settings))
    started = time.monotonic()

    async def settled() -> bool:
        return (
            await written(svc, event_id) >= len(valid)
            and await written(svc, other_event) >= len(others)
            and await dead_letters(svc, event_id) >= len(POISONS)
        )

    await eventually(settled, within=15)
    assert time.monotonic() - started < 10, "the good entries waited for the poison"
    more = await sell(client, event_id, 5)  # and what comes after goes on

    async def later() -> bool:
        return await written(svc, event_id) >= len(valid) + len(more)

    await eventually(later, within=10)
    await assert_each_written_once(svc, event_id, valid + more)

    letters = await stream(svc, keys.deadletter)
    assert {f[b"source_id"]: f for _, f in letters}.keys() == poison_ids.keys()
    for _, fields in letters:
        name = poison_ids[fields[b"source_id"]]
        assert fields[b"attempts"] == b"1", f"{name}: it can never succeed, so once is enough"
        assert POISONS[name][1] in fields[b"error"].decode(), (name, fields[b"error"])
    assert "write-behind paused" not in w.log()
    assert w.running


async def test_a_hung_postgresql_times_out_in_the_log_and_nothing_is_lost(
    client: httpx.AsyncClient, svc: Services, settings: Settings, start_worker: StartWorker
) -> None:
    event_id = await create_event(client, **big_event(100))
    w = start_worker(worker_env(settings, BOXOFFICE_DATABASE_COMMAND_TIMEOUT_SECONDS="1"))
    first = await sell(client, event_id, 5)

    async def first_written() -> bool:
        return await written(svc, event_id) == len(first)

    await eventually(first_written)

    # Another connection locks the table against writes: every INSERT of the worker waits,
    # as on a PostgreSQL that hangs. Reads still pass.
    async with svc.engine.connect() as locker:
        await locker.execute(sa.text("LOCK TABLE bookings IN EXCLUSIVE MODE"))
        second = await sell(client, event_id, 20)

        async def said() -> bool:
            return "PostgreSQL did not answer in time (a statement may take 1 s" in w.log()

        await eventually(said, within=10)
        assert await written(svc, event_id) == len(first)
        assert await dead_letters(svc, event_id) == 0
        outbox = await stream(svc, event_keys(event_id).outbox)
        assert set(second) <= {booking_id(f) for _, f in outbox if f[b"op"] == b"confirm"}
        await locker.rollback()  # PostgreSQL is back

    async def drained() -> bool:
        return await written(svc, event_id) >= len(first) + len(second)

    await eventually(drained, within=20)
    await assert_each_written_once(svc, event_id, first + second)
    assert await dead_letters(svc, event_id) == 0
    assert w.running


async def _consumer(w: Worker) -> str:
    """The consumer name a worker logged at start-up."""
    found: list[str] = []

    async def logged() -> bool:
        found[:] = re.findall(r"worker (\S+) started", w.log())
        return bool(found)

    await eventually(logged, within=20)
    return found[0]


async def _consumers(svc: Services, event_id: str) -> dict[str, int]:
    info: Any = await svc.redis.xinfo_consumers(event_keys(event_id).outbox, OUTBOX_GROUP)
    return {c["name"].decode(): c["pending"] for c in info}


@pytest.mark.slow
async def test_a_killed_workers_entries_are_taken_over_within_seconds(
    client: httpx.AsyncClient, svc: Services, settings: Settings, start_worker: StartWorker
) -> None:
    total = 6000
    event_id = await create_event(client, **big_event(total))
    ids = await sell_in_process(svc, event_id, total)
    env = worker_env(settings, BOXOFFICE_OUTBOX_BATCH="10")

    # Two workers share the backlog; A is SIGKILLed holding a batch it read and did not
    # acknowledge (if it dies between two batches, another A is started and killed).
    held: list[bytes] = []
    b: Worker | None = None
    for _ in range(5):
        a = start_worker(env)
        if b is None:
            b = start_worker(env)
            await _consumer(b)
        dead = await _consumer(a)

        async def a_holds(dead: str = dead) -> bool:
            try:
                return bool(await pending_ids(svc, event_id, dead))
            except redis.exceptions.ResponseError as e:
                # "started" is logged before the workers find the event and create its
                # group: until then nobody holds anything.
                if "NOGROUP" not in str(e):
                    raise
                return False

        await until(a_holds, within=30, every=0.002)
        a.kill()
        held = await pending_ids(svc, event_id, dead)
        if held:
            break
    assert held and b is not None, "no worker died holding unacknowledged entries"
    killed_at = time.monotonic()
    entries: Any = [await svc.redis.xrange(event_keys(event_id).outbox, i, i) for i in held]
    its_bookings = {booking_id(e[0][1]) for e in entries}
    assert await written(svc, event_id) < total, "the kill must come in the middle"
    assert b.running

    # Written and no longer the dead worker's: it may have written its batch to PostgreSQL
    # before the kill, and only not acknowledged it; then the claim is what is waited for.
    async def taken_over() -> bool:
        written_all = its_bookings <= set(await persisted_ids(svc, event_id))
        return written_all and not await pending_ids(svc, event_id, dead)

    await until(taken_over, within=20, every=0.05)
    took = time.monotonic() - killed_at
    print(f"{len(held)} entries of the killed worker taken over {took:.1f} s after the kill")
    assert took < 8, f"a dead worker's entries waited {took:.1f} s (the claim idle is 30 s)"

    async def forgotten() -> bool:
        return dead not in await _consumers(svc, event_id)

    await until(forgotten, within=10, every=0.1)
    assert b.running

    async def drained() -> bool:
        return await written(svc, event_id) >= total

    await eventually(drained, within=60)
    await asyncio.sleep(0.5)  # a duplicate written late would show now
    await assert_each_written_once(svc, event_id, ids)
