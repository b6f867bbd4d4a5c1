"""GET /admin/events/{id}/live: one JSON document a second with the event's figures; one
reader per event and process however many watch; a watcher that leaves frees its reader.
GET /admin/dashboard: the static page (its browser tests: tests/test_dashboard_browser.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from service.core.keys import event_keys
from service.core.settings import Settings
from service.hotpath.context import Services
from service.hotpath.scripts import LUA_DIR
from service.web import livefeed
from tests.apiserver import ApiServer, Worker
from tests.conftest import (
    ADMIN,
    create_event,
    eventually,
    expire_hold,
    new_event_id,
    server_env,
    worker_env,
)
from tests.servers import RedisServer
from tests.test_errors import assert_problem, hold
from tests.test_process import children

CATEGORIES = [
    {"name": "GA", "price": 2500, "currency": "EUR", "capacity": 5},
    {
        "name": "VIP",
        "price": 9900,
        "currency": "EUR",
        "seat_blocks": [{"rows": ["A", "B"], "seats_per_row": 5}],
        "seats": ["BOX-1", "BOX-2"],
    },
]

# Tickets in the waiting room of the queue test: far more than a few seconds admit.
QUEUE_JOINS = 20

Document = tuple[str, dict[str, Any]]  # (SSE event type, JSON data)


async def documents(response: httpx.Response) -> AsyncIterator[Document]:
    """The Server-Sent Events of a response, parsed."""
    kind = "message"
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            kind = line[6:].strip()


@contextlib.asynccontextmanager
async def watching(
    client: httpx.AsyncClient, event_id: str
) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    async with client.stream("GET", f"/admin/events/{event_id}/live", headers=ADMIN) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"

        async def figures() -> AsyncIterator[dict[str, Any]]:
            async for kind, doc in documents(r):
                assert kind == "message", doc
                yield doc

        yield figures()


def category(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in doc["categories"] if c["name"] == name)
    return found


def at(doc: dict[str, Any]) -> float:
    return datetime.fromisoformat(doc["at"].replace("Z", "+00:00")).timestamp()


async def test_figures_after_holds_confirms_refusals_and_an_expiry(
    client: httpx.AsyncClient, svc: Services, settings: Settings
) -> None:
    event_id = await create_event(client, categories=CATEGORIES)
    async with watching(client, event_id) as docs:
        first = await anext(docs)
        assert first["event_id"] == event_id
        assert first["status"] == "on_sale"
        assert first["interval_seconds"] is None and first["rates"] is None
        assert [c["name"] for c in first["categories"]] == ["GA", "VIP"]
        assert category(first, "GA") == {
            "name": "GA",
            "seated": False,
            "capacity": 5,
            "available": 5,
            "held": 0,
            "sold": 0,
        }
        assert category(first, "VIP")["seated"] is True
        assert category(first, "VIP")["capacity"] == 12
        assert first["totals"] == {
            "holds": 0,
            "confirmations": 0,
            "releases": 0,
            "expiries": 0,
            "cancellations": 0,
            "refusals": {},
        }
        # No waiting room: its figures are there, and null.
        assert first["queue"] == msgspec.to_builtins(livefeed.NO_QUEUE)
        assert set(first["queue"].values()) == {False, None}
        assert first["write_behind"] == {"backlog": 0, "lag_seconds": 0.0, "dead_letters": 0}

        ga = await hold(client, event_id, "c1", items=[("GA", 2)])
        vip = await hold(client, event_id, "c2", items=[("VIP", 3)])
        r = await client.post(f"/events/{event_id}/holds/{ga['hold_id']}/confirm")
        assert r.status_code == 200, r.text
        for _ in range(2):
            r = await client.post(
                f"/events/{event_id}/holds",
                json={"customer_id": "c3", "items": [{"category": "GA", "quantity": 4}]},
            )
            assert_problem(r, 409, "sold_out")
        r = await client.post(f"/events/{event_id}/holds", json={"customer_id": "c3"})
        assert_problem(r, 400, "validation_error")
        # Overdue, and nothing else will notice (no worker runs here): the next reading
        # expires it, as any read of the event does.
        await expire_hold(svc, event_id, vip["hold_id"], fire_ttl=False)

        seen = [first]
        async for doc in docs:
            seen.append(doc)
            t = doc["totals"]
            # Each process sends its refusals once a second: the two codes may come apart.
            if t["expiries"] == 1 and t["refusals"] == {"sold_out": 2, "validation_error": 1}:
                break
            assert len(seen) < 15, seen[-1]
        last = seen[-1]
        assert last["totals"] == {
            "holds": 2,
            "confirmations": 1,
            "releases": 0,
            "expiries": 1,
            "cancellations": 0,
            "refusals": {"sold_out": 2, "validation_error": 1},
        }
        assert {k: category(last, "GA")[k] for k in ("available", "held", "sold")} == {
            "available": 3,
            "held": 0,
            "sold": 2,
        }
        assert {k: category(last, "VIP")[k] for k in ("available", "held", "sold")} == {
            "available": 12,
            "held": 0,
            "sold": 0,
        }
        # The rates are the counts' changes per second: over the readings they add up
        # to what happened.
        later = seen[1:]
        for name, happened in (("holds", 2), ("confirmations", 1), ("expiries", 1)):
            total = sum(d["rates"][name] * d["interval_seconds"] for d in later)
            assert abs(total - happened) < 0.05, (name, total, later)
        refused = sum(
            d["rates"]["refusals"].get("sold_out", 0) * d["interval_seconds"] for d in later
        )
        assert abs(refused - 2) < 0.05, later
        # One a second: each reading's interval is the time between their `at`s.
        for before, doc in zip(seen, later, strict=False):
            gap = at(doc) - at(before)
            assert abs(gap - doc["interval_seconds"]) < 0.002, (before, doc)
            assert 0.5 < gap < 2.5, (before["at"], doc["at"])

        # The booking waits for the write-behind (none runs yet): backlog 1, a lag that grows.
        assert last["write_behind"]["backlog"] == 1, last
        lagging = await anext(docs)
        assert lagging["write_behind"]["backlog"] == 1
        assert lagging["write_behind"]["lag_seconds"] > 0.5
        worker = Worker(worker_env(settings))
        worker.start()
        try:
            async for doc in docs:
                if doc["write_behind"]["backlog"] == 0:
                    assert doc["write_behind"]["lag_seconds"] == 0
                    break
                assert at(doc) - at(lagging) < 30, "the write-behind never caught up"
        finally:
            worker.stop()


def same_as_queue_stats(queue: dict[str, Any], stats: dict[str, Any]) -> None:
    """The stream's queue figures are GET /admin/events/{id}/queue's."""
    assert queue["enabled"] is True
    shown = {k: queue[k] for k in stats if k != "waiting"} | {"waiting": queue["length"]}
    assert shown == stats, (queue, stats)


async def test_the_waiting_room_figures_are_the_queue_endpoint_s(
    client: httpx.AsyncClient,
) -> None:
    """An event with a waiting room admitting one a second: joins, admissions and passes
    show in the stream as GET /admin/events/{id}/queue gives them, with a positive
    admission rate while it admits, and 0 once the event pauses."""
    room = {"admit_per_minute": 60, "pass_ttl_seconds": 600}
    event_id = await create_event(client, categories=CATEGORIES[:1], waiting_room=room)
    stats_url = f"/admin/events/{event_id}/queue"

    async def stats() -> dict[str, Any]:
        r = await client.get(stats_url, headers=ADMIN)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async with watching(client, event_id) as docs:
        first = await anext(docs)
        assert first["queue"] == {
            "enabled": True,
            "length": 0,
            "admitted": 0,
            "active_passes": 0,
            "admit_per_minute": 60,
            "last_admitted_position": 0,
            "admission_rate": None,  # no reading before
        }
        tickets = []
        for n in range(QUEUE_JOINS):
            r = await client.post(f"/events/{event_id}/queue", json={"customer_id": f"q{n}"})
            assert r.status_code == 201, r.text
            tickets.append(r.json()["ticket"])

        # The first in line looks until admitted (within a second or so).
        async def first_admitted() -> bool:
            r = await client.get(f"/events/{event_id}/queue/{tickets[0]}")
            assert r.status_code == 200, r.text
            return bool(r.json()["status"] == "admitted")

        await eventually(first_admitted, within=5)

        # While it admits: the rate is positive, about one a second, and the endpoint's
        # figures lie between the readings before and after it.
        seen = []
        async for doc in docs:
            q = doc["queue"]
            seen.append(doc)
            if q["admission_rate"] and q["length"] > 0 and q["active_passes"] >= 1:
                break
            assert len(seen) < 10, seen
        assert 0 < seen[-1]["queue"]["admission_rate"] <= 3, seen[-1]
        middle = await stats()
        await anext(docs)  # perhaps read before the call above
        after = (await anext(docs))["queue"]
        assert seen[-1]["queue"]["admitted"] <= middle["admitted"] <= after["admitted"]
        assert middle["waiting"] + middle["admitted"] == QUEUE_JOINS
        assert after["length"] + after["admitted"] == QUEUE_JOINS
        assert middle["admit_per_minute"] == after["admit_per_minute"] == 60
        # A pass lives pass_ttl_seconds from its rank's admission (looked or not): every
        # rank admitted in the last ten minutes holds one.
        assert middle["active_passes"] == middle["admitted"]
        assert after["active_passes"] == after["admitted"]

        # Paused, the frontier stands still: the same figures on both sides, rate 0.
        r = await client.patch(
            f"/admin/events/{event_id}", json={"status": "paused"}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        await anext(docs)  # perhaps read before the pause
        still = (await anext(docs))["queue"]
        same_as_queue_stats(still, await stats())
        assert still["admission_rate"] == 0, still
        assert 0 < still["admitted"] < QUEUE_JOINS, still
        # The admission rates over the readings add up to what was admitted.
        admitted = sum(d["queue"]["admission_rate"] * d["interval_seconds"] for d in seen)
        assert abs(admitted - seen[-1]["queue"]["admitted"]) < 0.05, seen


async def test_asked_for_json_it_answers_one_document(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client, categories=CATEGORIES)
    await hold(client, event_id, "c1", items=[("GA", 2)])
    # A dead letter (of this test's making: only its count matters here).
    await svc.redis.xadd(event_keys(event_id).deadletter, {"op": "confirm"})
    json_only = {**ADMIN, "accept": "application/json"}
    r = await client.get(f"/admin/events/{event_id}/live", headers=json_only)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["event_id"] == event_id and doc["rates"] is None
    assert category(doc, "GA")["held"] == 2
    assert doc["totals"]["holds"] == 1
    assert doc["write_behind"]["dead_letters"] == 1
    r = await client.get(f"/admin/events/{event_id}/live", headers={"accept": "application/json"})
    assert_problem(r, 401, "unauthorized")
    # Asked for both, or for anything: the stream.
    both = {**ADMIN, "accept": "application/json, text/event-stream"}
    async with client.stream("GET", f"/admin/events/{event_id}/live", headers=both) as r:
        assert r.headers["content-type"].startswith("text/event-stream")


async def test_refusals_of_events_redis_lacks_make_no_keys(
    client: httpx.AsyncClient, svc: Services
) -> None:
    unknown = new_event_id("nope")
    r = await client.post(f"/events/{unknown}/holds", json={"customer_id": "c"})
    assert r.status_code in (400, 404), r.text
    await asyncio.sleep(2.5)  # past every API process's tally
    assert await svc.redis.exists(event_keys(unknown).stats) == 0


async def test_the_stream_and_its_errors_need_the_admin_token(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client, categories=CATEGORIES)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic x"}):
        r = await client.get(f"/admin/events/{event_id}/live", headers=headers)
        assert_problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
    r = await client.get(f"/admin/events/{new_event_id()}/live", headers=ADMIN)
    assert_problem(r, 404, "event_not_found")
    r = await client.get("/admin/events/NOT_AN_ID/live", headers=ADMIN)
    assert_problem(r, 404, "event_not_found")


async def test_the_dashboard_page_is_static_and_self_contained(client: httpx.AsyncClient) -> None:
    r = await client.get("/admin/dashboard")
    assert r.status_code == 200
    # Once: Litestar adds the charset to a text/* media type that already had one.
    assert r.headers.get_list("content-type") == ["text/html; charset=utf-8"]
    page = r.text
    assert "<script>" in page and "sessionStorage" in page
    # Nothing from elsewhere: no external script, style, font or image, and the browser
    # is told so.
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


# --- one reader per event and process --------------------------------------------------------


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this module's own: its SLOWLOG records every command, and nobody else's."""
    with RedisServer(
        args=["--slowlog-log-slower-than", "0", "--slowlog-max-len", "100000"]
    ) as server:
        yield server


