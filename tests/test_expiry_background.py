"""Expiry without any API call: the keyspace listener, the sweeper, and the listener's
recovery after losing its connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime

import httpx
import msgspec
import pytest

from service.core.keys import event_keys
from service.core.settings import Settings
from service.hotpath.context import Services
from service.selling.expiry import Listener, Sweeper, notifications_enabled
from tests.apiserver import Worker
from tests.conftest import availability, create_event, eventually, expire_hold, worker_env


async def hold_status(svc: Services, event_id: str, hold_id: str) -> str:
    """Read straight from Redis: an API call would reclaim lazily and spoil the test."""
    raw = await svc.redis.hget(event_keys(event_id).holds, hold_id)
    assert raw is not None
    status: str = msgspec.json.decode(raw)["s"]
    return status


async def make_hold(client: httpx.AsyncClient, event_id: str) -> dict[str, str]:
    r = await client.post(
        f"/events/{event_id}/holds",
        json={"customer_id": "c", "items": [{"category": "GA", "quantity": 2}], "seats": ["A-1"]},
    )
    assert r.status_code == 201, r.text
    hold: dict[str, str] = r.json()
    return hold


async def listener_subscribed(svc: Services) -> bool:
    db = svc.redis.get_connection_kwargs().get("db") or 0
    channels = await svc.redis.pubsub_numsub(f"__keyevent@{db}__:expired")
    return bool(channels[0][1])


@pytest.fixture
def worker(settings: Settings) -> Iterator[Worker]:
    # The sweeper's interval is long here: whatever releases the hold is the listener.
    w = Worker(worker_env(settings, BOXOFFICE_SWEEP_INTERVAL_SECONDS="600"))
    w.start()
    yield w
    w.stop()


async def test_listener_releases_a_hold_within_2s_of_its_deadline(
    client: httpx.AsyncClient, svc: Services, worker: Worker
) -> None:
    await eventually(lambda: listener_subscribed(svc))
    assert await notifications_enabled(svc.redis)
    event_id = await create_event(client, hold_ttl_seconds=10)
    hold = await make_hold(client, event_id)
    hold_id, expires_at = hold["hold_id"], hold["expires_at"]

    deadline = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
    while await hold_status(svc, event_id, hold_id) == "held":
        assert time.time() < deadline + 2.0, "not released within 2 s of its deadline"
        await asyncio.sleep(0.05)
    assert await hold_status(svc, event_id, hold_id) == "expired"
    assert time.time() >= deadline - 0.01  # not before its time either
    assert await availability(client, event_id) == {"GA": 50, "VIP": 12}


@pytest.fixture
async def sweeper(svc: Services) -> AsyncIterator[Sweeper]:
    fast = Services.open(msgspec.structs.replace(svc.settings, sweep_interval_seconds=0.5))
    stop = asyncio.Event()
    s = Sweeper(fast)
    task = asyncio.create_task(s.run(stop))
    yield s
    stop.set()
    await task
    await fast.close()


async def test_sweeper_releases_overdue_holds_with_no_listener(
    client: httpx.AsyncClient, svc: Services, sweeper: Sweeper
) -> None:
    assert not await listener_subscribed(svc)
    event_id = await create_event(client)
    hold_id = (await make_hold(client, event_id))["hold_id"]
    await expire_hold(svc, event_id, hold_id, fire_ttl=False)
    started = time.monotonic()
    await eventually(lambda: _is(svc, event_id, hold_id, "expired"), within=3)
    assert time.monotonic() - started < 0.5 * 2 + 0.5  # within its interval, with slack
    assert await availability(client, event_id) == {"GA": 50, "VIP": 12}


async def test_one_sweeper_at_a_time(svc: Services, sweeper: Sweeper) -> None:
    await eventually(sweeper.lock.owned)
    other = Sweeper(svc)
    assert not await other._lead()
    assert await sweeper.lock.owned()


async def _is(svc: Services, event_id: str, hold_id: str, status: str) -> bool:
    return await hold_status(svc, event_id, hold_id) == status


async def test_listener_sweeps_after_its_connection_is_killed(
    client: httpx.AsyncClient, svc: Services
) -> None:
    listener = Listener(svc)
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    try:
        await asyncio.wait_for(listener.subscribed.wait(), 10)
        event_id = await create_event(client)
        hold_id = (await make_hold(client, event_id))["hold_id"]

        await svc.redis.client_kill_filter(_type="pubsub")
        # Overdue while the listener is away, and no keyspace event will ever say so.
        await expire_hold(svc, event_id, hold_id, fire_ttl=False)
        await eventually(lambda: _is(svc, event_id, hold_id, "expired"), within=3)
        await asyncio.wait_for(listener.subscribed.wait(), 10)
        assert listener.subscriptions == 2
        assert await listener_subscribed(svc)
        # And it listens again: a hold whose TTL key now expires is released at once.
        second = (await make_hold(client, event_id))["hold_id"]
        await expire_hold(svc, event_id, second)
        await eventually(lambda: _is(svc, event_id, second, "expired"), within=2)
    finally:
        stop.set()
        await task
