"""Reads of Redis and PostgreSQL a chunk at a time, for reconcile: no reply so big that it
holds Redis up for more than a millisecond or so, and memory bounded by the chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from service.core.timefmt import redis_ms
from service.durable import ledger
from service.hotpath.context import Services

# Elements one Redis read returns at most (HSCAN, XRANGE, HMGET): a reply of a few
# hundred kB at most, so that no read holds Redis up for more than a millisecond or so.
CHUNK = 1000


async def hscan(svc: Services, key: str) -> AsyncIterator[list[tuple[bytes, bytes]]]:
    """A hash a chunk at a time, each field once."""
    seen: set[bytes] = set()
    cursor = 0
    while True:
        reply: Any = await svc.redis.hscan(key, cursor, count=CHUNK)
        cursor, chunk = reply
        fresh = [(k, v) for k, v in chunk.items() if k not in seen]
        seen.update(k for k, _ in fresh)
        if fresh:
            yield fresh
        if cursor == 0:
            return


async def hmget(svc: Services, key: str, fields: list[str]) -> list[Any]:
    """HMGET, CHUNK fields a call."""
    out: list[Any] = []
    for start in range(0, len(fields), CHUNK):
        out += await svc.redis.hmget(key, fields[start : start + CHUNK])
    return out


async def redis_time(svc: Services) -> int:
    return redis_ms(await svc.redis.time())


async def stream(svc: Services, key: str) -> AsyncIterator[list[tuple[bytes, dict[bytes, bytes]]]]:
    """A stream a chunk at a time."""
    start = "-"
    while True:
        chunk: Any = await svc.redis.xrange(key, min=start, count=CHUNK)
        if chunk:
            yield chunk
        if len(chunk) < CHUNK:
            return
        start = "(" + chunk[-1][0].decode()


async def stored(svc: Services, event_id: str) -> dict[str, str]:
    """Booking id -> status, as PostgreSQL has them."""
    stored: dict[str, str] = {}
    async for chunk in ledger.briefs(svc, event_id):
        stored.update((r.id, r.status) for r in chunk)
    return stored
