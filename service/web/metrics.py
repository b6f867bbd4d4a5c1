"""/metrics and /ready: HTTP figures from the middleware, live figures read from Redis."""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.core import errors, schemas
from service.core.keys import event_keys
from service.durable.live import live_event_ids
from service.durable.outbox import outbox_state
from service.hotpath import replicas
from service.hotpath.context import RedisClient, Services, execute_timed
from service.selling import waitingroom
from service.selling.expiry import notifications_enabled
from service.web.livefeed import REFUSED, RefusalTally

REQUESTS = Counter(
    "boxoffice_requests",
    "HTTP requests by route template and status",
    ["method", "path", "status_code"],
)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LATENCY = Histogram(
    "boxoffice_request_duration_seconds",
    "HTTP request latency by route template and status",
    ["method", "path", "status_code"],
    buckets=BUCKETS,
)
REFUSALS = Counter(
    "boxoffice_refusals", "Problem-details answers (errors and refusals) by code", ["code"]
)
# Made here too, so that it reads 0 before the first shortfall.
replicas.shortfall_counter()
_UNCOUNTED = frozenset({"/metrics", "/health"})
# The one label of every request that matched no route (404, 405): a client cannot make
# a series per made-up path, nor per made-up method.
UNMATCHED = "<unmatched>"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Where the error handler leaves a problem's code for the middleware, in the request scope.
_REFUSAL = "boxoffice_refusal"
# How long /metrics waits for Redis's live figures before it answers without them.
LIVE_TIMEOUT_SECONDS = 2.0
# How long /ready waits for each primary of a cluster to answer PING.
PING_TIMEOUT = 1.0
# How often a process adds what it counted to the shared metrics.
FLUSH_SECONDS = 1.0


class HttpStats:
    """Request counts and latencies, tallied in plain dictionaries and added to the
    Prometheus metrics once a second. With several server processes every increment of a
    Prometheus metric is a locked write to a shared file; per request that cost a third of
    the hold path's throughput. Tallied, it costs a dictionary update (two for a refusal)."""

    def __init__(self) -> None:
        # Refusals by event, for the live view: added to the event's counts in Redis.
        self.tally = RefusalTally()
        # (method, path, status) -> count per bucket (the last one +Inf), then the sum of
        # seconds; the number of requests is the sum of the buckets.
        self.latencies: dict[tuple[str, str, int], list[float]] = {}
        self.refusals: collections.Counter[str] = collections.Counter()

    def record(
        self, method: str, path: str, status: int, seconds: float, refusal: str | None = None
    ) -> None:
        tally = self.latencies.get((method, path, status))
        if tally is None:
            tally = self.latencies[method, path, status] = [0.0] * (len(BUCKETS) + 2)
        tally[bisect.bisect_left(BUCKETS, seconds)] += 1
        tally[-1] += seconds
        if refusal is not None:
            self.refusals[refusal] += 1

    def finish(self, scope: Any, status: int, started: float) -> None:
        """A request answered (`started`: its time.perf_counter() as it came): counted
        by its route template, known only now (the router sets it when a route matched)."""
        path = scope.get("path_template") or UNMATCHED
        if path in _UNCOUNTED:
            return
        method: str = scope.get("method", "")
        if method not in _METHODS:
            method = "OTHER"
        refusal = scope.get("state", {}).get(_REFUSAL)
        self.record(method, path, status, time.perf_counter() - started, refusal)
        # The buyers' refusals, for the live view (not the admin's own 401s).
        event_id = scope.get("path_params", {}).get("event_id")
        if refusal is not None and path.startswith("/events/") and event_id:
            self.tally.record(event_id, refusal)

    def flush(self) -> None:
        latencies, refusals = self.latencies, self.refusals
        self.latencies, self.refusals = {}, collections.Counter()
        for code, count in refusals.items():
            REFUSALS.labels(code).inc(count)
        for labels, tally in latencies.items():
            REQUESTS.labels(*labels).inc(sum(tally[:-1]))
            child = LATENCY.labels(*labels)
            # prometheus_client has no bulk observe(): add to the child's bucket values,
            # which is what observe() does one sample at a time.
            for bucket, in_bucket in zip(child._buckets, tally[:-1], strict=True):
                if in_bucket:
                    bucket.inc(in_bucket)
            child._sum.inc(tally[-1])

    async def flush_every(self, seconds: float = FLUSH_SECONDS) -> None:
        try:
            while True:
                await asyncio.sleep(seconds)
                self.flush()
        finally:
            self.flush()


def note_refusal(scope: Scope, code: str) -> None:
    """Called with each problem answer: the middleware counts it by code."""
    scope.setdefault("state", {})[_REFUSAL] = code