@pytest.fixture(scope="module")
def one_process(settings: Settings, own_redis: RedisServer) -> Iterator[ApiServer]:
    server = ApiServer({**server_env(settings), "BOXOFFICE_REDIS_URL": own_redis.url}, workers=1)
    server.start()
    yield server
    server.stop()


def live_script_sha() -> str:
    source = (LUA_DIR / "lib.lua").read_text() + "\n" + (LUA_DIR / "live.lua").read_text()
    return hashlib.sha1(source.encode()).hexdigest()


def live_calls(r: redis.Redis) -> list[float]:
    """When the live script was called (seconds), from the SLOWLOG."""
    entries: Any = r.slowlog_get(100_000)
    sha = live_script_sha()
    out = []
    for e in entries:
        command = e["command"]
        command = command.decode() if isinstance(command, bytes) else command
        if command.startswith(f"EVALSHA {sha}"):
            out.append(float(e["start_time"]))
    return out


async def gauges(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("boxoffice_live_readers", "boxoffice_live_watchers")
    }


async def test_one_reader_per_event_however_many_watch_and_leaving_frees_it(
    one_process: ApiServer, own_redis: RedisServer
) -> None:
    r = redis.Redis(port=own_redis.port)
    async with httpx.AsyncClient(base_url=one_process.url, timeout=30) as client:
        first = await create_event(client, categories=CATEGORIES)
        second = await create_event(client, categories=CATEGORIES)
        assert await gauges(client) == {
            "boxoffice_live_readers": 0,
            "boxoffice_live_watchers": 0,
        }
        async with contextlib.AsyncExitStack() as stack:
            streams = [
                await stack.enter_async_context(watching(client, event_id))
                for event_id in (first, first, first, second)
            ]
            for docs in streams:
                await anext(docs)
            assert await gauges(client) == {
                "boxoffice_live_readers": 2,
                "boxoffice_live_watchers": 4,
            }
            r.slowlog_reset()
            started = time.time()
            for _ in range(3):  # three more readings on every stream
                for docs in streams:
                    await anext(docs)
            calls = live_calls(r)
            seconds = time.time() - started
            # Two events read once a second each, not once per watcher (four).
            assert len(calls) <= 2 * (seconds + 1.5), (len(calls), seconds)
            assert len(calls) >= 2 * 2, calls
        # Every stream closed: no reader left, and Redis is no longer read.
        await eventually(lambda: _gauges_are(client, readers=0, watchers=0), within=10)
        await asyncio.sleep(1.5)
        r.slowlog_reset()
        await asyncio.sleep(2.5)
        assert live_calls(r) == []


