"""The dashboard in a real browser (headless Chromium, Debian's package) against a running
`boxoffice serve`, with an event mid-sale: the page shows the event's figures and a seat
map whose sold/held/available seats are the API's, updates itself without a reload, and
shows nothing but a refusal without the admin token."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.core.settings import Settings
from tests.apiserver import ApiServer
from tests.browser import Browser, Dashboard, chromium, dump_dom
from tests.conftest import ADMIN, ADMIN_TOKEN, create_event, server_env
from tests.test_errors import hold
from tests.test_liveview import CATEGORIES, category, watching

CHROMIUM = chromium()
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium (Debian package `chromium`): `make test` installs it with apt-get"
        " where it can; these browser tests need it",
    ),
]

MORE = {
    "name": "Balcony",
    "price": 1500,
    "currency": "EUR",
    "seat_blocks": [{"rows": ["Z"], "seats_per_row": 4}],
}


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[ApiServer]:
    """A server of the module's own: the page talks to `boxoffice serve` as a browser
    would, over its port."""
    api = ApiServer(server_env(settings))
    api.start()
    yield api
    api.stop()


async def mid_sale(client: httpx.AsyncClient) -> tuple[str, list[str]]:
    """An event with seats sold, held and available in two seated categories and tickets
    sold and held in general admission; returns it and its live holds' ids."""
    event_id = await create_event(client, categories=[*CATEGORIES, MORE])
    sold = await hold(client, event_id, "c1", items=[("VIP", 3)], seats=["BOX-2"])
    r = await client.post(f"/events/{event_id}/holds/{sold['hold_id']}/confirm")
    assert r.status_code == 200, r.text
    held = await hold(client, event_id, "c2", items=[("VIP", 2), ("GA", 1)], seats=["Z-3"])
    ga = await hold(client, event_id, "c3", items=[("GA", 2)])
    r = await client.post(f"/events/{event_id}/holds/{ga['hold_id']}/confirm")
    assert r.status_code == 200, r.text
    return event_id, [held["hold_id"]]


async def seats_of(client: httpx.AsyncClient, event_id: str) -> dict[str, str]:
    seats: dict[str, str] = {}
    cursor = None
    while True:
        params = {"limit": 5000, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(f"/events/{event_id}/seats", params=params)).json()
        seats |= {s["label"]: s["status"] for s in page["seats"]}
        cursor = page["next_cursor"]
        if cursor is None:
            return seats


async def figures_now(client: httpx.AsyncClient, event_id: str) -> dict[str, Any]:
    async with watching(client, event_id) as docs:
        doc: dict[str, Any] = await anext(docs)
        return doc


async def test_the_page_shows_the_figures_and_the_seat_map_of_the_api(
    server: ApiServer,
) -> None:
    assert CHROMIUM is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        event_id, _ = await mid_sale(client)
        seats = await seats_of(client, event_id)
        live = await figures_now(client, event_id)
        event = (await client.get(f"/events/{event_id}")).json()
    url = f"{server.url}/admin/dashboard#token={ADMIN_TOKEN}&event={event_id}"
    page = Dashboard(dump_dom(CHROMIUM, url))

    assert page.state == "live", page.text
    assert page.hidden == {"refusal": True, "board": False}
    # Each category's bar carries the figures of the API.
    for c in event["categories"]:
        shown = page.figures[c["name"]]
        assert shown["capacity"] == c["capacity"], (c, shown)
        assert shown["available"] == c["available"], (c, shown)
        figures = category(live, c["name"])
        assert shown["held"] == figures["held"] and shown["sold"] == figures["sold"], c
    assert page.figures["GA"] == {"capacity": 5, "available": 2, "held": 1, "sold": 2}
    # The seat map: every seat of the API, each in its state, labelled.
    assert page.seats == seats
    counts = Counter(seats.values())
    assert counts == {"available": 9, "held": 3, "sold": 4}, counts
    assert page.map_counts == dict(counts)
    text = " ".join(page.text)
    assert "4 sold · 3 held · 9 available" in text
    assert event["name"] in text


