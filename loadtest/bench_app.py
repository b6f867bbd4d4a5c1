"""CPU per request of the application alone: the service's routes beside the twin's, with
no HTTP server, driven in one process.

    .venv/bin/python -m loadtest.bench_app [--requests 20000] [--rounds 5]
        [--concurrency 16] [--profile TARGET]

`make bench` measures whole requests, and on this shared 2-core machine its rows move by
a fifth from one run to the next. Here the ASGI apps are called directly, as granian
would call them (a scope, a `receive` giving the body as granian does, a `send`), by
`--concurrency` callers at once on uvloop; the figure is this process's CPU time per
request (user + system), so what the server, wrk and the kernel cost is left out and what
remains is the app: Litestar, the service's own code, and the script call's client side
(Redis runs in its own process). Rounds alternate the targets so that a busy moment does
not land on one only; the best round of each is reported, with the others beside it.

Targets: twin (loadtest/twin.py), sold_out (a hold refused by the sold-out shortcut),
hold (a hold made: one script call), read (a hold read), join, poll (the waiting room);
each served by the lean lane (service/web/lane.py) on ASGI, again with a `:rsgi` suffix
through the RSGI app (service/web/rsgi.py: the lane straight from the protocol, which is
given as granian gives it, the body whole), and with a `:ls` suffix by an app without the
lane (every route through Litestar), side by side in the same rounds. The service runs on
a Redis server of the run's own (tests/servers.py) and the bench's PostgreSQL database
(`<name>_bench`, as `make bench`). `--profile TARGET` prints cProfile's top functions for
one more round of that target; `--cycles` counts, instead of the CPU, the objects each
target leaves in reference cycles for the garbage collector.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import uvloop
from litestar import Litestar

from loadtest import twin
from loadtest.bench_worker import ready_bench_database
from service.core.settings import Settings
from service.web.app import App, create_app
from service.web.rsgi import RSGIApp
from tests.servers import RedisServer

HOLD = b'{"customer_id":"bench","items":[{"category":"GA","quantity":1}]}'
JOIN = b'{"customer_id":"bench"}'
ADMIN_TOKEN = secrets.token_urlsafe(24)
LANE_TARGETS = ("sold_out", "hold", "read", "join", "poll")
TARGETS = (
    "twin",
    *LANE_TARGETS,
    *(f"{t}:rsgi" for t in LANE_TARGETS),
    *(f"{t}:ls" for t in LANE_TARGETS),
)

Call = Callable[[], Awaitable[None]]


def _scope(method: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Any:
    head = [(b"host", b"127.0.0.1"), (b"content-length", b"%d" % len(body)), *headers]
    if body:
        head.append((b"content-type", b"application/json"))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": head,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def request(
    app: Any, method: str, path: str, body: bytes = b"", headers: tuple[Any, ...] = ()
) -> tuple[int, bytes]:
    """One request through the ASGI app: its status and body."""
    # As granian gives a body: in a message with more_body, then an empty last one.
    given = [
        {"type": "http.request", "body": body, "more_body": True},
        {"type": "http.request", "body": b"", "more_body": False},
    ]

    async def receive() -> Any:
        if given:
            return given.pop(0)
        await asyncio.Event().wait()  # the client stays: no disconnect

    answer: dict[str, Any] = {"body": b""}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await app(_scope(method, path, body, list(headers)), receive, send)
    return answer["status"], answer["body"]


class _Headers(dict[str, str]):
    """A request's headers as granian's RSGI side gives them (one value a name here)."""


class _Scope:
    """An RSGI request's scope (granian.rsgi.Scope), for service/web/rsgi.py."""

    proto = "http"
    http_version = "1.1"
    scheme = "http"
    server = "127.0.0.1:8000"
    client = "127.0.0.1:50000"
    authority = None
    query_string = ""

    def __init__(self, method: str, path: str, body: bytes, headers: tuple[Any, ...]) -> None:
        self.method = method
        self.path = path
        given = [(b"host", b"127.0.0.1"), (b"content-length", b"%d" % len(body)), *headers]
        if body:
            given.append((b"content-type", b"application/json"))
        self.headers = _Headers((k.decode(), v.decode()) for k, v in given)


class _Protocol:
    """An RSGI request's protocol: the body awaited whole, the answer in one call."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.status = 0
        self.answer = b""

    async def __call__(self) -> bytes:
        return self.body

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.answer = status, body


async def rsgi_request(
    app: RSGIApp, method: str, path: str, body: bytes = b"", headers: tuple[Any, ...] = ()
) -> tuple[int, bytes]:
    """One request through the RSGI app (the lane served straight from the protocol)."""
    protocol = _Protocol(body)
    await app.__rsgi__(_Scope(method, path, body, headers), protocol)  # type: ignore[arg-type]
    return protocol.status, protocol.answer


@asynccontextmanager
async def running(app: Litestar) -> AsyncIterator[None]:
    """The app's start-up (its lifespan) before, its shut-down after."""
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    outbox: asyncio.Queue[Any] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.get_running_loop().create_task(app(scope, inbox.get, outbox.put))  # type: ignore[arg-type]
    await inbox.put({"type": "lifespan.startup"})
    message = await outbox.get()
    if message["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the service did not start: {message}")
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


async def _expect(app: Any, status: int, method: str, path: str, body: bytes = b"") -> bytes:
    admin = ((b"authorization", f"Bearer {ADMIN_TOKEN}".encode()),)
    got, answer = await request(app, method, path, body, admin)
    if got != status:
        raise RuntimeError(f"{method} {path}: {got} {answer[:300]!r}")
    return answer


