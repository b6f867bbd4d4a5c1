"""`make bench`: the hold path side by side with its ceilings and a PostgreSQL baseline.

    .venv/bin/python -m loadtest.bench [--seconds 15] [--warmup 3] [--connections 64]
        [--threads 2] [--workers 2] [--pg-pool 16] [--wait-idle 30] [--retries 1]
        [--only hold,twin,…] [--room-buyers 100000] [--interface rsgi|asgi|asgi,rsgi]
        [--no-write] [--keep]

One run, one machine, one after the other, each HTTP target on granian with the same
options and worker count as `boxoffice serve` (loadtest/twin.py, serve()), loaded by wrk:

- twin     the HTTP ceiling for the hold's shape (loadtest/twin.py): no I/O, no middleware
- bare_asgi  the ceiling of granian's ASGI interface for the same request: a plain ASGI
           callable, msgspec decoding the body and encoding a hold-sized answer, no
           framework (loadtest/bare.py); the interface the service is served on
- bare_rsgi  the same on granian's RSGI interface (`__rsgi__`, the body awaited whole, the
           answer handed over with response_bytes)
- health   the service's GET /health (the service rows on granian's RSGI interface, as
           `boxoffice serve` serves it; --interface asgi,rsgi: on ASGI too, first)
- hold     POST /events/{id}/holds: general admission, 1 ticket, one hot event with
           10,000,000 tickets (never sells out), no customer limit
- sold_out the same request for an event sold out before the run: every answer is
           `409 sold_out`, given by the API process itself (service/hotpath/soldout.py); the
           script calls Redis served meanwhile are counted
- hold_token  the same hold on a service with BOXOFFICE_CUSTOMER_TOKEN_SECRET set: each
           request carries a customer's HS256 token (1,000 customers taking turns: each
           API process decodes a token once, then remembers it, as it would a buyer's)
           and names its customer (loadtest/wrk/hold_token.lua); a server of its own,
           started after the plain one has stopped
- spread   the hold over 6 hot events in turn (loadtest/wrk/holds_spread.lua), one node
           (a redis-server of the run's own, as the cluster's nodes are)
- cluster  the same on a local Redis Cluster of 3 primaries (6 events, 2 on each), the
           service pointed at one node; measured in alternation with spread
- cluster_one  the same with the 6 events all on one primary: routing alone, without a
           turn's calls split into one write per primary
- confirm  POST /events/{id}/holds/{hold_id}/confirm, each request a different live hold
           from a pool created just before (loadtest/wrk/confirm.lua walks it)
- release  DELETE /events/{id}/holds/{hold_id}, the same way
- event    GET /events/{id}
- join     POST /events/{id}/queue: each request a new customer joining a waiting room
           (admitting 1 a minute: a queue that only grows, as at a drop's opening)
- poll     GET /events/{id}/queue/{ticket}: the same room, tickets of a pool joined
           just before (loadtest/wrk/poll.lua cycles through them)
- room     GET /events/{id}/queue/{ticket} of a room with --room-buyers queued (100,000;
           a million is the scale it is built for), opened, admitting 10,000 a minute:
           Redis commands per poll, Redis memory per buyer, the admitted after 60 s
           (loadtest/bench_room.py; a Redis server and a service of its own)
- script   the hold script alone, `redis-benchmark` EVALSHA with 64 connections and a
           pipeline of 16, each call a new hold (__rand_int__ in the hold id)
- script_batch  its batched twin: each call 16 holds of lua/hold_batch.lua, as the script
           pipe joins the holds of one event that leave an API process in one turn; its
           requests/s are holds/s, and both rows give their holds per Redis core-second
- pg       the PostgreSQL baseline (loadtest/pg_baseline.py): a guarded UPDATE and an
           INSERT in one transaction

The service runs as `boxoffice serve` on Redis database 10 and PostgreSQL database
<name>_bench (migrated by `boxoffice migrate`); the script on a redis-server of its own
(free port, no persistence, gone at the end); the baseline's tables in <name>_bench. The
spread row's Redis and the cluster rows' cluster are the run's own too (own_redis() and
tests/servers.py LocalCluster: free ports, no replicas, no persistence, gone at the end),
each with a service of its own on <name>_bench.
`boxoffice worker` does not run (it would compete for the cores). Never the data of
`make run` (database 0, <name>) nor of the tests (15, <name>_test): only the keys of its
own events are touched, and deleted at the end (unless --keep).

This machine may be shared: before each measured run the bench waits (up to
--wait-idle seconds) for the machine to be at most 10% busy; a run during which other
work took more than 30% of a core (or that started on a busy machine) is measured again
(--retries times) and the least disturbed run is kept; a row still disturbed is marked ~.

Prints a table (requests/s, p50, p99, errors, CPU) and the ratios against their goals;
writes loadtest/results/bench.json and bench.png and rewrites docs/benchmarks.md between
`<!-- bench:start -->` and `<!-- bench:end -->` (unless --only or --no-write).
wrk comes from Debian's packages: installed with apt-get when missing.
"""

