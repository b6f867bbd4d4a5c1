"""The service (API server, worker, reconcile) on a real Redis Cluster (tests/servers.py
LocalCluster, 3 primaries with a replica each), with events on every primary."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis, RedisCluster

from service.context import Services
from service.keys import event_keys
from service.settings import Settings
from tests.servers import LocalCluster, RedisServer, free_port


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as c:
        yield c


@pytest.fixture(scope="module")
def csettings(cluster: LocalCluster, settings: Settings) -> Settings:
    return Settings(
        redis_url=cluster.url,
        database_url=settings.database_url,
        admin_token=settings.admin_token,
    )


@pytest.fixture(scope="module")
async def csvc(csettings: Settings) -> AsyncIterator[Services]:
    svc = Services.open(csettings)
    await svc.start()
    await svc.scripts.load()
    yield svc
    await svc.close()


async def test_services_use_the_cluster_client_when_redis_is_a_cluster(
    cluster: LocalCluster, csvc: Services
) -> None:
    assert isinstance(csvc.redis, RedisCluster)
    # Every primary answers through it, not only the URL's node.
    assert len(csvc.redis.get_primaries()) == 3
    keys = [event_keys(event_id).meta for ids in cluster.event_ids(1).values() for event_id in ids]
    for key in keys:
        await csvc.redis.set(key, "1")
    assert all([await csvc.redis.get(key) == b"1" for key in keys])


async def test_seed_nodes_find_the_cluster_when_the_url_node_is_down(
    cluster: LocalCluster, settings: Settings
) -> None:
    svc = Services.open(
        Settings(
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            redis_seed_nodes=",".join(cluster.addresses[1:3]),
            database_url=settings.database_url,
        )
    )
    try:
        await svc.start()
        assert isinstance(svc.redis, RedisCluster)
        assert await svc.redis.ping()
    finally:
        await svc.close()


async def test_a_single_node_keeps_its_own_client(settings: Settings) -> None:
    with RedisServer() as server:
        svc = Services.open(Settings(redis_url=server.url, database_url=settings.database_url))
        try:
            await svc.start()
            assert type(svc.redis) is Redis
        finally:
            await svc.close()


async def test_nothing_answering_is_not_an_error_at_start(settings: Settings) -> None:
    svc = Services.open(
        Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", database_url=settings.database_url)
    )
    try:
        await svc.start()
        assert type(svc.redis) is Redis
    finally:
        await svc.close()
