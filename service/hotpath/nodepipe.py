"""The calls to one Redis server: each turn's calls written as one buffer to one of a few
long-lived connections (service/hotpath/connection.py), a watchdog for silent ones, and the
calls followed by WAIT on connections of their own."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any, cast

from redis.exceptions import ConnectionError, RedisError, TimeoutError

from service.hotpath.connection import REPLY_TIMEOUT, Connection, dial, keep
from service.hotpath.joined import MOST, Part, join, split
from service.hotpath.loops import KeptLoop

# Connections per Redis server: enough to keep Redis busy while one buffer is in flight.
CONNECTIONS = 2
# How often, at most, a node's connections are checked for silence (a quarter of the
# timeout when that is shorter): a silent call fails at most this late.
WATCHDOG_TICK = 1.0

_ASKING = b"*1\r\n$6\r\nASKING\r\n"

# Commands to send right behind a call, in the same write: as they are, or made for the node
# the call goes to (each time it is sent: a call redirected by a failover reaches another).
Then = tuple[bytes, ...] | Callable[["NodePipe"], tuple[bytes, ...]]


class NodePipe:
    """The calls to one Redis server: each turn's calls in one write, on a few connections."""

    def __init__(
        self,
        options: dict[str, Any],
        *,
        select: bool = True,
        waits: bool = False,
        timeout: float = REPLY_TIMEOUT,
        wait_timeout: float = REPLY_TIMEOUT,
    ) -> None:
        self._options = options
        self._select = select
        # How long a call waits for its reply; a call followed by WAIT, this plus WAIT's own.
        self._timeout = timeout
        self._wait_timeout = wait_timeout
        # WAIT blocks its connection, and every call queued behind it, until the replicas
        # answer: calls followed by one have connections of their own (made when needed).
        self._waits = waits
        self._wait_pipe: NodePipe | None = None
        self._connections: list[Connection | None] = [None] * CONNECTIONS
        self._connecting: list[asyncio.Future[Connection] | None] = [None] * CONNECTIONS
        self._turn = itertools.cycle(range(CONNECTIONS))
        self._queue: list[bytes] = []
        self._futures: list[asyncio.Future[Any]] = []
        # This turn's calls that may go joined (service/hotpath/joined.py), by group.
        self._parts: dict[tuple[str, str], tuple[list[Part], list[asyncio.Future[Any]]]] = {}
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop = KeptLoop()  # the loop the pipe is used on

    def submit(self, payload: bytes, then: Then = ()) -> asyncio.Future[Any]:
        """Queue one command (already in RESP) with the others of this turn; its reply.
        With `then` (more commands), all go in the same write on the same connection and
        the reply is the pair of the first and last replies (see _pair)."""
        if callable(then):
            then = then(self)
        if then and not self._waits:
            return self._for_waits().submit(payload, then)
        loop = self._loop.running()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue and not self._parts:
            loop.call_soon(self._flush)  # after every caller ready in this turn has queued
        self._queue.append(payload)
        self._futures.append(future)
        return _pair(self, future, then) if then else future

    def submit_part(self, part: Part) -> asyncio.Future[Any]:
        """Queue a call that goes joined with the others of its group queued in this turn
        (one call of the batch script), or alone when it has none; its own reply."""
        loop = self._loop.running()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue and not self._parts:
            loop.call_soon(self._flush)
        group = self._parts.get(part.group)
        if group is None:
            self._parts[part.group] = ([part], [future])
        else:
            group[0].append(part)
            group[1].append(future)
        return future

    def submit_asking(self, payload: bytes, then: Then = ()) -> asyncio.Future[Any]:
        """The command after ASKING, in the same write: ASKING holds for the next command
        of the connection only."""
        if callable(then):
            then = then(self)
        if then and not self._waits:
            return self._for_waits().submit_asking(payload, then)
        loop = self._loop.running()
        asking: asyncio.Future[Any] = loop.create_future()
        asking.cancel()  # its +OK is skipped, and nobody waits for it
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue and not self._parts:
            loop.call_soon(self._flush)
        self._queue += (_ASKING, payload)
        self._futures += (asking, future)
        return _pair(self, future, then) if then else future

    @property
    def options(self) -> dict[str, Any]:
        return self._options

    def _for_waits(self) -> NodePipe:
        if self._wait_pipe is None:
            self._wait_pipe = NodePipe(
                self._options, select=self._select, waits=True, timeout=self._wait_timeout
            )
        return self._wait_pipe

    def queue_after(self, then: bytes) -> asyncio.Future[Any]:
        """One more command right behind the last queued one (same write, same connection:
        a turn's queue is flushed as one buffer to one connection)."""
        future: asyncio.Future[Any] = self._loop.running().create_future()
        self._queue.append(then)
        self._futures.append(future)
        return future

    def _flush(self) -> None:
        # Called soon after a submit, on that submit's loop: the kept one.
        loop = self._loop.running()
        if self._parts:
            self._join(loop)
        payload, futures = b"".join(self._queue), self._futures
        self._queue, self._futures = [], []
        slot = next(self._turn)
        connection = self._connections[slot]
        now = loop.time()
        if connection is not None and connection.transport is not None:
            connection.send(payload, futures, now)
        else:
            keep(asyncio.ensure_future(self._send_when_connected(slot, payload, futures, now)))

    def _join(self, loop: asyncio.AbstractEventLoop) -> None:
        """Each group's parts into the queue: alone as they are, several as joined calls."""
        for parts, futures in self._parts.values():
            if len(parts) == 1:
                self._queue.append(parts[0].single)
                self._futures.append(futures[0])
                continue
            for start in range(0, len(parts), MOST):
                self._queue.append(join(parts[start : start + MOST]))
                self._futures.append(split(futures[start : start + MOST], loop))
        self._parts = {}

    async def _send_when_connected(
        self, slot: int, payload: bytes, futures: list[asyncio.Future[Any]], since: float
    ) -> None:
        """Send once connected; the calls' wait counts from `since` (when they were
        flushed): connecting and the reply share one timeout."""
        try:
            connection = await self._connect(slot)
        except Exception as e:
            # Silence (a connect or a handshake that hung) is not tried again; a refusal is.
            error: RedisError = (
                TimeoutError(f"Redis did not answer within {self._timeout:g} s")
                if isinstance(e, asyncio.TimeoutError)
                else ConnectionError(f"cannot reach Redis: {e!r}")
            )
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            return
        connection.send(payload, futures, since)

    async def _connect(self, slot: int) -> Connection:
        pending = self._connecting[slot]
        if pending is None:
            pending = self._connecting[slot] = asyncio.ensure_future(self._open(slot))
            pending.add_done_callback(lambda _: self._connecting.__setitem__(slot, None))
        return await asyncio.shield(pending)

    async def _open(self, slot: int) -> Connection:
        connection = await dial(self._options, select=self._select, timeout=self._timeout)
        self._connections[slot] = connection
        self._arm_watchdog()
        return connection

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            tick = min(WATCHDOG_TICK, self._timeout / 4)
            self._watchdog = asyncio.get_running_loop().call_later(tick, self._check)

    def _check(self) -> None:
        self._watchdog = None
        now = asyncio.get_running_loop().time()
        for connection in self._connections:
            if (
                connection is not None
                and connection.transport
                and connection.overdue(now, self._timeout)
            ):
                connection.silent(self._timeout)  # its callers get TimeoutError
        if any(c is not None and c.transport is not None for c in self._connections):
            self._arm_watchdog()

    def close(self) -> None:
        for connection in self._connections:
            if connection is not None:
                connection.close()
        if self._wait_pipe is not None:
            self._wait_pipe.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


def _pair(
    node: NodePipe, first: asyncio.Future[Any], then: tuple[bytes, ...]
) -> asyncio.Future[Any]:
    """The replies of the command queued last and of the last of `then`, queued right
    behind it: one future for both, failed with the first error among them."""
    others = [node.queue_after(command) for command in then]
    both: asyncio.Future[Any] = node._loop.running().create_future()

    def settle(_: asyncio.Future[Any]) -> None:
        for future in (first, *others):  # every exception retrieved, whatever the outcome
            if not future.cancelled():
                future.exception()
        if both.done():
            return
        for future in (first, *others):
            if future.cancelled():
                both.cancel()
                return
            if future.exception() is not None:
                both.set_exception(cast(BaseException, future.exception()))
                return
        both.set_result((first.result(), others[-1].result()))

    # Replies come in order: the last settles last (a lost connection fails them all).
    others[-1].add_done_callback(settle)
    return both