# The parts, beside this file: bench_rows (the rows, their goals, a row's result),
# bench_session (a row's measured run, its retries, the servers and events it starts),
# the rows in bench_ceilings (twin, bare_asgi, bare_rsgi, script, pg), bench_service,
# bench_pools (confirm, release) and bench_cluster; bench_report (table, docs block,
# chart); bench_tools (wrk, Redis, the servers) and bench_meter (CPU accounting); the
# servers of the ceilings in twin.py and bare.py.

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtest import bench_ceilings, bench_cluster, bench_room, bench_service
from loadtest.bench_report import (
    chart,
    conditions,
    doc_block,
    interface_lines,
    machine_info,
    note_lines,
    ratio_lines,
    ratios,
    room_line,
    table,
    write_doc,
)
from loadtest.bench_rows import (
    CLUSTER_TARGETS,
    MARK_END,
    MARK_START,
    RESULTS,
    SERVICE_TARGETS,
    TARGETS,
    Config,
)
from loadtest.bench_session import Bench
from loadtest.bench_tools import BenchError, ensure_wrk, say
from service.core.settings import Settings


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that the servers of the run are stopped."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=int, default=15, help="measured run per target")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up per target (0: none)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", type=int, default=2, help="server processes per target")
    parser.add_argument("--pg-pool", type=int, default=16, help="baseline connections per worker")
    parser.add_argument(
        "--wait-idle",
        type=int,
        default=30,
        help="seconds to wait, before each run, for the machine to be quiet (0: don't)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help="runs again a target disturbed by other work on the machine, at most this often",
    )
    parser.add_argument(
        "--only",
        help="comma-separated targets: " + ",".join(TARGETS) + " (implies --no-write)",
    )
    parser.add_argument(
        "--room-buyers",
        type=int,
        default=100_000,
        help="buyers queued in the room row (1000000: the waiting room's full scale)",
    )
    parser.add_argument(
        "--interface",
        default=Settings().interface,
        help="granian's interface of the service rows: rsgi or asgi (BOXOFFICE_INTERFACE);"
        " asgi,rsgi: the rows on each in turn, the last one's in the table",
    )
    parser.add_argument("--no-write", action="store_true", help="print only: no JSON, PNG, docs")
    parser.add_argument("--keep", action="store_true", help="keep the run's events in Redis")
    args = parser.parse_args(argv)
    only = tuple(TARGETS) if not args.only else tuple(t.strip() for t in args.only.split(","))
    if unknown := [t for t in only if t not in TARGETS]:
        parser.error(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    interfaces = tuple(i.strip() for i in args.interface.split(","))
    if not interfaces or any(i not in ("asgi", "rsgi") for i in interfaces):
        parser.error("--interface: rsgi, asgi, or both comma-separated (asgi,rsgi)")
    if args.connections % args.threads:
        parser.error("--connections must be a multiple of --threads (wrk)")
    if args.room_buyers < bench_room.MIN_BUYERS:
        parser.error(f"--room-buyers: at least {bench_room.MIN_BUYERS:,} (two minutes' admissions)")
    return Config(
        seconds=args.seconds,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        workers=args.workers,
        pg_pool=args.pg_pool,
        wait_idle=args.wait_idle,
        retries=args.retries,
        only=only,
        write=not (args.no_write or args.only),
        keep=args.keep,
        room_buyers=args.room_buyers,
        interfaces=interfaces,
    )


def run(cfg: Config) -> int:
    started = time.monotonic()
    for name in ("httpx", "matplotlib"):  # the Litestar apps' imports log at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    wrk = ensure_wrk()
    logs = Path(tempfile.mkdtemp(prefix="boxoffice-bench-logs-"))
    bench = Bench(cfg, wrk, logs)
    info = machine_info(bench, wrk)
    say(
        f"make bench: {cfg.workers} server processes per target, wrk {cfg.connections} connections"
        f" x {cfg.threads} threads, {cfg.warmup} s warm-up + {cfg.seconds} s each."
        " boxoffice worker: not running during the measurements."
    )
    if info["git"]["dirty"]:
        say("note: service/ or lua/ have uncommitted changes: they are what is measured")
    failed = False
    try:
        bench_ceilings.http_ceilings(bench)
        if bench.wanted(
            *SERVICE_TARGETS,
            "spread",
            *CLUSTER_TARGETS,
            "hold_token",
            "room",
            "script",
            "script_batch",
            "pg",
        ):
            bench.migrate()
        if bench.wanted(*SERVICE_TARGETS, "script", "script_batch"):
            bench_service.on_interfaces(bench)
        if bench.wanted("spread", *CLUSTER_TARGETS):
            bench_cluster.compared(bench)
        if bench.wanted("hold_token"):
            bench_service.service_with_tokens(bench)
        if bench.wanted("room"):
            bench_room.room(bench)
        if bench.wanted("script", "script_batch"):
            bench_ceilings.script(bench)
        if bench.wanted("pg"):
            bench_ceilings.pg(bench)
    except BaseException:
        failed = True
        raise
    finally:
        if not cfg.keep:
            bench.cleanup()
        if failed:
            say(f"server logs kept in {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)
    results = bench.results
    info.update(bench.info)
    rs = ratios(results)
    elapsed = time.monotonic() - started
    info["bench_seconds"] = round(elapsed)
    say("")
    say(conditions(cfg, info))
    say("")
    say(table(results))
    say("CPU: % of one core during the measured run. server = the target's processes; redis =")
    say("the whole Redis server (shared); client = wrk or redis-benchmark; other = the rest of")
    say("the machine (kernel, PostgreSQL, anything else running). ~ other work on the machine")
    say("may have slowed the row down; ! the row is not to be trusted (see below). µs server +")
    say("redis: CPU a request (a script row: Redis's a hold; pg: the rest of the machine's).")
    say("")
    for line in ratio_lines(rs):
        say(line)
    for line in interface_lines(results, cfg.interfaces):
        say(line)
    if room := room_line(results):
        say(room)
    if notes := note_lines(results):
        say("")
        for line in notes:
            say(line)
    if cfg.write:
        RESULTS.mkdir(exist_ok=True)
        document = {
            "info": info,
            "config": dataclasses.asdict(cfg),
            "results": {k: dataclasses.asdict(results[k]) for k in TARGETS if k in results},
            "ratios": rs,
        }
        (RESULTS / "bench.json").write_text(
            json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        )
        chart(results, info, RESULTS / "bench.png")
        written = ["loadtest/results/bench.json", "loadtest/results/bench.png"]
        if write_doc(doc_block(cfg, info, results, rs)):
            written.append("docs/benchmarks.md (between the bench markers)")
        else:
            say(f"docs/benchmarks.md: markers {MARK_START} … {MARK_END} not found; left alone")
        say("")
        say("wrote " + ", ".join(written))
    say(f"make bench took {elapsed:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        with terminate_as_exit():
            sys.exit(run(cfg))
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
