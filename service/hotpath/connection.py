"""One connection to a Redis node, as the hot path speaks to it: commands written in the
Redis protocol (RESP) by hand, replies parsed by hiredis and each handed to the oldest
waiting future straight from the protocol's data callback; dialling (AUTH, SELECT), and a
question asked on a connection of its own. service/hotpath/nodepipe.py batches calls onto
these connections, service/hotpath/soldout.py builds its subscriptions on them."""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Iterable
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from service.core import retries

# The default of how long a call waits for its reply (BOXOFFICE_REDIS_TIMEOUT_SECONDS):
# a connection whose oldest call waited that long is silent (Redis or the network hangs).
# Its calls fail with TimeoutError, and the connection is aborted (a reset: a server that
# comes back drops what it had not read yet); the next call dials a new one. On a single
# node nothing sends a silent call again: a request waits out a hung server once, then
# answers 503. On a cluster, see ScriptPipe.execute.
REPLY_TIMEOUT = retries.TIMEOUT_SECONDS


def bulk(*parts: bytes) -> bytes:
    """Arguments in the Redis protocol (RESP bulk strings), to go after a command's head."""
    return b"".join([b"$%d\r\n%s\r\n" % (len(part), part) for part in parts])


def bulk_values(values: Iterable[str | bytes | int]) -> bytes:
    """bulk() of the values a script takes: text as UTF-8, a number in decimal. A loop
    rather than bulk(*generator): a hold encodes a dozen of them, and this is twice as fast."""
    out = []
    for value in values:
        if not isinstance(value, bytes):
            value = value.encode() if isinstance(value, str) else str(value).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(out)


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

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


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
            connection.close()
            raise
    return connection


async def ask_once(options: dict[str, Any], *parts: bytes, wait: float) -> Any:
    """One command on a connection of its own, closed after the reply."""
    connection = await dial(options, select=False, timeout=wait)
    try:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        connection.send(command(*parts), [future], loop.time())
        return await asyncio.wait_for(future, wait)
    finally:
        connection.close()


def keep(task: asyncio.Future[None]) -> None:
    """Hold on to a task until it ends: the event loop references tasks only weakly, and
    could drop one (a send waiting for its connection, a refresh of the slot table)."""
    _pending.add(task)
    task.add_done_callback(_pending.discard)


_pending: set[asyncio.Future[None]] = set()
