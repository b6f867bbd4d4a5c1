"""What a booking must be to enter the durable record, and to be counted as sold.

A booking comes to PostgreSQL from an outbox entry (or from Redis's own record, when
reconcile writes what the outbox lost): data that passed through Redis, not the hold
script's own hands. So the write-behind checks each one against the event's catalog
before it writes it, and reconcile before it counts stock from one: a booking with a
negative quantity would otherwise put sold tickets back on sale. The rules follow how
lua/hold.lua builds a hold (and lua/confirm.lua turns it into a booking):

- at least one ticket; every category's tickets a positive number, adding up to `n`;
- `it` (what was asked for by category) names each category once, with a positive
  quantity, never more than the category's tickets;
- each seat once, a seat of the event; a seated category's tickets are its seats, a
  general-admission category's are what was asked for;
- every category the event's, the event's currency, and the total is each category's
  price times its tickets.

PostgreSQL's CHECK constraints (migration 0005) hold what a single row can say.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec

from service.core.records import BookingRecord


class Catalog(msgspec.Struct, frozen=True):
    """What the rules need of an event: its currency, its categories' prices, which
    categories are seated, and the category of each seat asked about."""

    currency: str
    prices: dict[str, int]
    seated: frozenset[str]
    seats: dict[str, str]


def shape(b: BookingRecord) -> str | None:
    """Why the booking cannot be, whatever the event; None when it can."""
    if b.quantity < 1:
        return f"{b.quantity} tickets: a booking has at least one"
    if any(n < 1 for n in b.quantities.values()):
        return f"tickets by category {b.quantities}: each must be at least 1"
    if sum(b.quantities.values()) != b.quantity:
        return f"tickets by category {b.quantities} do not add up to {b.quantity}"
    asked = dict(b.items)
    if len(asked) != len(b.items):
        return "a category appears twice in the items"
    for category, quantity in b.items:
        if quantity < 1 or quantity > b.quantities.get(category, 0):
            has = b.quantities.get(category, 0)
            return f"{quantity} asked in {category!r}, which has {has} tickets"
    if len(set(b.seats)) != len(b.seats):
        return "a seat appears twice"
    if b.total_cents < 0:
        return f"a total of {b.total_cents}"
    return None


def against(b: BookingRecord, catalog: Catalog | None) -> str | None:
    """Why the booking cannot be one of this event's (None: the event does not exist);
    None when it can."""
    if (why := shape(b)) is not None:
        return why
    if catalog is None:
        return "no such event"
    if b.currency != catalog.currency:
        return f"currency {b.currency!r}, the event's is {catalog.currency!r}"
    unknown = sorted(set(b.quantities) - set(catalog.prices))
    if unknown:
        return f"no category {unknown[0]!r} in the event"
    if unknown_seats := [label for label in b.seats if label not in catalog.seats]:
        return f"no seat {unknown_seats[0]!r} in the event"
    seats = Counter(catalog.seats[label] for label in b.seats)
    if stray := sorted(set(seats) - set(b.quantities)):
        return f"a seat in {stray[0]!r}, which has no tickets in the booking"
    asked = dict(b.items)
    for category, tickets in b.quantities.items():
        has = seats[category] if category in catalog.seated else asked.get(category, 0)
        if category not in catalog.seated and seats[category]:
            return f"seats in {category!r}, a category without seats"
        if has != tickets:
            what = "seats" if category in catalog.seated else "asked for"
            return f"{tickets} tickets in {category!r}, {has} {what}"
    total = sum(catalog.prices[c] * n for c, n in b.quantities.items())
    if b.total_cents != total:
        return f"a total of {b.total_cents}, the prices make {total}"
    return None


# Each event's categories, and the seats asked about, in one round trip.
_CATALOG = """
SELECT c.event_id, c.name, c.price, c.seated, e.currency, NULL AS label
FROM categories c JOIN events e ON e.id = c.event_id
WHERE c.event_id = ANY($1::text[])
UNION ALL
SELECT s.event_id, s.category, NULL, NULL, NULL, s.label
FROM seats s JOIN unnest($2::text[], $3::text[]) AS u(e, l) ON s.event_id = u.e AND s.label = u.l
"""


async def catalogs(raw: Any, bookings: list[tuple[str, BookingRecord]]) -> dict[str, Catalog]:
    """The catalogs of the events of (event id, booking) pairs, each with the seats its
    bookings name, read through an asyncpg connection. An event PostgreSQL does not have
    has none."""
    events = sorted({event_id for event_id, _ in bookings})
    pairs = sorted({(event_id, label) for event_id, b in bookings for label in b.seats})
    rows = await raw.fetch(_CATALOG, events, [e for e, _ in pairs], [label for _, label in pairs])
    currency: dict[str, str] = {}
    prices: dict[str, dict[str, int]] = {}
    seated: dict[str, set[str]] = {}
    seats: dict[str, dict[str, str]] = {}
    for event_id, name, price, is_seated, cu, label in rows:
        if label is not None:
            seats.setdefault(event_id, {})[label] = name
            continue
        currency[event_id] = cu
        prices.setdefault(event_id, {})[name] = price
        if is_seated:
            seated.setdefault(event_id, set()).add(name)
    return {
        event_id: Catalog(
            cu,
            prices[event_id],
            frozenset(seated.get(event_id, ())),
            seats.get(event_id, {}),
        )
        for event_id, cu in currency.items()
    }


async def refusals(raw: Any, bookings: list[tuple[str, BookingRecord]]) -> list[str | None]:
    """For each (event id, booking), why the record refuses it (None: it may go in)."""
    if not bookings:
        return []
    found = await catalogs(raw, bookings)
    return [against(b, found.get(event_id)) for event_id, b in bookings]
