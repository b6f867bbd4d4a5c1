"""Nothing impossible reaches the durable record: the write-behind dead-letters an outbox
entry whose booking cannot be (a forged one), and writes the rest of its batch;
PostgreSQL's CHECK constraints refuse such rows however they come; and reconcile never
counts stock from a booking that breaks the rules, even one written before them."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from service.core.keys import event_keys
from service.core.settings import Settings
from service.durable import migrate
from service.durable.outbox import outbox_state
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services
from tests import test_reconcile
from tests.conftest import availability, create_event, eventually
from tests.test_reconcile import confirm, hold, kinds, run_cli
from tests.test_writebehind import persisted_ids

Own = tuple[httpx.AsyncClient, Services, dict[str, str]]
own = test_reconcile.own  # the fixture: an API and a worker on a Redis they may flush


def booking(**fields: Any) -> dict[str, Any]:
    """A booking as lua/confirm.lua puts it in the outbox: two GA tickets of the default
    test event (tests/conftest.py event_body: GA at 2500 EUR, VIP seated at 9900)."""
    return {
        "id": str(uuid.uuid4()),
        "h": f"h-{uuid.uuid4().hex}",
        "c": "buyer",
        "it": [["GA", 2]],
        "st": [],
        "q": {"GA": 2},
        "n": 2,
        "t": 5000,
        "cu": "EUR",
        "ca": int(time.time() * 1000),
        "s": "confirmed",
        **fields,
    }


GOOD = {
    "two GA tickets": booking(),
    "a named seat and a best-available one": booking(
        it=[["VIP", 1]], st=["A-3", "A-1"], q={"VIP": 2}, n=2, t=19800
    ),
    "GA and a seat": booking(
        it=[["GA", 1]], st=["BOX-1"], q={"GA": 1, "VIP": 1}, n=2, t=2500 + 9900
    ),
}
FORGED = {
    "negative quantity": booking(it=[["GA", -5]], q={"GA": -5}, n=-5, t=-12500),
    "negative tickets, positive total": booking(q={"GA": -5, "VIP": 7}, it=[], n=2, t=56800),
    "zero quantity": booking(it=[["GA", 0]], q={"GA": 0}, n=0, t=0),
    "unknown category": booking(it=[["Balcony", 2]], q={"Balcony": 2}),
    "unknown seat": booking(it=[], st=["Z-99"], q={"VIP": 1}, n=1, t=9900),
    "a seat counted in the wrong category": booking(
        it=[["GA", 1]], st=["A-4"], q={"GA": 1}, n=1, t=2500
    ),
    "wrong total": booking(t=1),
    "tickets that do not add up": booking(n=3, t=5000),
    "more asked than sold": booking(it=[["GA", 3]]),
    "a seat twice": booking(it=[], st=["A-5", "A-5"], q={"VIP": 2}, n=2, t=19800),
    "another currency": booking(cu="USD"),
}


async def test_forged_entries_are_dead_lettered_and_their_batch_is_written(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client)
    keys = event_keys(event_id)
    sources: dict[bytes, str] = {}
    # Good and forged entries interleaved, all in one batch.
    for pair in itertools.zip_longest(GOOD.items(), FORGED.items()):
        for name, record in (p for p in pair if p is not None):
            fields = {"op": "confirm", "booking": json.dumps(record)}
            entry_id: Any = await svc.redis.xadd(keys.outbox, fields)  # type: ignore[arg-type]
            sources[entry_id] = name
    wb = WriteBehind(svc, "rules")
    assert await wb.drain(event_id) == len(GOOD) + len(FORGED)

    assert sorted(await persisted_ids(svc, event_id)) == sorted(g["id"] for g in GOOD.values())
    letters: Any = await svc.redis.xrange(keys.deadletter)
    refused = {sources[f[b"source_id"]]: f for _, f in letters}
    assert set(refused) == set(FORGED)
    for name, fields in refused.items():
        assert fields[b"attempts"] == b"1", name  # at once: trying again cannot help
        assert json.loads(fields[b"booking"])["id"] == FORGED[name]["id"]
    assert b"-5" in refused["negative quantity"][b"error"]
    assert b"Balcony" in refused["unknown category"][b"error"]
    assert b"Z-99" in refused["unknown seat"][b"error"]
    assert b"5000" in refused["wrong total"][b"error"]
    state = await outbox_state(svc, event_id)
    assert (state.backlog, state.dead_letters) == (0, len(FORGED))


async def _insert(conn: AsyncConnection, table: str, **row: Any) -> None:
    columns = ", ".join(row)
    values = ", ".join(f":{c}" for c in row)
    await conn.execute(sa.text(f"INSERT INTO {table} ({columns}) VALUES ({values})"), row)


def _booking_row(event_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "booking_id": uuid.uuid4(),
        "event_id": event_id,
        "hold_id": "h",
        "customer_id": "c",
        "status": "confirmed",
        "total": 2500,
        "currency": "EUR",
        "seats": [],
        "confirmed_at": datetime(2030, 1, 1, tzinfo=UTC),
        **fields,
    }


BAD_BOOKINGS: dict[str, dict[str, Any]] = {
    "ck_bookings_total": {"total": -500},
    "ck_bookings_seats": {"seats": ["A-1", None]},
    "ck_bookings_cancelled": {"status": "cancelled"},
}
BAD_ITEMS: dict[str, list[dict[str, Any]]] = {
    "ck_booking_items_tickets": [{"quantity": 0, "tickets": 0}],
    "ck_booking_items_quantity": [{"quantity": -5, "tickets": 1}, {"quantity": 3, "tickets": 2}],
    "ck_booking_items_position": [{"position": -1, "quantity": 1, "tickets": 1}],
}


async def test_postgresql_refuses_impossible_rows(client: httpx.AsyncClient, svc: Services) -> None:
    event_id = await create_event(client)
    bad_rows = [("bookings", name, fields) for name, fields in BAD_BOOKINGS.items()] + [
        ("booking_items", name, fields) for name, cases in BAD_ITEMS.items() for fields in cases
    ]
    for table, constraint, fields in bad_rows:
        with pytest.raises(sa.exc.IntegrityError) as refused:
            async with svc.engine.begin() as conn:
                row = _booking_row(event_id, **(fields if table == "bookings" else {}))
                await _insert(conn, "bookings", **row)
                if table == "booking_items":
                    item = {"booking_id": row["booking_id"], "category": "GA", "position": 0}
                    await _insert(conn, "booking_items", **{**item, **fields})
        assert constraint in str(refused.value), (constraint, fields)
    with pytest.raises(sa.exc.IntegrityError, match=r"ck_booking_items_(tickets|quantity)"):
        async with svc.engine.begin() as conn:  # breaks both: either may say so
            row = _booking_row(event_id)
            await _insert(conn, "bookings", **row)
            item = {"booking_id": row["booking_id"], "category": "GA", "position": 0}
            await _insert(conn, "booking_items", **item, quantity=0, tickets=-5)
    async with svc.engine.begin() as conn:  # a sound row goes in
        row = _booking_row(event_id)
        await _insert(conn, "bookings", **row)
        item = {"booking_id": row["booking_id"], "category": "GA", "position": 0}
        await _insert(conn, "booking_items", **item, quantity=1, tickets=1)


async def _drained(svc: Services, event_id: str) -> bool:
    return (await outbox_state(svc, event_id)).backlog == 0


async def _sell_ga(client: httpx.AsyncClient, event_id: str) -> None:
    for i in range(5):
        items = [{"category": "GA", "quantity": 3}]
        await confirm(client, event_id, await hold(client, event_id, f"c{i}", items=items))


PRICED = {"categories": [{"name": "GA", "price": 100, "currency": "EUR", "capacity": 40}]}


async def test_a_forged_entry_never_puts_sold_tickets_back_on_sale(own: Own) -> None:
    """The probe's case: a forged entry with quantity -5, then FLUSHALL and a repair."""
    client, svc, env = own
    event_id = await create_event(client, **PRICED)
    await _sell_ga(client, event_id)
    forged = booking(it=[["GA", -5]], q={"GA": -5}, n=-5, t=-500)
    fields = {"op": "confirm", "booking": json.dumps(forged)}
    await svc.redis.xadd(event_keys(event_id).outbox, fields)  # type: ignore[arg-type]
    await eventually(lambda: _drained(svc, event_id))
    assert forged["id"] not in await persisted_ids(svc, event_id)
    assert await availability(client, event_id) == {"GA": 25}

    await svc.redis.flushall()
    code, report = await asyncio.to_thread(run_cli, env, "--event", event_id, "--repair")
    assert code == 0, report
    assert await availability(client, event_id) == {"GA": 40 - 15}


