"""A waiting room that Redis lost: joins acknowledged, then the primary killed and back
empty (no persistence). The event is loaded again from PostgreSQL with a new room, yet
every ticket keeps its place: each is signed with it, and the room puts it back there from
its ticket's first poll (service/selling/roomstate.py, lua/queue_state.lua). And a Redis
back from a snapshot that missed the last joins, as a replica promoted without them: the
same room, but served by another Redis process, which marks it suspect, and the polled
tickets are put back (tests/test_waiting_room_failover.py does it with a real failover)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import redis

from service.core.keys import event_keys
from service.selling import queuetickets
from service.selling.roomstate import REFRESH_SECONDS
from tests.conftest import PASS_SECRET, create_event, eventually
from tests.servers import RedisServer
from tests.test_resilience import own_client, own_redis  # noqa: F401 (fixtures)
from tests.test_waiting_room import LATER, ga, join
from tests.test_waiting_room_order import patch, poll_all

PRE_QUEUE = 30
ARRIVALS = 10


def seen(tickets: list[dict[str, Any]]) -> list[tuple[str, int | None, str]]:
    return [(t["ticket"], t["position"], t["status"]) for t in tickets]


async def test_a_primary_killed_after_joins_were_acknowledged_every_ticket_keeps_its_place(
    own_client: httpx.AsyncClient,  # noqa: F811
    own_redis: RedisServer,  # noqa: F811
) -> None:
    """A pre-queue shuffled at the opening and arrivals behind it, every join answered;
    Redis killed and started again empty. The tickets are not `404` (the new room is
    another generation, but it knows it was lost): each reads the same position and
    status once its first poll has put it back, nobody is in the order twice, a join
    after the loss goes behind them all, and a lost buyer who joins again keeps their
    place."""
    client = own_client
    room = {"admit_per_minute": 1}  # nobody admitted while the test runs
    event_id = await create_event(client, **ga(on_sale_at=LATER, waiting_room=room))
    customers = [f"pre-{i}" for i in range(PRE_QUEUE)]
    tickets = [(await join(client, event_id, c)).json()["ticket"] for c in customers]
    await patch(client, event_id, {"on_sale_at": None})
    for i in range(ARRIVALS):
        customers.append(f"late-{i}")
        tickets.append((await join(client, event_id, customers[-1])).json()["ticket"])
    before = await poll_all(client, event_id, tickets)
    assert sorted(t["position"] for t in before) == list(range(1, PRE_QUEUE + ARRIVALS + 1))

    own_redis.restart(kill=True)  # no persistence: the queue is gone with Redis
    await asyncio.sleep(2 * REFRESH_SECONDS)  # every poll now reads the room again first
    order = event_keys(event_id).queue[2]
    with redis.Redis(port=own_redis.port) as r6:

        async def put_back() -> bool:
            now = await poll_all(client, event_id, tickets)
            return seen(now) == seen(before) and int(r6.zcard(order)) == len(tickets)

        await eventually(put_back, within=5)
    late = (await join(client, event_id, "after-the-loss")).json()
    assert late["position"] == len(tickets) + 1, late
    for i in (7, PRE_QUEUE + 3):  # one of the pre-queue, one arrival
        again = (await join(client, event_id, customers[i])).json()
        assert again["position"] == before[i]["position"], (again, before[i])
    with redis.Redis(port=own_redis.port) as r6:
        assert r6.zcard(order) == len(tickets) + 1


async def test_a_pre_queue_lost_before_the_opening_opens_in_its_tickets_order(
    own_client: httpx.AsyncClient,  # noqa: F811
    own_redis: RedisServer,  # noqa: F811
) -> None:
    """Redis lost before the opening: the pre-queue's tickets, polled once, are back in
    the order at their own random places, so the opening ranks them as it would have."""
    client = own_client
    event_id = await create_event(
        client, **ga(on_sale_at=LATER, waiting_room={"admit_per_minute": 1})
    )
    tickets = [(await join(client, event_id, f"pre-{i}")).json()["ticket"] for i in range(30)]
    own_redis.restart(kill=True)
    await asyncio.sleep(2 * REFRESH_SECONDS)
    order = event_keys(event_id).queue[2]
    with redis.Redis(port=own_redis.port) as r6:

        async def put_back() -> bool:
            polled = await poll_all(client, event_id, tickets)
            assert {(t["status"], t["position"]) for t in polled} == {("waiting", None)}
            return int(r6.zcard(order)) == len(tickets)

        await eventually(put_back, within=5)
    await opened_ranks_by_place(client, event_id, tickets)


async def test_a_restart_that_missed_the_last_pre_queue_joins_puts_them_back(
    own_client: httpx.AsyncClient,  # noqa: F811
    own_redis: RedisServer,  # noqa: F811
) -> None:
    """Redis back from a snapshot taken before the last joins (as a replica promoted
    without them): the same room, the same generation, nothing in it shows the joins
    missing, but it is served by another Redis process (lua/lib.lua, check_server), so
    for a while the tickets polled are offered back and put back at their places: each
    reads the same, a lost buyer joining again gets the same ticket, and the opening
    ranks every ticket by its place."""
    client = own_client
    event_id = await create_event(
        client, **ga(on_sale_at=LATER, waiting_room={"admit_per_minute": 1})
    )
    kept = [(await join(client, event_id, f"kept-{i}")).json()["ticket"] for i in range(5)]
    await poll_all(client, event_id, kept)  # stepped: the room has this process's run id
    order = event_keys(event_id).queue[2]
    with redis.Redis(port=own_redis.port) as r6:
        assert r6.save()  # dump.rdb: what the restart will come back with
    lost = [(await join(client, event_id, f"lost-{i}")).json()["ticket"] for i in range(20)]
    tickets = kept + lost
    before = await poll_all(client, event_id, tickets)
    own_redis.restart(kill=True)  # no AOF: the snapshot is loaded, the last joins lost
    with redis.Redis(port=own_redis.port) as r6:
        assert r6.zcard(order) == len(kept)

        async def put_back() -> bool:
            now = await poll_all(client, event_id, tickets)
            assert seen(now) == seen(before)
            return int(r6.zcard(order)) == len(tickets)

        await eventually(put_back, within=10)
        again = (await join(client, event_id, "lost-7")).json()
        assert again["ticket"] == lost[7]
        assert r6.zcard(order) == len(tickets)
    await opened_ranks_by_place(client, event_id, tickets)


async def opened_ranks_by_place(
    client: httpx.AsyncClient, event_id: str, tickets: list[str]
) -> None:
    """The room opened: every pre-queue ticket ranks by the place its ticket carries."""
    await patch(client, event_id, {"on_sale_at": None})
    numbers = []
    for token in tickets:
        t = queuetickets.read(PASS_SECRET.encode(), event_id, token)
        assert t is not None and t.kind == "p"
        numbers.append(t.number)
    by_place = sorted(range(len(tickets)), key=numbers.__getitem__)
    after = await poll_all(client, event_id, tickets)
    assert [after[i]["position"] for i in by_place] == list(range(1, len(tickets) + 1))
