"""Expiry, the fast and the backstop layers (the lazy one is in every script):

- the listener hears Redis delete a hold's TTL key (a keyspace `expired` event) and
  reclaims that event's overdue holds at once;
- the sweeper reclaims every event's overdue holds every couple of seconds, on one worker
  at a time, because pub/sub loses whatever is sent while no listener is subscribed.

Reclaiming is idempotent, whichever layer gets there first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.exceptions
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ResponseError
from redis.keyspace_notifications import KeyeventChannel

from service.core import errors, retries
from service.core.keys import SWEEPER_LOCK, event_keys, parse_hold_ttl
from service.durable.live import live_event_ids, reclaim_all
from service.hotpath.context import RedisClient, Services, execute_timed

log = logging.getLogger("boxoffice.expiry")

# Keyevent notifications (E) of expired keys (x); `A` includes x.
NEEDED_FLAGS = "Ex"
# Redis sends "expired" when it deletes the key, not when the TTL runs out: with thousands
# of TTL keys its sampling can be over a second late. The listener therefore also looks at
# each event's earliest deadline this often.
WATCH_SECONDS = 0.25


async def sweep(svc: Services) -> None:
    for event_id in await live_event_ids(svc):
        await reclaim_all(svc, event_id)


async def overdue_events(svc: Services) -> set[str]:
    """Events whose earliest hold deadline has passed (one pipelined round trip)."""
    event_ids = await live_event_ids(svc)
    pipe = svc.redis.pipeline(transaction=False)
    for event_id in event_ids:
        pipe.zrange(event_keys(event_id).deadlines, 0, 0, withscores=True)
    now, firsts = await execute_timed(svc.redis, pipe)
    return {e for e, first in zip(event_ids, firsts, strict=True) if first and first[0][1] <= now}


def _notifications_on(flags: str) -> bool:
    return "E" in flags and ("x" in flags or "A" in flags)


async def _flags(client: Redis | RedisCluster, node: ClusterNode | None = None) -> str:
    extra: dict[str, Any] = {} if node is None else {"target_nodes": node}
    config = await client.config_get("notify-keyspace-events", **extra)
    return str(next(iter(config.values()), ""))


async def notifications_enabled(client: RedisClient) -> bool:
    """On a cluster: on every primary (each sends the events of its own keys only)."""
    nodes = client.get_primaries() if isinstance(client, RedisCluster) else [None]
    try:
        return all([_notifications_on(await _flags(client, node)) for node in nodes])
    except ResponseError:  # CONFIG disabled or renamed: cannot tell
        return False


async def enable_notifications(client: RedisClient) -> bool:
    """Add the flags the listener needs to those already set, never removing any. On a
    cluster on every node, replicas too: a replica promoted by a failover has them."""
    if not isinstance(client, RedisCluster):
        return await _enable(client)
    enabled = True
    for node in client.get_nodes():
        try:
            enabled = await _enable(client, node) and enabled
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            # a node away (a dead primary, a replica): tried again when the primaries change
            log.warning("cannot enable keyspace notifications on %s: %r", node.name, e)
    return enabled


async def _enable(client: Redis | RedisCluster, node: ClusterNode | None = None) -> bool:
    extra: dict[str, Any] = {} if node is None else {"target_nodes": node}
    try:
        flags = await _flags(client, node)
        if not _notifications_on(flags):
            await client.config_set("notify-keyspace-events", flags + NEEDED_FLAGS, **extra)
    except ResponseError as e:
        log.warning("cannot enable keyspace notifications (%s): relying on the sweeper", e)
        return False
    return True


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Listener:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.subscribed = asyncio.Event()  # set while subscribed
        self.subscriptions = 0  # how many times it (re)subscribed
        db = svc.redis.get_connection_kwargs().get("db") or 0
        self.channel = f"__keyevent@{db}__:expired"

    async def run(self, stop: asyncio.Event) -> None:
        backoff = retries.forever()
        while not stop.is_set():
            try:
                await self._listen(stop)
                backoff.reset()
            except Exception as e:
                again = f"again in {backoff.upcoming:.1f}s"
                errors.log_failure(log, f"expiry listener stopped, {again}", e)
            finally:
                self.subscribed.clear()
            await _wait(stop, backoff.next() or retries.LOOP_CAP)

    async def _listen(self, stop: asyncio.Event) -> None:
        if isinstance(self.svc.redis, RedisCluster):
            await self._listen_cluster(stop, self.svc.redis)
            return
        # A client of its own, without the pool's silent reconnects: a dropped connection
        # must surface here, because the events sent meanwhile are lost and need a sweep.
        client = Redis.from_url(self.svc.settings.redis_url)
        try:
            await enable_notifications(client)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(self.channel)

            async def expired(wait: float) -> str | None:
                message = await pubsub.get_message(timeout=wait)
                return None if message is None else str(message["data"].decode())

            await self._serve(stop, expired)
        finally:
            await client.aclose()

    async def _listen_cluster(self, stop: asyncio.Event, cluster: RedisCluster) -> None:
        """Each primary sends the events of its own keys: subscribed on every primary, and
        on the new ones after a failover (their events sent before that were lost: the
        overdue watch and a sweep find them)."""
        await enable_notifications(cluster)
        notifications = cluster.keyspace_notifications(ignore_subscribe_messages=True)
        primaries = {node.name for node in cluster.get_primaries()}
        try:
            await notifications.subscribe(KeyeventChannel("expired", db=0))

            async def expired(wait: float) -> str | None:
                nonlocal primaries
                now = {node.name for node in cluster.get_primaries()}
                if now != primaries:
                    log.info("expiry listener: primaries now %s", ", ".join(sorted(now)))
                    await enable_notifications(cluster)
                    await notifications.refresh_subscriptions()  # type: ignore[no-untyped-call]
                    primaries = now
                    await sweep(self.svc)
                message = await notifications.get_message(timeout=wait)
                return None if message is None else str(message.key)

            await self._serve(stop, expired)
        finally:
            await notifications.aclose()  # type: ignore[no-untyped-call]

    async def _serve(
        self, stop: asyncio.Event, expired: Callable[[float], Awaitable[str | None]]
    ) -> None:
        """Reclaim the events whose hold keys expire (`expired` gives one key, or None
        after waiting that long), and those whose earliest deadline has passed."""
        self.subscribed.set()
        self.subscriptions += 1
        await sweep(self.svc)
        loop = asyncio.get_running_loop()
        next_watch = loop.time() + WATCH_SECONDS
        while not stop.is_set():
            key = await expired(WATCH_SECONDS)
            due: set[str] = set()
            while key is not None:
                parsed = parse_hold_ttl(key)
                if parsed is not None:
                    due.add(parsed[0])
                key = await expired(0)
            if loop.time() >= next_watch:
                due |= await overdue_events(self.svc)
                next_watch = loop.time() + WATCH_SECONDS
            for event_id in due:  # one reclaim per event, however many holds ran out
                await reclaim_all(self.svc, event_id)


class Sweeper:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        interval = svc.settings.sweep_interval_seconds
        # A sweeper that dies lets another take over after three intervals at most.
        self.lock = svc.redis.lock(SWEEPER_LOCK, timeout=interval * 3, blocking=False)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if await self._lead():
                    await sweep(self.svc)
            except Exception as e:
                errors.log_failure(log, "sweep failed", e)
            await _wait(stop, self.svc.settings.sweep_interval_seconds)
        with contextlib.suppress(Exception):
            await self.lock.release()

    async def _lead(self) -> bool:
        if await self.lock.owned():
            return bool(await self.lock.reacquire())
        return bool(await self.lock.acquire(blocking=False))
