"""What reconcile finds: one inconsistency (a Finding), the report of one event and of a
run, and the tally a check keeps as it goes."""

from __future__ import annotations

from collections import Counter

import msgspec

# Problems listed per event; all are counted.
MAX_LISTED = 50


class Finding(msgspec.Struct, omit_defaults=True):
    """One inconsistency; named apart from the problem details of errors (schemas.Problem)."""

    kind: str
    detail: str


class CategoryReport(msgspec.Struct):
    name: str
    capacity: int | None  # None: not in Redis
    available: int | None
    held: int | None
    sold: int | None
    expected: dict[str, int]  # capacity, available, held, sold from the records
    consistent: bool


class OutboxReport(msgspec.Struct):
    waiting: int
    oldest_seconds: float | None
    stuck: bool
    dead_letters: int


class SeatReport(msgspec.Struct):
    total: int
    available: int
    held: int
    sold: int


class EventReport(msgspec.Struct):
    event_id: str
    consistent: bool
    in_redis: bool
    categories: list[CategoryReport]
    seats: SeatReport
    bookings_in_postgres: int
    outbox: OutboxReport
    leaked_holds: int
    problem_counts: dict[str, int]
    problems: list[Finding]
    repairs: list[str] = msgspec.field(default_factory=list)
    # Over and out of Redis (service/durable/archive.py): checked against PostgreSQL alone.
    archived: bool = False


class Report(msgspec.Struct):
    consistent: bool
    checked_at: str
    repaired: bool
    events: list[EventReport]


class Findings:
    """What a check of one event found, as it goes."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.listed: list[Finding] = []

    def add(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append(Finding(kind, detail))


def many(n: int, one: str, many: str | None = None) -> str:
    """`n` and the noun, in the plural unless n is 1."""
    return f"{n} {one}" if n == 1 else f"{n} {many or one + 's'}"
