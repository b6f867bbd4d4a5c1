"""The outbox entry format, in one place.

An event's outbox stream carries its booking changes on their way to PostgreSQL. Entries
are written by lua/confirm.lua and lua/cancel.lua (and put back by
lua/replay_dead_letter.lua), read by the write-behind and by reconcile, and built here by
reconcile's repair. Fields:

- `op` = `confirm`: `booking` is the booking's record as Redis keeps it (JSON,
  service/core/records.py BookingRecord);
- `op` = `cancel`: `booking` is the booking id, `at` when it was cancelled (epoch ms).

A dead letter is an entry plus the fields DEAD_LETTER_META.

Also here, for whoever watches the outbox (the API's metrics, reconcile) without running
the write-behind (service/durable/writebehind.py): how much of it waits, and since when.
"""

from __future__ import annotations

from typing import Any

import msgspec

from service.core.keys import OUTBOX_GROUP, event_keys
from service.core.records import BookingRecord, decode_booking
from service.hotpath.context import Services

Fields = dict[bytes, bytes]
Entry = tuple[str, bytes, Fields]  # (event id, stream entry id, fields)

CONFIRM = b"confirm"
CANCEL = b"cancel"
# Fields a dead letter adds to the outbox entry it keeps (lua/replay_dead_letter.lua takes
# them as ARGV to drop them again).
DEAD_LETTER_META = (b"source_id", b"error", b"attempts", b"first_failed_at")


class Confirm(msgspec.Struct, frozen=True):
    booking: BookingRecord


class Cancel(msgspec.Struct, frozen=True):
    booking_id: str
    at_ms: int


def confirm_entry(booking: BookingRecord) -> Fields:
    return {b"op": CONFIRM, b"booking": msgspec.json.encode(booking)}


def cancel_entry(booking_id: str, at_ms: int) -> Fields:
    return {b"op": CANCEL, b"booking": booking_id.encode(), b"at": str(at_ms).encode()}


def decode(fields: Fields) -> Confirm | Cancel:
    """The change an entry stands for; raises (KeyError, ValueError, a msgspec error...)
    for an entry that does not hold one."""
    op = fields[b"op"]
    if op == CONFIRM:
        return Confirm(decode_booking(fields[b"booking"]))
    if op == CANCEL:
        return Cancel(fields[b"booking"].decode(), int(fields[b"at"]))
    raise ValueError(f"unknown outbox op {op!r}")


def op(fields: Fields) -> bytes | None:
    return fields.get(b"op")


def booking_id(fields: Fields) -> str | None:
    """The booking an entry is about, or None when the entry is too broken to say."""
    try:
        if fields.get(b"op") == CONFIRM:
            return decode_booking(fields[b"booking"]).id
        return fields[b"booking"].decode()
    except (KeyError, UnicodeDecodeError, msgspec.DecodeError):
        return None


def dead_letter(
    fields: Fields, source_id: bytes, error: str, attempts: int, first_failed_ms: int
) -> dict[Any, Any]:
    """The dead letter that keeps an entry, and why it stopped."""
    return {
        **fields,
        b"source_id": source_id,
        b"error": error.encode(),
        b"attempts": attempts,
        b"first_failed_at": first_failed_ms,
    }


def original_fields(dead_letter: Fields) -> Fields:
    """The outbox entry a dead letter keeps, without what the dead letter added."""
    return {k: v for k, v in dead_letter.items() if k not in DEAD_LETTER_META}


# --- the stream's state -------------------------------------------------------------------


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
    group = our_group(groups)
    last = text(group["last-delivered-id"])
    undelivered: Any = await svc.redis.xrange(keys.outbox, min=f"({last}", count=1)
    firsts = [stream_id(pending["min"])[0]] if pending["pending"] else []
    firsts += [stream_id(undelivered[0][0])[0]] if undelivered else []
    backlog = pending["pending"] + (group.get("lag") or 0)
    return OutboxState(backlog, min(firsts) if firsts else None, int(dead))


def our_group(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The write-behind's entry in an XINFO GROUPS reply."""
    return next(g for g in groups if text(g["name"]) == OUTBOX_GROUP)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def stream_id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = text(value).partition("-")
    return int(ms), int(seq or 0)
