"""The long-lived connections of one process, opened once and passed to every operation."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    RedisError,
    SlotNotCoveredError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.core import retries
from service.core.db import create_engine
from service.core.settings import Settings, parse_seed_nodes
from service.core.timefmt import redis_ms
from service.hotpath.eventids import EventIds
from service.hotpath.scripts import Scripts
from service.hotpath.soldout import SoldOut

# One client type for both: the commands are the same, only the routing differs.
RedisClient = Redis | RedisCluster
# How long the start-up question "is this node part of a cluster?" may take per node: a
# hung node must not hold the whole process at start-up.
DETECT_TIMEOUT = 2.0


@dataclass(slots=True)
class Services:
    settings: Settings
    redis: RedisClient
    scripts: Scripts
    engine: AsyncEngine
    # The sold-out shortcut's flags: used by the API processes (started in their lifespan).
    sold_out: SoldOut = field(default_factory=SoldOut)
    # Every event id PostgreSQL has: used by the API processes (started in their lifespan).
    event_ids: EventIds = field(default_factory=EventIds)

    @classmethod
    def open(cls, settings: Settings) -> Services:
        """A single node's client; start() replaces it with a cluster's when Redis is one."""
        redis = _single_node(settings)
        return cls(settings, redis, Scripts(redis, settings), create_engine(settings))

    async def start(self) -> None:
        """Before concurrent use: find out whether Redis is a cluster (asking the URL's node,
        then the seed nodes) and if so, use the cluster's client, its slot table loaded.
        Nothing answering is not an error here: the single node's client stays, and every
        call says that Redis is away, as on a single node."""
        if isinstance(self.redis, RedisCluster) or not await is_cluster(self.settings):
            return
        cluster = _cluster(self.settings)
        try:
            await cluster.initialize()
        except BaseException:
            await cluster.aclose()
            raise
        self.scripts.close()
        await self.redis.aclose()
        self.redis = cluster
        self.scripts = Scripts(cluster, self.settings)  # type: ignore[arg-type]

    async def close(self) -> None:
        await self.sold_out.close()
        await self.event_ids.close()
        self.scripts.close()
        await self.redis.aclose()
        await self.engine.dispose()


async def execute_timed(
    redis: RedisClient, pipe: Pipeline | ClusterPipeline, near: str | None = None
) -> tuple[int, list[Any]]:
    """A pipeline's replies, and Redis's clock (epoch ms) read with them: in the same round
    trip on a single node; a cluster refuses TIME in a pipeline, so one more there, on the
    node of the key `near` when given (the clock the event's scripts read)."""
    if isinstance(redis, RedisCluster):
        replies = await pipe.execute()

        async def clock() -> int:  # the key's node looked up again at each try
            target = {} if near is None else {"target_nodes": redis.get_node_from_key(near)}
            return redis_ms(await redis.time(**target))

        try:
            return await clock(), replies
        except retries.PASSING as e:  # a failover: the pipeline waited it out, so does this
            return await retries.wait_out(clock, e, getattr(redis, "budget", 0.0)), replies
    pipe.time()
    *replies, now = await pipe.execute()
    return redis_ms(now), replies


def _single_node(settings: Settings) -> Redis:
    # Blocking: a burst beyond the pool waits for a connection instead of failing.
    # Retries (service/core/retries.py): a pooled connection found dead after a Redis restart is
    # replaced, not reported. A retried script may run twice; every script is safe to repeat.
    # A reply (and a pooled connection) waited for at most BOXOFFICE_REDIS_TIMEOUT_SECONDS,
    # and never twice: TimeoutError is not retried. The URL's own timeouts win.
    timeout = settings.redis_timeout_seconds
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=64,
        timeout=timeout,
        retry=retries.single_node(),
        retry_on_error=[ConnectionError],
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return Redis(connection_pool=pool)


def _startup_nodes(settings: Settings) -> list[tuple[str, int]]:
    options = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
    url_node = (options.get("host", "127.0.0.1"), int(options.get("port", 6379)))
    return [url_node, *parse_seed_nodes(settings.redis_seed_nodes)]


def _client_options(settings: Settings) -> dict[str, Any]:
    """The URL's options (password, TLS, timeouts) without where to connect and the db."""
    options: dict[str, Any] = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
    for name in ("host", "port", "db", "connection_class"):
        options.pop(name, None)
    if "connection_class" in parse_url(settings.redis_url):  # type: ignore[no-untyped-call]
        options["ssl"] = True  # rediss://
    return options


async def is_cluster(settings: Settings) -> bool:
    """Whether the first start-up node that answers says `cluster_enabled:1`."""
    options = {
        **_client_options(settings),
        "socket_timeout": DETECT_TIMEOUT,
        "socket_connect_timeout": DETECT_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),  # the next start-up node instead
    }
    for host, port in _startup_nodes(settings):
        client = Redis(host=host, port=port, **options)
        try:
            info = await client.info("cluster")
        except (OSError, RedisError):
            continue
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
        return bool(info.get("cluster_enabled"))
    return False


