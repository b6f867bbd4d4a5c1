"""The service (API server, worker, reconcile) on a real Redis Cluster (tests/servers.py
LocalCluster, 3 primaries with a replica each), with events on every primary."""

from __future__ import annotations

import asyncio
import functools
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import datetime
from typing import Any, TypeVar, cast

import httpx
import pytest
from msgspec.structs import replace
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError

from service.core import errors, schemas
from service.core.keys import OUTBOX_GROUP, event_keys, restock_channel
from service.core.settings import Settings
from service.durable import outbox
from service.durable.live import live_event_ids
from service.durable.reconcile import reconcile
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services
from service.hotpath.scripts import Scripts
from service.selling import sales
from service.selling.expiry import Sweeper
from tests.apiserver import ApiServer, Worker
from tests.conftest import (
    ADMIN,
    availability,
    event_body,
    eventually,
    expire_hold,
    on_redis,
    server_env,
    worker_env,
)
from tests.servers import LocalCluster, RedisServer, free_port
from tests.test_cli import boxoffice
from tests.test_cluster_pipe import errorstat
from tests.test_expiry_background import hold_status
from tests.test_races import assert_conserved, ga_event, race, seat_states, seated_event, stock
from tests.test_writebehind import big_event, persisted_ids
from tests.test_writebehind_failures import (
    assert_each_written_once,
    pending_ids,
    sell_in_process,
    until,
    written,
)

T = TypeVar("T")


@pytest.fixture(scope="module")
def csettings(cluster: LocalCluster, settings: Settings) -> Settings:
    return on_redis(settings, cluster.url)


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


# --- races on every primary --------------------------------------------------------------


async def test_races_on_every_primary_sell_exactly_what_there_is(
    cluster: LocalCluster, cclient: httpx.AsyncClient, csvc: Services
) -> None:
    """At once, on each primary: 100 buyers for an event's 20 GA tickets, and 100 for its 10
    seats (best available, or a named seat): exactly 20 and 10 win, each seat once, and
    each event's counters, on its own primary, add up."""
    ga_events = on_every_primary(cluster, "race-ga")
    seated_events = on_every_primary(cluster, "race-seat")
    labels = [f"{row}-{n}" for row in "AB" for n in range(1, 6)]
    for event_id in ga_events.values():
        await create(cclient, event_id, **ga_event(20))
    for event_id in seated_events.values():
        await create(cclient, event_id, **seated_event(["A", "B"], 5))
    rng = random.Random(9)
    ga_bodies = [{"customer_id": f"c{i}", **ga(1)} for i in range(100)]
    seat_bodies = [
        {"customer_id": f"c{i}", "seats": [rng.choice(labels)]}
        if i % 2
        else {"customer_id": f"c{i}", "items": [{"category": "VIP", "quantity": 1}]}
        for i in range(100)
    ]
    answers = await asyncio.gather(
        *(race(cclient, e, ga_bodies) for e in ga_events.values()),
        *(race(cclient, e, seat_bodies) for e in seated_events.values()),
    )
    for (node, event_id), got in zip(ga_events.items(), answers[:3], strict=True):
        assert sum(r.status_code == 201 for r in got) == 20, event_id
        assert all(r.status_code == 201 or r.json()["code"] == "sold_out" for r in got)
        counts = await stock(csvc, event_id)
        assert_conserved(counts)
        assert counts["held"] == {"GA": 20}
        assert cluster.call(node, "HGET", event_keys(event_id).held, "GA") == b"20"
    for (node, event_id), got in zip(seated_events.items(), answers[3:], strict=True):
        won = [r.json() for r in got if r.status_code == 201]
        assigned = [label for body in won for label in body["seats"]]
        assert sorted(assigned) == sorted(labels), event_id  # every seat, each once
        for r in got:
            if r.status_code != 201:
                assert r.json()["code"] in {"sold_out", "seats_unavailable"}, r.text
        assert await seat_states(cclient, event_id) == dict.fromkeys(labels, "held")
        assert_conserved(await stock(csvc, event_id))
        assert cluster.call(node, "HGET", event_keys(event_id).held, "VIP") == b"10"


