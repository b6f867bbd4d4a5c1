"""Write-behind under failure: a worker killed mid-batch, PostgreSQL unreachable or
refusing connections, poison entries, trimming next to unacknowledged entries, and a Redis
crash right after a confirmation. Real Redis, PostgreSQL and worker processes throughout.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest
import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from service.core import schemas
from service.core.db import booking_items, bookings
from service.core.keys import OUTBOX_GROUP, event_keys
from service.core.settings import Settings
from service.durable.outbox import original_fields
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services
from service.selling import sales
from tests.apiserver import ApiServer, Worker
from tests.conftest import StartWorker, create_event, eventually, server_env, worker_env
from tests.servers import RedisServer, free_port
from tests.test_writebehind import big_event, persisted_ids, sell

Fields = dict[bytes, bytes]
OpenServices = Callable[..., Services]


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
async def open_services(settings: Settings) -> AsyncIterator[OpenServices]:
    """Services of the test's own, with some settings changed (batch size, claim idle)."""
    opened: list[Services] = []

    def open_(**overrides: Any) -> Services:
        s = Services.open(msgspec.structs.replace(settings, **overrides))
        opened.append(s)
        return s

    yield open_
    for s in opened:
        await s.close()


async def until(check: Callable[[], Awaitable[bool]], within: float, every: float = 0.01) -> None:
    """eventually(), polling fast: for catching a worker in the middle of its work."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


async def written(svc: Services, event_id: str) -> int:
    async with svc.engine.connect() as conn:
        n = await conn.scalar(
            sa.select(sa.func.count()).select_from(bookings).where(bookings.c.event_id == event_id)
        )
    return int(n or 0)


async def item_rows(svc: Services, event_id: str) -> int:
    async with svc.engine.connect() as conn:
        n = await conn.scalar(
            sa.select(sa.func.count())
            .select_from(booking_items.join(bookings))
            .where(bookings.c.event_id == event_id)
        )
    return int(n or 0)


async def pending(svc: Services, event_id: str) -> int:
    summary: Any = await svc.redis.xpending(event_keys(event_id).outbox, OUTBOX_GROUP)
    return int(summary["pending"])


async def pending_ids(svc: Services, event_id: str, consumer: str | None = None) -> list[bytes]:
    rows: Any = await svc.redis.xpending_range(
        event_keys(event_id).outbox, OUTBOX_GROUP, "-", "+", 100_000, consumername=consumer
    )
    return [r["message_id"] for r in rows]


async def stream(svc: Services, key: str) -> list[tuple[bytes, Fields]]:
    entries: Any = await svc.redis.xrange(key)
    return [(i, f) for i, f in entries]


async def dead_letters(svc: Services, event_id: str) -> int:
    return int(await svc.redis.xlen(event_keys(event_id).deadletter))


async def assert_each_written_once(svc: Services, event_id: str, ids: list[str]) -> None:
    stored = await persisted_ids(svc, event_id)
    assert len(stored) == len(ids), f"{len(stored)} rows for {len(ids)} bookings"
    assert set(stored) == set(ids)
    # One GA ticket each: exactly one item row per booking.
    assert await item_rows(svc, event_id) == len(ids)


def booking_id(fields: Fields) -> str:
    value: str = json.loads(fields[b"booking"])["id"]
    return value


async def sell_in_process(svc: Services, event_id: str, n: int) -> list[str]:
    """Like sell(), through the service's own operations instead of HTTP: the same confirm
    script, many times faster, for a backlog of thousands."""
    ga = [schemas.HoldItem(category="GA", quantity=1)]

    async def one(i: int) -> str:
        body = schemas.HoldCreate(customer_id=f"c{i}", items=ga)
        hold, _ = await sales.create_hold_counted(svc, event_id, body, None)
        booking = await sales.confirm_hold(svc, event_id, hold.hold_id, schemas.HoldConfirm(), None)
        return booking.booking_id

    ids: list[str] = []
    for start in range(0, n, 100):
        ids += await asyncio.gather(*(one(i) for i in range(start, min(n, start + 100))))
    return ids


def stop_all(*workers: Worker) -> None:
    for w in workers:
        w.stop()


# --- 1. a worker killed mid-batch ---------------------------------------------------------


@pytest.mark.slow
async def test_worker_killed_mid_batch_another_claims_its_entries_and_writes_each_once(
    client: httpx.AsyncClient, svc: Services, settings: Settings, start_worker: StartWorker
) -> None:
    total = 3000
    event_id = await create_event(client, **big_event(total))
    ids = await sell_in_process(svc, event_id, total)
    assert len(set(ids)) == total
    assert await written(svc, event_id) == 0

    # Worker A, in batches of 50, is SIGKILLed once it has written some. It must die
    # holding a batch (read, not acknowledged); between two batches it holds none, so in
    # that rare case another A is started and killed.
    held: list[bytes] = []
    for _ in range(5):
        before = await written(svc, event_id)
        a = start_worker(worker_env(settings, BOXOFFICE_OUTBOX_BATCH="50"))

        async def progressed(before: int = before) -> bool:
            n = await written(svc, event_id)
            return n >= before + 100 or n == total

        await until(progressed, within=30)
        a.kill()
        held = await pending_ids(svc, event_id)
        if held:
            break
    assert held, "no worker died holding unacknowledged entries"
    assert len(held) <= 50
    done = await written(svc, event_id)
    assert 0 < done < total, "the kill must come in the middle of the backlog"
    print(f"killed with {done} of {total} written and {len(held)} entries held")

    # Worker B takes A for dead after 1 s of silence and claims its entries.
    b = start_worker(worker_env(settings, BOXOFFICE_OUTBOX_CLAIM_IDLE_MS="1000"))

    async def drained() -> bool:
        return await written(svc, event_id) >= total and await pending(svc, event_id) == 0

    await eventually(drained, within=40)
    await asyncio.sleep(0.5)  # a duplicate written late would show now
    await assert_each_written_once(svc, event_id, ids)
    assert await pending(svc, event_id) == 0
    assert await dead_letters(svc, event_id) == 0
    assert b.running


# --- 2. PostgreSQL unreachable for a while ------------------------------------------------


class PgProxy:
    """A TCP relay on 127.0.0.1 to the real PostgreSQL. off() cuts every open connection
    and stops listening (new connections are refused): PostgreSQL is unreachable. on()
    listens again on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = free_port()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def on(self) -> None:
        assert self._server is None
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def off(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in list(self._open):
            w.transport.abort()
        self._open.clear()
        if server is not None:
            await server.wait_closed()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(client_w)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            self._open.discard(client_w)
            return
        self._open.add(up_w)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pump(client_r, up_w), pump(up_r, client_w))
        finally:
            self._open.discard(client_w)
            self._open.discard(up_w)


