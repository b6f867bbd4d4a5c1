"""The waiting room on a real Redis Cluster (tests/servers.py LocalCluster, 3 primaries with
a replica each; the cluster, API server and worker fixtures of tests/test_cluster_service.py),
with an event on every primary: each room's keys on its event's primary, and every queue
call, the worker's background step and the admin's figures served there.

A failover: the queue of an event on a killed primary keeps its tickets and order once the
replica takes over. Only what reached the replica: joins are not WAITed for (a queue ticket
is not a sale, BOXOFFICE_CONFIRM_WAIT_REPLICAS covers confirmations and cancellations), so
a kill -9 may lose the last joins a primary acknowledged before its replica had them (Redis
replicates asynchronously). The test waits for the replica itself before the kill, to show
what a takeover keeps; it does not claim that nothing can be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import redis
from redis.crc import key_slot

from service.core.keys import EVENTS, event_keys
from service.hotpath.context import Services
from service.selling import waitingroom
from tests.apiserver import Worker
from tests.conftest import eventually
from tests.servers import LocalCluster, RedisServer
from tests.test_cluster_service import (  # noqa: F401 (fixtures)
    capi,
    cclient,
    create,
    csettings,
    csvc,
    cworker,
    on_every_primary,
)
from tests.test_waiting_room import LATER, admitted, ga, hold, join, poll
from tests.test_waiting_room_order import admitted_after, figures, patch, poll_all, spearman

PRE_QUEUE = 200  # per event, on each of the 3 primaries
ARRIVALS = 10
FIRST = 40  # the first fifth in line
RATE = 1200  # a minute: 20 a second


async def rooms(
    cluster: LocalCluster,
    client: httpx.AsyncClient,
    prefix: str,
    capacity: int = 50,
    **overrides: Any,
) -> dict[RedisServer, str]:
    """An event with a waiting room on every primary, by primary."""
    events = on_every_primary(cluster, prefix)
    for event_id in events.values():
        await create(client, event_id, **ga(capacity, **overrides))
    return events


def on_its_primary(cluster: LocalCluster, node: RedisServer, event_id: str) -> int:
    """How many of the room's keys the event's primary holds (a MOVED error if it did not
    serve their slot)."""
    n: int = cluster.call(node, "EXISTS", *event_keys(event_id).queue)
    return n


async def test_join_poll_leave_and_figures_on_every_primary(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,  # noqa: F811
) -> None:
    events = await rooms(cluster, cclient, "wrjoin", waiting_room={"admit_per_minute": 1})
    assert len(events) == 3
    for node, event_id in events.items():
        first = await join(cclient, event_id, "alice")
        assert first.status_code == 201, first.text
        alice = first.json()
        assert alice["status"] == "waiting" and alice["position"] == 1, alice
        again = await join(cclient, event_id, "alice")
        assert again.status_code == 201 and again.json()["ticket"] == alice["ticket"]
        bob = (await join(cclient, event_id, "bob")).json()
        assert bob["position"] == 2 and bob["ticket"] != alice["ticket"]
        # ladder, order, state, corners: on the primary that serves the event's slot.
        assert on_its_primary(cluster, node, event_id) == 4
        r = await cclient.delete(f"/events/{event_id}/queue/{alice['ticket']}")
        assert r.status_code == 204, r.text
        assert (await poll(cclient, event_id, bob["ticket"]))["position"] == 1
        r = await cclient.get(f"/events/{event_id}/queue/{alice['ticket']}")
        assert r.status_code == 404 and r.json()["code"] == "ticket_not_found", r.text
        back = (await join(cclient, event_id, "alice")).json()
        assert back["ticket"] != alice["ticket"] and back["position"] == 2
        assert await figures(cclient, event_id) == {
            "waiting": 2,
            "admitted": 0,
            "active_passes": 0,
            "admit_per_minute": 1,
            "last_admitted_position": 0,
        }
    text = (await cclient.get("/metrics")).text
    for event_id in events.values():
        assert f'boxoffice_queue_waiting{{event="{event_id}"}} 2' in text, event_id


async def test_pre_queue_shuffled_at_the_opening_then_fcfs_on_every_primary(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,  # noqa: F811
    csvc: Services,  # noqa: F811
) -> None:
    """The fairness check of tests/test_waiting_room_order.py, smaller, on each primary:
    200 pre-queued in a known order come out in an unrelated order, arrivals after the
    opening strictly in turn, admission in position order."""
    events = await rooms(
        cluster, cclient, "wrfair", on_sale_at=LATER, waiting_room={"admit_per_minute": 1}
    )

    async def pre_queue(event_id: str) -> list[str]:
        tickets = []
        for i in range(PRE_QUEUE):  # one after the other: the join order is known
            t, new = await waitingroom.join(csvc, event_id, f"pre-{i:04d}", None)
            assert new and t.position is None and t.status == "waiting"
            tickets.append(t.ticket)
        return tickets

    joined = await asyncio.gather(*(pre_queue(e) for e in events.values()))
    for event_id, tickets in zip(events.values(), joined, strict=True):
        await patch(cclient, event_id, {"on_sale_at": None})  # the on-sale moment
        late = []
        for i in range(ARRIVALS):
            t = (await join(cclient, event_id, f"late-{i:03d}")).json()
            assert t["position"] == PRE_QUEUE + i + 1, t
            late.append(t["ticket"])
        seen = await poll_all(cclient, event_id, tickets + late)
        positions = [t["position"] for t in seen]
        pre, after = positions[:PRE_QUEUE], positions[PRE_QUEUE:]
        assert sorted(pre) == list(range(1, PRE_QUEUE + 1))
        assert after == list(range(PRE_QUEUE + 1, PRE_QUEUE + ARRIVALS + 1))
        # Rank correlation with the join order ~ N(0, 1/sqrt(199) = 0.071): 4 sigma.
        rho = spearman(list(range(1, PRE_QUEUE + 1)), pre)
        assert abs(rho) < 0.28, rho
        # The first 40 in line per fifth of the join order: about 8 each; chi-square
        # with 4 degrees of freedom below 18.5 (p = 0.001 for a uniform draw).
        fifth = PRE_QUEUE // 5
        first = [i for i, p in enumerate(pre) if p <= FIRST]
        fifths = [sum(1 for i in first if i // fifth == k) for k in range(5)]
        chi2 = sum((n - FIRST / 5) ** 2 / (FIRST / 5) for n in fifths)
        assert chi2 < 18.5 and all(fifths), (fifths, chi2)
        print(f"\n{event_id}: spearman {rho:+.3f}, first {FIRST} per fifth {fifths}")

        # Admitted in position order: whoever is admitted, everyone ahead of them is too.
        admitted_positions, frontier = await admitted_after(cclient, event_id, tickets, pre, 1.0)
        assert len(admitted_positions) >= 10, admitted_positions
        assert admitted_positions == list(range(1, frontier + 1))


async def test_admission_at_the_rate_on_every_primary(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,  # noqa: F811
) -> None:
    """1,200 a minute on each primary at once, over 4 s: 80 ± 10% each, and at no sample
    ahead of the rate from the opening (no burst) nor behind it by more than a few."""
    rate = RATE / 60
    room = {"admit_per_minute": RATE}
    events = await rooms(cluster, cclient, "wrrate", on_sale_at=LATER, waiting_room=room)
    for event_id in events.values():
        await asyncio.gather(*(join(cclient, event_id, f"c{i}") for i in range(150)))

    async def measure(event_id: str) -> tuple[float, int]:
        before = time.monotonic()
        await patch(cclient, event_id, {"on_sale_at": None})  # opens the room
        opened = time.monotonic()
        total = (0.0, 0)
        while time.monotonic() - opened < 4.0:
            asked = time.monotonic()
            n = (await figures(cclient, event_id))["admitted"]
            answered = time.monotonic()
            # The room opened between `before` and `opened`, counted on Redis's clock.
            assert n <= rate * (answered - before) + 1, (event_id, n, answered - before)
            assert n >= rate * (asked - opened) - 2, (event_id, n, asked - opened)
            total = ((asked + answered) / 2 - (before + opened) / 2, n)
            await asyncio.sleep(0.25)
        return total

    for event_id, (seconds, total) in zip(
        events.values(), await asyncio.gather(*(measure(e) for e in events.values())), strict=True
    ):
        expected = rate * seconds
        assert abs(total - expected) <= 0.1 * expected + 1, (event_id, total, seconds)
        f = await figures(cclient, event_id)
        assert f["waiting"] == 150 - f["admitted"], f
        print(f"\n{event_id}: {total} admitted in {seconds:.2f} s, expected {expected:.0f}")


async def test_holds_need_the_pass_on_every_primary(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,  # noqa: F811
) -> None:
    room = {"admit_per_minute": 60_000, "pass_ttl_seconds": 600}
    events = await rooms(cluster, cclient, "wrpass", waiting_room=room)
    event_ids = list(events.values())
    for n, (node, event_id) in enumerate(events.items()):
        t = await admitted(cclient, event_id, "alice")
        token = t["pass"]
        assert token, t
        for _ in range(2):
            r = await hold(cclient, event_id, "alice", token)
            assert r.status_code == 201, r.text
        other_event = event_ids[(n + 1) % len(event_ids)]  # on another primary
        for customer, value, ev in (
            ("alice", None, event_id),
            ("bob", token, event_id),
            ("alice", token, other_event),
        ):
            r = await hold(cclient, ev, customer, value)
            assert r.status_code == 403, (customer, value, ev, r.text)
            assert r.json()["code"] == "admission_required", r.text
        f = await figures(cclient, event_id)
        assert (f["admitted"], f["active_passes"], f["waiting"]) == (1, 1, 0), f
        # When it was admitted (the pass's expiry follows) is kept on the event's primary.
        assert cluster.call(node, "LLEN", event_keys(event_id).queue[4]) >= 1


async def test_the_worker_advances_quiet_rooms_on_every_primary(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,  # noqa: F811
    cworker: Worker,  # noqa: F811
) -> None:
    """Nobody asks: the worker's step (waitingroom.Ticker) moves each room's frontier on
    its own primary and forgets the frontier's corners no pass needs any more."""
    events = await rooms(cluster, cclient, "wrtick", waiting_room={"admit_per_minute": 6000})
    stamps = {}
    for node, event_id in events.items():
        for i in range(20):
            await join(cclient, event_id, f"c{i}")
        q = event_keys(event_id).queue
        cluster.call(node, "LPUSH", q[4], "2 0", "1 0")  # corners of long ago
        stamps[node] = float(cluster.call(node, "HGET", q[3], "t"))

    async def stepped() -> bool:
        for node, event_id in events.items():
            q = event_keys(event_id).queue
            f, t = cluster.call(node, "HMGET", q[3], "f", "t")
            if float(t) <= stamps[node] + 1000 or float(f) < 20:
                return False
            if cluster.call(node, "LINDEX", q[4], 0) == b"1 0":
                return False
        return True

    await eventually(stepped, within=15)
    assert cworker.running


