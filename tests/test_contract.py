"""The shape of the API as API.md promises it: the OpenAPI document, the operations
endpoints, the bodies of events, holds, bookings and seats, and how seats are assigned."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN, create_event, event_body
from tests.test_errors import hold

# Every answer of the lean lane's routes agrees with the OpenAPI document.
pytestmark = pytest.mark.openapi_checked

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
URL_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{22,}$")

EVENT_FIELDS = {
    "id",
    "name",
    "starts_at",
    "status",
    "on_sale_at",
    "hold_ttl_seconds",
    "max_per_order",
    "max_per_customer",
    "archived",
    "categories",
}
CATEGORY_FIELDS = {"name", "price", "currency", "seated", "capacity", "available"}
SUMMARY_FIELDS = {"id", "name", "starts_at", "status"}
HOLD_FIELDS = {
    "hold_id",
    "event_id",
    "customer_id",
    "status",
    "created_at",
    "expires_at",
    "items",
    "seats",
    "total",
    "currency",
}
BOOKING_FIELDS = {
    "booking_id",
    "hold_id",
    "event_id",
    "customer_id",
    "status",
    "items",
    "seats",
    "total",
    "currency",
    "payment_ref",
    "confirmed_at",
}
SEAT_FIELDS = {"label", "category", "status", "row", "number"}

VIP_SEATS = [f"{row}-{n}" for row in "AB" for n in range(1, 6)] + ["BOX-1", "BOX-2"]


def rfc3339(value: Any) -> datetime:
    assert isinstance(value, str) and RFC3339_UTC.match(value), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- the OpenAPI document -------------------------------------------------------------------


@dataclass
class Route:
    success: str
    body: set[str] | None = None  # the request body's fields, when it has one
    errors: dict[int, list[str]] = field(default_factory=dict)  # status -> codes


# What API.md promises today (not the admin bookings list, cancellation, reconcile).
# Every route that reads Redis or PostgreSQL may answer 503 `unavailable`; every
# state-changing one may answer 400 (a bad Idempotency-Key at least).
UNAVAILABLE = {503: ["unavailable"]}
ROUTES: dict[tuple[str, str], Route] = {
    ("get", "/events"): Route("200", errors={**UNAVAILABLE}),
    ("get", "/events/{event_id}"): Route("200", errors={404: ["event_not_found"], **UNAVAILABLE}),
    ("get", "/events/{event_id}/seats"): Route(
        "200", errors={400: ["validation_error"], 404: ["event_not_found"], **UNAVAILABLE}
    ),
    ("post", "/events/{event_id}/holds"): Route(
        "201",
        body={"customer_id", "items", "seats"},
        errors={
            400: ["validation_error", "unknown_category", "unknown_seat"],
            403: ["admission_required"],
            404: ["event_not_found"],
            409: ["not_on_sale", "sold_out", "seats_unavailable", "customer_limit"],
            413: ["payload_too_large"],
            422: ["idempotency_key_reused"],
            **UNAVAILABLE,
        },
    ),
    ("get", "/events/{event_id}/holds/{hold_id}"): Route(
        "200", errors={404: ["event_not_found", "hold_not_found"], **UNAVAILABLE}
    ),
    ("post", "/events/{event_id}/holds/{hold_id}/confirm"): Route(
        "200",
        body={"payment_ref"},
        errors={
            400: ["validation_error"],
            404: ["event_not_found", "hold_not_found"],
            409: ["hold_released"],
            410: ["hold_expired"],
            413: ["payload_too_large"],
            422: ["idempotency_key_reused"],
            **UNAVAILABLE,
        },
    ),
    ("delete", "/events/{event_id}/holds/{hold_id}"): Route(
        "204",
        errors={
            400: ["validation_error"],
            404: ["event_not_found", "hold_not_found"],
            409: ["hold_confirmed"],
            422: ["idempotency_key_reused"],
            **UNAVAILABLE,
        },
    ),
    ("get", "/events/{event_id}/bookings/{booking_id}"): Route(
        "200", errors={404: ["event_not_found", "booking_not_found"], **UNAVAILABLE}
    ),
    ("post", "/admin/events"): Route(
        "201",
        body={
            "id",
            "name",
            "starts_at",
            "on_sale_at",
            "hold_ttl_seconds",
            "max_per_order",
            "max_per_customer",
            "categories",
            "waiting_room",
        },
        errors={
            400: ["validation_error"],
            401: ["unauthorized"],
            409: ["event_exists", "idempotency_in_progress"],
            413: ["payload_too_large"],
            422: ["idempotency_key_reused"],
            **UNAVAILABLE,
        },
    ),
    ("patch", "/admin/events/{event_id}"): Route(
        "200",
        body={"status", "on_sale_at", "name", "categories", "waiting_room"},
        errors={
            400: ["validation_error"],
            401: ["unauthorized"],
            404: ["event_not_found"],
            409: ["capacity_below_committed", "idempotency_in_progress"],
            413: ["payload_too_large"],
            422: ["idempotency_key_reused"],
            **UNAVAILABLE,
        },
    ),
    ("post", "/events/{event_id}/queue"): Route(
        "201",
        body={"customer_id"},
        errors={
            400: ["validation_error"],
            404: ["event_not_found"],
            409: ["no_waiting_room", "queue_not_open", "not_on_sale"],
            413: ["payload_too_large"],
            422: ["idempotency_key_reused"],
            **UNAVAILABLE,
        },
    ),
    ("get", "/events/{event_id}/queue/{ticket}"): Route(
        "200", errors={404: ["event_not_found", "ticket_not_found"], **UNAVAILABLE}
    ),
    ("delete", "/events/{event_id}/queue/{ticket}"): Route(
        "204",
        errors={
            400: ["validation_error"],
            404: ["event_not_found", "ticket_not_found"],
            422: ["idempotency_key_reused"],
            **UNAVAILABLE,
        },
    ),
    ("get", "/admin/events/{event_id}/queue"): Route(
        "200", errors={401: ["unauthorized"], 404: ["event_not_found"], **UNAVAILABLE}
    ),
    ("get", "/health"): Route("200"),
    ("get", "/ready"): Route("200"),
    ("get", "/metrics"): Route("200"),
}


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a $ref, and pick the object out of an `X | null` union."""
    for union in ("oneOf", "anyOf"):
        if union in schema:
            members = [m for m in schema[union] if m.get("type") != "null"]
            assert len(members) == 1, schema
            return resolve(doc, members[0])
    if "$ref" in schema:
        prefix = "#/components/schemas/"
        assert schema["$ref"].startswith(prefix), schema
        resolved: dict[str, Any] = doc["components"]["schemas"][schema["$ref"][len(prefix) :]]
        return resolve(doc, resolved)
    return schema


