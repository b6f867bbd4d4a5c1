"""Every error code of API.md that the service covers, reached through HTTP.

Each error answer is checked for its status, `application/problem+json`, the problem fields
(`status`, `title`, `detail`, `code`, plus the extras of some codes), and, for a request
that could change state, that nothing changed: the event and every seat are the same
before and after. (`rate_limited` is not implemented yet.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from service.core.settings import Settings
from service.hotpath.context import Services
from tests.apiserver import ApiServer
from tests.conftest import (
    ADMIN,
    availability,
    create_event,
    event_body,
    expire_hold,
    missing_database_env,
    new_event_id,
    server_env,
    snapshot,
)
from tests.servers import RedisServer

# Every answer of the lean lane's routes agrees with the OpenAPI document.
pytestmark = pytest.mark.openapi_checked

PROBLEM_JSON = "application/problem+json"
BIG_STRING = "x" * (70 * 1024)  # a JSON body over the 64 KiB limit


# --- helpers (also used by test_idempotency.py and test_contract.py) -----------------------


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is the problem document of `code`; returns it."""
    assert r.status_code == status, r.text
    media_type = r.headers.get("content-type", "").split(";")[0].strip()
    assert media_type == PROBLEM_JSON, (r.headers, r.text)
    body = r.json()
    assert isinstance(body, dict), body
    assert body["status"] == status, body
    assert body["code"] == code, body
    assert isinstance(body["title"], str) and body["title"], body
    assert isinstance(body["detail"], str) and body["detail"], body
    return body


@asynccontextmanager
async def unchanged(client: httpx.AsyncClient, event_id: str) -> AsyncIterator[None]:
    """The event (availability, status, name, ...) and every seat are the same after."""
    before = await snapshot(client, event_id)
    assert before[0]["id"] == event_id, before
    yield
    after = await snapshot(client, event_id)
    assert after == before


async def assert_no_event(client: httpx.AsyncClient, event_id: str) -> None:
    url = f"/events/{quote(event_id, safe='')}"
    assert_problem(await client.get(url), 404, "event_not_found")


async def hold(
    client: httpx.AsyncClient,
    event_id: str,
    customer_id: str = "cust",
    items: Sequence[tuple[str, int]] = (),
    seats: Sequence[str] = (),
) -> dict[str, Any]:
    """A hold that must succeed; returns its body."""
    body = {
        "customer_id": customer_id,
        "items": [{"category": c, "quantity": n} for c, n in items],
        "seats": list(seats),
    }
    r = await client.post(f"/events/{event_id}/holds", json=body)
    assert r.status_code == 201, r.text
    result: dict[str, Any] = r.json()
    return result


def ga(n: int = 1, customer_id: str = "cust") -> dict[str, Any]:
    return {"customer_id": customer_id, "items": [{"category": "GA", "quantity": n}]}


def json_headers(**extra: str) -> dict[str, str]:
    return {"content-type": "application/json", **extra}


# --- 400 validation_error ----------------------------------------------------------------


@pytest.fixture(scope="module")
async def shared(api: ApiServer, svc: Services) -> AsyncIterator[tuple[str, str]]:
    """An event with a live hold, for the many requests that must change nothing (each
    test checks that). `svc` first: it empties the test Redis database."""
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as c:
        event_id = await create_event(c)
        h = await hold(c, event_id, items=[("GA", 2)], seats=["A-1"])
        yield event_id, h["hold_id"]


