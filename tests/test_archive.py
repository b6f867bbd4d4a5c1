"""An event's life: once over and drained, its live state leaves Redis (the admin route,
the command, the worker by itself); reads come from PostgreSQL without loading it back;
reopening it sells exactly what is left; a thousand events sold and archived leave Redis's
memory where it was."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections import Counter
from typing import Any

import httpx
import msgspec
import pytest
import redis.exceptions
import sqlalchemy as sa

from service.core import errors, schemas
from service.core.db import events
from service.core.keys import EVENTS, event_keys
from service.core.settings import Settings
from service.durable import archive, live, reconcile
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services
from service.selling import bookings, catalog, sales
from tests.apiserver import BOXOFFICE
from tests.conftest import (
    ADMIN,
    StartWorker,
    create_event,
    event_body,
    eventually,
    new_event_id,
    on_redis,
    server_env,
    services_with,
    worker_env,
)
from tests.servers import LocalCluster, RedisServer


async def hold(
    client: httpx.AsyncClient, event_id: str, items: list[Any], seats: list[str] | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"customer_id": "fan", "items": items}
    if seats:
        body["seats"] = seats
    return await client.post(f"/events/{event_id}/holds", json=body)


async def buy(
    client: httpx.AsyncClient, event_id: str, items: list[Any], seats: list[str] | None = None
) -> dict[str, Any]:
    r = await hold(client, event_id, items, seats)
    assert r.status_code == 201, r.text
    r = await client.post(f"/events/{event_id}/holds/{r.json()['hold_id']}/confirm")
    assert r.status_code == 200, r.text
    booking: dict[str, Any] = r.json()
    return booking


async def close(client: httpx.AsyncClient, event_id: str) -> None:
    r = await client.patch(f"/admin/events/{event_id}", json={"status": "closed"}, headers=ADMIN)
    assert r.status_code == 200, r.text


async def archive_now(client: httpx.AsyncClient, event_id: str) -> dict[str, Any]:
    r = await client.post(f"/admin/events/{event_id}/archive", headers=ADMIN)
    assert r.status_code == 202, r.text
    state: dict[str, Any] = r.json()
    return state


async def in_redis(svc: Services, event_id: str) -> list[bytes]:
    """The event's keys in Redis, but those that expire by themselves (hold TTL keys,
    Idempotency-Key records)."""
    found: list[bytes] = []
    async for key in svc.redis.scan_iter(match=f"{event_keys(event_id).tag}*", count=1000):
        if b":ttl:" not in key and b":idem" not in key:
            found.append(key)
    return found


async def test_an_event_not_over_is_refused(client: httpx.AsyncClient, svc: Services) -> None:
    event_id = await create_event(client)
    r = await client.post(f"/admin/events/{event_id}/archive", headers=ADMIN)
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "event_not_over"
    assert await svc.redis.exists(event_keys(event_id).meta)
    r = await client.post(f"/admin/events/{new_event_id()}/archive", headers=ADMIN)
    assert r.status_code == 404 and r.json()["code"] == "event_not_found"
    r = await client.post(f"/admin/events/{event_id}/archive")
    assert r.status_code == 401
    r = await client.get(f"/events/{event_id}")
    assert r.json()["archived"] is False


async def test_long_past_counts_as_over(client: httpx.AsyncClient, svc: Services) -> None:
    event_id = await create_event(client, starts_at="2020-01-01T19:00:00Z")
    await buy(client, event_id, [{"category": "GA", "quantity": 1}])
    assert (await archive_now(client, event_id))["archived"] is True
    assert await in_redis(svc, event_id) == []


async def test_an_archived_event_is_read_from_postgresql_without_loading_it(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client)
    first = await buy(client, event_id, [{"category": "GA", "quantity": 3}])
    second = await buy(client, event_id, [{"category": "VIP", "quantity": 2}], ["BOX-1"])
    before = (await client.get(f"/events/{event_id}")).json()
    await close(client, event_id)
    state = await archive_now(client, event_id)
    assert state == {"event_id": event_id, "archived": True, "waiting_for": None}
    assert await in_redis(svc, event_id) == []
    assert event_id.encode() not in await svc.redis.smembers(EVENTS)

    r = await client.get(f"/events/{event_id}")
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["archived"] is True and after["status"] == "closed"
    assert after["categories"] == before["categories"]
    assert {c["name"]: c["available"] for c in after["categories"]} == {"GA": 47, "VIP": 9}
    for booking in (first, second):
        r = await client.get(f"/events/{event_id}/bookings/{booking['booking_id']}")
        assert r.status_code == 200, r.text
        assert r.json()["persisted"] is True
        assert r.json()["seats"] == booking["seats"]
    r = await client.get(f"/admin/events/{event_id}/bookings", headers=ADMIN)
    assert len(r.json()["bookings"]) == 2
    r = await client.get(f"/events/{event_id}/holds/{first['hold_id']}")
    assert r.status_code == 404 and r.json()["code"] == "hold_not_found"
    r = await hold(client, event_id, [{"category": "GA", "quantity": 1}])
    assert r.status_code == 409 and r.json()["code"] == "not_on_sale"
    r = await client.get(f"/events/{event_id}/seats", params={"category": "VIP"})
    assert r.status_code == 200, r.text
    seats = {s["label"]: s["status"] for s in r.json()["seats"]}
    assert len(seats) == 12 and sorted(k for k, v in seats.items() if v == "sold") == sorted(
        second["seats"]
    )
    r = await client.get(f"/events/{event_id}/seats", params={"status": "sold", "limit": 5})
    page = r.json()
    assert [s["label"] for s in page["seats"]] == [x for x in second["seats"] if x < "A-6"]
    assert page["next_cursor"] is not None
    r = await client.get(
        f"/admin/events/{event_id}/live", headers={**ADMIN, "accept": "application/json"}
    )
    assert r.status_code == 200, r.text
    figures = {c["name"]: (c["available"], c["held"], c["sold"]) for c in r.json()["categories"]}
    assert figures == {"GA": (47, 0, 3), "VIP": (9, 0, 3)}
    r = await client.get(f"/admin/events/{event_id}/reconcile", headers=ADMIN)
    report = r.json()
    assert report["consistent"] is True, report
    assert report["events"][0]["archived"] is True
    assert report["events"][0]["bookings_in_postgres"] == 2
    # A repeat is 202 too; and nothing of all this read the event back into Redis.
    assert (await archive_now(client, event_id))["archived"] is True
    assert await in_redis(svc, event_id) == []


async def test_a_reopened_event_sells_exactly_what_is_left(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client)
    await buy(client, event_id, [{"category": "GA", "quantity": 8}], ["A-1", "A-2"])
    refunded = await buy(client, event_id, [{"category": "GA", "quantity": 5}])
    await close(client, event_id)
    await archive_now(client, event_id)
    # A refund of an archived event: PostgreSQL alone, and the event stays out of Redis.
    r = await client.delete(
        f"/admin/events/{event_id}/bookings/{refunded['booking_id']}", headers=ADMIN
    )
    assert r.status_code == 204, r.text
    assert await in_redis(svc, event_id) == []
    # A PATCH that does not reopen it changes PostgreSQL alone.
    r = await client.patch(f"/admin/events/{event_id}", json={"name": "Renamed"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["name"] == "Renamed"
    assert r.json()["archived"] is True
    assert await in_redis(svc, event_id) == []

    r = await client.patch(f"/admin/events/{event_id}", json={"status": "on_sale"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["archived"] is False and r.json()["status"] == "on_sale"
    left = {c["name"]: c["available"] for c in r.json()["categories"]}
    assert left == {"GA": 42, "VIP": 10}
    r = await hold(client, event_id, [{"category": "GA", "quantity": 1}], ["A-1"])
    assert r.status_code == 409 and r.json()["code"] == "seats_unavailable"
    for _ in range(4):
        await buy(client, event_id, [{"category": "GA", "quantity": 10}])
    await buy(client, event_id, [{"category": "GA", "quantity": 2}])
    r = await hold(client, event_id, [{"category": "GA", "quantity": 1}])
    assert r.status_code == 409 and r.json()["code"] == "sold_out"
    vip = await buy(client, event_id, [{"category": "VIP", "quantity": 10}])
    assert "A-1" not in vip["seats"] and "A-2" not in vip["seats"]
    r = await hold(client, event_id, [{"category": "VIP", "quantity": 1}])
    assert r.status_code == 409 and r.json()["code"] == "sold_out"
    report = await reconcile.reconcile(svc, event_id)
    assert report.consistent, reconcile.render(report)


async def test_a_live_hold_keeps_the_event_until_it_ends(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client)
    r = await hold(client, event_id, [{"category": "GA", "quantity": 2}])
    hold_id = r.json()["hold_id"]
    await close(client, event_id)
    state = await archive_now(client, event_id)
    assert state == {"event_id": event_id, "archived": False, "waiting_for": "holds"}
    assert await svc.redis.exists(event_keys(event_id).meta)
    async with svc.engine.connect() as conn:
        row = (await conn.execute(sa.select(events).where(events.c.id == event_id))).one()
    assert row.archived_at is None and row.archive_asked_at is not None
    # The hold goes on: confirmed after the archive was asked for, its booking is kept.
    r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm")
    assert r.status_code == 200, r.text
    booking_id = r.json()["booking_id"]
    assert (await archive_now(client, event_id))["archived"] is True
    r = await client.get(f"/events/{event_id}/bookings/{booking_id}")
    assert r.status_code == 200 and r.json()["persisted"] is True


async def test_an_undrained_outbox_keeps_the_event(svc: Services, settings: Settings) -> None:
    """Until the write-behind has every entry, the script refuses: nothing unwritten goes."""
    event_id = new_event_id()
    await catalog.create_event(svc, msgspec.convert(event_body(event_id), schemas.EventCreate))
    await _sell(svc, event_id, 2)
    await catalog.patch_event(svc, event_id, schemas.EventPatch(status="closed"))
    outcome = await archive.archive(svc, event_id, "now")
    assert outcome.waiting_for == "outbox"
    assert await svc.redis.xlen(event_keys(event_id).outbox) == 2
    outcome = await archive.ask(svc, event_id)  # writes the outbox first
    assert outcome.archived
    page = await bookings.list_bookings(svc, event_id, None, None, 10, None)
    assert len(page.bookings) == 2


async def _sell(svc: Services, event_id: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        body = schemas.HoldCreate(
            customer_id=f"c{i}", items=[schemas.HoldItem(category="GA", quantity=1)]
        )
        h, _ = await sales.create_hold_counted(svc, event_id, body, None)
        b = await sales.confirm_hold(svc, event_id, h.hold_id, schemas.HoldConfirm(), None)
        ids.append(b.booking_id)
    return ids


async def test_the_worker_archives_by_itself(
    client: httpx.AsyncClient, svc: Services, settings: Settings, start_worker: StartWorker
) -> None:
    closed = await create_event(client)
    booking = await buy(client, closed, [{"category": "GA", "quantity": 2}])
    await close(client, closed)
    past = await create_event(client, starts_at="2021-01-01T00:00:00Z")
    await buy(client, past, [{"category": "GA", "quantity": 1}])
    selling = await create_event(client)
    start_worker(
        worker_env(
            settings,
            BOXOFFICE_ARCHIVE_INTERVAL_SECONDS="0.5",
            BOXOFFICE_HOLD_RETENTION_SECONDS="1",
        )
    )

    async def gone() -> bool:
        return not await in_redis(svc, closed) and not await in_redis(svc, past)

    await eventually(gone, within=30)
    assert await svc.redis.exists(event_keys(selling).meta)
    r = await client.get(f"/events/{closed}/bookings/{booking['booking_id']}")
    assert r.status_code == 200 and r.json()["persisted"] is True
    assert (await client.get(f"/events/{past}")).json()["archived"] is True


def _cli(*args: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BOXOFFICE, "archive", *args],
        env={**os.environ, **server_env(settings)},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_command(client: httpx.AsyncClient, svc: Services, settings: Settings) -> None:
    event_id = await create_event(client)
    await buy(client, event_id, [{"category": "GA", "quantity": 1}])
    result = await asyncio.to_thread(_cli, "--event", event_id, settings=settings)
    assert result.returncode == 2, result
    assert "not over" in result.stderr and "Traceback" not in result.stderr
    await close(client, event_id)
    result = await asyncio.to_thread(_cli, "--event", event_id, settings=settings)
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"{event_id}: archived"
    assert await in_redis(svc, event_id) == []

    others = [await create_event(client) for _ in range(2)]
    for other in others:
        await close(client, other)
    result = await asyncio.to_thread(_cli, "--all-over", "--json", settings=settings)
    assert result.returncode == 0, result
    done = {o["event_id"] for o in msgspec.json.decode(result.stdout) if o["archived"]}
    assert set(others) <= done
    for other in others:
        assert await in_redis(svc, other) == []
    result = await asyncio.to_thread(_cli, settings=settings)
    assert result.returncode == 2  # --event or --all-over is required


# --- memory: a thousand events --------------------------------------------------------

EVENTS_SOLD = 1000
CONCURRENCY = 16


def _small_event(event_id: str) -> schemas.EventCreate:
    body = event_body(
        event_id,
        hold_ttl_seconds=10,
        categories=[
            {"name": "GA", "price": 2500, "currency": "EUR", "capacity": 20},
            {
                "name": "VIP",
                "price": 9900,
                "currency": "EUR",
                "seat_blocks": [{"rows": ["A"], "seats_per_row": 10}],
            },
        ],
    )
    return msgspec.convert(body, schemas.EventCreate)


async def _life(svc: Services, event_id: str) -> list[str]:
    """Created, sold (GA and seats), closed, archived: the booking ids."""
    await catalog.create_event(svc, _small_event(event_id))
    sold = []
    for i, item in enumerate((("GA", 3), ("VIP", 2), ("GA", 1))):
        body = schemas.HoldCreate(
            customer_id=f"fan-{i}", items=[schemas.HoldItem(category=item[0], quantity=item[1])]
        )
        h, _ = await sales.create_hold_counted(svc, event_id, body, None)
        b = await sales.confirm_hold(svc, event_id, h.hold_id, schemas.HoldConfirm(), None)
        sold.append(b.booking_id)
    released, _ = await sales.create_hold_counted(
        svc,
        event_id,
        schemas.HoldCreate(customer_id="gone", items=[schemas.HoldItem(category="GA", quantity=2)]),
        None,
    )
    await sales.release_hold(svc, event_id, released.hold_id, None)
    await catalog.patch_event(svc, event_id, schemas.EventPatch(status="closed"))
    outcome = await archive.ask(svc, event_id)
    assert outcome.archived, outcome
    return sold


async def _read_back(svc: Services, sold: list[tuple[str, list[str]]]) -> None:
    """Every booking readable, every event consistent, from PostgreSQL."""
    for event_id, booking_ids in sold:
        for booking_id in booking_ids:
            b = await bookings.get_booking(svc, event_id, booking_id)
            assert b.persisted and b.status == "confirmed"
        view = await catalog.view_event(svc, event_id)
        assert view.archived and [c.available for c in view.categories] == [16, 8]
        report = await reconcile.reconcile(svc, event_id)
        assert report.consistent and report.events[0].archived, reconcile.render(report)


# Redis's Lua heap counts in used_memory here (a third of an empty server's), and holds
# garbage of the scripts run until its incremental collector gets to it: tens of KB that
# come and go. Collected fully before each reading, so that readings compare what is kept.
_COLLECT_LUA_GARBAGE = "collectgarbage('collect') return 1"


async def _hold_ttls_gone(svc: Services) -> bool:
    """No hold's TTL key left (keys.hold_ttl): each expires by itself, 10 s after its hold."""
    async for _ in svc.redis.scan_iter(match="*}:ttl:*", count=10_000):
        return False
    return True


