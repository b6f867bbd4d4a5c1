"""Reconciliation benchmark: one event with 200,000 seats and 100,000 bookings.

    .venv/bin/python -m loadtest.bench_reconcile [--seats 200000] [--bookings 100000]

Uses its own Redis database (11) and PostgreSQL database (<name>_bench), like
loadtest/bench_worker.py. Prints the time and the memory the check took, and the same for
a repair, and writes loadtest/results/reconcile.json.
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

import msgspec

from loadtest.bench_worker import BOXOFFICE, RESULTS, in_batches, open_bench_services
from service.core import schemas
from service.core.keys import event_keys
from service.core.settings import Settings
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services
from service.selling import catalog
from service.selling.sales import hold_call, uuid7

ROW = 500  # seats per row


async def sell_seats(svc: Services, event_id: str, bookings: int) -> None:
    """One best-available seat per booking, through the real scripts."""

    async def one() -> None:
        hold_id = secrets.token_urlsafe(16)
        hold = hold_call(event_id, hold_id, secrets.token_hex(4), b'[["VIP",1]]')
        await svc.scripts.call_event("hold", event_id, *hold.args, extra_keys=hold.extra_keys)
        await svc.scripts.call_event("confirm", event_id, hold_id, uuid7(), "")

    await in_batches(bookings, one)


# Runs a command and reports its peak resident memory (KiB) on stderr's last line.
_PEAK = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=False); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)"
)


def measure(settings: Settings, event_id: str, repair: bool) -> dict[str, float]:
    """`boxoffice reconcile` as an operator runs it: its wall time and peak memory."""
    env = {
        **os.environ,
        "BOXOFFICE_REDIS_URL": settings.redis_url,
        "BOXOFFICE_DATABASE_URL": settings.database_url,
    }
    argv = [BOXOFFICE, "reconcile", "--event", event_id, "--json"]
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", _PEAK, *argv, *(["--repair"] if repair else [])],
        env=env,
        capture_output=True,
        check=True,
    )
    elapsed = time.perf_counter() - started
    report = json.loads(done.stdout)
    assert report["consistent"], done.stdout[:2000]
    peak_kib = int(done.stderr.decode().strip().splitlines()[-1])
    return {"seconds": round(elapsed, 2), "max_rss_mib": round(peak_kib / 1024, 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seats", type=int, default=200_000)
    parser.add_argument("--bookings", type=int, default=100_000)
    args = parser.parse_args()
    svc = await open_bench_services()
    settings = svc.settings
    try:
        event_id = f"bench-{secrets.token_hex(4)}"
        rows = [f"R{i}" for i in range(args.seats // ROW)]
        body = msgspec.convert(
            {
                "id": event_id,
                "name": "Reconcile benchmark",
                "starts_at": "2030-01-01T00:00:00Z",
                "max_per_order": 1,
                "categories": [
                    {
                        "name": "VIP",
                        "price": 1000,
                        "currency": "EUR",
                        "seat_blocks": [{"rows": rows, "seats_per_row": ROW}],
                    }
                ],
            },
            schemas.EventCreate,
        )
        started = time.perf_counter()
        await catalog.create_event(svc, body)
        await sell_seats(svc, event_id, args.bookings)
        await WriteBehind(svc, "bench").drain(event_id)
        setup = time.perf_counter() - started
        check = await asyncio.to_thread(measure, settings, event_id, False)
        # A repair that has work to do: Redis lost the event entirely.
        for key in event_keys(event_id).all[:-2]:
            await svc.redis.delete(key)
        repair = await asyncio.to_thread(measure, settings, event_id, True)
    finally:
        await svc.close()
    results = {
        "seats": args.seats,
        "bookings": args.bookings,
        "setup_seconds": round(setup, 1),
        "check": check,
        "repair_after_loss": repair,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reconcile.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"reconcile, {args.seats} seats and {args.bookings} bookings:")
    for name, r in (("check", check), ("repair after Redis lost the event", repair)):
        print(f"  {name}: {r['seconds']} s, peak memory {r['max_rss_mib']} MiB")


if __name__ == "__main__":
    asyncio.run(main())