BAD_HOLD_BODIES: dict[str, bytes] = {
    "malformed JSON": b'{"customer_id": "c", "items": [',
    "not JSON at all": b"customer_id=c",
    "JSON null": b"null",
    "JSON array": b"[]",
    "quantity as string": b'{"customer_id": "c", "items": [{"category": "GA", "quantity": "2"}]}',
    "quantity as float": b'{"customer_id": "c", "items": [{"category": "GA", "quantity": 1.0}]}',
    "customer_id as number": b'{"customer_id": 7, "items": [{"category": "GA", "quantity": 1}]}',
    "seats not a list": b'{"customer_id": "c", "seats": "B-1"}',
    "unknown top-level field": b'{"customer_id": "c", "seats": ["B-1"], "coupon": "FREE"}',
    "unknown item field": (
        b'{"customer_id": "c", "items": [{"category": "GA", "quantity": 1, "price": 0}]}'
    ),
    "missing customer_id": b'{"items": [{"category": "GA", "quantity": 1}]}',
    "empty customer_id": b'{"customer_id": "", "items": [{"category": "GA", "quantity": 1}]}',
    "customer_id of 129 characters": (
        b'{"customer_id": "' + b"c" * 129 + b'", "items": [{"category": "GA", "quantity": 1}]}'
    ),
    "quantity 0": b'{"customer_id": "c", "items": [{"category": "GA", "quantity": 0}]}',
    "quantity negative": b'{"customer_id": "c", "items": [{"category": "GA", "quantity": -1}]}',
    "quantity 101": b'{"customer_id": "c", "items": [{"category": "GA", "quantity": 101}]}',
    "empty order": b'{"customer_id": "c"}',
    "empty items and seats": b'{"customer_id": "c", "items": [], "seats": []}',
    "more than max_per_order in one item": (
        b'{"customer_id": "c", "items": [{"category": "GA", "quantity": 11}]}'
    ),
    "more than max_per_order in all": (
        b'{"customer_id": "c", "items": [{"category": "GA", "quantity": 8}],'
        b' "seats": ["B-1", "B-2", "B-3"]}'
    ),
    "duplicate category in items": (
        b'{"customer_id": "c", "items": [{"category": "GA", "quantity": 1},'
        b' {"category": "GA", "quantity": 1}]}'
    ),
    "duplicate seat": b'{"customer_id": "c", "seats": ["B-1", "B-1"]}',
    "seat label with a trailing newline": b'{"customer_id": "c", "seats": ["B-1\\n"]}',
    "category with a trailing newline": (
        b'{"customer_id": "c", "items": [{"category": "GA\\n", "quantity": 1}]}'
    ),
    "seat label of 65 characters": b'{"customer_id": "c", "seats": ["' + b"A" * 65 + b'"]}',
    "seat label with a slash": b'{"customer_id": "c", "seats": ["B/1"]}',
}


@pytest.mark.parametrize("body", BAD_HOLD_BODIES.values(), ids=BAD_HOLD_BODIES.keys())
async def test_hold_validation_error(
    client: httpx.AsyncClient, shared: tuple[str, str], body: bytes
) -> None:
    event_id, _ = shared
    async with unchanged(client, event_id):
        r = await client.post(f"/events/{event_id}/holds", content=body, headers=json_headers())
        assert_problem(r, 400, "validation_error")


BAD_CONFIRM_BODIES: dict[str, bytes] = {
    "malformed JSON": b'{"payment_ref": ',
    "unknown field": b'{"payment_ref": "pi_1", "amount": 100}',
    "payment_ref as number": b'{"payment_ref": 123}',
    "empty payment_ref": b'{"payment_ref": ""}',
    "payment_ref of 129 characters": b'{"payment_ref": "' + b"p" * 129 + b'"}',
}


@pytest.mark.parametrize("body", BAD_CONFIRM_BODIES.values(), ids=BAD_CONFIRM_BODIES.keys())
async def test_confirm_validation_error(
    client: httpx.AsyncClient, shared: tuple[str, str], body: bytes
) -> None:
    event_id, hold_id = shared
    url = f"/events/{event_id}/holds/{hold_id}"
    async with unchanged(client, event_id):
        r = await client.post(f"{url}/confirm", content=body, headers=json_headers())
        assert_problem(r, 400, "validation_error")
    r = await client.get(url)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "held"


@pytest.mark.parametrize(
    "query",
    ["status=bogus", "status=", "status=HELD"],
)
async def test_seats_bad_query_parameter(
    client: httpx.AsyncClient, shared: tuple[str, str], query: str
) -> None:
    event_id, _ = shared
    r = await client.get(f"/events/{event_id}/seats?{query}")
    assert_problem(r, 400, "validation_error")


async def test_seats_bad_query_parameter_names_the_parameter(client: httpx.AsyncClient) -> None:
    """When the problem says where the error is, it names the parameter of the contract
    (`status`), not an internal name."""
    event_id = await create_event(client)
    body = assert_problem(
        await client.get(f"/events/{event_id}/seats?status=bogus"), 400, "validation_error"
    )
    where = [e.get("key") for e in body.get("errors") or []]
    assert all(key == "status" for key in where), body.get("errors")


def _admin_body(**overrides: Any) -> dict[str, Any]:
    return event_body(**overrides)


def _category(**fields: Any) -> dict[str, Any]:
    return {"name": "GA", "price": 2500, "currency": "EUR", "capacity": 10, **fields}


