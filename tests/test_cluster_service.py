"""The service (API server, worker, reconcile) on a real Redis Cluster (tests/servers.py
LocalCluster, 3 primaries with a replica each), with events on every primary."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from msgspec.structs import replace
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError

from service import errors, outbox, sales, schemas
from service.context import Services
from service.expiry import Sweeper
from service.keys import OUTBOX_GROUP, event_keys, restock_channel
from service.live import live_event_ids
from service.reconcile import reconcile
from service.scripts import Scripts
from service.settings import Settings
from service.writebehind import WriteBehind
from tests.apiserver import ApiServer, Worker
from tests.conftest import (
    ADMIN,
    availability,
    event_body,
    eventually,
    expire_hold,
    server_env,
    worker_env,
)
from tests.servers import LocalCluster, RedisServer, free_port
from tests.test_cli import boxoffice
from tests.test_expiry_background import hold_status
from tests.test_writebehind import big_event
from tests.test_writebehind_failures import (
    assert_each_written_once,
    pending_ids,
    sell_in_process,
    until,
    written,
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as c:
        yield c


@pytest.fixture(scope="module")
def csettings(cluster: LocalCluster, settings: Settings) -> Settings:
    return Settings(
        redis_url=cluster.url,
        database_url=settings.database_url,
        admin_token=settings.admin_token,
    )


@pytest.fixture(scope="module")
async def csvc(csettings: Settings) -> AsyncIterator[Services]:
    svc = Services.open(csettings)
    await svc.start()
    await svc.scripts.load()
    yield svc
    await svc.close()


async def test_services_use_the_cluster_client_when_redis_is_a_cluster(
    cluster: LocalCluster, csvc: Services
) -> None:
    assert isinstance(csvc.redis, RedisCluster)
    # Every primary answers through it, not only the URL's node.
    assert len(csvc.redis.get_primaries()) == 3
    keys = [event_keys(event_id).meta for ids in cluster.event_ids(1).values() for event_id in ids]
    for key in keys:
        await csvc.redis.set(key, "1")
    assert all([await csvc.redis.get(key) == b"1" for key in keys])


async def test_seed_nodes_find_the_cluster_when_the_url_node_is_down(
    cluster: LocalCluster, settings: Settings
) -> None:
    svc = Services.open(
        Settings(
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            redis_seed_nodes=",".join(cluster.addresses[1:3]),
            database_url=settings.database_url,
        )
    )
    try:
        await svc.start()
        assert isinstance(svc.redis, RedisCluster)
        assert await svc.redis.ping()
    finally:
        await svc.close()


async def test_a_single_node_keeps_its_own_client(settings: Settings) -> None:
    with RedisServer() as server:
        svc = Services.open(Settings(redis_url=server.url, database_url=settings.database_url))
        try:
            await svc.start()
            assert type(svc.redis) is Redis
        finally:
            await svc.close()


async def test_nothing_answering_is_not_an_error_at_start(settings: Settings) -> None:
    svc = Services.open(
        Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", database_url=settings.database_url)
    )
    try:
        await svc.start()
        assert type(svc.redis) is Redis
    finally:
        await svc.close()


# --- the API server and the worker on the cluster ------------------------------------------


@pytest.fixture(scope="module")
def capi(csettings: Settings) -> Iterator[ApiServer]:
    server = ApiServer(server_env(csettings), workers=1)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cworker(csettings: Settings) -> Iterator[Worker]:
    # The sweeper's interval is long: whatever releases a hold is the listener.
    w = Worker(worker_env(csettings, BOXOFFICE_SWEEP_INTERVAL_SECONDS="600"))
    w.start()
    yield w
    w.stop()


@pytest.fixture
async def cclient(capi: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=capi.url, timeout=30) as c:
        yield c


def on_every_primary(cluster: LocalCluster, prefix: str) -> dict[RedisServer, str]:
    """One new event id per primary, by the primary that serves its slot."""
    by_port = {node.port: node for node in cluster.nodes}
    return {by_port[port]: ids[0] for port, ids in cluster.event_ids(1, prefix).items()}


async def create(client: httpx.AsyncClient, event_id: str, **overrides: Any) -> None:
    r = await client.post("/admin/events", json=event_body(event_id, **overrides), headers=ADMIN)
    assert r.status_code == 201, r.text


async def hold(client: httpx.AsyncClient, event_id: str, quantity: int = 2) -> dict[str, Any]:
    r = await client.post(
        f"/events/{event_id}/holds",
        json={"customer_id": "c", "items": [{"category": "GA", "quantity": quantity}]},
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_hold_confirm_release_on_every_primary(
    cluster: LocalCluster, cclient: httpx.AsyncClient, csvc: Services
) -> None:
    events = on_every_primary(cluster, "contract")
    for node, event_id in events.items():
        await create(cclient, event_id)
        # The event's state lives on the primary of its slot, and the registry knows it.
        assert cluster.call(node, "EXISTS", event_keys(event_id).meta) == 1
        assert event_id in await live_event_ids(csvc)
        kept, dropped = await hold(cclient, event_id), await hold(cclient, event_id, 3)
        assert await availability(cclient, event_id) == {"GA": 45, "VIP": 12}
        r = await cclient.post(f"/events/{event_id}/holds/{kept['hold_id']}/confirm", json={})
        assert r.status_code == 200, r.text
        again = await cclient.post(f"/events/{event_id}/holds/{kept['hold_id']}/confirm", json={})
        assert again.status_code == 200 and again.json() == r.json()
        r = await cclient.get(f"/events/{event_id}/holds/{kept['hold_id']}")
        assert r.status_code == 200 and r.json()["status"] == "confirmed", r.text
        r = await cclient.delete(f"/events/{event_id}/holds/{dropped['hold_id']}")
        assert r.status_code == 204, r.text
        r = await cclient.delete(f"/events/{event_id}/holds/{kept['hold_id']}")
        assert r.status_code == 409 and r.json()["code"] == "hold_confirmed"
        assert await availability(cclient, event_id) == {"GA": 48, "VIP": 12}
    # /metrics reads every event's figures on its own primary.
    text = (await cclient.get("/metrics")).text
    assert "boxoffice_live_figures_up 1.0" in text
    for event_id in events.values():
        line = f'boxoffice_tickets_available{{category="GA",event="{event_id}"}} 48.0'
        assert line in text


def subscribed_primaries(cluster: LocalCluster) -> set[int]:
    found = set()
    for node in cluster.primaries():
        channels = cluster.call(node, "PUBSUB", "NUMSUB", "__keyevent@0__:expired")
        config = cluster.call(node, "CONFIG", "GET", "notify-keyspace-events")
        flags = str(next(iter(config.values())))
        if channels[1] and "E" in flags and ("x" in flags or "A" in flags):
            found.add(node.port)
    return found


async def test_the_listener_expires_holds_on_every_primary_within_2s(
    cluster: LocalCluster, cclient: httpx.AsyncClient, csvc: Services, cworker: Worker
) -> None:
    primaries = {node.port for node in cluster.primaries()}

    async def listening() -> bool:
        return subscribed_primaries(cluster) == primaries

    await eventually(listening)
    events = on_every_primary(cluster, "expiry")
    holds = {}
    for event_id in events.values():
        await create(cclient, event_id, hold_ttl_seconds=10)
        holds[event_id] = await hold(cclient, event_id)
    for event_id, h in holds.items():  # no traffic meanwhile: only the listener can act
        deadline = datetime.fromisoformat(h["expires_at"].replace("Z", "+00:00")).timestamp()
        while await hold_status(csvc, event_id, h["hold_id"]) == "held":
            late = time.time() - deadline
            assert late < 2.0, f"{event_id} not released in 2 s:\n{cworker.log()[-3000:]}"
            await asyncio.sleep(0.05)
        assert await hold_status(csvc, event_id, h["hold_id"]) == "expired"
        assert await availability(cclient, event_id) == {"GA": 50, "VIP": 12}
    assert cworker.running


async def test_the_sweeper_releases_overdue_holds_on_every_primary(
    cluster: LocalCluster, cclient: httpx.AsyncClient, csvc: Services
) -> None:
    """No listener: the sweeper alone (its lock on some node, the events on others)."""
    fast = Services.open(replace(csvc.settings, sweep_interval_seconds=0.5))
    await fast.start()
    stop = asyncio.Event()
    sweeper = Sweeper(fast)
    task = asyncio.create_task(sweeper.run(stop))
    try:
        holds = {}
        for event_id in on_every_primary(cluster, "sweep").values():
            await create(cclient, event_id)
            holds[event_id] = (await hold(cclient, event_id))["hold_id"]
            await expire_hold(csvc, event_id, holds[event_id], fire_ttl=False)

        async def all_expired() -> bool:
            states = [await hold_status(csvc, e, h) for e, h in holds.items()]
            return states == ["expired"] * len(holds)

        await eventually(all_expired, within=3)
        assert await sweeper.lock.owned()
    finally:
        stop.set()
        await task
        await fast.close()


async def test_write_behind_writes_each_confirmation_once_with_a_worker_killed(
    cluster: LocalCluster, cclient: httpx.AsyncClient, csvc: Services, csettings: Settings
) -> None:
    per_event = 400
    events = list(on_every_primary(cluster, "wb").values())
    for event_id in events:
        await create(cclient, event_id, **big_event(per_event))
    ids = {e: await sell_in_process(csvc, e, per_event) for e in events}
    env = worker_env(csettings, BOXOFFICE_OUTBOX_BATCH="10")
    first = Worker(env)
    first.start()
    try:

        async def some_written() -> bool:
            return sum([await written(csvc, e) for e in events]) >= 50

        await until(some_written, within=30, every=0.005)
        first.kill()  # mid-backlog, most likely holding a batch it has not acknowledged
        done = sum([await written(csvc, e) for e in events])
        assert done < per_event * len(events), "the kill must come in the middle"
        second = Worker({**env, "BOXOFFICE_WORKER_LIVENESS_MS": "1000"})
        second.start()
        try:

            async def all_written() -> bool:
                return all([await written(csvc, e) == per_event for e in events])

            await until(all_written, within=60, every=0.1)
            for event_id in events:
                await assert_each_written_once(csvc, event_id, ids[event_id])
                assert not await pending_ids(csvc, event_id)

            async def dead_consumers_forgotten() -> bool:  # drop_consumer.lua, on each node
                for event_id in events:
                    stream = event_keys(event_id).outbox
                    if len(await csvc.redis.xinfo_consumers(stream, OUTBOX_GROUP)) != 1:
                        return False
                return True

            await eventually(dead_consumers_forgotten, within=20)
        finally:
            second.stop()
    finally:
        first.stop()


async def test_reconcile_finds_drift_on_one_node_and_repairs_it(
    cluster: LocalCluster, cclient: httpx.AsyncClient, csvc: Services, csettings: Settings
) -> None:
    events = on_every_primary(cluster, "rec")
    for event_id in events.values():
        await create(cclient, event_id)
        h = await hold(cclient, event_id)
        r = await cclient.post(f"/events/{event_id}/holds/{h['hold_id']}/confirm", json={})
        assert r.status_code == 200, r.text
        await WriteBehind(csvc, "test-reconcile").drain(event_id)
    for event_id in events.values():
        assert (await reconcile(csvc, event_id)).consistent
    node, event_id = next(iter(events.items()))
    cluster.call(node, "HINCRBY", event_keys(event_id).avail, "GA", 5)  # drift, on its node
    report = await reconcile(csvc, event_id)
    assert not report.consistent
    # The command line, as an operator runs it: found from the URL's node alone.
    args = ("reconcile", "--event", event_id, "--repair")
    cli = await asyncio.to_thread(boxoffice, *args, env=server_env(csettings))
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "repaired" in cli.stdout
    assert (await reconcile(csvc, event_id)).consistent
    assert await availability(cclient, event_id) == {"GA": 48, "VIP": 12}


async def test_dead_letters_listed_and_replayed_on_every_primary(
    cluster: LocalCluster, cclient: httpx.AsyncClient, csvc: Services, csettings: Settings
) -> None:
    """The command line on the cluster: the listing visits every event, and the replay
    script runs on the event's own primary."""
    env = server_env(csettings)
    letters = {}
    for event_id in on_every_primary(cluster, "dl").values():
        await create(cclient, event_id)
        entry = outbox.cancel_entry(str(uuid.uuid4()), 1)
        dead = outbox.dead_letter(entry, b"1-1", "refused", 3, 1)
        letter_id: Any = await csvc.redis.xadd(event_keys(event_id).deadletter, dead)
        letters[event_id] = (letter_id.decode(), entry)
    listing = await asyncio.to_thread(boxoffice, "dead-letters", env=env)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    for event_id, (letter_id, _) in letters.items():
        assert event_id in listing.stdout and letter_id in listing.stdout
    # One command costs seconds: the replay on the last primary (not the URL's node).
    event_id, (letter_id, entry) = list(letters.items())[-1]
    args = ("dead-letters", "replay", "--event", event_id, letter_id)
    replayed = await asyncio.to_thread(boxoffice, *args, env=env)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert not await csvc.redis.xlen(event_keys(event_id).deadletter)
    back: Any = await csvc.redis.xrange(event_keys(event_id).outbox)
    assert [fields for _, fields in back] == [entry]