Legacy = tuple[uuid.UUID, list[tuple[str, str]]]


async def _legacy_row(svc: Services, event_id: str, quantity: int) -> Legacy:
    """A booking PostgreSQL took before it had the constraints (as the probe's forged
    entry was): written with them lifted, then put back NOT VALID, as migration 0005
    leaves them on a database that holds such a row. Returns the booking's id and the
    constraints that were valid before."""
    booking_id = uuid.uuid4()
    async with svc.engine.begin() as conn:
        checks = (
            await conn.execute(
                sa.text(
                    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid),"
                    " convalidated"
                    " FROM pg_constraint WHERE contype = 'c' AND conname LIKE 'ck_booking%'"
                    " AND conname <> 'ck_bookings_status'"
                )
            )
        ).all()
        for table, name, _, _ in checks:
            await conn.execute(sa.text(f"ALTER TABLE {table} DROP CONSTRAINT {name}"))
        row = _booking_row(event_id, booking_id=booking_id, total=100 * quantity)
        await _insert(conn, "bookings", **row)
        await _insert(
            conn,
            "booking_items",
            booking_id=booking_id,
            category="GA",
            position=0,
            quantity=quantity,
            tickets=quantity,
        )
        for table, name, definition, _ in checks:
            check = definition.removesuffix(" NOT VALID")
            await conn.execute(
                sa.text(f"ALTER TABLE {table} ADD CONSTRAINT {name} {check} NOT VALID")
            )
    return booking_id, [(table, name) for table, name, _, valid in checks if valid]


