"""Holds and bookings as the Lua scripts store them in Redis (and the outbox carries).

The scripts write short JSON keys (a hold record is stored once per hold and carried in
every outbox entry, so each byte counts a million times in a drop); Python reads them by
their names through msgspec's renaming. The wire names are the scripts' (lua/hold.lua,
lua/confirm.lua) and must not change: records already in Redis and in outbox streams use
them.
"""

from __future__ import annotations

import msgspec


class SaleRecord(msgspec.Struct, kw_only=True):
    """What a hold and the booking made of it share."""

    id: str
    customer_id: str = msgspec.field(name="c")
    # category -> tickets, and the same as [category, tickets] pairs in the order asked for
    quantities: dict[str, int] = msgspec.field(name="q")
    items: list[tuple[str, int]] = msgspec.field(default_factory=list, name="it")
    seats: list[str] = msgspec.field(default_factory=list, name="st")
    quantity: int = msgspec.field(name="n")  # tickets in all
    total_cents: int = msgspec.field(name="t")
    currency: str = msgspec.field(name="cu")
    created_ms: int = msgspec.field(name="ca")  # Redis server time, epoch milliseconds
    status: str = msgspec.field(name="s")


class HoldRecord(SaleRecord, kw_only=True):
    """A hold as lua/hold.lua stores it (lua/confirm.lua and lua/lib.lua end_hold update it)."""

    expires_ms: int = msgspec.field(name="ex")
    booking_id: str | None = msgspec.field(default=None, name="b")


class BookingRecord(SaleRecord, kw_only=True):
    """A booking as lua/confirm.lua stores it (and puts in the outbox)."""

    hold_id: str = msgspec.field(name="h")
    payment_ref: str | None = msgspec.field(default=None, name="pr")


decode_hold = msgspec.json.Decoder(HoldRecord).decode
decode_booking = msgspec.json.Decoder(BookingRecord).decode
