"""Customers are who they say (API.md "Customers"): with BOXOFFICE_CUSTOMER_TOKEN_SECRET
set, customer calls need an HS256 JWT whose `sub` is the customer, a body's customer_id
must be it, another customer's holds and bookings do not exist for them, and their
Idempotency-Keys are their own. Against a real server, Redis and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest

from service.core import errors
from service.core.settings import SettingError, Settings
from service.web import customers
from tests.apiserver import ApiServer
from tests.conftest import ADMIN, availability, create_event, server_env, snapshot

# Every answer of the lean lane's routes agrees with the OpenAPI document.
pytestmark = pytest.mark.openapi_checked

SECRET = "test-customer-secret-" + "x" * 48  # 69 bytes: enough for HS512 too (refused)
GA1 = {"items": [{"category": "GA", "quantity": 1}]}


def token(sub: Any = "alice", ttl: float = 300, secret: str = SECRET, **claims: Any) -> str:
    body = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    if sub is None:
        del body["sub"]
    return jwt.encode(body, secret, algorithm="HS256")


def auth(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


def as_(sub: str) -> dict[str, str]:
    return auth(token(sub))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], signature: bytes | None) -> str:
    """A token put together by hand, as an attacker would: any header, any signature."""
    signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if signature is None:  # sign it HS256 with the real secret, whatever the header says
        signature = hmac.new(SECRET.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(signature)}"


def later() -> int:
    return int(time.time()) + 300


@pytest.fixture(scope="module")
def api_tokens(settings: Settings) -> Iterator[ApiServer]:
    server = ApiServer(
        {**server_env(settings), "BOXOFFICE_CUSTOMER_TOKEN_SECRET": SECRET}, workers=1
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def tc(api_tokens: ApiServer, svc: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_tokens.url, timeout=30) as c:
        yield c


async def hold_as(c: httpx.AsyncClient, event_id: str, sub: str, **headers: str) -> Any:
    r = await c.post(f"/events/{event_id}/holds", json=GA1, headers={**as_(sub), **headers})
    assert r.status_code == 201, r.text
    return r.json()


def unauthorized(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.json()["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"


# --- tokens -------------------------------------------------------------------------------


BAD_TOKENS: dict[str, str] = {
    "expired": token(ttl=-5),
    "wrongly signed": token(secret="another-secret-of-enough-length-000000"),
    "alg none": forged({"alg": "none", "typ": "JWT"}, {"sub": "alice", "exp": later()}, b""),
    "alg none, signed anyway": forged({"alg": "none"}, {"sub": "alice", "exp": later()}, None),
    "RS256 header, HMAC signature (key confusion)": forged(
        {"alg": "RS256", "typ": "JWT"}, {"sub": "alice", "exp": later()}, None
    ),
    "HS512 with the right secret": jwt.encode(
        {"sub": "alice", "exp": later()}, SECRET, algorithm="HS512"
    ),
    "exp a numeric string": forged({"alg": "HS256"}, {"sub": "alice", "exp": str(later())}, None),
    "exp 1e300": forged({"alg": "HS256"}, {"sub": "alice", "exp": 1e300}, None),
    "exp not whole": forged({"alg": "HS256"}, {"sub": "alice", "exp": later() + 0.5}, None),
    "exp true": forged({"alg": "HS256"}, {"sub": "alice", "exp": True}, None),
    "exp past the year 9999": forged({"alg": "HS256"}, {"sub": "alice", "exp": 10**12}, None),
    "no exp": jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
    "no sub": token(sub=None),
    "sub not a string": forged({"alg": "HS256"}, {"sub": 42, "exp": later()}, None),
    "sub too long": token(sub="a" * 129),
    "sub empty": token(sub=""),
    "malformed": "not.a.jwt",
    "garbage": "abc",
    "two parts": token().rsplit(".", 1)[0],
    "payload tampered": forged({"alg": "HS256"}, {"sub": "bob", "exp": later()}, b"x" * 32),
}


@pytest.mark.parametrize("why", BAD_TOKENS)
async def test_a_hold_with_a_bad_token_is_401_and_changes_nothing(
    tc: httpx.AsyncClient, why: str
) -> None:
    event_id = await create_event(tc)
    before = await snapshot(tc, event_id)
    body = {"customer_id": "alice", **GA1}
    unauthorized(
        await tc.post(f"/events/{event_id}/holds", json=body, headers=auth(BAD_TOKENS[why]))
    )
    assert await snapshot(tc, event_id) == before


async def test_an_integer_exp_up_to_the_year_9999_is_good(tc: httpx.AsyncClient) -> None:
    event_id = await create_event(tc)
    last = forged({"alg": "HS256"}, {"sub": "alice", "exp": 253_402_300_799}, None)
    r = await tc.post(f"/events/{event_id}/holds", json=GA1, headers=auth(last))
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Basic YWxpY2U6cHc="},
        {"authorization": "Bearer"},
        {"authorization": ""},
    ],
    ids=["missing", "basic", "bearer without token", "empty"],
)
async def test_a_hold_without_a_bearer_token_is_401(
    tc: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    event_id = await create_event(tc)
    before = await availability(tc, event_id)
    r = await tc.post(
        f"/events/{event_id}/holds", json={"customer_id": "alice", **GA1}, headers=headers
    )
    unauthorized(r)
    assert await availability(tc, event_id) == before


async def test_the_token_is_checked_before_the_body_and_the_event(tc: httpx.AsyncClient) -> None:
    unauthorized(await tc.post("/events/no-such-event/holds", content=b"{not json"))
    unauthorized(await tc.get("/events/no-such-event/holds/abc"))


async def test_every_customer_route_needs_the_token(tc: httpx.AsyncClient) -> None:
    event_id = await create_event(tc)
    hold = await hold_as(tc, event_id, "alice")
    path = f"/events/{event_id}/holds/{hold['hold_id']}"
    unauthorized(await tc.get(path))
    unauthorized(await tc.post(f"{path}/confirm"))
    unauthorized(await tc.delete(path))
    unauthorized(await tc.get(f"/events/{event_id}/bookings/0190f000-0000-7000-8000-000000000000"))
    # Still live and untouched, and the public reads need no token.
    assert (await tc.get(path, headers=as_("alice"))).json()["status"] == "held"
    assert (await tc.get(f"/events/{event_id}")).status_code == 200
    assert (await tc.get(f"/events/{event_id}/seats")).status_code == 200
    assert (await tc.get("/events")).status_code == 200


# --- the body's customer_id ---------------------------------------------------------------


async def test_customer_id_may_be_left_out_and_is_then_the_token_s(tc: httpx.AsyncClient) -> None:
    event_id = await create_event(tc)
    hold = await hold_as(tc, event_id, "alice")
    assert hold["customer_id"] == "alice"
    r = await tc.post(
        f"/events/{event_id}/holds", json={"customer_id": "alice", **GA1}, headers=as_("alice")
    )
    assert r.status_code == 201, r.text
    assert r.json()["customer_id"] == "alice"


async def test_another_customer_s_id_in_the_body_is_403(tc: httpx.AsyncClient) -> None:
    event_id = await create_event(tc, max_per_customer=4)
    before = await snapshot(tc, event_id)
    r = await tc.post(
        f"/events/{event_id}/holds",
        json={"customer_id": "victim@example.com", "items": [{"category": "GA", "quantity": 4}]},
        headers=as_("mallory"),
    )
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "customer_mismatch"
    assert await snapshot(tc, event_id) == before
    # The victim's allowance is whole.
    r = await tc.post(
        f"/events/{event_id}/holds",
        json={"items": [{"category": "GA", "quantity": 4}]},
        headers=as_("victim@example.com"),
    )
    assert r.status_code == 201, r.text


async def test_a_bad_customer_id_is_still_400(tc: httpx.AsyncClient) -> None:
    event_id = await create_event(tc)
    r = await tc.post(
        f"/events/{event_id}/holds", json={"customer_id": "", **GA1}, headers=as_("alice")
    )
    assert r.status_code == 400, r.text  # an empty id is no id, as without tokens
    r = await tc.post(
        f"/events/{event_id}/holds", json={"customer_id": 7, **GA1}, headers=as_("alice")
    )
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "validation_error"


# --- another customer's holds and bookings ------------------------------------------------


async def test_another_customer_s_hold_does_not_exist_for_them(tc: httpx.AsyncClient) -> None:
    event_id = await create_event(tc)
    hold = await hold_as(tc, event_id, "alice")
    path = f"/events/{event_id}/holds/{hold['hold_id']}"
    before = await snapshot(tc, event_id)
    for r in (
        await tc.get(path, headers=as_("mallory")),
        await tc.post(f"{path}/confirm", json={"payment_ref": "pi_x"}, headers=as_("mallory")),
        await tc.post(f"{path}/confirm", headers={**as_("mallory"), "idempotency-key": "k1"}),
        await tc.delete(path, headers=as_("mallory")),
        await tc.delete(path, headers={**as_("mallory"), "idempotency-key": "k2"}),
    ):
        assert r.status_code == 404, r.text
        assert r.json()["code"] == "hold_not_found"
    assert await snapshot(tc, event_id) == before
    mine = await tc.get(path, headers=as_("alice"))
    assert mine.status_code == 200
    assert mine.json() == hold
    # The owner still can: confirm, and then nobody else reads the booking.
    r = await tc.post(f"{path}/confirm", json={"payment_ref": "pi_1"}, headers=as_("alice"))
    assert r.status_code == 200, r.text
    booking = r.json()
    booking_path = f"/events/{event_id}/bookings/{booking['booking_id']}"
    r = await tc.get(booking_path, headers=as_("mallory"))
    assert r.status_code == 404, r.text
    assert r.json()["code"] == "booking_not_found"
    assert "pi_1" not in r.text
    r = await tc.get(booking_path, headers=as_("alice"))
    assert r.status_code == 200, r.text
    assert r.json()["payment_ref"] == "pi_1"
    # A confirmed hold is no more another's to release.
    r = await tc.delete(path, headers=as_("mallory"))
    assert r.json()["code"] == "hold_not_found"


async def test_the_owner_releases_their_hold(tc: httpx.AsyncClient) -> None:
    event_id = await create_event(tc)
    before = await availability(tc, event_id)
    hold = await hold_as(tc, event_id, "alice")
    path = f"/events/{event_id}/holds/{hold['hold_id']}"
    assert (await tc.delete(path, headers=as_("alice"))).status_code == 204
    assert (await tc.get(path, headers=as_("alice"))).json()["status"] == "released"
    assert await availability(tc, event_id) == before


# --- Idempotency-Keys ---------------------------------------------------------------------


async def test_another_customer_s_idempotency_key_gets_a_fresh_answer(
    tc: httpx.AsyncClient,
) -> None:
    event_id = await create_event(tc)
    key = {"idempotency-key": "order-42"}
    victim = await hold_as(tc, event_id, "victim", **key)
    again = await hold_as(tc, event_id, "victim", **key)
    assert again["hold_id"] == victim["hold_id"]  # the victim's own replay
    before = await availability(tc, event_id)
    thief = await hold_as(tc, event_id, "thief", **key)
    assert thief["hold_id"] != victim["hold_id"]
    assert thief["customer_id"] == "thief"
    assert (await availability(tc, event_id))["GA"] == before["GA"] - 1
    # The victim's hold is still theirs and live; the thief's key record is the thief's.
    path = f"/events/{event_id}/holds/{victim['hold_id']}"
    assert (await tc.get(path, headers=as_("victim"))).json()["status"] == "held"
    assert (await hold_as(tc, event_id, "thief", **key))["hold_id"] == thief["hold_id"]
    # A release with the victim's key and the thief's token reaches nothing of the victim.
    r = await tc.delete(path, headers={**as_("thief"), "idempotency-key": "rel-1"})
    assert r.status_code == 404
    assert (
        await tc.delete(path, headers={**as_("victim"), "idempotency-key": "rel-1"})
    ).status_code == 204


# --- the admin routes ---------------------------------------------------------------------


async def test_admin_routes_still_take_the_admin_token(tc: httpx.AsyncClient) -> None:
    event_id = await create_event(tc)  # with ADMIN
    r = await tc.get(f"/admin/events/{event_id}/bookings", headers=ADMIN)
    assert r.status_code == 200, r.text
    unauthorized(await tc.get(f"/admin/events/{event_id}/bookings", headers=as_("alice")))
    # And the admin token is no customer token.
    unauthorized(
        await tc.post(f"/events/{event_id}/holds", json={"customer_id": "a", **GA1}, headers=ADMIN)
    )


# --- the document -------------------------------------------------------------------------


async def test_the_document_requires_the_customer_scheme(tc: httpx.AsyncClient) -> None:
    doc = (await tc.get("/schema/openapi.json")).json()
    paths = doc["paths"]
    assert paths["/events/{event_id}/holds"]["post"]["security"] == [{"customer": []}]
    assert paths["/events/{event_id}/holds/{hold_id}"]["get"]["security"] == [{"customer": []}]
    assert paths["/admin/events"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/events/{event_id}"]["get"]
    body = doc["components"]["schemas"]["CustomerHoldCreate"]
    assert "customer_id" not in body.get("required", [])
    assert "default" not in body["properties"]["customer_id"]  # "" is no value to send


# --- without the secret -------------------------------------------------------------------


async def test_without_the_secret_the_body_says_who(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client)
    # No token needed; a token of someone else is ignored; customer_id is required.
    r = await client.post(
        f"/events/{event_id}/holds", json={"customer_id": "alice", **GA1}, headers=as_("bob")
    )
    assert r.status_code == 201, r.text
    assert r.json()["customer_id"] == "alice"
    path = f"/events/{event_id}/holds/{r.json()['hold_id']}"
    assert (await client.get(path)).status_code == 200
    r = await client.post(f"/events/{event_id}/holds", json=GA1, headers=as_("alice"))
    assert r.status_code == 400, r.text
    assert "customer_id" in r.json()["detail"]
    # The key is the event's, whoever sends it (a trusted backend speaks for all).
    key = {"idempotency-key": "plain-1"}
    body = {"customer_id": "alice", **GA1}
    first = await client.post(f"/events/{event_id}/holds", json=body, headers=key)
    second = await client.post(f"/events/{event_id}/holds", json=body, headers={**key, **as_("x")})
    assert first.json()["hold_id"] == second.json()["hold_id"]
    doc = (await client.get("/schema/openapi.json")).json()
    hold_op = doc["paths"]["/events/{event_id}/holds"]["post"]
    assert "security" not in hold_op  # asks for nothing
    assert "customer" in doc["components"]["securitySchemes"]  # described, for the other way
    assert "customer_id" in doc["components"]["schemas"]["HoldCreate"]["required"]


# --- settings and the verifier ------------------------------------------------------------


def test_a_short_secret_is_refused_without_repeating_it() -> None:
    with pytest.raises(SettingError) as refused:
        Settings.from_env({"BOXOFFICE_CUSTOMER_TOKEN_SECRET": "hunter2-hunter2"})
    assert str(refused.value).startswith("BOXOFFICE_CUSTOMER_TOKEN_SECRET: ")
    assert "hunter2" not in str(refused.value)
    assert Settings.from_env({"BOXOFFICE_CUSTOMER_TOKEN_SECRET": SECRET}).customer_token_secret


def test_the_verifier_names_the_customer_and_refuses_the_rest() -> None:
    verify = customers.Verifier(SECRET)
    assert verify.customer(f"Bearer {token('zoë')}".encode()) == "zoë"
    assert verify.customer(f"bearer  {token('a')} ".encode()) == "a"
    for bad in [
        None,
        b"",
        b"Bearer ",
        f"Token {token()}".encode(),
        *(f"Bearer {t}".encode() for t in BAD_TOKENS.values()),
    ]:
        with pytest.raises(errors.Unauthorized):
            verify.customer(bad)


def test_a_remembered_token_still_expires() -> None:
    verify = customers.Verifier(SECRET)
    exp = int(time.time()) + 1
    header = f"Bearer {jwt.encode({'sub': 'alice', 'exp': exp}, SECRET, 'HS256')}".encode()
    assert verify.customer(header) == "alice"
    assert verify.customer(header) == "alice"  # remembered
    time.sleep(max(0.0, exp - time.time()) + 0.05)
    with pytest.raises(errors.Unauthorized):
        verify.customer(header)


def test_remembered_tokens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(customers, "_CACHE_SIZE", 3)
    verify = customers.Verifier(SECRET)
    for n in range(10):
        assert verify.customer(f"Bearer {token(f'c{n}')}".encode()) == f"c{n}"
    assert len(verify._verified) == 3


async def test_bad_tokens_meet_the_per_address_limit_first(settings: Settings) -> None:
    """A flood of forged tokens costs a verification each: the per-address limit (when
    set) refuses it before any is verified, like any other request."""
    env = {
        **server_env(settings),
        "BOXOFFICE_CUSTOMER_TOKEN_SECRET": SECRET,
        "BOXOFFICE_RATE_LIMIT_ADDRESS": "3",
        "BOXOFFICE_RATE_LIMIT_ADDRESS_WINDOW_SECONDS": "60",
        # The client is who the test says (its start-up polls count for 127.0.0.1).
        "BOXOFFICE_TRUSTED_PROXIES": "127.0.0.1",
    }
    client = {"x-forwarded-for": f"198.18.{random.randrange(256)}.{random.randrange(256)}"}
    server = ApiServer(env, workers=1)
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            path = "/events/no-such-event/holds/abc"
            headers = {**client, **auth(BAD_TOKENS["wrongly signed"])}
            statuses = [(await c.get(path, headers=headers)).status_code for _ in range(5)]
    finally:
        server.stop()
    assert statuses == [401, 401, 401, 429, 429]