async def _used_memory(svc: Services) -> int:
    # Expired keys are reclaimed by Redis's active expiry; SCAN also expires what it meets.
    async for _ in svc.redis.scan_iter(count=10_000):
        pass
    await asyncio.sleep(0.2)  # UNLINK frees big values off the main thread
    await svc.redis.eval(_COLLECT_LUA_GARBAGE, 0)
    info: Any = await svc.redis.info("memory")
    return int(info["used_memory"])


@pytest.mark.slow  # a scale test: make test runs it, make test-fast not
async def test_a_thousand_events_sold_and_archived_leave_redis_as_it_was(
    settings: Settings,
) -> None:
    with RedisServer() as server:
        own = msgspec.structs.replace(on_redis(settings, server.url), rate_limit_customer_holds=0)
        async with services_with(own) as svc:
            await svc.start()
            # Warm up: every script, command and pooled connection in use before the
            # baseline (Redis keeps a latency histogram per command name, ~24 KB, made on
            # first use; and ~20 KB per client connection, which the pool keeps).
            warm = [new_event_id(f"warm{i}") for i in range(CONCURRENCY)]
            lives = await asyncio.gather(*(_life(svc, event_id) for event_id in warm))
            await _read_back(svc, list(zip(warm, lives, strict=True)))
            await eventually(lambda: _hold_ttls_gone(svc))  # the warm-up's, as they expire
            clients = len(await svc.redis.client_list())
            await svc.redis.dbsize()  # used below: its histogram made before the baseline
            start = await _used_memory(svc)
            started = time.monotonic()
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(i: int) -> tuple[str, list[str]]:
                async with gate:
                    event_id = new_event_id(f"mem{i}")
                    return event_id, await _life(svc, event_id)

            sold = await asyncio.gather(*(one(i) for i in range(EVENTS_SOLD)))
            took = time.monotonic() - started
            peak_keys = await svc.redis.dbsize()
            await eventually(lambda: _hold_ttls_gone(svc))  # they expire by themselves
            end = await _used_memory(svc)
            await _read_back(svc, sold)
            read = await _used_memory(svc)
            assert await live.live_event_ids(svc) == []
            print(
                f"\nused_memory: {start} bytes before {EVENTS_SOLD} events, {end} after"
                f" they were sold and archived ({(end - start) / start:+.2%}), {read} after"
                f" every booking and report was read ({(read - start) / start:+.2%});"
                f" {took:.0f} s; keys at the end of the sales: {peak_keys}; client connections"
                f" {clients} before, {len(await svc.redis.client_list())} after"
            )
            assert abs(end - start) <= start * 0.05, (start, end)
            assert abs(read - start) <= start * 0.05, (start, read)


