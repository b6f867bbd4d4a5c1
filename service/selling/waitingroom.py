"""The waiting room: join, poll and leave, the admin's figures, the pass check before a
hold, and the background step for quiet periods.

Its state lives in Redis in the event's slot (lua/lib.lua, queue_keys): the order, the
admission frontier, the leave log. A join is a script call (the joins of one event that
arrive together share one: _Joins); a poll is none: the ticket is signed here and carries its
place (service/selling/queuetickets.py), and the process keeps each room's state within
a quarter second of the snapshot the room's last step stored, a step every 0.75 s
(service/selling/roomstate.py). Passes are signed here
(service/selling/passes.py) and checked here, without a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec

from service.core import errors, randompool, schemas
from service.core.keys import event_keys
from service.core.timefmt import from_ms, now_ms
from service.durable.live import call_loaded, ensure_loaded, live_event_ids
from service.hotpath.context import Services
from service.hotpath.scripts import Idempotency
from service.selling import passes, queuetickets
from service.selling.queuetickets import Ticket
from service.selling.roomstate import ROOMS as STATES
from service.selling.roomstate import RoomState, Snapshot

log = logging.getLogger("boxoffice.waitingroom")

# When a buyer is told to look again: a tenth of the estimated wait, between 2 s near the
# front and a minute far back (README, "Waiting room": a room of 1,000,000 admitting
# 10,000 a minute is then asked for about 23,000 polls a second, not 200,000).
POLL_MIN_SECONDS = 2
POLL_MAX_SECONDS = 60
POLL_WAIT_SHARE = 10
POLL_PRE_QUEUE_SECONDS = 30  # at most, before the opening: until it
POLL_SOLD_OUT_SECONDS = 10
POLL_DONE_SECONDS = 30  # admitted or closed: nothing more to wait for
# How long a process trusts what it read about an event's room (on or off) for the pass
# check of a hold without a valid pass; a PATCH in this process forgets it at once.
ROOM_CACHE_SECONDS = 1.0
ROOMS_CACHED = 10_000
# The background step's period: how late a quiet room's frontier may be (the API processes
# step a room whose last step is older: roomstate.STEP_MS, the same); and how long it
# leaves an event without a room alone (joins and reads advance a new room meanwhile).
TICK_SECONDS = 0.75
NO_ROOM_RECHECK_SECONDS = 10.0
# The most joins of one event that go to Redis in one script call.
JOIN_BATCH = 500
_NOT_FOUND = "no ticket with this id in this event's waiting room"


class RoomFigures(msgspec.Struct):
    """room_figures() of lua/lib.lua, as queue_view.lua, queue_figures.lua and live.lua
    give it."""

    waiting: int
    admitted: int
    active: int
    apm: int | None = None


class _Joined(msgspec.Struct):
    """queue_join.lua's reply."""

    places: list[tuple[str, str, int]]
    room: Snapshot


_decode_joined = msgspec.json.Decoder(_Joined).decode
_decode_figures = msgspec.json.Decoder(RoomFigures).decode


def poll_after(status: str, wait: int | None, until_open_ms: int | None = None) -> int:
    """`poll_after_seconds` of a ticket: grows with its estimated wait."""
    if status == "sold_out":
        return POLL_SOLD_OUT_SECONDS
    if status != "waiting":
        return POLL_DONE_SECONDS
    if wait is None:  # pre-queued: until the opening
        seconds = POLL_PRE_QUEUE_SECONDS
        if until_open_ms is not None:
            seconds = min(seconds, math.ceil(until_open_ms / 1000))
        return max(POLL_MIN_SECONDS, seconds)
    return max(POLL_MIN_SECONDS, min(POLL_MAX_SECONDS, math.ceil(wait / POLL_WAIT_SHARE)))


def implied_poll_rate(buyers: int, admit_per_minute: int) -> float:
    """Polls a second asked of a room with `buyers` waiting, each polling when told."""
    per_second = admit_per_minute / 60
    return sum(1 / poll_after("waiting", math.ceil(p / per_second)) for p in range(1, buyers + 1))


