"""Small things a review found: a seat filter that is empty, where a currency error points,
the body of a dead letter's replay, confirm's empty body under an Idempotency-Key, and
the plurals of reconcile's repairs."""

from __future__ import annotations

import httpx

from service.durable import repair
from service.hotpath.context import Services
from tests.conftest import ADMIN, create_event, event_body
from tests.test_deadletters import Fix, refuse, two_dead_letters
from tests.test_errors import assert_problem
from tests.test_reconcile import confirm, hold

__all__ = ["refuse"]  # the fixture, used by name


async def test_an_empty_category_filter_on_seats_is_400(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    assert_problem(await client.get(f"/events/{event_id}/seats?category="), 400, "validation_error")


async def test_a_currency_error_points_at_the_currency(client: httpx.AsyncClient) -> None:
    body = event_body()
    body["categories"][1]["currency"] = "ABC"
    r = await client.post("/admin/events", json=body, headers=ADMIN)
    problem = assert_problem(r, 400, "validation_error")
    assert problem["detail"].startswith("`categories[1].currency`: 'ABC'"), problem


async def test_a_dead_letter_replay_answers_202_with_an_empty_body(
    client: httpx.AsyncClient, svc: Services, refuse: Fix
) -> None:
    event_id, first, second = await two_dead_letters(client, svc)
    base = f"/admin/events/{event_id}/dead-letters"
    r = await client.post(f"{base}/{first['id']}/replay", headers=ADMIN)
    assert (r.status_code, r.content) == (202, b"")
    keyed = {**ADMIN, "idempotency-key": f"replay-{second['id']}"}
    for _ in range(2):  # the first answer, and its replay
        r = await client.post(f"{base}/{second['id']}/replay", headers=keyed)
        assert (r.status_code, r.content) == (202, b"")


async def test_confirm_without_a_body_and_with_an_empty_object_are_one_request(
    client: httpx.AsyncClient,
) -> None:
    event_id = await create_event(client)
    hold_id = (
        await client.post(
            f"/events/{event_id}/holds",
            json={"customer_id": "c", "items": [{"category": "GA", "quantity": 1}]},
        )
    ).json()["hold_id"]
    url = f"/events/{event_id}/holds/{hold_id}/confirm"
    key = {"idempotency-key": f"confirm-{hold_id}"}
    first = await client.post(url, headers=key)
    assert first.status_code == 200, first.text
    again = await client.post(url, json={}, headers=key)
    assert (again.status_code, again.json()) == (200, first.json())


async def test_repairs_say_one_entry_not_entr_y_ies(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client)
    items = [{"category": "GA", "quantity": 1}]
    await confirm(client, event_id, await hold(client, event_id, "c", items=items))
    done = await repair.repair_event(svc, event_id)
    assert "wrote 1 outbox entry to PostgreSQL" in done, done
    assert not [line for line in done if "(s)" in line or "(y/" in line], done