async def test_reads_of_an_archived_event_do_not_load_it(svc: Services, settings: Settings) -> None:
    event_id = new_event_id()
    await catalog.create_event(svc, _small_event(event_id))
    [booking_id] = await _sell(svc, event_id, 1)
    await catalog.patch_event(svc, event_id, schemas.EventPatch(status="closed"))
    assert (await archive.ask(svc, event_id)).archived
    view = await catalog.view_event(svc, event_id)
    assert view.archived and view.categories[0].available == 19
    await bookings.get_booking(svc, event_id, booking_id)
    await bookings.list_bookings(svc, event_id, None, None, 10, None)
    await live.ensure_loaded(svc, event_id)
    assert not await svc.redis.exists(event_keys(event_id).meta)
    with pytest.raises(Exception) as raised:
        await sales.get_hold(svc, event_id, "x" * 22)
    assert getattr(raised.value, "code", None) == "hold_not_found"


async def test_on_a_cluster_archived_events_leave_every_primary(
    settings: Settings, cluster: LocalCluster
) -> None:
    """The registry sits on a node of its own: every event, whichever primary has it,
    leaves that primary whole and the registry too; reopened, it sells what is left."""
    own = msgspec.structs.replace(on_redis(settings, cluster.url), rate_limit_customer_holds=0)
    async with services_with(own) as svc:
        await svc.start()
        ids = [event_id for per in cluster.event_ids(1).values() for event_id in per]
        for event_id in ids:
            await catalog.create_event(svc, _small_event(event_id))
            await _sell(svc, event_id, 2)
            await catalog.patch_event(svc, event_id, schemas.EventPatch(status="closed"))
            assert (await archive.ask(svc, event_id)).archived
        for event_id in ids:
            assert await in_redis(svc, event_id) == []  # SCAN visits every primary
            assert event_id not in await live.live_event_ids(svc)
            report = await reconcile.reconcile(svc, event_id)
            assert report.consistent and report.events[0].archived, reconcile.render(report)
        reopened = ids[0]
        await catalog.patch_event(svc, reopened, schemas.EventPatch(status="on_sale"))
        assert reopened in await live.live_event_ids(svc)
        for n in (10, 8, 1):  # 20 less the 2 sold, and then one too many
            body = schemas.HoldCreate(
                customer_id="late", items=[schemas.HoldItem(category="GA", quantity=n)]
            )
            if n == 1:
                with pytest.raises(errors.SoldOut):
                    await sales.create_hold_counted(svc, reopened, body, None)
            else:
                await sales.create_hold_counted(svc, reopened, body, None)