def _view(
    svc: Services, event_id: str, state: RoomState, t: Ticket, token: str
) -> schemas.QueueTicket:
    """The ticket as the room's state says it reads now."""
    snap = state.snap
    status, position, wait, token_pass, expires = "waiting", None, None, None, None
    until_open = None
    if snap.closed:
        status = "closed"
    elif not snap.o:
        until_open = None if snap.on is None else snap.on - now_ms()
    elif state.admitted(t):
        status = "admitted"
        at = state.admitted_at(state.rank(t)) + snap.ttl * 1000
        expires = math.ceil(at / 1000) * 1000  # whole seconds: the same pass, read anywhere
        secret = passes.secret_of(svc.settings)
        token_pass = passes.issue(secret, event_id, t.customer, expires)
    else:
        # The rank and the frontier once each (state.position's figures): both for the
        # position and the wait, as two calls of each would give them.
        rank, f = state.rank(t), state.f_now(now_ms())
        position = max(1, rank - math.floor(f))
        if not snap.stock:
            status = "sold_out"
        else:
            wait = max(1, math.ceil((rank - f) * 60 / snap.apm))
    return schemas.QueueTicket(
        ticket=token,
        status=status,  # type: ignore[arg-type]
        position=position,
        estimated_wait_seconds=wait,
        poll_after_seconds=poll_after(status, wait, until_open),
        pass_=token_pass,
        pass_expires_at=None if expires is None else from_ms(expires),
    )


# --- join, poll, leave ----------------------------------------------------------------


async def join_many(
    svc: Services, event_id: str, buyers: list[tuple[str, int]], idem: Idempotency | None
) -> _Joined:
    reply = await call_loaded(
        svc,
        "queue_join",
        event_id,
        msgspec.json.encode(buyers),
        extra_keys=event_keys(event_id).queue,
        idempotency=idem,
    )
    return _decode_joined(reply)


_Waiter = asyncio.Future[tuple[tuple[str, str, int], Snapshot]]


