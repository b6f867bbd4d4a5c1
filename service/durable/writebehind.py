"""The write-behind worker: outbox streams in Redis -> bookings in PostgreSQL.

At-least-once delivery (a consumer group; XACK only after the commit) plus idempotent
writes (INSERT ... ON CONFLICT DO NOTHING on the booking id, cancellation as an UPDATE
that only moves confirmed to cancelled) give an exactly-once effect.

Failures are told apart by where they come from: an entry that cannot be converted to rows
is its own fault (dead-lettered at once), one PostgreSQL refuses is dead-lettered after
its attempts, and only a server that is away pauses the worker. A worker whose liveness
key has expired is dead: the others take over its entries at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.exceptions
from redis.asyncio import RedisCluster
from sqlalchemy.ext.asyncio import AsyncConnection

from service.core import bookingrules, errors, retries
from service.core.db import driver
from service.core.keys import OUTBOX_GROUP, event_keys, worker_alive
from service.core.records import BookingRecord
from service.core.timefmt import now_ms
from service.durable import outbox
from service.durable.live import live_event_ids
from service.hotpath.context import Services
from service.hotpath.scripts import LUA_DIR

_encode = msgspec.json.encode

log = logging.getLogger("boxoffice.writebehind")


Entry = tuple[str, bytes, dict[bytes, bytes]]  # (event id, stream entry id, fields)


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


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ts(ms: int | bytes) -> datetime:
    return datetime.fromtimestamp(int(ms) / 1000, UTC)


# Whole batches as arrays, one statement per table: a round trip and a plan per batch,
# however many rows, and no per-row work in the database driver.
_INSERT_BOOKINGS = """
INSERT INTO bookings (booking_id, event_id, hold_id, customer_id, status, total, currency,
                      payment_ref, seats, confirmed_at)
SELECT b, e, h, c, 'confirmed', t, cu, pr, ARRAY(SELECT jsonb_array_elements_text(s::jsonb)), ca
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::text[],
            $8::text[], $9::timestamptz[]) AS u(b, e, h, c, t, cu, pr, s, ca)
ON CONFLICT DO NOTHING
"""
_INSERT_ITEMS = """
INSERT INTO booking_items (booking_id, category, position, quantity, tickets)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::int4[], $5::int4[])
ON CONFLICT DO NOTHING
"""
# Only a confirmed booking becomes cancelled: a replayed cancellation changes nothing.
_CANCEL = """
UPDATE bookings SET status = 'cancelled', cancelled_at = u.at
FROM unnest($1::uuid[], $2::timestamptz[]) AS u(b, at)
WHERE booking_id = u.b AND status = 'confirmed'
"""


class Poison(Exception):
    """An outbox entry that can never be written as it is: its own fault, not a server's."""


class Rows(msgspec.Struct):
    """One entry as the rows of the batch statements (and a confirmation's record, for
    the catalog's check)."""

    booking: tuple[Any, ...] | None = None
    items: list[tuple[Any, ...]] = []
    cancel: tuple[Any, ...] | None = None
    event_id: str = ""
    record: BookingRecord | None = None


def _convert(fields: dict[bytes, bytes], event_id: str) -> Rows:
    change = outbox.decode(fields)
    if isinstance(change, outbox.Cancel):
        return Rows(cancel=(uuid.UUID(change.booking_id), _ts(change.at_ms)))
    b = change.booking
    if (why := bookingrules.shape(b)) is not None:
        raise ValueError(why)
    booking_id = uuid.UUID(b.id)
    booking = (
        booking_id,
        event_id,
        b.hold_id,
        b.customer_id,
        b.total_cents,
        b.currency,
        b.payment_ref,
        _encode(b.seats).decode(),
        _ts(b.created_ms),
    )
    asked = dict(b.items)
    order = [c for c, _ in b.items] + sorted(set(b.quantities) - set(asked))
    items = [(booking_id, c, i, asked.get(c, 0), b.quantities[c]) for i, c in enumerate(order)]
    return Rows(booking=booking, items=items, event_id=event_id, record=b)


def convert(entry: Entry) -> Rows:
    """The rows of one entry, before any server is asked: whatever fails here (malformed
    JSON, a missing field, an unknown op, a time out of range) is the entry's own fault,
    whatever Python type the failure has, and trying again cannot help."""
    try:
        return _convert(entry[2], entry[0])
    except Exception as e:  # no I/O above: nothing here is a server's failure
        # `from None`: an OSError inside must not make the chain look like a server away.
        raise Poison(f"{type(e).__name__}: {e}") from None


def _append(columns: list[list[Any]], values: tuple[Any, ...]) -> None:
    for column, value in zip(columns, values, strict=True):
        column.append(value)


async def _refusals(raw: Any, batch: list[Rows]) -> list[str | None]:
    """Why the catalog refuses each entry (bookingrules); None for one it allows."""
    confirms = [(i, r.event_id, r.record) for i, r in enumerate(batch) if r.record is not None]
    why = await bookingrules.refusals(raw, [(e, b) for _, e, b in confirms])
    out: list[str | None] = [None] * len(batch)
    for (i, _, _), reason in zip(confirms, why, strict=True):
        out[i] = None if reason is None else f"refused: {reason}"
    return out


