"""Worker benchmarks: write-behind drain rate, confirm-to-persisted lag, expiry lag.

    .venv/bin/python -m loadtest.bench_worker [--backlog 100000] [--rate 1000] [--seconds 20]
        [--holds 10000]

Uses its own Redis database (11) and PostgreSQL database (<name>_bench) on the configured
servers, never the data of `make run`, and runs the real `boxoffice worker` as a process.
Prints a table and writes loadtest/results/worker.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from service.core import schemas
from service.core.keys import event_keys
from service.core.settings import Settings
from service.durable import migrate
from service.hotpath.context import Services
from service.selling import catalog
from service.selling.sales import hold_call

RESULTS = Path(__file__).resolve().parent / "results"
BOXOFFICE = str(Path(sys.executable).parent / "boxoffice")


def bench_database_url(base: Settings) -> str:
    """The benchmarks' own PostgreSQL database: `<name>_bench` beside the configured one."""
    db = make_url(base.database_url)
    return db.set(database=f"{db.database}_bench").render_as_string(False)


def ready_bench_database(base: Settings) -> str:
    """bench_database_url(), created and migrated when missing."""
    url = bench_database_url(base)
    migrate.ensure_database(url)
    migrate.upgrade(url)
    return url


def bench_settings() -> Settings:
    base = Settings.from_env()
    return msgspec.structs.replace(
        base,
        redis_url=base.redis_url.rsplit("/", 1)[0] + "/11",
        database_url=bench_database_url(base),
    )


async def open_bench_services() -> Services:
    """Connections to the bench's own Redis database (emptied) and PostgreSQL database
    (created and migrated when missing)."""
    settings = bench_settings()
    await asyncio.to_thread(migrate.ensure_database, settings.database_url)
    await asyncio.to_thread(migrate.upgrade, settings.database_url)
    svc = Services.open(settings)
    await svc.redis.flushdb()
    await svc.scripts.load()
    return svc


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "BOXOFFICE_REDIS_URL": settings.redis_url,
        "BOXOFFICE_DATABASE_URL": settings.database_url,
    }
    return subprocess.Popen([BOXOFFICE, "worker"], env=env, stderr=subprocess.DEVNULL)  # noqa: S603


async def new_event(svc: Services, capacity: int, ttl: int = 300) -> str:
    event_id = f"bench-{secrets.token_hex(4)}"
    body = schemas.EventCreate(
        id=event_id,
        name="Benchmark",
        starts_at=msgspec.convert("2030-01-01T00:00:00Z", schemas.AwareDatetime),
        hold_ttl_seconds=ttl,
        max_per_order=1,
        categories=[
            schemas.CategoryCreate(name="GA", price=1000, currency="EUR", capacity=capacity)
        ],
    )
    await catalog.create_event(svc, body)
    return event_id


async def hold(svc: Services, event_id: str) -> str:
    hold_id = secrets.token_urlsafe(16)
    hold = hold_call(event_id, hold_id, "bench", b'[["GA",1]]')
    await svc.scripts.call_event("hold", event_id, *hold.args, extra_keys=hold.extra_keys)
    return hold_id


async def confirm(svc: Services, event_id: str, hold_id: str) -> None:
    from service.selling.sales import uuid7

    await svc.scripts.call_event("confirm", event_id, hold_id, uuid7(), "")


async def in_batches(n: int, make: Any, size: int = 500) -> list[Any]:
    out: list[Any] = []
    for start in range(0, n, size):
        out += await asyncio.gather(*(make() for _ in range(min(size, n - start))))
    return out


async def count(svc: Services, event_id: str) -> int:
    async with svc.engine.connect() as conn:
        n = await conn.scalar(
            sa.text("SELECT count(*) FROM bookings WHERE event_id = :e"), {"e": event_id}
        )
    return int(n or 0)