@pytest.fixture
async def pg_proxy(settings: Settings) -> AsyncIterator[PgProxy]:
    url = make_url(settings.database_url)
    proxy = PgProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.on()
    yield proxy
    await proxy.off()


async def test_postgresql_unreachable_for_a_while_loses_nothing_and_the_backlog_drains(
    client: httpx.AsyncClient,
    svc: Services,
    settings: Settings,
    start_worker: StartWorker,
    pg_proxy: PgProxy,
) -> None:
    proxied = (
        make_url(settings.database_url)
        .set(host="127.0.0.1", port=pg_proxy.port)
        .render_as_string(hide_password=False)
    )
    event_id = await create_event(client, **big_event(500))
    w = start_worker(worker_env(settings, BOXOFFICE_DATABASE_URL=proxied))
    try:
        first = await sell(client, event_id, 50)

        async def first_written() -> bool:
            return await written(svc, event_id) == len(first)

        await eventually(first_written)
        assert pg_proxy.connections > 0, "the worker must reach PostgreSQL through the proxy"

        await pg_proxy.off()
        second = await sell(client, event_id, 150)

        async def paused() -> bool:
            return "write-behind paused" in w.log()

        await eventually(paused)
        await asyncio.sleep(3)  # the worker backs off and retries meanwhile
        assert await written(svc, event_id) == len(first)
        # Nothing lost meanwhile: every booking still in the outbox, none dead-lettered.
        outbox = await stream(svc, event_keys(event_id).outbox)
        assert set(second) <= {booking_id(f) for _, f in outbox if f[b"op"] == b"confirm"}
        assert await dead_letters(svc, event_id) == 0
        assert w.running

        await pg_proxy.on()

        async def drained() -> bool:
            return (
                await written(svc, event_id) >= len(first) + len(second)
                and await pending(svc, event_id) == 0
            )

        await eventually(drained, within=30)
        await assert_each_written_once(svc, event_id, first + second)
        assert await dead_letters(svc, event_id) == 0
    finally:
        # Off the event loop: a SIGTERMed worker finishes its batch through the proxy,
        # which needs the loop running.
        await asyncio.to_thread(stop_all, w)


# --- 3. poison entries go to the dead-letter stream ---------------------------------------


