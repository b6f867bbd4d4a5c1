"""The hot path: holds, confirms, releases and the live seat map, one script call each."""

from __future__ import annotations

import bisect
import time
from typing import NamedTuple, NoReturn

import msgspec

from service.core import errors, randompool, schemas
from service.core.keys import event_keys
from service.core.records import BookingRecord, HoldRecord, decode_booking, decode_hold
from service.core.timefmt import from_ms
from service.durable import archived
from service.durable.live import DETOURS, call_loaded, ensure_loaded
from service.hotpath import ratelimit
from service.hotpath.context import Services
from service.hotpath.scripts import Idempotency, raise_for_error

_encode = msgspec.json.encode


def uuid7() -> str:
    """A time-ordered booking id (RFC 9562 UUIDv7): 48 bits of milliseconds, then random."""
    value = (time.time_ns() // 1_000_000) << 80 | randompool.randbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    h = f"{value:032x}"  # the canonical form, without building a uuid.UUID per confirm
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def hold_view(event_id: str, h: HoldRecord, status: str | None = None) -> schemas.Hold:
    return schemas.Hold(
        hold_id=h.id,
        event_id=event_id,
        customer_id=h.customer_id,
        status=status or h.status,  # type: ignore[arg-type]
        created_at=from_ms(h.created_ms),
        expires_at=from_ms(h.expires_ms),
        items=[schemas.HoldItem(category=c, quantity=n) for c, n in h.items],
        seats=h.seats,
        total=h.total_cents,
        currency=h.currency,
        booking_id=h.booking_id,
    )


def booking_view(
    event_id: str, b: BookingRecord, persisted: bool | msgspec.UnsetType = msgspec.UNSET
) -> schemas.Booking:
    return schemas.Booking(
        booking_id=b.id,
        hold_id=b.hold_id,
        event_id=event_id,
        customer_id=b.customer_id,
        status=b.status,  # type: ignore[arg-type]
        items=[schemas.HoldItem(category=c, quantity=n) for c, n in b.items],
        seats=b.seats,
        total=b.total_cents,
        currency=b.currency,
        payment_ref=b.payment_ref,
        confirmed_at=from_ms(b.created_ms),
        persisted=persisted,
    )


class HoldCall(NamedTuple):
    """What lua/hold.lua takes after the common ARGV: built here only, for the service and
    for the tests and benches that call the script itself."""

    args: tuple[str | bytes | int, ...]
    extra_keys: tuple[str, ...]


def hold_call(
    event_id: str,
    hold_id: str,
    customer: str,
    items: bytes,
    seats: bytes = b"[]",
    limit: int = 0,
    window_seconds: int = 60,
) -> HoldCall:
    """`items` and `seats` JSON-encoded; `limit` hold attempts per customer and window
    (0: no limit)."""
    keys = event_keys(event_id)
    return HoldCall(
        (hold_id, customer, items, seats, limit, window_seconds * 1000),
        (keys.hold_ttl(hold_id), keys.customer_rate(customer)),
    )


async def _call(
    svc: Services,
    name: str,
    event_id: str,
    *args: str | bytes | int,
    extra_keys: tuple[str, ...] = (),
    idempotency: Idempotency | None = None,
    durable: bool = False,
) -> bytes:
    """live.call_loaded, with the script called here: a hold goes from its route through
    this module and scripts.py to the script pipe and back, and only a reply that asks
    for the event to be loaded (or holds reclaimed) first goes round by live.py."""
    reply = await svc.scripts.call_event(
        name, event_id, *args, extra_keys=extra_keys, idempotency=idempotency, durable=durable
    )
    if reply in DETOURS:
        return await call_loaded(
            svc,
            name,
            event_id,
            *args,
            extra_keys=extra_keys,
            idempotency=idempotency,
            durable=durable,
            reply=reply,
        )
    raise_for_error(reply)
    return reply


async def _invalid(svc: Services, event_id: str, detail: str) -> NoReturn:
    """A body the event could never accept; but event_not_found comes first."""
    await ensure_loaded(svc, event_id)
    raise errors.ValidationError(detail)


async def create_hold_counted(
    svc: Services, event_id: str, body: schemas.HoldCreate, idem: Idempotency | None
) -> tuple[schemas.Hold, ratelimit.Quota | None]:
    """The hold, and the customer's hold-attempt limit as it stands after it (None when
    the limit is off, or for a replayed Idempotency-Key)."""
    count = sum(i.quantity for i in body.items) + len(body.seats)
    if count == 0:
        await _invalid(svc, event_id, "ask for at least one ticket in `items` or `seats`")
    if len({i.category for i in body.items}) != len(body.items):
        await _invalid(svc, event_id, "a category appears at most once in `items`")
    if len(set(body.seats)) != len(body.seats):
        await _invalid(svc, event_id, "a seat appears at most once in `seats`")
    if idem is None and not body.seats:
        # Categories this process knows are sold out: the script's answer, without Redis.
        known = svc.sold_out.refusal(event_id, body.items, count)
        if known is not None:
            try:
                raise known
            finally:
                # Else this frame (in the error's traceback) and the error would hold each
                # other: a cycle per refusal, left to the collector (31 us a refusal at a
                # young-generation threshold of 20,000, more than the refusal's own work).
                del known
    since = svc.sold_out.step
    hold_id = randompool.token_urlsafe()  # 128 random bits: knowing it is the authority
    limit = svc.settings.rate_limit_customer_holds
    window = svc.settings.rate_limit_customer_window_seconds
    items = _encode([(i.category, i.quantity) for i in body.items])
    hold = hold_call(event_id, hold_id, body.customer_id, items, _encode(body.seats), limit, window)
    try:
        reply = await _call(
            svc, "hold", event_id, *hold.args, extra_keys=hold.extra_keys, idempotency=idem
        )
    except errors.SoldOut as e:
        if idem is None:  # a replayed key's answer may be old news
            svc.sold_out.learn(event_id, e.extra["available"], count, since)
        raise
    record, _, rate = reply.partition(b"\n")
    quota = None
    if rate:
        remaining, reset = rate.split()
        quota = ratelimit.Quota("customer", limit, window, int(remaining), int(reset))
    # A replayed Idempotency-Key returns the first reply: the hold as it was created.
    return hold_view(event_id, decode_hold(record), "held"), quota


async def confirm_hold(
    svc: Services,
    event_id: str,
    hold_id: str,
    body: schemas.HoldConfirm,
    idem: Idempotency | None,
    customer: str | None = None,
) -> schemas.Booking:
    """`customer`: the customer token's (tokens on); another's hold is hold_not_found."""
    try:
        reply = await _call(
            svc,
            "confirm",
            event_id,
            hold_id,
            uuid7(),
            body.payment_ref or "",
            customer or "",
            idempotency=idem,
            durable=True,
        )
    except errors.EventArchived:
        raise _archived_hold(hold_id) from None
    return booking_view(event_id, decode_booking(reply))


def _archived_hold(hold_id: str) -> errors.BoxofficeError:
    """An archived event has no hold records left (it had no live hold when archived)."""
    return errors.HoldNotFound(f"no hold {hold_id!r} in this event: it is over and archived")


async def release_hold(
    svc: Services,
    event_id: str,
    hold_id: str,
    idem: Idempotency | None,
    customer: str | None = None,
) -> None:
    """`customer`: the customer token's (tokens on); another's hold is hold_not_found."""
    try:
        await _call(svc, "release", event_id, hold_id, customer or "", idempotency=idem)
    except errors.EventArchived:
        raise _archived_hold(hold_id) from None


async def get_hold(
    svc: Services, event_id: str, hold_id: str, customer: str | None = None
) -> schemas.Hold:
    """`customer`: the customer token's (tokens on): another's hold is not found."""
    # One script call (the script pipe's, as a hold's): a pipeline of redis-py's cost the
    # API process twice what the whole read costs through the pipe (README "Benchmarks").
    try:
        reply = await _call(svc, "hold_read", event_id, hold_id)
    except errors.EventArchived:
        raise _archived_hold(hold_id) from None
    now, _, raw = reply.partition(b" ")
    h = decode_hold(raw) if raw else None
    if h is None or (customer is not None and h.customer_id != customer):
        raise errors.HoldNotFound(f"no hold {hold_id!r} in this event")
    # Overdue is expired, whether or not anything has reclaimed it yet.
    return hold_view(
        event_id, h, "expired" if h.status == "held" and int(now) >= h.expires_ms else None
    )


class _SeatChunk(msgspec.Struct):
    """A reply of lua/seats.lua."""

    next: int
    cats: list[tuple[str, int, int, int]] = []  # name, first and last position, block seats
    first: int = 0
    labels: list[str] = []
    st: str = ""
    pos: list[int] | None = None


_decode_seat_chunk = msgspec.json.Decoder(_SeatChunk).decode
MAX_SEAT_LIMIT = 5000
# Positions one script call examines: about a millisecond of Redis time. A page of more
# is several calls, so that no page blocks Redis for long, whatever the event's size.
SEATS_PER_CALL = 1000
_STATUS = {"a": "available", "h": "held", "b": "sold"}
_LETTER = {"available": "a", "held": "h", "sold": "b"}


def _seat_cursor(cursor: str | None) -> int:
    # A position in the seat order: opaque to the client, checked here.
    if cursor is None:
        return 0
    if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 7):
        raise errors.ValidationError("`cursor` is not one this API gave out")
    return int(cursor)


