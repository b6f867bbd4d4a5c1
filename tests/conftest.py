"""Shared fixtures: a test database and Redis database of their own, the real API server."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
from sqlalchemy.engine import make_url

from service.core.settings import Settings
from service.durable import migrate
from service.hotpath.context import Services
from tests import openapi_check
from tests.apiserver import ApiServer, Worker
from tests.servers import LocalCluster, RedisServer

ADMIN_TOKEN = "test-admin-token"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
# The waiting room's pass secret of the test servers: tests forge passes with it.
PASS_SECRET = "test-pass-secret-0123456789"


def _test_settings() -> Settings:
    """The configured servers, but never the data of `make run`: Redis database 15 and a
    PostgreSQL database named `<name>_test`; under pytest-xdist, the worker's own database
    (`<name>_test_gw0`, ...) and the worker's own Redis (pytest_configure)."""
    base = Settings.from_env()
    redis_url = (
        os.environ.get("BOXOFFICE_TEST_REDIS_URL") or base.redis_url.rsplit("/", 1)[0] + "/15"
    )
    db = make_url(base.database_url)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    name = f"{db.database or 'boxoffice'}_test" + (f"_{worker}" if worker else "")
    database_url = db.set(database=name).render_as_string(hide_password=False)
    # The per-customer hold-attempt limit off: tests race one customer against itself
    # hundreds of times (max_per_customer); tests/test_rate_limits.py turns it on. The
    # per-address limits (on by default) off too: every test client sends from 127.0.0.1,
    # as a trusted backend in front does; tests/test_rate_limits.py tests them.
    return Settings(
        redis_url=redis_url,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        pass_secret=PASS_SECRET,
        rate_limit_customer_holds=0,
        rate_limit_address=0,
    )


WORKER_REDIS = pytest.StashKey[RedisServer]()


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker runs a redis-server of its own for the tests' Redis (database 15 as
    ever): tests FLUSHALL, kill every pub/sub client and count the server's commandstats,
    which on a server shared by the workers would reach into each other's tests. Its
    database is made here, as `make services` makes `<name>_test`: some tests run commands
    on it without the `settings` fixture."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return
    server = config.stash[WORKER_REDIS] = RedisServer()
    server.start()
    os.environ["BOXOFFICE_TEST_REDIS_URL"] = server.url.rsplit("/", 1)[0] + "/15"
    migrate.ensure_database(_test_settings().database_url)


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(WORKER_REDIS, None)
    if server is not None:
        server.close()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the `cluster` fixture, itself or through another fixture, is in the
    cluster tier (`make test-fast` leaves it out); one that starts a LocalCluster itself says
    so with @pytest.mark.cluster. Before -m deselects: hence tryfirst. Those on the fixture's
    cluster share it: one xdist worker runs them all (`--dist loadgroup`), one cluster.

    Likewise the tests of a module that share a module-scoped fixture (an API server, a
    Redis of the module's own) run on one worker: spread over three, each worker started
    the servers again (tests/test_sold_out.py's two servers on their own Redis: three
    times, 11-14 s each under load)."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.xdist_group("cluster"))
        elif item.get_closest_marker("xdist_group") is None and _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)  # pytest's record of the fixtures it uses
    if info is None:
        return False
    return any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """The xdist_group marks honoured on pytest 9.2. An xdist worker tells the scheduler a
    test's group as a suffix of its node id (`...::test_x@cluster`), written by xdist 3.8
    into `item._nodeid`, which pytest 9.2 no longer reads (its ids are `item._id`): every
    group was silently spread over the workers, each starting a Redis Cluster of its own
    (pytest-dev/pytest-xdist#1386). Done here, before xdist sends the ids
    (tryfirst), and only where xdist has not done it already."""
    if not getattr(session.config.option, "loadgroup", False):  # set in xdist's workers
        return
    for item in session.items:
        groups = {
            str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")
        }
        suffix = "@" + "_".join(sorted(groups))
        if groups and not item.nodeid.endswith(suffix):
            from _pytest.nodeid import NodeId  # pytest 9.2's; before it xdist's suffix works

            item._id = NodeId.parse(item.nodeid + suffix)


@pytest.fixture(scope="session")
def settings() -> Settings:
    s = _test_settings()
    migrate.ensure_database(s.database_url)
    migrate.upgrade(s.database_url)
    return s


def on_redis(settings: Settings, redis_url: str) -> Settings:
    """The test database, admin token and pass secret on another Redis (a server or
    cluster of the test's own); every other setting its default, the per-customer hold
    limit too, but the per-address limits off (every test client is 127.0.0.1). The same
    secret: a queue ticket signed by the test's own Services (a join through waitingroom)
    is then good on the test's API server."""
    return Settings(
        redis_url=redis_url,
        database_url=settings.database_url,
        admin_token=settings.admin_token,
        rate_limit_address=0,
        pass_secret=settings.pass_secret,
    )


def server_env(settings: Settings) -> dict[str, str]:
    return {
        "BOXOFFICE_REDIS_URL": settings.redis_url,
        "BOXOFFICE_DATABASE_URL": settings.database_url,
        "BOXOFFICE_ADMIN_TOKEN": settings.admin_token,
        "BOXOFFICE_PASS_SECRET": settings.pass_secret,
        "BOXOFFICE_RATE_LIMIT_CUSTOMER_HOLDS": str(settings.rate_limit_customer_holds),
        "BOXOFFICE_RATE_LIMIT_ADDRESS": str(settings.rate_limit_address),
    }