class _Joins:
    """The joins of one event that arrive together, sent as one call: a crowd's joins cost
    Redis one script run (and the room's shared work once) per call. The joins of one
    loop turn go together; and while an event's call is out, the joins that come meanwhile
    wait for its reply and then go as the next call (one call of an event's joins in
    flight per process): under load a call carries tens of joins rather than three, and
    a join's share of the script's fixed work (the room's advance and snapshot, about
    60 µs of Lua a call) shrinks with it."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[Services, list[tuple[str, _Waiter]]]] = {}
        self._out: dict[str, asyncio.Task[None]] = {}  # an event's call out, if any
        self._sending: set[asyncio.Task[None]] = set()  # kept until done (the loop won't)

    def join(self, svc: Services, event_id: str, customer_id: str) -> _Waiter:
        pending = self._pending.get(event_id)
        if pending is None:
            # Only the first join of a batch asks for the loop (on Python 3.11 a getpid()
            # call each time); the others take it from the first one's future.
            loop = asyncio.get_running_loop()
            batch: list[tuple[str, _Waiter]] = []
            self._pending[event_id] = (svc, batch)
            out = self._out.get(event_id)
            # Else the call out sends it when it is back (one of a loop gone, a test's,
            # never will: not waited for).
            if out is None or out.done() or out.get_loop() is not loop:
                loop.call_soon(self._flush, event_id)
        else:
            batch = pending[1]
            loop = batch[0][1].get_loop()
        waiter: _Waiter = loop.create_future()
        batch.append((customer_id, waiter))
        return waiter

    def _flush(self, event_id: str) -> None:
        pending = self._pending.pop(event_id, None)
        if pending is None:
            return
        task = asyncio.ensure_future(self._send_all(event_id, *pending))
        self._out[event_id] = task
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_all(
        self, event_id: str, svc: Services, batch: list[tuple[str, _Waiter]]
    ) -> None:
        try:
            await asyncio.gather(
                *(
                    _send(svc, event_id, batch[i : i + JOIN_BATCH])
                    for i in range(0, len(batch), JOIN_BATCH)
                )
            )
        finally:
            if self._out.get(event_id) is asyncio.current_task():
                del self._out[event_id]
                self._flush(event_id)  # the joins that came meanwhile, if any


def _randoms(count: int) -> list[int]:
    """`count` pre-queue places, each uniformly random in [0, 2^52), from the OS (a
    script's math.random repeats itself): one os.urandom call for a whole batch rather
    than a getrandom() system call per join (7 bytes each, the top 52 bits kept)."""
    data = os.urandom(7 * count)
    return [int.from_bytes(data[i : i + 7], "big") >> 4 for i in range(0, 7 * count, 7)]


async def _send(svc: Services, event_id: str, batch: list[tuple[str, _Waiter]]) -> None:
    buyers = list(zip([c for c, _ in batch], _randoms(len(batch)), strict=True))
    try:
        joined = await join_many(svc, event_id, buyers, None)
    except Exception as e:
        for _, waiter in batch:
            if not waiter.done():
                waiter.set_exception(e)
        return
    for place, (_, waiter) in zip(joined.places, batch, strict=True):
        if not waiter.done():
            waiter.set_result((place, joined.room))


JOINS = _Joins()


async def join(
    svc: Services, event_id: str, customer_id: str, idem: Idempotency | None
) -> tuple[schemas.QueueTicket, bool]:
    """The customer's ticket, and whether this call made it."""
    if idem is None:
        place, snap = await JOINS.join(svc, event_id, customer_id)
    else:  # its answer is remembered under its key: a call of its own
        joined = await join_many(svc, event_id, [(customer_id, randompool.randbits(52))], idem)
        place, snap = joined.places[0], joined.room
    kind, number, new = place
    state = STATES.merge(event_id, snap)
    if not state.fresh():
        state = await STATES.current(svc, event_id)
    t = Ticket(snap.g, "p" if kind == "p" else "a", int(number), customer_id)
    token = queuetickets.issue(passes.secret_of(svc.settings), event_id, t)
    return _view(svc, event_id, state, t, token), bool(new)


async def _ticket(svc: Services, event_id: str, token: str, customer_id: str | None) -> Ticket:
    """The ticket `token` signs, if it is this event's (and `customer_id`'s, when given);
    else TicketNotFound, without a Redis call once this process knows the event."""
    t = queuetickets.read(passes.secret_of(svc.settings), event_id, token)
    if t is None or (customer_id is not None and t.customer != customer_id):
        if STATES.known(event_id) is None:
            await STATES.current(svc, event_id)  # an unknown event is event_not_found
        raise errors.TicketNotFound(_NOT_FOUND)
    return t


async def poll(
    svc: Services, event_id: str, ticket: str, customer_id: str | None = None
) -> schemas.QueueTicket:
    """`customer_id`: only this customer's ticket is found (None: anyone's who knows it).
    No Redis call but the room's read, at most every quarter second per room."""
    t = await _ticket(svc, event_id, ticket, customer_id)
    state = await STATES.current(svc, event_id)
    snap = state.snap
    if snap.none or not state.ours(t) or f"{t.place} {t.customer}" in state.left:
        raise errors.TicketNotFound(_NOT_FOUND)
    state.check_lost(t)
    return _view(svc, event_id, state, t, ticket)


async def leave(
    svc: Services,
    event_id: str,
    ticket: str,
    idem: Idempotency | None,
    customer_id: str | None = None,
) -> None:
    """`customer_id`: only this customer's ticket is found (None: anyone's who knows it)."""
    t = await _ticket(svc, event_id, ticket, customer_id)
    await call_loaded(
        svc,
        "queue_leave",
        event_id,
        str(t.generation),
        t.place,
        t.customer,
        extra_keys=event_keys(event_id).queue,
        idempotency=idem,
    )
    STATES.stale(event_id, step=False)


async def figures(svc: Services, event_id: str) -> schemas.QueueStats:
    reply = await call_loaded(svc, "queue_view", event_id, extra_keys=event_keys(event_id).queue)
    f = _decode_figures(reply)
    return schemas.QueueStats(
        waiting=f.waiting,
        admitted=f.admitted,
        active_passes=f.active,
        admit_per_minute=f.apm,
        last_admitted_position=f.admitted,
    )


async def read_figures(svc: Services, event_id: str) -> RoomFigures | None:
    """The room's figures as figures() has them, read without moving the room on
    (queue_figures.lua); None when the event has no room or is not in Redis (nothing is
    loaded for it)."""
    reply = await svc.scripts.call_event(
        "queue_figures", event_id, extra_keys=event_keys(event_id).queue
    )
    return _decode_figures(reply) if reply else None


# --- the pass check before a hold ----------------------------------------------------


class _Rooms:
    """Whether an event has a waiting room, as this process read it lately."""

    def __init__(self, size: int) -> None:
        self._seen: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self._size = size

    def get(self, event_id: str) -> bool | None:
        seen = self._seen.get(event_id)
        if seen is None or seen[0] <= time.monotonic():
            return None
        return seen[1]

    def put(self, event_id: str, on: bool) -> None:
        self._seen[event_id] = (time.monotonic() + ROOM_CACHE_SECONDS, on)
        self._seen.move_to_end(event_id)
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)

    def forget(self, event_id: str) -> None:
        self._seen.pop(event_id, None)


ROOMS = _Rooms(ROOMS_CACHED)


# The reads of has_room() under way, by event: the holds that find an event's entry out of
# date together (every second, a process's whole load of holds in flight) wait for one read
# rather than each making its own (a redis-py call each: 4 % of a hold's loop thread).
_READING: dict[str, asyncio.Future[bool]] = {}


