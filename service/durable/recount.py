"""The repair's recount of an event's live state from its records: overdue holds expired,
every seat in the one state its records give it, and the counters (stock per category,
tickets per customer) recounted. A bounded script call at a time, each a few
milliseconds at most however big the event (lua/repair_*.lua), while the event sells.

Each call re-reads what it changes, so nothing a sale did between two calls is
overwritten. The counters are not set but moved by what they were off: a sale moves a
counter and its records together, so how far a counter is off stays the same while the
event sells, and is measured once: each counter read at a known Redis time
(lua/repair_read.lua), the records read after it, and each record's times (created,
ended, cancelled) tell what it counted for at that time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TypeVar

import msgspec

from service.core.keys import event_keys
from service.durable import live, scans
from service.durable.checks import RECORDS_PER_CALL, SEATS_PER_CALL
from service.hotpath.context import Services

# Holds expired, and records re-read, per call at most; customers read per call, about.
EXPIRE_PER_CALL = 100
CLAIMS_PER_CALL = 50
CUSTOMERS_PER_CALL = 500


T = TypeVar("T")


def _batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Recount(msgspec.Struct):
    expired: int  # holds expired, past their deadline
    released: list[str]  # holds released: a sale has one of their seats
    before: dict[str, dict[str, int]]  # category -> available, held, sold: Redis's
    after: dict[str, dict[str, int]]  # ... and the records', at the same moment
    unsure: int  # customers left uncounted: they bought while their count was read


async def recount(svc: Services, event_id: str) -> Recount:
    keys = event_keys(event_id)
    expired = await _expire(svc, event_id)
    released = await _claims(svc, event_id, "b", keys.bookings)
    released += await _claims(svc, event_id, "h", keys.holds)
    await _seats(svc, event_id)
    before, after, unsure = await _counters(svc, event_id)
    return Recount(expired, released, before, after, unsure)


class _Expired(msgspec.Struct):
    expired: int
    more: bool


async def _expire(svc: Services, event_id: str) -> int:
    expired = 0
    while True:
        reply = await live.call_loaded(svc, "repair_expire", event_id, EXPIRE_PER_CALL)
        batch = msgspec.json.decode(reply, type=_Expired)
        expired += batch.expired
        if not batch.more:
            return expired


class _Status(msgspec.Struct):
    s: str


class _Released(msgspec.Struct):
    released: list[str] = []


_decode_status = msgspec.json.Decoder(_Status).decode
_decode_released = msgspec.json.Decoder(_Released).decode


async def _claims(svc: Services, event_id: str, kind: str, key: str) -> list[str]:
    """Records -> seats (lua/repair_claims.lua). Only the records live when read: one that
    ended stays ended, and one made since was made whole by its sale."""
    live_status = "confirmed" if kind == "b" else "held"
    released: list[str] = []
    async for pairs in scans.hscan(svc, key):
        ids = [k.decode() for k, raw in pairs if _decode_status(raw).s == live_status]
        for batch in _batches(ids, CLAIMS_PER_CALL):
            reply = await live.call_loaded(svc, "repair_claims", event_id, kind, *batch)
            released += _decode_released(reply).released
    return released


class _SeatsDone(msgspec.Struct):
    next: int


async def _seats(svc: Services, event_id: str) -> None:
    """Seats -> records (lua/repair_seats.lua), in seat order a chunk at a time."""
    order = (event_keys(event_id).seat_order,)
    first = 0
    while first >= 0:
        args = (first, SEATS_PER_CALL, RECORDS_PER_CALL)
        reply = await live.call_loaded(svc, "repair_seats", event_id, *args, extra_keys=order)
        first = msgspec.json.decode(reply, type=_SeatsDone).next


class _Counters(msgspec.Struct):
    at: int
    cap: dict[str, str]
    avail: dict[str, str]
    held: dict[str, str]
    sold: dict[str, str]


class _Customers(msgspec.Struct):
    at: int
    cursor: str
    customers: list[str] = []


class _Life(msgspec.Struct):
    """What a hold or booking record tells of its life, in Redis times (ms): created
    (`ca`), ended (a hold's `e`) or cancelled (a booking's `xa`)."""

    c: str
    n: int
    q: dict[str, int]
    ca: int
    s: str
    e: int | None = None
    xa: int | None = None

    def counts_at(self, at: int, hold: bool) -> bool:
        """Whether its tickets were held (a hold) or sold (a booking) at `at`. A record
        that ended without saying when ended long before (an older version's)."""
        if self.ca >= at:
            return False
        if self.s == ("held" if hold else "confirmed"):
            return True
        ended = self.e if hold else self.xa
        return ended is not None and ended >= at and (hold or self.s == "cancelled")

    def changed_within(self, start: int, end: int) -> bool:
        return any(t is not None and start <= t <= end for t in (self.ca, self.e, self.xa))


_decode_life = msgspec.json.Decoder(_Life).decode


async def _counters(
    svc: Services, event_id: str
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]], int]:
    """Recount the category counters and the per-customer counts; returns Redis's and the
    records' figures per category, and how many customers were left uncounted."""
    raw = await live.call_loaded(svc, "repair_read", event_id, "counters")
    counters = msgspec.json.decode(raw, type=_Counters)
    read: dict[str, tuple[int, int]] = {}  # customer -> (count, Redis time of the read)
    cursor, first, last = "0", 0, 0
    while True:
        raw = await live.call_loaded(svc, "repair_read", event_id, cursor, CUSTOMERS_PER_CALL)
        chunk = msgspec.json.decode(raw, type=_Customers)
        first, last, cursor = first or chunk.at, chunk.at, chunk.cursor
        flat = chunk.customers
        for customer, count in zip(flat[::2], flat[1::2], strict=True):
            read.setdefault(customer, (int(count), chunk.at))
        if cursor == "0":
            break
    # The records, read after every count: each says what it counted for when it was read.
    held: Counter[str] = Counter()
    sold: Counter[str] = Counter()
    owned: Counter[str] = Counter()  # customer -> tickets, when their count was read
    unsure: set[str] = set()
    keys = event_keys(event_id)
    for key, hold in ((keys.holds, True), (keys.bookings, False)):
        async for pairs in scans.hscan(svc, key):
            for _, value in pairs:
                r = _decode_life(value)
                if r.counts_at(counters.at, hold):
                    (held if hold else sold).update(r.q)
                # A customer the read did not return had no count at one of its moments
                # (HSCAN returns whatever is there throughout): right only if none of their
                # records changed meanwhile.
                at = read[r.c][1] if r.c in read else first
                if r.c not in read and r.changed_within(first, last):
                    unsure.add(r.c)
                if r.counts_at(at, hold):
                    owned[r.c] += r.n
    before, after, cats = {}, {}, {}
    for cat, cap in counters.cap.items():
        s, h = sold[cat], held[cat]
        before[cat] = {
            "available": int(counters.avail.get(cat, 0)),
            "held": int(counters.held.get(cat, 0)),
            "sold": int(counters.sold.get(cat, 0)),
        }
        # Never on sale what is held or sold, even when that is more than the capacity.
        after[cat] = {"available": max(0, int(cap) - s - h), "held": h, "sold": s}
        cats[cat] = [after[cat][k] - before[cat][k] for k in ("available", "held", "sold")]
    customers = {c: owned[c] - read.get(c, (0, 0))[0] for c in {*read, *owned} - unsure}
    moves = [(c, n) for c, n in customers.items() if n]
    for i, batch in enumerate(_batches(moves, CUSTOMERS_PER_CALL)):
        await _adjust(svc, event_id, cats if i == 0 else {}, dict(batch))
    if not moves:
        await _adjust(svc, event_id, cats, {})
    return before, after, len(unsure)


async def _adjust(
    svc: Services, event_id: str, cats: dict[str, list[int]], cust: dict[str, int]
) -> None:
    if any(any(v) for v in cats.values()) or cust:
        moves = msgspec.json.encode({"cats": cats, "cust": cust})
        await live.call_loaded(svc, "repair_adjust", event_id, moves)
