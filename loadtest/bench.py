"""`make bench`: the hold path side by side with its ceilings and a PostgreSQL baseline.

    .venv/bin/python -m loadtest.bench [--seconds 15] [--warmup 3] [--connections 64]
        [--threads 2] [--workers 2] [--pg-pool 16] [--wait-idle 30] [--retries 1]
        [--only hold,twin,…] [--no-write] [--keep]

One run, one machine, one after the other, each HTTP target on granian with the same
options and worker count as `boxoffice serve` (loadtest/twin.py, serve()), loaded by wrk:

- twin     the HTTP ceiling for the hold's shape (loadtest/twin.py): no I/O, no middleware
- health   the service's GET /health
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
- script   the hold script alone, `redis-benchmark` EVALSHA with 64 connections and a
           pipeline of 16, each call a new hold (__rand_int__ in the hold id)
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

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import redis
from sqlalchemy.engine import make_url

from service.core.keys import EVENTS, event_keys
from service.core.settings import Settings
from service.hotpath.scripts import LUA_DIR
from service.selling.sales import hold_call

ROOT = Path(__file__).resolve().parent.parent
WRK_DIR = ROOT / "loadtest" / "wrk"
RESULTS = ROOT / "loadtest" / "results"
BENCH_DOC = ROOT / "docs" / "benchmarks.md"
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
PYTHON = sys.executable
BOXOFFICE = str(Path(sys.executable).parent / "boxoffice")

SERVICE_DB = 10  # the service under test
CAPACITY = 10_000_000
HOLD_TTL_SECONDS = 3600  # no hold expires during a run: no reclaim work in the figures
HOLD_BODY = b'{"customer_id":"bench","items":[{"category":"GA","quantity":1}]}'
PIPELINE = 16  # redis-benchmark -P
CUSTOMERS_WITH_TOKENS = 1000  # hold_token: the customers whose tokens take turns
QUIET_PCT = 10.0  # the machine counts as quiet at most this busy (% of all cores)
OTHER_PCT = 30.0  # CPU beyond server, Redis and client that marks a run (% of one core)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
CLUSTER_PRIMARIES = 3
SPREAD_EVENTS = 2 * CLUSTER_PRIMARIES  # two hot events on each primary
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Target:
    label: str  # table and docs/benchmarks.md
    short: str  # chart
    kind: str  # colour: ceiling, service, redis, postgres


TARGETS: dict[str, Target] = {
    "twin": Target(
        "twin: bare Litestar, the hold's body and answer, no I/O", "twin (bare HTTP)", "ceiling"
    ),
    "health": Target("service `GET /health`", "GET /health", "ceiling"),
    "hold": Target("service `POST /events/{id}/holds`", "POST holds", "service"),
    "sold_out": Target(
        "service `POST /events/{id}/holds` refused sold_out (sold out before)",
        "POST holds: sold out",
        "service",
    ),
    "hold_token": Target(
        "service `POST /events/{id}/holds`, customer tokens on", "POST holds, token", "service"
    ),
    "spread": Target(
        f"service `POST …/holds`, {SPREAD_EVENTS} events in turn, one Redis node",
        f"POST holds, {SPREAD_EVENTS} events",
        "service",
    ),
    "cluster": Target(
        f"service `POST …/holds`, {SPREAD_EVENTS} events, Redis Cluster of"
        f" {CLUSTER_PRIMARIES} primaries",
        f"POST holds, {SPREAD_EVENTS} events, cluster",
        "cluster",
    ),
    "cluster_one": Target(
        f"the same, the {SPREAD_EVENTS} events all on one primary of the cluster",
        f"POST holds, {SPREAD_EVENTS} events, one primary",
        "cluster",
    ),
    "confirm": Target("service `POST …/holds/{id}/confirm`", "POST confirm", "service"),
    "release": Target("service `DELETE …/holds/{id}`", "DELETE hold", "service"),
    "event": Target("service `GET /events/{id}`", "GET event", "service"),
    "unknown": Target(
        "service: unknown event ids, each new (`GET` event, `POST` holds, `GET` hold): 404",
        "unknown event ids (404)",
        "service",
    ),
    "join": Target("service `POST /events/{id}/queue`", "POST queue (join)", "service"),
    "poll": Target("service `GET …/queue/{ticket}`", "GET queue ticket (poll)", "service"),
    "script": Target(
        f"hold script alone: `redis-benchmark` EVALSHA, pipeline {PIPELINE}",
        f"Redis: hold script (-P {PIPELINE})",
        "redis",
    ),
    "pg": Target(
        "PostgreSQL baseline: guarded `UPDATE` + `INSERT`, one transaction",
        "PostgreSQL baseline",
        "postgres",
    ),
}
SERVICE_TARGETS = (
    "health", "hold", "sold_out", "event", "unknown", "confirm", "release", "join", "poll",
)  # fmt: skip
CLUSTER_TARGETS = ("cluster", "cluster_one")
# The waiting room of the join and poll rows: a queue that only grows during the runs.
ROOM = {"admit_per_minute": 1, "pass_ttl_seconds": 600}
POLL_POOL = 2000  # tickets the poll row cycles through


@dataclasses.dataclass(frozen=True)
class Goal:
    key: str
    label: str
    num: tuple[str, str]  # (target, "rps" | "p99_ms")
    den: tuple[str, str]
    op: str  # ">=" or "<="
    goal: float


GOALS = (
    Goal(
        "hold_vs_twin_rps", "hold ÷ twin, requests/s", ("hold", "rps"), ("twin", "rps"), ">=", 0.7
    ),
    Goal(
        "hold_vs_pg_rps",
        "hold ÷ PostgreSQL baseline, requests/s",
        ("hold", "rps"),
        ("pg", "rps"),
        ">=",
        10,
    ),
    Goal(
        "sold_out_vs_twin_rps",
        "sold_out ÷ twin, requests/s",
        ("sold_out", "rps"),
        ("twin", "rps"),
        ">=",
        0.9,
    ),
    Goal("hold_vs_twin_p99", "hold ÷ twin, p99", ("hold", "p99_ms"), ("twin", "p99_ms"), "<=", 1.5),
    Goal(
        "hold_token_vs_hold_rps",
        "hold with customer token ÷ hold, requests/s",
        ("hold_token", "rps"),
        ("hold", "rps"),
        ">=",
        0.9,
    ),
    Goal(
        "confirm_vs_hold_rps",
        "confirm ÷ hold, requests/s",
        ("confirm", "rps"),
        ("hold", "rps"),
        ">=",
        1,
    ),
    Goal(
        "unknown_vs_event_rps",
        "unknown event ids ÷ known event GET, requests/s",
        ("unknown", "rps"),
        ("event", "rps"),
        ">=",
        0.8,
    ),
    Goal(
        "join_vs_twin_rps", "join ÷ twin, requests/s", ("join", "rps"), ("twin", "rps"), ">=", 0.8
    ),
    Goal(
        "poll_vs_twin_rps", "poll ÷ twin, requests/s", ("poll", "rps"), ("twin", "rps"), ">=", 0.8
    ),
    Goal(
        "release_vs_hold_rps",
        "release ÷ hold, requests/s",
        ("release", "rps"),
        ("hold", "rps"),
        ">=",
        1,
    ),
    Goal(
        "cluster_vs_single_rps",
        "cluster hold ÷ single-node hold, requests/s",
        ("cluster", "rps"),
        ("spread", "rps"),
        ">=",
        0.9,
    ),
    Goal(
        "cluster_one_vs_single_rps",
        "cluster hold, events on one primary ÷ single-node hold, requests/s",
        ("cluster_one", "rps"),
        ("spread", "rps"),
        ">=",
        0.9,
    ),
)


@dataclasses.dataclass
class Config:
    seconds: int
    warmup: int
    connections: int
    threads: int
    workers: int
    pg_pool: int
    wait_idle: int
    retries: int
    only: tuple[str, ...]
    write: bool
    keep: bool


@dataclasses.dataclass
class Result:
    target: str
    label: str
    tool: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    seconds: float
    errors: dict[str, int]
    cpu: dict[str, float]
    valid: bool = True
    disturbed: bool = False  # other work on the machine may have slowed it down
    notes: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class BenchError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Stat:
    """The field of its events' stats hashes that each request of a row must raise by one
    (created, confirmed, released), read through `r` (a node, or a cluster client)."""

    r: Any  # redis.Redis | redis.RedisCluster: both route HGET
    event_ids: tuple[str, ...]
    field: str

    def read(self) -> int:
        return sum(int(self.r.hget(event_keys(e).stats, self.field) or 0) for e in self.event_ids)


def say(message: str) -> None:
    print(message, flush=True)


# --- tools ------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """wrk, installed from Debian's packages when missing (root, or sudo without a
    password); otherwise a clear message and no run."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise BenchError("wrk is missing and this machine has no apt-get: install wrk, then rerun")
    if os.geteuid() == 0:
        sudo: list[str] = []
    elif shutil.which("sudo"):
        sudo = ["sudo", "-n"]
    else:
        raise BenchError("wrk is missing: run `sudo apt-get install -y wrk`, then rerun")
    say("wrk not found: installing it from Debian's packages (apt-get install -y wrk)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, apt, "install", "-y", "-q", "--no-install-recommends", "wrk"]
    if subprocess.run(install, env=env, check=False).returncode != 0:  # noqa: S603
        say("apt-get install failed: refreshing the package lists (apt-get update), once")
        subprocess.run([*sudo, apt, "update", "-q"], env=env, check=False)  # noqa: S603
        subprocess.run(install, env=env, check=False)  # noqa: S603
    found = shutil.which("wrk")
    if not found:
        raise BenchError("could not install wrk with apt-get: install it by hand, then rerun")
    say(f"wrk installed: {found}")
    return found


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)  # noqa: S603
    except OSError:
        return "?"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def key_names(event_id: str) -> list[str]:
    """The event's keys in the scripts' KEYS order (service/core/keys.py), as text."""
    return [k.decode() if isinstance(k, bytes) else k for k in event_keys(event_id).all]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def own_redis(server_bin: str, logs: Path) -> Iterator[tuple[int, redis.Redis]]:
    """A Redis server of this run on a free port, configured as .ci/services.sh starts one
    (no persistence), stopped and gone at the end."""
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="boxoffice-bench-redis-"))
    argv = [server_bin, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    argv += ["--save", "", "--appendonly", "no", "--logfile", str(logs / "redis.log")]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)  # noqa: S603
    r = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("redis-server did not start: see its log") from None
                time.sleep(0.05)
        yield port, r
    finally:
        r.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(data, ignore_errors=True)


