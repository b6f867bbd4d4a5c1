"""The live view's figures (GET /admin/events/{id}/live): one reader per event and process
reads them from Redis once a second, in one script call (lua/live.lua), however many
watch, and hands each reading to every watcher; it stops when the last one leaves.

Rates are differences of counters kept in Redis (the event's `stats` hash), so every API
process shows the same figures: holds created, confirmed, released, expired and cancelled
are counted by the scripts; refusals are tallied per process from the answers (whatever
refused them: a script, the door, a limit) and added to Redis once a second: plain
HINCRBYs in one pipeline, no script call (a refusal answered without Redis stays without a
script call), for the events Redis has (the `bo:events` set) only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from litestar.response.sse import ServerSentEventMessage
from msgspec import Meta, Struct
from prometheus_client import Gauge

from service.core import errors
from service.core.keys import EVENTS, OUTBOX_GROUP, event_keys
from service.core.schemas import Event, EventStatus, Timestamp, event_status
from service.core.timefmt import from_ms, now_ms
from service.durable import archived, live
from service.hotpath.context import Services
from service.selling.waitingroom import RoomFigures

log = logging.getLogger("boxoffice.livefeed")

# A reading once a second; and the refusals tallied in a process reach Redis as often.
INTERVAL_SECONDS = 1.0
# Events whose refusals one process adds to Redis per flush, at most (a client naming
# made-up events cannot make a flush long: only events Redis has are counted anyway).
TALLY_EVENTS_MAX = 1000
# Refusals counted elsewhere or of no event: an unknown event's 404 is its own answer.
UNTALLIED = frozenset({"event_not_found", "not_found"})
# What an event id looks like (API.md); any other names no event.
EVENT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")

READERS = Gauge(
    "boxoffice_live_readers",
    "Events read once a second for the live view (one reader per event and process)",
    multiprocess_mode="livesum",
)
WATCHERS = Gauge(
    "boxoffice_live_watchers",
    "Open live-view streams",
    multiprocess_mode="livesum",
)


# --- the figures ----------------------------------------------------------------------


class CategoryFigures(Struct, kw_only=True):
    name: str
    seated: bool
    capacity: int
    available: int
    held: int
    sold: int


class Totals(Struct, kw_only=True):
    """Counters since the event was loaded into Redis."""

    holds: int
    confirmations: int
    releases: int
    expiries: int
    cancellations: int
    refusals: dict[str, int]


class Rates(Struct, kw_only=True):
    """Per second, over the interval since the reading before."""

    holds: float
    confirmations: float
    releases: float
    expiries: float
    cancellations: float
    # By code; codes with no refusal in the interval are left out.
    refusals: dict[str, float]


class QueueFigures(Struct, kw_only=True):
    """The waiting room, as GET /admin/events/{event_id}/queue gives it: all null while
    the event has none."""

    enabled: bool
    length: Annotated[int | None, Meta(description="Tickets waiting (QueueStats.waiting)")]
    admitted: int | None
    active_passes: int | None
    admit_per_minute: int | None
    last_admitted_position: int | None
    admission_rate: Annotated[
        float | None,
        Meta(
            description="Admissions per second: the change of `admitted` since the reading "
            "before; null on a stream's first"
        ),
    ]


class WriteBehindFigures(Struct, kw_only=True):
    backlog: Annotated[int, Meta(description="Bookings and cancellations not yet in PostgreSQL")]
    lag_seconds: Annotated[float, Meta(description="Age of the oldest of them; 0 when none")]
    dead_letters: int


class LiveFigures(Struct, kw_only=True):
    event_id: str
    status: EventStatus
    at: Timestamp
    interval_seconds: Annotated[
        float | None, Meta(description="Since the reading before; null on a stream's first")
    ]
    categories: list[CategoryFigures]
    totals: Totals
    rates: Rates | None
    queue: QueueFigures
    write_behind: WriteBehindFigures


class _Outbox(Struct):
    pending: int = 0
    undelivered: int = 0
    dead: int = 0
    oldest: str | None = None


class _Meta(Struct):
    status: str
    order: str
    on_sale_at: str = ""


class _Reply(Struct):
    now: int
    meta: _Meta
    # Hashes as cjson writes them (an empty one as {}), values as strings.
    cats: dict[str, str]
    cap: dict[str, str]
    avail: dict[str, str]
    held: dict[str, str]
    sold: dict[str, str]
    stats: dict[str, str]
    outbox: _Outbox
    # Absent: the event has no waiting room.
    queue: RoomFigures | None = None


class _Cat(Struct):
    s: int


_decode_reply = msgspec.json.Decoder(_Reply).decode
_decode_cat = msgspec.json.Decoder(_Cat).decode
_decode_order = msgspec.json.Decoder(list[str]).decode
# The stats fields (lua/lib.lua, lua/*.lua) of each total.
_COUNTERS = (
    ("holds", "created"),
    ("confirmations", "confirmed"),
    ("releases", "released"),
    ("expiries", "expired"),
    ("cancellations", "cancelled"),
)
REFUSED = "refused:"


def _hash(value: dict[str, str]) -> dict[str, int]:
    return {k: int(v) for k, v in value.items()}


def totals(stats: dict[str, int]) -> Totals:
    refusals = {k[len(REFUSED) :]: v for k, v in stats.items() if k.startswith(REFUSED)}
    counts = {name: stats.get(field, 0) for name, field in _COUNTERS}
    return Totals(**counts, refusals=dict(sorted(refusals.items())))


def rates(now: Totals, before: Totals, seconds: float) -> Rates:
    def per_second(a: int, b: int) -> float:
        return round(max(0, a - b) / seconds, 3)

    counts = {name: per_second(getattr(now, name), getattr(before, name)) for name, _ in _COUNTERS}
    refusals = {
        code: per_second(n, before.refusals.get(code, 0)) for code, n in now.refusals.items()
    }
    return Rates(**counts, refusals={k: v for k, v in refusals.items() if v > 0})


class Before(Struct, frozen=True):
    """What the next reading's rates are computed from."""

    now: int
    totals: Totals
    admitted: int | None


