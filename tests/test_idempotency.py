"""Idempotency-Key on every state-changing request: a repeat gets the first response and
changes nothing; another request under the same key is refused.

(The in-progress case, 409 `idempotency_in_progress`, is in test_errors.py.)
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN, availability, create_event, event_body, snapshot
from tests.test_errors import assert_no_event, assert_problem, ga, hold, unchanged

# Every answer of the lean lane's routes agrees with the OpenAPI document.
pytestmark = pytest.mark.openapi_checked


def key() -> str:
    return f"idem-{uuid.uuid4()}"


def with_key(k: str, **headers: str) -> dict[str, str]:
    return {"idempotency-key": k, **headers}


# --- holds --------------------------------------------------------------------------------


async def test_hold_replay_returns_the_first_hold_and_holds_nothing_more(
    client: httpx.AsyncClient,
) -> None:
    event_id = await create_event(client)
    k = key()
    body = {
        "customer_id": "c",
        "items": [{"category": "GA", "quantity": 3}, {"category": "VIP", "quantity": 1}],
        "seats": ["B-5"],
    }
    first = await client.post(f"/events/{event_id}/holds", json=body, headers=with_key(k))
    assert first.status_code == 201, first.text
    assert await availability(client, event_id) == {"GA": 47, "VIP": 10}

    async with unchanged(client, event_id):
        for _ in range(3):
            again = await client.post(f"/events/{event_id}/holds", json=body, headers=with_key(k))
            assert again.status_code == 201, again.text
            assert again.content == first.content
    assert await availability(client, event_id) == {"GA": 47, "VIP": 10}

    # Even after the hold was confirmed, the repeat answers the first response and does
    # not hold again.
    hold_id = first.json()["hold_id"]
    r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm")
    assert r.status_code == 200, r.text
    async with unchanged(client, event_id):
        again = await client.post(f"/events/{event_id}/holds", json=body, headers=with_key(k))
        assert again.status_code == 201, again.text
        assert again.json() == first.json()


async def test_hold_same_key_other_body(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    k = key()
    r = await client.post(f"/events/{event_id}/holds", json=ga(1), headers=with_key(k))
    assert r.status_code == 201, r.text
    async with unchanged(client, event_id):
        for other in [ga(2), ga(1, "someone-else"), {"customer_id": "cust", "seats": ["A-1"]}]:
            r2 = await client.post(f"/events/{event_id}/holds", json=other, headers=with_key(k))
            assert_problem(r2, 422, "idempotency_key_reused")


async def test_hold_replayed_error_is_the_same_error(client: httpx.AsyncClient) -> None:
    """The first answer was sold_out; stock came back since, yet the repeat is the first
    answer again: it is a replay, not a new attempt."""
    event_id = await create_event(
        client, categories=[{"name": "GA", "price": 2500, "currency": "EUR", "capacity": 2}]
    )
    k = key()
    first = await client.post(f"/events/{event_id}/holds", json=ga(3), headers=with_key(k))
    assert assert_problem(first, 409, "sold_out")["available"] == {"GA": 2}
    r = await client.patch(
        f"/admin/events/{event_id}",
        json={"categories": [{"name": "GA", "capacity": 10}]},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    async with unchanged(client, event_id):
        again = await client.post(f"/events/{event_id}/holds", json=ga(3), headers=with_key(k))
        assert_problem(again, 409, "sold_out")
        assert again.json() == first.json()
    # Without the key, the same request now succeeds.
    await hold(client, event_id, items=[("GA", 3)])


async def test_hold_replayed_validation_error(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client, max_per_order=2)
    k = key()
    first = await client.post(f"/events/{event_id}/holds", json=ga(3), headers=with_key(k))
    assert_problem(first, 400, "validation_error")
    async with unchanged(client, event_id):
        again = await client.post(f"/events/{event_id}/holds", json=ga(3), headers=with_key(k))
        assert again.status_code == 400
        assert again.json() == first.json()


# --- confirm --------------------------------------------------------------------------------


async def test_confirm_replay(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 2)], seats=["A-1"])
    url = f"/events/{event_id}/holds/{h['hold_id']}/confirm"
    k = key()
    first = await client.post(url, json={"payment_ref": "pi_1"}, headers=with_key(k))
    assert first.status_code == 200, first.text
    async with unchanged(client, event_id):
        again = await client.post(url, json={"payment_ref": "pi_1"}, headers=with_key(k))
        assert again.status_code == 200, again.text
        assert again.content == first.content
        other = await client.post(url, json={"payment_ref": "pi_2"}, headers=with_key(k))
        assert_problem(other, 422, "idempotency_key_reused")
        other = await client.post(url, headers=with_key(k))
        assert_problem(other, 422, "idempotency_key_reused")
    assert await availability(client, event_id) == {"GA": 48, "VIP": 11}


async def test_confirm_replayed_error(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 1)])
    url = f"/events/{event_id}/holds/{h['hold_id']}"
    assert (await client.delete(url)).status_code == 204
    k = key()
    first = await client.post(f"{url}/confirm", headers=with_key(k))
    assert_problem(first, 409, "hold_released")
    async with unchanged(client, event_id):
        again = await client.post(f"{url}/confirm", headers=with_key(k))
        assert_problem(again, 409, "hold_released")
        assert again.json() == first.json()


async def test_confirm_twice_without_key_is_the_same_booking(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 2)], seats=["A-1", "A-2"])
    url = f"/events/{event_id}/holds/{h['hold_id']}/confirm"
    first = await client.post(url, json={"payment_ref": "pi_1"})
    assert first.status_code == 200, first.text
    async with unchanged(client, event_id):
        for body in [{"payment_ref": "pi_1"}, None, {"payment_ref": "pi_other"}]:
            again = await client.post(url, json=body)
            assert again.status_code == 200, again.text
            assert again.json() == first.json()
    booking_id = first.json()["booking_id"]
    r = await client.get(f"/events/{event_id}/bookings/{booking_id}")
    assert r.status_code == 200, r.text
    assert r.json()["booking_id"] == booking_id
    assert await availability(client, event_id) == {"GA": 48, "VIP": 10}


# --- release --------------------------------------------------------------------------------


async def test_release_replay(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 2)], seats=["A-1"])
    url = f"/events/{event_id}/holds/{h['hold_id']}"
    k = key()
    first = await client.delete(url, headers=with_key(k))
    assert first.status_code == 204, first.text
    assert await availability(client, event_id) == {"GA": 50, "VIP": 12}
    # Someone else takes the seat and tickets that came back: a replay gives nothing back.
    await hold(client, event_id, "next", items=[("GA", 2)], seats=["A-1"])
    async with unchanged(client, event_id):
        again = await client.delete(url, headers=with_key(k))
        assert again.status_code == 204, again.text
        assert again.content == first.content
    assert await availability(client, event_id) == {"GA": 48, "VIP": 11}


async def test_release_twice_without_key(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    await hold(client, event_id, "other", items=[("GA", 1)])
    before = await snapshot(client, event_id)
    h = await hold(client, event_id, items=[("GA", 3)], seats=["A-1", "BOX-1"])
    url = f"/events/{event_id}/holds/{h['hold_id']}"
    assert (await client.delete(url)).status_code == 204
    assert await snapshot(client, event_id) == before
    assert (await client.delete(url)).status_code == 204
    assert await snapshot(client, event_id) == before  # restored once, not twice
    assert await availability(client, event_id) == {"GA": 49, "VIP": 12}
    assert (await client.get(url)).json()["status"] == "released"


# --- admin ----------------------------------------------------------------------------------


async def test_create_event_replay(client: httpx.AsyncClient) -> None:
    body = event_body()
    event_id = body["id"]
    k = key()
    first = await client.post("/admin/events", json=body, headers=with_key(k, **ADMIN))
    assert first.status_code == 201, first.text
    await hold(client, event_id, items=[("GA", 2)])
    async with unchanged(client, event_id):
        again = await client.post("/admin/events", json=body, headers=with_key(k, **ADMIN))
        assert again.status_code == 201, again.text
        assert again.json() == first.json()  # the first response: 50 GA available then
        other = {**body, "name": "Another name"}
        r = await client.post("/admin/events", json=other, headers=with_key(k, **ADMIN))
        assert_problem(r, 422, "idempotency_key_reused")
    assert await availability(client, event_id) == {"GA": 48, "VIP": 12}


async def test_create_event_replayed_error(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    k = key()
    body = event_body(event_id, name="Second")
    async with unchanged(client, event_id):
        first = await client.post("/admin/events", json=body, headers=with_key(k, **ADMIN))
        assert_problem(first, 409, "event_exists")
        again = await client.post("/admin/events", json=body, headers=with_key(k, **ADMIN))
        assert_problem(again, 409, "event_exists")
        assert again.json() == first.json()

    k = key()
    body = event_body(
        categories=[
            {"name": "GA", "price": 1, "currency": "EUR", "capacity": 1},
            {"name": "US", "price": 1, "currency": "USD", "capacity": 1},
        ]
    )
    first = await client.post("/admin/events", json=body, headers=with_key(k, **ADMIN))
    assert_problem(first, 400, "validation_error")
    again = await client.post("/admin/events", json=body, headers=with_key(k, **ADMIN))
    assert_problem(again, 400, "validation_error")
    assert again.json() == first.json()
    await assert_no_event(client, body["id"])


async def test_patch_event_replay(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    url = f"/admin/events/{event_id}"
    k = key()
    change = {"name": "First name", "categories": [{"name": "GA", "capacity": 60}]}
    first = await client.patch(url, json=change, headers=with_key(k, **ADMIN))
    assert first.status_code == 200, first.text
    assert first.json()["name"] == "First name"
    r = await client.patch(url, json={"name": "Later name"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    await hold(client, event_id, items=[("GA", 5)])
    async with unchanged(client, event_id):
        again = await client.patch(url, json=change, headers=with_key(k, **ADMIN))
        assert again.status_code == 200, again.text
        assert again.json() == first.json()
        other = {"name": "First name", "categories": [{"name": "GA", "capacity": 70}]}
        r = await client.patch(url, json=other, headers=with_key(k, **ADMIN))
        assert_problem(r, 422, "idempotency_key_reused")
    event = (await client.get(f"/events/{event_id}")).json()
    assert event["name"] == "Later name"
    assert await availability(client, event_id) == {"GA": 55, "VIP": 12}


async def test_patch_event_replayed_error(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    await hold(client, event_id, items=[("GA", 5)])
    url = f"/admin/events/{event_id}"
    k = key()
    change = {"categories": [{"name": "GA", "capacity": 4}]}
    async with unchanged(client, event_id):
        first = await client.patch(url, json=change, headers=with_key(k, **ADMIN))
        assert_problem(first, 409, "capacity_below_committed")
        again = await client.patch(url, json=change, headers=with_key(k, **ADMIN))
        assert_problem(again, 409, "capacity_below_committed")
        assert again.json() == first.json()


# --- the same key on another path -------------------------------------------------------

Step = Callable[[httpx.AsyncClient, str, str, str], Awaitable[httpx.Response]]


async def _hold_on(c: httpx.AsyncClient, event_id: str, _: str, k: str) -> httpx.Response:
    return await c.post(f"/events/{event_id}/holds", json=ga(1), headers=with_key(k))


async def _release(c: httpx.AsyncClient, event_id: str, hold_id: str, k: str) -> httpx.Response:
    return await c.delete(f"/events/{event_id}/holds/{hold_id}", headers=with_key(k))


async def _confirm(c: httpx.AsyncClient, event_id: str, hold_id: str, k: str) -> httpx.Response:
    return await c.post(f"/events/{event_id}/holds/{hold_id}/confirm", headers=with_key(k))


async def _patch(c: httpx.AsyncClient, event_id: str, _: str, k: str) -> httpx.Response:
    return await c.patch(
        f"/admin/events/{event_id}", json={"name": "Renamed"}, headers=with_key(k, **ADMIN)
    )


async def _create(c: httpx.AsyncClient, _: str, __: str, k: str) -> httpx.Response:
    body: dict[str, Any] = event_body()
    return await c.post("/admin/events", json=body, headers=with_key(k, **ADMIN))


# (first request, on event 1; second request under the same key, on event 2 or 1; whether
# the second shares the first's key scope). Keys of holds, confirms and releases belong to
# their event (recorded by the event's own script, atomically with the work); keys of the
# admin event routes are global (docs/api-notes.md).
OTHER_PATH: dict[str, tuple[Step, Step, bool, bool]] = {
    "hold, then release of a hold (same event)": (_hold_on, _release, True, True),
    "release, then confirm (same event)": (_release, _confirm, True, True),
    "release of one hold, then of another (same event)": (_release, _release, True, True),
    "patch of one event, then of another": (_patch, _patch, False, True),
    "create, then patch": (_create, _patch, False, True),
    "hold on one event, then the same hold on another": (_hold_on, _hold_on, False, False),
    "release in one event, then in another": (_release, _release, False, False),
    "create, then hold": (_create, _hold_on, False, False),
    "hold, then patch": (_hold_on, _patch, False, False),
}


@pytest.mark.parametrize(
    ("first_step", "second_step", "same_event", "same_scope"),
    OTHER_PATH.values(),
    ids=OTHER_PATH.keys(),
)
async def test_same_key_on_another_path(
    client: httpx.AsyncClient,
    first_step: Step,
    second_step: Step,
    same_event: bool,
    same_scope: bool,
) -> None:
    """An Idempotency-Key names one request: within its scope, the same key on another
    path is another request under a used key, 422; in another scope it is a new key."""
    one = await create_event(client)
    two = one if same_event else await create_event(client)
    h1 = await hold(client, one, "one", items=[("GA", 1)])
    h2 = await hold(client, two, "two", items=[("GA", 1)])
    k = key()
    r = await first_step(client, one, h1["hold_id"], k)
    assert r.status_code < 300, r.text
    if not same_scope:
        r = await second_step(client, two, h2["hold_id"], k)
        assert r.status_code < 300, r.text
        return
    async with unchanged(client, two):
        r = await second_step(client, two, h2["hold_id"], k)
        assert_problem(r, 422, "idempotency_key_reused")


# --- invalid keys ---------------------------------------------------------------------------

INVALID_KEYS: dict[str, bytes] = {
    "empty": b"",
    "129 characters": b"k" * 129,
    "a tab": b"a\tb",
    "non-ASCII": "caf\xe9".encode("latin-1"),
}


@pytest.mark.parametrize("bad_key", INVALID_KEYS.values(), ids=INVALID_KEYS.keys())
async def test_invalid_key(client: httpx.AsyncClient, bad_key: bytes) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 1)], seats=["A-1"])
    hold_url = f"/events/{event_id}/holds/{h['hold_id']}"
    header = {b"idempotency-key": bad_key}
    admin = {**header, b"authorization": ADMIN["authorization"].encode()}
    body = event_body()
    async with unchanged(client, event_id):
        for r in [
            await client.post(f"/events/{event_id}/holds", json=ga(1), headers=header),
            await client.post(f"{hold_url}/confirm", headers=header),
            await client.delete(hold_url, headers=header),
            await client.post("/admin/events", json=body, headers=admin),
            await client.patch(f"/admin/events/{event_id}", json={"name": "X"}, headers=admin),
        ]:
            assert_problem(r, 400, "validation_error")
    await assert_no_event(client, body["id"])
    assert (await client.get(hold_url)).json()["status"] == "held"


async def test_longest_valid_key(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    k = "~ " + "k" * 125 + "!"  # 128 printable ASCII characters
    assert len(k) == 128
    first = await client.post(f"/events/{event_id}/holds", json=ga(1), headers=with_key(k))
    assert first.status_code == 201, first.text
    again = await client.post(f"/events/{event_id}/holds", json=ga(1), headers=with_key(k))
    assert again.content == first.content
    assert await availability(client, event_id) == {"GA": 49, "VIP": 12}
