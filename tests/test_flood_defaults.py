"""Safe defaults against floods (issue 19, point 3): with no rate-limit setting at all, one
address can neither fill a waiting room with made-up customer ids nor take an event's
tickets in a handful of requests, while a household or an office behind one address is
not hurt (README, Rate limits)."""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from service.core.settings import Settings
from tests.apiserver import ApiServer
from tests.conftest import ADMIN, event_body, server_env

DEFAULTS = Settings()
WINDOW = DEFAULTS.rate_limit_address_window_seconds
JOINS = DEFAULTS.rate_limit_address_joins
TICKETS = DEFAULTS.rate_limit_address_tickets


def test_the_per_address_limits_are_on_by_default() -> None:
    assert DEFAULTS.rate_limit_address > 0
    assert (JOINS, TICKETS, WINDOW) == (30, 40, 60)
    # 0 turns them all off (a trusted backend in front): nothing else to set.
    assert Settings.from_env({"BOXOFFICE_RATE_LIMIT_ADDRESS": "0"}).rate_limit_address == 0


@pytest.fixture(scope="module")
def defaults(settings: Settings) -> ApiServer:
    """A server on the default limits: no BOXOFFICE_RATE_LIMIT_* variable at all. It
    believes X-Forwarded-For from 127.0.0.1, so that each test is an address of its own
    (its start-up polls are 127.0.0.1's)."""
    env = {
        k: v for k, v in server_env(settings).items() if not k.startswith("BOXOFFICE_RATE_LIMIT")
    }
    env["BOXOFFICE_TRUSTED_PROXIES"] = "127.0.0.1"
    return ApiServer(env, workers=2)


@pytest.fixture(scope="module")
def started(defaults: ApiServer) -> Iterator[ApiServer]:
    defaults.start()
    yield defaults
    defaults.stop()


@pytest.fixture
async def http(started: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=started.url, timeout=30, limits=limits) as c:
        yield c


def _address() -> dict[str, str]:
    return {"x-forwarded-for": f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"}


async def _event(http: httpx.AsyncClient, capacity: int, **extra: Any) -> str:
    body = event_body(**extra)
    body["categories"] = [{"name": "GA", "price": 2500, "currency": "EUR", "capacity": capacity}]
    r = await http.post("/admin/events", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    return str(body["id"])


async def _available(http: httpx.AsyncClient, event_id: str) -> int:
    r = await http.get(f"/events/{event_id}", headers=_address())
    return int(r.json()["categories"][0]["available"])


def _policy(r: httpx.Response) -> str:
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "rate_limited"
    assert int(r.headers["retry-after"]) >= 1
    return r.headers["ratelimit-policy"]


async def test_one_address_cannot_fill_a_waiting_room(http: httpx.AsyncClient) -> None:
    room = {"admit_per_minute": 1, "pass_ttl_seconds": 600}
    event_id = await _event(http, 100, waiting_room=room)
    bot = _address()
    replies = await asyncio.gather(
        *(
            http.post(f"/events/{event_id}/queue", json={"customer_id": f"bot-{i}"}, headers=bot)
            for i in range(300)
        )
    )
    statuses = Counter(r.status_code for r in replies)
    # Before, all 300 joined (and 5,000 in 2.7 s): real buyers landed behind them.
    assert statuses == {201: JOINS, 429: 300 - JOINS}, statuses
    assert {_policy(r) for r in replies if r.status_code == 429} == {
        f'"joins";q={JOINS};w={WINDOW}'
    }
    # A household behind another address joins as it would.
    home = _address()
    for member in ("ann", "bob", "cy", "di"):
        r = await http.post(f"/events/{event_id}/queue", json={"customer_id": member}, headers=home)
        assert r.status_code == 201, r.text
        poll = await http.get(f"/events/{event_id}/queue/{r.json()['ticket']}", headers=home)
        assert poll.status_code == 200, poll.text


def _hold(customer: str, quantity: int) -> dict[str, object]:
    return {"customer_id": customer, "items": [{"category": "GA", "quantity": quantity}]}


async def test_one_address_cannot_take_an_events_tickets(http: httpx.AsyncClient) -> None:
    event_id = await _event(http, 100)
    bot = _address()
    codes = []
    for i in range(10):  # max_per_order (10) each: before, these 10 took all 100 tickets
        r = await http.post(f"/events/{event_id}/holds", json=_hold(f"bot-{i}", 10), headers=bot)
        codes.append(r.status_code)
        if r.status_code == 201:
            assert re.fullmatch(
                rf'"address";q=\d+;w={WINDOW}, "tickets";q={TICKETS};w={WINDOW}(, .*)?',
                r.headers["ratelimit-policy"],
            ), r.headers
        else:
            assert _policy(r) == f'"tickets";q={TICKETS};w={WINDOW}'
    taken = TICKETS // 10
    assert codes == [201] * taken + [429] * (10 - taken), codes
    assert await _available(http, event_id) == 100 - TICKETS
    # Another address, a household, buys as it would.
    home = _address()
    r = await http.post(f"/events/{event_id}/holds", json=_hold("family", 4), headers=home)
    assert r.status_code == 201, r.text


async def test_an_office_behind_one_address_is_not_hurt(http: httpx.AsyncClient) -> None:
    """20 colleagues at a drop's peak, one address: each looks at the event, joins the
    room, polls its ticket a few times and holds 2 tickets, all within the minute."""
    room = {"admit_per_minute": 60_000, "pass_ttl_seconds": 600}
    event_id = await _event(http, 500, waiting_room=room)
    office = _address()

    async def colleague(n: int) -> list[int]:
        seen = [(await http.get(f"/events/{event_id}", headers=office)).status_code]
        r = await http.post(
            f"/events/{event_id}/queue", json={"customer_id": f"o{n}"}, headers=office
        )
        seen.append(r.status_code)
        ticket = r.json()
        for _ in range(5):
            if ticket.get("pass"):
                break
            await asyncio.sleep(0.2)
            r = await http.get(f"/events/{event_id}/queue/{ticket['ticket']}", headers=office)
            seen.append(r.status_code)
            ticket = r.json()
        headers = {**office, "boxoffice-pass": ticket["pass"] or ""}
        r = await http.post(f"/events/{event_id}/holds", json=_hold(f"o{n}", 2), headers=headers)
        seen.append(r.status_code)
        return seen

    seen = await asyncio.gather(*(colleague(n) for n in range(20)))
    assert all(code in (200, 201) for codes in seen for code in codes), seen


async def test_chunked_holds_count_their_tickets_too(http: httpx.AsyncClient) -> None:
    """A body without Content-Length is read for its tickets like any other."""
    event_id = await _event(http, 100)
    bot = _address()

    async def chunked(i: int) -> AsyncIterator[bytes]:
        yield b'{"customer_id": "chunk-%d", ' % i
        yield b'"items": [{"category": "GA", "quantity": 10}]}'

    codes = []
    for i in range(6):
        r = await http.post(
            f"/events/{event_id}/holds",
            content=chunked(i),
            headers={**bot, "content-type": "application/json"},
        )
        codes.append(r.status_code)
    taken = TICKETS // 10
    assert codes == [201] * taken + [429] * (6 - taken), codes