async def test_sold_out_then_back_to_waiting_on_every_primary(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,  # noqa: F811
) -> None:
    room = {"admit_per_minute": 6000}
    events = await rooms(cluster, cclient, "wrstock", capacity=2, waiting_room=room)

    async def one(event_id: str) -> None:
        first = await admitted(cclient, event_id, "first")
        r = await hold(cclient, event_id, "first", first["pass"])
        assert r.status_code == 201, r.text
        last = await hold(cclient, event_id, "first", first["pass"])  # the last ticket
        assert last.status_code == 201, last.text
        joined = [(await join(cclient, event_id, f"c{i}")).json() for i in range(10)]
        tickets = [t["ticket"] for t in joined]
        assert {t["status"] for t in joined} == {"sold_out"}, joined
        before = (await figures(cclient, event_id))["admitted"]
        await asyncio.sleep(0.5)  # 50 would be admitted if anything were on sale
        seen = await poll_all(cclient, event_id, tickets)
        assert {t["status"] for t in seen} == {"sold_out"}, seen
        assert all(t["pass"] is None and t["position"] >= 1 for t in seen)
        assert (await figures(cclient, event_id))["admitted"] == before
        r = await cclient.delete(f"/events/{event_id}/holds/{last.json()['hold_id']}")
        assert r.status_code == 204, r.text

        async def back(statuses: set[str]) -> bool:  # the API's room state, within a second
            seen[:] = await poll_all(cclient, event_id, tickets)
            return {t["status"] for t in seen} <= statuses

        await eventually(lambda: back({"waiting", "admitted"}), within=1)
        await asyncio.sleep(0.3)
        await eventually(lambda: back({"admitted"}), within=1)

    await asyncio.gather(*(one(e) for e in events.values()))