@pytest.fixture
async def openapi(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def test_openapi_is_3_1(openapi: dict[str, Any]) -> None:
    assert openapi["openapi"].startswith("3.1."), openapi["openapi"]
    assert openapi["info"]["title"]


@pytest.mark.parametrize(("method", "path"), ROUTES.keys(), ids=[f"{m} {p}" for m, p in ROUTES])
async def test_openapi_documents_route(openapi: dict[str, Any], method: str, path: str) -> None:
    route = ROUTES[(method, path)]
    assert path in openapi["paths"], sorted(openapi["paths"])
    op = openapi["paths"][path].get(method)
    assert op is not None, f"{method.upper()} {path} is not documented"

    # Path parameters.
    names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
    assert names == set(re.findall(r"{(\w+)}", path)), op.get("parameters")

    # Request body.
    if route.body is None:
        assert "requestBody" not in op, op["requestBody"]
    else:
        content = op["requestBody"]["content"]
        assert "application/json" in content, content
        schema = resolve(openapi, content["application/json"]["schema"])
        assert set(schema["properties"]) == route.body, schema

    # Success response with its body.
    responses = op["responses"]
    assert route.success in responses, sorted(responses)
    if route.success != "204":
        ok = responses[route.success]["content"]
        media = next(iter(ok))
        assert media.startswith(("application/json", "text/plain")), ok
        assert ok[media].get("schema"), ok

    # Every error of the route, as problem details, with its codes.
    for status, codes in route.errors.items():
        assert str(status) in responses, f"{status} missing: {sorted(responses)}"
        response = responses[str(status)]
        content = response.get("content", {})
        assert "application/problem+json" in content, (status, content)
        problem = resolve(openapi, content["application/problem+json"]["schema"])
        assert {"status", "title", "detail", "code"} <= set(problem["required"]), problem
        assert {"status", "title", "detail", "code"} <= set(problem["properties"]), problem
        text = json.dumps(response)
        missing = [code for code in codes if code not in text]
        assert not missing, f"{method.upper()} {path} {status} does not name {missing}"


async def test_openapi_problem_shape_has_extra_fields(openapi: dict[str, Any]) -> None:
    """The extras of sold_out, seats_unavailable and customer_limit are documented."""
    hold_409 = openapi["paths"]["/events/{event_id}/holds"]["post"]["responses"]["409"]
    problem = resolve(openapi, hold_409["content"]["application/problem+json"]["schema"])
    assert {"available", "seats", "remaining"} <= set(problem["properties"]), problem


async def test_openapi_confirm_body_is_optional(openapi: dict[str, Any]) -> None:
    """API.md: the confirm body is optional, and a confirm without one works."""
    op = openapi["paths"]["/events/{event_id}/holds/{hold_id}/confirm"]["post"]
    assert op["requestBody"].get("required") is not True, op["requestBody"]


async def test_openapi_seats_filters(openapi: dict[str, Any]) -> None:
    op = openapi["paths"]["/events/{event_id}/seats"]["get"]
    query = {p["name"]: p for p in op["parameters"] if p["in"] == "query"}
    assert set(query) == {"category", "status", "limit", "cursor"}, query
    assert {"available", "held", "sold"} <= set(query["status"]["schema"]["enum"])


@pytest.mark.parametrize(("path", "ui"), [("/schema", "Redoc"), ("/schema/swagger", "SwaggerUI")])
async def test_schema_uis(client: httpx.AsyncClient, path: str, ui: str) -> None:
    r = await client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower()
    assert ui in r.text
    assert "/events/{event_id}/holds" in r.text or "openapi.json" in r.text  # the API's own


# --- operations -----------------------------------------------------------------------------


async def test_health(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_ready(client: httpx.AsyncClient) -> None:
    r = await client.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ready"


async def test_metrics(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    await hold(client, event_id, items=[("GA", 2)], seats=["A-1"])
    # Each server process adds its request figures to /metrics once a second (docs/operations.md).
    for _ in range(30):
        r = await client.get("/metrics")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain")
        samples = [s for f in text_string_to_metric_families(r.text) for s in f.samples]
        requests = [
            s
            for s in samples
            if s.name == "boxoffice_requests_total"
            and s.labels.get("path") == "/events/{event_id}/holds"
            and s.labels.get("method") == "POST"
            and s.labels.get("status_code") == "201"
        ]
        if requests:
            break
        await asyncio.sleep(0.2)
    assert requests and requests[0].value >= 1, [s for s in samples if "requests" in s.name]
    # One series per route template, never one per event.
    assert not [s for s in samples if event_id in s.labels.get("path", "")]
    assert any(
        s.name == "boxoffice_request_duration_seconds_count"
        and s.labels.get("path") == "/events/{event_id}/holds"
        for s in samples
    )

    available = {
        s.labels["category"]: s.value
        for s in samples
        if s.name == "boxoffice_tickets_available" and s.labels.get("event") == event_id
    }
    assert available == {"GA": 48, "VIP": 11}


# --- events ---------------------------------------------------------------------------------


async def test_event_body(client: httpx.AsyncClient) -> None:
    body = event_body(on_sale_at="2020-01-01T00:00:00Z", max_per_customer=4)
    created = await client.post("/admin/events", json=body, headers=ADMIN)
    assert created.status_code == 201, created.text
    r = await client.get(f"/events/{body['id']}")
    assert r.status_code == 200, r.text
    event = r.json()
    assert created.json() == event  # the event as GET shows it
    assert set(event) == EVENT_FIELDS
    assert event["id"] == body["id"]
    assert event["status"] == "on_sale"
    assert event["archived"] is False
    assert rfc3339(event["starts_at"]) == rfc3339("2030-12-01T19:00:00Z")
    assert rfc3339(event["on_sale_at"]) == rfc3339("2020-01-01T00:00:00Z")
    assert (event["hold_ttl_seconds"], event["max_per_order"], event["max_per_customer"]) == (
        300,
        10,
        4,
    )
    assert [set(c) for c in event["categories"]] == [CATEGORY_FIELDS] * 2
    assert event["categories"] == [
        {
            "name": "GA",
            "price": 2500,
            "currency": "EUR",
            "seated": False,
            "capacity": 50,
            "available": 50,
        },
        {
            "name": "VIP",
            "price": 9900,
            "currency": "EUR",
            "seated": True,
            "capacity": 12,
            "available": 12,
        },
    ]


async def test_event_defaults(client: httpx.AsyncClient) -> None:
    body = {
        "id": f"ev-{uuid.uuid4().hex[:12]}",
        "name": "Defaults",
        "starts_at": "2030-12-01T20:00:00+01:00",
        "categories": [{"name": "GA", "price": 100, "currency": "USD", "capacity": 5}],
    }
    r = await client.post("/admin/events", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    event = r.json()
    assert event["starts_at"] == "2030-12-01T19:00:00Z"  # UTC, with a Z
    assert event["on_sale_at"] is None
    assert event["hold_ttl_seconds"] == 300
    assert event["max_per_order"] == 10
    assert event["max_per_customer"] is None


async def test_events_list(client: httpx.AsyncClient) -> None:
    on_sale = await create_event(client)
    scheduled = await create_event(client, on_sale_at="2099-01-01T00:00:00Z")
    paused = await create_event(client)
    closed = await create_event(client)
    for event_id, status in [(paused, "paused"), (closed, "closed")]:
        r = await client.patch(f"/admin/events/{event_id}", json={"status": status}, headers=ADMIN)
        assert r.status_code == 200, r.text
    r = await client.get("/events")
    assert r.status_code == 200, r.text
    listed = {e["id"]: e for e in r.json()["events"]}
    assert {k: listed[k]["status"] for k in [on_sale, scheduled, paused, closed]} == {
        on_sale: "on_sale",
        scheduled: "scheduled",
        paused: "paused",
        closed: "closed",
    }
    assert set(listed[on_sale]) == SUMMARY_FIELDS
    assert listed[on_sale]["name"] == "Test drop"
    assert listed[on_sale]["starts_at"] == "2030-12-01T19:00:00Z"
    r = await client.get(f"/events/{scheduled}")
    assert r.json()["status"] == "scheduled"


# --- holds and bookings ---------------------------------------------------------------------


async def test_hold_body(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client, hold_ttl_seconds=120)
    r = await client.post(
        f"/events/{event_id}/holds",
        json={"customer_id": "abc-corp", "items": [{"category": "GA", "quantity": 2}]},
    )
    assert r.status_code == 201, r.text
    h = r.json()
    assert URL_SAFE_TOKEN.match(h["hold_id"]), h["hold_id"]
    assert (h["event_id"], h["customer_id"], h["status"]) == (event_id, "abc-corp", "held")
    assert h["items"] == [{"category": "GA", "quantity": 2}]
    assert h["seats"] == []
    assert (h["total"], h["currency"]) == (5000, "EUR")
    created, expires = rfc3339(h["created_at"]), rfc3339(h["expires_at"])
    assert (expires - created).total_seconds() == 120
    got = await client.get(f"/events/{event_id}/holds/{h['hold_id']}")
    assert got.status_code == 200, got.text
    assert got.json() == h


async def test_hold_ids_differ(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    ids = {(await hold(client, event_id, items=[("GA", 1)]))["hold_id"] for _ in range(5)}
    assert len(ids) == 5


async def test_hold_fields_are_those_of_the_contract(client: httpx.AsyncClient) -> None:
    """A live hold has exactly the fields of API.md; a confirmed one adds `booking_id`."""
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 1)])
    url = f"/events/{event_id}/holds/{h['hold_id']}"
    live = (await client.get(url)).json()
    assert (await client.post(f"{url}/confirm")).status_code == 200
    confirmed = (await client.get(url)).json()
    assert (set(h), set(live), set(confirmed)) == (
        HOLD_FIELDS,
        HOLD_FIELDS,
        HOLD_FIELDS | {"booking_id"},
    ), (h, confirmed)


async def test_booking_body(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, "buyer", items=[("GA", 1)], seats=["BOX-2"])
    r = await client.post(
        f"/events/{event_id}/holds/{h['hold_id']}/confirm", json={"payment_ref": "pi_123"}
    )
    assert r.status_code == 200, r.text
    b = r.json()
    booking_id = uuid.UUID(b["booking_id"])
    assert str(booking_id) == b["booking_id"]  # the canonical form
    assert booking_id.version == 7 and booking_id.variant == uuid.RFC_4122
    assert (b["hold_id"], b["event_id"], b["customer_id"]) == (h["hold_id"], event_id, "buyer")
    assert b["status"] == "confirmed"
    assert (b["items"], b["seats"]) == (h["items"], h["seats"])
    assert (b["total"], b["currency"], b["payment_ref"]) == (2500 + 9900, "EUR", "pi_123")
    assert rfc3339(b["confirmed_at"]) >= rfc3339(h["created_at"])

    got = await client.get(f"/events/{event_id}/bookings/{b['booking_id']}")
    assert got.status_code == 200, got.text
    g = got.json()
    assert isinstance(g["persisted"], bool)
    assert {k: v for k, v in g.items() if k != "persisted"} == {
        k: v for k, v in b.items() if k != "persisted"
    }
    hold_now = (await client.get(f"/events/{event_id}/holds/{h['hold_id']}")).json()
    assert (hold_now["status"], hold_now["booking_id"]) == ("confirmed", b["booking_id"])

    # Without a payment reference, it is null.
    h2 = await hold(client, event_id, items=[("GA", 1)])
    b2 = (await client.post(f"/events/{event_id}/holds/{h2['hold_id']}/confirm")).json()
    assert b2["payment_ref"] is None
    assert b2["booking_id"] > b["booking_id"]  # time-ordered


async def test_booking_fields_are_those_of_the_contract(client: httpx.AsyncClient) -> None:
    """The confirm answer is the Booking of API.md; GET adds `persisted`."""
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 1)])
    confirmed = (await client.post(f"/events/{event_id}/holds/{h['hold_id']}/confirm")).json()
    got = (await client.get(f"/events/{event_id}/bookings/{confirmed['booking_id']}")).json()
    assert (set(confirmed), set(got)) == (BOOKING_FIELDS, BOOKING_FIELDS | {"persisted"}), (
        confirmed,
        got,
    )


