"""Unknown event ids never reach PostgreSQL (issue 19, point 2): every API process knows
the event ids PostgreSQL has (service/hotpath/eventids.py), read once and kept current by the
creates of every process; a request for any other id is answered 404 at once."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from litestar import Litestar
from litestar.testing import AsyncTestClient

from service.core.settings import Settings
from service.durable import live
from service.hotpath import eventids
from service.hotpath.context import Services
from service.web.app import create_app
from tests.conftest import ADMIN, create_event, event_body, new_event_id, on_redis
from tests.servers import LocalCluster


class App:
    """The API app in this process (real Redis, real PostgreSQL), so that every statement
    it sends to PostgreSQL can be counted."""

    def __init__(self, app: Litestar, http: AsyncTestClient[Litestar]) -> None:
        self.app, self.http = app, http
        self.statements: list[str] = []

    @property
    def svc(self) -> Services:
        svc: Services = self.app.state.svc
        return svc

    def count(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.statements.append(statement)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    litestar = create_app(settings)
    async with AsyncTestClient(litestar) as http:
        app = App(litestar, http)
        assert await app.svc.event_ids.wait_fresh(10), "the event ids were never read"
        sa.event.listen(app.svc.engine.sync_engine, "before_cursor_execute", app.count)
        yield app
        sa.event.remove(app.svc.engine.sync_engine, "before_cursor_execute", app.count)


def _unknown() -> str:
    return f"ev-{secrets.token_hex(8)}"


async def _ask_unknown(http: AsyncTestClient[Litestar], n: int) -> list[int]:
    statuses = []
    hold = {"customer_id": "c", "items": [{"category": "GA", "quantity": 1}]}
    for _ in range(n):
        e = _unknown()
        replies = await asyncio.gather(
            http.get(f"/events/{e}"),
            http.post(f"/events/{e}/holds", json=hold),
            http.get(f"/events/{e}/holds/{secrets.token_urlsafe(16)}"),
            http.post(f"/events/{e}/queue", json={"customer_id": "c"}),
            http.get(f"/events/{e}/seats"),
        )
        for r in replies:
            assert r.json()["code"] == "event_not_found", r.text
        statuses += [r.status_code for r in replies]
    return statuses


async def _script_calls(svc: Services) -> int:
    stats = await svc.redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_unknown_ids_cost_no_query(app: App, svc: Services) -> None:
    calls = await _script_calls(svc)
    started = time.monotonic()
    statuses = await _ask_unknown(app.http, 300)
    seconds = time.monotonic() - started
    assert set(statuses) == {404}
    # Before, each of these 1,500 requests cost a query (a moment's cache per id).
    assert app.statements == []
    # And most of them no Redis call either: a few a second still go the usual way, for
    # an id whose announcement may be on its way.
    made = await _script_calls(svc) - calls
    assert made <= eventids.LOOKUPS_PER_SECOND * (seconds + 2), (made, seconds)


async def test_an_event_created_by_another_process_is_found_at_once(
    app: App, client: httpx.AsyncClient, svc: Services
) -> None:
    # Created by the API server's process (not this one), then lost by Redis at once: only
    # this process's knowledge of the id lets it load the event back from PostgreSQL.
    event_id = await create_event(client, id=new_event_id("elsewhere"))
    await live.unload(svc, event_id)
    r = await app.http.get(f"/events/{event_id}")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == event_id
    assert app.statements, "the event was loaded from PostgreSQL"
    # And one created here.
    mine = new_event_id("here")
    body = {**(await client.get(f"/events/{event_id}")).json(), "id": mine}
    created = await app.http.post("/admin/events", json=_create_body(body), headers=ADMIN)
    assert created.status_code == 201, created.text
    await live.unload(svc, mine)
    assert (await client.get(f"/events/{mine}")).status_code == 200


def _create_body(event: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "name", "starts_at", "hold_ttl_seconds", "max_per_order")
    cats = [
        {"name": c["name"], "price": c["price"], "currency": c["currency"], "capacity": 10}
        for c in event["categories"]
    ]
    return {**{k: event[k] for k in keep}, "categories": cats}


async def test_after_a_lost_subscription_the_ids_are_read_again(app: App, svc: Services) -> None:
    """Messages may have been missed while the subscriber was away: the set is read again
    once it is back, and until then an unknown id is looked up by that read, at most one
    every RELOAD_SECONDS however many ask."""
    ids = app.svc.event_ids
    reads = ids.reads
    # Every subscriber connection of this Redis dropped: redis-py reconnects it by itself.
    for c in await svc.redis.client_list(_type="pubsub"):
        await svc.redis.client_kill_filter(_id=c["id"])
    await asyncio.sleep(0.2)
    assert await ids.wait_fresh(10)
    assert ids.reads > reads
    # Not complete: a burst of unknown ids costs one read of the set, not a query each.
    await asyncio.sleep(eventids.RELOAD_SECONDS)
    ids.fresh = False
    app.statements.clear()
    await _ask_unknown(app.http, 40)
    assert 1 <= len(app.statements) <= 1 + 2 * int(eventids.RELOAD_SECONDS), app.statements
    assert all("FROM events" in s and "WHERE" not in s for s in app.statements), app.statements


async def test_on_a_cluster(cluster: LocalCluster, settings: Settings) -> None:
    """The channel on a Redis Cluster: PUBLISH reaches every node, the subscriber listens
    on one; two processes' apps, one creates, the other knows the id at once."""
    csettings = on_redis(settings, cluster.url)
    first, second = create_app(csettings), create_app(csettings)
    async with AsyncTestClient(first) as one, AsyncTestClient(second) as two:
        svc_one: Services = first.state.svc
        svc_two: Services = second.state.svc
        for s in (svc_one, svc_two):
            assert await s.event_ids.wait_fresh(20), "the event ids were never read"
        event_id = new_event_id("cluster")
        r = await one.post("/admin/events", json=event_body(event_id), headers=ADMIN)
        assert r.status_code == 201, r.text
        mine = Services.open(csettings)  # the apps run on a loop of their own
        try:
            await mine.start()
            await live.unload(mine, event_id)
        finally:
            await mine.close()
        r = await two.get(f"/events/{event_id}")
        assert r.status_code == 200, r.text
        app = App(second, two)
        sa.event.listen(svc_two.engine.sync_engine, "before_cursor_execute", app.count)
        try:
            assert set(await _ask_unknown(two, 50)) == {404}
        finally:
            sa.event.remove(svc_two.engine.sync_engine, "before_cursor_execute", app.count)
        assert app.statements == []
