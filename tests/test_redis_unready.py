"""A Redis that is up but cannot serve now (LOADING its dataset after a restart, a replica
that refuses writes or has lost its primary) is answered with 503, never 500."""

from __future__ import annotations

import asyncio
import collections
import time

import httpx
import pytest
import redis.asyncio

from service.core.settings import Settings
from tests.apiserver import ApiServer
from tests.conftest import create_event, server_env
from tests.servers import RedisServer, free_port

# Enough keys, each loaded slowly (key-load-delay, in microseconds), to keep Redis loading for
# seconds; it answers clients between chunks of the file, with LOADING.
FILLER_KEYS = 30_000
LOADING_ARGS = ("--key-load-delay", "50", "--loading-process-events-interval-bytes", "1024")


async def loading(client: redis.asyncio.Redis) -> bool:
    try:
        return bool((await client.info("persistence"))["loading"])
    except redis.exceptions.ConnectionError:
        return True  # not accepting connections yet


async def test_holds_while_redis_loads_its_dataset_answer_503(settings: Settings) -> None:
    with RedisServer(args=LOADING_ARGS) as own_redis:
        server = ApiServer({**server_env(settings), "BOXOFFICE_REDIS_URL": own_redis.url}, 1)
        server.start()
        direct = redis.asyncio.Redis.from_url(own_redis.url)
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                event_id = await create_event(client)
                hold = {"customer_id": "c", "items": [{"category": "GA", "quantity": 1}]}
                r = await client.post(f"/events/{event_id}/holds", json=hold)
                assert r.status_code == 201, r.text
                async with direct.pipeline(transaction=False) as pipe:
                    for i in range(FILLER_KEYS):
                        pipe.set(f"filler:{i}", "x" * 20)
                    await pipe.execute()
                await direct.save()

                own_redis.restart(kill=True)
                statuses: collections.Counter[int] = collections.Counter()
                started = time.monotonic()
                while await loading(direct):
                    replies = await asyncio.gather(
                        *(client.post(f"/events/{event_id}/holds", json=hold) for _ in range(5))
                    )
                    for reply in replies:
                        statuses[reply.status_code] += 1
                        if reply.status_code == 503:
                            assert reply.json()["code"] == "unavailable", reply.text
                loaded_after = time.monotonic() - started
                print(f"loading took {loaded_after:.1f}s; answers meanwhile: {dict(statuses)}")
                assert statuses[503] > 0, (loaded_after, statuses)  # loading was seen
                assert set(statuses) <= {201, 409, 503}, statuses

                # Once loaded, the same request succeeds again.
                r = await client.post(f"/events/{event_id}/holds", json=hold)
                assert r.status_code == 201, r.text
        finally:
            await direct.aclose()
            server.stop()


@pytest.mark.parametrize(
    ("reply", "probe", "args"),
    [
        # READONLY: a replica refuses writes, and serves reads.
        (redis.exceptions.ReadOnlyError, "write", ()),
        # MASTERDOWN: one that does not serve even reads while its primary is away.
        (redis.exceptions.MasterDownError, "read", ("--replica-serve-stale-data", "no")),
    ],
)
async def test_a_replica_that_cannot_take_the_request_is_503(
    client: httpx.AsyncClient,
    settings: Settings,
    reply: type[redis.exceptions.ResponseError],
    probe: str,
    args: tuple[str, ...],
) -> None:
    # The event exists (in PostgreSQL); this server's Redis is a replica of a primary that
    # is not there, as after a failover that went wrong.
    event_id = await create_event(client)
    replica = ("--replicaof", "127.0.0.1", str(free_port()), *args)
    with RedisServer(args=replica) as own_redis:
        direct = redis.asyncio.Redis.from_url(own_redis.url)
        try:
            with pytest.raises(reply):  # the reply this server gives
                await (direct.set("probe", "1") if probe == "write" else direct.get("probe"))
        finally:
            await direct.aclose()
        server = ApiServer({**server_env(settings), "BOXOFFICE_REDIS_URL": own_redis.url}, 1)
        server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as own:
                hold = {"customer_id": "c", "items": [{"category": "GA", "quantity": 1}]}
                for r in (
                    await own.post(f"/events/{event_id}/holds", json=hold),
                    await own.get(f"/events/{event_id}"),
                ):
                    assert r.status_code == 503, r.text
                    assert r.json()["code"] == "unavailable"
        finally:
            server.stop()


async def test_a_redis_out_of_memory_is_503_and_changes_nothing(settings: Settings) -> None:
    # With noeviction (the policy docs/operations.md asks for), a full Redis refuses writes: the
    # hold cannot be taken now, but nothing is wrong with the request.
    with RedisServer(args=("--maxmemory-policy", "noeviction")) as own_redis:
        server = ApiServer({**server_env(settings), "BOXOFFICE_REDIS_URL": own_redis.url}, 1)
        server.start()
        direct = redis.asyncio.Redis.from_url(own_redis.url)
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                event_id = await create_event(client)
                before = (await client.get(f"/events/{event_id}")).json()["categories"]
                await direct.config_set("maxmemory", "1")
                hold = {"customer_id": "c", "items": [{"category": "GA", "quantity": 1}]}
                r = await client.post(f"/events/{event_id}/holds", json=hold)
                assert r.status_code == 503, r.text
                assert r.json()["code"] == "unavailable"
                assert "Redis" in r.json()["detail"]
                assert r.headers["retry-after"]
                await direct.config_set("maxmemory", "0")
                after = (await client.get(f"/events/{event_id}")).json()["categories"]
                assert after == before
                r = await client.post(f"/events/{event_id}/holds", json=hold)
                assert r.status_code == 201, r.text
        finally:
            await direct.aclose()
            server.stop()
