"""No one's refusals can use up an event's Idempotency-Key budget, and what refusals make
Redis remember stays bounded (docs/operations.md, "Redis memory")."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from service.core import errors, schemas
from service.core.keys import event_keys
from service.core.settings import Settings
from service.hotpath.context import Services
from service.hotpath.scripts import Idempotency
from service.selling import catalog, sales
from tests.apiserver import ApiServer
from tests.conftest import ADMIN, event_body, new_event_id, server_env, services_with

CHANGES, REFUSALS = 3, 4


@pytest.fixture
async def capped(settings: Settings) -> AsyncIterator[Services]:
    async with services_with(
        settings,
        idempotency_max_keys_per_event=CHANGES,
        idempotency_max_refusals_per_event=REFUSALS,
    ) as svc:
        yield svc


def _key(n: int, body: str = "") -> Idempotency:
    return Idempotency(f"{n:064x}", f"fingerprint-{n}{body}")


def _ga(customer: str, quantity: int = 1) -> schemas.HoldCreate:
    return schemas.HoldCreate(customer_id=customer, items=[schemas.HoldItem("GA", quantity)])


async def _remembered(svc: Services, event_id: str) -> int:
    keys = event_keys(event_id)
    return len([k async for k in svc.redis.scan_iter(match=f"{keys.tag}:idem:*", count=1000)])


async def _one_ticket_event(svc: Services) -> str:
    event_id = new_event_id("budget")
    body = event_body(event_id)
    body["categories"][0]["capacity"] = 1
    await catalog.create_event(svc, msgspec.convert(body, schemas.EventCreate))
    return event_id


async def test_anonymous_404s_cannot_use_up_the_events_idempotency_budget(
    settings: Settings,
) -> None:
    """The reviewer's attack: releases (and confirms) of holds that do not exist, each with
    a new key, used to fill the event's budget, and then
    every buyer's keyed hold was 429 for a day."""
    cap = 5
    env = {**server_env(settings), "BOXOFFICE_IDEMPOTENCY_MAX_KEYS_PER_EVENT": str(cap)}
    server = ApiServer(env, workers=1)
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            r = await client.post("/admin/events", json=event_body(), headers=ADMIN)
            assert r.status_code == 201, r.text
            event_id = r.json()["id"]
            for i in range(cap + 1):
                r = await client.delete(
                    f"/events/{event_id}/holds/no-such-hold-{i}",
                    headers={"Idempotency-Key": f"attacker-{i}"},
                )
                assert r.status_code == 404
                r = await client.post(
                    f"/events/{event_id}/holds/no-such-hold-{i}/confirm",
                    headers={"Idempotency-Key": f"attacker-c{i}"},
                )
                assert r.status_code == 404
            r = await client.post(
                f"/events/{event_id}/holds",
                json={"customer_id": "buyer", "items": [{"category": "GA", "quantity": 1}]},
                headers={"Idempotency-Key": "order-1"},
            )
            assert r.status_code == 201, r.text
    finally:
        server.stop()


async def test_404s_for_holds_and_bookings_that_do_not_exist_are_not_remembered(
    capped: Services,
) -> None:
    event_id = await _one_ticket_event(capped)
    for n in range(10):
        with pytest.raises(errors.HoldNotFound):
            await sales.release_hold(capped, event_id, f"nope-{n}", _key(n))
        with pytest.raises(errors.HoldNotFound):
            await sales.confirm_hold(
                capped, event_id, f"nope-{n}", schemas.HoldConfirm(), _key(100 + n)
            )
    assert await _remembered(capped, event_id) == 0
    keys = event_keys(event_id)
    assert await capped.redis.get(keys.idempotency_count) is None
    assert await capped.redis.get(keys.idempotency_refusals) is None


async def test_a_flood_of_keyed_refusals_is_bounded_and_locks_no_one_out(
    capped: Services,
) -> None:
    """A drop's own sold_out retries, each with a new key: answered (never 429), at most
    REFUSALS of them remembered, and state-changing keyed requests still go through."""
    event_id = await _one_ticket_event(capped)
    first, _ = await sales.create_hold_counted(capped, event_id, _ga("winner"), _key(0))
    for n in range(1, 40):
        with pytest.raises(errors.SoldOut):
            await sales.create_hold_counted(capped, event_id, _ga(f"c{n}"), _key(n))
    keys = event_keys(event_id)
    assert await _remembered(capped, event_id) == 1 + REFUSALS
    assert await capped.redis.get(keys.idempotency_count) == b"1"
    assert await capped.redis.get(keys.idempotency_refusals) == str(REFUSALS).encode()
    # A remembered refusal replays; the winner's hold replays.
    with pytest.raises(errors.SoldOut):
        await sales.create_hold_counted(capped, event_id, _ga("c1"), _key(1))
    assert (await sales.create_hold_counted(capped, event_id, _ga("winner"), _key(0)))[0] == first
    # State-changing keyed requests are not locked out by the flood.
    await sales.release_hold(capped, event_id, first.hold_id, _key(1000))
    # The release of an ended hold changes nothing: answered, not counted as a change.
    await sales.release_hold(capped, event_id, first.hold_id, _key(1001))
    assert await capped.redis.get(keys.idempotency_count) == b"2"
    # A refusal that was remembered still replays, though stock is back...
    with pytest.raises(errors.SoldOut):
        await sales.create_hold_counted(capped, event_id, _ga("c2"), _key(2))
    # ...while one past the allowance was not remembered: it runs again (docs/operations.md).
    second, _ = await sales.create_hold_counted(capped, event_id, _ga("c39"), _key(39))
    assert second.customer_id == "c39"
    assert await capped.redis.get(keys.idempotency_count) == b"3"
    assert await _remembered(capped, event_id) <= 2 * (CHANGES + REFUSALS)


async def test_refusals_past_the_change_budget_are_answered_not_429(capped: Services) -> None:
    event_id = await _one_ticket_event(capped)
    first, _ = await sales.create_hold_counted(capped, event_id, _ga("a"), _key(0))
    await sales.release_hold(capped, event_id, first.hold_id, _key(1))
    held, _ = await sales.create_hold_counted(capped, event_id, _ga("b"), _key(2))
    # The budget of changes is used up: a new change is refused...
    with pytest.raises(errors.RateLimited):
        await sales.release_hold(capped, event_id, held.hold_id, _key(3))
    # ...but a refusal with a new key is still the refusal, whatever the budget.
    for n in range(4, 20):
        with pytest.raises(errors.SoldOut):
            await sales.create_hold_counted(capped, event_id, _ga(f"c{n}"), _key(n))