async def drain(svc: Services, backlog: int) -> dict[str, float]:
    event_id = await new_event(svc, backlog)
    holds = await in_batches(backlog, lambda: hold(svc, event_id))
    for start in range(0, backlog, 500):
        await asyncio.gather(*(confirm(svc, event_id, h) for h in holds[start : start + 500]))
    worker = start_worker(svc.settings)
    try:
        # From the first booking written: the worker's start-up is not its drain rate.
        while (first := await count(svc, event_id)) == 0:
            await asyncio.sleep(0.02)
        started = time.monotonic()
        while (done := await count(svc, event_id)) < backlog:
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        done -= first
    finally:
        worker.terminate()
        worker.wait()
    return {"bookings": done, "seconds": round(elapsed, 2), "per_second": round(done / elapsed)}


async def lag(svc: Services, rate: int, seconds: int) -> dict[str, float]:
    n = rate * seconds
    event_id = await new_event(svc, n)
    holds = await in_batches(n, lambda: hold(svc, event_id))
    worker = start_worker(svc.settings)
    try:
        await asyncio.sleep(2)  # let it find the stream
        started = time.monotonic()
        tick = 0.01  # 10 ms slices keep the pace steady
        per_tick = rate * tick
        sent = 0
        while sent < n:
            due = min(n, int((time.monotonic() - started) / tick * per_tick) + int(per_tick))
            await asyncio.gather(*(confirm(svc, event_id, h) for h in holds[sent:due]))
            sent = due
            await asyncio.sleep(tick)
        while await count(svc, event_id) < n:
            await asyncio.sleep(0.1)
    finally:
        worker.terminate()
        worker.wait()
    async with svc.engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY l),"
                    " percentile_cont(0.99) WITHIN GROUP (ORDER BY l), max(l) FROM"
                    " (SELECT extract(epoch FROM persisted_at - confirmed_at) AS l"
                    "  FROM bookings WHERE event_id = :e) t"
                ),
                {"e": event_id},
            )
        ).one()
    return {
        "confirms": n,
        "rate": rate,
        "p50_ms": round(row[0] * 1000),
        "p99_ms": round(row[1] * 1000),
        "max_ms": round(row[2] * 1000),
    }


async def expiry(svc: Services, holds: int, spread: int) -> dict[str, float]:
    """`holds` holds with the shortest TTL, created over `spread` seconds, so that they
    expire over about that long; lag = when a layer released it - its deadline."""
    event_id = await new_event(svc, holds, ttl=10)
    worker = start_worker(svc.settings)
    try:
        await asyncio.sleep(2)
        started = time.monotonic()
        per_second = holds / spread
        made = 0
        while made < holds:
            due = min(holds, int((time.monotonic() - started) * per_second) + 1)
            await asyncio.gather(*(hold(svc, event_id) for _ in range(due - made)))
            made = due
            await asyncio.sleep(0.02)
        keys = event_keys(event_id)
        while await svc.redis.zcard(keys.deadlines):
            await asyncio.sleep(0.5)
    finally:
        worker.terminate()
        worker.wait()
    records = await svc.redis.hvals(keys.holds)
    lags = sorted(r["e"] - r["ex"] for r in map(json.loads, records))
    return {
        "holds": len(lags),
        "p50_ms": lags[len(lags) // 2],
        "p99_ms": lags[int(len(lags) * 0.99)],
        "max_ms": lags[-1],
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--holds", type=int, default=10_000)
    parser.add_argument("--spread", type=int, default=50)
    parser.add_argument("--only", choices=["drain", "lag", "expiry"], action="append")
    args = parser.parse_args()
    svc = await open_bench_services()
    try:
        only = args.only or ["drain", "lag", "expiry"]
        results: dict[str, dict[str, float]] = {}
        if "drain" in only:
            results["drain"] = await drain(svc, args.backlog)
        if "lag" in only:
            results["lag"] = await lag(svc, args.rate, args.seconds)
        if "expiry" in only:
            results["expiry"] = await expiry(svc, args.holds, args.spread)
    finally:
        await svc.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "worker.json").write_text(json.dumps(results, indent=2) + "\n")
    if d := results.get("drain"):
        print(
            f"write-behind drain: {d['bookings']} bookings in {d['seconds']} s"
            f" = {d['per_second']}/s"
        )
    for key, name in (("lag", "confirm -> persisted"), ("expiry", "deadline -> released")):
        if r := results.get(key):
            print(f"{name} lag: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms")


if __name__ == "__main__":
    asyncio.run(main())
