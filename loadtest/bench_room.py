"""The waiting room at scale, the room row of `make bench`: a room of `--room-buyers`
pre-queued buyers (100,000 by default; a million is the scale it is built for), opened,
then polled over HTTP by wrk while admission runs.

    .venv/bin/python -m loadtest.bench --only twin,room --room-buyers 1000000

The buyers join through the join script in batches of 1,000 (waitingroom.join_many, as an
API process sends the joins of one loop turn), on a Redis server of the run's own;
`boxoffice serve` answers the polls of a sample of their tickets. The row's figures, with
their goals (bench_rows.GOALS):
- Redis commands per poll (INFO commandstats over the measured run, every command counted,
  the scripts' own and the steps' INFO included, less the bench's own INFO calls; listed
  by name), and script calls per poll (the room's steps, about one per 0.75 s; each API
  process reads the room's stored snapshot with one HMGET at most 4 times a second, so
  these fall as the poll rate grows): goal at most 0.001;
- Redis memory per queued buyer (used_memory grown by the joins, over the buyers): goal
  at most 150 bytes;
- admitted `ADMISSION_SECONDS` after the opening against the rate: goal within 2%;
- the polls' p99 against the twin's: goal at most twice as long;
- the poll rate the room asks for (poll_after_seconds over the queue, waitingroom.
  implied_poll_rate) against a poll every 5 s.
"""

from __future__ import annotations

import random
import secrets
import shutil
import time
from typing import Any

import httpx
import redis
import uvloop

from loadtest.bench_session import Bench
from loadtest.bench_tools import BenchError, own_redis, say
from service.core.settings import Settings
from service.hotpath.context import Services
from service.selling import passes, queuetickets, waitingroom

RATE = 10_000  # admissions a minute
ADMISSION_SECONDS = 60.0  # the admitted are counted this long after the opening
BATCH = 1000  # joins per script call
SAMPLE = 100_000  # tickets wrk polls, round and round
# Enough buyers that the queue outlasts the counted admissions twice over.
MIN_BUYERS = round(2 * RATE * ADMISSION_SECONDS / 60)


# INFO calls of the bench's own between two readings of commands(): the first reading's
# INFO commandstats (a command is counted once it has run, so the second reading shows
# the first, not itself) and the CPU meter's INFO cpu at the start and the end of the run
# (bench_meter.Meter). The room's steps call INFO too (lua/lib.lua, check_server): those
# are counted.
OWN_INFO_CALLS = 3


def commands(r: redis.Redis) -> dict[str, int]:
    """Commands Redis ran, every one (the scripts' own included: INFO commandstats counts
    a command a script runs as that command), and script calls among them. The bench's
    own INFO calls are taken off where the run's growth is worked out (OWN_INFO_CALLS)."""
    stats: dict[str, Any] = r.info("commandstats")
    counts = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    return {
        "redis_commands": sum(counts.values()),
        "redis_script_calls": counts.get("evalsha", 0),
        **{f"redis_calls_{name}": n for name, n in counts.items()},
    }


def used_memory(r: redis.Redis) -> int:
    info: dict[str, Any] = r.info("memory")
    return int(info["used_memory"])


async def load(settings: Settings, event_id: str, buyers: int) -> list[str]:
    """Join `buyers` to the room's pre-queue; the tickets of a random sample of them."""
    svc = Services.open(settings)
    try:
        await svc.scripts.load()
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
                    t = queuetickets.Ticket(
                        joined.room.g, "p" if pre else "a", int(number), customer
                    )
                    tickets.append(queuetickets.issue(secret, event_id, t))
        return tickets
    finally:
        await svc.close()


def admin_call(admin: httpx.Client, method: str, path: str, **kw: Any) -> Any:
    response = admin.request(method, path, **kw)
    if response.status_code != 200:
        raise BenchError(f"{method} {path}: {response.status_code} {response.text[:300]}")
    return response.json()


