"""PostgreSQL refusing every write alike (a read-only database) pauses the write-behind;
it never dead-letters the entries, and they reach PostgreSQL once it takes writes again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from service.core.errors import unavailable
from service.core.settings import Settings
from service.hotpath.context import Services
from tests.apiserver import Worker
from tests.conftest import create_event, eventually, worker_env
from tests.test_writebehind import big_event, sell
from tests.test_writebehind_failures import (
    assert_each_written_once,
    dead_letters,
    pending,
    written,
)

ROLE = "boxoffice_test_readonly"


@pytest.fixture
async def readonly_role(svc: Services) -> AsyncIterator[str]:
    """A role of the test's own whose sessions are read-only by default (as on a database
    set `default_transaction_read_only`), so no other connection is touched; dropped after."""

    async def run(*statements: str) -> None:
        async with svc.engine.begin() as conn:
            for statement in statements:
                await conn.execute(sa.text(statement))

    await run(
        f"DROP OWNED BY {ROLE}" if await _role_exists(svc) else "SELECT 1",
        f"DROP ROLE IF EXISTS {ROLE}",
        f"CREATE ROLE {ROLE} LOGIN",
        f"GRANT USAGE ON SCHEMA public TO {ROLE}",
        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {ROLE}",
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {ROLE}",
        f"ALTER ROLE {ROLE} SET default_transaction_read_only = on",
    )
    try:
        yield ROLE
    finally:
        await run(f"DROP OWNED BY {ROLE}", f"DROP ROLE {ROLE}")


async def _role_exists(svc: Services) -> bool:
    async with svc.engine.connect() as conn:
        found = await conn.scalar(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE})
    return found is not None


@pytest.fixture
def worker_log() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()
        print(f"--- worker log ---\n{w.log()}")


async def test_a_read_only_database_pauses_the_write_behind_and_dead_letters_nothing(
    client: httpx.AsyncClient,
    svc: Services,
    settings: Settings,
    readonly_role: str,
    worker_log: list[Worker],
) -> None:
    event_id = await create_event(client, **big_event(100))
    as_role = make_url(settings.database_url).set(username=readonly_role)
    w = Worker(worker_env(settings, BOXOFFICE_DATABASE_URL=as_role.render_as_string()))
    w.start()
    worker_log.append(w)
    ids = await sell(client, event_id, 30)

    async def paused() -> bool:
        return "ReadOnlySQLTransactionError" in w.log() and "write-behind paused" in w.log()

    await eventually(paused)
    await asyncio.sleep(2)  # it retries meanwhile, and still dead-letters nothing
    assert await written(svc, event_id) == 0
    assert await dead_letters(svc, event_id) == 0
    assert w.running

    async with svc.engine.begin() as conn:
        reset = f"ALTER ROLE {readonly_role} RESET default_transaction_read_only"
        await conn.execute(sa.text(reset))

    async def drained() -> bool:
        return await written(svc, event_id) == len(ids) and await pending(svc, event_id) == 0

    await eventually(drained, within=30)
    await assert_each_written_once(svc, event_id, ids)
    assert await dead_letters(svc, event_id) == 0


@pytest.mark.parametrize(
    ("sqlstate", "why"),
    [
        ("25006", "read-only transaction"),
        ("42501", "insufficient privilege"),
        ("42P01", "undefined table: migrations not applied"),
        ("42703", "undefined column: migrations behind the code"),
        ("40P01", "deadlock: retry"),
        ("40001", "serialization failure: retry"),
    ],
)
async def test_set_up_refusals_and_transient_conflicts_are_not_the_entrys_fault(
    svc: Services, sqlstate: str, why: str
) -> None:
    """Each raised for real by PostgreSQL (RAISE with that SQLSTATE), through SQLAlchemy."""
    with pytest.raises(sa.exc.DBAPIError) as raised:
        async with svc.engine.connect() as conn:
            await conn.execute(
                sa.text(f"DO $$ BEGIN RAISE EXCEPTION '{why}' USING ERRCODE = '{sqlstate}'; END $$")
            )
    assert unavailable(raised.value), why
