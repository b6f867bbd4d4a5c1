"""Wake-ups per request: the system calls and context switches of the server's worker
processes under wrk's load, counted by `perf stat`, per request served.

    .venv/bin/python -m loadtest.wakeups [--seconds 5] [--warmup 2] [--workers 2]
        [--connections 64] [--threads 2] [--interface rsgi]

Rows: twin (loadtest/twin.py, bare Litestar), hold (`boxoffice serve`, a hold made per
request) and sold_out (every hold refused by the sold-out shortcut), loaded as `make bench`
loads them (loadtest/wrk/hold.lua), with the bench's options (rate limits off), Redis and
PostgreSQL databases. Per request: write (write, writev, sendto, sendmsg), read (read,
recvfrom), futex, epoll (epoll_wait, epoll_pwait, epoll_pwait2), sched_yield, getpid,
getrandom, context switches (cs) and CPU (task-clock, µs): "all" counts every thread of
the worker processes (granian's own too; not the main process), "loop" their main
threads, where the event loop runs. A call whose tracepoint this kernel lacks is left
out ("-" for a column with none). Needs perf and the right to trace other processes
(root, or a low enough kernel.perf_event_paranoid).

The servers run the checkout this file is in (granian puts their working directory, that
checkout, first on the workers' path): to measure another, copy this file into its
loadtest/ and run it there with PYTHONPATH=<that checkout> (for `boxoffice serve`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from loadtest.bench_rows import HOLD_BODY, PYTHON, Config
from loadtest.bench_session import Bench
from loadtest.bench_tools import BenchError, Server, ensure_wrk, hold_answers, run_wrk, say
from service.core.settings import Settings

PERF = shutil.which("perf") or "/usr/bin/perf"
# Each column's system calls: their tracepoints are syscalls:sys_enter_<name>.
SYSCALLS = {
    "write": ("write", "writev", "sendto", "sendmsg"),
    "read": ("read", "recvfrom"),
    "futex": ("futex",),
    "epoll": ("epoll_wait", "epoll_pwait", "epoll_pwait2"),
    "sched_yield": ("sched_yield",),
    # Not wake-ups, but system calls made per request that need not be: asyncio's fork
    # check in get_running_loop() (Python 3.11), os.urandom.
    "getpid": ("getpid",),
    "getrandom": ("getrandom",),
}
COLUMNS = (*SYSCALLS, "cs", "cpu_us")
TWIN_PATH = "/events/bench-twin/holds"


def tracepoints() -> set[str]:
    """The syscall entry tracepoints this kernel has (of those the columns want)."""
    wanted = [f"syscalls:sys_enter_{name}" for names in SYSCALLS.values() for name in names]
    try:
        out = subprocess.run(  # noqa: S603
            [PERF, "list", "tracepoint"], capture_output=True, text=True, check=False, timeout=60
        ).stdout
    except OSError as e:
        raise BenchError(f"perf is needed ({PERF}): {e}") from e
    return {event for event in wanted if event in out.split()}


def workers(server: Server) -> list[int]:
    """The worker processes of a server (the children of its main process)."""
    pids: list[int] = []
    for task in Path(f"/proc/{server.pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    if not pids:
        raise BenchError(f"{server.name}: no worker processes found")
    return pids


def counted(
    pids: list[int], events: set[str], load: Callable[[], dict[str, float]]
) -> dict[str, dict[str, float]]:
    """perf stat's counts per request over `load()` (wrk), of the processes' threads
    ("all") and of their main threads, where the event loop runs ("loop")."""
    out = Path(tempfile.mkstemp(prefix="wakeups-perf-")[1])
    argv = [PERF, "stat", "--per-thread", "-x", ",", "-o", str(out)]
    argv += ["-p", ",".join(map(str, pids))]
    argv += ["-e", ",".join([*sorted(events), "context-switches", "task-clock"])]
    perf = subprocess.Popen(argv, stdin=subprocess.DEVNULL)  # noqa: S603
    try:
        data = load()
    finally:
        perf.send_signal(signal.SIGINT)  # perf stat writes its counts as it ends
        perf.wait(30)
    counts: dict[str, dict[str, float]] = {"all": {}, "loop": {}}
    for line in out.read_text().splitlines():  # comm-tid,count,unit,event,...
        fields = line.split(",")
        if len(fields) > 3 and fields[1].replace(".", "", 1).isdigit():
            tid = int(fields[0].rpartition("-")[2])
            for scope in ("all", "loop") if tid in pids else ("all",):
                counts[scope][fields[3]] = counts[scope].get(fields[3], 0) + float(fields[1])
    out.unlink()
    if "task-clock" not in counts["all"]:
        raise BenchError("perf stat counted nothing: may this user trace other processes?")
    requests = data["requests"]
    rows = {}
    for scope, c in counts.items():
        row = {"rps": requests / (data["duration_us"] / 1e6), "non2xx": data["errors_status"]}
        for column, names in SYSCALLS.items():
            present = [f"syscalls:sys_enter_{n}" for n in names]
            present = [e for e in present if e in events]
            row[column] = sum(c.get(e, 0) for e in present) / requests if present else -1
        row["cs"] = c.get("context-switches", 0) / requests
        row["cpu_us"] = c.get("task-clock", 0) * 1000 / requests  # msec in perf's output
        rows[scope] = row
    return rows


def measure(
    bench: Bench, server: Server, path: str, events: set[str]
) -> dict[str, dict[str, float]]:
    cfg, url = bench.cfg, server.url + path
    if cfg.warmup:
        run_wrk(cfg, bench.wrk, "hold.lua", url, cfg.warmup)
    busy = bench.quiet()
    say(f"  {server.name} {path}: measuring {cfg.seconds} s (machine {busy}% busy before)")
    return counted(
        workers(server), events, lambda: run_wrk(cfg, bench.wrk, "hold.lua", url, cfg.seconds)
    )


def rows(bench: Bench, events: set[str]) -> dict[str, dict[str, dict[str, float]]]:
    cfg, found = bench.cfg, {}
    argv = [PYTHON, "-m", "loadtest.twin", "--port", "{port}", "--workers", str(cfg.workers)]
    twin = Server("twin", argv, dict(os.environ), bench.logs)
    try:
        twin.start(hold_answers(TWIN_PATH))
        found["twin"] = measure(bench, twin, TWIN_PATH, events)
    finally:
        twin.stop()
    bench.migrate()
    with bench.served("service") as (server, admin):
        hot = bench.create_event(admin, "wakeups-hot")
        gone = bench.create_event(admin, "wakeups-gone", capacity=1)
        sale = admin.post(
            f"/events/{gone}/holds", content=HOLD_BODY, headers={"content-type": "application/json"}
        )
        if sale.status_code != 201:
            raise BenchError(f"selling out {gone}: {sale.status_code} {sale.text}")
        found["hold"] = measure(bench, server, f"/events/{hot}/holds", events)
        found["sold_out"] = measure(bench, server, f"/events/{gone}/holds", events)
    return found


def table(found: dict[str, dict[str, dict[str, float]]]) -> str:
    widths = {c: max(7, len(c)) for c in COLUMNS}
    head = f"{'target':9} {'threads':7} {'requests/s':>10} "
    head += " ".join(f"{c:>{w}}" for c, w in widths.items())
    lines = [head, "-" * len(head)]
    for name, scopes in found.items():
        for scope, row in scopes.items():
            cells = (
                f"{row[c]:{w}.2f}" if row[c] >= 0 else f"{'-':>{w}}" for c, w in widths.items()
            )
            lines.append(f"{name:9} {scope:7} {row['rps']:10,.0f} " + " ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=5, help="measured seconds per row")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per row")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", type=int, default=2, help="server processes per target")
    parser.add_argument("--wait-idle", type=int, default=30, help="s to wait for a quiet machine")
    parser.add_argument("--interface", default=Settings().interface, choices=("rsgi", "asgi"))
    args = parser.parse_args()
    cfg = Config(
        seconds=args.seconds,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        workers=args.workers,
        pg_pool=0,
        wait_idle=args.wait_idle,
        retries=0,
        only=("hold", "sold_out"),
        write=False,
        room_buyers=0,
        keep=False,
        interfaces=(args.interface,),
    )
    events = tracepoints()
    if missing := {f"syscalls:sys_enter_{n}" for v in SYSCALLS.values() for n in v} - events:
        say(f"no tracepoints for {', '.join(sorted(missing))} on this kernel: left out")
    logs = Path(tempfile.mkdtemp(prefix="boxoffice-wakeups-"))
    bench = Bench(cfg, ensure_wrk(), logs)
    try:
        found = rows(bench, events)
    except BenchError as e:
        raise SystemExit(f"wakeups: {e} (logs in {logs})") from e
    finally:
        bench.cleanup()
    shutil.rmtree(logs, ignore_errors=True)
    say(
        f"\nper request ({cfg.workers} workers on {args.interface}, wrk {cfg.connections}"
        f" connections x {cfg.threads} threads, {cfg.seconds} s):"
    )
    say(table(found))
    for name, scopes in found.items():
        if (bad := scopes["all"]["non2xx"]) and name != "sold_out":
            say(f"note: {name}: {bad:,.0f} answers were not 2xx")


if __name__ == "__main__":
    main()