async def test_a_drain_whose_outbox_is_archived_before_its_trim_ends_cleanly(
    svc: Services,
) -> None:
    """The archive can take the outbox between a drain's last read and its trim (the race
    below met it): a stream gone is nothing left to trim, not an error."""
    event_id = new_event_id()
    await catalog.create_event(svc, msgspec.convert(event_body(event_id), schemas.EventCreate))
    wb = WriteBehind(svc, "trim")
    assert await wb.drain(event_id) == 0  # the group made, the stream read
    outbox = event_keys(event_id).outbox
    await svc.redis.delete(outbox)
    await wb._trim(outbox)
    assert not await svc.redis.exists(outbox)


async def test_sales_racing_the_archive_are_never_lost_nor_oversold(svc: Services) -> None:
    """An event long past its start but still on sale: buyers and archives at once. Every
    confirmed booking reaches PostgreSQL, whichever wins, and stock adds up."""
    event_id = new_event_id()
    await catalog.create_event(
        svc,
        msgspec.convert(
            event_body(event_id, starts_at="2020-01-01T00:00:00Z"), schemas.EventCreate
        ),
    )
    booked: list[str] = []
    refused: list[str] = []
    outcomes: list[str] = []

    async def buyer(i: int) -> None:
        await asyncio.sleep(i * 0.03)  # spread over the archives' attempts
        body = schemas.HoldCreate(
            customer_id=f"b{i}", items=[schemas.HoldItem(category="GA", quantity=1)]
        )
        try:
            h, _ = await sales.create_hold_counted(svc, event_id, body, None)
        except errors.NotOnSale:
            refused.append(f"b{i}")
            return
        b = await sales.confirm_hold(svc, event_id, h.hold_id, schemas.HoldConfirm(), None)
        booked.append(b.booking_id)

    async def archiver() -> None:
        # As the worker's step does: tries while the write-behind writes the outbox.
        while not booked:
            await asyncio.sleep(0.005)
        while len(booked) + len(refused) < 40:
            outcome = await archive.archive(svc, event_id, "now")
            outcomes.append(outcome.waiting_for or "archived")
            await asyncio.sleep(0.005)

    async def writer() -> None:
        wb = WriteBehind(svc, "race")
        while len(booked) + len(refused) < 40:
            try:
                await wb.drain(event_id)
            except redis.exceptions.ResponseError as e:
                # The worker's loop takes these in its stride: the stream was archived.
                assert "UNBLOCKED" in str(e) or "NOGROUP" in str(e), e
            await asyncio.sleep(0.005)

    await asyncio.gather(*(buyer(i) for i in range(40)), archiver(), writer())
    while not (await archive.ask(svc, event_id)).archived:
        await asyncio.sleep(0.1)
    print(f"\nbooked {len(booked)}, refused {len(refused)}, archive tries: {Counter(outcomes)}")
    assert len(booked) + len(refused) == 40
    for booking_id in booked:
        assert (await bookings.get_booking(svc, event_id, booking_id)).persisted
    view = await catalog.view_event(svc, event_id)
    assert view.archived
    assert {c.name: c.available for c in view.categories} == {"GA": 50 - len(booked), "VIP": 12}
    report = await reconcile.reconcile(svc, event_id)
    assert report.consistent, reconcile.render(report)
    assert report.events[0].bookings_in_postgres == len(booked)


async def test_dead_letters_keep_the_event_until_an_operator_acts(svc: Services) -> None:
    """A dead letter is never dropped: the event stays in Redis with it, and goes once it
    is replayed or discarded."""
    event_id = new_event_id()
    await catalog.create_event(svc, _small_event(event_id))
    await _sell(svc, event_id, 1)
    await catalog.patch_event(svc, event_id, schemas.EventPatch(status="closed"))
    dead = event_keys(event_id).deadletter
    entry = await svc.redis.xadd(dead, {"op": "confirm", "error": "refused by the test"})
    outcome = await archive.ask(svc, event_id)
    assert outcome.waiting_for == "dead_letters"
    assert await svc.redis.xlen(dead) == 1 and await svc.redis.exists(event_keys(event_id).meta)
    await svc.redis.xdel(dead, entry)  # as a discard does
    assert (await archive.ask(svc, event_id)).archived
    assert await in_redis(svc, event_id) == []
