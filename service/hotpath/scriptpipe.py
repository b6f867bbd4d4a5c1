"""The hot path's own Redis connections: script calls written in batches, replies matched
in order, routed by slot on a Redis Cluster.

Every hold, confirm and release is one EVALSHA. Through a general-purpose client each pays
for a pool checkout, building the command argument by argument, a write, a read and a task
wake-up, and on two cores that costs as much as all of HTTP. Here the calls that arrive in
one turn of the event loop are written to one of a few long-lived connections as one
buffer, the constant head of each command (script, key count, the event's keys, the common
arguments) is encoded once per event, and each reply settles its caller's future straight
from the protocol's data callback: one call's failure is only ever its own.

On a cluster (found once, at the first call: `INFO cluster` of the URL's node) each primary
has such a pipe, and each call goes to the primary of its event's slot, computed once per
event beside the event's encoded keys. The cluster's own protocol is followed: `MOVED`
updates the slot table and resends there, `ASK` sends `ASKING` and the call in one write to
the named node, `TRYAGAIN` and `CLUSTERDOWN` back off, a lost connection refreshes the slot
table (`CLUSTER SLOTS` from any node that answers). All of this within a retry budget that
outlasts a slot migration or a failover; only then does the call fail.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import ssl
from collections.abc import Callable, Iterable
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.connection import parse_url
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    RedisError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from service.core import retries
from service.core.keys import event_keys
from service.core.settings import Address, parse_address, parse_seed_nodes

# Connections per Redis server: enough to keep Redis busy while one buffer is in flight.
CONNECTIONS = 2
# The default of how long a call waits for its reply (BOXOFFICE_REDIS_TIMEOUT_SECONDS):
# a connection whose oldest call waited that long is silent (Redis or the network hangs).
# Its calls fail with TimeoutError, and the connection is aborted (a reset: a server that
# comes back drops what it had not read yet); the next call dials a new one. On a single
# node nothing sends a silent call again: a request waits out a hung server once, then
# answers 503. On a cluster, see ScriptPipe.call.
REPLY_TIMEOUT = retries.TIMEOUT_SECONDS
# How often, at most, a node's connections are checked for silence (a quarter of the
# timeout when that is shorter): a silent call fails at most this late.
WATCHDOG_TICK = 1.0
# Events whose encoded keys and slot are kept: any event id reaches here (an unknown one
# too, before the script says so), so the memory must be bounded. ~1 KiB each.
EVENT_KEYS_CACHED = 8192
# How long and how a call waits out a failover or a migration: service/core/retries.py.
# Redirects followed at once before backing off: more means nodes disagree for now.
REDIRECTS_AT_ONCE = 3
# A node asked for the slot table and silent this long is skipped.
TOPOLOGY_TIMEOUT = 0.5
# Refreshes of the slot table closer together than this add nothing.
REFRESH_INTERVAL = 0.05

_ASKING = b"*1\r\n$6\r\nASKING\r\n"

# Commands to send right behind a call, in the same write: as they are, or made for the node
# the call goes to (each time it is sent: a call redirected by a failover reaches another).
Then = tuple[bytes, ...] | Callable[["_NodePipe"], tuple[bytes, ...]]


def bulk(*parts: bytes) -> bytes:
    """Arguments in the Redis protocol (RESP bulk strings), to go after a command's head."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def command(*parts: bytes) -> bytes:
    """One command in the Redis protocol (RESP)."""
    return b"*%d\r\n" % len(parts) + bulk(*parts)