async def test_hold_total_and_seats(client: httpx.AsyncClient) -> None:
    """3 x GA (2500) + 2 best-available VIP + 2 named VIP (9900): named seats first, then
    the picks, which are the first free seats in seat order (skipping the named ones)."""
    event_id = await create_event(client)
    r = await client.post(
        f"/events/{event_id}/holds",
        json={
            "customer_id": "abc-corp",
            "items": [{"category": "GA", "quantity": 3}, {"category": "VIP", "quantity": 2}],
            "seats": ["A-2", "B-2"],
        },
    )
    assert r.status_code == 201, r.text
    h = r.json()
    assert h["items"] == [{"category": "GA", "quantity": 3}, {"category": "VIP", "quantity": 2}]
    assert h["seats"] == ["A-2", "B-2", "A-1", "A-3"]
    assert h["total"] == 3 * 2500 + 4 * 9900
    assert h["currency"] == "EUR"
    event = (await client.get(f"/events/{event_id}")).json()
    assert {c["name"]: c["available"] for c in event["categories"]} == {"GA": 47, "VIP": 8}


async def test_best_available_follows_seat_order(client: httpx.AsyncClient) -> None:
    """Seat order: the seat blocks row by row, then the explicit seats."""
    event_id = await create_event(client)
    await hold(client, event_id, "first", seats=["A-1", "A-3"])
    picks = []
    for n in [3, 3, 4]:
        h = await hold(client, event_id, items=[("VIP", n)])
        picks.append(h["seats"])
    assert picks == [["A-2", "A-4", "A-5"], ["B-1", "B-2", "B-3"], ["B-4", "B-5", "BOX-1", "BOX-2"]]


