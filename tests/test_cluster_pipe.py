"""The hot path's pipe on a real Redis Cluster (tests/servers.py LocalCluster, 3 primaries
with a replica each): routing by slot, seed nodes, the real scripts racing on every primary,
a slot moved under traffic, a primary killed (SIGKILL) or hung (SIGSTOP) under traffic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import msgspec
import pytest
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from service.core import schemas
from service.core.db import create_engine
from service.core.keys import event_keys
from service.core.retries import BUDGET_SECONDS as RETRY_SECONDS
from service.core.settings import Settings
from service.durable import live
from service.hotpath.connection import REPLY_TIMEOUT, bulk, command
from service.hotpath.context import Services
from service.hotpath.scriptpipe import EVENT_KEYS_CACHED, ScriptPipe
from service.hotpath.scripts import Scripts, raise_for_error
from service.selling import catalog
from service.selling.sales import hold_call
from tests.conftest import event_body
from tests.servers import LocalCluster, RedisServer, free_port

# A script of the test's own, so that each run of it is counted: KEYS are an event's keys
# (the first is the counter), so it is routed and refused exactly as the real ones are.
COUNT = "return redis.call('INCR', KEYS[1])"


@pytest.fixture(scope="module")
async def rc(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(cluster.url)
    await client.initialize()  # before concurrent use: its lazy start-up misroutes
    yield client
    await client.aclose()


class Counter:
    """COUNT through a ScriptPipe, over one key or all sixteen of an event."""

    def __init__(self, pipe: ScriptPipe, sha: str, all_keys: bool) -> None:
        self.pipe, self.sha, self.all_keys = pipe, sha, all_keys

    def payload(self, event_id: str) -> tuple[bytes, int]:
        keys, slot = self.pipe.event_keys(event_id)
        if not self.all_keys:
            keys = bulk(event_keys(event_id).all[0])
        n = len(event_keys(event_id).all) if self.all_keys else 1
        head = b"*%d\r\n" % (3 + n) + bulk(b"EVALSHA", self.sha.encode(), b"%d" % n)
        return head + keys, slot

    async def __call__(self, event_id: str) -> int:
        payload, slot = self.payload(event_id)
        for _ in range(3):
            try:
                result: int = await self.pipe.execute(payload, slot)
                return result
            except NoScriptError:
                # A promoted replica has no scripts: load it there, through the pipe (the
                # cluster client would first wait out the hung or dead node it still knows).
                await self.pipe.execute(command(b"SCRIPT", b"LOAD", COUNT.encode()), slot)
        raise AssertionError("NOSCRIPT again and again")


async def make_counter(cluster: LocalCluster, rc: RedisCluster, all_keys: bool) -> Counter:
    sha: str = await rc.script_load(COUNT)
    return Counter(ScriptPipe(cluster.url), sha, all_keys)


def counter_key(event_id: str) -> str:
    return event_keys(event_id).meta


async def test_calls_reach_the_primary_of_each_event(
    cluster: LocalCluster, rc: RedisCluster
) -> None:
    count = await make_counter(cluster, rc, all_keys=True)
    try:
        by_primary = cluster.event_ids(per_primary=3, prefix="route")
        assert len(by_primary) == 3
        calls = [count(e) for ids in by_primary.values() for e in ids for _ in range(5)]
        await asyncio.gather(*calls)
        assert count.pipe.cluster is True
        nodes = {node.port: node for node in cluster.nodes}
        for port, ids in by_primary.items():
            for event_id in ids:
                # On that primary itself, not merely somewhere in the cluster.
                assert cluster.call(nodes[port], "GET", counter_key(event_id)) == b"5"
    finally:
        count.pipe.close()


async def test_seed_nodes_find_the_cluster_when_the_url_node_is_down(
    cluster: LocalCluster, rc: RedisCluster
) -> None:
    sha: str = await rc.script_load(COUNT)
    seeds = ",".join(cluster.addresses[:2])
    pipe = ScriptPipe(f"redis://127.0.0.1:{free_port()}/0", seed_nodes=seeds)
    try:
        count = Counter(pipe, sha, all_keys=True)
        event_id = next(iter(cluster.event_ids(per_primary=1, prefix="seed").values()))[0]
        assert await count(event_id) == 1
        assert pipe.cluster is True
    finally:
        pipe.close()


async def test_single_node_is_not_taken_for_a_cluster() -> None:
    with RedisServer() as server:
        pipe = ScriptPipe(server.url)
        try:
            assert await pipe.execute(b"*1\r\n$4\r\nPING\r\n") == b"PONG"
            assert pipe.cluster is False
        finally:
            pipe.close()


def cluster_scripts(cluster: LocalCluster, rc: RedisCluster) -> Scripts:
    settings = Settings(redis_url=cluster.url)
    return Scripts(cast(Redis, rc), settings)  # Scripts loads through its client's SCRIPT LOAD


async def load_event(
    cluster: LocalCluster, scripts: Scripts, rc: RedisCluster, event_id: str, capacity: int
) -> None:
    """Loaded as the service loads a new event (live.load), without PostgreSQL."""
    body = event_body(
        event_id,
        categories=[{"name": "GA", "price": 2500, "currency": "EUR", "capacity": capacity}],
    )
    plan = catalog._plan(msgspec.convert(body, schemas.EventCreate))
    settings = Settings(redis_url=cluster.url)
    svc = Services(settings, cast(Redis, rc), scripts, create_engine(settings))
    try:
        await live.load(svc, event_id, plan, "create")
    finally:
        await svc.engine.dispose()


async def test_real_scripts_race_on_every_primary(cluster: LocalCluster, rc: RedisCluster) -> None:
    """service.hotpath.scripts.Scripts on the cluster: 60 buyers for 20 tickets of an event on each
    primary, exactly 20 win on each; the scripts were flushed from every node first, so
    each first call is refused NOSCRIPT and the script is loaded again on its node."""
    scripts = cluster_scripts(cluster, rc)
    try:
        await scripts.load()
        by_primary = cluster.event_ids(per_primary=1, prefix="race")
        events = [ids[0] for ids in by_primary.values()]
        for event_id in events:
            await load_event(cluster, scripts, rc, event_id, capacity=20)
        for node in cluster.primaries():
            cluster.call(node, "SCRIPT", "FLUSH")

        async def buy(event_id: str, n: int) -> bool:
            hold_id = f"h{n}"
            hold = hold_call(event_id, hold_id, f"c{n}", b'[["GA",1]]')
            reply = await scripts.call_event(
                "hold", event_id, *hold.args, extra_keys=hold.extra_keys
            )
            if b'"err":"sold_out"' in reply:
                return False
            raise_for_error(reply)
            return True

        results = await asyncio.gather(*(buy(e, n) for e in events for n in range(60)))
        won = {e: sum(results[i * 60 : (i + 1) * 60]) for i, e in enumerate(events)}
        assert won == {e: 20 for e in events}
        nodes = {node.port: node for node in cluster.nodes}
        for port, ids in by_primary.items():
            held = cluster.call(nodes[port], "HGET", event_keys(ids[0]).held, "GA")
            assert held == b"20"
    finally:
        scripts.close()


def errorstat(cluster: LocalCluster, name: str) -> int:
    """How often the running nodes answered an error of this kind (INFO errorstats)."""
    total = 0
    for node in cluster.nodes:
        if node.running:
            stats: dict[str, Any] = cluster.call(node, "INFO", "errorstats")
            total += int(stats.get(f"errorstat_{name}", {}).get("count", 0))
    return total


def commandstat(cluster: LocalCluster, name: str) -> int:
    total = 0
    for node in cluster.nodes:
        if node.running:
            stats: dict[str, Any] = cluster.call(node, "INFO", "commandstats")
            total += int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
    return total


@pytest.mark.parametrize("all_keys", [False, True], ids=["one-key-ASK", "16-keys-TRYAGAIN"])
async def test_slot_moved_mid_traffic_runs_every_call_exactly_once(
    cluster: LocalCluster, rc: RedisCluster, all_keys: bool
) -> None:
    """While the slot moves key by key, a one-key call whose key has moved is sent ASKING to
    the new owner; a call over several keys is refused with TRYAGAIN until the move is done;
    then MOVED. None may fail, and none may run twice."""
    count = await make_counter(cluster, rc, all_keys)
    event_id = next(iter(cluster.event_ids(per_primary=1, prefix="move").values()))[0]
    slot = count.payload(event_id)[1]
    source = cluster.owner(slot)
    target = next(p for p in cluster.primaries() if p is not source)
    # Keys to move besides the counter, so that the move lasts long enough to be hit.
    tag = event_keys(event_id).tag
    await rc.mset({f"{tag}:filler:{i}": i for i in range(300)})
    asked, tried = commandstat(cluster, "asking"), errorstat(cluster, "TRYAGAIN")
    redirected = errorstat(cluster, "MOVED")
    done = asyncio.Event()
    succeeded = 0
    during = 0

    async def buyer() -> None:
        nonlocal succeeded, during
        while not done.is_set():
            await count(event_id)
            succeeded += 1
            during += not done.is_set()
        for _ in range(5):  # after the move, through MOVED
            await count(event_id)
            succeeded += 1

    try:
        buyers = [asyncio.ensure_future(buyer()) for _ in range(64)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        moved = await asyncio.to_thread(cluster.move_slot, slot, target, batch=5, pause=0.01)
        seconds = time.monotonic() - started
        done.set()
        await asyncio.gather(*buyers)  # any failure fails the test
    finally:
        done.set()
        count.pipe.close()
    assert moved == 301
    assert cluster.owner(slot) is target
    assert during > 100, "too few calls during the move to test it"
    # Exactly once: the counter saw each acknowledged call, and no other.
    assert cluster.call(target, "GET", counter_key(event_id)) == str(succeeded).encode()
    assert errorstat(cluster, "MOVED") > redirected  # the calls after the move
    if all_keys:
        assert errorstat(cluster, "TRYAGAIN") > tried
    else:
        assert commandstat(cluster, "asking") > asked
    print(f"slot move: {moved} keys in {seconds:.2f}s, {during} calls during it, none failed")


async def test_joined_holds_while_their_slot_moves_are_each_made_once(
    cluster: LocalCluster, rc: RedisCluster
) -> None:
    """64 buyers holding on one event while its slot moves: their holds of a turn go joined
    (lua/hold_batch.lua); a joined call refused (TRYAGAIN, ASK, MOVED) is sent again as
    each hold alone. None may fail, and every hold acknowledged is made, once."""
    scripts = cluster_scripts(cluster, rc)
    event_id = next(iter(cluster.event_ids(per_primary=1, prefix="jmove").values()))[0]
    k = event_keys(event_id)
    slot = key_slot(k.meta.encode())
    done = asyncio.Event()
    made: list[str] = []

    async def buyer(b: int) -> None:
        n = 0
        while not done.is_set() or n < 5:
            hold_id = f"b{b}-{n}"
            hold = hold_call(event_id, hold_id, f"c{b}", b'[["GA",1]]')
            reply = await scripts.call_event(
                "hold", event_id, *hold.args, extra_keys=hold.extra_keys
            )
            raise_for_error(reply)
            made.append(hold_id)
            n += 1

    try:
        await scripts.load()
        await load_event(cluster, scripts, rc, event_id, capacity=1_000_000)
        source = cluster.owner(slot)
        target = next(p for p in cluster.primaries() if p is not source)
        await rc.mset({f"{k.tag}:filler:{i}": i for i in range(300)})
        tried = errorstat(cluster, "TRYAGAIN") + errorstat(cluster, "MOVED")
        calls = commandstat(cluster, "evalsha")
        buyers = [asyncio.ensure_future(buyer(b)) for b in range(64)]
        await asyncio.sleep(0.1)
        # Every hold made before the move added a key (its TTL key): moved 50 at a time, the
        # move outlasts no retry budget.
        await asyncio.to_thread(cluster.move_slot, slot, target, batch=50, pause=0.01)
        done.set()
        await asyncio.gather(*buyers)  # any failure fails the test
    finally:
        done.set()
        scripts.close()
    assert cluster.owner(slot) is target
    assert errorstat(cluster, "TRYAGAIN") + errorstat(cluster, "MOVED") > tried
    assert len(set(made)) == len(made)
    # Joined: far fewer script calls ran than holds were made.
    assert commandstat(cluster, "evalsha") - calls < len(made) / 4
    held = cluster.call(target, "HGET", k.held, "GA")
    created = cluster.call(target, "HGET", k.stats, "created")
    records = cluster.call(target, "HLEN", k.holds)
    assert (held, created, records) == (str(len(made)).encode(),) * 2 + (len(made),)


async def failover_under_load(
    cluster: LocalCluster, rc: RedisCluster, fault: Callable[[RedisServer], None]
) -> tuple[float, float]:
    """Calls on events of every primary, 8 callers each, while `fault` strikes one primary.
    Every call must succeed. Returns the seconds until the struck primary's events were
    served again, and the longest pause of the other primaries' events."""
    count = await make_counter(cluster, rc, all_keys=True)
    by_primary = cluster.event_ids(per_primary=2, prefix="fail")
    nodes = {node.port: node for node in cluster.nodes}
    victim_port = next(iter(by_primary))
    victim = nodes[victim_port]
    replica = cluster.replica_of(victim)
    done = asyncio.Event()
    struck_at = 0.0
    resumed_at: dict[str, float] = {}
    last_ok: dict[str, float] = {}
    longest_pause: dict[str, float] = {}

    async def buyer(event_id: str) -> None:
        while not done.is_set():
            sent = time.monotonic()
            await count(event_id)
            now = time.monotonic()
            if struck_at and event_id not in resumed_at and sent > struck_at:
                resumed_at[event_id] = now
            pause = now - last_ok.get(event_id, now)
            longest_pause[event_id] = max(longest_pause.get(event_id, 0.0), pause)
            last_ok[event_id] = now

    victims = by_primary[victim_port]
    events = [e for ids in by_primary.values() for e in ids]
    buyers = [asyncio.ensure_future(buyer(e)) for e in events for _ in range(8)]
    try:
        await asyncio.sleep(0.3)
        struck_at = time.monotonic()
        fault(victim)
        while not all(e in resumed_at for e in victims) and time.monotonic() < struck_at + 20:
            await asyncio.sleep(0.05)
            for b in buyers:
                if b.done():
                    b.result()  # a failed call fails the test now
        await asyncio.sleep(0.3)
    finally:
        done.set()
        await asyncio.gather(*buyers)  # any failure fails the test
        count.pipe.close()
    assert all(e in resumed_at for e in victims), "calls did not resume"
    assert cluster.owner(count.payload(victims[0])[1]) is replica
    resumed = max(resumed_at[e] for e in victims) - struck_at
    others = max(longest_pause[e] for e in events if e not in victims)
    return resumed, others