def open_room(admin: httpx.Client, event_id: str) -> float:
    """Put the event on sale; when the room opened (time.monotonic()). The first look after
    the on-sale moment opens it (and admission counts from it): the admin's, now, rather
    than wrk's first poll."""
    admin_call(admin, "PATCH", f"/admin/events/{event_id}", json={"on_sale_at": None})
    asked = time.monotonic()
    admin_call(admin, "GET", f"/admin/events/{event_id}/queue")
    return (asked + time.monotonic()) / 2


def room(bench: Bench) -> None:
    server_bin = shutil.which("redis-server")
    if server_bin is None:
        say("room row skipped: redis-server not found (Debian: redis-server)")
        return
    buyers = bench.cfg.room_buyers
    with own_redis(server_bin, bench.logs) as (port, r):
        say(
            f"waiting room of {buyers:,} queued buyers, admitting {RATE:,} a minute (service on"
            f" a Redis node of its own, port {port})"
        )
        # The bench signs the buyers' tickets as the service would: the same pass secret.
        env = {"BOXOFFICE_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        env["BOXOFFICE_PASS_SECRET"] = secrets.token_urlsafe(32)
        with bench.served("room", **env) as (server, admin):
            event_id = bench.create_event(
                admin,
                "bench-room",
                track=False,  # the Redis goes as a whole
                on_sale_at="2029-01-01T00:00:00Z",
                waiting_room={"admit_per_minute": RATE, "pass_ttl_seconds": 600},
            )
            settings = Settings.from_env({**bench.service_env(), **env})
            used, started = used_memory(r), time.monotonic()
            tickets = uvloop.run(load(settings, event_id, buyers))
            loaded = time.monotonic() - started
            per_buyer = (used_memory(r) - used) / buyers
            say(f"  room: {buyers:,} joined in {loaded:.1f} s, {per_buyer:.0f} bytes of Redis each")
            path = bench.tmp / "room-tickets.txt"
            path.write_text("\n".join(tickets) + "\n")
            opened = open_room(admin, event_id)
            queue = f"/events/{event_id}/queue"
            args = [str(path), str(bench.cfg.threads)]
            result = bench.measure(
                "room", server, "poll.lua", queue, args=args, nodes=[r], tally=lambda: commands(r)
            )
            time.sleep(max(0.0, opened + ADMISSION_SECONDS - time.monotonic()))
            admitted = int(admin_call(admin, "GET", f"/admin/events/{event_id}/queue")["admitted"])
            elapsed = time.monotonic() - opened
    polls = max(1, result.requests)
    expected = RATE / 60 * elapsed
    counted = result.extra
    counted["redis_commands"] -= OWN_INFO_CALLS
    counted["redis_calls_info"] = counted.get("redis_calls_info", 0) - OWN_INFO_CALLS
    calls = [k for k in counted if k.startswith("redis_calls_")]
    by_name = {k.removeprefix("redis_calls_"): counted.pop(k) for k in calls}
    by_name = {k: n for k, n in by_name.items() if n > 0}
    result.extra.update(
        buyers=buyers,
        load_seconds=round(loaded, 1),
        redis_bytes_per_buyer=round(per_buyer, 1),
        redis_commands_per_poll=round(result.extra["redis_commands"] / polls, 6),
        redis_script_calls_per_poll=round(result.extra["redis_script_calls"] / polls, 6),
        redis_commands_by_name=dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
        admit_per_minute=RATE,
        admitted=admitted,
        admitted_expected=round(expected, 1),
        admitted_after_seconds=round(elapsed, 1),
        implied_polls_per_second=round(waitingroom.implied_poll_rate(buyers, RATE)),
        polls_per_second_at_5s=round(buyers / 5),
    )
    say(
        f"  room: {result.extra['redis_commands']:,} Redis commands in {result.requests:,} polls"
        f" ({result.extra['redis_commands_per_poll']} a poll; {by_name});"
        f" {admitted:,} admitted {elapsed:.0f} s after the opening ({expected:,.0f} expected)"
    )
    bench.keep("room", [result])