BAD_EVENT_BODIES: dict[str, dict[str, Any]] = {
    "two currencies": _admin_body(
        categories=[_category(), _category(name="VIP", currency="USD")],
    ),
    "GA capacity and seats both": _admin_body(categories=[_category(seats=["S-1", "S-2"])]),
    "GA capacity and seat_blocks both": _admin_body(
        categories=[_category(seat_blocks=[{"rows": ["A"], "seats_per_row": 2}])]
    ),
    "neither capacity nor seats": _admin_body(
        categories=[{"name": "GA", "price": 2500, "currency": "EUR"}]
    ),
    "seated without seats": _admin_body(categories=[_category(capacity=None, seats=[])]),
    "capacity too large": _admin_body(categories=[_category(capacity=10_000_001)]),
    "capacity negative": _admin_body(categories=[_category(capacity=-1)]),
    "capacity as string": _admin_body(categories=[_category(capacity="10")]),
    "price as float": _admin_body(categories=[_category(price=25.0)]),
    "price negative": _admin_body(categories=[_category(price=-1)]),
    "currency lower case": _admin_body(categories=[_category(currency="eur")]),
    "hold_ttl_seconds too small": _admin_body(hold_ttl_seconds=9),
    "hold_ttl_seconds too large": _admin_body(hold_ttl_seconds=86401),
    "max_per_order 0": _admin_body(max_per_order=0),
    "max_per_order 101": _admin_body(max_per_order=101),
    "max_per_customer 0": _admin_body(max_per_customer=0),
    "no categories": _admin_body(categories=[]),
    "101 categories": _admin_body(
        categories=[_category(name=f"C{i}", capacity=1) for i in range(101)]
    ),
    "duplicate category names": _admin_body(categories=[_category(), _category()]),
    "duplicate seat labels": _admin_body(
        categories=[
            _category(
                capacity=None,
                seat_blocks=[{"rows": ["A"], "seats_per_row": 3}],
                seats=["A-2"],
            )
        ]
    ),
    "more than 200,000 seats": _admin_body(
        categories=[
            _category(
                capacity=None,
                seat_blocks=[{"rows": [f"R{i}" for i in range(20)], "seats_per_row": 10_000}],
                seats=["EXTRA-1"],
            )
        ]
    ),
    "seat label with a trailing newline": _admin_body(
        categories=[_category(capacity=None, seats=["S-1\n"])]
    ),
    "category name with a trailing newline": _admin_body(categories=[_category(name="GA\n")]),
    "event id upper case": _admin_body(event_id="UPPER-CASE"),
    "event id with a trailing newline": _admin_body(event_id="ev-newline\n"),
    "event id of 65 characters": _admin_body(event_id="e" * 65),
    "starts_at without a time zone": _admin_body(starts_at="2030-12-01T19:00:00"),
    "starts_at not a time": _admin_body(starts_at="tomorrow"),
    "empty name": _admin_body(name=""),
    "unknown field": _admin_body(venue="Arena"),
    "unknown category field": _admin_body(categories=[_category(colour="red")]),
}


