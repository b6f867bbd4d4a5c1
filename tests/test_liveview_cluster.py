"""The live view on a Redis Cluster: each event's figures read on its own primary (its
script's keys in its slot), refusals tallied across slots."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.core.settings import Settings
from tests.apiserver import ApiServer
from tests.conftest import ADMIN, event_body, eventually, server_env
from tests.servers import LocalCluster
from tests.test_liveview import category, watching


@pytest.fixture(scope="module")
def capi(cluster: LocalCluster, settings: Settings) -> Iterator[ApiServer]:
    server = ApiServer({**server_env(settings), "BOXOFFICE_REDIS_URL": cluster.url}, workers=1)
    server.start()
    yield server
    server.stop()


async def test_figures_of_an_event_on_every_primary(cluster: LocalCluster, capi: ApiServer) -> None:
    event_ids = [ids[0] for ids in cluster.event_ids(1, "live").values()]
    assert len(event_ids) == 3
    async with httpx.AsyncClient(base_url=capi.url, timeout=30) as client:
        for event_id in event_ids:
            r = await client.post("/admin/events", json=event_body(event_id), headers=ADMIN)
            assert r.status_code == 201, r.text
            r = await client.post(
                f"/events/{event_id}/holds",
                json={"customer_id": "c", "items": [{"category": "GA", "quantity": 2}]},
            )
            assert r.status_code == 201, r.text
            confirm = f"/events/{event_id}/holds/{r.json()['hold_id']}/confirm"
            assert (await client.post(confirm)).status_code == 200
            r = await client.post(
                f"/events/{event_id}/holds",
                json={"customer_id": "c", "items": [{"category": "NOPE", "quantity": 1}]},
            )
            assert r.json()["code"] == "unknown_category", r.text
        for event_id in event_ids:
            doc = await once_tallied(client, event_id)
            assert category(doc, "GA")["sold"] == 2, doc
            assert doc["totals"]["confirmations"] == 1
            assert doc["totals"]["refusals"] == {"unknown_category": 1}, doc
            # No worker runs: the booking waits in the event's outbox.
            assert doc["write_behind"]["backlog"] == 1, doc
            assert doc["write_behind"]["lag_seconds"] > 0


async def once_tallied(client: httpx.AsyncClient, event_id: str) -> dict[str, Any]:
    """The event's figures once a refusal's tally has reached its slot (within a second or so
    of the refusal: each API process adds its tallies up before it writes them)."""
    doc: dict[str, Any] = {}

    async def tallied() -> bool:
        async with watching(client, event_id) as docs:
            doc.clear()
            doc.update(await anext(docs))
        return bool(doc["totals"]["refusals"])

    await eventually(tallied, within=10)
    return doc
