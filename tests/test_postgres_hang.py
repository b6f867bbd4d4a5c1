"""A PostgreSQL that hangs (every process of it SIGSTOPped: connections stay open, nothing
answers): the worker times out, says so in its log, and resumes when PostgreSQL does,
losing nothing. A PostgreSQL of the test's own (initdb in a temp dir), with a Redis, an
API and a worker of its own, so nothing else is paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from service.core.db import bookings
from service.core.keys import event_keys
from service.core.settings import Settings
from service.durable import migrate
from service.hotpath.context import Services
from tests.apiserver import ApiServer, Worker
from tests.conftest import ADMIN_TOKEN, create_event, eventually
from tests.servers import RedisServer, free_port
from tests.test_writebehind import big_event, sell

# A PostgreSQL of its own, paused for longer than the write-behind's timeouts: a minute.
pytestmark = pytest.mark.slow


class PostgresServer:
    """postgres on a free port in a temp dir (as the `postgres` user when run as root,
    since PostgreSQL refuses to run as root); pause() SIGSTOPs all its processes."""

    def __init__(self) -> None:
        if shutil.which("initdb") is None or shutil.which("postgres") is None:
            pytest.skip("initdb/postgres not on PATH")
        self.dir = Path(tempfile.mkdtemp(prefix="boxoffice-pg-"))
        self.dir.chmod(0o777)
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/boxoffice"

    def start(self) -> None:
        data = self.dir / "data"
        subprocess.run(
            [*self._as, "initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True,
            capture_output=True,
        )
        self._proc = subprocess.Popen(
            [
                *self._as,
                *("postgres", "-D", str(data), "-p", str(self.port), "-k", str(self.dir)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "log").open("ab"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while subprocess.run(
            ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False
        ).returncode:
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise RuntimeError(f"postgres did not start: {(self.dir / 'log').read_text()}")
            time.sleep(0.1)

    def _pids(self) -> list[int]:
        postmaster = int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
        ).stdout.split()
        return [postmaster, *map(int, children)]

    def pause(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError, ValueError):  # already gone
                for pid in self._pids():
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    if shutil.which("pg_isready") is None:
        pytest.skip("pg_isready not on PATH")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


async def test_a_paused_postgresql_times_out_in_the_log_and_nothing_is_lost(
    own_postgres: PostgresServer,
) -> None:
    await asyncio.to_thread(migrate.ensure_database, own_postgres.url)
    await asyncio.to_thread(migrate.upgrade, own_postgres.url)
    with RedisServer() as redis_server:
        env = {
            "BOXOFFICE_REDIS_URL": redis_server.url,
            "BOXOFFICE_DATABASE_URL": own_postgres.url,
            "BOXOFFICE_ADMIN_TOKEN": ADMIN_TOKEN,
        }
        api = ApiServer(env, workers=1)
        api.start()
        worker = Worker({**env, "BOXOFFICE_DATABASE_COMMAND_TIMEOUT_SECONDS": "1"})
        worker.start()
        svc = Services.open(Settings(redis_url=redis_server.url, database_url=own_postgres.url))
        try:
            async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
                await _pause_and_resume(client, svc, own_postgres, worker)
        finally:
            await svc.close()
            worker.stop()
            api.stop()
            print(f"--- worker log ---\n{worker.log()}")


async def _stored(svc: Services, event_id: str) -> list[str]:
    async with svc.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(bookings.c.booking_id).where(bookings.c.event_id == event_id)
        )
        return [str(r[0]) for r in rows]


async def _pause_and_resume(
    client: httpx.AsyncClient, svc: Services, postgres: PostgresServer, worker: Worker
) -> None:
    event_id = await create_event(client, **big_event(100))
    first = await sell(client, event_id, 5)

    async def first_written() -> bool:
        return len(await _stored(svc, event_id)) == len(first)

    await eventually(first_written)

    postgres.pause()
    try:
        second = await sell(client, event_id, 20)  # holds and confirms need Redis only

        async def said() -> bool:
            return "PostgreSQL did not answer in time (a statement may take 1 s" in worker.log()

        await eventually(said, within=15)
        await asyncio.sleep(2)  # it keeps trying meanwhile
        assert worker.running
    finally:
        postgres.resume()

    async def drained() -> bool:
        return len(await _stored(svc, event_id)) >= len(first) + len(second)

    await eventually(drained, within=30)
    stored = await _stored(svc, event_id)
    assert sorted(stored) == sorted(first + second), "each booking exactly once"
    assert await svc.redis.xlen(event_keys(event_id).deadletter) == 0