@pytest.mark.parametrize("body", BAD_EVENT_BODIES.values(), ids=BAD_EVENT_BODIES.keys())
async def test_create_event_validation_error(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    r = await client.post("/admin/events", json=body, headers=ADMIN)
    assert_problem(r, 400, "validation_error")
    await assert_no_event(client, body["id"])


async def test_create_event_malformed_json(client: httpx.AsyncClient) -> None:
    r = await client.post("/admin/events", content=b'{"id": "x",', headers=json_headers(**ADMIN))
    assert_problem(r, 400, "validation_error")


BAD_PATCHES: dict[str, bytes] = {
    "capacity of a seated category": b'{"categories": [{"name": "VIP", "capacity": 3}]}',
    "capacity negative": b'{"categories": [{"name": "GA", "capacity": -1}]}',
    "capacity too large": b'{"categories": [{"name": "GA", "capacity": 10000001}]}',
    "capacity as float": b'{"categories": [{"name": "GA", "capacity": 60.0}]}',
    "same category twice": (
        b'{"categories": [{"name": "GA", "capacity": 60}, {"name": "GA", "capacity": 70}]}'
    ),
    "status scheduled": b'{"status": "scheduled"}',
    "status bogus": b'{"status": "bogus"}',
    "empty name": b'{"name": ""}',
    "on_sale_at without a time zone": b'{"on_sale_at": "2030-01-01T00:00:00"}',
    "unknown field": b'{"max_seats": 5}',
    "malformed JSON": b'{"status": ',
    "name change with a seated capacity": (
        b'{"name": "Renamed", "status": "paused", "categories": [{"name": "VIP", "capacity": 3}]}'
    ),
}


@pytest.mark.parametrize("body", BAD_PATCHES.values(), ids=BAD_PATCHES.keys())
async def test_patch_event_validation_error(
    client: httpx.AsyncClient, shared: tuple[str, str], body: bytes
) -> None:
    event_id, _ = shared
    async with unchanged(client, event_id):
        r = await client.patch(
            f"/admin/events/{event_id}", content=body, headers=json_headers(**ADMIN)
        )
        assert_problem(r, 400, "validation_error")


# --- 400 unknown_category / unknown_seat -------------------------------------------------


async def test_unknown_category(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    async with unchanged(client, event_id):
        r = await client.post(
            f"/events/{event_id}/holds",
            json={
                "customer_id": "c",
                "items": [
                    {"category": "GA", "quantity": 1},
                    {"category": "Balcony", "quantity": 1},
                ],
            },
        )
        assert_problem(r, 400, "unknown_category")


async def test_unknown_category_in_patch(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    async with unchanged(client, event_id):
        r = await client.patch(
            f"/admin/events/{event_id}",
            json={"name": "Renamed", "categories": [{"name": "Balcony", "capacity": 5}]},
            headers=ADMIN,
        )
        assert_problem(r, 400, "unknown_category")


async def test_unknown_seat(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    async with unchanged(client, event_id):
        r = await client.post(
            f"/events/{event_id}/holds",
            json={
                "customer_id": "c",
                "items": [{"category": "GA", "quantity": 1}],
                "seats": ["A-1", "Z-99"],
            },
        )
        assert_problem(r, 400, "unknown_seat")


# --- 401 unauthorized --------------------------------------------------------------------

BAD_AUTH: dict[str, dict[str, str]] = {
    "no token": {},
    "wrong token": {"authorization": "Bearer not-the-token"},
    "token prefix": {"authorization": "Bearer test-admin"},
    "wrong scheme": {"authorization": "Basic test-admin-token"},
    "no scheme": {"authorization": "test-admin-token"},
    "bearer without a token": {"authorization": "Bearer"},
}


@pytest.mark.parametrize("headers", BAD_AUTH.values(), ids=BAD_AUTH.keys())
async def test_unauthorized(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    body = event_body()
    assert_problem(
        await client.post("/admin/events", json=body, headers=headers), 401, "unauthorized"
    )
    await assert_no_event(client, body["id"])

    event_id = await create_event(client)
    async with unchanged(client, event_id):
        r = await client.patch(
            f"/admin/events/{event_id}",
            json={"status": "closed", "categories": [{"name": "GA", "capacity": 1}]},
            headers=headers,
        )
        assert_problem(r, 401, "unauthorized")


# --- 404 ---------------------------------------------------------------------------------

HOLD = {"customer_id": "c", "items": [{"category": "GA", "quantity": 1}]}


@pytest.mark.parametrize(
    "event_id",
    ["unknown", "UPPER", "a" * 65, "a" * 64, "-dash-first", "ev%0A", "ev_underscore"],
    ids=["well-formed", "upper-case", "65 chars", "64 chars", "dash first", "newline", "_"],
)
async def test_event_not_found_on_every_event_route(
    client: httpx.AsyncClient, event_id: str
) -> None:
    if event_id == "unknown":
        event_id = new_event_id("unknown")
    base = f"/events/{event_id}"
    hold_url = f"{base}/holds/AAAAAAAAAAAAAAAAAAAAAA"
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", base, {}),
        ("GET", f"{base}/seats", {}),
        ("GET", f"{base}/seats?category=GA&status=available", {}),
        ("POST", f"{base}/holds", {"json": HOLD}),
        ("POST", f"{base}/holds", {"json": HOLD, "headers": {"idempotency-key": "k-404"}}),
        ("GET", hold_url, {}),
        ("POST", f"{hold_url}/confirm", {}),
        ("POST", f"{hold_url}/confirm", {"json": {"payment_ref": "p"}}),
        ("DELETE", hold_url, {}),
        ("GET", f"{base}/bookings/01a20072-1b1d-7ed9-b845-35f408370965", {}),
        ("PATCH", f"/admin/events/{event_id}", {"json": {"status": "paused"}, "headers": ADMIN}),
    ]
    for method, url, kwargs in requests:
        r = await client.request(method, url, **kwargs)
        assert_problem(r, 404, "event_not_found")
    # A hold on a missing event did not bring the event into being.
    assert_problem(await client.get(base), 404, "event_not_found")


async def test_hold_not_found(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    other_id = await create_event(client)
    foreign = await hold(client, other_id, items=[("GA", 1)])
    for hold_id in ["AAAAAAAAAAAAAAAAAAAAAA", foreign["hold_id"]]:
        url = f"/events/{event_id}/holds/{hold_id}"
        async with unchanged(client, event_id), unchanged(client, other_id):
            assert_problem(await client.get(url), 404, "hold_not_found")
            assert_problem(await client.post(f"{url}/confirm"), 404, "hold_not_found")
            assert_problem(await client.delete(url), 404, "hold_not_found")


async def test_booking_not_found(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 1)])
    r = await client.post(f"/events/{event_id}/holds/{h['hold_id']}/confirm")
    assert r.status_code == 200, r.text
    booking_id = r.json()["booking_id"]
    other_id = await create_event(client)
    for url in [
        f"/events/{event_id}/bookings/01a20072-1b1d-7ed9-b845-35f408370965",
        f"/events/{event_id}/bookings/{h['hold_id']}",  # a hold id is no booking id
        f"/events/{other_id}/bookings/{booking_id}",  # the booking of another event
    ]:
        assert_problem(await client.get(url), 404, "booking_not_found")
    assert (await client.get(f"/events/{event_id}/bookings/{booking_id}")).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nowhere"),
        ("GET", "/events/{event_id}/tickets"),
        ("POST", "/events/{event_id}/holds/{hold_id}/refund"),
        ("GET", "/admin"),
        ("POST", "/admin/event"),
    ],
)
async def test_not_found_route(
    client: httpx.AsyncClient, shared: tuple[str, str], method: str, path: str
) -> None:
    event_id, hold_id = shared
    url = path.format(event_id=event_id, hold_id=hold_id)
    async with unchanged(client, event_id):
        r = await client.request(method, url, json=HOLD, headers=ADMIN)
        assert_problem(r, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/events/{event_id}", {"GET"}),
        ("DELETE", "/events/{event_id}", {"GET"}),
        ("POST", "/events", {"GET"}),
        ("PATCH", "/events/{event_id}/holds", {"POST"}),
        ("GET", "/events/{event_id}/holds/{hold_id}/confirm", {"POST"}),
        ("PUT", "/events/{event_id}/holds/{hold_id}", {"GET", "DELETE"}),
        ("GET", "/admin/events", {"POST"}),
        ("DELETE", "/admin/events/{event_id}", {"PATCH"}),
    ],
)
async def test_method_not_allowed(
    client: httpx.AsyncClient, shared: tuple[str, str], method: str, path: str, allowed: set[str]
) -> None:
    event_id, hold_id = shared
    url = path.format(event_id=event_id, hold_id=hold_id)
    async with unchanged(client, event_id):
        r = await client.request(method, url, json=HOLD, headers=ADMIN)
        assert_problem(r, 405, "method_not_allowed")
    allow = {m.strip().upper() for m in r.headers["allow"].split(",")}
    assert allowed <= allow, allow
    assert method not in allow, allow