async def _remove(svc: Services, legacy: Legacy) -> None:
    """The legacy row gone, the constraints valid before are valid again."""
    booking_id, valid = legacy
    async with svc.engine.begin() as conn:
        await conn.execute(sa.text("DELETE FROM bookings WHERE booking_id = :b"), {"b": booking_id})
        for table, name in valid:
            await conn.execute(sa.text(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}"))


async def test_repair_never_counts_stock_from_a_bad_record(own: Own) -> None:
    """A booking of -5 tickets already in PostgreSQL: Redis loses everything, and the
    repair loads the event without it (the sold tickets stay sold), and says so."""
    client, svc, env = own
    event_id = await create_event(client, **PRICED)
    await _sell_ga(client, event_id)
    await eventually(lambda: _drained(svc, event_id))
    legacy = await _legacy_row(svc, event_id, -5)
    try:
        await _bad_record_is_reported_and_left_out(client, svc, env, event_id, str(legacy[0]))
    finally:
        await _remove(svc, legacy)


async def _bad_record_is_reported_and_left_out(
    client: httpx.AsyncClient, svc: Services, env: dict[str, str], event_id: str, bad: str
) -> None:
    code, report = await asyncio.to_thread(run_cli, env, "--event", event_id)
    assert code == 1
    assert kinds(report) == {"booking_invalid"}
    (problem,) = report["events"][0]["problems"]
    assert bad in problem["detail"] and "-5" in problem["detail"], problem

    await svc.redis.flushall()
    code, report = await asyncio.to_thread(run_cli, env, "--event", event_id, "--repair")
    assert code == 1, report  # the bad record stays for a person to deal with
    assert kinds(report) == {"booking_invalid"}
    assert await availability(client, event_id) == {"GA": 40 - 15}
    assert await svc.redis.hget(event_keys(event_id).bookings, bad) is None


@pytest.fixture
async def scratch_database(settings: Settings) -> AsyncIterator[str]:
    """A database of the test's own, to migrate step by step."""
    url = make_url(settings.database_url)
    scratch = url.set(database=f"{url.database}_rules").render_as_string(hide_password=False)
    admin = create_async_engine(
        url.set(database="postgres").render_as_string(hide_password=False),
        isolation_level="AUTOCOMMIT",
    )
    drop = sa.text(f'DROP DATABASE IF EXISTS "{url.database}_rules" WITH (FORCE)')
    try:
        async with admin.connect() as conn:
            await conn.execute(drop)
        await asyncio.to_thread(migrate.ensure_database, scratch)
        yield scratch
        async with admin.connect() as conn:
            await conn.execute(drop)
    finally:
        await admin.dispose()


async def test_the_migration_keeps_a_database_that_holds_a_bad_row(scratch_database: str) -> None:
    """Upgrading a database that already holds an impossible row works: each constraint
    is enforced from then on, validated where no row breaks it, left NOT VALID where one
    does (and reconcile reports that row)."""
    config = migrate._config(scratch_database)
    await asyncio.to_thread(command.upgrade, config, "0004")
    engine = create_async_engine(scratch_database)
    try:
        async with engine.begin() as conn:
            await _insert(
                conn,
                "events",
                id="ev",
                name="ev",
                starts_at=datetime(2030, 1, 1, tzinfo=UTC),
                status="on_sale",
                hold_ttl_seconds=60,
                max_per_order=5,
                currency="EUR",
            )
            row = _booking_row("ev")
            await _insert(conn, "bookings", **row)
            item = {"booking_id": row["booking_id"], "category": "GA", "position": 0}
            await _insert(conn, "booking_items", **item, quantity=-5, tickets=-5)
        await asyncio.to_thread(migrate.upgrade, scratch_database)
        async with engine.connect() as conn:
            validated: dict[str, bool] = dict(
                (
                    await conn.execute(
                        sa.text(
                            "SELECT conname, convalidated FROM pg_constraint"
                            " WHERE contype = 'c' AND conname LIKE 'ck_booking%'"
                        )
                    )
                ).all()
            )
        assert validated == {
            "ck_bookings_status": True,
            "ck_bookings_total": True,
            "ck_bookings_seats": True,
            "ck_bookings_cancelled": True,
            "ck_booking_items_tickets": False,
            "ck_booking_items_quantity": False,
            "ck_booking_items_position": True,
        }
        with pytest.raises(sa.exc.IntegrityError, match="ck_booking_items_tickets"):  # NOT VALID
            async with engine.begin() as conn:
                await _insert(
                    conn, "booking_items", **{**item, "category": "VIP"}, quantity=0, tickets=0
                )
    finally:
        await engine.dispose()