class _Connection(Connection):
    """A write on a connection that the cluster client closed while another call was
    connecting on it (after MOVED it disconnects a node's connections; seen as 500s during
    a slot move) fails in ways redis-py does not take for a lost connection: uvloop raises
    RuntimeError ("... the handler is closed") where asyncio's own loop gives an OSError,
    and a write that finds the connection already closed meets `_writer` None
    (AttributeError). Said as what it is, a lost connection, redis-py and the budget retry
    it like any other."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as e:
            if "handler is closed" not in str(e):
                raise
            raise ConnectionError(f"Redis connection closed while writing: {e}") from e
        except AttributeError as e:
            if self._writer is not None:
                raise
            raise ConnectionError("Redis connection closed while writing") from e


class PatientCluster(RedisCluster):
    """redis-py's cluster client, waiting out a failover or a slot migration within the
    budget, as the hot path's pipe does (service/core/retries.py): its own tries follow MOVED
    and ASK and read the slot table again, but come back at once, well before a replica
    has taken over. A command sent to nodes the caller chose (INFO of each primary for
    /ready) is not waited out: a node that is away is the answer. Nor is a node silent
    for the timeout (TimeoutError): unlike the hot path's pipe, which waits out a hung
    primary's failover, a call here (a read, an admin write) answers 503 at once."""

    # redis-py's own, less TimeoutError: each try would wait the timeout again.
    ERRORS_ALLOW_RETRY = (ConnectionError, ClusterDownError, SlotNotCoveredError)  # type: ignore[assignment]

    def __init__(self, *, budget: float, **kwargs: Any) -> None:
        super().__init__(retry=retries.cluster(budget), **kwargs)
        # Not a constructor option (from_url and __init__ keep only SSLConnection): the
        # nodes found later are made from connection_kwargs, the start-up ones already are.
        self.connection_kwargs["connection_class"] = _Connection
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = _Connection
        self.budget = budget
        self.timeout: float = kwargs.get("socket_timeout") or 0.0

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused there
        return _PatientPipeline(self, transaction)  # type: ignore[abstract]

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except retries.PASSING as e:
            if kwargs.get("target_nodes") is not None:
                raise
            retry = super().execute_command
            return await retries.wait_out(lambda: retry(*args, **kwargs), e, self.budget)


class _PatientPipeline(ClusterPipeline):
    """redis-py's cluster pipeline tries again on a node's silence too (as many times as
    fill the budget with its 0.25 s pauses, each try waiting up to the timeout): bounded
    as a whole by the budget and one timeout, as the hot path's calls are."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        client = cast(PatientCluster, self.cluster_client)
        bound = client.budget + client.timeout
        try:
            async with asyncio.timeout(bound):
                return await super().execute(raise_on_error, allow_redirections)
        except TimeoutError as e:  # asyncio's: Redis's own passes through
            raise RedisTimeoutError(f"the Redis Cluster did not answer within {bound:g} s") from e


def _cluster(settings: Settings) -> RedisCluster:
    nodes = [ClusterNode(host, port) for host, port in _startup_nodes(settings)]
    return PatientCluster(
        startup_nodes=nodes,
        max_connections=64,
        budget=settings.redis_cluster_retry_seconds,
        **{
            "socket_timeout": settings.redis_timeout_seconds,
            "socket_connect_timeout": settings.redis_timeout_seconds,
            **_client_options(settings),
        },
    )