# --- 409 conflicts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["paused", "closed", "scheduled", "scheduled later by PATCH"], ids=str
)
async def test_not_on_sale(client: httpx.AsyncClient, how: str) -> None:
    if how == "scheduled":
        event_id = await create_event(client, on_sale_at="2099-01-01T00:00:00Z")
    else:
        event_id = await create_event(client)
        patch: dict[str, Any] = (
            {"on_sale_at": "2099-01-01T00:00:00Z"}
            if how.startswith("scheduled")
            else {"status": how}
        )
        r = await client.patch(f"/admin/events/{event_id}", json=patch, headers=ADMIN)
        assert r.status_code == 200, r.text
    event = (await client.get(f"/events/{event_id}")).json()
    assert event["status"] == how.split()[0]
    async with unchanged(client, event_id):
        for body in [HOLD, {"customer_id": "c", "seats": ["A-1"]}]:
            r = await client.post(f"/events/{event_id}/holds", json=body)
            assert_problem(r, 409, "not_on_sale")


async def test_back_on_sale_after_pause(client: httpx.AsyncClient) -> None:
    """The not_on_sale test above is not passing by accident: on sale again, it sells."""
    event_id = await create_event(client)
    for status in ["paused", "on_sale"]:
        r = await client.patch(f"/admin/events/{event_id}", json={"status": status}, headers=ADMIN)
        assert r.status_code == 200, r.text
    await hold(client, event_id, items=[("GA", 1)])


async def test_sold_out(client: httpx.AsyncClient) -> None:
    event_id = await create_event(
        client,
        categories=[
            {"name": "GA", "price": 2500, "currency": "EUR", "capacity": 3},
            {"name": "VIP", "price": 9900, "currency": "EUR", "seats": ["V-1", "V-2"]},
        ],
    )
    await hold(client, event_id, "first", items=[("GA", 2)])
    async with unchanged(client, event_id):
        r = await client.post(
            f"/events/{event_id}/holds",
            json={
                "customer_id": "c",
                "items": [{"category": "GA", "quantity": 2}, {"category": "VIP", "quantity": 1}],
            },
        )
        body = assert_problem(r, 409, "sold_out")
        assert body["available"] == {"GA": 1}

        r = await client.post(
            f"/events/{event_id}/holds",
            json={
                "customer_id": "c",
                "items": [{"category": "GA", "quantity": 2}, {"category": "VIP", "quantity": 3}],
            },
        )
        body = assert_problem(r, 409, "sold_out")
        assert body["available"] == {"GA": 1, "VIP": 2}