def booking_json(**overrides: Any) -> bytes:
    """An outbox booking record as lua/confirm.lua writes it, with fields replaced."""
    booking: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "h": "poison-hold",
        "c": "poison-customer",
        "it": [["GA", 1]],
        "st": [],
        "q": {"GA": 1},
        "n": 1,
        "t": 1000,
        "cu": "EUR",
        "ca": int(time.time() * 1000),
        "s": "confirmed",
        **overrides,
    }
    return json.dumps(booking).encode()


POISONS: dict[str, Fields] = {
    # Not JSON at all: the decoder rejects it before PostgreSQL sees anything.
    "malformed": {b"op": b"confirm", b"booking": b'{"id": "broken'},
    # Well-formed and a booking the event could have, but PostgreSQL rejects it (a NUL
    # in a text column). A currency of four letters was this case before the write-behind
    # checked bookings against the catalog: now it never reaches PostgreSQL.
    "rejected by postgresql": {b"op": b"confirm", b"booking": booking_json(c="poison\u0000")},
    # An operation the writer does not know.
    "unknown op": {b"op": b"refund", b"booking": booking_json()},
}


async def test_poison_entries_are_dead_lettered_and_the_rest_go_on(
    client: httpx.AsyncClient, svc: Services, settings: Settings, start_worker: StartWorker
) -> None:
    event_id = await create_event(client, **big_event(100))
    keys = event_keys(event_id)
    valid = await sell(client, event_id, 10)
    poison_ids: dict[bytes, Fields] = {}
    for fields in POISONS.values():
        entry_id: Any = await svc.redis.xadd(keys.outbox, dict(fields))  # type: ignore[arg-type]
        poison_ids[entry_id] = fields
    valid += await sell(client, event_id, 10)

    # All of it in one batch: the batch fails and its entries are written one by one.
    w = start_worker(worker_env(settings, BOXOFFICE_OUTBOX_MAX_ATTEMPTS="2"))

    async def settled() -> bool:
        return (
            await written(svc, event_id) >= len(valid)
            and await dead_letters(svc, event_id) >= len(POISONS)
            and await pending(svc, event_id) == 0
        )

    await eventually(settled)
    # The worker goes on with what comes after.
    valid += await sell(client, event_id, 5)

    async def later_written() -> bool:
        return await written(svc, event_id) >= len(valid)

    await eventually(later_written)
    await assert_each_written_once(svc, event_id, valid)
    assert await pending(svc, event_id) == 0

    letters = await stream(svc, keys.deadletter)
    assert len(letters) == len(POISONS)
    by_source = {f[b"source_id"]: f for _, f in letters}
    assert set(by_source) == set(poison_ids)
    for source_id, fields in by_source.items():
        assert fields[b"error"], "the dead letter says why"
        assert int(fields[b"attempts"]) >= 1
        assert int(fields[b"first_failed_at"]) > 0
        assert original_fields(fields) == poison_ids[source_id]

    log = w.log()
    assert keys.deadletter in log
    for source_id in poison_ids:
        assert source_id.decode() in log


# --- 4. trimming keeps what is not acknowledged ------------------------------------------


async def test_trimming_never_drops_an_unacknowledged_entry(
    client: httpx.AsyncClient, svc: Services, open_services: OpenServices
) -> None:
    event_id = await create_event(client, **big_event(100))
    outbox = event_keys(event_id).outbox
    await sell(client, event_id, 30)
    all_entries = await stream(svc, outbox)
    assert len(all_entries) == 30
    ids = [booking_id(f) for _, f in all_entries]  # in outbox order

    wb = WriteBehind(open_services(outbox_batch=10), f"test-{secrets.token_hex(3)}")
    await wb.discover()
    assert outbox in wb._streams
    wb._streams = {outbox: event_id}  # this test's event only
    await wb.step()  # its own pending entries first: none
    assert await wb.step() == 10  # entries 0-9, written and acknowledged

    # Another consumer of the group reads 10-19 and does not acknowledge them (yet).
    other: Any = await svc.redis.xreadgroup(OUTBOX_GROUP, "other", {outbox: ">"}, count=10)
    held = [(i, f) for i, f in other[0][1]]
    assert [i for i, _ in held] == [i for i, _ in all_entries[10:20]]

    assert await wb.step() == 10  # entries 20-29
    await wb.maintain()  # trims

    after = await stream(svc, outbox)
    assert after[:10] == held, "unacknowledged entries must stay, fields and all"
    assert after == all_entries[10:]  # trimmed exactly below the oldest pending entry
    assert await pending_ids(svc, event_id, "other") == [i for i, _ in held]
    assert await pending(svc, event_id) == 10
    assert set(await persisted_ids(svc, event_id)) == set(ids[:10] + ids[20:])

    # Entries not yet delivered to anyone are kept too.
    more = await sell(client, event_id, 3)
    await wb.handle([(event_id, i, f) for i, f in held])  # written and acknowledged
    assert await pending(svc, event_id) == 0
    await wb.maintain()
    after = await stream(svc, outbox)
    assert [i for i, _ in after[:1]] == [all_entries[-1][0]]  # the last delivered entry
    assert len(after) == 1 + len(more)

    while await wb.step():
        pass
    await wb.maintain()
    assert len(await stream(svc, outbox)) <= 1
    assert await pending(svc, event_id) == 0
    await assert_each_written_once(svc, event_id, ids + more)