async def has_room(svc: Services, event_id: str) -> bool:
    on = ROOMS.get(event_id)
    if on is not None:
        return on
    reading = _READING.get(event_id)
    if reading is None:
        reading = _READING[event_id] = asyncio.ensure_future(_read_room(svc, event_id))
        reading.add_done_callback(_read_done(event_id))
    return await asyncio.shield(reading)  # a waiter cancelled leaves the read to the others


def _read_done(event_id: str) -> Callable[[asyncio.Future[bool]], None]:
    def done(reading: asyncio.Future[bool]) -> None:
        _READING.pop(event_id, None)
        if not reading.cancelled():
            reading.exception()  # retrieved: its waiters may all have gone

    return done


async def _read_room(svc: Services, event_id: str) -> bool:
    meta = event_keys(event_id).meta
    status, apm = await svc.redis.hmget(meta, ["status", "qapm"])
    if status is None:  # not loaded: load it (or 404), then read again
        await ensure_loaded(svc, event_id)
        status, apm = await svc.redis.hmget(meta, ["status", "qapm"])
    on = bool(apm)
    ROOMS.put(event_id, on)
    return on


async def require_pass(svc: Services, event_id: str, customer_id: str, token: str | None) -> None:
    """Raise AdmissionRequired unless the hold may go ahead: the event has no waiting
    room, or `token` is a pass for this event and customer that has not expired. A valid
    pass costs no Redis call; a hold without one costs at most one read a second."""
    secret = passes.secret_of(svc.settings)
    if token is not None and passes.valid(secret, token, event_id, customer_id, now_ms()):
        return
    if not await has_room(svc, event_id):
        return
    if token is None:
        raise errors.AdmissionRequired(
            f"this event has a waiting room: join it (POST /events/{event_id}/queue) and "
            "send the pass it gives you as `Boxoffice-Pass`"
        )
    raise errors.AdmissionRequired(
        "the `Boxoffice-Pass` is not a valid pass for this event and customer, or has expired"
    )


# --- the background step -------------------------------------------------------------


async def _step(svc: Services, event_id: str) -> bool:
    """Advance one event's room; whether it has one."""
    reply = await svc.scripts.call_event(
        "queue_tick", event_id, extra_keys=event_keys(event_id).queue
    )
    return reply == b"1"


async def tick(svc: Services, skip: dict[str, float] | None = None) -> int:
    """Advance every live waiting room's frontier once, waiting for every step; how many
    rooms there are (a step that fails is logged, and the others go on). `skip`: event
    id -> until when (monotonic) an event found without a room is left alone, so that a
    worker does not call a script a second for every event of a large catalog."""
    ticker = Ticker(svc)
    if skip is not None:
        ticker.skip = skip
    return await ticker.tick(wait=None)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Ticker:
    """Runs in every worker: several at once only advance the same frontier to the same
    time (the scripts read Redis's clock).

    Each event's step is its own task: on a cluster, a step whose primary is away (a
    failover under way, a node lost with cluster-require-full-coverage off) waits out its
    retry budget, and meanwhile the rooms on the primaries that answer are stepped every
    period as before; the waiting event gets no second step until its first is done. A
    step that fails is that event's, logged, and the others go on."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.skip: dict[str, float] = {}
        self.steps: dict[str, asyncio.Task[bool]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await self.tick(wait=TICK_SECONDS)
                except Exception as e:
                    errors.log_failure(log, "waiting room step", e)
                await _wait(stop, max(0.0, started + TICK_SECONDS - time.monotonic()))
        finally:
            for task in self.steps.values():
                task.cancel()

    async def tick(self, wait: float | None) -> int:
        """Start a step for every live event that is due and has none under way, and wait
        up to `wait` seconds (None: until all are done); how many rooms the steps done
        found. Steps not done by then go on, and are counted by a later call."""
        now = time.monotonic()
        for event_id in await live_event_ids(self.svc):
            if event_id not in self.steps and self.skip.get(event_id, 0.0) <= now:
                self.steps[event_id] = asyncio.create_task(_step(self.svc, event_id))
        if self.steps:
            await asyncio.wait(self.steps.values(), timeout=wait)
        rooms = failed = 0
        for event_id, task in list(self.steps.items()):
            if not task.done():
                continue  # its primary is slow or away: it holds up no other room
            del self.steps[event_id]
            if (e := task.exception()) is not None:
                failed += 1
                if failed == 1:
                    errors.log_failure(log, f"waiting room step of event {event_id!r}", e)
            elif task.result():
                rooms += 1
            else:
                self.skip[event_id] = now + NO_ROOM_RECHECK_SECONDS
        if failed > 1:
            log.warning("waiting room step: %d events failed", failed)
        if len(self.skip) > ROOMS_CACHED:
            self.skip.clear()
        return rooms
