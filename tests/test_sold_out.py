"""The sold-out shortcut (service/hotpath/soldout.py) across two real API processes, on a Redis of
this module's own: the script calls that `INFO commandstats` counts are only theirs."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from service.core import schemas
from service.core.errors import SoldOut
from service.core.keys import event_keys, restock_channel
from service.core.settings import Settings
from service.hotpath import soldout
from service.hotpath.context import RedisClient, Services
from service.hotpath.scripts import LUA_DIR, script_text
from service.selling import sales
from tests.apiserver import ApiServer, Worker
from tests.conftest import (
    ADMIN,
    create_event,
    eventually,
    expire_hold,
    on_redis,
    server_env,
    worker_env,
)
from tests.servers import RedisServer
from tests.test_cli import boxoffice

# Every answer of the lean lane's routes agrees with the OpenAPI document.
pytestmark = pytest.mark.openapi_checked

# The contract: every API process hears of returned stock within 250 ms.
WITHIN = 0.25
GA = "GA"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def psettings(redis_server: RedisServer, settings: Settings) -> Settings:
    return on_redis(settings, redis_server.url)


@pytest.fixture(scope="module")
def servers(psettings: Settings) -> Iterator[list[ApiServer]]:
    """Two API servers of one process each: a request to one reaches that process."""
    started = [ApiServer(server_env(psettings), workers=1) for _ in range(2)]
    try:
        for server in started:
            server.start()
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture
async def psvc(psettings: Settings) -> AsyncIterator[Services]:
    svc = Services.open(psettings)
    yield svc
    await svc.close()


@pytest.fixture
async def clients(servers: list[ApiServer]) -> AsyncIterator[list[httpx.AsyncClient]]:
    made = [httpx.AsyncClient(base_url=s.url, timeout=30) for s in servers]
    yield made
    for c in made:
        await c.aclose()


def ga(quantity: int = 1, customer: str = "c") -> dict[str, Any]:
    return {"customer_id": customer, "items": [{"category": GA, "quantity": quantity}]}


def ga_only(capacity: int) -> list[dict[str, Any]]:
    return [{"name": GA, "price": 2500, "currency": "EUR", "capacity": capacity}]


async def script_calls(redis: RedisClient) -> int:
    stats = await redis.info("commandstats")
    return sum(
        int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval")
    )


# The hold script's, and its batch's (holds of one turn joined: service/hotpath/joined.py).
HOLD_SHAS = tuple(
    hashlib.sha1(script_text((LUA_DIR / "lib.lua").read_text(), name).encode()).hexdigest()
    for name in ("hold", "hold_batch")
)


async def hold_calls(redis: RedisClient, event_id: str, work: Awaitable[None]) -> int:
    """The hold script's calls on the event while `work` runs, as Redis's MONITOR sees them:
    other scripts (a worker's, on this event or others) are not refusals."""
    wanted = tuple(f"EVALSHA {sha} " for sha in HOLD_SHAS)
    tag = event_keys(event_id).tag
    marker = f"end-{secrets.token_hex(8)}"
    calls = 0
    assert isinstance(redis, Redis)  # a server of the test's own
    async with redis.monitor() as m:
        await work
        await redis.echo(marker)  # MONITOR gives the commands in order: this one comes last
        while marker not in (command := (await m.next_command())["command"]):
            calls += command.startswith(wanted) and tag in command
    return calls


async def refusals_local(
    redis: RedisClient, clients: list[httpx.AsyncClient], event_id: str
) -> bool:
    """A refusal from each process, and no hold script run for it: every process has
    learnt that the event is sold out (on a loaded machine, later than learn()'s few
    refusals)."""

    async def ask() -> None:
        for c in clients:
            r = await c.post(f"/events/{event_id}/holds", json=ga(1, "late"))
            assert refused(r), r.text

    return await hold_calls(redis, event_id, ask()) == 0


def refused(r: httpx.Response) -> bool:
    return r.status_code == 409 and r.json()["code"] == "sold_out"


async def learn(
    clients: list[httpx.AsyncClient], event_id: str, body: dict[str, Any] | None = None
) -> None:
    """A process subscribes at its first refusal for the event, and sets the flag from a
    refusal asked once subscribed: a few refusals each, a moment apart."""
    for c in clients:
        for _ in range(5):
            r = await c.post(f"/events/{event_id}/holds", json=body or ga(1, "late"))
            assert refused(r), r.text
            await asyncio.sleep(0.02)


async def sold_out_event(clients: list[httpx.AsyncClient]) -> tuple[str, list[str]]:
    """A GA-only event of 3 tickets sold out, in a hold of 2 then one of 1, and every
    process knowing it. Giving the first hold's 2 back lets each process sell one."""
    event_id = await create_event(clients[0], categories=ga_only(3))
    holds = []
    for i, quantity in enumerate((2, 1)):
        r = await clients[i].post(f"/events/{event_id}/holds", json=ga(quantity, f"buyer{i}"))
        assert r.status_code == 201, r.text
        holds.append(r.json()["hold_id"])
    await learn(clients, event_id)
    return event_id, holds


async def assert_refusals_stay_local(
    redis: RedisClient, clients: list[httpx.AsyncClient], event_id: str, count: int = 50
) -> None:

    async def ask() -> None:
        for c in clients:
            answers = await asyncio.gather(
                *(c.post(f"/events/{event_id}/holds", json=ga(1, f"bot{i}")) for i in range(count))
            )
            assert all(refused(r) for r in answers)

    assert await hold_calls(redis, event_id, ask()) == 0


async def sellable_everywhere(
    clients: list[httpx.AsyncClient], event_id: str, since: float
) -> list[float]:
    """Asks every process at once, each without a pause until it sells one ticket: how
    long each took after `since` (when the tickets were surely back)."""

    async def one(c: httpx.AsyncClient) -> float:
        while True:
            r = await c.post(f"/events/{event_id}/holds", json=ga(1, "back"))
            if r.status_code == 201:
                return time.monotonic() - since
            assert refused(r), r.text
            assert time.monotonic() - since < 5, "the stock stayed hidden"

    return list(await asyncio.gather(*(one(c) for c in clients)))


async def test_refusals_after_sell_out_do_not_reach_redis(
    clients: list[httpx.AsyncClient], psvc: Services
) -> None:
    event_id, _ = await sold_out_event(clients)
    await assert_refusals_stay_local(psvc.redis, clients, event_id)
    # What the shortcut cannot answer as the script would still reaches the script:
    # another category, more tickets than any refused request, an Idempotency-Key (a
    # replay owes the first answer), named seats.
    cases: list[tuple[dict[str, Any], dict[str, str], str]] = [
        ({"customer_id": "c", "items": [{"category": "X", "quantity": 1}]}, {}, "unknown_category"),
        (ga(2), {}, "sold_out"),
        (ga(1), {"idempotency-key": "k1"}, "sold_out"),
        ({"customer_id": "c", "seats": ["Z-1"]}, {}, "unknown_seat"),
    ]
    for body, headers, code in cases:
        before = await script_calls(psvc.redis)
        r = await clients[0].post(f"/events/{event_id}/holds", json=body, headers=headers)
        assert r.json()["code"] == code, r.text
        assert await script_calls(psvc.redis) == before + 1


async def test_the_shortcut_answers_what_the_script_answers(
    clients: list[httpx.AsyncClient], psvc: Services
) -> None:
    categories = [*ga_only(2), {"name": "B", "price": 100, "currency": "EUR", "capacity": 1}]
    event_id = await create_event(clients[0], categories=categories, max_per_customer=3)
    both = [{"category": GA, "quantity": 2}, {"category": "B", "quantity": 1}]
    r = await clients[0].post(
        f"/events/{event_id}/holds", json={"customer_id": "full", "items": both}
    )
    assert r.status_code == 201, r.text
    # `full` is at its limit and both categories are gone: the script says sold_out, not
    # customer_limit (sold_out comes first, as the shortcut cannot know the customer).
    ask = {
        "customer_id": "full",
        "items": [{"category": "B", "quantity": 1}, {"category": GA, "quantity": 1}],
    }
    url = f"/events/{event_id}/holds"
    by_script = await clients[0].post(url, json=ask)
    assert by_script.status_code == 409, by_script.text
    assert by_script.json()["available"] == {GA: 0, "B": 0}
    await learn(clients[:1], event_id, ask)
    before = await script_calls(psvc.redis)
    for _ in range(3):
        r = await clients[0].post(url, json=ask)
        assert r.status_code == 409
        assert r.json() == by_script.json()
        assert r.headers["content-type"] == by_script.headers["content-type"]
    assert await script_calls(psvc.redis) == before  # answered by the process itself


async def test_title_says_whether_some_tickets_are_left(
    clients: list[httpx.AsyncClient], psvc: Services
) -> None:
    """A 409 sold_out for more than is left says "Not enough tickets left"; once none is
    left it says "Sold out", whether the script or the process's shortcut answers."""
    event_id = await create_event(clients[0], categories=ga_only(3))
    url = f"/events/{event_id}/holds"
    assert (await clients[0].post(url, json=ga(2, "first"))).status_code == 201
    short = await clients[0].post(url, json=ga(2, "second"))
    assert short.status_code == 409, short.text
    assert short.json()["code"] == "sold_out"
    assert short.json()["title"] == "Not enough tickets left"
    assert short.json()["available"] == {GA: 1}
    assert short.json()["detail"] == "fewer tickets left than asked for: GA 1"
    assert (await clients[0].post(url, json=ga(1, "second"))).status_code == 201
    gone = await clients[0].post(url, json=ga(1, "third"))
    assert gone.status_code == 409, gone.text
    assert gone.json()["title"] == "Sold out"
    assert gone.json()["available"] == {GA: 0}
    assert gone.json()["detail"] == "no tickets left in GA"
    await learn(clients[:1], event_id)
    before = await script_calls(psvc.redis)
    local = await clients[0].post(url, json=ga(1, "third"))
    assert await script_calls(psvc.redis) == before  # the shortcut answered
    assert local.json() == gone.json()


async def release(c: httpx.AsyncClient, event_id: str, target: str) -> None:
    r = await c.delete(f"/events/{event_id}/holds/{target}")
    assert r.status_code == 204, r.text


async def cancel(c: httpx.AsyncClient, event_id: str, target: str) -> None:
    r = await c.delete(f"/admin/events/{event_id}/bookings/{target}", headers=ADMIN)
    assert r.status_code in (200, 204), r.text


async def raise_capacity(c: httpx.AsyncClient, event_id: str, target: str) -> None:
    r = await c.patch(
        f"/admin/events/{event_id}",
        json={"categories": [{"name": GA, "capacity": 5}]},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text


Way = Callable[[httpx.AsyncClient, str, str], Awaitable[None]]


@pytest.mark.parametrize("way", [release, cancel, raise_capacity], ids=lambda w: w.__name__)
async def test_stock_back_is_sellable_through_every_process_within_250ms(
    clients: list[httpx.AsyncClient], psvc: Services, way: Way
) -> None:
    event_id, holds = await sold_out_event(clients)
    target = holds[0]
    if way is cancel:  # a booking to cancel (a confirmation leaves the stock as it is)
        r = await clients[1].post(f"/events/{event_id}/holds/{target}/confirm", json={})
        assert r.status_code == 200, r.text
        target = r.json()["booking_id"]
    await assert_refusals_stay_local(psvc.redis, clients, event_id)
    await way(clients[0], event_id, target)
    took = await sellable_everywhere(clients, event_id, time.monotonic())
    assert max(took) < WITHIN, took


@pytest.fixture
def worker(psettings: Settings) -> Iterator[Worker]:
    # The sweeper's interval is long: whatever expires the hold is the listener.
    w = Worker(worker_env(psettings, BOXOFFICE_SWEEP_INTERVAL_SECONDS="600"))
    w.start()
    yield w
    w.stop()


async def test_an_expiry_without_traffic_is_heard_within_250ms(
    clients: list[httpx.AsyncClient], psvc: Services, worker: Worker
) -> None:
    async def listening() -> bool:
        return bool((await psvc.redis.pubsub_numsub("__keyevent@0__:expired"))[0][1])

    await eventually(listening)
    event_id, holds = await sold_out_event(clients)
    await eventually(lambda: refusals_local(psvc.redis, clients, event_id))
    await assert_refusals_stay_local(psvc.redis, clients, event_id)
    avail = event_keys(event_id).avail
    await expire_hold(psvc, event_id, holds[0])  # its TTL key goes: the listener hears it
    while int(await psvc.redis.hget(avail, GA) or 0) == 0:  # no API request meanwhile
        await asyncio.sleep(0.002)
    since = time.monotonic()
    took = await sellable_everywhere(clients, event_id, since)
    assert max(took) < WITHIN, took


async def test_a_dropped_subscription_forgets_every_flag(
    clients: list[httpx.AsyncClient], psvc: Services
) -> None:
    event_id, _ = await sold_out_event(clients)
    # A ticket back without a message (as if the message were lost): still hidden.
    k = event_keys(event_id)
    await psvc.redis.hincrby(k.cap, GA, 2)
    await psvc.redis.hincrby(k.avail, GA, 2)
    await assert_refusals_stay_local(psvc.redis, clients, event_id, count=10)
    assert await psvc.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 2
    took = await sellable_everywhere(clients, event_id, time.monotonic())
    assert max(took) < WITHIN, took


_FORGET_RELEASE = """
local h = cjson.decode(redis.call('HGET', KEYS[1], ARGV[1]))
h.s = 'released'
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(h))
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


async def test_a_repair_that_puts_tickets_back_is_heard(
    clients: list[httpx.AsyncClient], psvc: Services, psettings: Settings
) -> None:
    event_id, holds = await sold_out_event(clients)
    # Drift: the 2-ticket hold's record says released, its tickets were never given back.
    k = event_keys(event_id)
    await psvc.redis.eval(_FORGET_RELEASE, 2, k.holds, k.deadlines, holds[0])
    await assert_refusals_stay_local(psvc.redis, clients, event_id, count=10)
    repair = await asyncio.to_thread(
        boxoffice, "reconcile", "--event", event_id, "--repair", env=server_env(psettings)
    )
    assert repair.returncode in (0, 1), repair.stderr
    took = await sellable_everywhere(clients, event_id, time.monotonic())
    assert max(took) < WITHIN, took


async def test_an_event_loaded_again_is_heard(
    clients: list[httpx.AsyncClient], psvc: Services
) -> None:
    event_id, _ = await sold_out_event(clients)
    # Redis loses the event (its holds with it); the next read loads it from PostgreSQL.
    k = event_keys(event_id)
    await psvc.redis.delete(*k.all)
    r = await clients[0].get(f"/events/{event_id}")
    assert r.status_code == 200, r.text
    took = await sellable_everywhere(clients, event_id, time.monotonic())
    assert max(took) < WITHIN, took


async def test_a_status_change_is_heard_too(
    clients: list[httpx.AsyncClient], psvc: Services
) -> None:
    event_id, _ = await sold_out_event(clients)
    r = await clients[0].patch(
        f"/admin/events/{event_id}", json={"status": "paused"}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    for c in clients:

        async def paused(c: httpx.AsyncClient = c) -> bool:
            r = await c.post(f"/events/{event_id}/holds", json=ga())
            return bool(r.json()["code"] == "not_on_sale")

        await eventually(paused, within=1)


# --- in one process: the table itself ---------------------------------------------------


@pytest.fixture
async def started(psettings: Settings, servers: list[ApiServer]) -> AsyncIterator[Services]:
    svc = Services.open(psettings)
    await svc.start()
    svc.sold_out.start(svc.scripts)
    yield svc
    await svc.close()


async def hold_in_process(svc: Services, event_id: str) -> None:
    body = schemas.HoldCreate(customer_id="c", items=[schemas.HoldItem(category=GA, quantity=1)])
    with pytest.raises(SoldOut):
        await sales.create_hold_counted(svc, event_id, body, None)


async def test_the_table_is_bounded(
    clients: list[httpx.AsyncClient], started: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(soldout, "MAX_EVENTS", 3)
    events = []
    for _ in range(5):
        event_id = await create_event(clients[0], categories=ga_only(1))
        r = await clients[0].post(f"/events/{event_id}/holds", json=ga())
        assert r.status_code == 201, r.text
        events.append(event_id)
        await hold_in_process(started, event_id)
        await eventually(lambda e=event_id: _subscribed(started, e), within=2)  # type: ignore[misc]
        await hold_in_process(started, event_id)
        assert started.sold_out.flagged(event_id) == {GA}
    assert len(started.sold_out) == 3
    assert [started.sold_out.flagged(e) for e in events] == [set(), set(), {GA}, {GA}, {GA}]

    async def unsubscribed() -> bool:
        counts = await started.redis.execute_command(
            "PUBSUB", "SHARDNUMSUB", *(restock_channel(e) for e in events)
        )
        return list(counts[1::2]) == [0, 0, 1, 1, 1]

    await eventually(unsubscribed, within=2)


async def _subscribed(svc: Services, event_id: str) -> bool:
    return svc.sold_out.subscribed(event_id)
