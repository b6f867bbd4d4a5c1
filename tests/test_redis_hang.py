"""A Redis that hangs (SIGSTOP: connections stay open, nothing is answered) costs a request
one bounded wait, BOXOFFICE_REDIS_TIMEOUT_SECONDS, then 503 `unavailable` with
Retry-After; after SIGCONT the service sells again, nothing oversold or duplicated."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.exceptions
from redis.crc import key_slot

from service.core.settings import Settings
from service.hotpath.context import Services
from tests.apiserver import served
from tests.conftest import create_event, server_env
from tests.servers import LocalCluster, RedisServer

# Short, so that the test is quick; the bound asserted is generous (a correctness bound:
# no retry stacked on another, not a speed claim).
TIMEOUT = 1.0
BOUND = 2 * TIMEOUT + 1.0
HOLD = {"customer_id": "c", "items": [{"category": "GA", "quantity": 1}]}


@pytest.fixture
async def hung() -> AsyncIterator[RedisServer]:
    with RedisServer() as server:
        try:
            yield server
        finally:
            server.resume()  # never leave a stopped process behind


@pytest.fixture
async def client(settings: Settings, hung: RedisServer) -> AsyncIterator[httpx.AsyncClient]:
    env = {
        **server_env(settings),
        "BOXOFFICE_REDIS_URL": hung.url,
        "BOXOFFICE_REDIS_TIMEOUT_SECONDS": str(TIMEOUT),
    }
    async with served(env, client_timeout=60) as c:
        yield c


async def timed(request: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await request
    return r, time.monotonic() - started


async def sold(client: httpx.AsyncClient, event_id: str) -> int:
    """GA tickets sold, as Redis counts them (/metrics' live figures)."""
    text = (await client.get("/metrics")).text
    line = f'boxoffice_tickets_sold{{category="GA",event="{event_id}"}}'
    values = [row.split()[-1] for row in text.splitlines() if row.startswith(line)]
    assert values, text
    return int(float(values[0]))


def unavailable(r: httpx.Response, took: float, what: str) -> None:
    print(f"{what}: {r.status_code} after {took:.2f}s: {r.text}")
    assert r.status_code == 503, (what, r.text)
    assert r.json()["code"] == "unavailable", r.text
    assert r.headers["retry-after"]
    assert took < BOUND, (what, took)


async def test_a_hung_redis_answers_503_within_the_deadline_then_recovers(
    client: httpx.AsyncClient, hung: RedisServer
) -> None:
    event_id = await create_event(client)
    holds = f"/events/{event_id}/holds"
    r = await client.post(holds, json=HOLD)
    assert r.status_code == 201, r.text
    pending = r.json()["hold_id"]

    hung.pause()
    r, took = await timed(client.post(holds, json=HOLD))
    unavailable(r, took, "hold")
    # The script may have run before the server stopped answering: the answer says so.
    assert "Idempotency-Key" in r.json()["detail"], r.text
    r, took = await timed(client.post(f"{holds}/{pending}/confirm"))
    unavailable(r, took, "confirm")
    r, took = await timed(client.get(f"/events/{event_id}"))
    unavailable(r, took, "GET event")
    r, took = await timed(client.get(f"{holds}/{pending}"))  # redis-py's client, not the pipe
    unavailable(r, took, "GET hold")
    r, took = await timed(client.get("/ready"))
    print(f"/ready: {r.status_code} after {took:.2f}s: {r.text}")
    assert r.status_code == 503, r.text
    assert "redis" in r.json()["missing"], r.text
    assert took < BOUND, took
    # Many at once: each is its own bounded wait, none queued behind another's.
    started = time.monotonic()
    replies = await asyncio.gather(*(client.post(holds, json=HOLD) for _ in range(20)))
    took = time.monotonic() - started
    assert {r.status_code for r in replies} == {503}, [r.text for r in replies]
    assert took < BOUND, took

    hung.resume()
    r = await client.post(f"{holds}/{pending}/confirm")
    assert r.status_code == 200, r.text  # the confirm that got 503 had not run, or this replays
    booking = r.json()["booking_id"]
    r = await client.post(f"{holds}/{pending}/confirm")
    assert r.json()["booking_id"] == booking, r.text  # the same booking, not a second
    r = await client.get("/ready")
    assert r.status_code == 200, r.text
    r = await client.post(holds, json=HOLD, headers={"Idempotency-Key": "after"})
    assert r.status_code == 201, r.text

    # Counts: what Redis says equals what the answers account for. Holds that got a 503
    # may have been made (then they are live, and expire): never more than were asked.
    event = (await client.get(f"/events/{event_id}")).json()
    ga = next(c for c in event["categories"] if c["name"] == "GA")
    assert await sold(client, event_id) == 1  # confirmed once, not twice
    taken = ga["capacity"] - ga["available"]
    # 1 confirmed + 1 held after recovery, plus at most the 21 holds that answered 503.
    assert 2 <= taken <= 2 + 21, ga


async def test_a_hold_retried_with_its_idempotency_key_after_a_503_is_made_once(
    client: httpx.AsyncClient, hung: RedisServer
) -> None:
    event_id = await create_event(client)
    holds = f"/events/{event_id}/holds"
    key = {"Idempotency-Key": "k1"}
    assert (await client.get(f"/events/{event_id}")).status_code == 200  # loaded

    hung.pause()
    r, took = await timed(client.post(holds, json=HOLD, headers=key))
    unavailable(r, took, "hold with a key")
    hung.resume()

    first = await client.post(holds, json=HOLD, headers=key)
    assert first.status_code == 201, first.text
    again = await client.post(holds, json=HOLD, headers=key)
    assert again.status_code == 201, again.text
    assert again.json()["hold_id"] == first.json()["hold_id"]
    event = (await client.get(f"/events/{event_id}")).json()
    ga = next(c for c in event["categories"] if c["name"] == "GA")
    assert ga["capacity"] - ga["available"] == 1, ga  # one hold, whatever the 503 left


async def test_a_redis_hung_from_the_start_costs_one_wait_too(
    settings: Settings, hung: RedisServer
) -> None:
    # The first call finds out whether Redis is a cluster: that question waits once too.
    env = {
        **server_env(settings),
        "BOXOFFICE_REDIS_URL": hung.url,
        "BOXOFFICE_REDIS_TIMEOUT_SECONDS": str(TIMEOUT),
    }
    event_id = "hung-from-start"
    hung.pause()
    async with served(env, client_timeout=60) as client:  # it starts: /health needs no Redis
        r, took = await timed(client.post(f"/events/{event_id}/holds", json=HOLD))
        unavailable(r, took, "first hold")
        hung.resume()
        event_id = await create_event(client)
        r = await client.post(f"/events/{event_id}/holds", json=HOLD)
        assert r.status_code == 201, r.text


@pytest.mark.cluster
async def test_redis_py_on_a_cluster_waits_for_a_silent_node_once(settings: Settings) -> None:
    """The other calls (redis-py's cluster client): a command waits one timeout, a pipeline
    at most the cluster budget and one timeout (redis-py alone would try again 40 times,
    each waiting the timeout). A long cluster-node-timeout: no failover while paused."""
    budget = 1.0
    with LocalCluster(node_timeout_ms=60_000) as cluster:
        own = Settings(
            redis_url=cluster.url,
            database_url=settings.database_url,
            redis_timeout_seconds=TIMEOUT,
            redis_cluster_retry_seconds=budget,
        )
        svc = Services.open(own)
        await svc.start()
        try:
            key = "{hang}:x"
            await svc.redis.set(key, "1")
            node = cluster.owner(key_slot(key.encode()))
            node.pause()
            try:
                started = time.monotonic()
                with pytest.raises(redis.exceptions.TimeoutError):
                    await svc.redis.get(key)
                took = time.monotonic() - started
                print(f"GET: TimeoutError after {took:.2f}s")
                assert took < BOUND, took
                pipe = svc.redis.pipeline(transaction=False)
                pipe.get(key)
                started = time.monotonic()
                with pytest.raises(redis.exceptions.TimeoutError):
                    await pipe.execute()
                took = time.monotonic() - started
                print(f"pipeline: TimeoutError after {took:.2f}s")
                assert took < 2 * (budget + TIMEOUT) + 1, took
            finally:
                node.resume()
            assert await svc.redis.get(key) == b"1"
        finally:
            await svc.close()
