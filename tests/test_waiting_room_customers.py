"""The waiting room with customer tokens on (API.md "Customers"): a ticket is its
customer's; another customer's ticket does not exist for them; the pass is bound to the
token's customer."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import ADMIN, create_event, eventually
from tests.test_customers import api_tokens, as_, tc  # noqa: F401 (fixtures)
from tests.test_waiting_room import ROOM, ga


async def test_queue_with_customer_tokens(tc: httpx.AsyncClient) -> None:  # noqa: F811
    event_id = await create_event(tc, **ga(waiting_room=ROOM))
    queue = f"/events/{event_id}/queue"
    r = await tc.post(queue, json={})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
    r = await tc.post(queue, json={"customer_id": "bob"}, headers=as_("alice"))
    assert r.status_code == 403 and r.json()["code"] == "customer_mismatch", r.text
    r = await tc.post(queue, json={}, headers=as_("alice"))  # the token's customer
    assert r.status_code == 201, r.text
    ticket = r.json()["ticket"]
    again = await tc.post(queue, json={"customer_id": "alice"}, headers=as_("alice"))
    assert again.json()["ticket"] == ticket

    # Another customer: no such ticket, to read or to leave.
    for method in ("GET", "DELETE"):
        r = await tc.request(method, f"{queue}/{ticket}", headers=as_("bob"))
        assert r.status_code == 404 and r.json()["code"] == "ticket_not_found", r.text
    assert (await tc.get(f"{queue}/{ticket}")).status_code == 401

    seen: dict[str, Any] = {}

    async def admitted() -> bool:
        r = await tc.get(f"{queue}/{ticket}", headers=as_("alice"))
        seen.update(r.json())
        return bool(r.status_code == 200 and seen["status"] == "admitted")

    await eventually(admitted, within=10)
    body = {"items": [{"category": "GA", "quantity": 1}]}
    holds = f"/events/{event_id}/holds"
    r = await tc.post(holds, json=body, headers={**as_("alice"), "boxoffice-pass": seen["pass"]})
    assert r.status_code == 201, r.text
    # Alice's pass is not Bob's.
    r = await tc.post(holds, json=body, headers={**as_("bob"), "boxoffice-pass": seen["pass"]})
    assert r.status_code == 403 and r.json()["code"] == "admission_required", r.text

    r = await tc.delete(f"{queue}/{ticket}", headers=as_("alice"))
    assert r.status_code == 204, r.text
    stats = (await tc.get(f"/admin/events/{event_id}/queue", headers=ADMIN)).json()
    assert stats["admitted"] == 1 and stats["active_passes"] == 1
