"""Expiry with no background process at all: the scripts reclaim overdue holds themselves."""

from __future__ import annotations

import asyncio

import httpx

from service.hotpath.context import Services
from tests.conftest import availability, create_event, expire_hold


async def _hold(client: httpx.AsyncClient, event_id: str, body: dict[str, object]) -> str:
    r = await client.post(f"/events/{event_id}/holds", json={"customer_id": "c1", **body})
    assert r.status_code == 201, r.text
    hold_id: str = r.json()["hold_id"]
    return hold_id


async def test_overdue_hold_is_not_counted_cannot_be_confirmed_and_shows_expired(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client)
    hold_id = await _hold(client, event_id, {"items": [{"category": "GA", "quantity": 4}]})
    assert await availability(client, event_id) == {"GA": 46, "VIP": 12}

    await expire_hold(svc, event_id, hold_id)

    assert (await client.get(f"/events/{event_id}/holds/{hold_id}")).json()["status"] == "expired"
    assert await availability(client, event_id) == {"GA": 50, "VIP": 12}
    r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm")
    assert r.status_code == 410
    assert r.json()["code"] == "hold_expired"
    # Releasing an expired hold is a no-op, and the stock comes back once only.
    assert (await client.delete(f"/events/{event_id}/holds/{hold_id}")).status_code == 204
    assert await availability(client, event_id) == {"GA": 50, "VIP": 12}


async def test_confirm_of_an_overdue_hold_that_nothing_reclaimed_is_refused(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client)
    hold_id = await _hold(client, event_id, {"seats": ["A-1", "A-2"]})
    await expire_hold(svc, event_id, hold_id)
    # The confirm is the first call to see the event since the deadline.
    r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm")
    assert r.status_code == 410
    seats = (await client.get(f"/events/{event_id}/seats", params={"status": "available"})).json()
    assert {"A-1", "A-2"} <= {s["label"] for s in seats["seats"]}
    assert (await client.get(f"/events/{event_id}/holds/{hold_id}")).json()["status"] == "expired"


async def test_expired_seats_can_be_held_by_someone_else(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client)
    first = await _hold(client, event_id, {"seats": ["B-3"]})
    r = await client.post(f"/events/{event_id}/holds", json={"customer_id": "c2", "seats": ["B-3"]})
    assert r.status_code == 409
    assert r.json()["code"] == "seats_unavailable"
    await expire_hold(svc, event_id, first)
    r = await client.post(f"/events/{event_id}/holds", json={"customer_id": "c2", "seats": ["B-3"]})
    assert r.status_code == 201, r.text
    assert r.json()["seats"] == ["B-3"]


async def test_more_overdue_holds_than_one_reclaim_batch_never_block_a_sale(
    client: httpx.AsyncClient, svc: Services
) -> None:
    # Three times the per-call reclaim batch: the hold script asks to be called again.
    n = svc.settings.reclaim_batch * 3
    event_id = await create_event(
        client,
        categories=[{"name": "GA", "price": 100, "currency": "EUR", "capacity": n}],
        max_per_order=1,
    )
    body: dict[str, object] = {"items": [{"category": "GA", "quantity": 1}]}
    holds = await asyncio.gather(*(_hold(client, event_id, body) for _ in range(n)))
    r = await client.post(f"/events/{event_id}/holds", json={"customer_id": "late", **body})
    assert r.json()["code"] == "sold_out"
    for hold_id in holds:
        await expire_hold(svc, event_id, hold_id)
    r = await client.post(f"/events/{event_id}/holds", json={"customer_id": "late", **body})
    assert r.status_code == 201, r.text
    assert await availability(client, event_id) == {"GA": n - 1}


async def test_a_hold_expires_in_real_time(client: httpx.AsyncClient) -> None:
    """The honest version, without moving deadlines: the shortest TTL the contract allows."""
    event_id = await create_event(client, hold_ttl_seconds=10)
    hold_id = await _hold(client, event_id, {"items": [{"category": "GA", "quantity": 2}]})
    hold = (await client.get(f"/events/{event_id}/holds/{hold_id}")).json()
    assert hold["status"] == "held"
    await asyncio.sleep(10.3)
    assert (await client.get(f"/events/{event_id}/holds/{hold_id}")).json()["status"] == "expired"
    assert await availability(client, event_id) == {"GA": 50, "VIP": 12}
    r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm")
    assert r.status_code == 410