async def _gauges_are(client: httpx.AsyncClient, readers: int, watchers: int) -> bool:
    return await gauges(client) == {
        "boxoffice_live_readers": readers,
        "boxoffice_live_watchers": watchers,
    }


async def test_a_client_that_vanishes_frees_its_reader(
    one_process: ApiServer, own_redis: RedisServer
) -> None:
    """A client that closes its connection mid-stream frees what it held; the reader goes
    on for a second watcher of the same event, and goes with the last."""
    async with httpx.AsyncClient(base_url=one_process.url, timeout=30) as client:
        event_id = await create_event(client, categories=CATEGORIES)
        async with watching(client, event_id) as staying:
            await anext(staying)
            gone = httpx.AsyncClient(base_url=one_process.url, timeout=30)
            response = await gone.send(
                gone.build_request("GET", f"/admin/events/{event_id}/live", headers=ADMIN),
                stream=True,
            )
            gone_docs = documents(response)  # referenced: its end would close the response
            await anext(gone_docs)
            assert await _gauges_are(client, readers=1, watchers=2)
            # Gone: the connection closed mid-stream, no request or word before.
            await gone.aclose()
            await eventually(lambda: _gauges_are(client, readers=1, watchers=1), within=10)
            # The one left still gets its figures each second.
            await anext(staying)
            await anext(staying)
        await eventually(lambda: _gauges_are(client, readers=0, watchers=0), within=10)


