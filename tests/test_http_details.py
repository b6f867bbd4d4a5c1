"""The HTTP details API.md states in its Conventions, Operations and Error codes: headers
(`WWW-Authenticate`, `Location`, `Retry-After`), 413 and 415 whatever the route, bodies
compared as JSON values, `event_not_found` first, problem+json under /schema, the OpenAPI
document's headers and security, error texts that help, ISO 4217 currencies, and /metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.core import errors
from service.core.keys import event_keys, global_idempotency
from service.core.settings import Settings
from service.hotpath.context import Services
from service.selling import idempotency
from tests.apiserver import ApiServer
from tests.conftest import (
    ADMIN,
    availability,
    create_event,
    event_body,
    expire_hold,
    missing_database_env,
    server_env,
)
from tests.servers import RedisServer
from tests.test_errors import (
    BIG_STRING,
    assert_problem,
    chunked_hold,
    ga,
    hold,
    json_headers,
    send_alone,
    unchanged,
)

# Every answer of the lean lane's routes agrees with the OpenAPI document.
pytestmark = pytest.mark.openapi_checked

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")

# --- headers ------------------------------------------------------------------------------


async def test_unauthorized_names_the_bearer_scheme(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = await client.post("/admin/events", json=event_body(), headers=headers)
        assert_problem(r, 401, "unauthorized")
        assert r.headers.get("www-authenticate") == "Bearer", r.headers


async def test_created_hold_has_location(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    key = {"idempotency-key": f"loc-{uuid.uuid4()}"}
    first = await client.post(f"/events/{event_id}/holds", json=ga(1), headers=key)
    assert first.status_code == 201, first.text
    location = f"/events/{event_id}/holds/{first.json()['hold_id']}"
    assert first.headers.get("location") == location
    assert (await client.get(location)).json() == first.json()
    # The replay of a 201 is the same answer, Location included.
    again = await client.post(f"/events/{event_id}/holds", json=ga(1), headers=key)
    assert again.status_code == 201, again.text
    assert again.headers.get("location") == location


async def test_created_event_has_location(client: httpx.AsyncClient) -> None:
    body = event_body()
    headers = {**ADMIN, "idempotency-key": f"loc-{uuid.uuid4()}"}
    for _ in range(2):  # the first answer, then its replay
        r = await client.post("/admin/events", json=body, headers=headers)
        assert r.status_code == 201, r.text
        assert r.headers.get("location") == f"/events/{body['id']}"
    r = await client.post("/admin/events", json=body, headers=ADMIN)
    assert_problem(r, 409, "event_exists")
    assert "location" not in r.headers


async def test_idempotency_in_progress_says_when_to_retry(
    client: httpx.AsyncClient, svc: Services
) -> None:
    """The key claimed as a first request still running leaves it: the repeat is told to
    come back later, and when."""
    body = event_body()
    raw = json.dumps(body).encode()
    key = f"busy-{uuid.uuid4()}"
    idem = idempotency.fingerprint(key, "POST", "/admin/events", raw)
    claim = msgspec.json.encode({"fingerprint": idem.fingerprint})
    await svc.redis.set(global_idempotency(idem.key_digest), claim, ex=60)
    r = await client.post(
        "/admin/events", content=raw, headers={**ADMIN, **json_headers(), "idempotency-key": key}
    )
    assert_problem(r, 409, "idempotency_in_progress")
    assert int(r.headers["retry-after"]) >= 1, r.headers
    assert_problem(await client.get(f"/events/{body['id']}"), 404, "event_not_found")


def test_rate_limited_says_when_to_retry() -> None:
    """No route limits rates yet (README); when one does, its 429 carries Retry-After."""
    assert int((errors.RateLimited().headers or {})["retry-after"]) >= 1


# --- 503 and /metrics while a server is away ---------------------------------------------


def metric_samples(text: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


async def test_redis_away_503_says_redis_and_metrics_still_answer(settings: Settings) -> None:
    redis = RedisServer()
    await asyncio.to_thread(redis.start)
    server = ApiServer({**server_env(settings), "BOXOFFICE_REDIS_URL": redis.url}, workers=1)
    try:
        await asyncio.to_thread(server.start)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            event_id = await create_event(c)
            await asyncio.to_thread(redis.kill)
            for _ in range(3):
                r = await c.get(f"/events/{event_id}")
                body = assert_problem(r, 503, "unavailable")
                assert "Redis" in body["detail"] and "PostgreSQL" not in body["detail"], body
                assert int(r.headers["retry-after"]) >= 1, r.headers
            # The process's own figures, the outage's 503s among them, within a flush.
            for _ in range(30):
                r = await c.get("/metrics")
                assert r.status_code == 200, r.text
                samples = metric_samples(r.text)
                failed = [
                    s
                    for s in samples
                    if s.name == "boxoffice_requests_total"
                    and s.labels["path"] == "/events/{event_id}"
                    and s.labels["status_code"] == "503"
                ]
                # Counted as they were flushed: once a second, maybe between the three.
                if failed and failed[0].value == 3:
                    break
                await asyncio.sleep(0.2)
            assert failed and failed[0].value == 3, failed
            up = [s.value for s in samples if s.name == "boxoffice_live_figures_up"]
            assert up == [0], up
            assert not [s for s in samples if s.name == "boxoffice_tickets_available"]
    finally:
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(redis.close)


async def test_postgresql_away_503_says_postgresql(settings: Settings) -> None:
    server = ApiServer(missing_database_env(settings), workers=1)
    try:
        await asyncio.to_thread(server.start)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            for r in (
                await c.get("/events"),
                await c.post("/admin/events", json=event_body(), headers=ADMIN),
            ):
                body = assert_problem(r, 503, "unavailable")
                assert "PostgreSQL" in body["detail"] and "Redis" not in body["detail"], body
                assert int(r.headers["retry-after"]) >= 1, r.headers
            assert (await c.get("/metrics")).status_code == 200
    finally:
        await asyncio.to_thread(server.stop)


async def test_metrics_count_unmatched_routes_statuses_and_refusals(
    client: httpx.AsyncClient,
) -> None:
    event_id = await create_event(
        client, categories=[{"name": "GA", "price": 2500, "currency": "EUR", "capacity": 1}]
    )
    await hold(client, event_id, items=[("GA", 1)])
    made_up = f"/made-up-{uuid.uuid4().hex}"
    assert_problem(await client.get(made_up), 404, "not_found")
    assert_problem(await client.put("/events"), 405, "method_not_allowed")
    assert_problem(await client.post(f"/events/{event_id}/holds", json=ga(1)), 409, "sold_out")

    def value(samples: list[Any], name: str, **labels: str) -> float:
        return sum(
            float(s.value)
            for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    for _ in range(30):
        samples = metric_samples((await client.get("/metrics")).text)
        if value(samples, "boxoffice_refusals_total", code="sold_out") >= 1 and value(
            samples, "boxoffice_requests_total", path="/events", method="PUT", status_code="405"
        ):
            break
        await asyncio.sleep(0.2)
    requests = "boxoffice_requests_total"
    assert value(samples, requests, path="<unmatched>", status_code="404") >= 1
    # A 405's path exists: it is counted under its route's template.
    assert value(samples, requests, path="/events", method="PUT", status_code="405") >= 1
    assert not [s for s in samples if made_up in s.labels.get("path", "")]
    assert value(samples, "boxoffice_refusals_total", code="not_found") >= 1
    assert value(samples, "boxoffice_refusals_total", code="method_not_allowed") >= 1
    assert value(samples, "boxoffice_refusals_total", code="sold_out") >= 1
    latency = "boxoffice_request_duration_seconds_count"
    hold_path = "/events/{event_id}/holds"
    assert value(samples, latency, path=hold_path, status_code="409") >= 1
    assert value(samples, latency, path=hold_path, status_code="201") >= 1


# --- 413 and 415, whatever the route -----------------------------------------------------


async def test_payload_too_large_on_get_and_delete(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 1)])
    hold_url = f"/events/{event_id}/holds/{h['hold_id']}"
    big = BIG_STRING.encode()
    async with unchanged(client, event_id):
        for method, url in [
            ("GET", f"/events/{event_id}"),
            ("GET", hold_url),
            ("DELETE", hold_url),
            ("GET", "/health"),
        ]:
            r = await send_alone(client, method, url, content=big, headers=json_headers())
            assert_problem(r, 413, "payload_too_large")
        # Chunked, no Content-Length, still being sent when the server refuses it.
        r = await send_alone(
            client, "DELETE", hold_url, content=chunked_hold(pause=0.1), headers=json_headers()
        )
        assert_problem(r, 413, "payload_too_large")
    assert (await client.get(hold_url)).json()["status"] == "held"


async def test_a_small_body_on_delete_is_fine(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 1)])
    hold_url = f"/events/{event_id}/holds/{h['hold_id']}"
    r = await client.request("DELETE", hold_url, content=b"{}", headers=json_headers())
    assert r.status_code == 204, r.text
    assert (await client.get(hold_url)).json()["status"] == "released"


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/xml", "multipart/form-data"],
)
async def test_unsupported_media_type(client: httpx.AsyncClient, content_type: str) -> None:
    event_id = await create_event(client)
    h = await hold(client, event_id, items=[("GA", 1)])
    hold_url = f"/events/{event_id}/holds/{h['hold_id']}"
    headers = {"content-type": content_type}
    async with unchanged(client, event_id):
        for method, url, body in [
            ("POST", f"/events/{event_id}/holds", json.dumps(ga(1))),
            ("POST", f"{hold_url}/confirm", '{"payment_ref": "p"}'),
            ("DELETE", hold_url, "{}"),
        ]:
            r = await client.request(method, url, content=body, headers=headers)
            problem = assert_problem(r, 415, "unsupported_media_type")
            assert "application/json" in problem["detail"], problem
        r = await client.patch(
            f"/admin/events/{event_id}",
            content=b'{"status": "closed"}',
            headers={**ADMIN, **headers},
        )
        assert_problem(r, 415, "unsupported_media_type")
    assert (await client.get(hold_url)).json()["status"] == "held"


async def test_json_media_types_and_a_body_without_one(client: httpx.AsyncClient) -> None:
    """`application/json` with parameters, any `…+json`, and a body that declares no type
    at all (taken for JSON) are accepted; a body-less request may say anything."""
    event_id = await create_event(client)
    body = json.dumps(ga(1)).encode()
    for headers in [
        {"content-type": "application/json; charset=utf-8"},
        {"content-type": "Application/JSON"},
        {"content-type": "application/vnd.boxoffice+json"},
        {},
    ]:
        r = await client.post(f"/events/{event_id}/holds", content=body, headers=headers)
        assert r.status_code == 201, (headers, r.text)
    h = r.json()
    r = await client.post(
        f"/events/{event_id}/holds/{h['hold_id']}/confirm", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 200, r.text


# --- idempotency: bodies as JSON values ------------------------------------------------------


async def test_idempotency_compares_json_values(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    key = {**json_headers(), "idempotency-key": f"json-{uuid.uuid4()}"}
    first = b'{"customer_id": "c", "items": [{"category": "GA", "quantity": 2}]}'
    same = b'{ "items" : [ { "quantity":2,"category":"GA" } ],\n"customer_id":"c" }'
    r1 = await client.post(f"/events/{event_id}/holds", content=first, headers=key)
    assert r1.status_code == 201, r1.text
    r2 = await client.post(f"/events/{event_id}/holds", content=same, headers=key)
    assert r2.status_code == 201, r2.text
    assert r2.json() == r1.json()
    assert await availability(client, event_id) == {"GA": 48, "VIP": 12}
    # A different value is still a different request.
    other = b'{"customer_id": "c", "items": [{"category": "GA", "quantity": 3}]}'
    r3 = await client.post(f"/events/{event_id}/holds", content=other, headers=key)
    assert_problem(r3, 422, "idempotency_key_reused")

    # The admin routes' own record too.
    body = event_body()
    headers = {**ADMIN, **json_headers(), "idempotency-key": f"json-{uuid.uuid4()}"}
    r1 = await client.post("/admin/events", content=json.dumps(body), headers=headers)
    assert r1.status_code == 201, r1.text
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=3)
    r2 = await client.post("/admin/events", content=reordered, headers=headers)
    assert r2.status_code == 201, r2.text
    assert r2.json() == r1.json()


# --- event_not_found first ---------------------------------------------------------------


async def test_event_not_found_before_anything_else(client: httpx.AsyncClient) -> None:
    missing = f"nope-{uuid.uuid4().hex[:8]}"
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"/events/{missing}/bookings/x", {}),
        ("GET", f"/events/{missing}/holds/x", {}),
        ("POST", f"/events/{missing}/holds/x/confirm", {}),
        ("DELETE", f"/events/{missing}/holds/x", {}),
        ("POST", f"/events/{missing}/holds", {"json": {"customer_id": "c"}}),
        ("POST", f"/events/{missing}/holds", {"json": {"customer_id": "c", "seats": ["A", "A"]}}),
        ("DELETE", f"/admin/events/{missing}/bookings/x", {"headers": ADMIN}),
        ("GET", f"/admin/events/{missing}/bookings?cursor=x", {"headers": ADMIN}),
    ]
    for method, url, kwargs in requests:
        r = await client.request(method, url, **kwargs)
        assert_problem(r, 404, "event_not_found")


# --- /schema --------------------------------------------------------------------------------


async def test_schema_paths(client: httpx.AsyncClient) -> None:
    for path in ["/schema", "/schema/redoc", "/schema/swagger"]:
        r = await client.get(path)
        assert r.status_code == 200, (path, r.text[:200])
        assert r.headers["content-type"].startswith("text/html"), r.headers
    for path in ["/schema/nope", "/schema/a/b", "/schema/redoc/x", "/schema/nope.json"]:
        assert_problem(await client.get(path), 404, "not_found")


async def test_schema_pages_load_their_scripts_and_styles_from_the_service(
    client: httpx.AsyncClient,
) -> None:
    """No CDN: every script, style and icon of the pages is the service's own
    (tests/test_docs_browser.py shows them rendered with no outside network)."""
    kinds = {".js": "text/javascript", ".css": "text/css"}
    for page in ["/schema", "/schema/redoc", "/schema/swagger"]:
        html = (await client.get(page)).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert urls, (page, html[:500])
        for url in urls:
            assert url.startswith("/schema/assets/"), (page, url)
            r = await client.get(url)
            assert r.status_code == 200, (page, url)
            assert r.headers["content-type"].startswith(kinds[url[url.rfind(".") :]]), url
    for path in ["/schema/assets/redoc/nope.js", "/schema/assets/redoc/%2e%2e/__init__.py"]:
        assert_problem(await client.get(path), 404, "not_found")


# --- the OpenAPI document -------------------------------------------------------------------


@pytest.fixture
async def openapi(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]


async def test_openapi_idempotency_key_on_every_state_changing_operation(
    openapi: dict[str, Any],
) -> None:
    for path, method, op in operations(openapi):
        headers = [p for p in op.get("parameters", []) if p["in"] == "header"]
        names = [p["name"] for p in headers]
        if method == "get":
            assert "Idempotency-Key" not in names, (method, path)
        else:
            assert names.count("Idempotency-Key") == 1, (method, path, names)
            (param,) = [p for p in headers if p["name"] == "Idempotency-Key"]
            assert param.get("required") is not True
            assert param["schema"]["maxLength"] == 128


async def test_openapi_bearer_security_on_admin_operations(openapi: dict[str, Any]) -> None:
    schemes = openapi["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"}.items() <= schemes["bearer"].items(), schemes
    # The dashboard page is static (API.md "Live view"): its data calls need the token.
    admin = [
        (p, m, op)
        for p, m, op in operations(openapi)
        if p.startswith("/admin/") and p != "/admin/dashboard"
    ]
    assert admin
    for path, method, op in admin:
        assert op.get("security") == [{"bearer": []}], (method, path)
        assert "WWW-Authenticate" in op["responses"]["401"].get("headers", {}), (method, path)
    # Without BOXOFFICE_CUSTOMER_TOKEN_SECRET no other operation takes a token (with it,
    # customer operations do: tests/test_customers.py); the dashboard page asks for the
    # admin token itself (its data calls need it).
    for path, method, op in operations(openapi):
        if not path.startswith("/admin/") or path == "/admin/dashboard":
            assert not op.get("security"), (method, path)


async def test_openapi_documents_404_405_500_and_headers(openapi: dict[str, Any]) -> None:
    for path, method, op in operations(openapi):
        responses = op["responses"]
        for status, code in [("404", "not_found"), ("405", "method_not_allowed")]:
            assert code in json.dumps(responses.get(status)), (method, path, status)
        for status in ("404", "405", "500"):
            content = responses[status]["content"]["application/problem+json"]
            assert content["schema"] == {"$ref": "#/components/schemas/Problem"}, (path, status)
        assert "internal_error" in responses["500"]["description"]
        if "503" in responses and path not in ("/ready",):
            assert "Retry-After" in responses["503"].get("headers", {}), (method, path)
        if "201" in responses:
            assert "Location" in responses["201"].get("headers", {}), (method, path)
    problems = [name for name in openapi["components"]["schemas"] if "Problem" in name]
    assert problems == ["Problem"], problems


# --- error texts ------------------------------------------------------------------------------


async def test_error_details_say_more_than_the_title(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client)
    url = f"/events/{event_id}/holds"
    missing = assert_problem(
        await client.get(f"{url}/AAAAAAAAAAAAAAAAAAAAAA/confirm".replace("/confirm", "")),
        404,
        "hold_not_found",
    )
    assert missing["detail"] != missing["title"]
    missing = assert_problem(
        await client.post(f"{url}/AAAAAAAAAAAAAAAAAAAAAA/confirm"), 404, "hold_not_found"
    )
    assert missing["detail"] != missing["title"]

    released = await hold(client, event_id, items=[("GA", 1)])
    assert (await client.delete(f"{url}/{released['hold_id']}")).status_code == 204
    body = assert_problem(
        await client.post(f"{url}/{released['hold_id']}/confirm"), 409, "hold_released"
    )
    assert "released" in body["detail"] and body["detail"] != body["title"], body

    expired = await hold(client, event_id, items=[("GA", 1)])
    await expire_hold(svc, event_id, expired["hold_id"])
    body = assert_problem(
        await client.post(f"{url}/{expired['hold_id']}/confirm"), 410, "hold_expired"
    )
    assert "expired" in body["detail"] and RFC3339_UTC.search(body["detail"]), body

    confirmed = await hold(client, event_id, items=[("GA", 1)])
    booking = (await client.post(f"{url}/{confirmed['hold_id']}/confirm")).json()
    body = assert_problem(
        await client.delete(f"{url}/{confirmed['hold_id']}"), 409, "hold_confirmed"
    )
    assert booking["booking_id"] in body["detail"], body


async def test_routing_and_size_errors_say_what(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/nowhere"), 404, "not_found")
    assert "GET /nowhere" in body["detail"], body
    body = assert_problem(await client.put("/events"), 405, "method_not_allowed")
    assert "PUT" in body["detail"] and "GET" in body["detail"], body
    r = await send_alone(client, "POST", "/admin/events", content=BIG_STRING, headers=ADMIN)
    body = assert_problem(r, 413, "payload_too_large")
    assert "65536 bytes" in body["detail"], body


async def test_not_on_sale_says_why(client: httpx.AsyncClient) -> None:
    later = "2031-01-02T03:04:05Z"
    scheduled = await create_event(client, on_sale_at=later)
    body = assert_problem(
        await client.post(f"/events/{scheduled}/holds", json=ga(1)), 409, "not_on_sale"
    )
    assert later in body["detail"], body
    for status in ("paused", "closed"):
        event_id = await create_event(client)
        r = await client.patch(f"/admin/events/{event_id}", json={"status": status}, headers=ADMIN)
        assert r.status_code == 200, r.text
        body = assert_problem(
            await client.post(f"/events/{event_id}/holds", json=ga(1)), 409, "not_on_sale"
        )
        assert status in body["detail"], body


LEAKS = ("'data'", "`data`", "ParamType", "regex", "(?!", "[A-Z", "{1,64}", "msgspec", "Expected")


@pytest.mark.parametrize(
    ("method", "url", "body", "says"),
    [
        ("POST", "/events/{e}/holds", b"", "body is required"),
        ("POST", "/events/{e}/holds", b'{"customer_id": "c", "seats": ["B/1"]}', "`seats[0]`"),
        (
            "POST",
            "/events/{e}/holds",
            b'{"customer_id": "c", "items": [{"category": "G\\nA", "quantity": 1}]}',
            "`items[0].category`: must be 1 to 64 characters",
        ),
        (
            "POST",
            "/events/{e}/holds",
            b'{"customer_id": "c", "items": [{"category": "GA", "quantity": "1"}]}',
            "`items[0].quantity`: must be an integer, not a string",
        ),
        ("POST", "/events/{e}/holds", b'{"customer_id": "c", "items": [', "not valid JSON"),
        ("POST", "/events/{e}/holds", b'{"items": []}', "`customer_id` is required"),
        ("GET", "/events/{e}/seats?status=bogus", b"", "`status`"),
        ("GET", "/admin/events/{e}/bookings?limit=abc", b"", "`limit`: must be an integer"),
        ("GET", "/admin/events/{e}/bookings?limit=0", b"", "`limit`"),
        ("POST", "/admin/events", json.dumps(event_body(id="Bad_Id")).encode(), "`id`"),
        ("PATCH", "/admin/events/{e}", b'{"status": "sleeping"}', "`status`"),
    ],
)
async def test_validation_messages_say_what_is_expected_in_plain_words(
    client: httpx.AsyncClient, method: str, url: str, body: bytes, says: str
) -> None:
    event_id = await create_event(client)
    r = await client.request(
        method, url.format(e=event_id), content=body, headers={**ADMIN, **json_headers()}
    )
    problem = assert_problem(r, 400, "validation_error")
    assert says in problem["detail"], problem
    text = json.dumps(problem)
    assert not [leak for leak in LEAKS if leak in text], problem


async def test_plurals(client: httpx.AsyncClient, svc: Services) -> None:
    event_id = await create_event(client, max_per_customer=3)
    await hold(client, event_id, customer_id="p", items=[("GA", 2)])
    body = assert_problem(
        await client.post(f"/events/{event_id}/holds", json=ga(2, "p")), 409, "customer_limit"
    )
    assert "1 more ticket " in body["detail"], body
    # A dead letter tried once: "1 attempt", not "1 attempts" nor "1 attempt(s)".
    letter = {"op": "confirm", "booking": "{}", "attempts": "1", "error": "x"}
    await svc.redis.xadd(event_keys(event_id).deadletter, letter)  # type: ignore[arg-type]
    report = (await client.get(f"/admin/events/{event_id}/reconcile", headers=ADMIN)).json()
    details = [p["detail"] for e in report["events"] for p in e["problems"]]
    assert any("1 attempt: x" in d for d in details), details
    assert not [d for d in details if re.search(r"\b1 (entries|attempts)\b|\(s\)", d)], details


# --- currency ---------------------------------------------------------------------------------


@pytest.mark.parametrize("currency", ["XYZ", "ABC", "EUD", "XXX", "XAU"])
async def test_currency_must_be_iso_4217(client: httpx.AsyncClient, currency: str) -> None:
    body = event_body(
        categories=[{"name": "GA", "price": 100, "currency": currency, "capacity": 5}]
    )
    r = await client.post("/admin/events", json=body, headers=ADMIN)
    problem = assert_problem(r, 400, "validation_error")
    assert "ISO 4217" in problem["detail"] and currency in problem["detail"], problem
    assert_problem(await client.get(f"/events/{body['id']}"), 404, "event_not_found")


@pytest.mark.parametrize("currency", ["EUR", "USD", "JPY", "CHF", "GBP", "XOF"])
async def test_iso_4217_currencies_pass(client: httpx.AsyncClient, currency: str) -> None:
    body = event_body(
        categories=[{"name": "GA", "price": 100, "currency": currency, "capacity": 5}]
    )
    r = await client.post("/admin/events", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json()["categories"][0]["currency"] == currency