async def _insert(raw: Any, batch: list[Rows]) -> None:
    rows: list[list[Any]] = [[] for _ in range(9)]
    items: list[list[Any]] = [[] for _ in range(5)]
    cancels: list[list[Any]] = [[], []]
    for entry in batch:
        if entry.booking is not None:
            _append(rows, entry.booking)
        for item in entry.items:
            _append(items, item)
        if entry.cancel is not None:
            _append(cancels, entry.cancel)
    if rows[0]:
        await raw.execute(_INSERT_BOOKINGS, *rows)
        await raw.execute(_INSERT_ITEMS, *items)
    if cancels[0]:
        await raw.execute(_CANCEL, *cancels)


async def write_rows(conn: AsyncConnection, batch: list[Rows]) -> list[str | None]:
    """Write converted entries in the caller's transaction, each that the event's catalog
    allows; returns why each of the others was refused (None: written). One entry's
    fault is that entry's alone: the rest of the batch is written."""
    raw = await driver(conn)
    # SQLAlchemy begins its transaction only when it runs a statement itself: the driver's
    # statements alone would each commit on their own, and a crash between two of them
    # would leave bookings without their items.
    async with raw.transaction():
        refused = await _refusals(raw, batch)
        await _insert(raw, [r for r, why in zip(batch, refused, strict=True) if why is None])
    return refused


async def write(conn: AsyncConnection, entries: list[Entry]) -> None:
    """Write a batch of outbox entries in the caller's transaction; Poison for an entry
    that cannot be converted or that the catalog refuses (nothing is written then)."""
    batch = [convert(e) for e in entries]
    raw = await driver(conn)
    async with raw.transaction():
        refused = [why for why in await _refusals(raw, batch) if why is not None]
        if refused:
            raise Poison(refused[0])
        await _insert(raw, batch)


class OutboxState(msgspec.Struct, frozen=True):
    backlog: int  # entries not yet written and acknowledged
    oldest_ms: int | None  # when the oldest of them was appended (its stream id's time)
    dead_letters: int


async def outbox_state(svc: Services, event_id: str) -> OutboxState:
    keys = event_keys(event_id)
    pipe = svc.redis.pipeline(transaction=False)
    pipe.xinfo_groups(keys.outbox)
    pipe.xpending(keys.outbox, OUTBOX_GROUP)
    pipe.xlen(keys.deadletter)
    groups, pending, dead = await pipe.execute(raise_on_error=False)
    if isinstance(groups, Exception) or isinstance(pending, Exception):
        # No stream or no group yet: no worker has seen the event, and every entry waits.
        entries: Any = await svc.redis.xrange(keys.outbox, count=1)
        backlog = await svc.redis.xlen(keys.outbox)
        first = stream_id(entries[0][0])[0] if entries else None
        return OutboxState(backlog, first, int(dead))
    group = _our_group(groups)
    last = group["last-delivered-id"]
    last = last.decode() if isinstance(last, bytes) else last
    undelivered: Any = await svc.redis.xrange(keys.outbox, min=f"({last}", count=1)
    firsts = [stream_id(pending["min"])[0]] if pending["pending"] else []
    firsts += [stream_id(undelivered[0][0])[0]] if undelivered else []
    backlog = pending["pending"] + (group.get("lag") or 0)
    return OutboxState(backlog, min(firsts) if firsts else None, int(dead))


def _our_group(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The write-behind's entry in an XINFO GROUPS reply."""
    return next(g for g in groups if g["name"] in (OUTBOX_GROUP, OUTBOX_GROUP.encode()))


def stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


# Kept here too: older callers (and tests) import them from the write-behind.
DEAD_LETTER_META = outbox.DEAD_LETTER_META
original_fields = outbox.original_fields
entry_booking_id = outbox.booking_id


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

    async def step(self) -> int:
        """Read one batch, write it, acknowledge it. Returns how many entries it handled."""
        if not self._streams:
            await asyncio.sleep(self.settings.outbox_block_ms / 1000)
            return 0
        pending = self._pending_first
        reply = await self._read("0" if pending else ">")
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

    async def _read(self, start: str) -> list[Any]:
        """One batch from every stream: on a single node one XREADGROUP over them all; on a
        cluster one per stream (a command cannot span slots), sent together per node."""
        redis, count = self.svc.redis, self.settings.outbox_batch
        if not isinstance(redis, RedisCluster):
            # Blocked less than the reply timeout, which would take the wait for silence.
            most = int(self.settings.redis_timeout_seconds * 500)
            block = None if start == "0" else min(self.settings.outbox_block_ms, most)
            one: Any = await redis.xreadgroup(
                OUTBOX_GROUP, self.consumer, dict.fromkeys(self._streams, start), count, block
            )
            return list(one or [])
        pipe = redis.pipeline(transaction=False)
        for stream in self._streams:
            pipe.xreadgroup(OUTBOX_GROUP, self.consumer, {stream: start}, count=count)
        replies: list[Any] = await pipe.execute()
        reply: list[Any] = [one for r in replies for one in r or ()]
        if start != "0" and not any(messages for _, messages in reply):
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
            read = await self.step()
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
        groups: Any = await self.svc.redis.xinfo_groups(stream)
        floor = stream_id(_our_group(groups)["last-delivered-id"])
        summary: Any = await self.svc.redis.xpending(stream, OUTBOX_GROUP)
        if summary["pending"]:
            floor = min(floor, stream_id(summary["min"]))
        await self.svc.redis.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=False)
