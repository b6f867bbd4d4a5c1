"""Concurrency claims, proven by racing many real HTTP clients against few tickets.

Every test here fires hundreds of requests at once (asyncio.gather over one httpx client
with a large connection pool) at the real `boxoffice serve` (two worker processes), then
counts: the winners, the losers and their error codes, and the stock that remains.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import httpx

from service.core.keys import event_keys
from service.hotpath.context import Services
from tests.conftest import availability, create_event, expire_hold


def _decode(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


async def stock(svc: Services, event_id: str) -> dict[str, dict[str, int]]:
    """The event's stock counters straight from Redis: cap, avail, held, sold by category."""
    k = event_keys(event_id)
    pipe = svc.redis.pipeline(transaction=True)
    for key in (k.cap, k.avail, k.held, k.sold):
        pipe.hgetall(key)
    cap, avail, held, sold = await pipe.execute()
    return {
        "cap": _decode(cap),
        "avail": _decode(avail),
        "held": _decode(held),
        "sold": _decode(sold),
    }


def assert_conserved(s: dict[str, dict[str, int]]) -> None:
    for cat, cap in s["cap"].items():
        avail, held, sold = s["avail"][cat], s["held"][cat], s["sold"][cat]
        assert min(avail, held, sold) >= 0, (cat, s)
        assert avail + held + sold == cap, (cat, s)


async def hold(client: httpx.AsyncClient, event_id: str, body: dict[str, Any]) -> httpx.Response:
    return await client.post(f"/events/{event_id}/holds", json=body)


async def race(
    client: httpx.AsyncClient, event_id: str, bodies: list[dict[str, Any]]
) -> list[httpx.Response]:
    return list(await asyncio.gather(*(hold(client, event_id, b) for b in bodies)))


def ga_event(capacity: int, **overrides: Any) -> dict[str, Any]:
    return {
        "categories": [{"name": "GA", "price": 2500, "currency": "EUR", "capacity": capacity}],
        **overrides,
    }


def seated_event(rows: list[str], per_row: int, **overrides: Any) -> dict[str, Any]:
    return {
        "categories": [
            {
                "name": "VIP",
                "price": 9900,
                "currency": "EUR",
                "seat_blocks": [{"rows": rows, "seats_per_row": per_row}],
            }
        ],
        **overrides,
    }


async def seat_states(client: httpx.AsyncClient, event_id: str) -> dict[str, str]:
    r = await client.get(f"/events/{event_id}/seats")
    assert r.status_code == 200, r.text
    return {s["label"]: s["status"] for s in r.json()["seats"]}


# --- general admission ------------------------------------------------------------------


async def test_ga_race_sells_exactly_capacity(client: httpx.AsyncClient, svc: Services) -> None:
    event_id = await create_event(client, **ga_event(30))
    bodies = [
        {"customer_id": f"c{i}", "items": [{"category": "GA", "quantity": 1}]} for i in range(400)
    ]
    answers = await race(client, event_id, bodies)

    won = [r for r in answers if r.status_code == 201]
    lost = [r for r in answers if r.status_code != 201]
    assert len(won) == 30
    assert len(lost) == 370
    for r in lost:
        assert r.status_code == 409, r.text
        body = r.json()
        assert body["code"] == "sold_out", body
        assert body["available"] == {"GA": 0}, body
    assert sum(i["quantity"] for r in won for i in r.json()["items"]) == 30
    assert len({r.json()["hold_id"] for r in won}) == 30
    assert len({r.json()["customer_id"] for r in won}) == 30
    assert await availability(client, event_id) == {"GA": 0}
    s = await stock(svc, event_id)
    assert_conserved(s)
    assert s["held"] == {"GA": 30}
    assert s["avail"] == {"GA": 0}


async def test_ga_race_mixed_quantities_never_oversells(
    client: httpx.AsyncClient, svc: Services
) -> None:
    capacity = 50
    event_id = await create_event(client, **ga_event(capacity))
    rng = random.Random(1234)
    quantities = [rng.randint(1, 3) for _ in range(300)]
    bodies = [
        {"customer_id": f"c{i}", "items": [{"category": "GA", "quantity": q}]}
        for i, q in enumerate(quantities)
    ]
    answers = await race(client, event_id, bodies)

    held = 0
    failed_quantities = []
    for q, r in zip(quantities, answers, strict=True):
        if r.status_code == 201:
            body = r.json()
            assert body["items"] == [{"category": "GA", "quantity": q}], body
            assert body["total"] == q * 2500, body
            held += q
        else:
            assert r.status_code == 409, r.text
            body = r.json()
            assert body["code"] == "sold_out", body
            # What was left when this request lost: fewer than it asked for.
            assert set(body["available"]) == {"GA"}, body
            assert 0 <= body["available"]["GA"] < q, (q, body)
            failed_quantities.append(q)
    assert held <= capacity
    assert failed_quantities, "300 clients asking for 1-3 tickets each cannot all fit in 50"
    left = (await availability(client, event_id))["GA"]
    assert left == capacity - held
    # Stock only shrank during the race, so what is left now is less than any loser asked.
    assert left < min(failed_quantities)
    s = await stock(svc, event_id)
    assert_conserved(s)
    assert s["held"] == {"GA": held}


