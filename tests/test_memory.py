"""Memory that anyone could grow is bounded: the per-event key cache of the script caller,
unknown event ids (and the PostgreSQL queries they cost), Idempotency-Key records; and
/ready warns when Redis may evict what it must keep."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import sqlalchemy as sa

from service.core import errors, schemas
from service.core.keys import event_keys
from service.core.settings import Settings
from service.durable import live
from service.hotpath import scripts
from service.hotpath.context import Services
from service.hotpath.scriptpipe import EVENT_KEYS_CACHED
from service.hotpath.scripts import Idempotency
from service.selling import catalog, sales
from service.web import metrics
from tests.conftest import create_event, event_body, new_event_id, services_with
from tests.servers import RedisServer

# --- the script caller's per-event cache --------------------------------------------------


async def _unknown_calls(svc: Services, start: int, n: int) -> None:
    for batch in range(start, start + n, 200):
        replies = await asyncio.gather(
            *(svc.scripts.call_event("view", f"unknown-{i}") for i in range(batch, batch + 200))
        )
        assert set(replies) == {scripts.NOT_LOADED}


@pytest.mark.slow
async def test_unknown_event_ids_do_not_grow_the_script_caller(svc: Services) -> None:
    """Every distinct id that reached a script used to stay in memory for good."""
    n = EVENT_KEYS_CACHED + 2000
    # Traced from the start: what a bounded cache drops was allocated while tracing.
    tracemalloc.start()
    try:
        # Two rounds fill the caches and bring their tables to the size they keep: a full
        # dict that keeps evicting and inserting still grows its table once (335 kB here),
        # which landed in the measured round now and then.
        await _unknown_calls(svc, 0, 2 * n)
        assert len(svc.scripts._pipe._event_keys) <= EVENT_KEYS_CACHED
        before = tracemalloc.take_snapshot()
        await _unknown_calls(svc, 2 * n, n)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    # Unbounded, 6,000 more ids kept about 5 MB; bounded, they replace what was there.
    assert grown < 1_000_000, grown
    assert len(svc.scripts._pipe._event_keys) <= EVENT_KEYS_CACHED


# --- unknown events: a PostgreSQL query each --------------------------------------------


@pytest.fixture
async def queries(svc: Services) -> AsyncIterator[list[str]]:
    """Statements this process sends to PostgreSQL about events, while the test runs."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM events" in statement:
            seen.append(statement)

    sa.event.listen(svc.engine.sync_engine, "before_cursor_execute", count)
    yield seen
    sa.event.remove(svc.engine.sync_engine, "before_cursor_execute", count)


async def _not_found(svc: Services, event_id: str) -> None:
    with pytest.raises(errors.EventNotFound):
        await catalog.view_event(svc, event_id)


async def test_unknown_event_costs_one_query_a_moment(
    svc: Services, queries: list[str], client: httpx.AsyncClient
) -> None:
    unknown = new_event_id("nope")
    for _ in range(20):
        await _not_found(svc, unknown)
    assert len(queries) == 1, queries
    # Brief: once the moment has passed, PostgreSQL is asked again.
    await asyncio.sleep(svc.settings.unknown_event_cache_seconds + 0.1)
    await _not_found(svc, unknown)
    assert len(queries) == 2, queries

    # An event created here, or by another process, is visible at once.
    mine = new_event_id("mine")
    await _not_found(svc, mine)
    body = msgspec.convert(event_body(mine), schemas.EventCreate)
    await catalog.create_event(svc, body)
    assert (await catalog.view_event(svc, mine)).id == mine
    theirs = new_event_id("theirs")
    await _not_found(svc, theirs)
    await create_event(client, id=theirs)  # by the API server's processes
    assert (await catalog.view_event(svc, theirs)).id == theirs


def test_unknown_event_cache_is_bounded() -> None:
    misses = live._Misses(3)
    for i in range(10):
        misses.add(f"e{i}", 60)
    assert len(misses) == 3
    assert [misses.missing(f"e{i}") for i in range(10)] == [False] * 7 + [True] * 3
    misses.add("gone", 0)  # caching off
    assert not misses.missing("gone")


# --- Idempotency-Keys ---------------------------------------------------------------------

CAP = 3


@pytest.fixture
async def capped(settings: Settings) -> AsyncIterator[Services]:
    async with services_with(settings, idempotency_max_keys_per_event=CAP) as svc:
        yield svc


def _key(n: int, body: str = "") -> Idempotency:
    return Idempotency(f"{n:064x}", f"fingerprint-{n}{body}")


async def test_idempotency_keys_an_event_remembers_are_bounded(capped: Services) -> None:
    event_id = new_event_id("idem")
    await catalog.create_event(capped, msgspec.convert(event_body(event_id), schemas.EventCreate))

    def ga(customer: str) -> schemas.HoldCreate:
        return schemas.HoldCreate(customer_id=customer, items=[schemas.HoldItem("GA", 1)])

    first = [
        (await sales.create_hold_counted(capped, event_id, ga(f"c{n}"), _key(n)))[0]
        for n in range(CAP)
    ]
    before = await catalog.view_event(capped, event_id)
    with pytest.raises(errors.RateLimited) as refused:
        await sales.create_hold_counted(capped, event_id, ga("late"), _key(CAP))
    assert refused.value.status == 429
    assert refused.value.headers is not None
    assert 1 <= int(refused.value.headers["retry-after"]) <= capped.settings.idempotency_ttl_seconds
    # Nothing changed, and another new key on any route of the event is refused too.
    assert await catalog.view_event(capped, event_id) == before
    with pytest.raises(errors.RateLimited):
        await sales.release_hold(capped, event_id, first[0].hold_id, _key(CAP + 1))
    assert await catalog.view_event(capped, event_id) == before
    # What is remembered still answers; requests without a key are not limited.
    again, _ = await sales.create_hold_counted(capped, event_id, ga("c0"), _key(0))
    assert again == first[0]
    await sales.create_hold_counted(capped, event_id, ga("no-key"), None)

    redis = capped.redis
    keys = event_keys(event_id)
    assert await redis.get(keys.idempotency_count) == str(CAP).encode()
    record = await redis.memory_usage(keys.idempotency(_key(0).key_digest))
    print(f"\nan Idempotency-Key record of a hold takes {record} bytes of Redis")
    # Another event has its own allowance.
    other = new_event_id("idem")
    await catalog.create_event(capped, msgspec.convert(event_body(other), schemas.EventCreate))
    await sales.create_hold_counted(capped, other, ga("c0"), _key(0))


# --- eviction -----------------------------------------------------------------------------


async def test_ready_warns_about_an_evicting_redis(settings: Settings, svc: Services) -> None:
    state = await metrics.readiness(svc)
    assert not [w for w in state.warnings if "maxmemory-policy" in w], state
    with RedisServer(args=["--maxmemory-policy", "allkeys-lru", "--maxmemory", "64mb"]) as r:
        evicting = Services.open(msgspec.structs.replace(settings, redis_url=r.url))
        try:
            state = await metrics.readiness(evicting)
        finally:
            await evicting.close()
    assert state.status == "ready", state
    assert [w for w in state.warnings if "maxmemory-policy is allkeys-lru" in w], state


def test_monotonic_clock_is_what_the_cache_uses() -> None:
    """The unknown-event cache runs on the monotonic clock: wall-clock jumps do not
    stretch or cut it."""
    misses = live._Misses(2)
    misses.add("x", 0.05)
    assert misses.missing("x")
    time.sleep(0.06)
    assert not misses.missing("x")
