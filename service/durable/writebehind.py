"""The write-behind worker: outbox streams in Redis -> bookings in PostgreSQL.

At-least-once delivery (a consumer group; XACK only after the commit) plus idempotent
writes (service/durable/bookingrows.py) give an exactly-once effect.

Failures are told apart by where they come from: an entry that cannot be converted to rows
is its own fault (dead-lettered at once), one PostgreSQL refuses is dead-lettered after
its attempts, and only a server that is away pauses the worker. A worker whose liveness
key has expired is dead: the others take over its entries at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

import msgspec
import redis.exceptions
from redis.asyncio import RedisCluster

from service.core import errors, retries
from service.core.keys import OUTBOX_GROUP, event_keys, worker_alive
from service.core.timefmt import now_ms
from service.durable import outbox
from service.durable.bookingrows import Poison, Rows, convert, write_rows
from service.durable.live import live_event_ids
from service.durable.outbox import Entry, our_group, stream_id, text
from service.hotpath.context import Services
from service.hotpath.scripts import LUA_DIR

log = logging.getLogger("boxoffice.writebehind")


# New events' streams are found, and dead workers' entries taken over, this often; idle
# consumers' entries claimed and the outbox trimmed this often.
DISCOVER_SECONDS = 1.0
MAINTAIN_SECONDS = 5.0
# Pause before an entry that failed is tried again.
RETRY_SECONDS = 0.5
# How often a worker refreshes its liveness key (it expires after worker_liveness_ms).
HEARTBEAT_SECONDS = 1.0
# On a cluster nothing blocks across streams: an empty read waits this long before the next.
CLUSTER_POLL_SECONDS = 0.05


class _Failures(msgspec.Struct):
    attempts: int = 0
    first_ms: int = 0


class WriteBehind:
    def __init__(self, svc: Services, consumer: str) -> None:
        self.svc = svc
        self.consumer = consumer
        self.settings = svc.settings
        self._streams: dict[str, str] = {}  # stream key -> event id
        self._failures: dict[bytes, _Failures] = defaultdict(_Failures)
        # After a failed batch, our own pending entries are read again before new ones.
        self._pending_first = True
        self._drop_consumer = svc.redis.register_script((LUA_DIR / "drop_consumer.lua").read_text())

    async def run(self, stop: asyncio.Event) -> None:
        heartbeat = asyncio.get_running_loop().create_task(self.heartbeat(stop))
        try:
            await self._loop(stop)
        finally:
            heartbeat.cancel()
            # Gone at once, rather than when it expires: another worker may tidy up now.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.svc.redis.delete(worker_alive(self.consumer)), 1)

    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Keep this worker's liveness key: while it exists, the entries pending to this
        consumer are this worker's; once it has expired, any other worker takes them."""
        key, ttl = worker_alive(self.consumer), self.settings.worker_liveness_ms
        failing = False
        while not stop.is_set():
            try:
                await self.svc.redis.set(key, b"1", px=ttl)
                failing = False
            except Exception as e:  # said once per outage; the write-behind says the rest
                if not failing:
                    errors.log_failure(log, "liveness key not refreshed", e)
                failing = True
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_discover = next_maintain = 0.0
        backoff = retries.forever()
        while not stop.is_set():
            try:
                if loop.time() >= next_discover:
                    await self.discover()
                    await self.reap()
                    next_discover = loop.time() + DISCOVER_SECONDS
                if loop.time() >= next_maintain:
                    await self.maintain()
                    next_maintain = loop.time() + MAINTAIN_SECONDS
                    # A reply lost on the way (a read that timed out and was re-sent) left
                    # entries pending to us that no read of new ones will return.
                    self._pending_first = True
                await self.step()
                backoff.reset()
            except Exception as e:
                if isinstance(e, redis.exceptions.ResponseError) and "UNBLOCKED" in str(e):
                    # A stream deleted while the read waited on it: its event was archived
                    # (lua/archive.lua, only once drained). Not an outage: no pause.
                    log.info("write-behind: %s (an archived event); finding the streams again", e)
                    self._streams.clear()
                    next_discover = 0.0
                    continue
                if isinstance(e, redis.exceptions.ResponseError) and "NOGROUP" in str(e):
                    # A stream or its group vanished (Redis flushed or restarted empty):
                    # finding the streams again creates the groups again.
                    log.warning("write-behind: %s; finding the outbox streams again", e)
                    self._streams.clear()
                    next_discover = 0.0
                    continue
                # Nothing unwritten was acknowledged, so nothing is lost: read our pending
                # entries again once Redis or PostgreSQL is back.
                again = f"retrying in {backoff.upcoming:.1f}s"
                errors.log_failure(log, f"write-behind paused, {again}", e)
                self._pending_first = True
                await backoff.pause()

    async def discover(self) -> None:
        """Find the outbox streams of new events and make sure our group exists on each;
        forget those of events no longer registered (archived: their streams are gone)."""
        registered = await live_event_ids(self.svc)
        for event_id in registered:
            if event_keys(event_id).outbox not in self._streams:
                await self._join(event_id)
        known = set(registered)
        for stream, event_id in list(self._streams.items()):
            if event_id not in known:
                del self._streams[stream]

    async def _join(self, event_id: str) -> bool:
        """Read the event's outbox from now on; False while the event is not loaded (its
        stream is made with the group only for an event Redis has: lua/join_outbox.lua)."""
        if await self.svc.scripts.call_event("join_outbox", event_id, OUTBOX_GROUP) != b"ok":
            return False
        self._streams[event_keys(event_id).outbox] = event_id
        return True

    async def step(self, wait: bool = True) -> int:
        """Read one batch, write it, acknowledge it. Returns how many entries it handled.
        With `wait`, a read that finds nothing new waits up to outbox_block_ms for some (a
        worker's loop); without, it returns at once (a drain: what is there now)."""
        if not self._streams:
            if wait:
                await asyncio.sleep(self.settings.outbox_block_ms / 1000)
            return 0
        pending = self._pending_first
        reply = await self._read("0" if pending else ">", wait)
        entries = [
            (self._streams[stream.decode()], entry_id, fields)
            for stream, messages in reply or []
            for entry_id, fields in messages
            if fields  # an entry trimmed while pending comes back empty
        ]
        if pending and not entries:
            self._pending_first = False
        await self.handle(entries)
        return len(entries)

    async def _read(self, start: str, wait: bool = True) -> list[Any]:
        """One batch from every stream: on a single node one XREADGROUP over them all; on a
        cluster one per stream (a command cannot span slots), sent together per node."""
        redis, count = self.svc.redis, self.settings.outbox_batch
        wait = wait and start != "0"  # the pending entries are there or not: no waiting
        if not isinstance(redis, RedisCluster):
            # Blocked less than the reply timeout, which would take the wait for silence.
            most = int(self.settings.redis_timeout_seconds * 500)
            block = min(self.settings.outbox_block_ms, most) if wait else None
            one: Any = await redis.xreadgroup(
                OUTBOX_GROUP, self.consumer, dict.fromkeys(self._streams, start), count, block
            )
            return list(one or [])
        pipe = redis.pipeline(transaction=False)
        for stream in self._streams:
            pipe.xreadgroup(OUTBOX_GROUP, self.consumer, {stream: start}, count=count)
        replies: list[Any] = await pipe.execute()
        reply: list[Any] = [one for r in replies for one in r or ()]
        if wait and not any(messages for _, messages in reply):
            await asyncio.sleep(CLUSTER_POLL_SECONDS)  # in place of the single node's block
        return reply

    async def handle(self, entries: list[Entry]) -> None:
        """Write and acknowledge entries. An entry that cannot be converted is
        dead-lettered at once, before PostgreSQL is asked anything: so every error the
        write raises afterwards comes from the database, and only the database's "not
        now" (errors.unavailable) pauses the worker. One that the event's catalog refuses
        (bookingrules) is dead-lettered at once too, the rest of its batch written."""
        good: list[Entry] = []
        rows: list[Rows] = []
        for entry in entries:
            try:
                rows.append(convert(entry))
            except Poison as e:
                await self._dead_letter(entry, str(e))
                continue
            good.append(entry)
        if not good:
            return
        try:
            refused = await self._write(rows)
        except Exception as e:
            if errors.unavailable(e):
                raise
            log.warning("batch of %d failed (%r); writing its entries one by one", len(good), e)
            await self._one_by_one(good, rows)
            return
        await self._settle(good, refused)

    async def _settle(self, entries: list[Entry], refused: list[str | None]) -> None:
        """After a commit: acknowledge what was written, dead-letter what was refused."""
        for entry, why in zip(entries, refused, strict=True):
            if why is not None:
                await self._dead_letter(entry, why)
        await self._ack([e for e, why in zip(entries, refused, strict=True) if why is None])

    async def _write(self, rows: list[Rows]) -> list[str | None]:
        try:
            async with self.svc.engine.begin() as conn:
                return await write_rows(conn, rows)
        except TimeoutError as e:  # a statement or a connection attempt: said plainly
            s = self.settings
            raise TimeoutError(
                "PostgreSQL did not answer in time (a statement may take"
                f" {s.database_command_timeout_seconds:g} s, connecting"
                f" {s.database_connect_timeout_seconds:g} s)"
            ) from e
        except Exception as e:  # the driver's own errors too: rows are copied through it
            if errors.unavailable(e):
                # A session keeps the settings it started with (read-only, for one): once
                # the set-up is fixed, only new connections see it. Retry on those.
                await self.svc.engine.dispose()
            raise

    async def _one_by_one(self, entries: list[Entry], rows: list[Rows]) -> None:
        """Isolate an entry PostgreSQL rejects so that the rest of its batch goes on."""
        retry = False
        for entry, row in zip(entries, rows, strict=True):
            try:
                refused = await self._write([row])
            except Exception as e:
                if errors.unavailable(e):
                    raise
                failures = self._failures[entry[1]]
                failures.attempts += 1
                failures.first_ms = failures.first_ms or now_ms()
                if failures.attempts >= self.settings.outbox_max_attempts:
                    await self._dead_letter(entry, repr(e))
                else:
                    retry = self._pending_first = True
                continue
            await self._settle([entry], refused)
        if retry:  # not at once: what failed may be passing
            await asyncio.sleep(RETRY_SECONDS)

    async def _dead_letter(self, entry: Entry, reason: str) -> None:
        event_id, entry_id, fields = entry
        keys = event_keys(event_id)
        failures = self._failures.pop(entry_id, None) or _Failures(1, now_ms())
        log.error(
            "outbox entry %s of %s moved to %s after %d attempt(s): %s",
            entry_id,
            event_id,
            keys.deadletter,
            failures.attempts,
            reason,
        )
        record = outbox.dead_letter(fields, entry_id, reason, failures.attempts, failures.first_ms)
        pipe = self.svc.redis.pipeline(transaction=True)
        pipe.xadd(keys.deadletter, record)
        pipe.xack(keys.outbox, OUTBOX_GROUP, entry_id)
        await pipe.execute()

    async def _ack(self, entries: list[Entry]) -> None:
        by_stream: dict[str, list[bytes]] = defaultdict(list)
        for event_id, entry_id, _ in entries:
            by_stream[event_keys(event_id).outbox].append(entry_id)
            self._failures.pop(entry_id, None)
        pipe = self.svc.redis.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.xack(stream, OUTBOX_GROUP, *ids)
        await pipe.execute()

    async def reap(self) -> None:
        """Take over at once what dead workers left pending (a worker is dead once its
        liveness key has expired), then forget the dead consumers that hold nothing."""
        streams = list(self._streams.items())
        pipe = self.svc.redis.pipeline(transaction=False)
        for stream, _ in streams:
            pipe.xinfo_consumers(stream, OUTBOX_GROUP)
        replies = await pipe.execute(raise_on_error=False)
        found = [
            (stream, event_id, text(c["name"]), int(c["pending"]))
            for (stream, event_id), reply in zip(streams, replies, strict=True)
            if not isinstance(reply, Exception)  # a stream flushed meanwhile: found again
            for c in reply
            if text(c["name"]) != self.consumer
        ]
        names = sorted({name for _, _, name, _ in found})
        if not names:
            return
        pipe = self.svc.redis.pipeline(transaction=False)
        for name in names:  # one EXISTS each: the keys lie in different cluster slots
            pipe.exists(worker_alive(name))
        alive = dict(zip(names, await pipe.execute(), strict=True))
        for stream, event_id, name, pending in found:
            if alive[name]:
                continue
            if pending:
                await self._take_over(stream, event_id, name)
            # Atomic with its check that nothing is pending to it: an entry that consumer
            # read a moment ago (a worker alive after all) is never dropped with it.
            await self._drop_consumer(
                keys=[stream], args=[OUTBOX_GROUP, name, self.settings.worker_liveness_ms]
            )

    async def _take_over(self, stream: str, event_id: str, consumer: str) -> None:
        while True:
            rows: Any = await self.svc.redis.xpending_range(
                stream, OUTBOX_GROUP, "-", "+", self.settings.outbox_batch, consumername=consumer
            )
            if not rows:
                return
            ids = [r["message_id"] for r in rows]
            claimed: Any = await self.svc.redis.xclaim(stream, OUTBOX_GROUP, self.consumer, 0, ids)
            log.warning("took over %d entries of dead worker %s", len(claimed), consumer)
            # Pending to us now: should the write fail, our pending entries are read again.
            await self.handle([(event_id, i, f) for i, f in claimed if f])
            if len(rows) < self.settings.outbox_batch:
                return

    async def drain(self, event_id: str) -> int:
        """Write and acknowledge everything in one event's outbox now, whoever held it:
        entries waiting for a worker and entries another consumer left pending. Returns
        how many entries it handled."""
        self._streams = {}
        if not await self._join(event_id):
            return 0  # not loaded: no outbox to drain
        handled = 0
        while True:
            claim: Any = await self.svc.redis.xautoclaim(
                event_keys(event_id).outbox,
                OUTBOX_GROUP,
                self.consumer,
                0,
                "0-0",
                count=self.settings.outbox_batch,
            )
            claimed = [(event_id, i, f) for i, f in claim[1] if f]
            await self.handle(claimed)
            self._pending_first = False
            read = await self.step(wait=False)
            handled += len(claimed) + read
            if not claimed and not read:
                await self._trim(event_keys(event_id).outbox)
                return handled

    async def maintain(self) -> None:
        """Claim the entries of dead consumers, and trim what every consumer acknowledged."""
        for stream, event_id in list(self._streams.items()):
            start = "0-0"
            while True:
                claim: Any = await self.svc.redis.xautoclaim(
                    stream,
                    OUTBOX_GROUP,
                    self.consumer,
                    self.settings.outbox_claim_idle_ms,
                    start,
                    count=self.settings.outbox_batch,
                )
                start, claimed = claim[0], claim[1]
                await self.handle([(event_id, i, f) for i, f in claimed if f])
                if start in (b"0-0", "0-0"):
                    break
            await self._trim(stream)

    async def _trim(self, stream: str) -> None:
        # The last delivered id first, then the pending entries: whatever another worker
        # reads in between lies above that id and is kept. Below both, every entry was
        # delivered and is no longer pending: acknowledged.
        try:
            groups: Any = await self.svc.redis.xinfo_groups(stream)
            floor = stream_id(our_group(groups)["last-delivered-id"])
            summary: Any = await self.svc.redis.xpending(stream, OUTBOX_GROUP)
        except redis.exceptions.ResponseError as e:
            # The stream went since it was read: its event was archived (lua/archive.lua,
            # only once drained) or Redis flushed. Nothing is left to trim, and the next
            # read finds the streams again.
            if "no such key" in str(e) or "NOGROUP" in str(e):
                return
            raise
        if summary["pending"]:
            floor = min(floor, stream_id(summary["min"]))
        await self.svc.redis.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=False)
