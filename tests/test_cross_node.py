"""Creating and changing an event touches PostgreSQL, the registry of live events and the
event's own keys, on other nodes of a cluster: a failure at any step leaves Redis and
PostgreSQL agreeing, and never an event that sells without its PostgreSQL row.

Failures are made for real: PostgreSQL refusing at commit (a deferred constraint trigger
of the test's own), Redis refusing a command the load needs half-way (ACL), a Redis node
killed (SIGKILL) between PostgreSQL and the load; on one node and on a cluster."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import redis
import sqlalchemy as sa
from redis.crc import key_slot

from service.core import errors, schemas
from service.core.db import events
from service.core.keys import EVENTS, event_keys
from service.core.settings import Settings
from service.durable import live
from service.hotpath.context import Services
from service.selling import catalog, sales
from tests.conftest import event_body, new_event_id
from tests.servers import LocalCluster, RedisServer

# Events named so are refused by PostgreSQL at commit; "slow" ones take 2 s to commit.
REFUSED, SLOW = "refused by the test", "slow to commit"
TRIGGER = (
    """CREATE OR REPLACE FUNCTION bo_test_cross_node() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF NEW.name = 'refused by the test' THEN RAISE EXCEPTION 'refused by the test'; END IF;
      IF NEW.name = 'slow to commit' THEN PERFORM pg_sleep(2); END IF;
      RETURN NEW;
    END $$""",
    "DROP TRIGGER IF EXISTS bo_test_cross_node ON events",
    """CREATE CONSTRAINT TRIGGER bo_test_cross_node AFTER INSERT OR UPDATE ON events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bo_test_cross_node()""",
)
GA = schemas.HoldCreate(customer_id="c", items=[schemas.HoldItem("GA", 1)])


def body(event_id: str | None = None, **overrides: Any) -> schemas.EventCreate:
    return msgspec.convert(event_body(event_id, **overrides), schemas.EventCreate)


async def open_services(settings: Settings, redis_url: str) -> Services:
    svc = Services.open(Settings(redis_url=redis_url, database_url=settings.database_url))
    await svc.start()
    return svc


@pytest.fixture
async def refusing(settings: Settings) -> AsyncIterator[None]:
    """The deferred trigger: it fires at commit, after every statement succeeded."""
    svc = Services.open(settings)
    try:
        async with svc.engine.begin() as conn:
            for statement in TRIGGER:
                await conn.execute(sa.text(statement))
        yield
    finally:
        async with svc.engine.begin() as conn:
            await conn.execute(sa.text("DROP TRIGGER IF EXISTS bo_test_cross_node ON events"))
        await svc.close()


async def agree(svc: Services, event_id: str) -> bool:
    """Redis and PostgreSQL agree on the event; whether it exists. A hold (and its
    confirmation) succeeds only on an event that PostgreSQL has."""
    in_postgres = await live.in_postgres(svc, event_id)
    in_redis = bool(await svc.redis.exists(event_keys(event_id).meta))
    assert in_postgres or not in_redis, "Redis has an event that PostgreSQL lacks"
    live.MISSES.forget(event_id)
    try:
        hold, _ = await sales.create_hold_counted(svc, event_id, GA, None)
    except errors.EventNotFound:
        assert not in_postgres
        assert not await svc.redis.sismember(EVENTS, event_id)
        return False
    assert in_postgres, "a hold succeeded on an event that PostgreSQL lacks"
    await sales.confirm_hold(svc, event_id, hold.hold_id, schemas.HoldConfirm(), None)
    assert await svc.redis.sismember(EVENTS, event_id)
    return True


# --- one node ---------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True, appendfsync="always") as server:
        yield server


async def test_postgresql_refusing_at_commit_leaves_nothing_in_redis(
    settings: Settings, own_redis: RedisServer, refusing: None
) -> None:
    svc = await open_services(settings, own_redis.url)
    try:
        event_id = new_event_id()
        with pytest.raises(sa.exc.DBAPIError, match="refused by the test"):
            await catalog.create_event(svc, body(event_id, name=REFUSED))
        assert not await agree(svc, event_id)
        assert not await svc.redis.exists(*event_keys(event_id).all)
    finally:
        await svc.close()


async def test_a_change_postgresql_refuses_at_commit_is_taken_back_in_redis(
    settings: Settings, own_redis: RedisServer, refusing: None
) -> None:
    svc = await open_services(settings, own_redis.url)
    try:
        event_id = new_event_id()
        await catalog.create_event(svc, body(event_id))
        patch = msgspec.convert(
            {"name": REFUSED, "status": "paused", "categories": [{"name": "GA", "capacity": 7}]},
            schemas.EventPatch,
        )
        with pytest.raises(sa.exc.DBAPIError, match="refused by the test"):
            await catalog.patch_event(svc, event_id, patch)
        view = await catalog.view_event(svc, event_id)
        assert (view.name, view.status) == ("Test drop", "on_sale")
        assert [c.capacity for c in view.categories if c.name == "GA"] == [50]
        async with svc.engine.connect() as conn:
            name = await conn.scalar(sa.select(events.c.name).where(events.c.id == event_id))
        assert name == "Test drop"
        assert await agree(svc, event_id)
    finally:
        await svc.close()


async def test_a_load_refused_half_way_is_undone(
    settings: Settings, own_redis: RedisServer
) -> None:
    """The load script fails after it wrote part of the event (its seat order list is
    refused by an ACL): no half-loaded event stays, PostgreSQL does not keep it."""
    with redis.Redis(port=own_redis.port) as admin:
        admin.execute_command("ACL", "SETUSER", "svc", "on", ">pw", "~*", "&*", "+@all", "-rpush")
    url = f"redis://svc:pw@127.0.0.1:{own_redis.port}/0"
    svc = await open_services(settings, url)
    try:
        event_id = new_event_id()
        with pytest.raises(Exception, match="run this command"):
            await catalog.create_event(svc, body(event_id))
        assert not await agree(svc, event_id)
        assert not await svc.redis.exists(*event_keys(event_id).all)
    finally:
        await svc.close()


async def test_redis_killed_between_postgresql_and_the_load(
    settings: Settings, own_redis: RedisServer, refusing: None
) -> None:
    """Redis dies while PostgreSQL commits: the load fails, the undo cannot reach Redis,
    so PostgreSQL keeps the event and Redis (back, from its AOF) loads it on first use."""
    svc = await open_services(settings, own_redis.url)
    try:
        event_id = new_event_id()
        create = asyncio.ensure_future(catalog.create_event(svc, body(event_id, name=SLOW)))
        await asyncio.sleep(0.7)
        assert not create.done()
        own_redis.kill()
        with pytest.raises(Exception):  # noqa: B017 - whichever way Redis is away
            await create
        own_redis.start()
        assert await agree(svc, event_id)
    finally:
        await svc.close()


async def test_the_registry_forgets_ids_of_events_that_do_not_exist(
    settings: Settings, own_redis: RedisServer
) -> None:
    svc = await open_services(settings, own_redis.url)
    try:
        real = new_event_id()
        await catalog.create_event(svc, body(real))
        ghost = new_event_id()
        await live.register(svc, ghost)
        assert await live.prune_registry(svc) == [ghost]
        assert await live.live_event_ids(svc) == [real]
    finally:
        await svc.close()


# --- a cluster --------------------------------------------------------------------------


async def test_on_a_cluster_every_step_leaves_redis_and_postgresql_agreeing(
    settings: Settings, cluster: LocalCluster, refusing: None
) -> None:
    svc = await open_services(settings, cluster.url)
    try:
        per_primary = cluster.event_ids(3)
        # On every primary (the URL's node among them): created, registered, selling.
        for ids in per_primary.values():
            await catalog.create_event(svc, body(ids[0]))
            assert await agree(svc, ids[0])
        # PostgreSQL refusing at commit, for an event on every primary: nothing anywhere.
        for ids in per_primary.values():
            with pytest.raises(sa.exc.DBAPIError):
                await catalog.create_event(svc, body(ids[1], name=REFUSED))
            assert not await agree(svc, ids[1])
        # The event's primary killed while PostgreSQL commits: its replica takes over and
        # the load waits it out, or the create fails; either way both agree.
        port, ids = next(iter(per_primary.items()))
        primary = next(n for n in cluster.primaries() if n.port == port)
        create = asyncio.ensure_future(catalog.create_event(svc, body(ids[2], name=SLOW)))
        await asyncio.sleep(0.7)
        cluster.kill(primary)
        with contextlib.suppress(Exception):
            await create
        await asyncio.to_thread(cluster.wait_ok)
        assert await agree(svc, ids[2])
        # The registry's primary killed: a create there fails first, or waits it out.
        registry = cluster.owner(key_slot(EVENTS.encode()))
        event_id = new_event_id()
        cluster.kill(registry)
        with contextlib.suppress(Exception):
            await catalog.create_event(svc, body(event_id))
        await asyncio.to_thread(cluster.wait_ok)
        await agree(svc, event_id)
    finally:
        await svc.close()
        await asyncio.to_thread(cluster.heal)