# --- seats --------------------------------------------------------------------------------


async def test_named_seats_race_each_seat_held_once(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client, **seated_event(["A", "B"], 6))
    labels = [f"{row}-{n}" for row in "AB" for n in range(1, 7)]
    rng = random.Random(99)
    bodies = [
        {"customer_id": f"c{i}", "seats": rng.sample(labels, rng.randint(1, 2))} for i in range(300)
    ]
    answers = await race(client, event_id, bodies)

    held_by: dict[str, str] = {}
    failures = []
    for body, r in zip(bodies, answers, strict=True):
        if r.status_code == 201:
            hold_body = r.json()
            assert hold_body["seats"] == body["seats"], hold_body
            for label in hold_body["seats"]:
                assert label not in held_by, f"{label} held twice"
                held_by[label] = hold_body["hold_id"]
        else:
            assert r.status_code == 409, r.text
            problem = r.json()
            assert problem["code"] == "seats_unavailable", problem
            assert problem["seats"], problem
            assert set(problem["seats"]) <= set(body["seats"]), (body, problem)
            failures.append(problem["seats"])
    assert held_by
    assert failures

    states = await seat_states(client, event_id)
    assert {label for label, st in states.items() if st == "held"} == set(held_by)
    assert {label for label, st in states.items() if st != "held"} == set(labels) - set(held_by)
    assert all(st in {"held", "available"} for st in states.values())
    # Whatever a loser was refused is held by a winner now (no seat was given back).
    for refused in failures:
        assert set(refused) <= set(held_by)
    assert await availability(client, event_id) == {"VIP": len(labels) - len(held_by)}
    s = await stock(svc, event_id)
    assert_conserved(s)
    assert s["held"] == {"VIP": len(held_by)}
    # Redis agrees seat by seat: each held seat marks the hold that won it, and is not free.
    k = event_keys(event_id)
    pipe = svc.redis.pipeline(transaction=True)
    pipe.hgetall(k.seatstate)
    pipe.zrange(k.free, 0, -1)
    raw_state, raw_free = await pipe.execute()
    seatstate = {a.decode(): b.decode() for a, b in raw_state.items()}
    assert seatstate == {label: f"h:{hold_id}" for label, hold_id in held_by.items()}
    free = {m.decode() for m in raw_free}
    assert free == set(labels) - set(held_by)


async def test_best_available_race_assigns_every_seat_once(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client, **seated_event(["A", "B"], 10))
    labels = {f"{row}-{n}" for row in "AB" for n in range(1, 11)}
    bodies = [
        {"customer_id": f"c{i}", "items": [{"category": "VIP", "quantity": 1}]} for i in range(300)
    ]
    answers = await race(client, event_id, bodies)

    won = [r.json() for r in answers if r.status_code == 201]
    assert len(won) == len(labels)
    assigned = [label for body in won for label in body["seats"]]
    assert all(len(body["seats"]) == 1 for body in won), won
    assert len(set(assigned)) == len(assigned), Counter(assigned).most_common(3)
    assert set(assigned) == labels
    for r in answers:
        if r.status_code != 201:
            assert r.status_code == 409, r.text
            assert r.json()["code"] == "sold_out", r.text
            assert r.json()["available"] == {"VIP": 0}, r.text
    states = await seat_states(client, event_id)
    assert states == dict.fromkeys(labels, "held")
    assert await availability(client, event_id) == {"VIP": 0}
    assert_conserved(await stock(svc, event_id))