NO_QUEUE = QueueFigures(
    enabled=False,
    length=None,
    admitted=None,
    active_passes=None,
    admit_per_minute=None,
    last_admitted_position=None,
    admission_rate=None,
)


def queue_figures(reply: _Reply, before: Before | None) -> QueueFigures:
    """The waiting room's figures; the admission rate from the change of `admitted` since
    the reading before (none when that one had no room; a room switched off and on again
    starts over: never a negative rate)."""
    q = reply.queue
    if q is None:
        return NO_QUEUE
    rate = None
    if before is not None and before.admitted is not None and reply.now > before.now:
        seconds = (reply.now - before.now) / 1000
        rate = round(max(0, q.admitted - before.admitted) / seconds, 3)
    return QueueFigures(
        enabled=True,
        length=q.waiting,
        admitted=q.admitted,
        active_passes=q.active,
        admit_per_minute=q.apm,
        last_admitted_position=q.admitted,
        admission_rate=rate,
    )


def figures(event_id: str, reply: _Reply, before: Before | None) -> LiveFigures:
    cats = reply.cats
    cap, avail, held, sold = (_hash(h) for h in (reply.cap, reply.avail, reply.held, reply.sold))
    categories = [
        CategoryFigures(
            name=name,
            seated=bool(_decode_cat(cats[name]).s),
            capacity=cap.get(name, 0),
            available=avail.get(name, 0),
            held=held.get(name, 0),
            sold=sold.get(name, 0),
        )
        for name in _decode_order(reply.meta.order)
        if name in cats
    ]
    now_totals = totals(_hash(reply.stats))
    interval = None if before is None else (reply.now - before.now) / 1000
    outbox = reply.outbox
    oldest = None if outbox.oldest is None else int(outbox.oldest.partition("-")[0])
    on_sale_at = int(reply.meta.on_sale_at) if reply.meta.on_sale_at else None
    return LiveFigures(
        event_id=event_id,
        status=event_status(reply.meta.status, on_sale_at, reply.now),
        at=from_ms(reply.now),
        interval_seconds=interval,
        categories=categories,
        totals=now_totals,
        rates=None
        if before is None or not interval or interval <= 0
        else rates(now_totals, before.totals, interval),
        queue=queue_figures(reply, before),
        write_behind=WriteBehindFigures(
            backlog=outbox.pending + outbox.undelivered,
            lag_seconds=0.0 if oldest is None else max(0, reply.now - oldest) / 1000,
            dead_letters=outbox.dead,
        ),
    )