async def test_primary_killed_mid_traffic_calls_resume_after_failover(
    cluster: LocalCluster, rc: RedisCluster
) -> None:
    """SIGKILL one primary under load: its replica takes over after cluster-node-timeout,
    and the calls of every event, on it and elsewhere, complete within the retry budget."""
    resumed, others = await failover_under_load(cluster, rc, cluster.kill)
    assert resumed < RETRY_SECONDS
    print(
        f"kill -9 a primary: its events served again after {resumed:.2f}s;"
        f" other primaries' events paused at most {others:.2f}s"
    )
    cluster.heal()


async def test_primary_paused_mid_traffic_calls_resume_after_failover(
    cluster: LocalCluster, rc: RedisCluster
) -> None:
    """SIGSTOP one primary under load: its connections stay open but silent; after the
    reply timeout the calls go to the replica that took over, and none fails."""
    paused: list[RedisServer] = []

    def pause(node: RedisServer) -> None:
        node.pause()
        paused.append(node)

    try:
        resumed, others = await failover_under_load(cluster, rc, pause)
    finally:
        for node in paused:
            node.resume()
    assert resumed < REPLY_TIMEOUT + 1 + RETRY_SECONDS
    print(
        f"SIGSTOP a primary: its events served again after {resumed:.2f}s;"
        f" other primaries' events paused at most {others:.2f}s"
    )
    cluster.heal()


def test_event_keys_cache_is_bounded() -> None:
    """Any event id reaches the pipe (GET /events/<random> too): it must not keep them all."""
    pipe = ScriptPipe("redis://127.0.0.1:1/0")
    for i in range(EVENT_KEYS_CACHED + 500):
        keys, slot = pipe.event_keys(f"random-{i}")
    assert keys == bulk(*event_keys(f"random-{i}").all)
    assert slot == key_slot(event_keys(f"random-{i}").meta.encode())
    assert len(pipe._event_keys) == EVENT_KEYS_CACHED
    assert pipe.event_keys("random-0") == pipe.event_keys("random-0")  # computed again