async def test_mixed_seat_and_best_available_race(client: httpx.AsyncClient, svc: Services) -> None:
    """Named seats and best-available requests racing on the same small category."""
    event_id = await create_event(client, **seated_event(["A"], 8))
    labels = [f"A-{n}" for n in range(1, 9)]
    rng = random.Random(7)
    bodies: list[dict[str, Any]] = []
    for i in range(200):
        if i % 2:
            bodies.append({"customer_id": f"c{i}", "seats": rng.sample(labels, 1)})
        else:
            bodies.append(
                {
                    "customer_id": f"c{i}",
                    "items": [{"category": "VIP", "quantity": rng.randint(1, 2)}],
                }
            )
    answers = await race(client, event_id, bodies)

    assigned: list[str] = []
    for body, r in zip(bodies, answers, strict=True):
        if r.status_code == 201:
            got = r.json()["seats"]
            wanted = len(body.get("seats", [])) + sum(i["quantity"] for i in body.get("items", []))
            assert len(got) == wanted, (body, got)
            assigned.extend(got)
        else:
            assert r.status_code == 409, r.text
            assert r.json()["code"] in {"seats_unavailable", "sold_out"}, r.text
    assert len(set(assigned)) == len(assigned), Counter(assigned).most_common(3)
    states = await seat_states(client, event_id)
    assert {label for label, st in states.items() if st == "held"} == set(assigned)
    assert await availability(client, event_id) == {"VIP": len(labels) - len(assigned)}
    assert_conserved(await stock(svc, event_id))


# --- max_per_customer ---------------------------------------------------------------------


async def test_customer_racing_itself_gets_exactly_its_limit(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client, **ga_event(1000, max_per_customer=5))
    one = {"customer_id": "greedy", "items": [{"category": "GA", "quantity": 1}]}
    answers = await race(client, event_id, [one] * 100)

    won = [r.json() for r in answers if r.status_code == 201]
    assert len(won) == 5
    for r in answers:
        if r.status_code != 201:
            assert r.status_code == 409, r.text
            assert r.json()["code"] == "customer_limit", r.text
            assert r.json()["remaining"] == 0, r.text
    assert await availability(client, event_id) == {"GA": 995}
    assert await svc.redis.hget(event_keys(event_id).cust, "greedy") == b"5"

    # Confirm two (bought tickets keep counting), release two (released ones do not).
    hold_ids = [h["hold_id"] for h in won]
    for hold_id in hold_ids[:2]:
        r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm")
        assert r.status_code == 200, r.text
    for hold_id in hold_ids[2:4]:
        r = await client.delete(f"/events/{event_id}/holds/{hold_id}")
        assert r.status_code == 204, r.text
    assert await svc.redis.hget(event_keys(event_id).cust, "greedy") == b"3"

    three = {"customer_id": "greedy", "items": [{"category": "GA", "quantity": 3}]}
    r = await hold(client, event_id, three)
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "customer_limit"
    assert r.json()["remaining"] == 2

    answers = await race(client, event_id, [one] * 50)
    assert sum(r.status_code == 201 for r in answers) == 2
    assert all(
        r.status_code == 201 or (r.status_code == 409 and r.json()["code"] == "customer_limit")
        for r in answers
    )
    # Now 2 bought + 3 held. An expired hold gives its ticket back to the allowance too.
    await expire_hold(svc, event_id, hold_ids[4])
    answers = await race(client, event_id, [one] * 30)
    assert sum(r.status_code == 201 for r in answers) == 1
    assert await svc.redis.hget(event_keys(event_id).cust, "greedy") == b"5"
    # Another customer is unaffected.
    r = await hold(client, event_id, {**three, "customer_id": "other"})
    assert r.status_code == 201, r.text
    s = await stock(svc, event_id)
    assert_conserved(s)
    assert s["sold"] == {"GA": 2}
    assert s["held"] == {"GA": 3 + 3}


async def test_customer_limit_ignores_expired_holds_beyond_reclaim_batch(
    client: httpx.AsyncClient, svc: Services
) -> None:
    """A customer's expired hold must not count against max_per_customer, however many
    other overdue holds the event has (the hold script reclaims at most a batch at once)."""
    event_id = await create_event(client, **ga_event(1000, max_per_customer=2))
    others = await race(
        client,
        event_id,
        [{"customer_id": f"o{i}", "items": [{"category": "GA", "quantity": 1}]} for i in range(60)],
    )
    assert all(r.status_code == 201 for r in others)
    mine = await hold(
        client, event_id, {"customer_id": "me", "items": [{"category": "GA", "quantity": 2}]}
    )
    assert mine.status_code == 201, mine.text
    for r in others:
        await expire_hold(svc, event_id, r.json()["hold_id"])
    await asyncio.sleep(0.01)  # my hold's deadline is later than all the others'
    await expire_hold(svc, event_id, mine.json()["hold_id"])

    r = await client.get(f"/events/{event_id}/holds/{mine.json()['hold_id']}")
    assert r.json()["status"] == "expired"
    r = await hold(
        client, event_id, {"customer_id": "me", "items": [{"category": "GA", "quantity": 1}]}
    )
    assert r.status_code == 201, r.text


# --- confirm against release ----------------------------------------------------------------


