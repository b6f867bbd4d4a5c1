"""The built wheel, installed into a fresh virtual environment outside the repository: its
`boxoffice` migrates a database of its own, serves, and its worker writes a booking to
PostgreSQL. Nothing of the checkout is on its path: the Lua scripts, the migrations and the
dashboard page must come from inside the installed package."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from service.core.db import bookings
from service.core.settings import Settings
from service.durable import migrate
from tests.apiserver import ApiServer, Worker
from tests.conftest import ADMIN, ADMIN_TOKEN, PASS_SECRET, event_body
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# Building pulls hatchling, installing pulls the dependencies: from uv's cache when it has
# them, else from PyPI.
INSTALL_TIMEOUT = 600
# Nothing of this environment may leak into the installed one's processes.
CLEAN = {"PYTHONPATH": "", "VIRTUAL_ENV": ""}


def uv() -> list[str]:
    """uv as `make venv` finds or installs it: on PATH, or as python3's module."""
    if found := shutil.which("uv"):
        return [found]
    python3 = shutil.which("python3")
    if (
        python3
        and subprocess.run([python3, "-m", "uv", "--version"], capture_output=True).returncode == 0
    ):
        return [python3, "-m", "uv"]
    pytest.skip("uv is missing (make venv installs it): the wheel cannot be built")


def run(argv: list[str], cwd: Path, timeout: float = INSTALL_TIMEOUT) -> str:
    done = subprocess.run(
        argv,
        cwd=cwd,
        env={**os.environ, **CLEAN},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


class Installed:
    """A virtual environment in a temporary directory with the wheel installed in it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.python = str(home / "venv" / "bin" / "python")
        self.boxoffice = str(home / "venv" / "bin" / "boxoffice")


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    home = Path(tempfile.mkdtemp(prefix="boxoffice-wheel-"))
    assert not home.is_relative_to(ROOT)
    try:
        tool = uv()
        run([*tool, "build", "--wheel", "--out-dir", str(home / "dist"), str(ROOT)], home)
        (wheel,) = (home / "dist").glob("boxoffice-*.whl")
        run([*tool, "venv", "--python", sys.executable, str(home / "venv")], home)
        run([*tool, "pip", "install", "--python", str(home / "venv"), str(wheel)], home)
        yield Installed(home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_the_package_data_comes_from_the_installed_package(installed: Installed) -> None:
    where = run(
        [
            installed.python,
            "-c",
            "from service.core import packagedata\n"
            "from service.durable import migrate\n"
            "from service.hotpath import scripts\n"
            "from service.web import dashboard\n"
            "print(packagedata.PACKAGE, packagedata.checkout(), scripts.LUA_DIR,"
            " migrate.MIGRATIONS, dashboard.PAGE, sep='\\n')",
        ],
        installed.home,
        timeout=60,
    ).splitlines()
    package, checkout, lua, migrations, page = (Path(line) for line in where)
    assert package.is_relative_to(installed.home / "venv"), package
    assert str(checkout) == "None"
    assert lua == package / "lua" and (lua / "hold.lua").is_file()
    assert migrations == package / "migrations" and (migrations / "env.py").is_file()
    assert page == package / "web" / "dashboard.html" and page.is_file()


@pytest.fixture(scope="module")
def database(settings: Settings) -> Iterator[str]:
    """A PostgreSQL database of the module's own, absent until `boxoffice migrate` makes it."""
    url = make_url(settings.database_url)
    url = url.set(database=f"{url.database}_wheel_{uuid.uuid4().hex[:8]}")
    rendered = url.render_as_string(hide_password=False)
    yield rendered
    asyncio.run(_drop(rendered))


async def _drop(database_url: str) -> None:
    url = make_url(database_url)
    engine = create_async_engine(
        url.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    try:
        async with engine.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote(str(url.database))
            await conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
    finally:
        await engine.dispose()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_the_installed_boxoffice_migrates_serves_and_writes_bookings(
    installed: Installed, database: str, redis_server: RedisServer
) -> None:
    env = {
        **CLEAN,
        "BOXOFFICE_REDIS_URL": redis_server.url,
        "BOXOFFICE_DATABASE_URL": database,
        "BOXOFFICE_ADMIN_TOKEN": ADMIN_TOKEN,
        "BOXOFFICE_PASS_SECRET": PASS_SECRET,
        "BOXOFFICE_SWEEP_INTERVAL_SECONDS": "0.5",
    }
    said = await asyncio.to_thread(
        subprocess.run,
        [installed.boxoffice, "migrate"],
        cwd=installed.home,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert said.returncode == 0, said.stdout + said.stderr
    assert "migrated from no revision to" in said.stdout and "(the latest)" in said.stdout
    assert await asyncio.to_thread(migrate.current_revision, database) == migrate.head_revision()

    server = ApiServer(env, workers=1, program=installed.boxoffice, cwd=installed.home)
    worker = Worker(env, program=installed.boxoffice, cwd=installed.home)
    await asyncio.to_thread(server.start)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            page = await client.get("/admin/dashboard", headers=ADMIN)
            assert page.status_code == 200 and "<html" in page.text

            body = event_body()
            r = await client.post("/admin/events", json=body, headers=ADMIN)
            assert r.status_code == 201, r.text
            event_id = body["id"]
            r = await client.post(
                f"/events/{event_id}/holds",
                json={"customer_id": "wheel", "items": [{"category": "GA", "quantity": 2}]},
            )
            assert r.status_code == 201, r.text
            hold_id = r.json()["hold_id"]
            r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm", json={})
            assert r.status_code == 200, r.text
            booking_id = r.json()["booking_id"]

            worker.start()
            row = await _written(database, booking_id, within=60)
            assert (row.event_id, row.hold_id, row.customer_id) == (event_id, hold_id, "wheel")
            assert row.total == 2 * 2500
            r = await client.get(f"/events/{event_id}/bookings/{booking_id}")
            assert r.status_code == 200 and r.json()["persisted"] is True, r.text
    finally:
        worker.stop()
        server.stop()
        print(f"--- serve ---\n{server.log()}\n--- worker ---\n{worker.log()}")


async def _written(database_url: str, booking_id: str, within: float) -> sa.Row[Any]:
    """The booking's row in PostgreSQL, once the worker has written it."""
    engine = create_async_engine(database_url, poolclass=sa.pool.NullPool)
    deadline = time.monotonic() + within
    try:
        while True:
            async with engine.connect() as conn:
                row = (
                    await conn.execute(
                        sa.select(bookings).where(bookings.c.booking_id == uuid.UUID(booking_id))
                    )
                ).first()
            if row is not None:
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"booking {booking_id} not in PostgreSQL after {within} s")
            await asyncio.sleep(0.2)
    finally:
        await engine.dispose()