async def test_seats_unavailable(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    first = await hold(client, event_id, "first", seats=["A-1", "BOX-2"])
    async with unchanged(client, event_id):
        r = await client.post(
            f"/events/{event_id}/holds",
            json={
                "customer_id": "c",
                "items": [{"category": "GA", "quantity": 1}],
                "seats": ["A-1", "A-2", "BOX-2"],
            },
        )
        body = assert_problem(r, 409, "seats_unavailable")
        assert sorted(body["seats"]) == ["A-1", "BOX-2"]
    # Sold seats are unavailable too.
    r = await client.post(f"/events/{event_id}/holds/{first['hold_id']}/confirm")
    assert r.status_code == 200, r.text
    async with unchanged(client, event_id):
        r = await client.post(
            f"/events/{event_id}/holds", json={"customer_id": "c", "seats": ["BOX-2"]}
        )
        assert assert_problem(r, 409, "seats_unavailable")["seats"] == ["BOX-2"]


async def test_customer_limit(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client, max_per_customer=3)
    await hold(client, event_id, "limited", items=[("GA", 2)])
    async with unchanged(client, event_id):
        r = await client.post(f"/events/{event_id}/holds", json=ga(2, "limited"))
        assert assert_problem(r, 409, "customer_limit")["remaining"] == 1
        r = await client.post(
            f"/events/{event_id}/holds", json={"customer_id": "limited", "seats": ["A-1", "A-2"]}
        )
        assert assert_problem(r, 409, "customer_limit")["remaining"] == 1
    # The refused requests were not counted against the customer.
    await hold(client, event_id, "limited", seats=["A-1"])
    async with unchanged(client, event_id):
        r = await client.post(f"/events/{event_id}/holds", json=ga(1, "limited"))
        assert assert_problem(r, 409, "customer_limit")["remaining"] == 0
    # Another customer has a limit of their own.
    await hold(client, event_id, "other", items=[("GA", 3)])


async def test_hold_released(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 2)], seats=["A-1"])
    url = f"/events/{event_id}/holds/{h['hold_id']}"
    assert (await client.delete(url)).status_code == 204
    async with unchanged(client, event_id):
        assert_problem(await client.post(f"{url}/confirm"), 409, "hold_released")
        r = await client.post(f"{url}/confirm", json={"payment_ref": "pi_1"})
        assert_problem(r, 409, "hold_released")
    assert (await client.get(url)).json()["status"] == "released"


async def test_hold_confirmed(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 2)], seats=["A-1"])
    url = f"/events/{event_id}/holds/{h['hold_id']}"
    assert (await client.post(f"{url}/confirm")).status_code == 200
    async with unchanged(client, event_id):
        assert_problem(await client.delete(url), 409, "hold_confirmed")
    assert (await client.get(url)).json()["status"] == "confirmed"


async def test_event_exists(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    await hold(client, event_id, items=[("GA", 1)], seats=["A-1"])
    again = event_body(
        event_id,
        name="Another",
        categories=[{"name": "GA", "price": 1, "currency": "USD", "capacity": 5}],
    )
    async with unchanged(client, event_id):
        r = await client.post("/admin/events", json=again, headers=ADMIN)
        assert_problem(r, 409, "event_exists")


async def test_capacity_below_committed(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    await hold(client, event_id, "a", items=[("GA", 5)])
    sold = await hold(client, event_id, "b", items=[("GA", 3)])
    r = await client.post(f"/events/{event_id}/holds/{sold['hold_id']}/confirm")
    assert r.status_code == 200, r.text
    # 5 held + 3 sold = 8 committed.
    async with unchanged(client, event_id):
        for capacity in [7, 0]:
            r = await client.patch(
                f"/admin/events/{event_id}",
                json={
                    "name": "Renamed",
                    "status": "paused",
                    "categories": [{"name": "GA", "capacity": capacity}],
                },
                headers=ADMIN,
            )
            assert_problem(r, 409, "capacity_below_committed")
    r = await client.patch(
        f"/admin/events/{event_id}",
        json={"categories": [{"name": "GA", "capacity": 8}]},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    assert (await availability(client, event_id))["GA"] == 0


# --- 410 hold_expired --------------------------------------------------------------------


async def test_hold_expired(client: httpx.AsyncClient, svc: Services) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 2)], seats=["A-1"])
    await expire_hold(svc, event_id, h["hold_id"])
    url = f"/events/{event_id}/holds/{h['hold_id']}"
    async with unchanged(client, event_id):
        assert_problem(await client.post(f"{url}/confirm"), 410, "hold_expired")
        r = await client.post(f"{url}/confirm", json={"payment_ref": "late"})
        assert_problem(r, 410, "hold_expired")
    assert (await client.get(url)).json()["status"] == "expired"
    assert await availability(client, event_id) == {"GA": 50, "VIP": 12}


async def test_hold_expired_before_anything_reclaimed_it(
    client: httpx.AsyncClient, svc: Services
) -> None:
    """Confirm is the first request after the deadline: still 410, and the stock is back."""
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 2)], seats=["A-1"])
    await expire_hold(svc, event_id, h["hold_id"])
    r = await client.post(f"/events/{event_id}/holds/{h['hold_id']}/confirm")
    assert_problem(r, 410, "hold_expired")
    assert await availability(client, event_id) == {"GA": 50, "VIP": 12}