async def read(svc: Services, event_id: str) -> _Reply:
    """One reading: one script call (loading the event first if Redis lost it). An
    archived event is read from PostgreSQL, and not loaded."""
    k = event_keys(event_id)
    try:
        reply = await live.call_loaded(
            svc, "live", event_id, OUTBOX_GROUP, extra_keys=(*k.queue, k.deadletter)
        )
    except errors.EventArchived:
        return archived_reply(await archived.view(svc, event_id))
    return _decode_reply(reply)


def archived_reply(view: Event) -> _Reply:
    """An archived event's reading, as lua/live.lua would give it: nothing held, nothing
    on its way to PostgreSQL, no counters (they left Redis with the event), no room."""
    enc = msgspec.json.encode
    names = [c.name for c in view.categories]
    return _Reply(
        now=now_ms(),
        meta=_Meta(status=view.status, order=enc(names).decode()),
        cats={c.name: enc({"s": int(c.seated)}).decode() for c in view.categories},
        cap={c.name: str(c.capacity) for c in view.categories},
        avail={c.name: str(c.available) for c in view.categories},
        held=dict.fromkeys(names, "0"),
        sold={c.name: str(c.capacity - c.available) for c in view.categories},
        stats={},
        outbox=_Outbox(),
    )


# --- readers and watchers ---------------------------------------------------------------

# What a watcher is handed each second: the figures, or why there are none this time.
Reading = LiveFigures | errors.BoxofficeError


class _Reader:
    """Reads one event once a second while anyone watches it, and hands each watcher the
    latest reading (a watcher that falls behind skips readings, never queues them)."""

    def __init__(self, svc: Services, event_id: str) -> None:
        self.svc = svc
        self.event_id = event_id
        self.watchers: set[asyncio.Queue[Reading]] = set()
        self.latest: Reading | None = None
        self._before: Before | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            self._publish(await self._read())
            next_at = max(next_at + INTERVAL_SECONDS, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())

    async def _read(self) -> Reading:
        try:
            reply = await read(self.svc, self.event_id)
            now = figures(self.event_id, reply, self._before)
        except errors.BoxofficeError as e:
            return e
        except Exception as e:
            if not errors.unavailable(e):
                log.exception("live view of %s", self.event_id)
                return errors.BoxofficeError("the figures could not be read")
            return errors.Unavailable("Redis is unreachable; the figures follow when it is back")
        self._before = Before(reply.now, now.totals, now.queue.admitted)
        return now

    def _publish(self, reading: Reading) -> None:
        self.latest = reading
        for queue in self.watchers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(reading)


