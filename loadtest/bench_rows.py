"""What `make bench` (loadtest/bench.py) measures: its paths and sizes, its rows (targets)
and the goals of their ratios, the run's settings, and what one row's run gives."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from service.core.keys import event_keys

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
# Holds per call of the script row's batched twin (lua/hold_batch.lua): what the script pipe
# joins when that many holds of one event leave an API process in one turn.
SCRIPT_BATCH = 16
CUSTOMERS_WITH_TOKENS = 1000  # hold_token: the customers whose tokens take turns
QUIET_PCT = 10.0  # the machine counts as quiet at most this busy (% of all cores)
OTHER_PCT = 30.0  # CPU beyond server, Redis and client that marks a run (% of one core)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
CLUSTER_PRIMARIES = 3
SPREAD_EVENTS = 2 * CLUSTER_PRIMARIES  # two hot events on each primary


@dataclasses.dataclass(frozen=True)
class Target:
    label: str  # table and docs/benchmarks.md
    short: str  # chart
    kind: str  # colour: ceiling, service, redis, postgres


TARGETS: dict[str, Target] = {
    "twin": Target(
        "twin: bare Litestar, the hold's body and answer, no I/O", "twin (bare HTTP)", "ceiling"
    ),
    "bare_asgi": Target(
        "bare granian ASGI, no framework: msgspec, the hold's body and answer",
        "bare granian, ASGI",
        "ceiling",
    ),
    "bare_rsgi": Target(
        "bare granian RSGI, no framework: msgspec, the hold's body and answer",
        "bare granian, RSGI",
        "ceiling",
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
    "room": Target(
        "service `GET …/queue/{ticket}`, a waiting room at scale, opened",
        "GET queue ticket, room at scale",
        "service",
    ),
    "script": Target(
        f"hold script alone: `redis-benchmark` EVALSHA, pipeline {PIPELINE}",
        f"Redis: hold script (-P {PIPELINE})",
        "redis",
    ),
    "script_batch": Target(
        f"the same, {SCRIPT_BATCH} holds a call (`hold_batch.lua`): holds/s",
        f"Redis: hold batch script x{SCRIPT_BATCH} (-P {PIPELINE})",
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
    """`num` ÷ `den` (or `num` alone) against `goal`: each a row's figure, a field of its
    Result (rps, p99_ms) or one of its extra figures. With `op` "", a figure shown beside
    the goals, with none of its own (`goal` unused)."""

    key: str
    label: str
    num: tuple[str, str]  # (target, figure)
    den: tuple[str, str] | None
    op: str  # ">=", "<=", "within" (at most `goal` away from 1), or "" (no goal)
    goal: float
    shown: str = ".3f"  # the value's format


# The goals of the issues that set them (the lean hot path's: hold ÷ twin >= 1, sold_out ÷
# twin >= 1.5, hold p99 <= the twin's; the room's: poll ÷ twin >= 1.5, join ÷ twin >= 0.8).
GOALS = (
    Goal("hold_vs_twin_rps", "hold ÷ twin, requests/s", ("hold", "rps"), ("twin", "rps"), ">=", 1),
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
        1.5,
    ),
    # The service is served on RSGI (BOXOFFICE_INTERFACE's default): its ceiling is the
    # bare RSGI one; beside it, the ASGI one (the service's rows on ASGI: --interface).
    Goal(
        "hold_vs_bare_rsgi_rps",
        "hold ÷ bare granian RSGI, requests/s",
        ("hold", "rps"),
        ("bare_rsgi", "rps"),
        ">=",
        0.45,
    ),
    Goal(
        "hold_vs_bare_asgi_rps",
        "hold ÷ bare granian ASGI, requests/s",
        ("hold", "rps"),
        ("bare_asgi", "rps"),
        "",
        0,
    ),
    Goal(
        "twin_vs_bare_asgi_rps",
        "twin ÷ bare granian ASGI, requests/s",
        ("twin", "rps"),
        ("bare_asgi", "rps"),
        "",
        0,
    ),
    Goal(
        "bare_rsgi_vs_bare_asgi_rps",
        "bare RSGI ÷ bare ASGI, requests/s",
        ("bare_rsgi", "rps"),
        ("bare_asgi", "rps"),
        "",
        0,
    ),
    Goal(
        "hold_redis_us",
        "Redis CPU per hold, µs",
        ("hold", "redis_us_per_request"),
        None,
        "<=",
        60,
        ".1f",
    ),
    Goal(
        "script_batch_vs_script_per_core",
        f"hold script, {SCRIPT_BATCH} holds a call ÷ one a call, holds per Redis core-second",
        ("script_batch", "holds_per_redis_core_second"),
        ("script", "holds_per_redis_core_second"),
        ">=",
        2,
    ),
    Goal("hold_vs_twin_p99", "hold ÷ twin, p99", ("hold", "p99_ms"), ("twin", "p99_ms"), "<=", 1),
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
        "poll_vs_twin_rps", "poll ÷ twin, requests/s", ("poll", "rps"), ("twin", "rps"), ">=", 1.5
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
    Goal(
        "room_commands_per_poll",
        "waiting room: Redis commands per poll (all, the scripts' own included)",
        ("room", "redis_commands_per_poll"),
        None,
        "<=",
        0.001,
        ".2g",
    ),
    Goal(
        "room_script_calls_per_poll",
        "waiting room: Redis script calls per poll (the room's steps)",
        ("room", "redis_script_calls_per_poll"),
        None,
        "<=",
        0.001,
        ".2g",
    ),
    Goal(
        "room_bytes_per_buyer",
        "waiting room: Redis memory per queued buyer, bytes",
        ("room", "redis_bytes_per_buyer"),
        None,
        "<=",
        150,
        ".0f",
    ),
    Goal(
        "room_admitted_vs_rate",
        "waiting room: admitted in 60 s ÷ the rate's",
        ("room", "admitted"),
        ("room", "admitted_expected"),
        "within",
        0.02,
    ),
    Goal(
        "room_poll_vs_twin_p99",
        "waiting room poll ÷ twin, p99",
        ("room", "p99_ms"),
        ("twin", "p99_ms"),
        "<=",
        2,
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
    room_buyers: int
    keep: bool
    # granian's interfaces the service rows are measured on, one after the other; the
    # last one's rows are the table's (and the goals'), the others' are shown beside them.
    interfaces: tuple[str, ...] = ("rsgi",)


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
