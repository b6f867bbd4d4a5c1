"""Pools of live holds for the confirm and release rows of `make bench`, made by the hold
script itself, and the hold script's call as the service makes it."""

from __future__ import annotations

import math
import secrets
import time
from pathlib import Path

import redis

from loadtest.bench_rows import SERVICE_TARGETS, Result, Stat
from loadtest.bench_session import Bench
from loadtest.bench_tools import BenchError, Server, key_names, say
from service.core.settings import Settings
from service.hotpath.scripts import LUA_DIR, script_text
from service.selling.sales import hold_call


def hold_script_call(
    settings: Settings, event_id: str, hold_id: str
) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of one hold of 1 GA ticket by customer "bench", as the service
    passes them (service/hotpath/scripts.py Scripts.call_event, service/selling/sales.py
    create_hold_counted)."""
    s = settings
    common = [
        "",  # no Idempotency-Key
        str(s.idempotency_ttl_seconds),
        str(s.reclaim_batch),
        str(s.hold_retention_seconds * 1000),
    ]
    hold = hold_call(event_id, hold_id, "bench", b'[["GA",1]]')
    args = [a.decode() if isinstance(a, bytes) else str(a) for a in hold.args]
    return [*key_names(event_id), *hold.extra_keys], [*common, *args]


def hold_sha(r: redis.Redis, name: str = "hold") -> str:
    """The hold script (or `name`, its batched twin hold_batch) loaded, as the service
    loads it."""
    source = script_text((LUA_DIR / "lib.lua").read_text(), name)
    sha: str = r.script_load(source)
    return sha


def make_pool(bench: Bench, event_id: str, n: int, path: Path) -> None:
    """`n` live holds made by the hold script itself, pipelined; their ids, one a line."""
    sha = hold_sha(bench.r)
    ids = [secrets.token_urlsafe(16) for _ in range(n)]
    for start in range(0, n, 1000):
        pipe = bench.r.pipeline(transaction=False)
        for hold_id in ids[start : start + 1000]:
            keys, args = hold_script_call(bench.settings, event_id, hold_id)
            pipe.evalsha(sha, len(keys), *keys, *args)
        for reply in pipe.execute():
            # A new hold's record (not an error, not someone else's hold): the `held`
            # counter cannot tell, the last requests of the run before may still land.
            if b'"err"' in reply or b'"s":"held"' not in reply or b'"c":"bench"' not in reply:
                raise BenchError(f"the hold script refused a pool hold: {reply[:300]!r}")
    path.write_text("\n".join(ids) + "\n")


def pooled(bench: Bench, name: str, server: Server, event_id: str) -> None:
    """Confirm or release under wrk, each request a different live hold: each run gets
    a pool of its own, sized from the fastest service figure so far; a run that
    exhausts its pool is redone with a pool twice as large."""
    cfg = bench.cfg
    estimate = max(
        [
            r.rps
            for k, r in bench.results.items()
            if k in SERVICE_TARGETS and k not in ("health", "sold_out")
        ]
        + [2000.0]
    )
    threads = str(cfg.threads)
    warm_path = bench.tmp / f"{name}-warm.txt"
    if cfg.warmup:
        make_pool(bench, event_id, math.ceil(estimate * 2 * cfg.warmup) + 1000, warm_path)
    runs = 0

    def once(first: bool) -> Result:
        nonlocal estimate, runs
        factor = 2.0
        for attempt in range(2):
            runs += 1
            n = math.ceil(estimate * factor * cfg.seconds) + 2000
            path = bench.tmp / f"{name}-{runs}.txt"
            started = time.monotonic()
            make_pool(bench, event_id, n, path)
            say(f"  {name}: pool of {n:,} live holds made in {time.monotonic() - started:.1f} s")
            result = bench.measure(
                name,
                server,
                f"{name}.lua",
                f"/events/{event_id}/holds",
                args=[str(path), threads],
                warm_args=[str(warm_path), threads],
                warmup=first and attempt == 0,
                stat=Stat(
                    bench.r,
                    (event_id,),
                    {"confirm": "confirmed", "release": "released"}[name],
                ),
            )
            path.unlink()
            result.extra["pool"] = n
            estimate = max(estimate, result.rps)
            if not any("pool ran out" in note for note in result.notes):
                break
            factor *= 2
            if attempt == 0:
                say(f"  {name}: the pool ran out; once more with a pool twice as large")
        return result

    bench.best_of(name, once)