async def test_a_queue_keeps_its_order_while_its_slot_moves(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,  # noqa: F811
) -> None:
    """The event's slot moves to another primary a key at a time while buyers join and
    poll: every call is answered (a script whose keys are split between the two nodes is
    sent again until they are together: TRYAGAIN waited out), no ticket moves in line,
    and the room's keys end up on the new primary."""
    source, event_id = next(iter(on_every_primary(cluster, "wrmove").items()))
    target = next(node for node in cluster.primaries() if node is not source)
    room = {"admit_per_minute": 1}
    await create(cclient, event_id, **ga(on_sale_at=LATER, waiting_room=room))
    tickets = [(await join(cclient, event_id, f"pre-{i}")).json()["ticket"] for i in range(30)]
    await patch(cclient, event_id, {"on_sale_at": None})
    before = await poll_all(cclient, event_id, tickets)
    slot = key_slot(event_keys(event_id).meta.encode())
    moving = asyncio.create_task(
        asyncio.to_thread(cluster.move_slot, slot, target, batch=1, pause=0.15)
    )
    joined: list[dict[str, Any]] = []
    while not moving.done():
        r = await join(cclient, event_id, f"mid-{len(joined)}")
        assert r.status_code == 201, r.text
        joined.append(r.json())
        seen = await poll_all(cclient, event_id, tickets)
        assert [t["position"] for t in seen] == [t["position"] for t in before]
    assert await moving > 0 and joined
    assert [t["position"] for t in joined] == list(range(31, 31 + len(joined)))
    assert cluster.owner(slot) is target
    assert on_its_primary(cluster, target, event_id) == 4
    assert (await figures(cclient, event_id))["waiting"] == 30 + len(joined)


