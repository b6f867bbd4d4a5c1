"""Reconciliation: a consistent event is reported consistent, every kind of drift is
reported precisely and repaired, also while the event keeps selling."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest
import sqlalchemy as sa

from service.core.db import bookings
from service.core.keys import event_keys
from service.core.records import decode_booking
from service.core.settings import Settings
from service.durable import findings, reconcile, repair
from service.durable.outbox import outbox_state
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services
from service.selling.sales import uuid7
from tests.apiserver import BOXOFFICE, ApiServer, Worker
from tests.conftest import (
    ADMIN,
    availability,
    create_event,
    eventually,
    expire_hold,
    server_env,
    worker_env,
)
from tests.servers import RedisServer


def run_cli(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [BOXOFFICE, "reconcile", "--json", *args],
        env={**dict(__import__("os").environ), **env},
        capture_output=True,
        timeout=120,
        check=False,
    )
    report: dict[str, Any] = json.loads(done.stdout) if done.stdout else {}
    return done.returncode, report


def kinds(report: findings.Report | dict[str, Any]) -> set[str]:
    events = report.events if isinstance(report, findings.Report) else report["events"]
    return {
        kind
        for e in events
        for kind in (
            e.problem_counts if isinstance(e, findings.EventReport) else e["problem_counts"]
        )
    }


async def hold(client: httpx.AsyncClient, event_id: str, customer: str, **body: Any) -> str:
    r = await client.post(f"/events/{event_id}/holds", json={"customer_id": customer, **body})
    assert r.status_code == 201, r.text
    hold_id: str = r.json()["hold_id"]
    return hold_id


async def confirm(client: httpx.AsyncClient, event_id: str, hold_id: str) -> str:
    r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm")
    assert r.status_code == 200, r.text
    booking_id: str = r.json()["booking_id"]
    return booking_id


async def drained(svc: Services, event_id: str) -> bool:
    state = await outbox_state(svc, event_id)
    return state.backlog == 0


async def a_mix_of_everything(client: httpx.AsyncClient, svc: Services, event_id: str) -> None:
    """Holds, confirms, releases, expiries and a cancellation, on GA and on seats."""
    ga = [{"category": "GA", "quantity": 2}]
    for i in range(3):
        await confirm(client, event_id, await hold(client, event_id, f"buyer{i}", items=ga))
    seated = await confirm(
        client, event_id, await hold(client, event_id, "s", seats=["A-1", "A-2"])
    )
    await confirm(
        client,
        event_id,
        await hold(client, event_id, "b", items=[{"category": "VIP", "quantity": 2}]),
    )
    r = await client.delete(f"/admin/events/{event_id}/bookings/{seated}", headers=ADMIN)
    assert r.status_code == 204
    released = await hold(client, event_id, "r", items=ga, seats=["B-5"])
    assert (await client.delete(f"/events/{event_id}/holds/{released}")).status_code == 204
    expired = await hold(client, event_id, "e", items=ga, seats=["B-4"])
    await expire_hold(svc, event_id, expired)
    await hold(client, event_id, "live", items=ga, seats=["B-3"])


@pytest.fixture
def worker(settings: Settings) -> Iterator[Worker]:
    w = Worker(worker_env(settings))
    w.start()
    yield w
    w.stop()


async def test_a_consistent_event_exits_0(
    client: httpx.AsyncClient, svc: Services, settings: Settings, worker: Worker
) -> None:
    event_id = await create_event(client)
    await a_mix_of_everything(client, svc, event_id)
    await eventually(lambda: drained(svc, event_id))
    code, report = await asyncio.to_thread(run_cli, server_env(settings), "--event", event_id)
    assert code == 0, report
    assert report["consistent"] is True
    (event,) = report["events"]
    assert event["problem_counts"] == {}
    assert event["bookings_in_postgres"] == 5
    ga = next(c for c in event["categories"] if c["name"] == "GA")
    assert ga == {
        "name": "GA",
        "capacity": 50,
        "available": 50 - 6 - 2,
        "held": 2,
        "sold": 6,
        "expected": {"capacity": 50, "available": 42, "held": 2, "sold": 6},
        "consistent": True,
    }
    r = await client.get(f"/admin/events/{event_id}/reconcile", headers=ADMIN)
    assert r.status_code == 200
    assert r.json()["consistent"] is True
    assert r.json()["events"][0]["categories"] == event["categories"]


# --- drift of each kind ---------------------------------------------------------------


async def check(svc: Services, event_id: str) -> findings.Report:
    return await reconcile.reconcile(svc, event_id)


async def test_inflated_and_deflated_counters(client: httpx.AsyncClient, svc: Services) -> None:
    event_id = await create_event(client)
    await hold(client, event_id, "c", items=[{"category": "GA", "quantity": 3}])
    keys = event_keys(event_id)
    await svc.redis.hincrby(keys.avail, "GA", 5)  # inflated: 5 tickets that do not exist
    await svc.redis.hincrby(keys.held, "VIP", -1)  # deflated, and below zero
    report = await check(svc, event_id)
    assert not report.consistent
    assert kinds(report) == {"counter_mismatch", "negative_counter"}
    ga = next(c for c in report.events[0].categories if c.name == "GA")
    assert (ga.available, ga.expected["available"]) == (52, 47)

    repaired = await reconcile.reconcile(svc, event_id, repair=True)
    assert repaired.consistent, repaired
    assert any("GA: counters" in r for r in repaired.events[0].repairs)
    assert await availability(client, event_id) == {"GA": 47, "VIP": 12}
    assert (await check(svc, event_id)).consistent


async def test_seat_sold_without_a_booking(client: httpx.AsyncClient, svc: Services) -> None:
    event_id = await create_event(client)
    keys = event_keys(event_id)
    ghost = uuid7()
    await svc.redis.hset(keys.seatstate, "A-5", f"b:{ghost}")
    await svc.redis.zrem(keys.free, "A-5")
    await svc.redis.hincrby(keys.avail, "VIP", -1)
    await svc.redis.hincrby(keys.sold, "VIP", 1)
    report = await check(svc, event_id)
    assert "seat_without_record" in kinds(report)
    assert any("A-5" in p.detail for p in report.events[0].problems)

    assert (await reconcile.reconcile(svc, event_id, repair=True)).consistent
    seats = (await client.get(f"/events/{event_id}/seats", params={"status": "available"})).json()
    assert "A-5" in {s["label"] for s in seats["seats"]}
    assert await availability(client, event_id) == {"GA": 50, "VIP": 12}


async def test_leaked_hold(client: httpx.AsyncClient, svc: Services) -> None:
    event_id = await create_event(client)
    hold_id = await hold(
        client, event_id, "c", items=[{"category": "GA", "quantity": 4}], seats=["B-1"]
    )
    # Long past its deadline, and no listener, sweeper or request has seen it.
    await expire_hold(svc, event_id, hold_id, fire_ttl=False, ago_ms=60_000)
    report = await check(svc, event_id)
    assert kinds(report) == {"leaked_hold"}
    assert report.events[0].leaked_holds == 1
    assert hold_id in report.events[0].problems[0].detail

    repaired = await reconcile.reconcile(svc, event_id, repair=True)
    assert repaired.consistent
    assert "released 1 hold past their deadline" in repaired.events[0].repairs
    assert (await client.get(f"/events/{event_id}/holds/{hold_id}")).json()["status"] == "expired"
    assert await availability(client, event_id) == {"GA": 50, "VIP": 12}


async def test_stuck_outbox_entry_is_redriven(client: httpx.AsyncClient, svc: Services) -> None:
    """A confirmation waiting in the outbox for minutes (no worker took it) is stuck; the
    repair writes it to PostgreSQL itself."""
    event_id = await create_event(client)
    booking_id = await confirm(
        client,
        event_id,
        await hold(client, event_id, "c", items=[{"category": "GA", "quantity": 1}]),
    )
    keys = event_keys(event_id)
    entries: Any = await svc.redis.xrange(keys.outbox)
    _, fields = entries[0]
    # The same entry, as if appended three minutes ago (and no worker ever came).
    old = f"{int(time.time() * 1000) - 180_000}-0"
    await svc.redis.delete(keys.outbox)
    await svc.redis.xadd(keys.outbox, fields, id=old)
    report = await check(svc, event_id)
    assert kinds(report) == {"outbox_stuck"}
    assert report.events[0].outbox.waiting == 1

    repaired = await reconcile.reconcile(svc, event_id, repair=True)
    assert repaired.consistent, repaired
    async with svc.engine.connect() as conn:
        status = await conn.scalar(
            sa.select(bookings.c.status).where(bookings.c.event_id == event_id)
        )
    assert status == "confirmed"
    r = await client.get(f"/events/{event_id}/bookings/{booking_id}")
    assert r.json()["persisted"] is True


async def test_booking_in_postgres_that_redis_lost(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client)
    booking_id = await confirm(
        client,
        event_id,
        await hold(client, event_id, "c", seats=["A-1"], items=[{"category": "GA", "quantity": 2}]),
    )
    assert await WriteBehind(svc, "test").drain(event_id) == 1  # now in PostgreSQL
    keys = event_keys(event_id)
    # Redis forgets the booking and its effects.
    await svc.redis.hdel(keys.bookings, booking_id)
    await svc.redis.hdel(keys.seatstate, "A-1")
    await svc.redis.zadd(keys.free, {"A-1": 0})
    await svc.redis.hincrby(keys.sold, "GA", -2)
    await svc.redis.hincrby(keys.avail, "GA", 2)
    await svc.redis.hincrby(keys.sold, "VIP", -1)
    await svc.redis.hincrby(keys.avail, "VIP", 1)
    report = await check(svc, event_id)
    assert {"booking_unknown_to_redis", "seat_not_sold_in_redis", "counter_mismatch"} <= kinds(
        report
    )

    assert (await reconcile.reconcile(svc, event_id, repair=True)).consistent
    assert await availability(client, event_id) == {"GA": 48, "VIP": 11}
    seats = (await client.get(f"/events/{event_id}/seats", params={"status": "sold"})).json()
    assert [s["label"] for s in seats["seats"]] == ["A-1"]


async def test_customer_counts_and_a_hold_on_a_sold_seat(
    client: httpx.AsyncClient, svc: Services
) -> None:
    """The repair recounts each customer's tickets (their max-per-customer allowance) and
    releases a hold that wants a seat a booking has: the sale wins."""
    event_id = await create_event(client)
    keys = event_keys(event_id)
    sold = await confirm(client, event_id, await hold(client, event_id, "buyer", seats=["A-1"]))
    held = await hold(client, event_id, "holder", seats=["A-2"])
    await svc.redis.hincrby(keys.cust, "buyer", 3)  # inflated
    await svc.redis.hset(keys.cust, "nobody", 4)  # a customer with no tickets at all
    # Redis lost the sold seat's state, and a hold took it meanwhile (its record says so).
    raw: Any = await svc.redis.hget(keys.holds, held)
    record = json.loads(raw)
    record["st"] = ["A-1", "A-2"]
    await svc.redis.hset(keys.holds, held, json.dumps(record))
    await svc.redis.hset(keys.seatstate, "A-1", f"h:{held}")

    done = await repair.repair_event(svc, event_id)
    assert f"released hold {held}: their seats are sold" in done, done
    assert await svc.redis.hgetall(keys.cust) == {b"buyer": b"1"}
    assert await svc.redis.hget(keys.seatstate, "A-1") == f"b:{sold}".encode()
    assert await svc.redis.hget(keys.seatstate, "A-2") is None
    assert await svc.redis.zscore(keys.free, "A-2") is not None
    assert (await check(svc, event_id)).consistent


# --- Redis loses everything -----------------------------------------------------------------


@pytest.fixture
async def own(
    settings: Settings,
) -> AsyncIterator[tuple[httpx.AsyncClient, Services, dict[str, str]]]:
    """An API and a worker on a Redis of their own, which the test may flush."""
    with RedisServer() as redis_server:
        env = {**server_env(settings), "BOXOFFICE_REDIS_URL": redis_server.url}
        api = ApiServer(env, workers=2)
        api.start()
        worker = Worker(worker_env(settings, BOXOFFICE_REDIS_URL=redis_server.url))
        worker.start()
        svc = Services.open(msgspec.structs.replace(settings, redis_url=redis_server.url))
        try:
            async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
                yield client, svc, env
        finally:
            worker.stop()
            api.stop()
            await svc.close()


async def test_flushall_is_drift_and_repair_restores_what_was_sold(
    own: tuple[httpx.AsyncClient, Services, dict[str, str]],
) -> None:
    client, svc, env = own
    event_id = await create_event(
        client,
        categories=[
            {"name": "GA", "price": 100, "currency": "EUR", "capacity": 40},
            {
                "name": "VIP",
                "price": 900,
                "currency": "EUR",
                "seat_blocks": [{"rows": ["A"], "seats_per_row": 10}],
            },
        ],
    )
    for i in range(5):
        await confirm(
            client,
            event_id,
            await hold(
                client,
                event_id,
                f"c{i}",
                items=[{"category": "GA", "quantity": 3}],
                seats=[f"A-{i + 1}"],
            ),
        )
    await eventually(lambda: drained(svc, event_id))

    await svc.redis.flushall()
    code, report = await asyncio.to_thread(run_cli, env, "--event", event_id)
    assert code == 1
    assert "event_missing_in_redis" in kinds(report)
    code, report = await asyncio.to_thread(run_cli, env, "--event", event_id, "--repair")
    assert code == 0, report
    assert await availability(client, event_id) == {"GA": 40 - 15, "VIP": 10 - 5}
    sold = (await client.get(f"/events/{event_id}/seats", params={"status": "sold"})).json()
    assert [s["label"] for s in sold["seats"]] == ["A-1", "A-2", "A-3", "A-4", "A-5"]

    # A race for what is left sells exactly what is left.
    async def one(i: int) -> int:
        r = await client.post(
            f"/events/{event_id}/holds",
            json={"customer_id": f"race{i}", "items": [{"category": "GA", "quantity": 1}]},
        )
        return r.status_code

    codes = await asyncio.gather(*(one(i) for i in range(100)))
    assert codes.count(201) == 25
    assert codes.count(409) == 75
    code, _ = await asyncio.to_thread(run_cli, env, "--event", event_id)
    assert code == 0


async def test_repair_while_selling_oversells_nothing_and_loses_nothing(
    client: httpx.AsyncClient, svc: Services, worker: Worker
) -> None:
    capacity = 150
    event_id = await create_event(
        client,
        max_per_order=2,
        categories=[{"name": "GA", "price": 100, "currency": "EUR", "capacity": capacity}],
    )
    confirmed: list[str] = []
    refused = 0

    async def buyer(i: int) -> None:
        nonlocal refused
        r = await client.post(
            f"/events/{event_id}/holds",
            json={"customer_id": f"b{i}", "items": [{"category": "GA", "quantity": 1 + i % 2}]},
        )
        if r.status_code != 201:
            assert r.json()["code"] == "sold_out", r.text
            refused += 1
            return
        if i % 4 != 3:  # three in four buy; the rest walk away holding
            confirmed.append(await confirm(client, event_id, r.json()["hold_id"]))

    async def repairs() -> int:
        n = 0
        for _ in range(5):
            await reconcile.reconcile(svc, event_id, repair=True)
            n += 1
            await asyncio.sleep(0.05)
        return n

    sales = asyncio.gather(*(buyer(i) for i in range(200)))
    assert await repairs() == 5
    await sales

    await eventually(lambda: drained(svc, event_id))
    records = [decode_booking(raw) for raw in await svc.redis.hvals(event_keys(event_id).bookings)]
    sold = sum(r.quantity for r in records if r.status == "confirmed")
    assert sold <= capacity
    assert {r.id for r in records} == set(confirmed)
    async with svc.engine.connect() as conn:
        persisted = {
            str(b)
            for b in await conn.scalars(
                sa.select(bookings.c.booking_id).where(bookings.c.event_id == event_id)
            )
        }
    assert persisted == set(confirmed)
    final = await check(svc, event_id)
    assert final.consistent, final
    ga = final.events[0].categories[0]
    assert ga.sold == sold
    assert (ga.available or 0) + (ga.held or 0) + sold == capacity
