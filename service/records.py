"""Holds and bookings as the Lua scripts store them in Redis (and the outbox carries)."""

from __future__ import annotations

import msgspec


class HoldRecord(msgspec.Struct):
    """A hold as lua/hold.lua stores it."""

    id: str
    c: str
    q: dict[str, int]
    n: int
    t: int
    cu: str
    ca: int
    ex: int
    s: str
    it: list[tuple[str, int]] = []
    st: list[str] = []
    b: str | None = None


class BookingRecord(msgspec.Struct):
    """A booking as lua/confirm.lua stores it (and puts in the outbox)."""

    id: str
    h: str
    c: str
    q: dict[str, int]
    n: int
    t: int
    cu: str
    ca: int
    s: str
    it: list[tuple[str, int]] = []
    st: list[str] = []
    pr: str | None = None


decode_hold = msgspec.json.Decoder(HoldRecord).decode
decode_booking = msgspec.json.Decoder(BookingRecord).decode