async def call_fails_within_one_budget(
    cluster: LocalCluster, csvc: Services, csettings: Settings, victim: RedisServer
) -> None:
    """One retry policy: a script call on a dead primary gives up once its budget is
    spent, not once per layer that used to retry it (Scripts.call tried three budgets)."""
    budget = 1.0
    scripts = Scripts(csvc.redis, replace(csettings, redis_cluster_retry_seconds=budget))  # type: ignore[arg-type]
    ids = cluster.event_ids(1, "budget")
    started = time.monotonic()
    try:
        alive = next(port for port in ids if port != victim.port)
        await scripts.call("view", ids[alive][0])  # the cluster found: not timed
        event_id = ids[victim.port][0]
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            await scripts.call("view", event_id)
    finally:
        scripts.close()
    took = time.monotonic() - started
    # Within one budget (the last back-off that would overrun it is not slept), where three
    # stacked attempts took three.
    assert took < 1.5 * budget, f"gave up after {took:.2f} s"


async def test_a_release_clears_sold_out_flags_by_sharded_pub_sub(
    cluster: LocalCluster, cclient: httpx.AsyncClient, csettings: Settings
) -> None:
    """An event on each primary: this process takes it for sold out, subscribed on that
    primary only; a release through the API server (another process) clears the flag."""
    svc = Services.open(csettings)
    await svc.start()
    svc.sold_out.start(svc.scripts)
    one = schemas.HoldCreate(customer_id="c", items=[schemas.HoldItem(category="GA", quantity=1)])

    async def refused(event_id: str) -> None:
        with pytest.raises(errors.SoldOut):
            await sales.create_hold(svc, event_id, one, None)

    async def subscribed(event_id: str) -> bool:
        return svc.sold_out.subscribed(event_id)

    try:
        for node, event_id in on_every_primary(cluster, "soldout").items():
            ga = [{"name": "GA", "price": 2500, "currency": "EUR", "capacity": 2}]
            await create(cclient, event_id, categories=ga)
            kept = await hold(cclient, event_id, 2)
            await refused(event_id)  # subscribes
            await eventually(functools.partial(subscribed, event_id), within=2)
            await refused(event_id)  # from a reply asked once subscribed: flagged
            assert svc.sold_out.flagged(event_id) == {"GA"}
            channel = restock_channel(event_id)
            for other in cluster.primaries():
                counts = cluster.call(other, "PUBSUB", "SHARDNUMSUB", channel)
                assert counts[1] == (1 if other is node else 0), (other.port, node.port)
            r = await cclient.delete(f"/events/{event_id}/holds/{kept['hold_id']}")
            assert r.status_code == 204, r.text
            since = time.monotonic()
            while svc.sold_out.flagged(event_id):
                assert time.monotonic() - since < 0.25, "the flag outlived the release"
                await asyncio.sleep(0.005)
            await sales.create_hold(svc, event_id, one, None)  # on sale again
    finally:
        await svc.close()