# --- 413 payload_too_large ---------------------------------------------------------------


async def send_alone(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> httpx.Response:
    """One request on a connection of its own. The server may close a connection after a
    413 (it did not read the body): that must not fail the test's next request, which is
    what test_connection_after_payload_too_large checks on its own."""
    async with httpx.AsyncClient(base_url=client.base_url, timeout=30) as alone:
        return await alone.request(method, url, **kwargs)


async def test_payload_too_large(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 1)])
    hold_url = f"/events/{event_id}/holds/{h['hold_id']}"
    big_hold = {**ga(1), "note": BIG_STRING}
    async with unchanged(client, event_id):
        r = await send_alone(client, "POST", f"/events/{event_id}/holds", json=big_hold)
        assert_problem(r, 413, "payload_too_large")
        r = await send_alone(
            client, "POST", f"{hold_url}/confirm", json={"payment_ref": BIG_STRING}
        )
        assert_problem(r, 413, "payload_too_large")
        r = await send_alone(
            client, "PATCH", f"/admin/events/{event_id}", json={"name": BIG_STRING}, headers=ADMIN
        )
        assert_problem(r, 413, "payload_too_large")
    assert (await client.get(hold_url)).json()["status"] == "held"
    body = event_body(name=BIG_STRING)
    r = await send_alone(client, "POST", "/admin/events", json=body, headers=ADMIN)
    assert_problem(r, 413, "payload_too_large")
    await assert_no_event(client, body["id"])


async def chunked_hold(pause: float = 0.0) -> AsyncIterator[bytes]:
    """A hold body of about 74 KiB in chunks, with no Content-Length. With `pause`, the
    last 4 KiB come that long after the first 70, by when the server has refused it."""
    yield b'{"customer_id": "c", "items": [{"category": "GA", "quantity": 1}], "x": "'
    for i in range(74):
        if i == 70 and pause:
            await asyncio.sleep(pause)
        yield b"y" * 1024
    yield b'"}'


async def test_payload_too_large_without_content_length(client: httpx.AsyncClient) -> None:
    """A chunked body is limited too, not only one that announces its length."""
    event_id = await create_event(client)
    async with unchanged(client, event_id):
        r = await send_alone(
            client,
            "POST",
            f"/events/{event_id}/holds",
            content=chunked_hold(),
            headers=json_headers(),
        )
        assert_problem(r, 413, "payload_too_large")


async def test_a_body_in_several_parts_is_read_whole(client: httpx.AsyncClient) -> None:
    """Most bodies come in one ASGI message and are taken as they are (bodies.Request);
    one in several parts, with pauses between them, is read whole, each part once."""
    event_id = await create_event(client)

    async def in_parts() -> AsyncIterator[bytes]:
        for part in (
            b'{"customer_id": "parts", ',
            b'"items": [{"category": "GA", ',
            b'"quantity": 2}]}',
        ):
            yield part
            await asyncio.sleep(0.05)

    r = await send_alone(
        client, "POST", f"/events/{event_id}/holds", content=in_parts(), headers=json_headers()
    )
    assert r.status_code == 201, r.text
    assert r.json()["customer_id"] == "parts"
    assert r.json()["items"] == [{"category": "GA", "quantity": 2}]


async def test_payload_too_large_reaches_a_client_still_sending(
    client: httpx.AsyncClient,
) -> None:
    """The server answers 413 while the client is still sending its body. Closing then,
    with bytes unread, makes the kernel reset the connection, and the 413 is lost before
    the client reads it (it failed CI once). The server reads the rest first."""
    event_id = await create_event(client)
    async with unchanged(client, event_id):
        for _ in range(3):
            r = await send_alone(
                client,
                "POST",
                f"/events/{event_id}/holds",
                content=chunked_hold(pause=0.1),
                headers=json_headers(),
            )
            assert_problem(r, 413, "payload_too_large")


async def test_connection_after_payload_too_large(client: httpx.AsyncClient) -> None:
    """After a 413 on a keep-alive connection, the server either says `Connection: close`
    or keeps serving that connection; it must not drop it unannounced, or a client's
    next request on it fails with "Server disconnected without sending a response"."""
    event_id = await create_event(client)
    dropped = []
    for attempt in range(10):
        async with httpx.AsyncClient(base_url=client.base_url, timeout=30) as c:
            assert (await c.get("/health")).status_code == 200  # the connection is open
            r = await c.post(f"/events/{event_id}/holds", json={**ga(1), "note": BIG_STRING})
            assert_problem(r, 413, "payload_too_large")
            if r.headers.get("connection", "").lower() == "close":
                continue
            try:
                await c.get("/health")
            except httpx.TransportError as e:
                dropped.append(f"attempt {attempt}: {e!r}")
    assert not dropped, dropped