def middleware(stats: HttpStats) -> Callable[[ASGIApp], ASGIApp]:
    """Counts each request by route template (one series per route, not one per event or
    hold) and its status, times it, and counts problem answers by code."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def record(scope: Scope, receive: Receive, send: Send) -> None:
            started = time.perf_counter()
            status = 500

            async def sending(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, sending)
            finally:
                stats.finish(scope, status, started)

        return record

    return wrap


class _Snapshot(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def _http_registry() -> CollectorRegistry:
    # Several server processes: each writes its samples to files, summed here at scrape.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


async def _live(svc: Services) -> list[Metric]:
    labels = ["event", "category"]
    gauges = {
        name: GaugeMetricFamily(f"boxoffice_tickets_{name}", help_, labels=labels)
        for name, help_ in (
            ("capacity", "Tickets in the category"),
            ("available", "Tickets on sale now"),
            ("held", "Tickets in live holds"),
            ("sold", "Tickets sold"),
        )
    }
    holds = CounterMetricFamily(
        "boxoffice_holds", "Holds by what happened to them", labels=["event", "outcome"]
    )
    refused = CounterMetricFamily(
        "boxoffice_event_refusals",
        "Problem answers of requests naming the event, by code (all API processes)",
        labels=["event", "code"],
    )
    backlog = GaugeMetricFamily(
        "boxoffice_outbox_backlog",
        "Bookings and cancellations not yet in PostgreSQL",
        labels=["event"],
    )
    lag = GaugeMetricFamily(
        "boxoffice_outbox_lag_seconds",
        "Age of the oldest entry not yet in PostgreSQL",
        labels=["event"],
    )
    dead = GaugeMetricFamily(
        "boxoffice_outbox_dead_letters",
        "Entries in the event's dead-letter stream",
        labels=["event"],
    )
    event_ids = await live_event_ids(svc)
    pipe = svc.redis.pipeline(transaction=False)
    for event_id in event_ids:
        k = event_keys(event_id)
        for key in (k.cap, k.avail, k.held, k.sold, k.stats):
            pipe.hgetall(key)
    now_ms, replies = await execute_timed(svc.redis, pipe)
    for i, event_id in enumerate(event_ids):
        cap, avail, held, sold, stats = replies[i * 5 : i * 5 + 5]
        for name, values in (
            ("capacity", cap),
            ("available", avail),
            ("held", held),
            ("sold", sold),
        ):
            for category, value in values.items():
                gauges[name].add_metric([event_id, category.decode()], int(value))
        for field, value in stats.items():
            name = field.decode()
            if name.startswith(REFUSED):
                refused.add_metric([event_id, name[len(REFUSED) :]], int(value))
            else:
                holds.add_metric([event_id, name], int(value))
        outbox = await outbox_state(svc, event_id)
        backlog.add_metric([event_id], outbox.backlog)
        oldest = outbox.oldest_ms
        lag.add_metric([event_id], 0 if oldest is None else max(0, now_ms - oldest) / 1000)
        dead.add_metric([event_id], outbox.dead_letters)
    rooms = await _rooms(svc, event_ids)
    return [*gauges.values(), holds, refused, backlog, lag, dead, *rooms]


async def _rooms(svc: Services, event_ids: list[str]) -> list[Metric]:
    """The waiting rooms: tickets waiting, admitted (ranks the frontier passed), passes
    not expired (derived from when each rank was admitted: lua/lib.lua, room_figures);
    one read-only script call per event (queue_figures.lua, the admin's view's figures),
    all of them in one write per Redis node."""
    names = (
        ("waiting", "Tickets waiting in the event's waiting room"),
        ("admitted", "Tickets the waiting room has admitted"),
        ("active_passes", "Admission passes handed out and not expired"),
    )
    gauges = {
        name: GaugeMetricFamily(f"boxoffice_queue_{name}", help_, labels=["event"])
        for name, help_ in names
    }
    found = await asyncio.gather(*(waitingroom.read_figures(svc, e) for e in event_ids))
    for event_id, f in zip(event_ids, found, strict=True):
        if f is not None:
            gauges["waiting"].add_metric([event_id], f.waiting)
            gauges["admitted"].add_metric([event_id], f.admitted)
            gauges["active_passes"].add_metric([event_id], f.active)
    return list(gauges.values())


async def render(svc: Services) -> bytes:
    """The process's own figures always; Redis's live figures when Redis answers in time
    (`boxoffice_live_figures_up` says which): an outage is when the figures matter most."""
    up = GaugeMetricFamily(
        "boxoffice_live_figures_up", "1 when the figures read from Redis are included"
    )
    live_metrics: list[Metric] = []
    try:
        live_metrics = await asyncio.wait_for(_live(svc), LIVE_TIMEOUT_SECONDS)
    except Exception as e:
        if not errors.unavailable(e):  # TimeoutError is an OSError: unavailable too
            raise
    up.add_metric([], 1 if live_metrics else 0)
    live = CollectorRegistry()
    live.register(_Snapshot([*live_metrics, up]))
    return generate_latest(_http_registry()) + generate_latest(live)


async def _silent_primaries(redis: RedisClient) -> list[tuple[str, str]]:
    """On a cluster, the primaries that do not answer (each serves its own events), as
    host:port and why; on a single node, raise when it does not answer."""
    if not isinstance(redis, RedisCluster):
        await redis.ping()
        return []
    silent = await _ping_primaries(redis)
    if silent:
        # The slot table may be older than a failover: read it again, then ask again.
        with contextlib.suppress(Exception):
            await redis.nodes_manager.initialize()
        silent = await _ping_primaries(redis)
    return silent


async def _ping_primaries(redis: RedisCluster) -> list[tuple[str, str]]:
    primaries = redis.get_primaries()
    replies = await asyncio.gather(
        *(asyncio.wait_for(redis.ping(target_nodes=node), PING_TIMEOUT) for node in primaries),
        return_exceptions=True,
    )
    return [
        (node.name, type(reply).__name__)
        for node, reply in zip(primaries, replies, strict=True)
        if isinstance(reply, BaseException)
    ]


async def _eviction_policy(redis: RedisClient, node: ClusterNode | None) -> str | None:
    extra: dict[str, Any] = {} if node is None else {"target_nodes": node}
    try:
        policy = (await redis.info("memory", **extra)).get("maxmemory_policy")
    except Exception:  # not a reason to be unready; the rest of /ready says if it is away
        return None
    return None if policy is None else str(policy)


async def _eviction_warnings(svc: Services) -> list[str]:
    """An evicting maxmemory-policy would drop stock, holds and confirmations not yet in
    PostgreSQL without a word. INFO, not CONFIG GET: managed Redis often disables CONFIG."""
    redis = svc.redis
    # On a cluster each primary has its own setting.
    nodes = redis.get_primaries() if isinstance(redis, RedisCluster) else [None]
    warnings = []
    for node in nodes:
        policy = await _eviction_policy(redis, node)
        if policy not in (None, "noeviction"):
            where = "" if node is None else f" on {node.name}"
            warnings.append(
                f"Redis maxmemory-policy is {policy}{where}: it may evict live stock, holds"
                " and confirmations; set it to noeviction"
            )
    return warnings


async def _online_replicas(redis: RedisClient, node: ClusterNode | None) -> int | None:
    extra: dict[str, Any] = {} if node is None else {"target_nodes": node}
    try:
        return replicas.online_replicas(await redis.execute_command("ROLE", **extra))
    except Exception:  # not a reason to be unready; the rest of /ready says if it is away
        return None


async def _replica_warnings(svc: Services) -> list[str]:
    """Primaries with fewer replicas in sync than BOXOFFICE_CONFIRM_WAIT_REPLICAS asks for
    (after a failover, say): their confirmations wait for none, or answer 503."""
    wanted = svc.settings.confirm_wait_replicas
    if not wanted:
        return []
    redis = svc.redis
    nodes: list[ClusterNode | None] = (
        list(redis.get_primaries()) if isinstance(redis, RedisCluster) else [None]
    )
    warnings = []
    for node in nodes:
        have = await _online_replicas(redis, node)
        if have is not None and have < wanted:
            name = "" if node is None else f" {node.name}"
            shortfall = svc.settings.confirm_wait_shortfall
            warnings.append(replicas.warning(name, have, wanted, shortfall))
    return warnings


async def _redis_readiness(svc: Services, warnings: list[str]) -> None:
    """Raises when Redis cannot serve; adds what is worth knowing to `warnings`."""
    silent = await _silent_primaries(svc.redis)
    warnings += [f"Redis node {name} does not answer: {why}" for name, why in silent]
    if silent:
        raise ConnectionError("a primary does not answer")
    # Loading is idempotent: this also heals a SCRIPT FLUSH before anyone calls.
    await svc.scripts.load()
    if not await notifications_enabled(svc.redis):
        # Not a reason to take the API out of service: holds still expire, lazily and by
        # the sweeper, only less promptly than with the listener.
        warnings.append("keyspace notifications are off: is `boxoffice worker` running?")
    warnings += await _eviction_warnings(svc)
    warnings += await _replica_warnings(svc)


async def readiness(svc: Services) -> schemas.Readiness:
    missing: list[str] = []
    warnings: list[str] = []
    # All of Redis's questions within one timeout, as a request's: a Redis that hangs
    # makes /ready answer `missing: redis` in that time, not after each question's own.
    timeout = svc.settings.redis_timeout_seconds
    found: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            await _redis_readiness(svc, found)
    except (TimeoutError, RedisTimeoutError):
        missing.append("redis")
        found.append(f"Redis did not answer within {timeout:g} s")
    except Exception:  # whatever it is, not ready
        missing.append("redis")
    warnings += found
    try:
        async with svc.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception:  # whatever it is, not ready
        missing.append("postgresql")
    return schemas.Readiness(
        status="unavailable" if missing else "ready", missing=missing, warnings=warnings
    )