async def test_a_killed_primary_is_named_by_ready_and_followed_after_failover(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,
    csvc: Services,
    csettings: Settings,
    cworker: Worker,
) -> None:
    """/ready names the primary that is gone; once its replica has taken over, /ready is
    ready again and the worker's listener is subscribed on the new primary."""

    async def listening() -> bool:
        return subscribed_primaries(cluster) == {n.port for n in cluster.primaries()}

    await eventually(listening)
    r = await cclient.get("/ready")
    assert r.status_code == 200, r.text
    victim = cluster.primaries()[-1]
    # Each primary's own eviction policy is looked at.
    cluster.call(victim, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    warnings = (await cclient.get("/ready")).json()["warnings"]
    assert any(f"allkeys-lru on 127.0.0.1:{victim.port}" in w for w in warnings), warnings
    replica = cluster.replica_of(victim)
    cluster.kill(victim)
    try:
        r = await cclient.get("/ready")
        assert r.status_code == 503, r.text
        assert "redis" in r.json()["missing"]
        assert any(f"127.0.0.1:{victim.port}" in w for w in r.json()["warnings"]), r.text
        await call_fails_within_one_budget(cluster, csvc, csettings, victim)

        async def ready() -> bool:
            return (await cclient.get("/ready")).status_code == 200

        await eventually(ready, within=30)
        assert replica in cluster.primaries()
        await eventually(listening, within=15)
        assert cworker.running
    finally:
        cluster.heal()