async def test_seats_confirmed_cancelled_and_raced_on_every_primary(
    cluster: LocalCluster, cclient: httpx.AsyncClient, csvc: Services
) -> None:
    """The rest of the contract, on each primary: named seats held, confirmed into a
    booking and given back by its cancellation; a released hold cannot be confirmed; and
    confirmations racing releases of the same holds, one outcome each."""
    for event_id in on_every_primary(cluster, "seats").values():
        await create(cclient, event_id)
        base = f"/events/{event_id}/holds"
        r = await cclient.post(base, json={"customer_id": "s", "seats": ["A-1", "BOX-2"]})
        assert r.status_code == 201, r.text
        seated = r.json()
        assert (await seat_states(cclient, event_id))["A-1"] == "held"
        r = await cclient.post(f"{base}/{seated['hold_id']}/confirm", json={"payment_ref": "p"})
        assert r.status_code == 200, r.text
        booking = r.json()
        assert sorted(booking["seats"]) == ["A-1", "BOX-2"]
        r = await cclient.get(f"/events/{event_id}/bookings/{booking['booking_id']}")
        assert r.status_code == 200 and r.json()["payment_ref"] == "p", r.text
        assert (await seat_states(cclient, event_id))["BOX-2"] == "sold"
        path = f"/admin/events/{event_id}/bookings/{booking['booking_id']}"
        assert (await cclient.delete(path, headers=ADMIN)).status_code == 204
        assert (await seat_states(cclient, event_id))["BOX-2"] == "available"
        released = await hold(cclient, event_id)
        assert (await cclient.delete(f"{base}/{released['hold_id']}")).status_code == 204
        r = await cclient.post(f"{base}/{released['hold_id']}/confirm", json={})
        assert r.status_code == 409 and r.json()["code"] == "hold_released", r.text
        r = await cclient.get(f"{base}/no-such-hold")
        assert r.status_code == 404 and r.json()["code"] == "hold_not_found", r.text

        holds = [(await hold(cclient, event_id, 1))["hold_id"] for _ in range(10)]
        calls = [(h, op) for h in holds for op in ("confirm", "release") * 4]
        random.Random(3).shuffle(calls)
        answers = await asyncio.gather(
            *(
                cclient.post(f"{base}/{h}/confirm", json={})
                if op == "confirm"
                else cclient.delete(f"{base}/{h}")
                for h, op in calls
            )
        )
        sold = 0
        for h in holds:
            got = {(op, r.status_code) for (c, op), r in zip(calls, answers, strict=True) if c == h}
            # Confirmed first: every confirm 200, every release hold_confirmed; or the
            # other way round: every release 204, every confirm hold_released.
            assert got in (
                {("confirm", 200), ("release", 409)},
                {("release", 204), ("confirm", 409)},
            )
            sold += ("confirm", 200) in got
        counts = await stock(csvc, event_id)
        assert_conserved(counts)
        assert counts["held"] == {"GA": 0, "VIP": 0}
        assert counts["sold"] == {"GA": sold, "VIP": 0}


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
            # Written and acknowledged: the killed worker may have committed its batch to
            # PostgreSQL and not acknowledged it; the second worker's claim is waited for.
            async def all_written_and_acknowledged() -> bool:
                for event_id in events:
                    if await written(csvc, event_id) != per_event:
                        return False
                    if await pending_ids(csvc, event_id):
                        return False
                return True

            await until(all_written_and_acknowledged, within=60, every=0.1)
            for event_id in events:
                await assert_each_written_once(csvc, event_id, ids[event_id])

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


# --- resharding: a hot event's slot moved to another primary while it sells ---------------


