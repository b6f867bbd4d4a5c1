"""The ceilings and the baseline of `make bench`: the twin (bare Litestar, loadtest/twin.py),
bare granian on ASGI and on RSGI (loadtest/bare.py), the hold script alone under
redis-benchmark, and PostgreSQL's guarded UPDATE + INSERT (loadtest/pg_baseline.py)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import time

import redis

from loadtest.bench_meter import Meter
from loadtest.bench_pools import hold_script_call, hold_sha
from loadtest.bench_rows import (
    CAPACITY,
    PIPELINE,
    PYTHON,
    SCRIPT_BATCH,
    TARGETS,
    Result,
    Stat,
)
from loadtest.bench_session import Bench
from loadtest.bench_tools import BenchError, Server, hold_answers, key_names, own_redis, say


def http_ceilings(bench: Bench) -> None:
    """The twin, then bare granian on its ASGI and its RSGI interface, each wanted one."""
    options = ["--port", "{port}", "--workers", str(bench.cfg.workers)]
    if bench.wanted("twin"):
        say("twin (loadtest/twin.py)")
        ceiling(bench, "twin", [PYTHON, "-m", "loadtest.twin", *options])
    for interface in ("asgi", "rsgi"):
        if bench.wanted(name := f"bare_{interface}"):
            say(f"{name}: bare granian, {interface.upper()} (loadtest/bare.py)")
            argv = [PYTHON, "-m", "loadtest.bare", "--interface", interface, *options]
            ceiling(bench, name, argv)


def ceiling(bench: Bench, name: str, argv: list[str]) -> None:
    """A server answering the hold's request without I/O, loaded as the hold row is."""
    server = Server(name, argv, dict(os.environ), bench.logs)
    try:
        server.start(hold_answers("/events/bench-twin/holds"))
        bench.simple(name, server, "hold.lua", "/events/bench-twin/holds")
    finally:
        server.stop()


def script(bench: Bench) -> None:
    say("hold script alone (redis-benchmark, on a Redis server of its own)")
    tool, server_bin = shutil.which("redis-benchmark"), shutil.which("redis-server")
    if tool is None or server_bin is None:
        say("  skipped: redis-benchmark or redis-server not found (Debian: redis-tools)")
        return
    event_id = bench.script_event
    if event_id is None:
        raise BenchError("no event for the script: the service phase did not run")
    with own_redis(server_bin, bench.logs) as (port, r):
        for name, batch in (("script", 1), ("script_batch", SCRIPT_BATCH)):
            if bench.wanted(name):
                # The event's live state as the service loaded it, copied over (DUMP/
                # RESTORE) before each row, so that each starts from the same: the service's
                # data stays untouched, and nobody else's Redis data is near.
                for key in key_names(event_id):
                    if (dump := bench.r.dump(key)) is not None:
                        r.restore(key, 0, dump, replace=True)
                script_run(bench, tool, port, r, event_id, name, batch)


def script_call(bench: Bench, r: redis.Redis, event_id: str, batch: int, run: str) -> list[str]:
    """EVALSHA of hold.lua (`batch` 1), or of hold_batch.lua with `batch` holds: each
    __rand_int__ gets its own 12-digit number, so two of them make a hold id that no other
    hold of the run has (the TTL key's number differs; it is only a SET). `run` tells
    redis-benchmark's runs apart: each seeds its numbers with srandom(time(NULL) ^
    getpid()), and the measured run, started a second after the calibration (an even one)
    with the next pid (the calibration's, an even one, plus one), gets the same seed and
    repeats the calibration's ids, which the script answers as retries of holds already made
    (seen: the measured run short of exactly the calibration's 20,000 holds)."""
    hold_id = f"bench-{run}-__rand_int__-__rand_int__"
    keys, args = hold_script_call(bench.settings, event_id, hold_id)
    if batch == 1:
        return ["EVALSHA", hold_sha(r), str(len(keys)), *keys, *args]
    # hold_batch.lua: the event's keys and the common arguments once, then each hold's
    # own, its (empty) Idempotency-Key fingerprint first.
    nkeys = len(key_names(event_id))
    keys = keys[:nkeys] + keys[nkeys:] * batch
    args = args[:4] + ["", *args[4:]] * batch
    return ["EVALSHA", hold_sha(r, "hold_batch"), str(len(keys)), *keys, *args]


