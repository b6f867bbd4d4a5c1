"""The waiting room: join, poll and leave (one script call each), the admin's figures,
the pass check before a hold, and the background step for quiet periods.

All of its state lives in Redis in the event's slot (lua/lib.lua, queue_keys): the
ticket order, the admission frontier, the passes handed out. Passes are signed here
(service/passes.py) and checked here, without a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import OrderedDict

import msgspec

from service import errors, passes, schemas
from service.context import Services
from service.keys import event_keys
from service.live import call, ensure_loaded, live_event_ids
from service.scripts import Idempotency
from service.timefmt import from_ms, now_ms

log = logging.getLogger("boxoffice.waitingroom")

# When a buyer is told to look again: bounds, and the share of the estimated wait.
POLL_MIN_SECONDS = 1
POLL_MAX_SECONDS = 30
POLL_SOLD_OUT_SECONDS = 10
POLL_WAIT_SHARE = 4  # a quarter of the estimated wait
# How long a process trusts what it read about an event's room (on or off) for the pass
# check of a hold without a valid pass; a PATCH in this process forgets it at once.
ROOM_CACHE_SECONDS = 1.0
ROOMS_CACHED = 10_000
# The background step's period: how late a quiet room's frontier may be; and how long it
# leaves an event without a room alone (joins and polls advance a new room meanwhile).
TICK_SECONDS = 1.0
NO_ROOM_RECHECK_SECONDS = 10.0
# The longest ticket this API hands out is 22 characters; anything much longer is none.
MAX_TICKET_LENGTH = 64


class _Ticket(msgspec.Struct):
    """A reply of the queue scripts (lua/lib.lua, ticket_view)."""

    t: str
    c: str
    s: str
    now: int
    p: int | None = None
    e: int | None = None
    x: int | None = None
    u: int | None = None
    new: int = 0


class RoomFigures(msgspec.Struct):
    """room_figures() of lua/lib.lua, as queue_view.lua and live.lua give it."""

    waiting: int
    admitted: int
    active: int
    apm: int | None = None


_decode_ticket = msgspec.json.Decoder(_Ticket).decode
_decode_figures = msgspec.json.Decoder(RoomFigures).decode


def _poll_after(v: _Ticket) -> int:
    if v.s == "sold_out":
        return POLL_SOLD_OUT_SECONDS
    if v.s != "waiting":
        return POLL_MAX_SECONDS  # admitted or closed: nothing more to wait for
    if v.e is not None:
        seconds = v.e // POLL_WAIT_SHARE
    elif v.u is not None:
        seconds = math.ceil((v.u - v.now) / 1000)  # pre-queued: until the opening
    else:
        seconds = POLL_MAX_SECONDS // 2
    return max(POLL_MIN_SECONDS, min(POLL_MAX_SECONDS, seconds))


def _view(svc: Services, event_id: str, v: _Ticket) -> schemas.QueueTicket:
    token = None
    if v.s == "admitted" and v.x is not None:
        token = passes.issue(passes.secret_of(svc.settings), event_id, v.c, v.x)
    return schemas.QueueTicket(
        ticket=v.t,
        status=v.s,  # type: ignore[arg-type]
        position=v.p,
        estimated_wait_seconds=v.e,
        poll_after_seconds=_poll_after(v),
        pass_=token,
        pass_expires_at=None if token is None or v.x is None else from_ms(v.x),
    )


async def join(
    svc: Services, event_id: str, customer_id: str, idem: Idempotency | None
) -> tuple[schemas.QueueTicket, bool]:
    """The customer's ticket, and whether this call made it."""
    reply = await call(
        svc,
        "queue_join",
        event_id,
        secrets.token_urlsafe(16),  # 128 random bits: knowing it is what lets one poll
        customer_id,
        secrets.randbits(52),  # the pre-queue's place: uniformly random, from the OS
        extra_keys=event_keys(event_id).queue,
        idempotency=idem,
    )
    v = _decode_ticket(reply)
    return _view(svc, event_id, v), bool(v.new)


def _ticket(ticket: str) -> str:
    if len(ticket) > MAX_TICKET_LENGTH:
        raise errors.TicketNotFound("no ticket with this id in this event's waiting room")
    return ticket


async def poll(
    svc: Services, event_id: str, ticket: str, customer_id: str | None = None
) -> schemas.QueueTicket:
    """`customer_id`: only this customer's ticket is found (None: anyone's who knows it)."""
    reply = await call(
        svc, "queue_poll", event_id, _ticket(ticket), extra_keys=event_keys(event_id).queue
    )
    v = _decode_ticket(reply)
    if customer_id is not None and v.c != customer_id:
        raise errors.TicketNotFound("no ticket with this id in this event's waiting room")
    return _view(svc, event_id, v)


async def leave(
    svc: Services,
    event_id: str,
    ticket: str,
    idem: Idempotency | None,
    customer_id: str | None = None,
) -> None:
    """`customer_id`: only this customer's ticket is found (None: anyone's who knows it)."""
    await call(
        svc,
        "queue_leave",
        event_id,
        _ticket(ticket),
        customer_id or "",
        extra_keys=event_keys(event_id).queue,
        idempotency=idem,
    )


async def figures(svc: Services, event_id: str) -> schemas.QueueStats:
    reply = await call(svc, "queue_view", event_id, extra_keys=event_keys(event_id).queue)
    f = _decode_figures(reply)
    return schemas.QueueStats(
        waiting=f.waiting,
        admitted=f.admitted,
        active_passes=f.active,
        admit_per_minute=f.apm,
        last_admitted_position=f.admitted,
    )


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


async def has_room(svc: Services, event_id: str) -> bool:
    on = ROOMS.get(event_id)
    if on is not None:
        return on
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
    reply = await svc.scripts.call("queue_tick", event_id, extra_keys=event_keys(event_id).queue)
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