async def test_trimming_races_a_consumer_reading_a_batch(
    client: httpx.AsyncClient,
    svc: Services,
    open_services: OpenServices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers: one trims while the other reads a batch. The interleaving is forced
    (the reader's XREADGROUP lands between the trimmer's XPENDING and XINFO GROUPS, as it
    can with two processes); every command goes to the real Redis."""
    event_id = await create_event(client, **big_event(100))
    outbox = event_keys(event_id).outbox
    ids = await sell(client, event_id, 20)

    own = open_services(outbox_batch=10, outbox_claim_idle_ms=0)
    wb = WriteBehind(own, f"test-{secrets.token_hex(3)}")
    await wb.discover()
    wb._streams = {outbox: event_id}
    await wb.step()
    assert await wb.step() == 10  # entries 0-9 written and acknowledged: none pending

    # The other worker reads entries 10-14 after the trimmer saw nothing pending.
    grabbed: list[bytes] = []

    async def other_reads() -> None:
        reply: Any = await svc.redis.xreadgroup(OUTBOX_GROUP, "other", {outbox: ">"}, count=5)
        grabbed.extend(i for i, _ in reply[0][1])

    real_xinfo_groups = own.redis.xinfo_groups

    async def xinfo_groups_after_a_read(name: str) -> Any:
        await other_reads()
        return await real_xinfo_groups(name)

    monkeypatch.setattr(own.redis, "xinfo_groups", xinfo_groups_after_a_read)
    await wb.maintain()
    monkeypatch.undo()
    if not grabbed:  # a trimmer that no longer asks XINFO GROUPS: the read comes after
        await other_reads()
    assert len(grabbed) == 5
    in_stream = {i for i, _ in await stream(svc, outbox)}
    trimmed_while_pending = [i for i in grabbed if i not in in_stream]

    # The other worker dies before writing them; this one claims what it left.
    await wb.maintain()
    while await wb.step():
        pass
    await wb.maintain()
    lost = set(ids) - set(await persisted_ids(svc, event_id))
    assert not trimmed_while_pending and not lost, (
        f"trimmed while pending: {trimmed_while_pending}; "
        f"{len(lost)} confirmed bookings never reach PostgreSQL: {sorted(lost)}"
    )


# --- 5. a Redis crash right after a confirmation ------------------------------------------


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True, appendfsync="always") as server:
        yield server


@pytest.mark.slow
async def test_confirmation_survives_a_redis_crash_with_appendfsync_always(
    svc: Services, settings: Settings, aof_redis: RedisServer, start_worker: StartWorker
) -> None:
    api = ApiServer({**server_env(settings), "BOXOFFICE_REDIS_URL": aof_redis.url}, workers=1)
    api.start()
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as c:
            event_id = await create_event(c)
            r = await c.post(
                f"/events/{event_id}/holds",
                json={"customer_id": "c", "items": [{"category": "GA", "quantity": 2}]},
            )
            assert r.status_code == 201, r.text
            r = await c.post(f"/events/{event_id}/holds/{r.json()['hold_id']}/confirm")
            assert r.status_code == 200, r.text
            aof_redis.kill()  # right after the 200: only what reached the AOF survives
            booking_id = r.json()["booking_id"]
            aof_redis.start()

            # Still in Redis (not reloaded from PostgreSQL, which has no booking yet).
            r = await c.get(f"/events/{event_id}/bookings/{booking_id}")
            assert r.status_code == 200, r.text
            assert r.json()["persisted"] is False
            assert await written(svc, event_id) == 0

            start_worker(worker_env(settings, BOXOFFICE_REDIS_URL=aof_redis.url))

            async def booked() -> bool:
                return await persisted_ids(svc, event_id) == [booking_id]

            await eventually(booked)
            r = await c.get(f"/events/{event_id}/bookings/{booking_id}")
            assert r.status_code == 200, r.text
            assert r.json()["persisted"] is True
            assert r.json()["status"] == "confirmed"
    finally:
        api.stop()
        print(api.log())


# --- 6. PostgreSQL refusing connections is not a poison entry ------------------------------


@pytest.fixture
async def limited_role(svc: Services) -> AsyncIterator[str]:
    """A PostgreSQL role that may open no connection at all (CONNECTION LIMIT 0): every
    connection it attempts is refused by PostgreSQL itself, with "too many connections"
    (SQLSTATE 53300), as when max_connections is exhausted, or PostgreSQL shuts down or
    starts up (57P03)."""
    role = f"bo_wb_{secrets.token_hex(4)}"
    try:
        async with svc.engine.begin() as conn:
            await conn.execute(sa.text(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"))
            await conn.execute(
                sa.text(f"GRANT SELECT, INSERT, UPDATE ON bookings, booking_items TO {role}")
            )
            # The catalog, which the write-behind checks each booking against.
            await conn.execute(sa.text(f"GRANT SELECT ON events, categories, seats TO {role}"))
    except sqlalchemy.exc.DBAPIError as e:
        pytest.skip(f"cannot create a PostgreSQL role here: {e}")
    yield role
    async with svc.engine.begin() as conn:
        await conn.execute(
            sa.text(f"REVOKE ALL ON bookings, booking_items, events, categories, seats FROM {role}")
        )
        await conn.execute(sa.text(f"DROP ROLE {role}"))


async def test_postgresql_refusing_connections_dead_letters_nothing(
    client: httpx.AsyncClient,
    svc: Services,
    settings: Settings,
    start_worker: StartWorker,
    limited_role: str,
) -> None:
    as_role = make_url(settings.database_url).set(username=limited_role)
    event_id = await create_event(client, **big_event(100))
    ids = await sell(client, event_id, 20)
    w = start_worker(
        worker_env(settings, BOXOFFICE_DATABASE_URL=as_role.render_as_string(hide_password=False))
    )
    try:

        async def refused() -> bool:
            return "too many connections" in w.log()

        await eventually(refused)
        await asyncio.sleep(2)  # the worker goes on trying meanwhile
        assert await written(svc, event_id) == 0
        refused_dead_lettered = await dead_letters(svc, event_id)

        async with svc.engine.begin() as conn:
            await conn.execute(sa.text(f"ALTER ROLE {limited_role} CONNECTION LIMIT -1"))

        async def settled() -> bool:
            done = await written(svc, event_id) + await dead_letters(svc, event_id)
            return await pending(svc, event_id) == 0 and done >= len(ids)

        await eventually(settled, within=15)
        persisted = await written(svc, event_id)
        assert refused_dead_lettered == 0 and persisted == len(ids), (
            f"{refused_dead_lettered} valid bookings dead-lettered while PostgreSQL refused "
            f"connections; {persisted} of {len(ids)} reached PostgreSQL once it accepted them"
        )
    finally:
        await asyncio.to_thread(stop_all, w)


async def test_sigterm_finishes_and_acknowledges_the_batch_in_flight(
    client: httpx.AsyncClient, svc: Services, settings: Settings
) -> None:
    """Stopping a worker mid-drain leaves nothing half-done: every entry it read is written
    and acknowledged before it exits, and what it did not read waits for the next one."""
    event_id = await create_event(client, **big_event(3000))
    ids = await sell_in_process(svc, event_id, 3000)
    # Small batches: the drain takes a while, and the SIGTERM lands in the middle of it.
    worker = Worker(worker_env(settings, BOXOFFICE_OUTBOX_BATCH="10"))
    worker.start()
    try:
        await eventually(lambda: _written_at_least(svc, event_id, 100))
    finally:
        code = worker.stop()  # SIGTERM
    assert code == 0, worker.log()
    pending = await svc.redis.xpending(event_keys(event_id).outbox, OUTBOX_GROUP)
    assert pending["pending"] == 0, "the worker left entries it read unacknowledged"
    written = await persisted_ids(svc, event_id)
    assert len(written) < len(ids), "the worker had finished: the test stopped nothing"
    # The rest is delivered by the next worker, each booking once.
    again = Worker(worker_env(settings))
    again.start()
    try:
        await eventually(lambda: _written_at_least(svc, event_id, len(ids)))
    finally:
        again.stop()
    assert sorted(await persisted_ids(svc, event_id)) == sorted(ids)


async def _written_at_least(svc: Services, event_id: str, n: int) -> bool:
    return len(await persisted_ids(svc, event_id)) >= n
