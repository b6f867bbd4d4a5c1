"""Scripts survive SCRIPT FLUSH, and a Redis that restarts empty reloads events from
PostgreSQL on first use."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from service.core.settings import Settings
from service.hotpath.context import Services
from tests.apiserver import served
from tests.conftest import ADMIN, availability, create_event, server_env
from tests.servers import RedisServer


async def test_scripts_survive_script_flush(client: httpx.AsyncClient, svc: Services) -> None:
    event_id = await create_event(client)
    await svc.redis.script_flush()
    hold = await client.post(
        f"/events/{event_id}/holds",
        json={"customer_id": "c", "items": [{"category": "GA", "quantity": 1}]},
    )
    assert hold.status_code == 201, hold.text
    confirm = await client.post(f"/events/{event_id}/holds/{hold.json()['hold_id']}/confirm")
    assert confirm.status_code == 200, confirm.text
    assert (await client.get("/ready")).status_code == 200


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:  # a port of its own, below 55535 (tests/servers.py PORTS)
        yield server


@pytest.fixture
async def own_client(
    settings: Settings, own_redis: RedisServer
) -> AsyncIterator[httpx.AsyncClient]:
    async with served({**server_env(settings), "BOXOFFICE_REDIS_URL": own_redis.url}) as c:
        yield c


async def test_redis_restarting_empty_reloads_the_event_from_postgresql(
    own_client: httpx.AsyncClient, own_redis: RedisServer
) -> None:
    event_id = await create_event(own_client)
    r = await own_client.post(
        f"/events/{event_id}/holds",
        json={"customer_id": "c", "seats": ["A-1"], "items": [{"category": "GA", "quantity": 5}]},
    )
    assert r.status_code == 201
    assert await availability(own_client, event_id) == {"GA": 45, "VIP": 11}

    own_redis.restart(kill=True)  # no persistence: Redis comes back empty

    # The live state is loaded again from the catalog; the lost hold is gone with Redis.
    assert await availability(own_client, event_id) == {"GA": 50, "VIP": 12}
    r = await own_client.post(
        f"/events/{event_id}/holds", json={"customer_id": "c", "seats": ["A-1"]}
    )
    assert r.status_code == 201, r.text
    confirm = await own_client.post(f"/events/{event_id}/holds/{r.json()['hold_id']}/confirm")
    assert confirm.status_code == 200, confirm.text
    # Admin changes still apply to the reloaded event, and scripts were loaded again.
    patch = await own_client.patch(
        f"/admin/events/{event_id}",
        json={"categories": [{"name": "GA", "capacity": 60}]},
        headers=ADMIN,
    )
    assert patch.status_code == 200, patch.text
    assert await availability(own_client, event_id) == {"GA": 60, "VIP": 11}