class Shopper:
    """A client that holds, then confirms (two in three, under an Idempotency-Key) or reads
    and releases, one after the other, until told to stop; or, in the last phase, holds and
    confirms until the event is sold out. Every answer that is not one the contract allows (a 5xx, a
    connection error, an unexpected code) is kept, to be shown at the end."""

    def __init__(self, client: httpx.AsyncClient, event_id: str, name: str) -> None:
        self.client, self.event_id, self.name = client, event_id, name
        self.confirmed: dict[str, int] = {}  # booking id -> tickets
        self.released = 0
        self.refused = 0  # sold out, for now
        self.failures: list[str] = []
        self.window: tuple[float, float] | None = None  # a slot move, while it lasted
        # Holds confirmed that were under way while a slot moved: their scripts are refused
        # (TRYAGAIN: some of their keys have moved, or are new) until the move is over.
        self.during = 0
        self.slowest = 0.0  # seconds, from asking for a hold to its confirmation
        self.selling_out = False
        self._quantity = 5  # in the last phase: no more than was left at the last refusal
        self._n = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not await self.one():
                return

    async def one(self) -> bool:
        """One hold and its end; False once sold out in the last phase."""
        self._n += 1
        n, base = f"{self.name}-{self._n}", f"/events/{self.event_id}/holds"
        quantity = self._quantity if self.selling_out else 1
        started = time.monotonic()
        r = await self._send("POST", base, {"customer_id": n, **ga(quantity)}, {201, 409})
        if r is None or r.status_code == 409:
            if r is not None and r.json().get("code") != "sold_out":
                self.failures.append(f"hold: {r.status_code} {r.text}")
            self.refused += 1
            if self.selling_out and r is not None:
                left = r.json().get("available", {}).get("GA", 0)
                if not left:
                    return False
                self._quantity = min(5, left)
            await asyncio.sleep(0.01)
            return True
        hold_id = r.json()["hold_id"]
        if self.selling_out or self._n % 3:
            key = {"idempotency-key": f"{self.event_id}-{n}"}
            r = await self._send("POST", f"{base}/{hold_id}/confirm", {}, {200}, key)
            if r is not None:
                self.confirmed[r.json()["booking_id"]] = quantity
                done, window = time.monotonic(), self.window
                self.during += window is not None and started < window[1] and done > window[0]
                self.slowest = max(self.slowest, done - started)
        else:  # read (redis-py's cluster pipeline, not a script), then release
            r = await self._send("GET", f"{base}/{hold_id}", None, {200})
            if r is not None and r.json()["status"] != "held":
                self.failures.append(f"GET {base}/{hold_id}: {r.text}")
            if await self._send("DELETE", f"{base}/{hold_id}", None, {204}) is not None:
                self.released += 1
        return True

    async def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        expected: set[int],
        headers: dict[str, str] | None = None,
    ) -> httpx.Response | None:
        try:
            r = await self.client.request(method, path, json=body, headers=headers)
        except httpx.TransportError as e:
            self.failures.append(f"{method} {path}: {e!r}")
            return None
        if r.status_code not in expected:
            self.failures.append(f"{method} {path}: {r.status_code} {r.text}")
            return None
        return r


def ga(quantity: int) -> dict[str, Any]:
    return {"items": [{"category": "GA", "quantity": quantity}]}


