"""The waiting room: its settings, join / poll / leave, and the admission pass on holds."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.core import errors
from service.core.db import events
from service.core.keys import event_keys
from service.core.settings import SettingError, Settings
from service.durable.live import unload
from service.hotpath.context import Services
from service.selling import passes, waitingroom
from tests.conftest import ADMIN, PASS_SECRET, create_event, eventually

# Every answer of the lean lane's routes agrees with the OpenAPI document.
pytestmark = pytest.mark.openapi_checked

ROOM = {"admit_per_minute": 60_000, "pass_ttl_seconds": 600}
LATER = "2031-01-01T10:00:00Z"


def ga(capacity: int = 50, **overrides: Any) -> dict[str, Any]:
    return {
        "categories": [{"name": "GA", "price": 2500, "currency": "EUR", "capacity": capacity}],
        **overrides,
    }


async def join(client: httpx.AsyncClient, event_id: str, customer: str) -> httpx.Response:
    return await client.post(f"/events/{event_id}/queue", json={"customer_id": customer})


async def poll(client: httpx.AsyncClient, event_id: str, ticket: str) -> dict[str, Any]:
    r = await client.get(f"/events/{event_id}/queue/{ticket}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def admitted(client: httpx.AsyncClient, event_id: str, customer: str) -> dict[str, Any]:
    """Join, then poll until admitted; the admitted ticket."""
    r = await join(client, event_id, customer)
    assert r.status_code == 201, r.text
    ticket = r.json()["ticket"]
    seen: dict[str, Any] = {}

    async def done() -> bool:
        seen.update(await poll(client, event_id, ticket))
        return bool(seen["status"] == "admitted")

    await eventually(done, within=10)
    return seen


async def hold(
    client: httpx.AsyncClient, event_id: str, customer: str, token: str | None
) -> httpx.Response:
    headers = {} if token is None else {"boxoffice-pass": token}
    body = {"customer_id": customer, "items": [{"category": "GA", "quantity": 1}]}
    return await client.post(f"/events/{event_id}/holds", json=body, headers=headers)


# --- settings ----------------------------------------------------------------------


async def test_room_set_on_create_shown_patched_and_off(
    client: httpx.AsyncClient, svc: Services
) -> None:
    room = {"admit_per_minute": 600, "pass_ttl_seconds": 120, "opens_at": "2030-01-01T09:00:00Z"}
    event_id = await create_event(client, **ga(waiting_room=room))
    event = (await client.get(f"/events/{event_id}")).json()
    assert event["waiting_room"] == room
    async with svc.engine.connect() as conn:
        row = (await conn.execute(sa.select(events).where(events.c.id == event_id))).one()
    assert (row.waiting_room_admit_per_minute, row.waiting_room_pass_ttl_seconds) == (600, 120)

    # Redis loses the event: it comes back from PostgreSQL with its room.
    await unload(svc, event_id)
    assert (await client.get(f"/events/{event_id}")).json()["waiting_room"] == room

    r = await client.patch(
        f"/admin/events/{event_id}",
        json={"waiting_room": {"admit_per_minute": 30}},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    assert r.json()["waiting_room"] == {
        "admit_per_minute": 30,
        "pass_ttl_seconds": 600,
        "opens_at": None,
    }
    r = await client.patch(f"/admin/events/{event_id}", json={"waiting_room": None}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert "waiting_room" not in r.json()
    await unload(svc, event_id)
    assert "waiting_room" not in (await client.get(f"/events/{event_id}")).json()
    # Without a room, holds need no pass and joining is refused.
    assert (await hold(client, event_id, "c1", None)).status_code == 201
    r = await join(client, event_id, "c1")
    assert r.status_code == 409 and r.json()["code"] == "no_waiting_room", r.text


async def test_room_settings_validated(client: httpx.AsyncClient) -> None:
    for bad in (
        {"admit_per_minute": 0},
        {"admit_per_minute": "10"},
        {"admit_per_minute": 10, "pass_ttl_seconds": 5},
        {"admit_per_minute": 10, "surprise": 1},
        {"pass_ttl_seconds": 60},
    ):
        body = {"id": "wr-bad", "name": "x", "starts_at": LATER, **ga(waiting_room=bad)}
        r = await client.post("/admin/events", json=body, headers=ADMIN)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["code"] == "validation_error"
    assert (await client.get("/events/wr-bad")).status_code == 404


async def test_turning_the_room_off_forgets_its_queue(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client, **ga(waiting_room=ROOM))
    ticket = (await join(client, event_id, "c1")).json()["ticket"]
    await client.patch(f"/admin/events/{event_id}", json={"waiting_room": None}, headers=ADMIN)
    assert await svc.redis.exists(*event_keys(event_id).queue) == 0
    r = await client.get(f"/events/{event_id}/queue/{ticket}")
    assert r.status_code == 404 and r.json()["code"] == "ticket_not_found", r.text
    # On again: an empty queue, the old ticket unknown.
    await client.patch(f"/admin/events/{event_id}", json={"waiting_room": ROOM}, headers=ADMIN)
    assert (await client.get(f"/events/{event_id}/queue/{ticket}")).status_code == 404
    assert (await join(client, event_id, "c1")).json()["ticket"] != ticket


# --- join, poll, leave ----------------------------------------------------------------


async def test_join_poll_leave(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client, **ga(waiting_room={"admit_per_minute": 1}))
    first = await join(client, event_id, "alice")
    assert first.status_code == 201, first.text
    t = first.json()
    assert first.headers["location"] == f"/events/{event_id}/queue/{t['ticket']}"
    assert len(t["ticket"]) >= 22  # 128 random bits, URL-safe base64
    assert t["status"] == "waiting" and t["position"] == 1
    assert t["pass"] is None and t["pass_expires_at"] is None
    assert 0 < t["estimated_wait_seconds"] <= 60
    assert t["poll_after_seconds"] >= 1

    again = await join(client, event_id, "alice")
    assert again.status_code == 201 and again.json()["ticket"] == t["ticket"]
    bob = (await join(client, event_id, "bob")).json()
    assert bob["ticket"] != t["ticket"] and bob["position"] == 2
    assert bob["estimated_wait_seconds"] > t["estimated_wait_seconds"]
    assert (await poll(client, event_id, bob["ticket"]))["position"] == 2

    r = await client.delete(f"/events/{event_id}/queue/{t['ticket']}")
    assert r.status_code == 204, r.text
    assert (await poll(client, event_id, bob["ticket"]))["position"] == 1
    r = await client.get(f"/events/{event_id}/queue/{t['ticket']}")
    assert r.status_code == 404 and r.json()["code"] == "ticket_not_found"
    assert (await client.delete(f"/events/{event_id}/queue/{t['ticket']}")).status_code == 204
    # Alice joins again: a new ticket, behind Bob.
    back = (await join(client, event_id, "alice")).json()
    assert back["ticket"] != t["ticket"] and back["position"] == 2

    for path in ("nope", "x" * 100):
        r = await client.get(f"/events/{event_id}/queue/{path}")
        assert r.status_code == 404 and r.json()["code"] == "ticket_not_found", r.text
        r = await client.delete(f"/events/{event_id}/queue/{path}")
        assert r.status_code == 404 and r.json()["code"] == "ticket_not_found", r.text
    r = await client.get("/events/no-such-event/queue/abc")
    assert r.status_code == 404 and r.json()["code"] == "event_not_found"
    r = await join(client, "no-such-event", "alice")
    assert r.status_code == 404 and r.json()["code"] == "event_not_found"
    r = await client.post(f"/events/{event_id}/queue", json={"customer_id": ""})
    assert r.status_code == 400 and r.json()["code"] == "validation_error"

    stats = (await client.get(f"/admin/events/{event_id}/queue", headers=ADMIN)).json()
    assert stats == {
        "waiting": 2,
        "admitted": 0,
        "active_passes": 0,
        "admit_per_minute": 1,
        "last_admitted_position": 0,
    }
    assert (await client.get(f"/admin/events/{event_id}/queue")).status_code == 401


async def test_pre_queue_has_no_position_and_opens_at(client: httpx.AsyncClient) -> None:
    room = {"admit_per_minute": 60, "opens_at": "2030-06-01T00:00:00Z"}
    event_id = await create_event(client, **ga(on_sale_at=LATER, waiting_room=room))
    r = await join(client, event_id, "early")
    assert r.status_code == 409 and r.json()["code"] == "queue_not_open", r.text
    assert "2030-06-01T00:00:00Z" in r.json()["detail"]
    await client.patch(
        f"/admin/events/{event_id}",
        json={"waiting_room": {"admit_per_minute": 60}},
        headers=ADMIN,
    )
    t = (await join(client, event_id, "early")).json()
    assert t["status"] == "waiting" and t["position"] is None
    assert t["estimated_wait_seconds"] is None and t["poll_after_seconds"] == 30
    # The on-sale moment comes: the pre-queue gets its ranks.
    await client.patch(f"/admin/events/{event_id}", json={"on_sale_at": None}, headers=ADMIN)
    assert (await poll(client, event_id, t["ticket"]))["position"] == 1


async def test_closed_event(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client, **ga(waiting_room={"admit_per_minute": 1}))
    ticket = (await join(client, event_id, "c1")).json()["ticket"]
    await client.patch(f"/admin/events/{event_id}", json={"status": "closed"}, headers=ADMIN)
    t = await poll(client, event_id, ticket)
    assert t["status"] == "closed" and t["pass"] is None
    r = await join(client, event_id, "c2")
    assert r.status_code == 409 and r.json()["code"] == "not_on_sale", r.text


async def test_join_with_idempotency_key(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client, **ga(waiting_room={"admit_per_minute": 1}))
    key = {"idempotency-key": "join-1"}
    url = f"/events/{event_id}/queue"
    first = await client.post(url, json={"customer_id": "c1"}, headers=key)
    again = await client.post(url, json={"customer_id": "c1"}, headers=key)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    other = await client.post(url, json={"customer_id": "c2"}, headers=key)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"


async def test_a_ticket_is_its_customers(client: httpx.AsyncClient, svc: Services) -> None:
    """With customer tokens, a customer finds only their own ticket: the calls take the
    customer who asks."""
    event_id = await create_event(client, **ga(waiting_room={"admit_per_minute": 1}))
    ticket = (await join(client, event_id, "alice")).json()["ticket"]
    assert (await waitingroom.poll(svc, event_id, ticket, "alice")).ticket == ticket
    for call in (
        waitingroom.poll(svc, event_id, ticket, "bob"),
        waitingroom.leave(svc, event_id, ticket, None, "bob"),
    ):
        with pytest.raises(errors.TicketNotFound):
            await call
    await waitingroom.leave(svc, event_id, ticket, None, "alice")

    async def gone() -> bool:  # left in another process: the server's within a second
        return (await client.get(f"/events/{event_id}/queue/{ticket}")).status_code == 404

    await eventually(gone, within=1)


def test_pass_secret_setting() -> None:
    assert Settings.from_env({"BOXOFFICE_PASS_SECRET": "s" * 16}).pass_secret == "s" * 16
    with pytest.raises(SettingError, match="BOXOFFICE_PASS_SECRET"):
        Settings.from_env({"BOXOFFICE_PASS_SECRET": "short"})


# --- the pass -----------------------------------------------------------------------


async def test_pass_cases(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client, **ga(waiting_room=ROOM))
    other_event = await create_event(client, **ga(waiting_room=ROOM))
    t = await admitted(client, event_id, "alice")
    token = t["pass"]
    assert token and t["pass_expires_at"] and t["position"] is None
    assert t["estimated_wait_seconds"] is None
    # A valid pass serves several holds.
    for _ in range(3):
        r = await hold(client, event_id, "alice", token)
        assert r.status_code == 201, r.text
    # The same pass on every poll.
    assert (await poll(client, event_id, t["ticket"]))["pass"] == token

    bad = {
        "missing": ("alice", None, event_id),
        "another customer": ("bob", token, event_id),
        "another event": ("alice", token, other_event),
        "tampered signature": (
            "alice",
            token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),
            event_id,
        ),
        "tampered expiry": ("alice", "f" + token, event_id),
        "garbage": ("alice", "not-a-pass", event_id),
        "empty": ("alice", "", event_id),
    }
    for case, (customer, value, ev) in bad.items():
        r = await hold(client, ev, customer, value)
        assert r.status_code == 403, (case, r.text)
        assert r.json()["code"] == "admission_required", (case, r.text)

    # Expired: a pass signed with the servers' secret, its time passed.
    now = int(time.time() * 1000)
    secret = PASS_SECRET.encode()
    expired = passes.issue(secret, event_id, "alice", now - 1)
    r = await hold(client, event_id, "alice", expired)
    assert r.status_code == 403 and r.json()["code"] == "admission_required", r.text
    # A pass works until its expiry, and not after.
    short = passes.issue(secret, event_id, "carol", now + 1500)
    assert (await hold(client, event_id, "carol", short)).status_code == 201
    await asyncio.sleep(1.6)
    r = await hold(client, event_id, "carol", short)
    assert r.status_code == 403 and r.json()["code"] == "admission_required", r.text
    # Signed with another secret: refused.
    forged = passes.issue(b"another-secret-of-32-characters!", event_id, "alice", now + 60_000)
    assert (await hold(client, event_id, "alice", forged)).status_code == 403

    stats = (await client.get(f"/admin/events/{event_id}/queue", headers=ADMIN)).json()
    assert stats["active_passes"] == 1 and stats["admitted"] == 1 and stats["waiting"] == 0


async def test_no_room_no_pass_needed(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client, **ga())
    assert (await hold(client, event_id, "c1", None)).status_code == 201
    assert (await hold(client, event_id, "c1", "whatever")).status_code == 201
    r = await hold(client, "no-such-event", "c1", None)
    assert r.status_code == 404 and r.json()["code"] == "event_not_found"


async def test_room_turned_on_needs_passes(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client, **ga())
    assert (await hold(client, event_id, "c1", None)).status_code == 201
    await client.patch(f"/admin/events/{event_id}", json={"waiting_room": ROOM}, headers=ADMIN)

    async def refused() -> bool:  # other API processes within their cache's second
        return (await hold(client, event_id, "c1", None)).status_code == 403

    await eventually(refused, within=3)
    t = await admitted(client, event_id, "c1")
    assert (await hold(client, event_id, "c1", t["pass"])).status_code == 201


async def test_holds_that_find_the_room_out_of_date_wait_for_one_read(
    client: httpx.AsyncClient, svc: Services
) -> None:
    """Once a second every hold in flight finds its event's entry out of date together:
    they wait for one read of the event, not one each."""
    with_room = await create_event(client, **ga(waiting_room=ROOM))
    without = await create_event(client, **ga())

    async def hmgets() -> int:
        stats = await svc.redis.info("commandstats")
        return int(stats.get("cmdstat_hmget", {}).get("calls", 0))

    for event_id, expected in ((with_room, True), (without, False)):
        waitingroom.ROOMS.forget(event_id)
        before = await hmgets()
        found = await asyncio.gather(*(waitingroom.has_room(svc, event_id) for _ in range(20)))
        assert found == [expected] * 20
        assert await hmgets() - before == 1