# --- CPU accounting ---------------------------------------------------------------------


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values)
    return total - idle, total


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd on


def tree_ticks(root: int) -> int:
    """CPU jiffies (user + system) of a process and all its descendants, alive now."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            stats[int(entry)] = st
            parents[int(entry)] = int(st[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(int(stats[p][11]) + int(stats[p][12]) for p in tree if p in stats)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def redis_cpu(nodes: Sequence[redis.Redis]) -> float:
    """CPU seconds of these Redis servers (every node of a cluster, replicas too)."""
    total = 0.0
    for r in nodes:
        info: dict[str, Any] = r.info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


class Meter:
    """CPU during one measured run, in % of one core: the server's processes, Redis, the
    load generator (a finished child of this process), and the machine as a whole (of all
    cores) -- "other" is what the machine did beyond those three."""

    def __init__(self, r: redis.Redis | Sequence[redis.Redis], server_pid: int | None) -> None:
        self._r = [r] if isinstance(r, redis.Redis) else list(r)
        self._pid = server_pid

    def __enter__(self) -> Meter:
        self._t = time.monotonic()
        self._machine = machine_ticks()
        self._server = tree_ticks(self._pid) if self._pid else 0
        self._redis = redis_cpu(self._r)
        self._client = children_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._t
        busy, total = machine_ticks()
        cores = os.cpu_count() or 1
        server = ((tree_ticks(self._pid) - self._server) / CLK_TCK) if self._pid else 0.0
        redis_s = redis_cpu(self._r) - self._redis
        client = children_cpu() - self._client
        machine = (busy - self._machine[0]) / max(1, total - self._machine[1])
        pct = {
            "server": server / wall * 100,
            "redis": redis_s / wall * 100,
            "load_generator": client / wall * 100,
            "machine_of_all_cores": machine * 100,
        }
        pct["other"] = max(
            0.0, machine * cores * 100 - pct["server"] - pct["redis"] - pct["load_generator"]
        )
        self.cpu = {k: round(v, 1) for k, v in pct.items()}


def busy_sample(seconds: float = 1.0) -> float:
    """% of the whole machine busy over `seconds`, with nothing of ours under load."""
    b0, t0 = machine_ticks()
    time.sleep(seconds)
    b1, t1 = machine_ticks()
    return round((b1 - b0) / max(1, t1 - t0) * 100, 1)


# --- servers ----------------------------------------------------------------------------


class Server:
    """A server process (and its workers) of this run, in a session of its own so that
    stopping it ends exactly what it started."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._argv = [a.replace("{port}", str(self.port)) for a in argv]
        self._env = {k: v.replace("{port}", str(self.port)) for k, v in env.items()}
        self.log_path = logs / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, ready: Callable[[httpx.Client], bool], timeout: float = 60) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603
                self._argv,
                env=self._env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise BenchError(f"{self.name} exited at start:\n{self.log_tail()}")
                try:
                    if ready(client):
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise BenchError(f"{self.name} did not become ready in {timeout:.0f} s:\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self._proc is not None and (code := self._proc.poll()) is not None:
            raise BenchError(
                f"{self.name} ended during the run (exit code {code}; was it stopped from"
                f" outside?):\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # granian: graceful stop of the workers
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Workers left behind by a main process that died: same session, same group.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def is_not_the_service(client: httpx.Client) -> bool:
    """The twin and the baseline have no /health: a 200 means the service's app answered."""
    if client.get("/health").status_code == 200:
        raise BenchError("the service's app answered instead: see serve() in loadtest/twin.py")
    return True


def hold_answers(path: str) -> Callable[[httpx.Client], bool]:
    """Ready when a hold at `path` answers 201 (and the app is not the service's)."""

    def ready(client: httpx.Client) -> bool:
        headers = {"content-type": "application/json"}
        response = client.post(path, content=HOLD_BODY, headers=headers)
        return response.status_code == 201 and is_not_the_service(client)

    return ready


# --- load -------------------------------------------------------------------------------


def run_wrk(
    cfg: Config, wrk: str, script: str, url: str, seconds: int, args: Sequence[str] = ()
) -> dict[str, float]:
    argv = [
        wrk,
        f"-t{cfg.threads}",
        f"-c{cfg.connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(WRK_DIR / script),
        url,
    ]
    if args:
        argv += ["--", *args]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 120)  # noqa: S603
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            data: dict[str, float] = json.loads(line.removeprefix("BENCH_RESULT "))
            return data
    raise BenchError(f"wrk gave no result ({' '.join(argv)}):\n{out.stdout}\n{out.stderr}")


def wrk_result(name: str, data: dict[str, float], cpu: dict[str, float]) -> Result:
    seconds = data["duration_us"] / 1e6
    errors = {
        k.removeprefix("errors_"): int(v) for k, v in data.items() if k.startswith("errors_") and v
    }
    result = Result(
        target=name,
        label=TARGETS[name].label,
        tool="wrk",
        rps=round(data["requests"] / seconds, 1),
        p50_ms=round(data["p50_us"] / 1000, 2),
        p99_ms=round(data["p99_us"] / 1000, 2),
        requests=int(data["requests"]),
        seconds=round(seconds, 2),
        errors=errors,
        cpu=cpu,
        extra={
            "p90_ms": round(data["p90_us"] / 1000, 2),
            "max_ms": round(data["max_us"] / 1000, 2),
        },
    )
    if errors:
        result.valid = False
        result.notes.append(
            "errors: " + ", ".join(f"{v} {k}" for k, v in errors.items()) + " (non-2xx = status)"
        )
    if data.get("exhausted"):
        result.valid = False
        result.notes.append(f"hold pool ran out: {int(data['exhausted'])} requests reused a hold")
    return result


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
    ) -> Result:
        """Warm-up, then the measured run; `stat` checked. `refused`: an event every
        request is refused for (sold_out): no hold may be created, and the script calls
        Redis served during the run are counted. `nodes`: the Redis servers whose CPU is
        the row's (default: the service's). `not_found`: every answer must be a 404."""
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
        with Meter(nodes or self.r, server.pid) as meter:
            try:
                data = run_wrk(cfg, self.wrk, script, url, cfg.seconds, args)
            finally:
                server.check_alive()
        # Read as wrk ends: every response it counted was sent after the script ran.
        count = stat.read() - count if stat else 0
        if refused is not None:
            # Every answer non-2xx by design: checked here instead of counted as errors.
            statuses = data.pop("errors_status", 0)
            created, calls = (
                a - b for a, b in zip(self.refusal_counts(refused), (created, calls), strict=True)
            )
        if not_found:
            statuses = data.pop("errors_status", 0)
        result = wrk_result(name, data, meter.cpu)
        if not_found and statuses < result.requests:
            result.valid = False
            result.notes.append(f"{result.requests - statuses:,} answers not 404")
        # CPU per request: steadier than requests/s on a shared machine.
        result.extra["cpu_us_per_request"] = {
            k: round(meter.cpu[k] / 100 / result.rps * 1e6, 1) if result.rps else 0.0
            for k in ("server", "redis")
        }
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

    # -- twin

    def twin(self) -> None:
        say("twin (loadtest/twin.py)")
        server = Server(
            "twin",
            [PYTHON, "-m", "loadtest.twin", "--port", "{port}", "--workers", str(self.cfg.workers)],
            dict(os.environ),
            self.logs,
        )
        try:
            server.start(hold_answers("/events/bench-twin/holds"))
            self.simple("twin", server, "hold.lua", "/events/bench-twin/holds")
        finally:
            server.stop()

    # -- the service

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
            # The hold rows measure the hold path, not the limit of a human's attempts: one
            # customer ("bench", or 1,000 with tokens) makes thousands of holds a second.
            "BOXOFFICE_RATE_LIMIT_CUSTOMER_HOLDS": "0",
            # wrk is one address sending for every buyer, as a trusted backend in front is.
            "BOXOFFICE_RATE_LIMIT_ADDRESS": "0",
        }

    def service(self) -> None:
        say(
            f"service (boxoffice serve; Redis db {SERVICE_DB}, PostgreSQL {self.db_name};"
            " no worker)"
        )
        with self.served("service") as (server, admin):
            hot = self.create_event(admin, "bench-hot")
            if self.wanted("script"):
                self.script_event = self.create_event(admin, "bench-script")
            if self.wanted("join", "poll"):
                self.room_event = self.create_event(admin, "bench-room", waiting_room=ROOM)
            if self.wanted("sold_out"):
                gone = self.create_event(admin, "bench-gone", capacity=1)
                sale = admin.post(
                    f"/events/{gone}/holds",
                    content=HOLD_BODY,
                    headers={"content-type": "application/json"},
                )
                if sale.status_code != 201:
                    raise BenchError(f"selling out {gone}: {sale.status_code} {sale.text}")
            holds = f"/events/{hot}/holds"
            if self.wanted("health"):
                self.simple("health", server, "get.lua", "/health")
            if self.wanted("hold"):
                self.simple("hold", server, "hold.lua", holds, stat=Stat(self.r, (hot,), "created"))
            if self.wanted("sold_out"):
                self.best_of(
                    "sold_out",
                    lambda first: self.measure(
                        "sold_out",
                        server,
                        "hold.lua",
                        f"/events/{gone}/holds",
                        warmup=first,
                        refused=gone,
                    ),
                )
            if self.wanted("unknown"):
                self.paired(
                    {
                        "event": self.once("event", server, "get.lua", f"/events/{hot}"),
                        "unknown": self.once("unknown", server, "unknown.lua", "/", not_found=True),
                    }
                )
            elif self.wanted("event"):
                self.simple("event", server, "get.lua", f"/events/{hot}")
            if self.wanted("confirm"):
                self.pooled("confirm", server, hot)
            if self.wanted("release"):
                self.pooled("release", server, hot)
            if self.wanted("join", "poll"):
                self.waiting_room(server)

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

    def spread_once(
        self,
        name: str,
        server: Server,
        event_ids: list[str],
        r: Any,
        nodes: Sequence[redis.Redis],
    ) -> Callable[[bool], Result]:
        """One measure() of holds over several events in turn (loadtest/wrk/holds_spread.lua)."""
        stat = Stat(r, tuple(event_ids), "created")
        return lambda first: self.measure(
            name, server, "holds_spread.lua", "/", args=event_ids, warmup=first, stat=stat,
            nodes=nodes,
        )  # fmt: skip

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

    # -- one Redis node against a Redis Cluster, both the run's own

    def compared(self) -> None:
        """The spread and cluster rows, in alternation. Each service has a Redis of the
        run's own: on the shared one, other clients' commands would slow one side only."""
        server_bin = shutil.which("redis-server")
        if server_bin is None:
            say("spread and cluster rows skipped: redis-server not found (Debian: redis-server)")
            return
        with ExitStack() as stack:
            rows: dict[str, Callable[[bool], Result]] = {}
            if self.wanted("spread"):
                port, r = stack.enter_context(own_redis(server_bin, self.logs))
                say(f"service on a Redis node of its own (port {port}, no persistence)")
                ids = [f"bench-spread-{i}-{secrets.token_hex(4)}" for i in range(SPREAD_EVENTS)]
                url = f"redis://127.0.0.1:{port}/0"
                server = stack.enter_context(self.serving("single", url, ids))
                rows["spread"] = self.spread_once("spread", server, ids, r, [r])
            if self.wanted(*CLUSTER_TARGETS):
                rows.update(stack.enter_context(self.on_cluster()))
            self.paired(rows)

    @contextmanager
    def serving(self, name: str, redis_url: str, event_ids: Sequence[str]) -> Iterator[Server]:
        """`boxoffice serve` on `redis_url` (a Redis of the run's own: the events are not
        deleted one by one), with these events created; stopped at the end."""
        with self.served(name, BOXOFFICE_REDIS_URL=redis_url) as (server, admin):
            for event_id in event_ids:
                self.create_event(admin, "", event_id=event_id, track=False)
            yield server

    @contextmanager
    def on_cluster(self) -> Iterator[dict[str, Callable[[bool], Result]]]:
        """A Redis Cluster and `boxoffice serve` on it, with the spread row's number of hot
        events over its primaries (and as many on one primary); yields one measure() of
        each wanted cluster row; all stopped at the end."""
        from tests.servers import LocalCluster

        with LocalCluster(CLUSTER_PRIMARIES, replicas=0) as cluster:
            say(
                f"service on a Redis Cluster ({CLUSTER_PRIMARIES} primaries on ports"
                f" {', '.join(str(n.port) for n in cluster.nodes)}, no replicas;"
                f" BOXOFFICE_REDIS_URL {cluster.url})"
            )
            nodes = [redis.Redis(port=n.port) for n in cluster.nodes]
            routed = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
            by_primary = cluster.event_ids(SPREAD_EVENTS // CLUSTER_PRIMARIES, "bench-cluster")
            # Interleaved, so that consecutive requests go to different primaries.
            spread = [e for group in zip(*by_primary.values(), strict=True) for e in group]
            one_primary = next(iter(cluster.event_ids(SPREAD_EVENTS, "bench-one").values()))
            wanted = {
                name: ids
                for name, ids in (("cluster", spread), ("cluster_one", one_primary))
                if self.wanted(name)
            }
            try:
                events = [e for ids in wanted.values() for e in ids]
                with self.serving("cluster", cluster.url, events) as server:
                    yield {
                        name: self.spread_once(name, server, ids, routed, nodes)
                        for name, ids in wanted.items()
                    }
            finally:
                routed.close()
                for node in nodes:
                    node.close()

    def service_with_tokens(self) -> None:
        """The hold again, on a service with customer tokens on (a server of its own, with
        the same options): what verifying a token costs the hold."""
        secret = secrets.token_hex(32)
        say("service with customer tokens on (BOXOFFICE_CUSTOMER_TOKEN_SECRET set)")
        with self.served("service-tokens", BOXOFFICE_CUSTOMER_TOKEN_SECRET=secret) as (
            server,
            admin,
        ):
            hot = self.create_event(admin, "bench-token")
            path = self.tmp / "customer-tokens.txt"
            exp = int(time.time()) + 6 * 3600  # valid all run long
            path.write_text(
                "".join(
                    f"bench-{i} {jwt.encode({'sub': f'bench-{i}', 'exp': exp}, secret, 'HS256')}\n"
                    for i in range(CUSTOMERS_WITH_TOKENS)
                )
            )
            args = [str(path), str(self.cfg.threads)]
            self.best_of(
                "hold_token",
                lambda first: self.measure(
                    "hold_token",
                    server,
                    "hold_token.lua",
                    f"/events/{hot}/holds",
                    args=args,
                    warmup=first,
                    stat=Stat(self.r, (hot,), "created"),
                ),
            )

    # -- the waiting room: join and poll

    def waiting_room(self, server: Server) -> None:
        event_id = self.room_event
        queue = f"/events/{event_id}/queue"
        order = event_keys(event_id).queue[2]
        if self.wanted("join"):

            def join(first: bool) -> Result:
                before = int(self.r.zcard(order))
                result = self.measure(
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
                made = int(self.r.zcard(order)) - before
                result.extra["tickets_made"] = made
                if made < result.requests:
                    result.valid = False
                    result.notes.append(f"{result.requests:,} joins made only {made:,} tickets")
                return result

            self.best_of("join", join)
        if self.wanted("poll"):
            path = self.tmp / "tickets.txt"
            tickets = []
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for i in range(POLL_POOL):
                    response = client.post(queue, json={"customer_id": f"poll-{i}"})
                    if response.status_code != 201:
                        raise BenchError(f"joining for the poll pool: {response.text[:300]}")
                    tickets.append(response.json()["ticket"])
            path.write_text("\n".join(tickets) + "\n")
            threads = str(self.cfg.threads)
            self.best_of(
                "poll",
                lambda first: self.measure(
                    "poll", server, "poll.lua", queue, args=[str(path), threads], warmup=first
                ),
            )

    # -- pools of live holds for confirm and release

    def hold_call(self, event_id: str, hold_id: str) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of one hold of 1 GA ticket by customer "bench", as the service
        passes them (service/hotpath/scripts.py Scripts.call_event, service/selling/sales.py
        create_hold_counted)."""
        s = self.settings
        common = [
            "",  # no Idempotency-Key
            str(s.idempotency_ttl_seconds),
            str(s.reclaim_batch),
            str(s.hold_retention_seconds * 1000),
        ]
        hold = hold_call(event_id, hold_id, "bench", b'[["GA",1]]')
        args = [a.decode() if isinstance(a, bytes) else str(a) for a in hold.args]
        return [*key_names(event_id), *hold.extra_keys], [*common, *args]

    def hold_sha(self, r: redis.Redis) -> str:
        source = (LUA_DIR / "lib.lua").read_text() + "\n" + (LUA_DIR / "hold.lua").read_text()
        sha: str = r.script_load(source)
        return sha

    def make_pool(self, event_id: str, n: int, path: Path) -> None:
        """`n` live holds made by the hold script itself, pipelined; their ids, one a line."""
        sha = self.hold_sha(self.r)
        ids = [secrets.token_urlsafe(16) for _ in range(n)]
        for start in range(0, n, 1000):
            pipe = self.r.pipeline(transaction=False)
            for hold_id in ids[start : start + 1000]:
                keys, args = self.hold_call(event_id, hold_id)
                pipe.evalsha(sha, len(keys), *keys, *args)
            for reply in pipe.execute():
                # A new hold's record (not an error, not someone else's hold): the `held`
                # counter cannot tell, the last requests of the run before may still land.
                if b'"err"' in reply or b'"s":"held"' not in reply or b'"c":"bench"' not in reply:
                    raise BenchError(f"the hold script refused a pool hold: {reply[:300]!r}")
        path.write_text("\n".join(ids) + "\n")

    def pooled(self, name: str, server: Server, event_id: str) -> None:
        """Confirm or release under wrk, each request a different live hold: each run gets
        a pool of its own, sized from the fastest service figure so far; a run that
        exhausts its pool is redone with a pool twice as large."""
        cfg = self.cfg
        estimate = max(
            [
                r.rps
                for k, r in self.results.items()
                if k in SERVICE_TARGETS and k not in ("health", "sold_out")
            ]
            + [2000.0]
        )
        threads = str(cfg.threads)
        warm_path = self.tmp / f"{name}-warm.txt"
        if cfg.warmup:
            self.make_pool(event_id, math.ceil(estimate * 2 * cfg.warmup) + 1000, warm_path)
        runs = 0

        def once(first: bool) -> Result:
            nonlocal estimate, runs
            factor = 2.0
            for attempt in range(2):
                runs += 1
                n = math.ceil(estimate * factor * cfg.seconds) + 2000
                path = self.tmp / f"{name}-{runs}.txt"
                started = time.monotonic()
                self.make_pool(event_id, n, path)
                say(
                    f"  {name}: pool of {n:,} live holds made in {time.monotonic() - started:.1f} s"
                )
                result = self.measure(
                    name,
                    server,
                    f"{name}.lua",
                    f"/events/{event_id}/holds",
                    args=[str(path), threads],
                    warm_args=[str(warm_path), threads],
                    warmup=first and attempt == 0,
                    stat=Stat(
                        self.r,
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

        self.best_of(name, once)

    # -- the hold script alone

    def script(self) -> None:
        say("hold script alone (redis-benchmark, on a Redis server of its own)")
        tool, server_bin = shutil.which("redis-benchmark"), shutil.which("redis-server")
        if tool is None or server_bin is None:
            say("  skipped: redis-benchmark or redis-server not found (Debian: redis-tools)")
            return
        event_id = self.script_event
        if event_id is None:
            raise BenchError("no event for the script: the service phase did not run")
        with own_redis(server_bin, self.logs) as (port, r):
            # The event's live state as the service loaded it, copied over (DUMP/RESTORE):
            # the service's data stays untouched, and nobody else's Redis data is near.
            for key in key_names(event_id):
                if (dump := self.r.dump(key)) is not None:
                    r.restore(key, 0, dump, replace=True)
            self.script_run(tool, port, r, event_id)

    def script_run(self, tool: str, port: int, r: redis.Redis, event_id: str) -> None:
        sha = self.hold_sha(r)
        # Each __rand_int__ gets its own 12-digit number: two of them make a hold id that
        # no other call of the run has (the TTL key's number differs; it is only a SET).
        keys, args = self.hold_call(event_id, "bench-__rand_int__-__rand_int__")
        argv = [tool, "-h", "127.0.0.1", "-p", str(port), "-c", str(self.cfg.connections)]
        argv += ["-P", str(PIPELINE), "-r", "2000000000", "--csv"]
        command = ["EVALSHA", sha, str(len(keys)), *keys, *args]

        def bench(n: int) -> dict[str, str]:
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
                raise BenchError(
                    f"redis-benchmark failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
                )
            names = [f.strip('"') for f in lines[0].split(",")][1:]
            values = [f.strip('"') for f in lines[-1].rsplit(",", len(names))][1:]
            return dict(zip(names, values, strict=True))

        calibration = 20_000
        say(f"  script: warm-up and calibration, {calibration:,} calls")
        rps = float(bench(calibration)["rps"])
        # Whole pipelines: redis-benchmark completes the last one of each connection.
        n = max(calibration, round(rps * self.cfg.seconds / PIPELINE) * PIPELINE)

        def once(first: bool) -> Result:
            before = self.quiet()
            say(
                f"  script: measuring {n:,} calls, ~{self.cfg.seconds} s"
                f" (machine {before}% busy before)"
            )
            # Counted as made, not as held: holds of the calibration run expire meanwhile.
            made = Stat(r, (event_id,), "created")
            before_made = made.read()
            started = time.monotonic()
            with Meter(r, None) as meter:
                row = bench(n)
            elapsed = time.monotonic() - started
            created = made.read() - before_made
            result = Result(
                target="script",
                label=TARGETS["script"].label,
                tool="redis-benchmark",
                rps=round(float(row["rps"]), 1),
                p50_ms=float(row["p50_latency_ms"]),
                p99_ms=float(row["p99_latency_ms"]),
                requests=n,
                seconds=round(elapsed, 2),
                errors={},
                cpu=meter.cpu,
                extra={"holds_created": created, "pipeline": PIPELINE},
            )
            self.note_interference(result, before)
            # At least one new hold per call (a connection's last pipeline may run over).
            if created < n:
                result.valid = False
                result.notes.append(f"only {created:,} of {n:,} calls created a hold")
            say(
                f"  script: {result.rps:,.0f} calls/s, p50 {result.p50_ms} ms,"
                f" p99 {result.p99_ms} ms; {created:,} holds created by {n:,} calls"
            )
            return result

        self.best_of("script", once)

    # -- PostgreSQL baseline

    def pg(self) -> None:
        from loadtest import pg_baseline

        say(
            f"PostgreSQL baseline (loadtest/pg_baseline.py, {self.db_name},"
            f" pool of {self.cfg.pg_pool} per worker)"
        )
        event_id = "bench-pg"
        asyncio.run(pg_baseline.prepare(self.pg_dsn, event_id, CAPACITY))
        self.info["postgres"] = asyncio.run(pg_settings(self.pg_dsn))
        env = {**os.environ, pg_baseline.DSN_ENV: self.pg_dsn}
        argv = [PYTHON, "-m", "loadtest.pg_baseline", "--port", "{port}"]
        argv += ["--workers", str(self.cfg.workers), "--pool", str(self.cfg.pg_pool)]
        server = Server("pg", argv, env, self.logs)
        try:
            server.start(hold_answers(f"/events/{event_id}/holds"))
            result = self.simple("pg", server, "hold.lua", f"/events/{event_id}/holds")
        finally:
            server.stop()
        holds, available = asyncio.run(pg_baseline.counts(self.pg_dsn, event_id))
        result.extra["holds_stored"] = holds
        if holds != CAPACITY - available:
            result.valid = False
            result.notes.append(f"{holds} holds stored but {CAPACITY - available} tickets taken")

    # -- clean-up

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


# --- report -----------------------------------------------------------------------------


def ratios(results: dict[str, Result]) -> list[dict[str, Any]]:
    out = []
    for g in GOALS:
        num, den = results.get(g.num[0]), results.get(g.den[0])
        if num is None or den is None:
            continue
        a, b = getattr(num, g.num[1]), getattr(den, g.den[1])
        value = a / b if b else math.inf
        met = value >= g.goal if g.op == ">=" else value <= g.goal
        out.append(
            {
                "key": g.key,
                "label": g.label,
                "value": round(value, 3),
                "goal": f"{g.op} {g.goal:g}",
                "met": met,
                "trustworthy": num.valid and den.valid,
            }
        )
    return out


def ms(value: float) -> str:
    return (
        f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"
    )


def table(results: dict[str, Result]) -> str:
    head = (
        f"{'target':<68} {'req/s':>9} {'p50':>10} {'p99':>10} {'errors':>7}"
        "  CPU % server/redis/client/other"
    )
    lines = [head, "-" * len(head)]
    for name in TARGETS:
        r = results.get(name)
        if r is None:
            continue
        c = r.cpu
        cpu = f"{c['server']:.0f}/{c['redis']:.0f}/{c['load_generator']:.0f}/{c['other']:.0f}"
        lines.append(
            f"{r.label.replace('`', ''):<68} {r.rps:>9,.0f} {ms(r.p50_ms):>10} {ms(r.p99_ms):>10}"
            f" {r.error_count:>7}  {cpu}{mark(r)}"
        )
    return "\n".join(lines)


def mark(r: Result) -> str:
    """ " !" for a figure not to be trusted, " ~" for one taken on a busy machine."""
    return " !" if not r.valid else " ~" if r.notes else ""


def note_lines(results: dict[str, Result]) -> list[str]:
    return [
        f"{mark(r).strip()} {r.target}: {'; '.join(r.notes)}"
        for name in TARGETS
        if (r := results.get(name)) is not None and r.notes
    ]


def cluster_cpu_line(results: dict[str, Result]) -> str | None:
    """CPU per hold of the rows that compare one node with the cluster: requests/s on a
    shared machine move with whatever else runs; CPU per request much less."""
    parts = []
    for name in ("spread", "cluster", "cluster_one"):
        if (r := results.get(name)) is not None:
            per = r.extra["cpu_us_per_request"]
            parts.append(f"{name} {per['server']:.0f} + {per['redis']:.0f}")
    if len(parts) < 2:
        return None
    return "CPU per hold, µs of server + Redis: " + ", ".join(parts)


def ratio_lines(rs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rs:
        verdict = "met" if r["met"] else "NOT met"
        doubt = "" if r["trustworthy"] else " (a figure behind it is marked !: see below)"
        lines.append(f"{r['label']:<42} {r['value']:>7.3f}   goal {r['goal']:<6} {verdict}{doubt}")
    return lines


def conditions(cfg: Config, info: dict[str, Any]) -> str:
    git = info["git"]
    code = f"commit {git['commit']}" + (
        ", with uncommitted changes in service/ or lua/" if git["dirty"] else ""
    )
    text = (
        f"Measured by `make bench` on {info['date'][:10]} ({info['cpu']}, {info['cores']} cores; "
        f"{code}): every HTTP target on granian with {cfg.workers} worker processes, "
        f"wrk with {cfg.connections} connections and {cfg.threads} threads, {cfg.warmup} s "
        f"warm-up then {cfg.seconds} s per row. One hot event with {CAPACITY:,} general-admission "
        "tickets, 1 ticket per hold; confirm and release each hit a different live hold. "
        "`boxoffice worker` was not running."
    )
    if "cluster" in cfg.only:
        text += (
            f" The spread and cluster rows make holds on {SPREAD_EVENTS} hot events in turn: on"
            f" a Redis node and on a Redis Cluster of {CLUSTER_PRIMARIES} primaries, both"
            f" started for the run ({SPREAD_EVENTS // CLUSTER_PRIMARIES} events on each primary,"
            " no replicas, the service given one node's URL; measured in alternation); Redis"
            " CPU is then every node's."
        )
    if pg := info.get("postgres"):
        text += (
            f" PostgreSQL {pg['server_version'].split()[0]} (fsync {pg['fsync']}, "
            f"synchronous_commit {pg['synchronous_commit']}), {cfg.pg_pool} connections "
            "per baseline process."
        )
    return textwrap.fill(text, 92, break_on_hyphens=False)


def doc_block(
    cfg: Config, info: dict[str, Any], results: dict[str, Result], rs: list[dict[str, Any]]
) -> str:
    lines = [
        conditions(cfg, info),
        "",
        "| target | requests/s | p50 | p99 |",
        "|---|---:|---:|---:|",
    ]
    for name in TARGETS:
        if (r := results.get(name)) is not None:
            lines.append(f"| {r.label}{mark(r)} | {r.rps:,.0f} | {ms(r.p50_ms)} | {ms(r.p99_ms)} |")
    lines += ["", "| ratio | value | goal | |", "|---|---:|---:|---|"]
    for ratio in rs:
        verdict = "met" if ratio["met"] else "not met"
        lines.append(f"| {ratio['label']} | {ratio['value']:.3f} | {ratio['goal']} | {verdict} |")
    if line := cluster_cpu_line(results):
        lines += ["", line + "."]
    if notes := note_lines(results):
        lines += [
            "",
            "Marked rows (! not to be trusted; ~ other work on the machine, even after a retry):",
            "",
        ]
        lines += [f"- {line}" for line in notes]
    about = (
        f"The script row is Redis alone, with {PIPELINE} calls in flight per connection: its "
        "latencies are not comparable with the HTTP rows. All figures, CPU use included: "
        "`loadtest/results/bench.json`."
    )
    lines += [
        "",
        textwrap.fill(about, 92, break_on_hyphens=False),
        "",
        "![requests/s and p99 latency per target](../loadtest/results/bench.png)",
    ]
    return "\n".join(lines)


def write_doc(block: str) -> bool:
    text = BENCH_DOC.read_text()
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < start:
        return False
    BENCH_DOC.write_text(text[: start + len(MARK_START)] + "\n" + block + "\n" + text[end:])
    return True


def chart(results: dict[str, Result], info: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "ceiling": "#9e9e9e",
        "service": "#1f77b4",
        "redis": "#d62728",
        "postgres": "#ff7f0e",
        "cluster": "#9467bd",
    }
    rows = [results[n] for n in TARGETS if n in results]
    names = [TARGETS[r.target].short + mark(r) for r in rows]
    colour = [colours[TARGETS[r.target].kind] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.5 * len(rows)), sharey=True)
    y = list(range(len(rows)))
    left.barh(y, [r.rps for r in rows], color=colour)
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_title("requests/s (higher is better)")
    for i, r in enumerate(rows):
        left.text(r.rps, i, f" {r.rps:,.0f}", va="center", fontsize=8)
    left.set_xlim(0, max(r.rps for r in rows) * 1.25)
    right.barh(y, [r.p99_ms for r in rows], color=colour)
    right.set_xscale("log")
    right.set_title("p99 latency, ms (log scale; lower is better)")
    for i, r in enumerate(rows):
        right.text(r.p99_ms, i, " " + ms(r.p99_ms), va="center", fontsize=8)
    right.set_xlim(min(r.p99_ms for r in rows) / 2, max(r.p99_ms for r in rows) * 4)
    fig.suptitle(
        f"make bench, {info['date'][:16].replace('T', ' ')} UTC, commit {info['git']['commit']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)  # noqa: S603, S607
        return out.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD") or "?",
        "dirty": bool(git("status", "--porcelain", "--", "service", "lua")),
    }


def machine_info(bench: Bench, wrk: str) -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
                break
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        **{name: version(name) for name in ("granian", "litestar", "msgspec", "redis", "uvloop")},
        "redis_server": bench.r.info("server")["redis_version"],
        "wrk": tool_version([wrk, "-v"]),
        "git": git_state(),
        "worker_running": False,
    }


# --- main -------------------------------------------------------------------------------


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
    parser.add_argument("--no-write", action="store_true", help="print only: no JSON, PNG, docs")
    parser.add_argument("--keep", action="store_true", help="keep the run's events in Redis")
    args = parser.parse_args(argv)
    only = tuple(TARGETS) if not args.only else tuple(t.strip() for t in args.only.split(","))
    if unknown := [t for t in only if t not in TARGETS]:
        parser.error(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    if args.connections % args.threads:
        parser.error("--connections must be a multiple of --threads (wrk)")
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
        if bench.wanted("twin"):
            bench.twin()
        if bench.wanted(*SERVICE_TARGETS, "spread", *CLUSTER_TARGETS, "hold_token", "script", "pg"):
            bench.migrate()
        if bench.wanted(*SERVICE_TARGETS, "script"):
            bench.service()
        if bench.wanted("spread", *CLUSTER_TARGETS):
            bench.compared()
        if bench.wanted("hold_token"):
            bench.service_with_tokens()
        if bench.wanted("script"):
            bench.script()
        if bench.wanted("pg"):
            bench.pg()
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
    say("may have slowed the row down; ! the row is not to be trusted (see below).")
    say("")
    for line in ratio_lines(rs):
        say(line)
    if cpu_line := cluster_cpu_line(results):
        say(cpu_line)
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