async def test_a_killed_process_leaves_no_watchers_behind(
    settings: Settings, own_redis: RedisServer
) -> None:
    """An API process killed mid-stream (out of memory, kill -9) is replaced; the gauges
    it kept in the metrics files leave the sums with it."""
    server = ApiServer({**server_env(settings), "BOXOFFICE_REDIS_URL": own_redis.url}, workers=1)
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            event_id = await create_event(client, categories=CATEGORIES)
            pid = server_pid(server)
            (worker,) = children(pid)
            with contextlib.suppress(httpx.HTTPError):
                async with watching(client, event_id) as docs:
                    await anext(docs)
                    assert await _gauges_are(client, readers=1, watchers=1)
                    os.kill(worker, signal.SIGKILL)
                    async for _ in docs:
                        pass
            await eventually(lambda: _answers(client), within=30)
            await eventually(lambda: _gauges_are(client, readers=0, watchers=0), within=10)
    finally:
        server.stop()


async def test_while_redis_is_away_the_stream_says_so_and_goes_on(settings: Settings) -> None:
    with RedisServer() as own:
        server = ApiServer({**server_env(settings), "BOXOFFICE_REDIS_URL": own.url}, workers=1)
        server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                event_id = await create_event(client, categories=CATEGORIES)
                url = f"/admin/events/{event_id}/live"
                async with client.stream("GET", url, headers=ADMIN) as r:
                    docs = documents(r)
                    kind, doc = await anext(docs)
                    assert kind == "message" and doc["event_id"] == event_id
                    own.stop()
                    async for kind, doc in docs:
                        if kind == "problem":
                            assert doc["code"] == "unavailable" and doc["status"] == 503, doc
                            break
                    # Back, empty: the event is loaded again from PostgreSQL.
                    own.start()
                    async for kind, doc in docs:
                        if kind == "message":
                            assert category(doc, "GA")["available"] == 5, doc
                            break
        finally:
            server.stop()