# --- 409 / 422 idempotency ---------------------------------------------------------------


async def test_idempotency_key_reused(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    key = {"idempotency-key": f"reuse-{uuid.uuid4()}"}
    r = await client.post(f"/events/{event_id}/holds", json=ga(1), headers=key)
    assert r.status_code == 201, r.text
    async with unchanged(client, event_id):
        r = await client.post(f"/events/{event_id}/holds", json=ga(2), headers=key)
        assert_problem(r, 422, "idempotency_key_reused")

    first, second = event_body(), event_body()
    key = {**ADMIN, "idempotency-key": f"reuse-{uuid.uuid4()}"}
    assert (await client.post("/admin/events", json=first, headers=key)).status_code == 201
    r = await client.post("/admin/events", json=second, headers=key)
    assert_problem(r, 422, "idempotency_key_reused")
    await assert_no_event(client, second["id"])


def _huge_event() -> dict[str, Any]:
    """50,000 seats: an event slow enough (about a second) to create that the repeats,
    fired every 50 ms, find it in progress."""
    rows = [f"R{i}" for i in range(5)]
    return event_body(
        categories=[
            {
                "name": "Stalls",
                "price": 1000,
                "currency": "EUR",
                "seat_blocks": [{"rows": rows, "seats_per_row": 10_000}],
            },
        ]
    )


async def test_idempotency_in_progress(client: httpx.AsyncClient) -> None:
    body = _huge_event()
    headers = {**ADMIN, "idempotency-key": f"slow-{uuid.uuid4()}"}

    def post() -> asyncio.Task[httpx.Response]:
        return asyncio.create_task(client.post("/admin/events", json=body, headers=headers))

    first = post()
    await asyncio.sleep(0.2)  # let the first one claim the key
    # Repeat while the first runs, until one repeat is refused. (Should a repeat have
    # claimed the key first, it runs the work and the first one is the refused one.)
    repeats: list[httpx.Response] = []
    while not first.done():
        repeats.append(await post())
        if repeats[-1].status_code != 201:
            break
        await asyncio.sleep(0.05)
    answers = [await first, *repeats]
    created = [r for r in answers if r.status_code == 201]
    conflicts = [r for r in answers if r.status_code != 201]
    assert conflicts, "no repeat arrived while the first request was running"
    for r in conflicts:
        assert_problem(r, 409, "idempotency_in_progress")
    assert created, [r.text for r in answers]
    # The work was done once; a repeat after it finished gets the first response.
    replay = await client.post("/admin/events", json=body, headers=headers)
    assert replay.status_code == 201, replay.text
    assert replay.json() == created[0].json()
    assert all(r.json() == created[0].json() for r in created)
    event = (await client.get(f"/events/{body['id']}")).json()
    assert event["categories"][0]["capacity"] == 50_000
    assert event["categories"][0]["available"] == 50_000


# --- 503 unavailable ---------------------------------------------------------------------


async def test_unavailable_when_redis_is_down(settings: Settings) -> None:
    redis = RedisServer(appendonly=True, appendfsync="always")
    await asyncio.to_thread(redis.start)
    server = ApiServer({**server_env(settings), "BOXOFFICE_REDIS_URL": redis.url}, workers=1)
    try:
        await asyncio.to_thread(server.start)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            event_id = await create_event(c)
            h = await hold(c, event_id, items=[("GA", 2)], seats=["A-1"])
            before = await snapshot(c, event_id)

            await asyncio.to_thread(redis.kill)
            r = await c.post(f"/events/{event_id}/holds", json=ga(1))
            assert_problem(r, 503, "unavailable")
            r = await c.post(f"/events/{event_id}/holds/{h['hold_id']}/confirm")
            assert_problem(r, 503, "unavailable")
            assert_problem(await c.get(f"/events/{event_id}"), 503, "unavailable")

            # Nothing was changed: the same state once Redis is back (its AOF replayed).
            await asyncio.to_thread(redis.start)
            assert await snapshot(c, event_id) == before
            r = await c.get(f"/events/{event_id}/holds/{h['hold_id']}")
            assert r.json()["status"] == "held"
    finally:
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(redis.close)


async def test_unavailable_when_the_database_is_missing(settings: Settings) -> None:
    """A PostgreSQL that answers but has no such database (or refuses the role) is a server
    that cannot take the request now, not a bug: 503, like one that is down."""
    server = ApiServer(missing_database_env(settings), workers=1)
    try:
        await asyncio.to_thread(server.start)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            body = event_body()
            r = await c.post("/admin/events", json=body, headers=ADMIN)
            assert_problem(r, 503, "unavailable")
            assert (await c.get("/ready")).status_code == 503
            assert_problem(await c.get("/events"), 503, "unavailable")
    finally:
        await asyncio.to_thread(server.stop)
