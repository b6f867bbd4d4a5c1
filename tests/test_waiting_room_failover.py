"""A failover that loses pre-queue joins (issue 18: "a join lost to a failover must not
cost the buyer their place"), on a real Redis Cluster (tests/servers.py LocalCluster, the
fixtures of tests/test_cluster_service.py).

Joins are not WAITed for, so a primary killed before its replica had them takes them
along. For arrivals after the opening the room's count shows them missing (a ticket's
arrival number past it); a pre-queue join has a random place and no count, and the room
is the same room (the same generation, not marked lost). What does change is the Redis
process serving the room: the room keeps the run id of the one that last stepped it
(lua/lib.lua, check_server), so the replica's first step finds another, marks the room
suspect for a while, and the API processes offer the tickets polled meanwhile for putting
back (service/selling/roomstate.py, check_lost): each goes back at its own place, once.
"""

from __future__ import annotations

import asyncio

import httpx

from service.core.keys import event_keys
from service.selling import queuetickets
from tests.conftest import PASS_SECRET, eventually
from tests.servers import LocalCluster
from tests.test_cluster_service import (  # noqa: F401 (fixtures)
    capi,
    cclient,
    create,
    csettings,
    on_every_primary,
)
from tests.test_waiting_room import LATER, ga, join
from tests.test_waiting_room_order import patch, poll_all

KEPT = 5
LOST = 20


def places(event_id: str, tickets: list[str]) -> list[int]:
    """Each pre-queued ticket's random place k, read from the ticket itself."""
    out = []
    for token in tickets:
        t = queuetickets.read(PASS_SECRET.encode(), event_id, token)
        assert t is not None and t.kind == "p", token
        out.append(t.number)
    return out


async def test_pre_queue_joins_acknowledged_then_lost_in_a_failover_keep_their_places(
    cluster: LocalCluster,
    cclient: httpx.AsyncClient,  # noqa: F811
) -> None:
    """Pre-queue joins answered by a primary whose replica is cut off, then the primary
    killed: the replica takes over without them. Polled, the tickets are put back (the
    order holds all of them again, each customer once), a lost buyer joining again gets
    the same ticket, and at the opening every ticket's position is its place's rank among
    all the tickets, as if nothing had been lost; a join after it goes behind them."""
    victim = cluster.primaries()[-1]
    replica = cluster.replica_of(victim)
    event_id = on_every_primary(cluster, "wrprelost")[victim]
    await create(cclient, event_id, **ga(on_sale_at=LATER, waiting_room={"admit_per_minute": 1}))
    customers = [f"kept-{i}" for i in range(KEPT)]
    kept = [(await join(cclient, event_id, c)).json()["ticket"] for c in customers]
    await poll_all(cclient, event_id, kept)  # the room stepped on the victim: its run id
    assert cluster.call(victim, "WAIT", 1, 5000) == 1
    order = event_keys(event_id).queue[2]
    # The replica stops (and its link is cut): what the primary answers now, it alone has.
    replica.pause()
    try:
        cluster.call(victim, "CLIENT", "KILL", "TYPE", "replica")
        customers += [f"lost-{i}" for i in range(LOST)]
        lost = [(await join(cclient, event_id, c)).json()["ticket"] for c in customers[KEPT:]]
        tickets = kept + lost
        before = await poll_all(cclient, event_id, tickets)
        assert {(t["status"], t["position"]) for t in before} == {("waiting", None)}
        assert int(cluster.call(victim, "ZCARD", order)) == KEPT + LOST
        cluster.kill(victim)
    finally:
        replica.resume()
    try:

        async def taken_over() -> bool:
            return replica in await asyncio.to_thread(cluster.primaries)

        await eventually(taken_over, within=30)
        assert int(cluster.call(replica, "ZCARD", order)) == KEPT  # the lost joins are gone

        async def put_back() -> bool:  # by the API's reads once the room is suspect
            polled = await poll_all(cclient, event_id, tickets)
            assert {(t["status"], t["position"]) for t in polled} == {("waiting", None)}
            return int(cluster.call(replica, "ZCARD", order)) == KEPT + LOST

        await eventually(put_back, within=15)
        again = (await join(cclient, event_id, customers[KEPT + 7])).json()
        assert again["ticket"] == lost[7]  # the same customer, the same ticket
        assert int(cluster.call(replica, "ZCARD", order)) == KEPT + LOST

        await patch(cclient, event_id, {"on_sale_at": None})  # the opening ranks them
        after = await poll_all(cclient, event_id, tickets)
        ks = places(event_id, tickets)
        by_place = sorted(range(len(tickets)), key=ks.__getitem__)
        assert [after[i]["position"] for i in by_place] == list(range(1, KEPT + LOST + 1))
        late = (await join(cclient, event_id, "after-the-failover")).json()
        assert late["position"] == KEPT + LOST + 1, late
    finally:
        cluster.heal()
