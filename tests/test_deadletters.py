"""Dead letters an operator can act on: listed, replayed once the cause is fixed, or
discarded (then reconcile reports the booking until --repair writes it); reconcile and
--repair with dead letters present; a lost cancellation re-driven with its own time.

Dead letters are made as they happen: an entry PostgreSQL refuses (a CHECK constraint the
test adds to the bookings table, and drops to "fix the cause"), or an outbox entry damaged
so that it cannot be converted at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.core.db import bookings
from service.core.keys import event_keys
from service.core.records import decode_booking
from service.core.settings import Settings
from service.core.timefmt import to_ms
from service.durable import reconcile
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services
from tests.apiserver import BOXOFFICE
from tests.conftest import ADMIN, create_event, server_env
from tests.test_reconcile import confirm, hold, kinds
from tests.test_writebehind import persisted_ids

REFUSED = "refused-customer"
Fix = Callable[[], Awaitable[None]]


@pytest.fixture
async def refuse(svc: Services) -> AsyncIterator[Fix]:
    """PostgreSQL refuses the bookings of customer REFUSED (a CHECK constraint): an entry
    the worker cannot write however often it tries. The fixture's function drops the
    constraint: the cause is fixed."""
    name = f"test_refuse_{secrets.token_hex(4)}"
    async with svc.engine.begin() as conn:
        await conn.execute(
            sa.text(
                f"ALTER TABLE bookings ADD CONSTRAINT {name} "
                f"CHECK (customer_id <> '{REFUSED}') NOT VALID"
            )
        )

    async def fix() -> None:
        async with svc.engine.begin() as conn:
            await conn.execute(sa.text(f"ALTER TABLE bookings DROP CONSTRAINT IF EXISTS {name}"))

    yield fix
    await fix()


async def write_behind(svc: Services, event_id: str) -> None:
    """What a worker does to this event's outbox, in process, until nothing is left:
    entries written, or dead-lettered after their attempts."""
    wb = WriteBehind(svc, f"test-{secrets.token_hex(3)}")
    await wb._join(event_id)  # this event's stream only
    for _ in range(20):
        reads_new = not wb._pending_first  # else it reads its own pending entries again
        if not await wb.step(wait=False) and reads_new:
            return
    raise AssertionError("the outbox did not settle")


async def book(client: httpx.AsyncClient, event_id: str, customer: str) -> str:
    items = [{"category": "GA", "quantity": 1}]
    return await confirm(client, event_id, await hold(client, event_id, customer, items=items))


async def dead_letters(client: httpx.AsyncClient, event_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/admin/events/{event_id}/dead-letters", headers=ADMIN)
    assert r.status_code == 200, r.text
    letters: list[dict[str, Any]] = r.json()["dead_letters"]
    return letters


async def two_dead_letters(
    client: httpx.AsyncClient, svc: Services
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A new event with two bookings of the refused customer, both dead-lettered."""
    event_id = await create_event(client)
    for _ in range(2):
        await book(client, event_id, REFUSED)
    await write_behind(svc, event_id)
    first, second = await dead_letters(client, event_id)
    return event_id, first, second


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BOXOFFICE, *args],
        env={**os.environ, **server_env(settings)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def run(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, settings, *args)


# --- the admin API ----------------------------------------------------------------------


async def test_a_dead_letter_is_listed_and_replayed_once_its_cause_is_fixed(
    client: httpx.AsyncClient, svc: Services, refuse: Fix
) -> None:
    event_id = await create_event(client)
    fine = await book(client, event_id, "fine")
    refused = await book(client, event_id, REFUSED)
    before = int(time.time() * 1000)
    await write_behind(svc, event_id)
    assert await persisted_ids(svc, event_id) == [fine]

    r = await client.get(f"/admin/events/{event_id}/dead-letters")
    assert r.status_code == 401
    (letter,) = await dead_letters(client, event_id)
    assert letter["op"] == "confirm"
    assert letter["booking_id"] == refused
    assert letter["attempts"] == 3  # BOXOFFICE_OUTBOX_MAX_ATTEMPTS
    assert "test_refuse_" in letter["error"]  # PostgreSQL's own words: the constraint
    assert letter["first_failed_at"].endswith("Z")
    first_failed = datetime.fromisoformat(letter["first_failed_at"])
    assert before - 1000 <= to_ms(first_failed) <= int(time.time() * 1000)
    r = await client.get(f"/events/{event_id}/bookings/{refused}")
    assert r.json()["persisted"] is False

    # Reported as the dead letter it is, not a second time as a booking nowhere durable.
    report = await reconcile.reconcile(svc, event_id)
    assert kinds(report) == {"dead_letters"}
    assert refused in report.events[0].problems[0].detail

    for path, code in (
        (f"/admin/events/{event_id}/dead-letters/1-1/replay", "dead_letter_not_found"),
        (f"/admin/events/{event_id}/dead-letters/nonsense/replay", "dead_letter_not_found"),
        ("/admin/events/no-such-event/dead-letters/1-1/replay", "event_not_found"),
    ):
        r = await client.post(path, headers=ADMIN)
        assert (r.status_code, r.json()["code"]) == (404, code), path
    r = await client.get("/admin/events/no-such-event/dead-letters", headers=ADMIN)
    assert (r.status_code, r.json()["code"]) == (404, "event_not_found")
    r = await client.post(f"/admin/events/{event_id}/dead-letters/{letter['id']}/replay")
    assert r.status_code == 401
    assert len(await dead_letters(client, event_id)) == 1

    await refuse()  # the cause is fixed
    r = await client.post(
        f"/admin/events/{event_id}/dead-letters/{letter['id']}/replay", headers=ADMIN
    )
    assert r.status_code == 202, r.text
    assert await dead_letters(client, event_id) == []
    r = await client.post(
        f"/admin/events/{event_id}/dead-letters/{letter['id']}/replay", headers=ADMIN
    )
    assert (r.status_code, r.json()["code"]) == (404, "dead_letter_not_found")

    await write_behind(svc, event_id)  # the worker writes the replayed entry
    assert sorted(await persisted_ids(svc, event_id)) == sorted([fine, refused])
    r = await client.get(f"/events/{event_id}/bookings/{refused}")
    assert r.json()["persisted"] is True
    assert (await reconcile.reconcile(svc, event_id)).consistent


async def test_the_openapi_document_has_the_dead_letter_routes(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    listed = paths["/admin/events/{event_id}/dead-letters"]["get"]
    assert set(listed["responses"]) >= {"200", "401", "404"}
    replay = paths["/admin/events/{event_id}/dead-letters/{dead_letter_id}/replay"]["post"]
    assert "202" in replay["responses"]
    assert "dead_letter_not_found" in replay["responses"]["404"]["description"]
    discard = paths["/admin/events/{event_id}/dead-letters/{dead_letter_id}"]["delete"]
    assert set(discard["responses"]) >= {"204", "401", "404"}


# --- the command line and reconcile -----------------------------------------------------


async def test_discarded_dead_letter_is_drift_until_repair_can_write_it(
    client: httpx.AsyncClient, svc: Services, settings: Settings, refuse: Fix
) -> None:
    event_id = await create_event(client)
    refused = await book(client, event_id, REFUSED)
    await write_behind(svc, event_id)

    done = await run(settings, "dead-letters", "--event", event_id, "--json")
    assert done.returncode == 0, done.stderr
    (listed,) = json.loads(done.stdout)["events"]
    (letter,) = listed["dead_letters"]
    assert (listed["event_id"], letter["booking_id"]) == (event_id, refused)
    done = await run(settings, "dead-letters")  # every live event, as a table
    assert done.returncode == 0, done.stderr
    assert f"event {event_id}: 1 dead letter(s)" in done.stdout
    assert letter["id"] in done.stdout

    # --repair while PostgreSQL still refuses it: no traceback, the drift remains (exit 1)
    # and the repair says what it could not write; the dead letter stays.
    done = await run(settings, "reconcile", "--event", event_id, "--repair", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    (report,) = json.loads(done.stdout)["events"]
    assert report["problem_counts"] == {"dead_letters": 1}
    assert any(f"refuses confirm of booking {refused}" in r for r in report["repairs"])
    assert [d["id"] for d in await dead_letters(client, event_id)] == [letter["id"]]

    # Exit codes: 2 without --event or for an unknown event, 1 when an id is not found.
    done = await run(settings, "dead-letters", "discard", letter["id"])
    assert done.returncode == 2 and "--event" in done.stderr
    done = await run(settings, "dead-letters", "discard", "--event", "no-such-event", "1-1")
    assert done.returncode == 2 and "no-such-event" in done.stderr
    done = await run(settings, "dead-letters", "discard", "--event", event_id, letter["id"], "1-1")
    assert done.returncode == 1, done.stderr
    assert "'1-1'" in done.stderr and "discarded 1 of 2" in done.stdout
    assert await dead_letters(client, event_id) == []

    # Gone from the dead letters, the booking is nowhere durable: drift.
    report_now = await reconcile.reconcile(svc, event_id)
    assert kinds(report_now) == {"booking_not_persisted"}
    assert refused in report_now.events[0].problems[0].detail

    await refuse()  # the cause is fixed: the repair writes the booking from Redis's record
    done = await run(settings, "reconcile", "--event", event_id, "--repair")
    assert done.returncode == 0, done.stdout + done.stderr
    assert await persisted_ids(svc, event_id) == [refused]


async def test_dead_letter_api_discard(
    client: httpx.AsyncClient, svc: Services, refuse: Fix
) -> None:
    event_id = await create_event(client)
    await book(client, event_id, REFUSED)
    await write_behind(svc, event_id)
    (letter,) = await dead_letters(client, event_id)
    path = f"/admin/events/{event_id}/dead-letters/{letter['id']}"
    assert (await client.delete(path)).status_code == 401
    assert (await client.delete(path, headers=ADMIN)).status_code == 204
    assert await dead_letters(client, event_id) == []
    r = await client.delete(path, headers=ADMIN)
    assert (r.status_code, r.json()["code"]) == (404, "dead_letter_not_found")
    r = await client.delete("/admin/events/no-such-event/dead-letters/1-1", headers=ADMIN)
    assert (r.status_code, r.json()["code"]) == (404, "event_not_found")
    assert "booking_not_persisted" in kinds(await reconcile.reconcile(svc, event_id))


async def test_dead_letter_replay_and_discard_honour_an_idempotency_key(
    client: httpx.AsyncClient, svc: Services, refuse: Fix
) -> None:
    event_id, first, second = await two_dead_letters(client, svc)
    base = f"/admin/events/{event_id}/dead-letters"
    replay = {**ADMIN, "idempotency-key": f"replay-{first['id']}"}
    discard = {**ADMIN, "idempotency-key": f"discard-{second['id']}"}
    # A repeat (a client retrying after a lost answer) gets the first answer, not a 404.
    for _ in range(2):
        r = await client.post(f"{base}/{first['id']}/replay", headers=replay)
        assert r.status_code == 202, r.text
        r = await client.delete(f"{base}/{second['id']}", headers=discard)
        assert r.status_code == 204, r.text
    assert await dead_letters(client, event_id) == []
    outbox: Any = await svc.redis.xrange(event_keys(event_id).outbox)
    replayed = [f for _, f in outbox if f.get(b"booking") and f[b"op"] == b"confirm"]
    assert len(replayed) == 3  # the two bookings, and the one replay
    # The same key on another dead letter's path is another request.
    r = await client.delete(f"{base}/{first['id']}", headers=discard)
    assert (r.status_code, r.json()["code"]) == (422, "idempotency_key_reused")


async def test_repair_writes_a_booking_whose_outbox_entry_was_damaged(
    client: httpx.AsyncClient, svc: Services, settings: Settings
) -> None:
    """The entry cannot even be converted (its time is out of range: datetime raises
    OSError, which once passed for "server away" and stopped every write, and made
    --repair exit 2). The worker dead-letters it at once; Redis's own record of the booking
    is sound, so --repair writes that and the dead letter is done with."""
    event_id = await create_event(client)
    booking_id = await book(client, event_id, "c")
    keys = event_keys(event_id)
    entries: Any = await svc.redis.xrange(keys.outbox)
    ((entry_id, fields),) = entries
    damaged = json.loads(fields[b"booking"])
    damaged["ca"] = 100000000000000000000
    await svc.redis.xdel(keys.outbox, entry_id)
    await svc.redis.xadd(keys.outbox, {b"op": b"confirm", b"booking": json.dumps(damaged)})

    await write_behind(svc, event_id)
    (letter,) = await dead_letters(client, event_id)
    assert letter["attempts"] == 1, "an entry that can never succeed is not tried again"
    assert "OSError" in letter["error"] or "Overflow" in letter["error"]
    assert letter["booking_id"] == booking_id

    done = await run(settings, "reconcile", "--event", event_id, "--repair", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = json.loads(done.stdout)["events"]
    assert any("removed 1 dead letter whose" in r for r in report["repairs"]), report
    assert await dead_letters(client, event_id) == []
    record = decode_booking(await svc.redis.hget(keys.bookings, booking_id))  # type: ignore[arg-type]
    async with svc.engine.connect() as conn:
        confirmed_at = await conn.scalar(
            sa.select(bookings.c.confirmed_at).where(bookings.c.event_id == event_id)
        )
    assert confirmed_at is not None and to_ms(confirmed_at) == record.created_ms


async def test_repair_of_an_entry_nothing_can_write_exits_1_not_2(
    client: httpx.AsyncClient, svc: Services, settings: Settings
) -> None:
    """A poison entry stuck in the outbox, with no booking behind it in Redis: the repair
    dead-letters it and cannot write it, and says so (exit 1, the dead letter stays),
    rather than taking its OSError/ValueError for an unreachable server (exit 2)."""
    event_id = await create_event(client)
    keys = event_keys(event_id)
    booking_id = b"0192d3c4-0000-7000-8000-000000000000"
    poison: Any = {b"op": b"cancel", b"booking": booking_id, b"at": b"99999999999999999"}
    # Appended two minutes ago and never written: stuck (a worker once retried it forever).
    await svc.redis.xadd(keys.outbox, poison, id=f"{int(time.time() * 1000) - 120_000}-0")
    done = await run(settings, "reconcile", "--event", event_id, "--repair", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    (report,) = json.loads(done.stdout)["events"]
    assert report["problem_counts"] == {"dead_letters": 1}
    (letter,) = await dead_letters(client, event_id)
    assert letter["op"] == "cancel" and "ValueError" in letter["error"]


# --- a lost cancellation ----------------------------------------------------------------


async def test_repair_writes_a_lost_cancellation_with_its_own_time(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client)
    booking_id = await book(client, event_id, "c")
    await write_behind(svc, event_id)  # the confirmation is in PostgreSQL
    await asyncio.sleep(1.2)  # so that the two times differ by more than rounding
    r = await client.delete(f"/admin/events/{event_id}/bookings/{booking_id}", headers=ADMIN)
    assert r.status_code == 204
    await svc.redis.delete(event_keys(event_id).outbox)  # the cancellation's entry is lost
    record = decode_booking(await svc.redis.hget(event_keys(event_id).bookings, booking_id))  # type: ignore[arg-type]
    cancelled_ms = json.loads(
        await svc.redis.hget(event_keys(event_id).bookings, booking_id)  # type: ignore[arg-type]
    )["xa"]
    assert cancelled_ms - record.created_ms > 1000

    report = await reconcile.reconcile(svc, event_id, repair=True)
    assert report.consistent, report
    async with svc.engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(
                    bookings.c.status, bookings.c.confirmed_at, bookings.c.cancelled_at
                ).where(bookings.c.event_id == event_id)
            )
        ).one()
    assert row.status == "cancelled"
    assert to_ms(row.confirmed_at) == record.created_ms
    assert to_ms(row.cancelled_at) == cancelled_ms, (
        "the cancellation's time, not the confirmation's"
    )


async def test_a_confirmation_replayed_after_its_booking_was_cancelled_ends_cancelled(
    client: httpx.AsyncClient, svc: Services, refuse: Fix
) -> None:
    event_id = await create_event(client)
    refused = await book(client, event_id, REFUSED)
    await write_behind(svc, event_id)
    (letter,) = await dead_letters(client, event_id)
    # Refunded while its confirmation is a dead letter: the cancellation reaches
    # PostgreSQL first, and finds nothing to cancel.
    r = await client.delete(f"/admin/events/{event_id}/bookings/{refused}", headers=ADMIN)
    assert r.status_code == 204
    await write_behind(svc, event_id)
    assert await persisted_ids(svc, event_id) == []

    await refuse()
    path = f"/admin/events/{event_id}/dead-letters/{letter['id']}/replay"
    assert (await client.post(path, headers=ADMIN)).status_code == 202
    await write_behind(svc, event_id)
    async with svc.engine.connect() as conn:
        status = await conn.scalar(
            sa.select(bookings.c.status).where(bookings.c.event_id == event_id)
        )
    assert status == "cancelled"
    assert (await reconcile.reconcile(svc, event_id)).consistent


async def test_repair_with_a_dead_letter_postgresql_cannot_store_exits_1_without_a_traceback(
    client: httpx.AsyncClient, svc: Services, settings: Settings
) -> None:
    """The issue's case: a NUL character, which PostgreSQL text cannot hold (the API now
    refuses it at the door; an entry from before, or added by hand, still gets here)."""
    event_id = await create_event(client)
    keys = event_keys(event_id)
    record = {
        "id": "0192d3c4-0000-7000-8000-0000000000aa",
        "h": "h",
        "c": "nul\u0000x",
        "it": [["GA", 1]],
        "st": [],
        "q": {"GA": 1},
        "n": 1,
        "t": 2500,
        "cu": "EUR",
        "ca": int(time.time() * 1000),
        "s": "confirmed",
    }
    booking = json.dumps(record).encode()
    # Redis has the booking (its counters are put right by the repair's recount), and the
    # outbox its entry.
    await svc.redis.hset(keys.bookings, record["id"], booking)  # type: ignore[arg-type]
    entry: Any = {b"op": b"confirm", b"booking": booking}
    await svc.redis.xadd(keys.outbox, entry)
    await write_behind(svc, event_id)
    (letter,) = await dead_letters(client, event_id)
    assert letter["attempts"] == 3 and "0x00" in letter["error"], letter

    for args in (("--repair",), ()):
        done = await run(settings, "reconcile", "--event", event_id, *args)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        assert "! dead_letters: 1" in done.stdout
        assert "counter_mismatch" not in done.stdout
        if args:
            assert f"repaired: PostgreSQL refuses confirm of booking {record['id']}" in done.stdout
    assert len(await dead_letters(client, event_id)) == 1
