"""Each API process's copy of its waiting rooms' state, so that a poll costs no Redis call.

A room's state is read at most every REFRESH_SECONDS per room and process, by the first
poll that finds it older (the polls meanwhile wait for that one read, never make their
own), and a read is mostly one HMGET of the snapshot the room's last step stored (lua/
lib.lua, room_step: the frontier advanced, written with it). The step itself is a script
(lua/queue_state.lua), run by the read that finds the snapshot STEP_MS old, or by the
worker's background step (every STEP_MS), so a room is stepped about once per
STEP_MS whatever the number of processes. The script is called too when a process
changed the room or heard stock come back (it steps at once), lacks leaves, corners or
the ladder, or has tickets to offer for putting back. What a read brings:
- the frontier: rank f at Redis time t, and the place admission has got to in the order's
  own terms (the pre-queue's k, the arrival number), so that "admitted?" is a comparison,
  exact, with no look-up of the ticket;
- whether the room is open, selling, stocked, closed; its generation and settings;
- what changed since the last read: tickets that left (the leave log), the frontier's
  corners (when each rank was admitted: a pass expires pass_ttl_seconds after that), and
  once after the opening the pre-queue's ladder (its scores at ranks at most 10 places
  or 1% apart).
A ticket's rank is estimated from these: an arrival's exactly (the pre-queue's size, its
arrival number, less the tickets ahead of it that left), a pre-queued ticket's between the
two ladder ranks around its score (within 10 places or 1%), less those ahead that left.
For one ticket it only ever goes down, so a position never moves backwards.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections import OrderedDict

import msgspec

from service.core.keys import event_keys
from service.durable.live import call_loaded
from service.hotpath import soldout
from service.hotpath.context import Services
from service.selling.queuetickets import Ticket

# How old a room's state may be when a poll is answered from it.
REFRESH_SECONDS = 0.25
ROOMS_KEPT = 10_000
# How old the room's stored snapshot may be before a read steps the room (lua/lib.lua,
# STEP_MS: the same).
STEP_MS = 750
# How old a snapshot the worker stored may be (lua/lib.lua, room_step's w): the worker
# steps every STEP_MS, and the processes leave it to it unless it is this late.
WORKER_MS = STEP_MS + 250
# For SETTLE_MS after the frontier's slope changed (the opening, a sell-out, stock back, a
# pause, a new rate: lua/lib.lua, step_due) a read steps the room once the snapshot is
# SETTLE_STEP_MS old, so the change's first effects show at once.
SETTLE_MS = 2000
SETTLE_STEP_MS = 250
# How far ahead of the snapshot's time a process carries the frontier on, for positions:
# the snapshot is up to a step and a read old.
EXTRAPOLATE_MS = 1500
# After the room found itself on another Redis process (a failover, a restart from disk:
# lua/lib.lua, check_server), how long polled tickets are offered for putting back: a
# few of the longest poll intervals, so every buyer still waiting polls within it.
SUSPECT_MS = 300_000
# A corner is kept this much longer than a pass lives (as lua/lib.lua, trim_corners).
CORNER_SLACK_MS = 5000


class Snapshot(msgspec.Struct):
    """lua/lib.lua's room_snapshot; `none`: the event has no waiting room."""

    none: int = 0
    g: int = 0
    now: int = 0
    o: int = 0
    mv: int = 0
    closed: int = 0
    stock: int = 1
    apm: int = 1
    ttl: int = 600
    on: int | None = None
    f: str = "0"
    t: int = 0
    n: int = 0
    P: int = 0
    hb: int = 0
    ls: int = 0
    nl: int = 0
    fk: str = ""
    fa: int = 0
    r: int = 0
    lv: int = 0
    fe: int = 0
    ft: int = 0
    hc: int = 0
    ct: int = 0
    w: int = 0


class _StateReply(msgspec.Struct):
    room: Snapshot
    left: list[str] = []
    more: int = 0
    corners: list[str] = []
    from_: int = msgspec.field(name="from", default=0)
    ladder: str | None = None


_decode_state = msgspec.json.Decoder(_StateReply).decode
_decode_snapshot = msgspec.json.Decoder(Snapshot).decode


