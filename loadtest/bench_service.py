"""The service's rows of `make bench` on its own Redis database: health, hold, sold_out,
event and unknown ids, confirm and release (bench_pools), join and poll; and the hold
again with customer tokens on."""

from __future__ import annotations

import secrets
import time

import httpx
import jwt

from loadtest.bench_pools import pooled
from loadtest.bench_rows import (
    CUSTOMERS_WITH_TOKENS,
    HOLD_BODY,
    POLL_POOL,
    ROOM,
    SERVICE_DB,
    SERVICE_TARGETS,
    Result,
    Stat,
)
from loadtest.bench_session import Bench
from loadtest.bench_tools import BenchError, Server, say
from service.core.keys import event_keys


def on_interfaces(bench: Bench) -> None:
    """service() on each of --interface's interfaces in turn: the last one's rows keep
    their names (the table's, the goals'), the others' are named "hold@asgi" and so on."""
    *others, last = bench.cfg.interfaces
    for interface in others:
        bench.interface = interface
        service(bench)
        for name in SERVICE_TARGETS:
            if name in bench.results:
                bench.results[f"{name}@{interface}"] = bench.results.pop(name)
    bench.interface = last
    service(bench)


def service(bench: Bench) -> None:
    say(
        f"service (boxoffice serve on {bench.interface.upper()}; Redis db {SERVICE_DB},"
        f" PostgreSQL {bench.db_name}; no worker)"
    )
    with bench.served("service") as (server, admin):
        hot = bench.create_event(admin, "bench-hot")
        if bench.wanted("script", "script_batch"):
            bench.script_event = bench.create_event(admin, "bench-script")
        if bench.wanted("join", "poll"):
            bench.room_event = bench.create_event(admin, "bench-room", waiting_room=ROOM)
        if bench.wanted("sold_out"):
            gone = bench.create_event(admin, "bench-gone", capacity=1)
            sale = admin.post(
                f"/events/{gone}/holds",
                content=HOLD_BODY,
                headers={"content-type": "application/json"},
            )
            if sale.status_code != 201:
                raise BenchError(f"selling out {gone}: {sale.status_code} {sale.text}")
        holds = f"/events/{hot}/holds"
        if bench.wanted("health"):
            bench.simple("health", server, "get.lua", "/health")
        if bench.wanted("hold"):
            bench.simple("hold", server, "hold.lua", holds, stat=Stat(bench.r, (hot,), "created"))
        if bench.wanted("sold_out"):
            bench.best_of(
                "sold_out",
                lambda first: bench.measure(
                    "sold_out",
                    server,
                    "hold.lua",
                    f"/events/{gone}/holds",
                    warmup=first,
                    refused=gone,
                ),
            )
        if bench.wanted("unknown"):
            bench.paired(
                {
                    "event": bench.once("event", server, "get.lua", f"/events/{hot}"),
                    "unknown": bench.once("unknown", server, "unknown.lua", "/", not_found=True),
                }
            )
        elif bench.wanted("event"):
            bench.simple("event", server, "get.lua", f"/events/{hot}")
        if bench.wanted("confirm"):
            pooled(bench, "confirm", server, hot)
        if bench.wanted("release"):
            pooled(bench, "release", server, hot)
        if bench.wanted("join", "poll"):
            waiting_room(bench, server)


def service_with_tokens(bench: Bench) -> None:
    """The hold again, on a service with customer tokens on (a server of its own, with
    the same options): what verifying a token costs the hold."""
    secret = secrets.token_hex(32)
    say("service with customer tokens on (BOXOFFICE_CUSTOMER_TOKEN_SECRET set)")
    with bench.served("service-tokens", BOXOFFICE_CUSTOMER_TOKEN_SECRET=secret) as (
        server,
        admin,
    ):
        hot = bench.create_event(admin, "bench-token")
        path = bench.tmp / "customer-tokens.txt"
        exp = int(time.time()) + 6 * 3600  # valid all run long
        path.write_text(
            "".join(
                f"bench-{i} {jwt.encode({'sub': f'bench-{i}', 'exp': exp}, secret, 'HS256')}\n"
                for i in range(CUSTOMERS_WITH_TOKENS)
            )
        )
        args = [str(path), str(bench.cfg.threads)]
        bench.best_of(
            "hold_token",
            lambda first: bench.measure(
                "hold_token",
                server,
                "hold_token.lua",
                f"/events/{hot}/holds",
                args=args,
                warmup=first,
                stat=Stat(bench.r, (hot,), "created"),
            ),
        )


def waiting_room(bench: Bench, server: Server) -> None:
    event_id = bench.room_event
    queue = f"/events/{event_id}/queue"
    order = event_keys(event_id).queue[2]
    if bench.wanted("join"):

        def join(first: bool) -> Result:
            before = int(bench.r.zcard(order))
            result = bench.measure(
                "join",
                server,
                "join.lua",
                queue,
                args=[f"m{secrets.token_hex(4)}"],
                warm_args=[f"w{secrets.token_hex(4)}"],
                warmup=first,
            )
            # Every answer a new ticket (warm-up included when it ran): none was a
            # customer reading the ticket it had.
            made = int(bench.r.zcard(order)) - before
            result.extra["tickets_made"] = made
            if made < result.requests:
                result.valid = False
                result.notes.append(f"{result.requests:,} joins made only {made:,} tickets")
            return result

        bench.best_of("join", join)
    if bench.wanted("poll"):
        path = bench.tmp / "tickets.txt"
        tickets = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i in range(POLL_POOL):
                response = client.post(queue, json={"customer_id": f"poll-{i}"})
                if response.status_code != 201:
                    raise BenchError(f"joining for the poll pool: {response.text[:300]}")
                tickets.append(response.json()["ticket"])
        path.write_text("\n".join(tickets) + "\n")
        threads = str(bench.cfg.threads)
        bench.best_of(
            "poll",
            lambda first: bench.measure(
                "poll", server, "poll.lua", queue, args=[str(path), threads], warmup=first
            ),
        )