def script_run(
    bench: Bench, tool: str, port: int, r: redis.Redis, event_id: str, name: str, batch: int
) -> None:
    argv = [tool, "-h", "127.0.0.1", "-p", str(port), "-c", str(bench.cfg.connections)]
    argv += ["-P", str(PIPELINE), "-r", "2000000000", "--csv"]

    def benchmark(n: int) -> dict[str, str]:
        command = script_call(bench, r, event_id, batch, secrets.token_hex(4))
        out = subprocess.run(  # noqa: S603
            [*argv, "-n", str(n), *command],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        # The test's name (the whole command, quotes unescaped) comes first: read the
        # header's figures from the right.
        lines = [line for line in out.stdout.splitlines() if line.strip()]
        if out.returncode or len(lines) < 2:
            raise BenchError(f"redis-benchmark failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        names = [f.strip('"') for f in lines[0].split(",")][1:]
        values = [f.strip('"') for f in lines[-1].rsplit(",", len(names))][1:]
        return dict(zip(names, values, strict=True))

    calibration = 20_000 // batch
    say(f"  {name}: warm-up and calibration, {calibration:,} calls of {batch} holds")
    rps = float(benchmark(calibration)["rps"])
    # Whole pipelines: redis-benchmark completes the last one of each connection.
    n = max(calibration, round(rps * bench.cfg.seconds / PIPELINE) * PIPELINE)

    def once(first: bool) -> Result:
        before = bench.quiet()
        say(
            f"  {name}: measuring {n:,} calls, ~{bench.cfg.seconds} s"
            f" (machine {before}% busy before)"
        )
        # Counted as made, not as held: holds of the calibration run expire meanwhile.
        made = Stat(r, (event_id,), "created")
        before_made = made.read()
        started = time.monotonic()
        with Meter(r, None) as meter:
            row = benchmark(n)
        elapsed = time.monotonic() - started
        created = made.read() - before_made
        redis_seconds = meter.cpu["redis"] / 100 * elapsed
        result = Result(
            target=name,
            label=TARGETS[name].label,
            tool="redis-benchmark",
            rps=round(float(row["rps"]) * batch, 1),  # holds a second
            p50_ms=float(row["p50_latency_ms"]),
            p99_ms=float(row["p99_latency_ms"]),
            requests=n * batch,
            seconds=round(elapsed, 2),
            errors={},
            cpu=meter.cpu,
            extra={
                "holds_created": created,
                "pipeline": PIPELINE,
                "holds_per_call": batch,
                # Steadier than holds/s on a shared machine, and what "a Redis core serves"
                # means: the holds made, over the CPU the Redis server used to make them.
                "holds_per_redis_core_second": round(created / redis_seconds)
                if redis_seconds
                else 0,
                "redis_us_per_hold": round(redis_seconds / created * 1e6, 1) if created else 0,
            },
        )
        bench.note_interference(result, before)
        # At least one new hold per hold asked for (a connection's last pipeline may run over).
        if created < n * batch:
            result.valid = False
            result.notes.append(f"only {created:,} of {n * batch:,} holds asked for were made")
        say(
            f"  {name}: {float(row['rps']):,.0f} calls/s of {batch} holds, p50"
            f" {result.p50_ms} ms, p99 {result.p99_ms} ms; {created:,} holds created by"
            f" {n:,} calls; Redis {result.extra['redis_us_per_hold']} µs per hold,"
            f" {result.extra['holds_per_redis_core_second']:,} holds per Redis core-second"
        )
        return result

    bench.best_of(name, once)


def pg(bench: Bench) -> None:
    from loadtest import pg_baseline

    say(
        f"PostgreSQL baseline (loadtest/pg_baseline.py, {bench.db_name},"
        f" pool of {bench.cfg.pg_pool} per worker)"
    )
    event_id = "bench-pg"
    asyncio.run(pg_baseline.prepare(bench.pg_dsn, event_id, CAPACITY))
    bench.info["postgres"] = asyncio.run(pg_settings(bench.pg_dsn))
    env = {**os.environ, pg_baseline.DSN_ENV: bench.pg_dsn}
    argv = [PYTHON, "-m", "loadtest.pg_baseline", "--port", "{port}"]
    argv += ["--workers", str(bench.cfg.workers), "--pool", str(bench.cfg.pg_pool)]
    server = Server("pg", argv, env, bench.logs)
    try:
        server.start(hold_answers(f"/events/{event_id}/holds"))
        result = bench.simple("pg", server, "hold.lua", f"/events/{event_id}/holds")
    finally:
        server.stop()
    holds, available = asyncio.run(pg_baseline.counts(bench.pg_dsn, event_id))
    result.extra["holds_stored"] = holds
    if holds != CAPACITY - available:
        result.valid = False
        result.notes.append(f"{holds} holds stored but {CAPACITY - available} tickets taken")


async def pg_settings(dsn: str) -> dict[str, str]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return {
            name: str(await conn.fetchval(f"SHOW {name}"))
            for name in ("server_version", "synchronous_commit", "fsync")
        }
    finally:
        await conn.close()