class _Clock:
    """Redis's clock as this process reckons it (wall clock + the offset its last step's
    reply showed): whether a stored snapshot is STEP_MS old is judged on Redis's time."""

    offset_ms = 0

    @classmethod
    def now(cls) -> int:
        return int(time.time() * 1000) + cls.offset_ms

    @classmethod
    def heard(cls, redis_now_ms: int) -> None:
        cls.offset_ms = redis_now_ms - int(time.time() * 1000)


def _score(place: str) -> float:
    number = int(place[1:])
    return number / 2**52 if place[0] == "p" else 1.0 + number


class RoomState:
    """One room as this process last read it."""

    def __init__(self) -> None:
        self.snap = Snapshot(none=1)
        self.read_at = -math.inf  # monotonic time the last read was sent
        self.reading: asyncio.Task[None] | None = None
        self.more = False
        self.force = False  # step the room with the next read (this process changed it)
        # Tickets whose joins were lost with a primary, put back by the next read
        # (customer -> kind, number).
        self.lost: dict[str, tuple[str, int]] = {}
        # (customer, place, the room's failover count) sent once
        self.offered: set[tuple[str, str, int]] = set()
        self._reset()

    def _reset(self) -> None:
        self.left: set[str] = set()  # "<place> <customer>"
        self.removed: list[float] = []  # scores taken out of the order after the opening
        self.left_seq = 0
        self.corner_t: list[int] = []
        self.corner_f: list[float] = []
        self.corner_next = 0
        self.ladder_k: list[int] = []
        self.ladder_r: list[int] = []
        self.has_ladder = False
        self.ladder_lv = 0
        self.f_shown = 0.0  # the most f_now gave: a position never moves back

    @property
    def f(self) -> float:
        return float(self.snap.f)

    def f_now(self, now_ms: int) -> float:
        """The frontier now, carried on at the rate from the last read while it moves
        (at most EXTRAPOLATE_MS): every process, whenever it read, shows a buyer about the
        same position, so that moving between processes does not move them back."""
        f = self.f
        if self.snap.mv:
            ahead = min(max(0, now_ms - self.snap.t), EXTRAPOLATE_MS)
            f += ahead * self.snap.apm / 60_000
        # A snapshot after a stall (sold out) may stand behind what was carried on before.
        self.f_shown = max(self.f_shown, f)
        return self.f_shown

    def needs_ladder(self, snap: Snapshot | None = None) -> bool:
        snap = snap or self.snap
        return bool(snap.o) and (not self.has_ladder or self.ladder_lv != snap.lv)

    def fresh(self) -> bool:
        if self.more or self.needs_ladder():
            return False
        return time.monotonic() < self.read_at + REFRESH_SECONDS

    def merge(self, snap: Snapshot) -> None:
        """A newer snapshot's figures (a join's): the logs still come with the next read."""
        if snap.g != self.snap.g:
            self._reset()
            self.read_at = -math.inf
            self.snap = snap
        elif snap.now >= self.snap.now:
            self.snap = snap

    def apply(self, reply: _StateReply) -> bool:
        """Take in a read; False when it was of another generation than the logs asked
        for (the room was turned off and on): read again."""
        snap = reply.room
        if snap.g != self.snap.g or snap.none:
            asked_from_start = self.left_seq == 0 and self.corner_next == 0
            self._reset()
            self.snap = snap
            if snap.none or not asked_from_start:
                return bool(snap.none)  # else the logs came for the old room's numbers
        self.snap = snap
        for i in range(0, len(reply.left) - 1, 2):
            entry, tag = reply.left[i], int(float(reply.left[i + 1]))
            self.left.add(entry)
            self.left_seq = max(self.left_seq, tag // 4)
            if tag % 4 == 3:  # taken out of the order after the opening: ranks move up
                bisect.insort(self.removed, _score(entry.split(" ", 1)[0]))
        self.more = bool(reply.more)
        if reply.from_ > self.corner_next:  # dropped before we saw them: start again
            self.corner_t, self.corner_f = [], []
        for corner in reply.corners:
            t, f = corner.split(" ")
            self.corner_t.append(int(float(t)))
            self.corner_f.append(float(f))
        self.corner_next = reply.from_ + len(reply.corners)
        self._trim(snap.now - snap.ttl * 1000 - CORNER_SLACK_MS)
        if reply.ladder is not None:
            words = reply.ladder.split()
            self.ladder_r = [int(w) for w in words[0::2]]
            self.ladder_k = [int(w) for w in words[1::2]]
            self.has_ladder, self.ladder_lv = True, snap.lv
        return True

    def _trim(self, before_ms: int) -> None:
        drop = 0
        while drop + 1 < len(self.corner_t) and self.corner_t[drop + 1] < before_ms:
            drop += 1
        if drop:
            del self.corner_t[:drop], self.corner_f[:drop]

    # --- a ticket, from the state alone ----------------------------------------------

    def ours(self, t: Ticket) -> bool:
        """Whether `t` (signed by us) is of this room: of its generation, or of an earlier
        one when this room began without the admin turning it on (r: Redis lost the room
        and its event was loaded again; an earlier room turned off has no such tickets)."""
        return t.generation == self.snap.g or bool(self.snap.r and t.generation < self.snap.g)

    def check_lost(self, t: Ticket) -> None:
        """A ticket the room may not have (its join lost with a primary): its place is in
        it, and the next read puts it back there. No Redis call here: an arrival past the
        room's count, or (once each, per process) one past where losses began (nl), of
        the room Redis lost, or polled while the room is suspect (it found itself on
        another Redis process lately: a replica promoted without the last joins)."""
        snap = self.snap
        if len(self.lost) >= 1000:
            return
        if t.generation != snap.g:
            self._offer(t)
        elif snap.fe and snap.now - snap.ft < SUSPECT_MS:
            self._offer(t, snap.fe)
        elif t.kind == "a" and snap.o:
            if t.number > snap.n:
                self.lost[t.customer] = ("a", t.number)  # with the next read, not sooner
            elif snap.nl and t.number > snap.nl:
                # Lost too, though n has moved past it (others were put back first).
                self._offer(t)

    def _offer(self, t: Ticket, suspect: int = 0) -> None:
        if (t.customer, t.place, suspect) in self.offered:
            return
        if len(self.offered) > 100_000:
            self.offered.clear()
        self.offered.add((t.customer, t.place, suspect))
        self.lost[t.customer] = (t.kind, t.number)

    def admitted(self, t: Ticket) -> bool:
        fk = self.snap.fk
        if fk == "all":
            return t.kind == "p" or t.number <= self.snap.fa
        return fk != "" and t.kind == "p" and t.number <= int(fk)

    def rank(self, t: Ticket) -> int:
        """1 = first in the order (admitted or not)."""
        base = self.snap.P + t.number if t.kind == "a" else self._ladder_rank(t.number)
        return max(1, base - bisect.bisect_left(self.removed, t.score))

    def _ladder_rank(self, k: int) -> int:
        ks, rs = self.ladder_k, self.ladder_r
        if not ks:
            return 1
        i = bisect.bisect_right(ks, k)
        if i == 0:
            return rs[0]
        if i == len(ks):
            return rs[-1]
        k0, k1, r0, r1 = ks[i - 1], ks[i], rs[i - 1], rs[i]
        if k1 == k0:
            return r0
        return r0 + round((r1 - r0) * (k - k0) / (k1 - k0))

    def position(self, t: Ticket, now_ms: int) -> int:
        """1 = next in line, for a ticket not admitted."""
        return max(1, self.rank(t) - math.floor(self.f_now(now_ms)))

    def admitted_at(self, rank: int) -> float:
        """When the frontier passed `rank` (ms), from its corners: the line between the
        two around it; the oldest corner for a rank before all of them."""
        ts, fs = self.corner_t, self.corner_f
        i = bisect.bisect_left(fs, rank)
        if i == len(fs):
            t, f = self.snap.t, self.f
            if not ts or f < rank or f == fs[-1]:
                return float(t)
            t0, f0 = ts[-1], fs[-1]
            return t0 + (rank - f0) / (f - f0) * (t - t0)
        if i == 0:
            return float(ts[0])
        t0, f0, t1, f1 = ts[i - 1], fs[i - 1], ts[i], fs[i]
        return t0 + (rank - f0) / (f1 - f0) * (t1 - t0)


class Rooms:
    """The rooms this process answers polls for, the least recently used forgotten."""

    def __init__(self, size: int) -> None:
        self._rooms: OrderedDict[str, RoomState] = OrderedDict()
        self._size = size

    def known(self, event_id: str) -> RoomState | None:
        return self._rooms.get(event_id)

    def _state(self, event_id: str) -> RoomState:
        state = self._rooms.get(event_id)
        if state is None:
            state = self._rooms[event_id] = RoomState()
            if len(self._rooms) > self._size:
                self._rooms.popitem(last=False)
        self._rooms.move_to_end(event_id)
        return state

    async def current(self, svc: Services, event_id: str) -> RoomState:
        """The room's state, read again first when older than REFRESH_SECONDS (one read
        at a time: the polls that find it under way wait for it)."""
        state = self._state(event_id)
        if state.fresh():
            return state
        if state.reading is None:
            state.reading = asyncio.ensure_future(_read(svc, event_id, state))
        try:
            await asyncio.shield(state.reading)
        except BaseException:
            if state.read_at == -math.inf and self._rooms.get(event_id) is state:
                del self._rooms[event_id]  # never read (no such event?): not known
            raise
        return state

    def merge(self, event_id: str, snap: Snapshot) -> RoomState:
        state = self._state(event_id)
        state.merge(snap)
        return state

    def stale(self, event_id: str, step: bool = True) -> None:
        """This process changed the room (a leave, an admin change) or heard stock come
        back: read it again first, and step it (`step`; a leave only needs the log)."""
        state = self._rooms.get(event_id)
        if state is not None:
            state.read_at = -math.inf
            state.force = state.force or step


async def _stored(svc: Services, event_id: str, state: RoomState) -> bool:
    """The read of the snapshot the room's last step stored, when it will do: one HMGET.
    False: step the room, or fetch what the snapshot lacks, with the script."""
    if state.force or state.lost or state.more:
        return False
    try:
        sj, stepped, ls, hc = await svc.redis.hmget(
            event_keys(event_id).queue[3], ["sj", "st", "ls", "hc"]
        )
    except Exception:  # the script's call has the retries: let it meet the failure
        return False
    if sj is None or stepped is None:
        return False
    snap = _decode_snapshot(sj)
    now = _Clock.now()
    due = WORKER_MS if snap.w else STEP_MS
    if now - snap.ct < SETTLE_MS:
        due = SETTLE_STEP_MS
    if now - int(stepped) >= due:
        return False  # time the room was stepped: the script does
    if snap.g != state.snap.g or state.needs_ladder(snap):
        return False  # another room than the logs are of, or a ladder to fetch
    if int(ls or 0) > state.left_seq or int(hc or 0) > state.corner_next:
        return False
    if snap.now >= state.snap.now:  # (a join's reply may have brought a later one)
        state.snap = snap
    return True


async def _read(svc: Services, event_id: str, state: RoomState) -> None:
    force = state.force
    try:
        started = time.monotonic()
        if await _stored(svc, event_id, state):
            state.read_at = started
            return
        state.force = False
        for _ in range(3):
            started = time.monotonic()
            lost, state.lost = state.lost, {}
            reply = await call_loaded(
                svc,
                "queue_state",
                event_id,
                str(state.left_seq),
                str(state.corner_next),
                "0" if state.has_ladder and state.ladder_lv == state.snap.lv else "1",
                msgspec.json.encode([[k, n, c] for c, (k, n) in lost.items()]),
                "1" if force else "0",
                extra_keys=event_keys(event_id).queue,
            )
            answer = _decode_state(reply)
            _Clock.heard(answer.room.now)
            if state.apply(answer):
                state.read_at = started
                return
    except BaseException:
        state.force = state.force or force
        raise
    finally:
        state.reading = None


ROOMS = Rooms(ROOMS_KEPT)
soldout.RESTOCK_LISTENERS.append(ROOMS.stale)
