"""Client CPU per hold script call through service/hotpath/scriptpipe.py: one Redis node against a
Redis Cluster of 3 primaries (+ 3 replicas), side by side in one run.

    .venv/bin/python -m loadtest.bench_cluster_pipe [--calls 50000] [--rounds 3]
        [--concurrency 64] [--events 6] [--one-primary]

Both servers are the run's own (tests/servers.py: free ports, temp dirs, gone at the end).
Each round loads the same number of events on each (on the cluster, spread over every
primary), then `--concurrency` callers make `--calls` holds of 1 ticket in all through
service.hotpath.scripts.Scripts, as the service does; the figure is this process's CPU time per
call (user + system), on uvloop like `boxoffice serve`. Rounds alternate the two so that
a busy moment of a shared machine does not land on one side only; the best round of each
is reported (the least disturbed), with the others beside it. redis-py's RedisCluster
calling the same script is measured too, for scale. With --one-primary every cluster event
is on one primary: the cost of routing alone, without the calls of a turn split into one
smaller write per primary (which is what spreading costs: more writes and reads per call).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import msgspec
import uvloop
from redis.asyncio import Redis, RedisCluster

from service.core import schemas
from service.core.db import create_engine
from service.core.keys import event_keys
from service.core.settings import Settings
from service.durable import live
from service.hotpath.context import Services
from service.hotpath.scripts import Scripts
from service.selling import catalog
from service.selling.sales import hold_call
from tests.servers import LocalCluster, RedisServer

ITEMS = b'[["GA",1]]'


def event_body(event_id: str) -> schemas.EventCreate:
    body = {
        "id": event_id,
        "name": "bench",
        "starts_at": "2030-01-01T00:00:00Z",
        "hold_ttl_seconds": 3600,
        "max_per_order": 10,
        "categories": [{"name": "GA", "price": 2500, "currency": "EUR", "capacity": 10**7}],
    }
    return msgspec.convert(body, schemas.EventCreate)


async def load_events(
    redis: Redis, scripts: Scripts, settings: Settings, event_ids: list[str]
) -> None:
    """Loaded as the service loads a new event (live.load), without PostgreSQL."""
    svc = Services(settings, redis, scripts, create_engine(settings))
    try:
        for event_id in event_ids:
            await live.load(svc, event_id, catalog._plan(event_body(event_id)), "create")
    finally:
        await svc.engine.dispose()


async def cpu_per_call(
    call: Callable[[str, str], Awaitable[Any]],
    event_ids: list[str],
    calls: int,
    concurrency: int,
    tag: str,
) -> float:
    """µs of this process's CPU per call, `concurrency` callers at once."""
    ids = itertools.count()
    events = itertools.cycle(event_ids)

    async def caller() -> None:
        while (n := next(ids)) < calls:
            reply = await call(next(events), f"{tag}{n}")
            if b'"err"' in reply:
                raise RuntimeError(f"hold refused: {reply!r}")

    await asyncio.gather(*(caller() for _ in range(concurrency // 4)))  # warm-up: connect
    ids = itertools.count()
    started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return (time.process_time() - started) / calls * 1e6


def via_scripts(scripts: Scripts) -> Callable[[str, str], Awaitable[bytes]]:
    async def call(event_id: str, hold_id: str) -> bytes:
        hold = hold_call(event_id, hold_id, "bench", ITEMS)
        return await scripts.call_event("hold", event_id, *hold.args, extra_keys=hold.extra_keys)

    return call


def via_redis_cluster(rc: RedisCluster, sha: str, settings: Settings) -> Callable[..., Any]:
    common = (
        str(settings.idempotency_ttl_seconds),
        str(settings.reclaim_batch),
        str(settings.hold_retention_seconds * 1000),
    )

    async def call(event_id: str, hold_id: str) -> bytes:
        keys = event_keys(event_id).all
        hold = hold_call(event_id, hold_id, "bench", ITEMS)
        argv = ("", *common, *hold.args)
        extra = hold.extra_keys
        reply: bytes = await rc.evalsha(sha, len(keys) + len(extra), *keys, *extra, *argv)
        return reply

    return call


async def rounds(cfg: argparse.Namespace, single: RedisServer, cluster: LocalCluster) -> None:
    base = Settings()
    single_settings = msgspec.structs.replace(base, redis_url=single.url)
    cluster_settings = msgspec.structs.replace(base, redis_url=cluster.url)
    redis = Redis.from_url(single.url)
    rc = RedisCluster.from_url(cluster.url)
    await rc.initialize()
    on_single = Scripts(redis, single_settings)
    on_cluster = Scripts(cast(Redis, rc), cluster_settings)
    await on_single.load()
    await on_cluster.load()
    per_primary = max(1, cfg.events // 3)
    spread = cluster.event_ids(per_primary, prefix="bench")
    cluster_events = [e for ids in spread.values() for e in ids]
    if cfg.one_primary:  # all hot events on one primary: routing alone, no split batches
        spread = cluster.event_ids(len(cluster_events), prefix="bench")
        cluster_events = next(iter(spread.values()))
    single_events = [f"bench-single-{i}" for i in range(len(cluster_events))]
    await load_events(redis, on_single, single_settings, single_events)
    await load_events(cast(Redis, rc), on_cluster, cluster_settings, cluster_events)
    sha = on_cluster._scripts["hold"].sha
    rows: dict[str, list[float]] = {"single node": [], "cluster": [], "RedisCluster": []}
    try:
        for r in range(cfg.rounds):
            for name, call, events in [
                ("single node", via_scripts(on_single), single_events),
                ("cluster", via_scripts(on_cluster), cluster_events),
                ("RedisCluster", via_redis_cluster(rc, sha, base), cluster_events),
            ]:
                us = await cpu_per_call(call, events, cfg.calls, cfg.concurrency, f"r{r}{name}")
                rows[name].append(us)
                print(f"round {r + 1}: {name:<12} {us:6.1f} µs/call")
    finally:
        on_single.close()
        on_cluster.close()
        await redis.aclose()
        await rc.aclose()
    where = "all on one primary" if cfg.one_primary else f"{per_primary} per primary"
    print(
        f"\n{cfg.calls:,} hold calls a round, {cfg.concurrency} at once, {len(cluster_events)}"
        f" events ({where} on the cluster); client CPU per call:"
    )
    for name, values in rows.items():
        others = ", ".join(f"{v:.1f}" for v in values)
        print(
            f"  {name:<12} best {min(values):6.1f} µs  median {statistics.median(values):6.1f}"
            f"  (rounds: {others})"
        )
    ratio = min(rows["cluster"]) / min(rows["single node"])
    print(f"  cluster ÷ single node (best rounds): {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--events", type=int, default=6)
    parser.add_argument("--one-primary", action="store_true")
    cfg = parser.parse_args()
    with RedisServer() as single, LocalCluster() as cluster:
        uvloop.run(rounds(cfg, single, cluster))


if __name__ == "__main__":
    main()