async def test_a_hot_event_sells_on_while_its_slot_moves_away_and_back(
    cluster: LocalCluster, cclient: httpx.AsyncClient, csvc: Services, cworker: Worker
) -> None:
    """While 48 clients hold, confirm and release on one event through the API, its slot is
    moved key by key to another primary (CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE in
    batches, SETSLOT NODE everywhere: tests/servers.py LocalCluster.move_slot), then back.
    No request fails, nothing is oversold, the counters add up, the slot is served where it
    was moved, and the write-behind (its stream moved too) writes every booking once."""
    capacity = 6000
    event_id = next(iter(on_every_primary(cluster, "hot").values()))
    await create(cclient, event_id, **{**big_event(capacity), "max_per_order": 5})
    k = event_keys(event_id)
    slot = key_slot(k.meta.encode())
    source = cluster.owner(slot)
    target = next(p for p in cluster.primaries() if p is not source)
    shoppers = [Shopper(cclient, event_id, f"s{i}") for i in range(48)]
    tried, redirected = errorstat(cluster, "TRYAGAIN"), errorstat(cluster, "MOVED")
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(shopper.run(stop)) for shopper in shoppers]
    moves = []
    try:
        # Away at the pace of `redis-cli --cluster reshard` (10 keys a MIGRATE), then back
        # in smaller batches with a pause between them: a slower move, as under a busier
        # cluster, that the scripts must wait out too.
        for to, batch, pause in ((target, 10, 0.0), (source, 4, 0.02)):
            await asyncio.sleep(0.5)
            started = time.monotonic()
            for shopper in shoppers:
                shopper.window = (started, float("inf"))
            moved = await asyncio.to_thread(cluster.move_slot, slot, to, batch=batch, pause=pause)
            for shopper in shoppers:
                shopper.window = (started, time.monotonic())
            moves.append((moved, time.monotonic() - started))
            assert cluster.owner(slot) is to
            assert cluster.call(to, "EXISTS", k.meta) == 1
        await asyncio.sleep(0.5)
        for shopper in shoppers:
            shopper.selling_out = True
        await asyncio.wait_for(asyncio.gather(*tasks), 120)  # until sold out
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    failures = [f for s in shoppers for f in s.failures]
    assert failures == [], f"{len(failures)} requests failed, first: {failures[:5]}"
    confirmed = {b: n for s in shoppers for b, n in s.confirmed.items()}
    during = sum(s.during for s in shoppers)
    assert during >= len(shoppers) // 2, "too few sales under way during the moves to test them"
    assert errorstat(cluster, "TRYAGAIN") > tried and errorstat(cluster, "MOVED") > redirected
    # Sold out, and exactly: every ticket sold once, to a confirmation that was answered.
    counts = await stock(csvc, event_id)
    assert_conserved(counts)
    assert counts["sold"] == {"GA": capacity} and counts["held"] == {"GA": 0}
    assert sum(confirmed.values()) == capacity
    assert await availability(cclient, event_id) == {"GA": 0}
    assert cluster.owner(slot) is source
    assert cluster.call(target, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0

    async def all_written() -> bool:
        return len(await persisted_ids(csvc, event_id)) >= len(confirmed)

    await eventually(all_written, within=60)
    persisted = await persisted_ids(csvc, event_id)
    assert len(persisted) == len(set(persisted)) and set(persisted) == set(confirmed)
    assert cworker.running
    print(
        "slot moved away and back: "
        + ", ".join(f"{keys} keys in {seconds:.2f} s" for keys, seconds in moves)
        + f"; {len(confirmed)} bookings, {during} under way during the moves, the slowest"
        f" hold and confirmation {max(x.slowest for x in shoppers):.2f} s,"
        f" {sum(x.released for x in shoppers)} holds released,"
        f" {sum(x.refused for x in shoppers)} refused sold out, none failed"
    )


async def call_fails_within_one_budget(
    cluster: LocalCluster, csvc: Services, csettings: Settings, victim: RedisServer
) -> None:
    """One retry policy: a script call on a dead primary gives up once its budget is
    spent, not once per layer that used to retry it (Scripts.call_event tried three budgets)."""
    budget = 1.0
    scripts = Scripts(csvc.redis, replace(csettings, redis_cluster_retry_seconds=budget))  # type: ignore[arg-type]
    ids = cluster.event_ids(1, "budget")
    started = time.monotonic()
    try:
        alive = next(port for port in ids if port != victim.port)
        await scripts.call_event("view", ids[alive][0])  # the cluster found: not timed
        event_id = ids[victim.port][0]
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            await scripts.call_event("view", event_id)
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
            await sales.create_hold_counted(svc, event_id, one, None)

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
            await sales.create_hold_counted(svc, event_id, one, None)  # on sale again
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
    event_id = on_every_primary(cluster, "fo")[victim]
    await create(cclient, event_id)
    held = await hold(cclient, event_id)
    path = f"/events/{event_id}/holds"
    cluster.kill(victim)
    killed_at = time.monotonic()
    try:
        # Asked of the dead primary, answered once its replica has taken over, within the
        # budget (one policy, service/core/retries.py): a hold (the pipe), a read of one
        # (redis-py's cluster pipeline and TIME on the key's node), a plain command.
        holding = _timed(cclient.post(path, json={"customer_id": "f", **ga(1)}), killed_at)
        reading = _timed(cclient.get(f"{path}/{held['hold_id']}"), killed_at)
        hget = csvc.redis.hget(event_keys(event_id).holds, held["hold_id"])
        getting = _timed(cast(Awaitable[bytes | None], hget), killed_at)
        r = await cclient.get("/ready")
        assert r.status_code == 503, r.text
        assert "redis" in r.json()["missing"]
        assert any(f"127.0.0.1:{victim.port}" in w for w in r.json()["warnings"]), r.text
        await call_fails_within_one_budget(cluster, csvc, csettings, victim)

        async def ready() -> bool:
            return (await cclient.get("/ready")).status_code == 200

        await eventually(ready, within=30)
        assert replica in cluster.primaries()
        (created, hold_took), (read, read_took) = await holding, await reading
        raw, hget_took = await getting
        assert created.status_code == 201, created.text
        assert read.status_code == 200 and read.json()["status"] == "held", read.text
        assert raw is not None
        print(
            f"after kill -9 of a primary, answered: a hold {hold_took:.2f} s, a read of one"
            f" {read_took:.2f} s, a plain HGET {hget_took:.2f} s"
        )
        await eventually(listening, within=15)
        assert cworker.running
    finally:
        cluster.heal()


def _timed(call: Awaitable[T], since: float) -> asyncio.Future[tuple[T, float]]:
    """The call under way (a task), and its result with the seconds from `since` to it."""

    async def timed() -> tuple[T, float]:
        result = await call
        return result, time.monotonic() - since

    return asyncio.ensure_future(timed())