async def test_the_page_shows_the_waiting_room_of_the_api(server: ApiServer) -> None:
    """An event whose waiting room has people in it: the page shows its length and
    admissions as GET /admin/events/{id}/queue gives them (paused: they stand still)."""
    assert CHROMIUM is not None
    room = {"admit_per_minute": 60, "pass_ttl_seconds": 600}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        event_id = await create_event(client, categories=CATEGORIES[:1], waiting_room=room)
        for n in range(7):
            r = await client.post(f"/events/{event_id}/queue", json={"customer_id": f"q{n}"})
            assert r.status_code == 201, r.text
        r = await client.patch(
            f"/admin/events/{event_id}", json={"status": "paused"}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        stats = (await client.get(f"/admin/events/{event_id}/queue", headers=ADMIN)).json()
    assert stats["waiting"] + stats["admitted"] == 7 and stats["waiting"] > 0, stats
    url = f"{server.url}/admin/dashboard#token={ADMIN_TOKEN}&event={event_id}"
    html = dump_dom(CHROMIUM, url)
    page = Dashboard(html)
    assert page.state == "live", page.text
    assert page.queue["waiting"] == str(stats["waiting"]), page.queue
    assert page.queue["admitted"] == str(stats["admitted"]), page.queue
    assert page.queue["admit / min"] == "60", page.queue
    # Passes are derived from admission (a pass per rank admitted within its TTL).
    assert page.queue["active passes"] == str(stats["active_passes"]), page.queue
    assert stats["active_passes"] == stats["admitted"], stats
    # And its chart, whose figure is the length too.
    assert f'data-figure="queue">{stats["waiting"]}<' in html


async def test_without_the_token_the_page_and_the_stream_refuse(server: ApiServer) -> None:
    assert CHROMIUM is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        event_id, _ = await mid_sale(client)
        r = await client.get(f"/admin/events/{event_id}/live")
        assert r.status_code == 401
        assert r.json()["code"] == "unauthorized"
    for fragment in ("", f"#event={event_id}", f"#token=wrong&event={event_id}"):
        page = Dashboard(dump_dom(CHROMIUM, f"{server.url}/admin/dashboard{fragment}"))
        assert page.state == "refused", (fragment, page.text)
        assert page.hidden == {"refusal": False, "board": True}, fragment
        assert page.seats == {} and page.figures == {}, fragment
        assert "Refused" in " ".join(page.text)


async def test_the_page_updates_itself_without_a_reload(server: ApiServer) -> None:
    """Watched in real time: a confirmation, a release and a hold made while the page is
    open show in its seat map and bars within seconds; the page is never reloaded."""
    assert CHROMIUM is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        event_id, (held,) = await mid_sale(client)
        with Browser(CHROMIUM) as browser:
            browser.open(f"{server.url}/admin/dashboard#token={ADMIN_TOKEN}&event={event_id}")
            counts = "JSON.stringify(document.getElementById('mapcounts').dataset)"
            browser.wait_for(f"{counts} === '{json.dumps(_c(9, 3, 4), separators=(',', ':'))}'")
            browser.evaluate("window.__loadedOnce = true")
            # The token is not left in the address bar.
            assert "token" not in browser.evaluate("location.href")

            r = await client.post(f"/events/{event_id}/holds/{held}/confirm", headers=ADMIN)
            assert r.status_code == 200, r.text
            browser.wait_for(f"{counts} === '{json.dumps(_c(9, 0, 7), separators=(',', ':'))}'")
            await hold(client, event_id, "c9", seats=["B-5", "Z-1"])
            browser.wait_for(f"{counts} === '{json.dumps(_c(7, 2, 7), separators=(',', ':'))}'")
            ga_sold = "document.querySelector('[data-category=GA] [data-figure=sold]').textContent"
            assert browser.evaluate(ga_sold) == "3"
            assert browser.evaluate("document.querySelector('[title=\"B-5\"]').className") == (
                "seat held"
            )
            # The charts have moved: one point a second.
            points = "document.querySelector('[data-series=holds] polyline').points.length"
            browser.wait_for(f"{points} >= 3")
            assert browser.evaluate("window.__loadedOnce") is True  # no reload meanwhile


def _c(available: int, held: int, sold: int) -> dict[str, str]:
    """mapcounts' dataset, as the page writes it (in this key order)."""
    return {"available": str(available), "held": str(held), "sold": str(sold)}