def _seats(chunk: _SeatChunk) -> list[schemas.Seat]:
    out = []
    firsts = [c[1] for c in chunk.cats]
    for i, label in enumerate(chunk.labels):
        pos = chunk.first + i if chunk.pos is None else chunk.pos[i]
        name, lo, _, blocks = chunk.cats[bisect.bisect_right(firsts, pos) - 1]
        row: str | None = None
        number: int | None = None
        if pos - lo < blocks:
            # A block seat's label is `<row>-<number>`, and a row name has no `-`.
            row, _, n = label.partition("-")
            number = int(n)
        status = _STATUS[chunk.st[i]]
        out.append(schemas.Seat(label=label, category=name, status=status, row=row, number=number))  # type: ignore[arg-type]
    return out


async def list_seats(
    svc: Services,
    event_id: str,
    category: str | None,
    status: str | None,
    limit: int = 1000,
    cursor: str | None = None,
) -> schemas.SeatList:
    """One page of the seat map: `limit` positions of the seat order examined, in short
    script calls (a status filter may leave fewer seats than that)."""
    first = _seat_cursor(cursor)
    try:
        return await _live_seats(svc, event_id, category, status, limit, first)
    except errors.EventArchived:
        return await archived.list_seats(svc, event_id, category, status, limit, first)


async def _live_seats(
    svc: Services, event_id: str, category: str | None, status: str | None, limit: int, first: int
) -> schemas.SeatList:
    left = limit
    order = (event_keys(event_id).seat_order,)
    seats: list[schemas.Seat] = []
    while True:
        reply = await _call(
            svc,
            "seats",
            event_id,
            first,
            min(SEATS_PER_CALL, left),
            category or "",
            _LETTER[status] if status else "",
            extra_keys=order,
        )
        chunk = _decode_seat_chunk(reply)
        seats += _seats(chunk)
        if chunk.next < 0:
            break
        # The script starts at the category's first seat when the cursor lies before it.
        left -= chunk.next - chunk.first
        if left <= 0:
            break
        first = chunk.next
    return schemas.SeatList(seats=seats, next_cursor=None if chunk.next < 0 else str(chunk.next))
