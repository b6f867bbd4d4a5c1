"""One run of `make bench`: its settings and the service's databases, the measured run of a
row (warm-up, a quiet machine, CPU, checks) and its retries, the servers and events it
starts, and the clean-up. The rows themselves: bench_ceilings, bench_service, bench_pools,
bench_cluster."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from sqlalchemy.engine import make_url

from loadtest.bench_meter import Meter, busy_sample
from loadtest.bench_rows import (
    BOXOFFICE,
    CAPACITY,
    HOLD_TTL_SECONDS,
    LOCAL_HOSTS,
    OTHER_PCT,
    QUIET_PCT,
    SERVICE_DB,
    Config,
    Result,
    Stat,
)
from loadtest.bench_tools import BenchError, Server, key_names, run_wrk, say, wrk_result
from service.core.keys import EVENTS, event_keys
from service.core.settings import Settings


class Bench:
    def __init__(self, cfg: Config, wrk: str, logs: Path) -> None:
        self.cfg = cfg
        self.wrk = wrk
        self.logs = logs
        self.results: dict[str, Result] = {}
        self.info: dict[str, Any] = {}
        base = Settings.from_env()
        for what, url in (("Redis", base.redis_url), ("PostgreSQL", base.database_url)):
            if (urlsplit(url).hostname or "127.0.0.1") not in LOCAL_HOSTS:
                raise BenchError(
                    f"{what} at {url} is not on this machine: the bench loads 127.0.0.1 only"
                )
        db = make_url(base.database_url)
        if not db.database:
            raise BenchError("no database name in BOXOFFICE_DATABASE_URL")
        self.db_name = f"{db.database}_bench"
        self.settings = Settings.from_env(
            {
                **os.environ,
                "BOXOFFICE_REDIS_URL": base.redis_url.rsplit("/", 1)[0] + f"/{SERVICE_DB}",
                "BOXOFFICE_DATABASE_URL": db.set(database=self.db_name).render_as_string(False),
            }
        )
        self.redis_url = self.settings.redis_url
        self.pg_dsn = (
            make_url(self.settings.database_url)
            .set(drivername="postgresql")
            .render_as_string(False)
        )
        self.r = redis.Redis.from_url(self.redis_url)
        self.event_ids: list[tuple[redis.Redis, str]] = []  # to delete at the end
        self.script_event: str | None = None
        self.room_event = ""
        self.tmp = Path(tempfile.mkdtemp(prefix="boxoffice-bench-pools-"))
        # granian's interface of the service served now (--interface).
        self.interface = cfg.interfaces[-1]

    def wanted(self, *names: str) -> bool:
        return any(n in self.cfg.only for n in names)

    def quiet(self) -> float:
        """Wait (up to --wait-idle s) for the machine to be at most QUIET_PCT busy; the
        last sample, % of all cores."""
        busy = busy_sample()
        if busy > QUIET_PCT and self.cfg.wait_idle:
            say(f"  machine {busy}% busy: waiting up to {self.cfg.wait_idle} s for it to quiet")
            deadline = time.monotonic() + self.cfg.wait_idle
            while busy > QUIET_PCT and time.monotonic() < deadline:
                busy = busy_sample()
        return busy

    def note_interference(self, result: Result, before: float) -> None:
        """Note a run that other work on the machine may have slowed down."""
        result.extra["machine_busy_before_pct"] = before
        if before > QUIET_PCT:
            result.disturbed = True
            result.notes.append(f"machine {before}% busy just before the run")
        other = result.cpu["other"]
        if other > OTHER_PCT and result.target != "pg":  # the baseline's is PostgreSQL
            result.disturbed = True
            result.notes.append(f"other work took {other:.0f}% of a core during the run")

    def best_of(self, name: str, once: Callable[[bool], Result]) -> Result:
        """`once(first)` measures; a run that other work on the machine disturbed is
        measured again (--retries times at most) and the least disturbed run is kept."""
        tries = [once(True)]
        while tries[-1].disturbed and len(tries) <= self.cfg.retries:
            say(f"  {name}: other work on the machine during the run: measuring again")
            tries.append(once(False))
        return self.keep(name, tries)

    def keep(self, name: str, runs: list[Result]) -> Result:
        """The least disturbed of a row's runs becomes the row (the others noted in it)."""
        best = min(runs, key=lambda r: (not r.valid, r.disturbed, r.cpu["other"]))
        if len(runs) > 1:
            best.extra["attempts"] = [
                {"rps": r.rps, "p99_ms": r.p99_ms, "other_cpu": r.cpu["other"]} for r in runs
            ]
            say(f"  {name}: kept the run of {best.rps:,.0f} requests/s (least disturbed)")
        self.results[name] = best
        return best

    # -- the measured run of one HTTP target, after a warm-up

    def measure(
        self,
        name: str,
        server: Server,
        script: str,
        path: str,
        args: Sequence[str] = (),
        warm_args: Sequence[str] | None = None,
        warmup: bool = True,
        stat: Stat | None = None,
        refused: str | None = None,
        nodes: Sequence[redis.Redis] = (),
        not_found: bool = False,
        tally: Callable[[], dict[str, int]] | None = None,
    ) -> Result:
        """Warm-up, then the measured run; `stat` checked. `refused`: an event every
        request is refused for (sold_out): no hold may be created, and the script calls
        Redis served during the run are counted. `nodes`: the Redis servers whose CPU is
        the row's (default: the service's). `not_found`: every answer must be a 404.
        `tally`: counts read just before and just after the measured run; what they grew
        by goes into the row's extra figures."""
        cfg = self.cfg
        url = server.url + path
        if warmup and cfg.warmup:
            say(f"  {name}: warm-up {cfg.warmup} s")
            warm = run_wrk(
                cfg, self.wrk, script, url, cfg.warmup, args if warm_args is None else warm_args
            )
            if warm["errors_status"]:
                say(f"  {name}: warning: {warm['errors_status']:.0f} non-2xx responses in warm-up")
        before = self.quiet()
        say(f"  {name}: measuring {cfg.seconds} s (machine {before}% busy before)")
        count = stat.read() if stat else 0
        created, calls = self.refusal_counts(refused)
        counts = tally() if tally else {}
        with Meter(nodes or self.r, server.pid) as meter:
            try:
                data = run_wrk(cfg, self.wrk, script, url, cfg.seconds, args)
            finally:
                server.check_alive()
        # Read as wrk ends: every response it counted was sent after the script ran.
        count = stat.read() - count if stat else 0
        counts = {k: v - counts[k] for k, v in tally().items()} if tally else {}
        if refused is not None:
            # Every answer non-2xx by design: checked here instead of counted as errors.
            statuses = data.pop("errors_status", 0)
            created, calls = (
                a - b for a, b in zip(self.refusal_counts(refused), (created, calls), strict=True)
            )
        if not_found:
            statuses = data.pop("errors_status", 0)
        result = wrk_result(name, data, meter.cpu)
        result.extra.update(counts)
        if not_found and statuses < result.requests:
            result.valid = False
            result.notes.append(f"{result.requests - statuses:,} answers not 404")
        # CPU per request: steadier than requests/s on a shared machine.
        result.extra["cpu_us_per_request"] = {
            k: round(meter.cpu[k] / 100 / result.rps * 1e6, 1) if result.rps else 0.0
            for k in ("server", "redis")
        }
        result.extra["redis_us_per_request"] = result.extra["cpu_us_per_request"]["redis"]
        if refused is not None:
            result.extra["script_calls"] = calls
            if statuses < result.requests or created:
                result.valid = False
                result.notes.append(
                    f"{result.requests - statuses:,} answers not refused, {created} holds made"
                )
        if stat is not None:
            result.extra[f"holds_{stat.field}"] = count
            if count < result.requests:
                result.valid = False
                result.notes.append(
                    f"{result.requests:,} requests but only {count:,} holds {stat.field}"
                )
        self.note_interference(result, before)
        per = result.extra["cpu_us_per_request"]
        if refused is not None:
            say(f"  {name}: Redis served {calls:,} script calls during the run (all clients')")
        say(
            f"  {name}: {result.rps:,.0f} requests/s, p50 {result.p50_ms} ms, "
            f"p99 {result.p99_ms} ms; CPU per request: server {per['server']} µs,"
            f" Redis {per['redis']} µs"
            f"{'  (' + '; '.join(result.notes) + ')' if result.notes else ''}"
        )
        return result

    def refusal_counts(self, event_id: str | None) -> tuple[int, int]:
        """Holds the event created, and script calls Redis served (every client's: on a
        shared Redis, others' too)."""
        if event_id is None:
            return 0, 0
        info: dict[str, Any] = self.r.info("commandstats")
        calls = sum(int(info.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))
        return Stat(self.r, (event_id,), "created").read(), calls

    def once(
        self, name: str, server: Server, script: str, path: str, not_found: bool = False
    ) -> Callable[[bool], Result]:
        """One measure() of a target whose requests can repeat, for paired()."""
        return lambda first: self.measure(
            name, server, script, path, warmup=first, not_found=not_found
        )

    def simple(
        self, name: str, server: Server, script: str, path: str, stat: Stat | None = None
    ) -> Result:
        """A target whose requests can repeat: one measure() per try, warm-up first."""
        return self.best_of(
            name, lambda first: self.measure(name, server, script, path, warmup=first, stat=stat)
        )

    def migrate(self) -> None:
        say(f"PostgreSQL database {self.db_name}: boxoffice migrate")
        out = subprocess.run(  # noqa: S603
            [BOXOFFICE, "migrate"],
            env=self.service_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode:
            raise BenchError(f"boxoffice migrate failed:\n{out.stderr[-3000:]}")

    def service_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BOXOFFICE_REDIS_URL": self.settings.redis_url,
            "BOXOFFICE_DATABASE_URL": self.settings.database_url,
        }

    def create_event(
        self,
        client: httpx.Client,
        prefix: str,
        capacity: int = CAPACITY,
        event_id: str | None = None,
        track: bool = True,
        **extra: Any,
    ) -> str:
        """An event through the admin API; with `track`, its keys in the service's Redis
        are deleted at the end (a cluster of the run's own goes as a whole)."""
        event_id = event_id or f"{prefix}-{secrets.token_hex(4)}"
        body = {
            "id": event_id,
            "name": "make bench",
            "starts_at": "2030-01-01T00:00:00Z",
            "hold_ttl_seconds": HOLD_TTL_SECONDS,
            "max_per_order": 10,
            "categories": [{"name": "GA", "price": 2500, "currency": "EUR", "capacity": capacity}],
            **extra,
        }
        response = client.post("/admin/events", json=body)
        if response.status_code != 201:
            raise BenchError(f"creating event {event_id}: {response.status_code} {response.text}")
        if track:
            self.event_ids.append((self.r, event_id))
        return event_id

    def serve_env(self, admin_token: str) -> dict[str, str]:
        return {
            **self.service_env(),
            "BOXOFFICE_HOST": "127.0.0.1",
            "BOXOFFICE_PORT": "{port}",
            "BOXOFFICE_WORKERS": str(self.cfg.workers),
            "BOXOFFICE_ADMIN_TOKEN": admin_token,
            "BOXOFFICE_INTERFACE": self.interface,
            # The hold rows measure the hold path, not the limit of a human's attempts: one
            # customer ("bench", or 1,000 with tokens) makes thousands of holds a second.
            "BOXOFFICE_RATE_LIMIT_CUSTOMER_HOLDS": "0",
            # wrk is one address sending for every buyer, as a trusted backend in front is.
            "BOXOFFICE_RATE_LIMIT_ADDRESS": "0",
        }

    @contextmanager
    def served(self, name: str, **env: str) -> Iterator[tuple[Server, httpx.Client]]:
        """`boxoffice serve` with the bench's options (and `env`), and an admin client of
        it; the server's error lines counted at the end, and the server stopped."""
        token = secrets.token_urlsafe(24)
        server = Server(name, [BOXOFFICE, "serve"], {**self.serve_env(token), **env}, self.logs)
        try:
            server.start(lambda c: c.get("/health").status_code == 200)
            headers = {"authorization": f"Bearer {token}"}
            with httpx.Client(base_url=server.url, headers=headers, timeout=30) as admin:
                yield server, admin
            self.log_errors(server)
        finally:
            server.stop()

    def log_errors(self, server: Server) -> None:
        errors = [
            line
            for line in server.log_tail(100_000).splitlines()
            if "ERROR" in line or "Traceback" in line
        ]
        self.info[f"{server.name}_log_errors"] = len(errors)
        if errors:
            say(f"  {server.name} log: {len(errors)} error lines, e.g. {errors[0][:200]}")

    def paired(self, rows: dict[str, Callable[[bool], Result]]) -> None:
        """Rows to be compared, measured in alternation, round after round (as best_of(),
        again while one of them was disturbed, --retries rounds at most): a busy moment of
        a shared machine then does not land on one side only. Each keeps its least
        disturbed run."""
        tries: dict[str, list[Result]] = {name: [] for name in rows}
        while True:
            for name, once in rows.items():
                tries[name].append(once(not tries[name]))
            rounds = len(tries[next(iter(rows))])
            if not any(t[-1].disturbed for t in tries.values()) or rounds > self.cfg.retries:
                break
            say(f"  {' and '.join(rows)}: other work on the machine: measuring them again")
        for name, runs in tries.items():
            self.keep(name, runs)

    @contextmanager
    def serving(self, name: str, redis_url: str, event_ids: Sequence[str]) -> Iterator[Server]:
        """`boxoffice serve` on `redis_url` (a Redis of the run's own: the events are not
        deleted one by one), with these events created; stopped at the end."""
        with self.served(name, BOXOFFICE_REDIS_URL=redis_url) as (server, admin):
            for event_id in event_ids:
                self.create_event(admin, "", event_id=event_id, track=False)
            yield server

    def cleanup(self) -> None:
        """Delete the keys of this run's events (and their holds' TTL keys)."""
        for r, event_id in self.event_ids:
            keys = event_keys(event_id)
            pipe = r.pipeline(transaction=False)
            pipe.unlink(*key_names(event_id), keys.deadletter, *keys.queue)
            pipe.srem(EVENTS, event_id)
            pipe.execute()
            batch: list[bytes] = []
            for key in r.scan_iter(match=f"{keys.tag}:*", count=10_000):
                batch.append(key)
                if len(batch) >= 10_000:
                    r.unlink(*batch)
                    batch = []
            if batch:
                r.unlink(*batch)
        shutil.rmtree(self.tmp, ignore_errors=True)