async def _event(app: Any, capacity: int, **extra: Any) -> str:
    event_id = f"bench-app-{secrets.token_hex(4)}"
    body = {
        "id": event_id,
        "name": "bench_app",
        "starts_at": "2030-01-01T00:00:00Z",
        "hold_ttl_seconds": 600,
        "max_per_order": 10,
        "categories": [{"name": "GA", "price": 2500, "currency": "EUR", "capacity": capacity}],
        **extra,
    }
    await _expect(app, 201, "POST", "/admin/events", json.dumps(body).encode())
    return event_id


async def targets(app: Litestar, suffix: str = "", rsgi: RSGIApp | None = None) -> dict[str, Call]:
    """Each target's request, ready to repeat; the events it needs made first. With
    `rsgi`, each request goes through it (the app itself still makes the events)."""
    gone = await _event(app, 1)
    await _expect(app, 201, "POST", f"/events/{gone}/holds", HOLD)  # now sold out
    hot = await _event(app, 10_000_000)
    room = await _event(app, 10, waiting_room={"admit_per_minute": 1, "pass_ttl_seconds": 600})
    ticket = json.loads(await _expect(app, 201, "POST", f"/events/{room}/queue", JOIN))["ticket"]
    held = json.loads(await _expect(app, 201, "POST", f"/events/{hot}/holds", HOLD))["hold_id"]

    def repeat(target: Any, status: int, method: str, path: str, body: bytes = b"") -> Call:
        async def once() -> None:
            if rsgi is None:
                got, answer = await request(target, method, path, body)
            else:
                got, answer = await rsgi_request(rsgi, method, path, body)
            if got != status:
                raise RuntimeError(f"{method} {path}: {got} {answer[:300]!r}")

        return once

    return {
        f"sold_out{suffix}": repeat(app, 409, "POST", f"/events/{gone}/holds", HOLD),
        f"hold{suffix}": repeat(app, 201, "POST", f"/events/{hot}/holds", HOLD),
        f"read{suffix}": repeat(app, 200, "GET", f"/events/{hot}/holds/{held}"),
        f"join{suffix}": repeat(app, 201, "POST", f"/events/{room}/queue", JOIN),  # same ticket
        f"poll{suffix}": repeat(app, 200, "GET", f"/events/{room}/queue/{ticket}"),
    }


async def cpu_per_request(once: Call, requests: int, concurrency: int) -> float:
    """µs of this process's CPU per request, `concurrency` callers at a time."""

    async def caller(n: int) -> None:
        for _ in range(n):
            await once()

    share = max(1, requests // concurrency)
    started_at = time.process_time()
    await asyncio.gather(*(caller(share) for _ in range(concurrency)))
    return (time.process_time() - started_at) / (share * concurrency) * 1e6


async def run(args: argparse.Namespace, settings: Settings) -> None:
    lean, plain = create_app(settings), create_app(settings, lean=False)
    async with running(lean), running(plain):
        on_rsgi = RSGIApp(cast(App, lean), settings)
        calls = {
            "twin": await _twin(),
            **await targets(lean),
            **await targets(lean, ":rsgi", on_rsgi),
            **await targets(plain, ":ls"),
        }
        await measure(args, calls)


async def _twin() -> Call:
    async def once() -> None:
        got, answer = await request(twin.app, "POST", "/events/bench-twin/holds", HOLD)
        if got != 201:
            raise RuntimeError(f"twin: {got} {answer[:300]!r}")

    return once


async def measure(args: argparse.Namespace, calls: dict[str, Call]) -> None:
    for once in calls.values():  # warm-up: caches, first connections
        await cpu_per_request(once, 2000, args.concurrency)
    if args.cycles:
        await cycles(calls)
        return
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, once in calls.items():
            rounds[name].append(await cpu_per_request(once, args.requests, args.concurrency))
    twin_best = min(rounds["twin"])
    print(f"CPU per request, µs (best of {args.rounds} rounds of {args.requests}; all rounds):")
    for name, figures in rounds.items():
        best = min(figures)
        print(
            f"  {name:12} {best:6.1f}  x{best / twin_best:4.2f} of the twin   "
            + " ".join(f"{f:.1f}" for f in figures)
        )
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        await cpu_per_request(calls[args.profile], args.requests, args.concurrency)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


async def cycles(calls: dict[str, Call], requests: int = 500) -> None:
    """Objects each target leaves in reference cycles (the collector's work, which a
    profile shows wherever an allocation happens to trigger it, not where it is made)."""
    print(f"Objects found unreachable by the collector, per request ({requests} requests):")
    for name, once in calls.items():
        gc.collect()
        gc.disable()
        try:
            for _ in range(requests):
                await once()
            found = gc.collect()
        finally:
            gc.enable()
        print(f"  {name:12} {found / requests:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--profile", choices=TARGETS)
    parser.add_argument(
        "--cycles", action="store_true", help="count the objects each target leaves in cycles"
    )
    args = parser.parse_args()
    base = Settings.from_env()
    database_url = ready_bench_database(base)
    with RedisServer() as redis:
        settings = Settings.from_env(
            {
                **os.environ,
                "BOXOFFICE_REDIS_URL": redis.url,
                "BOXOFFICE_DATABASE_URL": database_url,
                "BOXOFFICE_ADMIN_TOKEN": ADMIN_TOKEN,
                # As `make bench`: one customer makes every hold, from one address.
                "BOXOFFICE_RATE_LIMIT_CUSTOMER_HOLDS": "0",
                "BOXOFFICE_RATE_LIMIT_ADDRESS": "0",
            }
        )
        uvloop.run(run(args, settings))


if __name__ == "__main__":
    main()
