"""msgspec structs of the HTTP API: every request and response body."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from service.core.timefmt import to_ms

# `$` alone also matches before a trailing newline; the look-ahead closes that gap and
# stays valid in the JSON Schema (ECMA 262) dialect of the OpenAPI document.
EVENT_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}(?!\n)$"
NAME_PATTERN = r"^[A-Za-z0-9 _.-]{1,64}(?!\n)$"
ROW_PATTERN = r"^[A-Za-z0-9_.]{1,16}(?!\n)$"
CURRENCY_PATTERN = r"^[A-Z]{3}(?!\n)$"
# Each pattern in words, for error messages: a client is told what is expected, not a regex.
PATTERN_WORDS = {
    EVENT_ID_PATTERN: "1 to 64 characters of a-z, 0-9 and `-`, not starting with `-`",
    NAME_PATTERN: "1 to 64 characters of A-Z, a-z, 0-9, space, `_`, `.` and `-`",
    ROW_PATTERN: "1 to 16 characters of A-Z, a-z, 0-9, `_` and `.`",
    CURRENCY_PATTERN: "an ISO 4217 currency code: three capital letters, e.g. EUR",
}

EventId = Annotated[str, Meta(pattern=EVENT_ID_PATTERN, description="Chosen by the admin.")]
CategoryName = Annotated[str, Meta(pattern=NAME_PATTERN)]
SeatLabel = Annotated[str, Meta(pattern=NAME_PATTERN)]
CustomerId = Annotated[str, Meta(min_length=1, max_length=128)]
# With customer tokens on, a body's customer_id may be left out (CustomerHoldCreate,
# CustomerQueueJoin).
TokenCustomerId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=128,
        description="Left out: the token's customer; given: must be the token's `sub`.",
    ),
]
Quantity = Annotated[int, Meta(ge=1, le=100)]
# At most 10^9 minor units a ticket: an order's total (100 tickets at most) stays within
# the 14 significant digits that Redis's Lua JSON encoder writes exactly.
Money = Annotated[int, Meta(ge=0, le=10**9, description="Minor units: 2500 = 25.00.")]
Currency = Annotated[
    str, Meta(pattern=CURRENCY_PATTERN, description="An ISO 4217 currency code, e.g. `EUR`.")
]
# The codes of ISO 4217 (list one, 2025) that money is priced in: the national and the
# shared currencies, not the fund, precious-metal, testing and "no currency" codes.
ISO_4217 = frozenset(
    """
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN
    BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR
    FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD
    JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD
    MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP
    PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC
    SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND VUV WST
    XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
    """.split()  # noqa: SIM905 (a list literal of 156 strings reads worse)
)
Timestamp = Annotated[str, Meta(description="RFC 3339, UTC, `Z` suffix.")]
AwareDatetime = Annotated[datetime, Meta(tz=True, description="RFC 3339 with an offset.")]
EventStatus = Literal["scheduled", "on_sale", "paused", "closed"]
HoldStatus = Literal["held", "confirmed", "released", "expired"]
BookingStatus = Literal["confirmed", "cancelled"]
SeatStatus = Literal["available", "held", "sold"]


def event_status(status: str, on_sale_at_ms: int | None, now: int) -> EventStatus:
    """The status a client sees of the one stored: on sale before its on-sale time reads
    as scheduled."""
    if status == "on_sale" and on_sale_at_ms is not None and now < on_sale_at_ms:
        return "scheduled"
    return status  # type: ignore[return-value]


class Request(Struct, kw_only=True, forbid_unknown_fields=True):
    """Request bodies: unknown fields are an error, not silently ignored."""


# Times are kept to the millisecond in UTC, as Redis keeps them and the API answers them,
# between these two: one more step out and `+14:00` pushes year 1 into year 0, and asyncpg
# stores 0001-01-01T00:00:00Z as `-infinity`.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FIRST_MS = to_ms(datetime(1, 1, 1, 0, 0, 0, 1000, tzinfo=UTC))
_LAST_MS = to_ms(datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC))


def _utc_ms(name: str, value: datetime) -> datetime:
    """The time in UTC, rounded to the millisecond; ValueError (a validation error of the
    body, for msgspec) when it falls outside the range."""
    try:
        ms = to_ms(value)
    except (OverflowError, ValueError):
        ms = _FIRST_MS - 1
    if not _FIRST_MS <= ms <= _LAST_MS:
        raise ValueError(
            f"`{name}` must lie between 0001-01-01T00:00:00.001Z and 9999-12-31T23:59:59.999Z"
        )
    return _EPOCH + timedelta(milliseconds=ms)


# --- holds and bookings -------------------------------------------------------------


class HoldItem(Request):
    category: CategoryName
    quantity: Quantity


class HoldCreate(Request):
    customer_id: CustomerId
    items: list[HoldItem] = msgspec.field(default_factory=list)
    seats: list[SeatLabel] = msgspec.field(default_factory=list)


class CustomerHoldCreate(HoldCreate):
    """The hold request when customer tokens are on: `customer_id` may be left out (then
    it is the token's customer); when given, it must be the token's customer."""

    # "" (never a valid id) stands for "left out"; the document shows no default.
    customer_id: TokenCustomerId = ""


class HoldConfirm(Request):
    payment_ref: Annotated[str, Meta(min_length=1, max_length=128)] | None = None


class Hold(Struct, kw_only=True, omit_defaults=True):
    hold_id: str
    event_id: str
    customer_id: str
    status: HoldStatus
    created_at: Timestamp
    expires_at: Timestamp
    items: list[HoldItem]
    seats: list[str]
    total: int
    currency: str
    booking_id: str | None = msgspec.field(default=None)


class Booking(Struct, kw_only=True, omit_defaults=True):
    booking_id: str
    hold_id: str
    event_id: str
    customer_id: str
    status: BookingStatus
    items: list[HoldItem]
    seats: list[str]
    total: int
    currency: str
    payment_ref: str | None
    confirmed_at: Timestamp
    persisted: bool | msgspec.UnsetType = msgspec.UNSET


class BookingPage(Struct, kw_only=True):
    bookings: list[Booking]
    next_cursor: str | None


# --- events -------------------------------------------------------------------------


class SeatBlock(Request):
    rows: Annotated[list[Annotated[str, Meta(pattern=ROW_PATTERN)]], Meta(min_length=1)]
    seats_per_row: Annotated[int, Meta(ge=1, le=10_000)]


class CategoryCreate(Request):
    name: CategoryName
    price: Money
    currency: Currency
    capacity: Annotated[int, Meta(ge=0, le=10_000_000)] | None = None
    seat_blocks: list[SeatBlock] | None = None
    seats: list[SeatLabel] | None = None

    def __post_init__(self) -> None:
        if self.currency not in ISO_4217:
            raise ValueError(f"`currency` {self.currency!r} is not an ISO 4217 currency code")


class WaitingRoom(Request):
    admit_per_minute: Annotated[
        int, Meta(ge=1, le=1_000_000, description="Buyers admitted a minute, evenly spread.")
    ]
    pass_ttl_seconds: Annotated[
        int, Meta(ge=10, le=86400, description="How long a pass lasts once admitted.")
    ] = 600
    opens_at: Annotated[
        AwareDatetime | None, Meta(description="When joining starts; null: at once.")
    ] = None

    def __post_init__(self) -> None:
        if self.opens_at is not None:
            self.opens_at = _utc_ms("opens_at", self.opens_at)


class EventCreate(Request):
    id: EventId
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    starts_at: AwareDatetime
    categories: Annotated[list[CategoryCreate], Meta(min_length=1, max_length=100)]
    on_sale_at: AwareDatetime | None = None
    hold_ttl_seconds: Annotated[int, Meta(ge=10, le=86400)] = 300
    max_per_order: Annotated[int, Meta(ge=1, le=100)] = 10
    max_per_customer: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None
    waiting_room: WaitingRoom | None = None

    def __post_init__(self) -> None:
        self.starts_at = _utc_ms("starts_at", self.starts_at)
        if self.on_sale_at is not None:
            self.on_sale_at = _utc_ms("on_sale_at", self.on_sale_at)


class CategoryPatch(Request):
    name: CategoryName
    capacity: Annotated[int, Meta(ge=0, le=10_000_000)]


class EventPatch(Request):
    status: Literal["on_sale", "paused", "closed"] | None = None
    on_sale_at: AwareDatetime | msgspec.UnsetType | None = msgspec.UNSET
    name: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    categories: list[CategoryPatch] | None = None
    # Absent: unchanged; null: turned off (its queue is forgotten).
    waiting_room: WaitingRoom | msgspec.UnsetType | None = msgspec.UNSET

    def __post_init__(self) -> None:
        if isinstance(self.on_sale_at, datetime):
            self.on_sale_at = _utc_ms("on_sale_at", self.on_sale_at)


class Category(Struct, kw_only=True):
    name: str
    price: int
    currency: str
    seated: bool
    capacity: int
    available: int


class WaitingRoomView(Struct, kw_only=True):
    admit_per_minute: int
    pass_ttl_seconds: int
    opens_at: Timestamp | None


class Event(Struct, kw_only=True, omit_defaults=True):
    id: str
    name: str
    starts_at: Timestamp
    status: EventStatus
    on_sale_at: Timestamp | None
    hold_ttl_seconds: int
    max_per_order: int
    max_per_customer: int | None
    categories: list[Category]
    # True once the event is over and its live state has left Redis (served from
    # PostgreSQL; PATCH status on_sale brings it back).
    archived: bool
    # Left out when the event has none (then holds need no pass).
    waiting_room: WaitingRoomView | None = None


class EventSummary(Struct, kw_only=True):
    id: str
    name: str
    starts_at: Timestamp
    status: EventStatus


class EventList(Struct, kw_only=True):
    events: list[EventSummary]


class Seat(Struct, kw_only=True):
    label: str
    category: str
    status: SeatStatus
    # Where a seat from `seat_blocks` stands; null for an explicitly named seat.
    row: str | None
    number: int | None


class SeatList(Struct, kw_only=True):
    seats: list[Seat]
    next_cursor: str | None


# --- the waiting room --------------------------------------------------------------

QueueStatus = Literal["waiting", "admitted", "sold_out", "closed"]


class QueueJoin(Request):
    customer_id: CustomerId


class CustomerQueueJoin(QueueJoin):
    """Joining when customer tokens are on: `customer_id` may be left out (then it is the
    token's customer); when given, it must be the token's customer."""

    # "" (never a valid id) stands for "left out"; the document shows no default.
    customer_id: TokenCustomerId = ""


class QueueTicket(Struct, kw_only=True):
    ticket: Annotated[
        str,
        Meta(
            description="Signed by the service and unguessable: knowing it is what lets one "
            "poll. It carries the ticket's place in the order, so any API process answers a "
            "poll from it without asking Redis."
        ),
    ]
    status: QueueStatus
    position: Annotated[
        int | None,
        Meta(
            description="1 = next in line; null before the on-sale moment and once admitted. "
            "Exact among the first 1,000 of the pre-queue and for later arrivals; further "
            "back in the pre-queue an estimate within 10 places or 1% of the exact rank. "
            "It never moves backwards."
        ),
    ]
    estimated_wait_seconds: int | None
    poll_after_seconds: Annotated[
        int,
        Meta(
            description="When to ask again: a tenth of the estimated wait, from 2 s near the "
            "front to 60 s far back (before the opening: until it, at most 30 s; 10 s while "
            "sold out; 30 s once admitted or closed)."
        ),
    ]
    pass_: Annotated[
        str | None,
        Meta(description="The admission pass (while `admitted`): send it as `Boxoffice-Pass`."),
    ] = msgspec.field(name="pass")
    pass_expires_at: Timestamp | None


class QueueStats(Struct, kw_only=True):
    waiting: int
    admitted: int
    active_passes: Annotated[
        int,
        Meta(
            description="Admitted tickets whose pass has not expired: a pass lasts "
            "pass_ttl_seconds from the moment admission reached its ticket."
        ),
    ]
    admit_per_minute: int | None
    last_admitted_position: int


# What an archive waits for: live holds (or, for the worker's own step, ended ones within
# their retention), outbox entries not yet written behind, dead letters, a load under way.
ArchiveWait = Literal["holds", "outbox", "dead_letters", "busy"]


class ArchiveState(Struct, kw_only=True):
    """Where an archive stands: done (`archived`), or what it waits for (then the worker
    finishes it as soon as nothing of the event is unfinished)."""

    event_id: str
    archived: bool
    waiting_for: ArchiveWait | None


# --- operations ---------------------------------------------------------------------


class Health(Struct, kw_only=True):
    status: str


class Readiness(Struct, kw_only=True):
    status: Literal["ready", "unavailable"]
    missing: list[str]
    warnings: list[str]


class Problem(Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details; `available`, `seats`, `remaining` and `errors` appear
    with the codes that carry them."""

    type: str = "about:blank"
    status: int
    title: str
    detail: str
    code: str
    available: dict[str, int] | None = None
    seats: list[str] | None = None
    remaining: int | None = None
    errors: list[dict[str, str]] | None = None