class Feed:
    """The readers of one process, by event."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.readers: dict[str, _Reader] = {}

    def watch(self, event_id: str) -> asyncio.Queue[Reading]:
        reader = self.readers.get(event_id)
        if reader is None:
            reader = self.readers[event_id] = _Reader(self.svc, event_id)
            READERS.inc()
        queue: asyncio.Queue[Reading] = asyncio.Queue(maxsize=1)
        # A second watcher need not wait up to a second for its first figures (their
        # rates are over the reader's last interval, as everyone's).
        if reader.latest is not None:
            queue.put_nowait(reader.latest)
        reader.watchers.add(queue)
        WATCHERS.inc()
        return queue

    def leave(self, event_id: str, queue: asyncio.Queue[Reading]) -> None:
        """Idempotent. The last watcher to leave stops the event's reader."""
        reader = self.readers.get(event_id)
        if reader is None or queue not in reader.watchers:
            return
        reader.watchers.discard(queue)
        WATCHERS.dec()
        if not reader.watchers:
            del self.readers[event_id]
            reader.task.cancel()
            READERS.dec()

    async def close(self) -> None:
        tasks = [r.task for r in self.readers.values()]
        for reader in list(self.readers.values()):
            for queue in list(reader.watchers):
                self.leave(reader.event_id, queue)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def first_reading(feed: Feed, event_id: str) -> tuple[asyncio.Queue[Reading], LiveFigures]:
    """Start watching: the first figures, or the error that the event has none (404 for
    an unknown event: before any stream begins)."""
    queue = feed.watch(event_id)
    try:
        reading = await queue.get()
        if isinstance(reading, errors.BoxofficeError):
            raise reading
    except BaseException:
        feed.leave(event_id, queue)
        raise
    return queue, reading


_encode = msgspec.json.Encoder().encode


def wants_snapshot(accept: str) -> bool:
    """One document rather than a stream: asked for JSON, and not for event streams (a
    browser's EventSource asks for text/event-stream, curl for anything)."""
    types = {part.partition(";")[0].strip().lower() for part in accept.split(",")}
    return "application/json" in types and "text/event-stream" not in types


async def stream(
    feed: Feed, event_id: str, queue: asyncio.Queue[Reading], first: LiveFigures
) -> AsyncIterator[ServerSentEventMessage]:
    """Server-Sent Events: the figures as `data` (no event type, so a browser's onmessage
    sees them), a problem (Redis away) as `event: problem`. Leaving, however it happens
    (the client closed the connection, the server stops), ends the watch."""
    try:
        reading: Reading = first
        while True:
            if isinstance(reading, errors.BoxofficeError):
                yield ServerSentEventMessage(event="problem", data=_encode(reading.problem()))
            else:
                yield ServerSentEventMessage(data=_encode(reading))
            reading = await queue.get()
    finally:
        feed.leave(event_id, queue)


# --- refusals, counted in Redis ------------------------------------------------------------


class RefusalTally:
    """A process's refusals by event and code since the last flush."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(self, event_id: str, code: str) -> None:
        if code not in UNTALLIED and EVENT_ID.fullmatch(event_id):
            self.counts[event_id, code] += 1

    def take(self) -> dict[str, list[tuple[str, int]]]:
        counts, self.counts = self.counts, collections.Counter()
        by_event: dict[str, list[tuple[str, int]]] = {}
        for (event_id, code), n in counts.items():
            if event_id in by_event or len(by_event) < TALLY_EVENTS_MAX:
                by_event.setdefault(event_id, []).append((code, n))
        return by_event


async def flush(svc: Services, tally: RefusalTally) -> None:
    by_event = tally.take()
    if not by_event:
        return
    event_ids = list(by_event)
    try:
        # Only events Redis has: a refusal naming another must not make keys for it.
        present = await svc.redis.smismember(EVENTS, event_ids)
        pipe = svc.redis.pipeline(transaction=False)
        for event_id, loaded in zip(event_ids, present, strict=True):
            if loaded:
                stats = event_keys(event_id).stats
                for code, n in by_event[event_id]:
                    pipe.hincrby(stats, REFUSED + code, n)
        await pipe.execute()
    except Exception as e:
        # Lost counts make a rate low for a second; they are not worth a retry queue.
        if not errors.unavailable(e):
            log.exception("tallying refusals")


async def flush_every(svc: Services, tally: RefusalTally) -> None:
    while True:
        await asyncio.sleep(INTERVAL_SECONDS)
        await flush(svc, tally)