async def _answers(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/health")).status_code == 200
    except httpx.HTTPError:
        return False


def server_pid(server: ApiServer) -> int:
    proc = server._proc
    assert proc is not None
    return proc.pid


async def test_feed_in_process(svc: Services, client: httpx.AsyncClient) -> None:
    """The readers themselves: shared, handed the latest reading, gone with the last."""
    event_id = await create_event(client, categories=CATEGORIES)
    feed = livefeed.Feed(svc)
    a, first_a = await livefeed.first_reading(feed, event_id)
    b, first_b = await livefeed.first_reading(feed, event_id)
    assert list(feed.readers) == [event_id]
    task = feed.readers[event_id].task
    assert first_b.at >= first_a.at
    feed.leave(event_id, a)
    feed.leave(event_id, a)  # twice: no harm
    assert list(feed.readers) == [event_id]
    feed.leave(event_id, b)
    assert feed.readers == {}
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    with pytest.raises(Exception) as raised:
        await livefeed.first_reading(feed, new_event_id())
    assert getattr(raised.value, "code", None) == "event_not_found"
    assert feed.readers == {}


# --- the Grafana dashboard -----------------------------------------------------------------

GRAFANA = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "boxoffice.json"


async def test_the_grafana_dashboard_asks_for_metrics_that_exist(
    client: httpx.AsyncClient,
) -> None:
    """Every series a panel queries is one /metrics has (once an event has sold, held
    and refused, and one has a waiting room), and every panel reads the dashboard's
    Prometheus data source."""
    dashboard = json.loads(GRAFANA.read_text())
    event_id = await create_event(client, categories=CATEGORIES)
    sold = await hold(client, event_id, "c1", items=[("GA", 1)])
    assert (await client.post(f"/events/{event_id}/holds/{sold['hold_id']}/confirm")).is_success
    await hold(client, event_id, "c2", items=[("GA", 1)])
    r = await client.post(
        f"/events/{event_id}/holds",
        json={"customer_id": "c3", "items": [{"category": "GA", "quantity": 9}]},
    )
    assert_problem(r, 409, "sold_out")
    # And an event with a waiting room, someone in it: its gauges are there only then.
    room = {"admit_per_minute": 60, "pass_ttl_seconds": 600}
    queued = await create_event(client, categories=CATEGORIES[:1], waiting_room=room)
    r = await client.post(f"/events/{queued}/queue", json={"customer_id": "q1"})
    assert r.status_code == 201, r.text
    queried = set()
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            queried |= set(re.findall(r"boxoffice_[a-z_]+", target["expr"]))
    assert queried, dashboard
    exposed: set[str] = set()

    async def all_exposed() -> bool:  # once the refusal's tally has reached Redis
        text = (await client.get("/metrics")).text
        exposed.clear()
        exposed.update(s.name for f in text_string_to_metric_families(text) for s in f.samples)
        return queried <= exposed

    with contextlib.suppress(AssertionError):  # the assertion below names what is missing
        await eventually(all_exposed, within=10)
    assert queried <= exposed, queried - exposed