@pytest.fixture(scope="session")
def api(settings: Settings) -> Iterator[ApiServer]:
    server = ApiServer(server_env(settings))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def svc(settings: Settings) -> AsyncIterator[Services]:
    services = Services.open(settings)
    await services.redis.flushdb()
    await services.scripts.load()
    yield services
    await services.close()


@pytest.fixture
async def client(
    api: ApiServer, svc: Services, request: pytest.FixtureRequest
) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    # In the modules marked `openapi_checked`, every answer of the lean lane's routes is
    # checked against the OpenAPI document's description of it (tests/openapi_check.py).
    checked = request.node.get_closest_marker("openapi_checked") is not None
    hooks = {"response": [openapi_check.check]} if checked else {}
    async with httpx.AsyncClient(
        base_url=api.url, timeout=30, limits=limits, event_hooks=hooks
    ) as c:
        yield c


def new_event_id(prefix: str = "ev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def event_body(event_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": event_id or new_event_id(),
        "name": "Test drop",
        "starts_at": "2030-12-01T19:00:00Z",
        "hold_ttl_seconds": 300,
        "max_per_order": 10,
        "categories": [
            {"name": "GA", "price": 2500, "currency": "EUR", "capacity": 50},
            {
                "name": "VIP",
                "price": 9900,
                "currency": "EUR",
                "seat_blocks": [{"rows": ["A", "B"], "seats_per_row": 5}],
                "seats": ["BOX-1", "BOX-2"],
            },
        ],
    }
    body.update(overrides)
    return body


async def create_event(client: httpx.AsyncClient, **overrides: Any) -> str:
    body = event_body(**overrides)
    r = await client.post("/admin/events", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    event_id: str = body["id"]
    return event_id


async def availability(client: httpx.AsyncClient, event_id: str) -> dict[str, int]:
    r = await client.get(f"/events/{event_id}")
    assert r.status_code == 200, r.text
    return {c["name"]: c["available"] for c in r.json()["categories"]}


async def snapshot(client: httpx.AsyncClient, event_id: str) -> tuple[Any, Any]:
    """Everything a request could change: availability and every seat's state."""
    event = (await client.get(f"/events/{event_id}")).json()
    seats = (await client.get(f"/events/{event_id}/seats")).json()
    return event, seats


# Moves a hold's deadline into the past, as the passing of its TTL would: the tests check
# what happens after expiry without waiting minutes for it. Touches only the test's state.
_EXPIRE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local h = cjson.decode(raw)
local t = redis.call('TIME')
h.ex = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(h))
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then redis.call('ZADD', KEYS[2], h.ex, ARGV[1]) end
if ARGV[2] == '1' then redis.call('PEXPIRE', KEYS[3], 1) end
return 1
"""


async def expire_hold(
    svc: Services, event_id: str, hold_id: str, fire_ttl: bool = True, ago_ms: int = 1
) -> None:
    """Move the hold's deadline into the past; with fire_ttl, its TTL key expires too (the
    keyspace event the listener hears), else only a sweep or a lazy reclaim can find it."""
    from service.core.keys import event_keys

    k = event_keys(event_id)
    await svc.redis.eval(
        _EXPIRE,
        3,
        k.holds,
        k.deadlines,
        k.hold_ttl(hold_id),
        hold_id,
        "1" if fire_ttl else "0",
        ago_ms,
    )


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {**server_env(settings), "BOXOFFICE_SWEEP_INTERVAL_SECONDS": "0.5", **extra}


def missing_database_env(settings: Settings) -> dict[str, str]:
    """A server's environment with a PostgreSQL that answers but has no such database."""
    missing = make_url(settings.database_url).set(database="boxoffice_no_such_database")
    return {
        **server_env(settings),
        "BOXOFFICE_DATABASE_URL": missing.render_as_string(hide_password=False),
    }


@asynccontextmanager
async def services_with(settings: Settings, **changes: Any) -> AsyncIterator[Services]:
    """Services of the test's own on these settings with `changes`, scripts loaded."""
    svc = Services.open(msgspec.structs.replace(settings, **changes))
    try:
        await svc.scripts.load()
        yield svc
    finally:
        await svc.close()


StartWorker = Callable[[dict[str, str]], Worker]


@pytest.fixture
def start_worker() -> Iterator[StartWorker]:
    """Starts `boxoffice worker` processes; stops whatever is still running at teardown and
    prints each one's log (shown when the test fails)."""
    started: list[Worker] = []

    def start(env: dict[str, str]) -> Worker:
        w = Worker(env)
        w.start()
        started.append(w)
        return w

    yield start
    for i, w in enumerate(started):
        w.stop()
        print(f"--- worker {i} log ---\n{w.log()}")


@pytest.fixture(scope="session")
def session_cluster() -> Iterator[LocalCluster]:
    """One Redis Cluster per session (per xdist worker): starting one takes seconds."""
    with LocalCluster() as c:
        yield c


@pytest.fixture(scope="module")
def cluster(session_cluster: LocalCluster) -> LocalCluster:
    """The session's Redis Cluster (3 primaries with a replica each), for each module as if
    new: every node running, nothing stored, no stats (LocalCluster.reset)."""
    session_cluster.reset()
    return session_cluster


@pytest.fixture(scope="module")
def slowlog_redis() -> Iterator[RedisServer]:
    """A Redis of the module's own: its SLOWLOG records every command, and nobody else's."""
    with RedisServer(
        args=["--slowlog-log-slower-than", "0", "--slowlog-max-len", "100000"]
    ) as server:
        yield server
