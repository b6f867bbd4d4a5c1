"""Write-behind: every confirmed booking reaches PostgreSQL exactly once, whatever crashes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from service.core.db import bookings
from service.core.keys import event_keys
from service.core.settings import Settings
from service.durable.bookingrows import write
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services
from tests.apiserver import Worker
from tests.conftest import ADMIN, availability, create_event, eventually, worker_env


@pytest.fixture
def worker(settings: Settings) -> Iterator[Worker]:
    w = Worker(worker_env(settings))
    yield w
    w.stop()


async def persisted_ids(svc: Services, event_id: str) -> list[str]:
    async with svc.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(bookings.c.booking_id).where(bookings.c.event_id == event_id)
        )
        return [str(r[0]) for r in rows]


async def sell(client: httpx.AsyncClient, event_id: str, n: int, **hold: Any) -> list[str]:
    """n confirmed bookings of one GA ticket each; returns their booking ids."""
    body = hold or {"items": [{"category": "GA", "quantity": 1}]}

    async def one(i: int) -> str:
        r = await client.post(f"/events/{event_id}/holds", json={"customer_id": f"c{i}", **body})
        assert r.status_code == 201, r.text
        r = await client.post(f"/events/{event_id}/holds/{r.json()['hold_id']}/confirm")
        assert r.status_code == 200, r.text
        booking_id: str = r.json()["booking_id"]
        return booking_id

    ids: list[str] = []
    for start in range(0, n, 100):  # bounded concurrency
        ids += await asyncio.gather(*(one(i) for i in range(start, min(n, start + 100))))
    return ids


async def outbox_metrics(client: httpx.AsyncClient, event_id: str) -> tuple[int, bool]:
    """The event's write-behind backlog in /metrics, and whether it reports a lag."""
    text = (await client.get("/metrics")).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("event") == event_id:
                values[sample.name] = sample.value
    return int(values["boxoffice_outbox_backlog"]), values["boxoffice_outbox_lag_seconds"] > 0


def big_event(capacity: int) -> dict[str, Any]:
    return {
        "categories": [{"name": "GA", "price": 1000, "currency": "EUR", "capacity": capacity}],
        "max_per_order": 1,
    }


async def test_confirms_wait_in_the_outbox_until_a_worker_writes_them_once(
    client: httpx.AsyncClient, svc: Services, worker: Worker
) -> None:
    event_id = await create_event(client, **big_event(300))
    ids = await sell(client, event_id, 300)
    await asyncio.sleep(0.5)
    assert await persisted_ids(svc, event_id) == []
    r = await client.get(f"/events/{event_id}/bookings/{ids[0]}")
    assert r.json()["persisted"] is False
    assert await outbox_metrics(client, event_id) == (300, True)

    worker.start()

    async def all_written() -> bool:
        return len(await persisted_ids(svc, event_id)) >= len(ids)

    await eventually(all_written)
    assert sorted(await persisted_ids(svc, event_id)) == sorted(ids)
    r = await client.get(f"/events/{event_id}/bookings/{ids[0]}")
    assert r.json()["persisted"] is True
    assert r.json()["status"] == "confirmed"
    assert await outbox_metrics(client, event_id) == (0, False)


async def test_cancel_after_confirm_reaches_postgresql_and_restores_stock_once(
    client: httpx.AsyncClient, svc: Services, worker: Worker
) -> None:
    event_id = await create_event(client)
    worker.start()
    r = await client.post(
        f"/events/{event_id}/holds",
        json={"customer_id": "c", "items": [{"category": "GA", "quantity": 3}], "seats": ["A-1"]},
    )
    r = await client.post(f"/events/{event_id}/holds/{r.json()['hold_id']}/confirm")
    booking_id = r.json()["booking_id"]
    assert await availability(client, event_id) == {"GA": 47, "VIP": 11}
    for _ in range(2):
        r = await client.delete(f"/admin/events/{event_id}/bookings/{booking_id}", headers=ADMIN)
        assert r.status_code == 204, r.text
    assert await availability(client, event_id) == {"GA": 50, "VIP": 12}

    async def cancelled() -> bool:
        async with svc.engine.connect() as conn:
            status = await conn.scalar(
                sa.select(bookings.c.status).where(bookings.c.booking_id == uuid.UUID(booking_id))
            )
        return status == "cancelled"

    await eventually(cancelled)
    r = await client.get(f"/events/{event_id}/bookings/{booking_id}")
    assert r.json()["status"] == "cancelled"
    assert r.json()["persisted"] is True
    page = await client.get(
        f"/admin/events/{event_id}/bookings", params={"status": "cancelled"}, headers=ADMIN
    )
    assert [b["booking_id"] for b in page.json()["bookings"]] == [booking_id]


async def test_worker_recovers_when_an_outbox_stream_vanishes(
    client: httpx.AsyncClient, svc: Services, worker: Worker
) -> None:
    """Redis flushed or restarted empty under a running worker: its consumer group is gone
    with the stream; the worker creates it again and delivers what comes next."""
    event_id = await create_event(client, **big_event(20))
    worker.start()
    first = await sell(client, event_id, 5)

    async def written(n: int) -> bool:
        return len(await persisted_ids(svc, event_id)) >= n

    await eventually(lambda: written(len(first)))
    await svc.redis.delete(event_keys(event_id).outbox)
    later = await sell(client, event_id, 5)
    await eventually(lambda: written(len(first) + len(later)))
    assert sorted(await persisted_ids(svc, event_id)) == sorted(first + later)
    assert worker.running


async def test_a_batch_is_one_transaction(client: httpx.AsyncClient, svc: Services) -> None:
    """A batch that fails half-way (its items refused after its bookings went in) leaves
    nothing behind: no booking without its items."""
    event_id = await create_event(client)
    await sell(client, event_id, 3)
    name = f"test_refuse_items_{uuid.uuid4().hex[:8]}"
    async with svc.engine.begin() as conn:
        await conn.execute(
            sa.text(
                f"ALTER TABLE booking_items ADD CONSTRAINT {name} CHECK (quantity < 0) NOT VALID"
            )
        )
    try:
        wb = WriteBehind(svc, f"test-{uuid.uuid4().hex[:6]}")
        await wb._join(event_id)
        reply: Any = await svc.redis.xreadgroup(
            "writers", wb.consumer, {event_keys(event_id).outbox: ">"}, count=10
        )
        entries = [(event_id, i, f) for _, messages in reply for i, f in messages]
        assert len(entries) == 3
        with pytest.raises(Exception, match=name):
            async with svc.engine.begin() as conn:
                await write(conn, entries)
        assert await persisted_ids(svc, event_id) == []
    finally:
        async with svc.engine.begin() as conn:
            await conn.execute(sa.text(f"ALTER TABLE booking_items DROP CONSTRAINT {name}"))