class Connection(asyncio.Protocol):
    """One connection to a Redis node: replies parsed by hiredis, each handed to the oldest
    waiting future. service/hotpath/soldout.py builds its subscriptions on it."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, though they behave so.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future, _ = self.waiting.popleft()
            if future.done():
                continue
            if isinstance(reply, ResponseError):
                # The class redis-py gives the same reply (NoScriptError, BusyLoadingError
                # while Redis loads its dataset, ReadOnlyError, ...): callers and
                # errors.unavailable() tell them apart by class.
                future.set_exception(BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]
            elif isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        error = ConnectionError(f"Redis connection lost: {exc or 'closed'}")
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def send(self, payload: bytes, futures: list[asyncio.Future[Any]], now: float) -> None:
        assert self.transport is not None
        self.waiting.extend((f, now) for f in futures)
        self.transport.write(payload)

    def overdue(self, now: float, timeout: float) -> bool:
        return bool(self.waiting) and now - self.waiting[0][1] >= timeout

    def silent(self, timeout: float) -> None:
        """Fail every call waiting here (none of them will be answered in time) and reset
        the connection."""
        error = TimeoutError(f"Redis did not answer within {timeout:g} s")
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


async def dial(
    options: dict[str, Any],
    *,
    select: bool,
    protocol: type[Connection] = Connection,
    timeout: float = REPLY_TIMEOUT,  # noqa: ASYNC109 (the connect and the handshake each)
) -> Connection:
    """A connection to the server the options name, authenticated (and on its database),
    within `timeout` (else TimeoutError). `protocol`: a Connection of another kind
    (service/hotpath/soldout.py's subscriber)."""
    loop = asyncio.get_running_loop()
    o = options
    connection = protocol()
    if "path" in o:
        await loop.create_unix_connection(lambda: connection, o["path"])
    else:
        tls = ssl.create_default_context() if "SSL" in str(o.get("connection_class")) else None
        await asyncio.wait_for(
            loop.create_connection(lambda: connection, o["host"], o.get("port", 6379), ssl=tls),
            timeout,
        )
    handshake = []
    if o.get("password"):
        auth = [o["username"]] if o.get("username") else []
        handshake.append(command(b"AUTH", *(p.encode() for p in [*auth, o["password"]])))
    if select and o.get("db"):
        handshake.append(command(b"SELECT", str(o["db"]).encode()))
    futures = [loop.create_future() for _ in handshake]
    if futures:
        connection.send(b"".join(handshake), futures, loop.time())
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except BaseException:
            _close(connection)
            raise
    return connection


async def _ask(options: dict[str, Any], *parts: bytes, wait: float) -> Any:
    """One command on a connection of its own, closed after the reply."""
    connection = await dial(options, select=False, timeout=wait)
    try:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        connection.send(command(*parts), [future], loop.time())
        return await asyncio.wait_for(future, wait)
    finally:
        _close(connection)


def _close(connection: Connection) -> None:
    if connection.transport is not None:
        connection.transport.close()


class _NodePipe:
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
        self._wait_pipe: _NodePipe | None = None
        self._connections: list[Connection | None] = [None] * CONNECTIONS
        self._connecting: list[asyncio.Future[Connection] | None] = [None] * CONNECTIONS
        self._turn = itertools.cycle(range(CONNECTIONS))
        self._queue: list[bytes] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._watchdog: asyncio.TimerHandle | None = None

    def submit(self, payload: bytes, then: Then = ()) -> asyncio.Future[Any]:
        """Queue one command (already in RESP) with the others of this turn; its reply.
        With `then` (more commands), all go in the same write on the same connection and
        the reply is the pair of the first and last replies (see _pair)."""
        if callable(then):
            then = then(self)
        if then and not self._waits:
            return self._for_waits().submit(payload, then)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)  # after every caller ready in this turn has queued
        self._queue.append(payload)
        self._futures.append(future)
        return _pair(self, future, then) if then else future

    def submit_asking(self, payload: bytes, then: Then = ()) -> asyncio.Future[Any]:
        """The command after ASKING, in the same write: ASKING holds for the next command
        of the connection only."""
        if callable(then):
            then = then(self)
        if then and not self._waits:
            return self._for_waits().submit_asking(payload, then)
        loop = asyncio.get_running_loop()
        asking: asyncio.Future[Any] = loop.create_future()
        asking.cancel()  # its +OK is skipped, and nobody waits for it
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue += (_ASKING, payload)
        self._futures += (asking, future)
        return _pair(self, future, then) if then else future

    @property
    def options(self) -> dict[str, Any]:
        return self._options

    def _for_waits(self) -> _NodePipe:
        if self._wait_pipe is None:
            self._wait_pipe = _NodePipe(
                self._options, select=self._select, waits=True, timeout=self._wait_timeout
            )
        return self._wait_pipe

    def queue_after(self, then: bytes) -> asyncio.Future[Any]:
        """One more command right behind the last queued one (same write, same connection:
        a turn's queue is flushed as one buffer to one connection)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(then)
        self._futures.append(future)
        return future

    def _flush(self) -> None:
        payload, futures = b"".join(self._queue), self._futures
        self._queue, self._futures = [], []
        slot = next(self._turn)
        connection = self._connections[slot]
        now = asyncio.get_running_loop().time()
        if connection is not None and connection.transport is not None:
            connection.send(payload, futures, now)
        else:
            task = asyncio.ensure_future(self._send_when_connected(slot, payload, futures, now))
            _pending.add(task)
            task.add_done_callback(_pending.discard)

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
                _close(connection)
        if self._wait_pipe is not None:
            self._wait_pipe.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


def _pair(
    node: _NodePipe, first: asyncio.Future[Any], then: tuple[bytes, ...]
) -> asyncio.Future[Any]:
    """The replies of the command queued last and of the last of `then`, queued right
    behind it: one future for both, failed with the first error among them."""
    others = [node.queue_after(command) for command in then]
    both: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

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


# What a `then` callable is given: the node a call is sent to (its `options`).
NodePipe = _NodePipe


class _Cluster:
    """One pipe per primary, and the slot table that routes each call to one of them."""

    def __init__(
        self,
        options: dict[str, Any],
        startup: list[Address],
        retry_seconds: float,
        timeouts: tuple[float, float] = (REPLY_TIMEOUT, REPLY_TIMEOUT),
    ) -> None:
        self._options = options
        self._startup = startup
        self._retry_seconds = retry_seconds
        self._timeouts = timeouts  # a call's, and one followed by WAIT
        self._nodes: dict[Address, _NodePipe] = {}
        self.table: list[_NodePipe] = []
        self._replicas: list[Address] = []
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = float("-inf")
        # Asked first next time: a node that answered is likely to answer again, where a
        # hung one would cost the whole TOPOLOGY_TIMEOUT at every refresh.
        self._answered: list[Address] = []

    async def recover(self, payload: bytes, slot: int, error: RedisError, then: Then = ()) -> Any:
        """Follow redirections and wait out migrations and failovers, within the budget.
        A node silent for the timeout (TimeoutError) is taken for a failing one, as the
        cluster itself does after cluster-node-timeout: see ScriptPipe.call."""
        backoff = retries.Backoff(self._retry_seconds)
        redirects = 0
        while True:
            ask: _NodePipe | None = None
            back_off = True
            if isinstance(error, ConnectionError | TimeoutError):
                with contextlib.suppress(ConnectionError):
                    await self.refresh()
            elif isinstance(error, AskError):  # MovedError is one too
                node = self.node(parse_address(error.message.partition(" ")[2]))
                if isinstance(error, MovedError):
                    self.table[slot] = node
                    self.refresh_soon()  # a failover or a resharding moves more slots
                else:
                    ask = node
                redirects += 1
                back_off = redirects > REDIRECTS_AT_ONCE
            elif not isinstance(error, TryAgainError | ClusterDownError):
                raise error
            if back_off and not await backoff.pause():
                raise error
            try:
                if ask is not None:
                    return await ask.submit_asking(payload, then)
                return await self.table[slot].submit(payload, then)
            except (ResponseError, ConnectionError, TimeoutError) as e:
                error = e

    def node(self, address: Address) -> _NodePipe:
        node = self._nodes.get(address)
        if node is None:
            options = {**self._options, "host": address[0], "port": address[1]}
            timeout, wait_timeout = self._timeouts
            node = self._nodes[address] = _NodePipe(
                options, select=False, timeout=timeout, wait_timeout=wait_timeout
            )
        return node

    def refresh_soon(self) -> None:
        if self._refreshing is None:
            task = asyncio.ensure_future(self.refresh())
            _pending.add(task)
            task.add_done_callback(_pending.discard)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def refresh(self) -> None:
        """The slot table again, from the first node that answers (one refresh at a time,
        shared by every caller that asks for it meanwhile)."""
        if self._refreshing is None:
            if asyncio.get_running_loop().time() - self._refreshed_at < REFRESH_INTERVAL:
                return
            self._refreshing = asyncio.ensure_future(self._refresh())
            self._refreshing.add_done_callback(self._refreshed)
        await asyncio.shield(self._refreshing)

    def _refreshed(self, _: asyncio.Future[None]) -> None:
        self._refreshing = None
        self._refreshed_at = asyncio.get_running_loop().time()

    async def _refresh(self) -> None:
        routed = set(self.table)
        primaries = [address for address, node in self._nodes.items() if node in routed]
        errors = []
        candidates = [*self._answered, *primaries, *self._startup, *self._replicas]
        for address in dict.fromkeys(candidates):
            options = {**self._options, "host": address[0], "port": address[1]}
            try:
                ranges = await _ask(options, b"CLUSTER", b"SLOTS", wait=TOPOLOGY_TIMEOUT)
            except (OSError, RedisError) as e:  # TimeoutError is an OSError
                errors.append(f"{address[0]}:{address[1]}: {e!r}")
                continue
            if not ranges:
                errors.append(f"{address[0]}:{address[1]}: no slot assigned")
                continue
            self._apply(ranges, address[0])
            self._answered = [address]
            return
        raise ConnectionError("no node of the Redis Cluster answers: " + "; ".join(errors))

    def _apply(self, ranges: list[list[Any]], asked_host: str) -> None:
        def address(entry: list[Any]) -> Address:
            host = entry[0].decode()  # "" or "?" when the node does not know its own
            return (host if host not in ("", "?") else asked_host, int(entry[1]))

        table = list(self.table) or [self.node(address(ranges[0][2]))] * REDIS_CLUSTER_HASH_SLOTS
        replicas: list[Address] = []
        for first, last, primary, *others in ranges:
            node = self.node(address(primary))
            table[first : last + 1] = [node] * (last - first + 1)
            replicas.extend(address(other) for other in others)
        self.table = table
        self._replicas = replicas

    def close(self) -> None:
        for node in self._nodes.values():
            node.close()


class ScriptPipe:
    def __init__(
        self,
        url: str,
        seed_nodes: str = "",
        retry_seconds: float = retries.BUDGET_SECONDS,
        timeout: float = REPLY_TIMEOUT,
        wait_seconds: float = 0.0,
    ) -> None:
        """`timeout`: how long a call waits for its reply; `wait_seconds`: how much longer
        one followed by WAIT may (WAIT's own timeout)."""
        self._options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._seed_nodes = parse_seed_nodes(seed_nodes)
        self._retry_seconds = retry_seconds
        self._timeout = timeout
        self._timeouts = (timeout, timeout + wait_seconds)
        self._node: _NodePipe | None = None
        self._cluster: _Cluster | None = None
        self._detecting: asyncio.Future[None] | None = None
        # Ordered, so the oldest goes in O(1): next(iter(dict)) would walk past every slot
        # an eviction emptied since the dict last resized (thousands, with unknown ids).
        self._event_keys: collections.OrderedDict[str, tuple[bytes, int]] = (
            collections.OrderedDict()
        )

    def event_keys(self, event_id: str) -> tuple[bytes, int]:
        """The event's keys in RESP, and their slot: computed once per event."""
        entry = self._event_keys.get(event_id)
        if entry is None:
            keys = event_keys(event_id).all
            entry = (bulk(*keys), key_slot(keys[0]))
            if len(self._event_keys) >= EVENT_KEYS_CACHED:
                self._event_keys.popitem(last=False)  # the oldest
            self._event_keys[event_id] = entry
        return entry

    async def call(self, payload: bytes, slot: int = 0, then: Then = ()) -> Any:
        """Send one command (already in RESP) with the others of this turn; its reply. The
        slot (from event_keys()) routes it on a cluster. With `then`, more commands go right
        behind it, in the same write to the same connection (WAIT, which counts the
        replicas that have this connection's writes), and the reply is the pair of the
        first and the last replies; a redirected call is resent with its `then`."""
        node = self._node
        if node is None:
            cluster = self._cluster
            if cluster is None:
                await self._detect()
                return await self.call(payload, slot, then)
            # Inline rather than a method of the cluster: one coroutine less per call.
            # A failover is waited out (recover) within the cluster's retry budget, whether
            # the primary died (its connections refused or reset, then CLUSTERDOWN or MOVED)
            # or hangs: its calls are silent for the timeout, then sent again to whoever
            # the slot table names, until its replica has taken over (the cluster fails a
            # silent node over after cluster-node-timeout). Every script is safe to send
            # again. On a single node there is no replica to wait for: silence is final.
            try:
                return await cluster.table[slot].submit(payload, then)
            except (ResponseError, ConnectionError, TimeoutError) as e:
                return await cluster.recover(payload, slot, e, then)
        return await node.submit(payload, then)

    def options_for(self, slot: int) -> dict[str, Any] | None:
        """Where the calls of this slot go now (connection options), None until the first
        call has found out whether Redis is a cluster."""
        if self._node is not None:
            return self._options
        if self._cluster is not None and self._cluster.table:
            return self._cluster.table[slot].options
        return None

    @property
    def cluster(self) -> bool | None:
        """Whether Redis is a cluster; None until the first call has found out."""
        return None if self._node is None and self._cluster is None else self._cluster is not None

    async def _detect(self) -> None:
        if self._detecting is None:
            self._detecting = asyncio.ensure_future(self._find_mode())
            self._detecting.add_done_callback(lambda _: setattr(self, "_detecting", None))
        await asyncio.shield(self._detecting)

    async def _find_mode(self) -> None:
        """Single node or cluster, from the first start-up node that answers."""
        errors = []
        silent = True
        for options in self._startup_options():
            try:
                info: bytes = await _ask(options, b"INFO", b"cluster", wait=self._timeout)
            except (OSError, RedisError) as e:  # TimeoutError is an OSError
                errors.append(repr(e))
                silent = silent and isinstance(e, asyncio.TimeoutError)
                continue
            if b"cluster_enabled:1" not in info:
                timeout, wait_timeout = self._timeouts
                self._node = _NodePipe(self._options, timeout=timeout, wait_timeout=wait_timeout)
                return
            startup = [(o.get("host", ""), o.get("port", 6379)) for o in self._startup_options()]
            cluster = _Cluster(self._options, startup, self._retry_seconds, self._timeouts)
            await cluster.refresh()
            self._cluster = cluster
            return
        if silent:  # not tried again (a refusal is): each try would wait as long
            raise TimeoutError(f"Redis did not answer within {self._timeout:g} s")
        raise ConnectionError("cannot reach Redis: " + "; ".join(errors))

    def _startup_options(self) -> Iterable[dict[str, Any]]:
        yield self._options
        for host, port in self._seed_nodes:
            yield {**self._options, "host": host, "port": port}

    def close(self) -> None:
        if self._node is not None:
            self._node.close()
        if self._cluster is not None:
            self._cluster.close()


# Sends waiting for a connection: referenced so that the event loop does not drop them.
_pending: set[asyncio.Future[None]] = set()
