"""BOXOFFICE_CONFIRM_WAIT_REPLICAS: a confirmation or cancellation is acknowledged only
once that many replicas have it; a replica that is away turns it into a 503 with
Retry-After, and the retry with the same Idempotency-Key gets the same booking."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec
import pytest
import redis

from service.core import schemas
from service.core.keys import event_keys
from service.core.settings import Settings
from service.hotpath.context import Services
from service.selling import catalog, sales
from tests.apiserver import Worker, served
from tests.conftest import (
    ADMIN,
    create_event,
    event_body,
    eventually,
    new_event_id,
    server_env,
    worker_env,
)
from tests.servers import LocalCluster, RedisServer, wait_synced
from tests.test_wait_shortfall import big_event, confirm_through_a_kill
from tests.test_writebehind import persisted_ids

GA = {"items": [{"category": "GA", "quantity": 1}]}
GA_ITEM = schemas.HoldItem("GA", 1)


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    with RedisServer() as primary:
        replica = RedisServer(args=["--replicaof", "127.0.0.1", str(primary.port)])
        with replica:
            wait_synced(primary, replica)
            yield primary, replica


@pytest.fixture
async def waiting_client(
    settings: Settings, primary_and_replica: tuple[RedisServer, RedisServer]
) -> AsyncIterator[httpx.AsyncClient]:
    primary, _ = primary_and_replica
    env = {
        **server_env(settings),
        "BOXOFFICE_REDIS_URL": primary.url,
        "BOXOFFICE_CONFIRM_WAIT_REPLICAS": "1",
        "BOXOFFICE_CONFIRM_WAIT_TIMEOUT_MS": "300",
    }
    async with served(env) as c:
        yield c


async def _hold(client: httpx.AsyncClient, event_id: str, customer: str) -> str:
    r = await client.post(f"/events/{event_id}/holds", json={"customer_id": customer, **GA})
    assert r.status_code == 201, r.text
    hold_id: str = r.json()["hold_id"]
    return hold_id


async def test_confirm_waits_for_the_replica_and_a_retry_gets_the_same_booking(
    settings: Settings,
    svc: Services,
    waiting_client: httpx.AsyncClient,
    primary_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = primary_and_replica
    client = waiting_client
    event_id = await create_event(client)

    # Replica up: acknowledged, and the replica has the booking when the answer comes.
    hold_id = await _hold(client, event_id, "a")
    r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm")
    assert r.status_code == 200, r.text
    with redis.Redis(port=replica.port) as rr:
        assert rr.hexists(event_keys(event_id).bookings, r.json()["booking_id"])

    # Replica paused: the confirmation is done on the primary but not acknowledged.
    hold_id = await _hold(client, event_id, "b")
    key = {"idempotency-key": "confirm-b"}
    replica.pause()
    try:
        r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm", headers=key)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "unavailable"
        assert int(r.headers["retry-after"]) >= 1
    finally:
        replica.resume()
    wait_synced(primary, replica)
    retry = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm", headers=key)
    assert retry.status_code == 200, retry.text
    booking_id = retry.json()["booking_id"]
    again = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm", headers=key)
    assert again.json()["booking_id"] == booking_id
    with redis.Redis(port=primary.port) as pr:
        assert pr.hlen(event_keys(event_id).bookings) == 2  # one per hold, not per try

    # A cancellation waits too.
    replica.pause()
    try:
        r = await client.delete(
            f"/admin/events/{event_id}/bookings/{booking_id}",
            headers={**ADMIN, "idempotency-key": "cancel-b"},
        )
        assert r.status_code == 503, r.text
        assert "retry-after" in r.headers
    finally:
        replica.resume()
    wait_synced(primary, replica)
    r = await client.delete(
        f"/admin/events/{event_id}/bookings/{booking_id}",
        headers={**ADMIN, "idempotency-key": "cancel-b"},
    )
    assert r.status_code == 204, r.text

    # The write-behind finds exactly one booking per confirmed hold.
    worker = Worker(worker_env(settings, BOXOFFICE_REDIS_URL=primary.url))
    worker.start()
    try:

        async def written() -> bool:
            return len(await persisted_ids(svc, event_id)) == 2

        await eventually(written)
    finally:
        worker.stop()
    assert booking_id in await persisted_ids(svc, event_id)


async def test_no_wait_without_the_setting(
    settings: Settings, primary_and_replica: tuple[RedisServer, RedisServer]
) -> None:
    """n = 0 (the default): no WAIT is sent, so a replica that is away costs nothing."""
    primary, replica = primary_and_replica
    svc = Services.open(Settings(redis_url=primary.url, database_url=settings.database_url))
    try:
        event_id = new_event_id()
        body = msgspec.convert(event_body(event_id), schemas.EventCreate)
        await catalog.create_event(svc, body)
        replica.pause()
        hold, _ = await sales.create_hold_counted(
            svc,
            event_id,
            schemas.HoldCreate(customer_id="c", items=[schemas.HoldItem("GA", 1)]),
            None,
        )
        started = time.monotonic()
        await sales.confirm_hold(svc, event_id, hold.hold_id, schemas.HoldConfirm(), None)
        assert time.monotonic() - started < 0.2
        with redis.Redis(port=primary.port) as pr:
            assert "cmdstat_wait" not in pr.info("commandstats")
    finally:
        replica.resume()
        await svc.close()


# --- a cluster: a primary killed under confirmations -------------------------------------


async def test_acknowledged_confirmations_survive_a_primary_killed_under_load(
    settings: Settings, cluster: LocalCluster
) -> None:
    """kill -9 the event's primary while confirmations pour in with n = 1: its replica takes
    over, sales resume within seconds, and every confirmation that was acknowledged is on
    the new primary (its bookings and its outbox, which the write-behind reads)."""
    waiting = Settings(
        redis_url=cluster.url,
        database_url=settings.database_url,
        confirm_wait_replicas=1,
        confirm_wait_timeout_ms=1000,
    )
    svc = Services.open(waiting)
    await svc.start()
    try:
        port, (event_id,) = next(iter(cluster.event_ids(1).items()))
        primary = next(n for n in cluster.primaries() if n.port == port)
        await big_event(svc, event_id)

        # The old primary comes back (empty: no persistence here) only once its replica has
        # taken over, or the replica would resync from it, empty; back, it is the new
        # primary's replica, which WAIT 1 needs before confirmations resume.
        async def restart() -> None:
            await asyncio.to_thread(primary.start)

        resumed = await confirm_through_a_kill(
            svc, cluster, primary, event_id, buyers=16, once_holds_resume=restart
        )
        acknowledged = resumed.acknowledged
        assert resumed.held < 10
        print(
            f"acknowledged {len(acknowledged)}, failed {resumed.failed}; holds resumed"
            f" {resumed.held:.1f} s after the kill (then the old primary restarted, a replica"
            f" of the new one), confirmations {resumed.confirmed:.1f} s after it"
        )

        await asyncio.to_thread(cluster.wait_ok)
        k = event_keys(event_id)
        keys: list[bytes] = await svc.redis.hkeys(k.bookings)  # type: ignore[assignment]
        stored = {b.decode() for b in keys}
        lost = [b for b in acknowledged if b not in stored]
        assert lost == [], f"{len(lost)} acknowledged confirmations lost"
        queued = set()
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await svc.redis.xrange(k.outbox)  # type: ignore[assignment]
        for _, fields in entries:
            if fields[b"op"] == b"confirm":
                queued.add(msgspec.json.decode(fields[b"booking"])["id"])
        assert set(acknowledged) <= queued
        assert len(acknowledged) == len(set(acknowledged))

        # And PostgreSQL, through a worker on the cluster: each booking once.
        worker = Worker(worker_env(settings, BOXOFFICE_REDIS_URL=cluster.url))
        worker.start()
        try:

            async def written() -> bool:
                return len(await persisted_ids(svc, event_id)) >= len(queued)

            await eventually(written, within=60)
        finally:
            worker.stop()
            print(worker.log()[-2000:])
        persisted = await persisted_ids(svc, event_id)
        assert len(persisted) == len(set(persisted)) == len(queued)
        assert set(acknowledged) <= set(persisted)
    finally:
        await svc.close()
        await asyncio.to_thread(cluster.heal)