async def test_a_queue_keeps_its_tickets_and_order_through_a_failover(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,  # noqa: F811
) -> None:
    """kill -9 the primary of an event with a pre-queue shuffled and arrivals behind it:
    once its replica has taken over, every ticket reads the same position, the admin the
    same figures, and a join sent after the kill is answered behind them."""
    victim = cluster.primaries()[-1]
    replica = cluster.replica_of(victim)
    event_id = on_every_primary(cluster, "wrfo")[victim]
    await create(cclient, event_id, **ga(on_sale_at=LATER, waiting_room={"admit_per_minute": 1}))
    customers = [f"pre-{i}" for i in range(40)]
    tickets = [(await join(cclient, event_id, c)).json()["ticket"] for c in customers]
    await patch(cclient, event_id, {"on_sale_at": None})
    for i in range(10):
        tickets.append((await join(cclient, event_id, f"late-{i}")).json()["ticket"])
    before = await poll_all(cclient, event_id, tickets)
    assert sorted(t["position"] for t in before) == list(range(1, 51))
    figures_before = await figures(cclient, event_id)
    # The test, not the service, makes sure the replica has every join (see above).
    assert cluster.call(victim, "WAIT", 1, 5000) == 1
    cluster.kill(victim)
    try:
        # Asked of the dead primary: answered once the replica has taken over.
        r = await join(cclient, event_id, "after-the-kill")
        assert r.status_code == 201, r.text
        assert r.json()["position"] == 51, r.text
        assert replica in cluster.primaries()
        after = await poll_all(cclient, event_id, tickets)
        assert [(t["ticket"], t["position"], t["status"]) for t in after] == [
            (t["ticket"], t["position"], t["status"]) for t in before
        ]
        again = await join(cclient, event_id, customers[7])
        assert again.json()["ticket"] == tickets[7]  # the same customer, the same ticket
        f = await figures(cclient, event_id)
        assert f == {**figures_before, "waiting": figures_before["waiting"] + 1}, f
        assert on_its_primary(cluster, replica, event_id) == 4
    finally:
        cluster.heal()


