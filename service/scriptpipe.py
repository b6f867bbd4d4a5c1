"""The hot path's own Redis connections: script calls written in batches, replies matched
in order.

Every hold, confirm and release is one EVALSHA. Through a general-purpose client each pays
for a pool checkout, building the command argument by argument, a write, a read and a task
wake-up, and on two cores that costs as much as all of HTTP. Here the calls that arrive in
one turn of the event loop are written to one of a few long-lived connections as one
buffer, the constant head of each command (script, key count, the event's keys, the common
arguments) is encoded once per event, and each reply settles its caller's future straight
from the protocol's data callback: one call's failure is only ever its own.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import ssl
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.connection import parse_url
from redis.exceptions import ConnectionError, ResponseError

# Connections per process: enough to keep Redis busy while one buffer is in flight.
CONNECTIONS = 2
# A reply slower than this means Redis (or the network) is stuck: the connection is closed
# and its calls fail (retried by the caller when safe: every script is).
REPLY_TIMEOUT = 5.0


def bulk(*parts: bytes) -> bytes:
    """Arguments in the Redis protocol (RESP bulk strings), to go after a command's head."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def command(*parts: bytes) -> bytes:
    """One command in the Redis protocol (RESP)."""
    return b"*%d\r\n" % len(parts) + bulk(*parts)


class _Connection(asyncio.Protocol):
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

    def overdue(self, now: float) -> bool:
        return bool(self.waiting) and now - self.waiting[0][1] > REPLY_TIMEOUT


class ScriptPipe:
    def __init__(self, url: str) -> None:
        self._options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._connections: list[_Connection | None] = [None] * CONNECTIONS
        self._connecting: list[asyncio.Future[_Connection] | None] = [None] * CONNECTIONS
        self._turn = itertools.cycle(range(CONNECTIONS))
        self._queue: list[bytes] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._watchdog: asyncio.TimerHandle | None = None

    async def call(self, payload: bytes) -> Any:
        """Send one command (already in RESP) with the others of this turn; its reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)  # after every caller ready in this turn has queued
        self._queue.append(payload)
        self._futures.append(future)
        return await future

    def _flush(self) -> None:
        payload, futures = b"".join(self._queue), self._futures
        self._queue, self._futures = [], []
        slot = next(self._turn)
        connection = self._connections[slot]
        if connection is not None and connection.transport is not None:
            connection.send(payload, futures, asyncio.get_running_loop().time())
        else:
            task = asyncio.ensure_future(self._send_when_connected(slot, payload, futures))
            _pending.add(task)
            task.add_done_callback(_pending.discard)

    async def _send_when_connected(
        self, slot: int, payload: bytes, futures: list[asyncio.Future[Any]]
    ) -> None:
        try:
            connection = await self._connect(slot)
        except Exception as e:
            for future in futures:
                if not future.done():
                    future.set_exception(ConnectionError(f"cannot reach Redis: {e!r}"))
            return
        connection.send(payload, futures, asyncio.get_running_loop().time())

    async def _connect(self, slot: int) -> _Connection:
        pending = self._connecting[slot]
        if pending is None:
            pending = self._connecting[slot] = asyncio.ensure_future(self._open(slot))
            pending.add_done_callback(lambda _: self._connecting.__setitem__(slot, None))
        return await asyncio.shield(pending)

    async def _open(self, slot: int) -> _Connection:
        loop = asyncio.get_running_loop()
        o = self._options
        connection = _Connection()
        if "path" in o:
            await loop.create_unix_connection(lambda: connection, o["path"])
        else:
            tls = ssl.create_default_context() if "SSL" in str(o.get("connection_class")) else None
            await asyncio.wait_for(
                loop.create_connection(lambda: connection, o["host"], o.get("port", 6379), ssl=tls),
                REPLY_TIMEOUT,
            )
        handshake = []
        if o.get("password"):
            auth = [o["username"]] if o.get("username") else []
            handshake.append(command(b"AUTH", *(p.encode() for p in [*auth, o["password"]])))
        if o.get("db"):
            handshake.append(command(b"SELECT", str(o["db"]).encode()))
        futures = [loop.create_future() for _ in handshake]
        if futures:
            connection.send(b"".join(handshake), futures, loop.time())
            await asyncio.wait_for(asyncio.gather(*futures), REPLY_TIMEOUT)
        self._connections[slot] = connection
        self._arm_watchdog()
        return connection

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(1.0, self._check)

    def _check(self) -> None:
        self._watchdog = None
        now = asyncio.get_running_loop().time()
        for connection in self._connections:
            if connection is not None and connection.transport and connection.overdue(now):
                connection.transport.abort()  # its callers get ConnectionError
        if any(c is not None and c.transport is not None for c in self._connections):
            self._arm_watchdog()

    def close(self) -> None:
        for connection in self._connections:
            if connection is not None and connection.transport is not None:
                connection.transport.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


# Sends waiting for a connection: referenced so that the event loop does not drop them.
_pending: set[asyncio.Future[None]] = set()
