"""Every event id PostgreSQL has, known to each API process: a request for an id that no
event has is answered `404` without a PostgreSQL query.

Only a request that Redis cannot serve (the event is not loaded) asks here, before the
query that would load the event. The set is read from PostgreSQL once the process is
subscribed to the channel on which every create announces its id (after its PostgreSQL
commit, before its load into Redis), so that no create falls between the read and the
messages. Nothing is taken on trust: whenever the subscription is (re)confirmed (redis-py
reconnects a lost subscriber connection by itself, and says so with a new `subscribe`
confirmation) or a PING goes unanswered, messages may have been missed, and until the set
is read again an id it lacks is looked up by reading it again: one read at a time, at most
one every RELOAD_SECONDS per process, however many requests wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from service.core import errors
from service.core.db import events
from service.core.keys import EVENT_CREATED

if TYPE_CHECKING:
    from service.hotpath.context import Services

log = logging.getLogger("boxoffice.eventids")

# The subscriber connection is pinged this often; no answer by the next ping: lost.
PING_SECONDS = 1.0
# While the set may lack ids, it is read again at most this often.
RELOAD_SECONDS = 1.0
# After the subscription failed: tried again after this long.
RESUBSCRIBE_SECONDS = 1.0
# Of the requests for ids the complete set lacks, how many a second may still go the
# usual way (a script call: Redis has every loaded event), in case the id's announcement
# is on its way to this process; the rest are answered 404 at once.
LOOKUPS_PER_SECOND = 20


class EventIds:
    """This process's set of event ids. Not started (a worker, the command line, a test's
    own Services), it knows nothing and every id is looked up in PostgreSQL as before."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        # Subscribed, and the set read since the subscription was confirmed: complete.
        self.fresh = False
        self._follower: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[None] | None = None
        self._read_at = -RELOAD_SECONDS  # time.monotonic() of the last read begun
        self.reads = 0  # reads of the whole set (for tests and logs)
        self._read_ok = False  # whether the last read of the set succeeded
        # The lookups' budget: LOOKUPS_PER_SECOND, refilled each second.
        self._second = 0
        self._lookups = 0

    def start(self, svc: Services) -> None:
        """In the API process, once svc.redis is final (Services.start)."""
        self._follower = asyncio.get_running_loop().create_task(self._follow(svc))

    async def close(self) -> None:
        for task in (self._follower, self._reading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._follower = self._reading = None
        self.fresh = False

    def add(self, event_id: str) -> None:
        self._ids.add(event_id)

    def surely_unknown(self, event_id: str) -> bool:
        """Before any Redis call (no await): True when the request may be answered 404 at
        once. An id announced a moment ago may not have reached this process yet, so a few
        requests a second for ids the set lacks still go the usual way (Redis has the
        event if it is loaded; if not, may_exist answers without PostgreSQL)."""
        if not self.fresh or event_id in self._ids:
            return False
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._lookups = second, 0
        self._lookups += 1
        return self._lookups > LOOKUPS_PER_SECOND

    async def may_exist(self, svc: Services, event_id: str) -> bool:
        """False only when PostgreSQL surely has no such event."""
        if self._follower is None or event_id in self._ids:
            return True
        if self.fresh:
            return False
        await self._read_again(svc)
        # A set PostgreSQL did not give (it is away): the caller's own query says so.
        return event_id in self._ids or not self._read_ok

    async def wait_fresh(self, within: float) -> bool:
        """For tests and start-up checks: whether the set became complete in time."""
        deadline = time.monotonic() + within
        while not self.fresh and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.fresh

    # --- the whole set, read from PostgreSQL ------------------------------------------

    async def _read_again(self, svc: Services) -> None:
        """Join the read in progress, or begin one unless one began within RELOAD_SECONDS
        (then the set stays as it is: the bound holds whatever the flood)."""
        task = self._reading
        if task is None or task.done():
            if time.monotonic() - self._read_at < RELOAD_SECONDS:
                return
            task = self._reading = asyncio.get_running_loop().create_task(self._read(svc))
        with contextlib.suppress(Exception):  # then _read_ok says so
            await asyncio.shield(task)

    async def _read(self, svc: Services) -> None:
        self._read_at = time.monotonic()
        self.reads += 1
        self._read_ok = False
        async with svc.engine.connect() as conn:
            ids = (await conn.execute(sa.select(events.c.id))).scalars().all()
        self._ids.update(ids)
        self._read_ok = True

    # --- the subscription -------------------------------------------------------------

    async def _follow(self, svc: Services) -> None:
        while True:
            try:
                await self._subscribed(svc)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.fresh = False
                errors.log_failure(log, "event id subscriber", e)
                await asyncio.sleep(RESUBSCRIBE_SECONDS)

    async def _subscribed(self, svc: Services) -> None:
        pubsub = svc.redis.pubsub()
        try:
            await pubsub.subscribe(EVENT_CREATED)
            answered, pinged = True, time.monotonic()
            while True:
                message = await pubsub.get_message(timeout=PING_SECONDS)
                if message is not None:
                    answered = await self._on_message(svc, message) or answered
                if time.monotonic() - pinged >= PING_SECONDS:
                    if not answered:
                        raise ConnectionError("no answer to PING on the event id channel")
                    answered, pinged = False, time.monotonic()
                    await pubsub.ping()
        finally:
            self.fresh = False
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _on_message(self, svc: Services, message: dict[str, Any]) -> bool:
        """Handle one message; True when it answers a PING."""
        kind = message.get("type")
        if kind == "message":
            self._ids.add(_text(message["data"]))
        elif kind == "subscribe":
            # (Re)subscribed: whatever was published meanwhile is read from PostgreSQL;
            # what is published from now on waits in the socket for the read to end.
            self.fresh = False
            task = self._reading = asyncio.get_running_loop().create_task(self._read(svc))
            await task
            self.fresh = True
        elif kind == "pong":
            return True
        return False


def _text(data: Any) -> str:
    return data.decode() if isinstance(data, bytes) else str(data)