async def test_currency_of_the_event(client: httpx.AsyncClient) -> None:
    event_id = await create_event(
        client,
        categories=[
            {"name": "Floor", "price": 1234, "currency": "USD", "capacity": 10},
            {"name": "Box", "price": 5000, "currency": "USD", "seats": ["X-1", "X-2"]},
        ],
    )
    r = await client.post(
        f"/events/{event_id}/holds",
        json={
            "customer_id": "c",
            "items": [{"category": "Floor", "quantity": 2}],
            "seats": ["X-2"],
        },
    )
    assert r.status_code == 201, r.text
    assert (r.json()["total"], r.json()["currency"]) == (2 * 1234 + 5000, "USD")


async def test_seats_and_filters(client: httpx.AsyncClient) -> None:
    event_id = await create_event(
        client,
        categories=[
            {"name": "GA", "price": 2500, "currency": "EUR", "capacity": 50},
            {
                "name": "VIP",
                "price": 9900,
                "currency": "EUR",
                "seat_blocks": [{"rows": ["A", "B"], "seats_per_row": 5}],
                "seats": ["BOX-1", "BOX-2"],
            },
            {
                "name": "Balcony",
                "price": 1500,
                "currency": "EUR",
                "seat_blocks": [{"rows": ["Z"], "seats_per_row": 3}],
            },
        ],
    )
    balcony = ["Z-1", "Z-2", "Z-3"]

    async def seats(query: str = "") -> list[dict[str, Any]]:
        r = await client.get(f"/events/{event_id}/seats{query}")
        assert r.status_code == 200, r.text
        result: list[dict[str, Any]] = r.json()["seats"]
        return result

    everything = await seats()
    assert [s["label"] for s in everything] == VIP_SEATS + balcony
    assert all(set(s) == SEAT_FIELDS for s in everything)
    assert {s["label"]: s["category"] for s in everything} == {
        **dict.fromkeys(VIP_SEATS, "VIP"),
        **dict.fromkeys(balcony, "Balcony"),
    }
    assert {s["status"] for s in everything} == {"available"}

    sold = await hold(client, event_id, "s", seats=["Z-2", "B-1"])
    r = await client.post(f"/events/{event_id}/holds/{sold['hold_id']}/confirm")
    assert r.status_code == 200, r.text
    await hold(client, event_id, "h", items=[("VIP", 2)], seats=["BOX-1"])

    def labels(rows: list[dict[str, Any]]) -> list[str]:
        return [s["label"] for s in rows]

    assert labels(await seats("?category=Balcony")) == balcony
    assert labels(await seats("?category=VIP")) == VIP_SEATS
    assert await seats("?category=GA") == []
    r = await client.get(f"/events/{event_id}/seats?category=Nothing")
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "unknown_category"
    assert labels(await seats("?status=held")) == ["A-1", "A-2", "BOX-1"]
    assert labels(await seats("?status=sold")) == ["B-1", "Z-2"]
    assert labels(await seats("?status=available")) == [
        s for s in VIP_SEATS + balcony if s not in {"A-1", "A-2", "BOX-1", "B-1", "Z-2"}
    ]
    assert await seats("?category=Balcony&status=sold") == [
        {"label": "Z-2", "category": "Balcony", "status": "sold", "row": "Z", "number": 2}
    ]
    assert await seats("?category=Balcony&status=held") == []
    assert {s["label"]: s["status"] for s in await seats()} == {
        **{s: "available" for s in VIP_SEATS + balcony},
        "A-1": "held",
        "A-2": "held",
        "BOX-1": "held",
        "B-1": "sold",
        "Z-2": "sold",
    }