async def test_joins_acknowledged_then_lost_with_their_primary_keep_their_places(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,  # noqa: F811
) -> None:
    """Joins answered by a primary that dies before its replica has them: the replica
    takes over without them, yet every ticket reads the same status and position (its
    place is in the signed ticket), the polls put the lost joins back in their places,
    and a join after the takeover goes behind them all."""
    victim = cluster.primaries()[-1]
    replica = cluster.replica_of(victim)
    event_id = on_every_primary(cluster, "wrlost")[victim]
    await create(cclient, event_id, **ga(waiting_room={"admit_per_minute": 1}))
    kept = [(await join(cclient, event_id, f"kept-{i}")).json()["ticket"] for i in range(5)]
    await patch(cclient, event_id, {"status": "paused"})  # nobody admitted while it runs
    assert cluster.call(victim, "WAIT", 1, 5000) == 1
    # The replica stops (and its link is cut): what the primary answers now, it alone has.
    replica.pause()
    try:
        cluster.call(victim, "CLIENT", "KILL", "TYPE", "replica")
        lost = [(await join(cclient, event_id, f"lost-{i}")).json()["ticket"] for i in range(20)]
        tickets = kept + lost
        before = await poll_all(cclient, event_id, tickets)
        assert [t["position"] for t in before] == list(range(1, 26))
        assert int(cluster.call(victim, "ZCARD", event_keys(event_id).queue[2])) == 25
        cluster.kill(victim)
    finally:
        replica.resume()
    try:
        # Polls need no Redis: answered even now, from the API's view of the room.
        assert await poll_all(cclient, event_id, tickets) == before

        async def taken_over() -> bool:
            return replica in await asyncio.to_thread(cluster.primaries)

        await eventually(taken_over, within=30)
        after = await poll_all(cclient, event_id, tickets)
        assert [(t["ticket"], t["position"], t["status"]) for t in after] == [
            (t["ticket"], t["position"], t["status"]) for t in before
        ]
        order = event_keys(event_id).queue[2]

        async def put_back() -> bool:  # by the API's next read of the room
            await poll_all(cclient, event_id, tickets)
            return int(cluster.call(replica, "ZCARD", order)) == 25

        assert int(cluster.call(replica, "ZCARD", order)) <= 25
        await eventually(put_back, within=5)
        late = (await join(cclient, event_id, "after-the-kill")).json()
        assert late["position"] == max(t["position"] for t in before) + 1, late
        again = (await join(cclient, event_id, "lost-7")).json()
        assert again["ticket"] == lost[7]  # the same customer, the same ticket
    finally:
        cluster.heal()


async def test_a_primary_away_holds_up_no_other_primarys_rooms(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,  # noqa: F811
    cworker: Worker,  # noqa: F811
) -> None:
    """A primary away for good (its replica told not to take over), the others serving
    (cluster-require-full-coverage off): the worker goes on stepping the rooms of the
    primaries that answer about every second, while each step of a room on the lost one
    waits out its retry budget. The last test: the lost primary comes back empty."""
    # Not the primary the worker lists events on, nor the one its URL names (it finds the
    # cluster through it: tests/servers.py gives no seed nodes).
    spared = {cluster.owner(key_slot(EVENTS.encode())).port, cluster.nodes[0].port}
    victim = next(node for node in cluster.primaries() if node.port not in spared)
    replica = cluster.replica_of(victim)
    # Named to come first in the worker's list: a step that waits must not hold up the rest.
    lost = cluster.event_ids(1, "a-wrlost")[victim.port][0]
    live = {n: e for n, e in on_every_primary(cluster, "wrup").items() if n is not victim}
    for event_id in [lost, *live.values()]:
        await create(cclient, event_id, **ga(waiting_room={"admit_per_minute": 6000}))
        await join(cclient, event_id, "c")
    for node in cluster.nodes:
        cluster.call(node, "CONFIG", "SET", "cluster-require-full-coverage", "no")

    async def started() -> bool:  # its scripts loaded on every primary, the cluster found
        return " started" in cworker.log() and all(
            float(cluster.call(node, "HGET", event_keys(e).queue[3], "t")) > joined_ms + 1000
            for node, e in live.items()
        )

    joined_ms = time.time() * 1000
    await eventually(started)
    cluster.call(replica, "CONFIG", "SET", "cluster-replica-no-failover", "yes")
    try:
        cluster.kill(victim)
        killed_ms = time.time() * 1000
        stepped: dict[RedisServer, set[int]] = {node: set() for node in live}
        # Watched for 8 s, under the lost step's retry budget (10 s): a worker held up by
        # it steps the others once at most meanwhile; one that is not, about every second
        # (3 steps at least, even on a machine busy with other tests).
        until = time.monotonic() + 8.0
        while time.monotonic() < until:
            for node, event_id in live.items():
                with contextlib.suppress(redis.RedisError):
                    t = cluster.call(node, "HGET", event_keys(event_id).queue[3], "t")
                    stepped[node].add(int(float(t)))
            await asyncio.sleep(0.1)
        for node, seen in stepped.items():
            after = sorted(t - killed_ms for t in seen if t > killed_ms + 500)
            assert len(after) >= 3, (node.port, after)  # nobody else asks: the worker's
    finally:
        cluster.call(replica, "CONFIG", "SET", "cluster-replica-no-failover", "no")
        for node in cluster.nodes:
            if node.running:
                cluster.call(node, "CONFIG", "SET", "cluster-require-full-coverage", "yes")
        cluster.heal()
