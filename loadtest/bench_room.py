"""The waiting room at scale: a room of `--buyers` pre-queued buyers, opened, then polled
over HTTP by wrk while admission runs.

    .venv/bin/python -m loadtest.bench_room [--buyers 1000000] [--seconds 30]
        [--rate 10000] [--admission-seconds 60] [--workers 2]

The buyers join through the join script in batches of 1,000 (waitingroom.join_many, as an
API process sends the joins of one loop turn), on a Redis server of the run's own
(tests/servers.py) and the bench's PostgreSQL database (`<name>_bench`, as `make bench`);
`boxoffice serve` answers the polls. Reported, with the issue's goals:
- Redis commands per poll (INFO commandstats over the wrk run, every command counted, the
  scripts' own included), and script calls per poll (the rooms' reads: each API process
  reads a room at most 4 times a second, so these fall as the poll rate grows): goal at
  most 0.001;
- Redis memory per queued buyer (used_memory grown by the load, over the buyers): goal at
  most 150 bytes;
- admitted after `--admission-seconds` from the opening against the rate: goal within 2%;
- poll throughput and latency (p50, p99) as wrk measured them;
- the poll rate the room asks for (poll_after_seconds over the queue, waitingroom.
  implied_poll_rate) against a poll every 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvloop

from loadtest.bench_worker import ready_bench_database
from service.core.settings import Settings
from service.hotpath.context import Services
from service.selling import passes, queuetickets, waitingroom
from tests.apiserver import ApiServer
from tests.servers import RedisServer

WRK_DIR = Path(__file__).resolve().parent / "wrk"
ADMIN_TOKEN = secrets.token_urlsafe(24)
BATCH = 1000
SAMPLE = 100_000  # tickets wrk polls, round and round


async def _calls(svc: Services) -> tuple[int, int]:
    """Commands Redis ran (the scripts' own included), and script calls among them."""
    stats: dict[str, Any] = await svc.redis.info("commandstats")
    every = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
    return every, int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def _memory(svc: Services) -> int:
    info: dict[str, Any] = await svc.redis.info("memory")
    return int(info["used_memory"])


async def _load(svc: Services, event_id: str, buyers: int) -> list[str]:
    """Join `buyers` to the pre-queue; a random sample of their tickets."""
    secret = passes.secret_of(svc.settings)
    rng = random.Random(buyers)
    keep = set(rng.sample(range(buyers), min(SAMPLE, buyers)))
    tickets = []
    for start in range(0, buyers, BATCH):
        ids = range(start, min(buyers, start + BATCH))
        batch = [(f"b{i:07d}", secrets.randbits(52)) for i in ids]
        joined = await waitingroom.join_many(svc, event_id, batch, None)
        for i, ((customer, _), (kind, number, _)) in enumerate(
            zip(batch, joined.places, strict=True), start
        ):
            if i in keep:
                pre = kind == "p"
                t = queuetickets.Ticket(joined.room.g, "p" if pre else "a", int(number), customer)
                tickets.append(queuetickets.issue(secret, event_id, t))
    return tickets


def _wrk(args: argparse.Namespace, url: str, event_id: str, path: str) -> dict[str, float]:
    argv = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.seconds}s",
        "--latency",
        "-s",
        str(WRK_DIR / "poll.lua"),
        f"{url}/events/{event_id}/queue",
        "--",
        path,
        str(args.threads),
    ]
    wait = args.seconds + 120
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=wait)  # noqa: S603
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            data: dict[str, float] = json.loads(line.removeprefix("BENCH_RESULT "))
            return data
    raise RuntimeError(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")


async def run(args: argparse.Namespace, settings: Settings, env: dict[str, str]) -> dict[str, Any]:
    svc = Services.open(settings)
    await svc.scripts.load()
    api = ApiServer(env, workers=args.workers)
    api.start()
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=60, headers=admin) as client:
            event_id = f"bench-room-{secrets.token_hex(4)}"
            body = {
                "id": event_id,
                "name": "bench_room",
                "starts_at": "2030-01-01T00:00:00Z",
                "on_sale_at": "2029-01-01T00:00:00Z",
                "categories": [
                    {"name": "GA", "price": 2500, "currency": "EUR", "capacity": 10_000_000}
                ],
                "waiting_room": {"admit_per_minute": args.rate, "pass_ttl_seconds": 600},
            }
            r = await client.post("/admin/events", json=body)
            r.raise_for_status()
            before = await _memory(svc)
            started = time.monotonic()
            tickets = await _load(svc, event_id, args.buyers)
            loaded_s = time.monotonic() - started
            per_buyer = (await _memory(svc) - before) / args.buyers
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
                f.write("\n".join(tickets) + "\n")
                path = f.name
            r = await client.patch(f"/admin/events/{event_id}", json={"on_sale_at": None})
            r.raise_for_status()
            # The first look after the on-sale moment opens the room (and admission counts
            # from it): the admin's figures, now, rather than wrk's first poll.
            asked = time.monotonic()
            (await client.get(f"/admin/events/{event_id}/queue")).raise_for_status()
            opened = (asked + time.monotonic()) / 2
            calls = await _calls(svc)
            data = await asyncio.to_thread(_wrk, args, api.url, event_id, path)
            after = await _calls(svc)
            commands, scripts = after[0] - calls[0], after[1] - calls[1]
            os.unlink(path)
            await asyncio.sleep(max(0.0, opened + args.admission_seconds - time.monotonic()))
            r = await client.get(f"/admin/events/{event_id}/queue")
            elapsed = time.monotonic() - opened
            admitted = r.json()["admitted"]
    finally:
        api.stop()
        await svc.close()
    seconds = data["duration_us"] / 1e6
    expected = args.rate / 60 * elapsed
    errors = {k: v for k, v in data.items() if k.startswith("errors_") and v}
    return {
        "buyers": args.buyers,
        "load_seconds": round(loaded_s, 1),
        "redis_bytes_per_buyer": round(per_buyer, 1),
        "polls": int(data["requests"]),
        "polls_per_second": round(data["requests"] / seconds, 1),
        "poll_p50_ms": round(data["p50_us"] / 1000, 2),
        "poll_p99_ms": round(data["p99_us"] / 1000, 2),
        "poll_errors": errors,
        "redis_commands": commands,
        "redis_commands_per_poll": round(commands / max(1, data["requests"]), 6),
        "redis_script_calls": scripts,
        "redis_script_calls_per_poll": round(scripts / max(1, data["requests"]), 6),
        "admitted": admitted,
        "admitted_expected": round(expected, 1),
        "admitted_off_percent": round(100 * (admitted - expected) / expected, 2),
        "admitted_after_seconds": round(elapsed, 1),
        "implied_polls_per_second": round(waitingroom.implied_poll_rate(args.buyers, args.rate)),
        "polls_per_second_at_5s": args.buyers / 5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--buyers", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=30, help="wrk's run")
    parser.add_argument("--rate", type=int, default=10_000, help="admit_per_minute")
    parser.add_argument("--admission-seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2, help="API processes")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    args = parser.parse_args()
    base = Settings.from_env()
    database_url = ready_bench_database(base)
    with RedisServer() as redis:
        env = {
            "BOXOFFICE_REDIS_URL": redis.url,
            "BOXOFFICE_DATABASE_URL": database_url,
            "BOXOFFICE_ADMIN_TOKEN": ADMIN_TOKEN,
            "BOXOFFICE_PASS_SECRET": secrets.token_urlsafe(32),
            # wrk polls from one address: no per-address limit.
            "BOXOFFICE_RATE_LIMIT_ADDRESS": "0",
        }
        settings = Settings.from_env({**os.environ, **env})
        result = uvloop.run(run(args, settings, env))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