async def test_release_frees_seats_and_stock(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 4), ("VIP", 1)], seats=["BOX-1"])
    r = await client.delete(f"/events/{event_id}/holds/{h['hold_id']}")
    assert r.status_code == 204
    assert r.content == b""
    r = await client.get(f"/events/{event_id}/seats?status=available")
    assert [s["label"] for s in r.json()["seats"]] == VIP_SEATS
    h2 = await hold(client, event_id, items=[("VIP", 1)], seats=["BOX-1"])
    assert h2["seats"] == ["BOX-1", "A-1"]
    assert (await client.get(f"/events/{event_id}/holds/{h['hold_id']}")).json()["status"] == (
        "released"
    )
    got = await client.get(f"/events/{event_id}")
    assert {c["name"]: c["available"] for c in got.json()["categories"]} == {"GA": 50, "VIP": 10}


async def test_the_largest_order_total_is_exact(client: httpx.AsyncClient) -> None:
    """The dearest ticket times the largest order: the total survives Lua's JSON intact."""
    price = 10**9
    event_id = await create_event(
        client,
        max_per_order=100,
        categories=[{"name": "GA", "price": price, "currency": "EUR", "capacity": 200}],
    )
    r = await client.post(
        f"/events/{event_id}/holds",
        json={"customer_id": "rich", "items": [{"category": "GA", "quantity": 100}]},
    )
    assert r.status_code == 201, r.text
    assert r.json()["total"] == 100 * price
    r = await client.post(f"/events/{event_id}/holds/{r.json()['hold_id']}/confirm")
    assert r.json()["total"] == 100 * price
    too_dear = event_body(
        categories=[{"name": "GA", "price": price + 1, "currency": "EUR", "capacity": 1}]
    )
    r = await client.post("/admin/events", json=too_dear, headers=ADMIN)
    assert r.status_code == 400
    assert r.json()["code"] == "validation_error"