async def test_confirm_release_race_has_one_winner(
    client: httpx.AsyncClient, svc: Services
) -> None:
    capacity = 100
    event_id = await create_event(client, **ga_event(capacity, max_per_order=5))
    holds = await race(
        client,
        event_id,
        [
            {"customer_id": f"c{i}", "items": [{"category": "GA", "quantity": 1 + i % 3}]}
            for i in range(20)
        ],
    )
    assert all(r.status_code == 201 for r in holds), [r.text for r in holds]
    hold_ids = [r.json()["hold_id"] for r in holds]
    quantity = {r.json()["hold_id"]: r.json()["items"][0]["quantity"] for r in holds}

    calls: list[tuple[str, str]] = [(h, op) for h in hold_ids for op in ("confirm", "release") * 10]
    random.Random(5).shuffle(calls)

    async def call(hold_id: str, op: str) -> httpx.Response:
        url = f"/events/{event_id}/holds/{hold_id}"
        if op == "confirm":
            return await client.post(f"{url}/confirm", json={"payment_ref": f"pi-{hold_id}"})
        return await client.delete(url)

    answers = await asyncio.gather(*(call(h, op) for h, op in calls))

    by_hold: dict[str, dict[str, list[httpx.Response]]] = {
        h: {"confirm": [], "release": []} for h in hold_ids
    }
    for (hold_id, op), r in zip(calls, answers, strict=True):
        by_hold[hold_id][op].append(r)

    sold = 0
    outcomes = Counter[str]()
    for hold_id, ops in by_hold.items():
        confirms, releases = ops["confirm"], ops["release"]
        confirmed = [r for r in confirms if r.status_code == 200]
        final = (await client.get(f"/events/{event_id}/holds/{hold_id}")).json()
        if confirmed:
            # Confirmed first: every confirm returns the one booking, every release is refused.
            outcomes["confirmed"] += 1
            assert len(confirmed) == len(confirms), [r.text for r in confirms]
            assert len({r.json()["booking_id"] for r in confirmed}) == 1
            for r in releases:
                assert r.status_code == 409, r.text
                assert r.json()["code"] == "hold_confirmed", r.text
            assert final["status"] == "confirmed"
            assert final["booking_id"] == confirmed[0].json()["booking_id"]
            booking = await client.get(f"/events/{event_id}/bookings/{final['booking_id']}")
            assert booking.status_code == 200, booking.text
            assert booking.json()["hold_id"] == hold_id
            assert booking.json()["payment_ref"] == f"pi-{hold_id}"
            sold += quantity[hold_id]
        else:
            # Released first: every release is a no-op 204, every confirm hold_released.
            outcomes["released"] += 1
            for r in confirms:
                assert r.status_code == 409, r.text
                assert r.json()["code"] == "hold_released", r.text
            for r in releases:
                assert r.status_code == 204, r.text
            assert final["status"] == "released"
            assert final.get("booking_id") is None
    assert sum(outcomes.values()) == len(hold_ids)

    s = await stock(svc, event_id)
    assert_conserved(s)
    assert s["held"] == {"GA": 0}
    assert s["sold"] == {"GA": sold}
    assert await availability(client, event_id) == {"GA": capacity - sold}
    assert await svc.redis.zcard(event_keys(event_id).deadlines) == 0


async def test_releases_racing_new_holds_resell_freed_stock(
    client: httpx.AsyncClient, svc: Services
) -> None:
    """Released tickets go back on sale at once: holds racing the releases may take them,
    but never more than was freed."""
    event_id = await create_event(client, **ga_event(10))
    first = await race(
        client,
        event_id,
        [{"customer_id": f"a{i}", "items": [{"category": "GA", "quantity": 1}]} for i in range(10)],
    )
    assert all(r.status_code == 201 for r in first)
    assert await availability(client, event_id) == {"GA": 0}

    releases = [client.delete(f"/events/{event_id}/holds/{r.json()['hold_id']}") for r in first]
    grabs = [
        hold(
            client, event_id, {"customer_id": f"b{i}", "items": [{"category": "GA", "quantity": 1}]}
        )
        for i in range(200)
    ]
    answers = await asyncio.gather(*releases, *grabs)
    assert all(r.status_code == 204 for r in answers[:10])
    grabbed = [r for r in answers[10:] if r.status_code == 201]
    assert all(r.status_code == 201 or r.json()["code"] == "sold_out" for r in answers[10:])
    assert len(grabbed) <= 10
    assert await availability(client, event_id) == {"GA": 10 - len(grabbed)}
    s = await stock(svc, event_id)
    assert_conserved(s)
    assert s["held"] == {"GA": len(grabbed)}
