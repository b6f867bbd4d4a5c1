"""The domain error tree. One handler (service/web/problems.py) turns these into problem details."""

from __future__ import annotations

import logging
import traceback
from typing import Any, ClassVar

import asyncpg.exceptions
import redis.exceptions
import sqlalchemy.exc

from service.core.schemas import Problem


class BoxofficeError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    # The class's title; an answer may say more precisely what happened (`titles` lists
    # every title the code may carry, for the reference).
    title: str = "Internal error"
    titles: ClassVar[tuple[str, ...]] = ()
    # Headers the contract puts on every answer of this code (`Retry-After`, ...).
    always: ClassVar[dict[str, str]] = {}

    def __init__(
        self, detail: str | None = None, *, title: str | None = None, **extra: Any
    ) -> None:
        super().__init__(detail or self.title)
        if title is not None:
            self.title = title
        self.detail = detail or self.title
        # Fields the contract adds to the problem document (`available`, `seats`, ...).
        self.extra = extra
        self.headers: dict[str, str] | None = dict(self.always) or None

    def problem(self) -> Problem:
        return Problem(
            status=self.status, title=self.title, detail=self.detail, code=self.code, **self.extra
        )


def _error(
    status: int,
    code: str,
    title: str,
    always: dict[str, str] | None = None,
    titles: tuple[str, ...] = (),
) -> type[BoxofficeError]:
    return type(
        "".join(part.title() for part in code.split("_")),
        (BoxofficeError,),
        {
            "status": status,
            "code": code,
            "title": title,
            "always": always or {},
            "titles": titles or (title,),
            "__module__": __name__,
        },
    )


# Seconds a client waits before it tries again: a server away is usually back in moments.
RETRY_AFTER_SECONDS = 1
_RETRY = {"retry-after": str(RETRY_AFTER_SECONDS)}


# Spelled out, rather than generated in a loop, so that mypy and readers see each name.
ValidationError = _error(400, "validation_error", "Invalid request")
UnknownCategory = _error(400, "unknown_category", "Unknown category")
UnknownSeat = _error(400, "unknown_seat", "Unknown seat")
Unauthorized = _error(401, "unauthorized", "Unauthorized", {"www-authenticate": "Bearer"})
AdmissionRequired = _error(403, "admission_required", "Admission required")
CustomerMismatch = _error(403, "customer_mismatch", "Customer mismatch")
EventNotFound = _error(404, "event_not_found", "Event not found")
HoldNotFound = _error(404, "hold_not_found", "Hold not found")
BookingNotFound = _error(404, "booking_not_found", "Booking not found")
TicketNotFound = _error(404, "ticket_not_found", "Ticket not found")
DeadLetterNotFound = _error(404, "dead_letter_not_found", "Dead letter not found")
NotFound = _error(404, "not_found", "Not found")
MethodNotAllowed = _error(405, "method_not_allowed", "Method not allowed")
NotOnSale = _error(409, "not_on_sale", "Event not on sale")
# A sold_out refusal while some of what was asked for is left says so in its title.
NOT_ENOUGH_LEFT = "Not enough tickets left"
SoldOut = _error(409, "sold_out", "Sold out", titles=("Sold out", NOT_ENOUGH_LEFT))
SeatsUnavailable = _error(409, "seats_unavailable", "Seats unavailable")
CustomerLimit = _error(409, "customer_limit", "Customer limit reached")
HoldReleased = _error(409, "hold_released", "Hold released")
HoldConfirmed = _error(409, "hold_confirmed", "Hold confirmed")
NoWaitingRoom = _error(409, "no_waiting_room", "No waiting room")
QueueNotOpen = _error(409, "queue_not_open", "Waiting room not open")
EventExists = _error(409, "event_exists", "Event exists")
CapacityBelowCommitted = _error(409, "capacity_below_committed", "Capacity below committed")
EventNotOver = _error(409, "event_not_over", "Event not over")
IdempotencyInProgress = _error(409, "idempotency_in_progress", "Request in progress", _RETRY)
HoldExpired = _error(410, "hold_expired", "Hold expired")
# The body did not arrive in time (BOXOFFICE_HTTP_BODY_TIMEOUT_SECONDS); the rest of it
# would be read as the next request: the connection ends with the answer.
RequestTimeout = _error(408, "request_timeout", "Request timeout", {"connection": "close"})
PayloadTooLarge = _error(413, "payload_too_large", "Payload too large")
UnsupportedMediaType = _error(415, "unsupported_media_type", "Unsupported media type")
IdempotencyKeyReused = _error(422, "idempotency_key_reused", "Idempotency-Key reused")
RateLimited = _error(429, "rate_limited", "Too many requests", _RETRY)
Unavailable = _error(503, "unavailable", "Service unavailable", _RETRY)

ALL: tuple[type[BoxofficeError], ...] = tuple(
    obj
    for obj in list(globals().values())
    if isinstance(obj, type) and issubclass(obj, BoxofficeError) and obj is not BoxofficeError
)
BY_CODE: dict[str, type[BoxofficeError]] = {cls.code: cls for cls in ALL}


class EventArchived(NotOnSale):  # type: ignore[valid-type,misc]
    """The event's live state is out of Redis (service/durable/archive.py) and only a reopening
    brings it back: a sale is `not_on_sale`; a read catches it and asks PostgreSQL. Kept
    out of ALL and BY_CODE: its code is not_on_sale's."""


# Errors of the drivers that mean "Redis or PostgreSQL is unreachable": answered with 503.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    OSError,  # ConnectionError and TimeoutError among them
)
# Replies of a Redis that is up but cannot serve now: loading its dataset after a restart,
# a replica cut off from its primary or read-only after a failover, a cluster moving slots.
_NOT_NOW_REPLIES: tuple[type[BaseException], ...] = (
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    # Redis at maxmemory (noeviction) refuses writes until memory is freed or raised.
    redis.exceptions.OutOfMemoryError,
)
# SQLSTATE classes of a server that refuses work for now, not for this input: connection
# exceptions, insufficient resources (too many connections), operator intervention
# (shutting down, starting up, session killed), and a server that will not let us in or
# has no such database (28, 3D000): set-up to fix, never a reason to refuse a booking.
# Also what refuses every statement alike, whatever its rows: a read-only database or hot
# standby (25006), missing grants (42501), a schema the migrations have not reached yet
# (42P01 no such table, 42703 no such column: our statements are fixed, so no entry can
# cause them); and the transient conflicts PostgreSQL itself says to retry (40001
# serialization failure, 40P01 deadlock). Not all of class 40: 40002 is about the rows.
_UNAVAILABLE_SQLSTATES = (
    "08",
    "53",
    "57P",
    "28",
    "3D000",
    "25006",
    "42501",
    "42P01",
    "42703",
    "40001",
    "40P01",
)


def unavailable(exc: BaseException) -> bool:
    """Whether an error says "a server is away, try again later" rather than "this request
    (or outbox entry) is bad". SQLAlchemy wraps the driver's error: look through the chain."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, DRIVER_ERRORS + _NOT_NOW_REPLIES):
            return True
        sqlstate = getattr(seen, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


# The libraries that talk to each server, by top-level module name.
_SERVER_OF_MODULE = {"redis": "Redis", "asyncpg": "PostgreSQL", "sqlalchemy": "PostgreSQL"}


def server_of(exc: BaseException) -> str | None:
    """Which server an error came from, "Redis" or "PostgreSQL" (None: neither), told by
    the library that raised it: its exception types, else the code it was raised in (a
    bare OSError from a socket inside asyncpg is PostgreSQL's)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, redis.exceptions.RedisError):
            return "Redis"
        if isinstance(
            seen,
            sqlalchemy.exc.SQLAlchemyError
            | asyncpg.exceptions.PostgresError
            | asyncpg.exceptions.InterfaceError,
        ):
            return "PostgreSQL"
        frames = [frame for frame, _ in traceback.walk_tb(seen.__traceback__)]
        for frame in reversed(frames):  # the innermost library frame is the origin
            server = _SERVER_OF_MODULE.get(frame.f_globals.get("__name__", "").partition(".")[0])
            if server is not None:
                return server
        seen = getattr(seen, "orig", None) or seen.__cause__ or seen.__context__
    return None


def log_failure(log: logging.Logger, what: str, exc: BaseException) -> None:
    """A background loop's failure: a warning when a server is away (it comes back), the
    whole traceback when it is anything else."""
    if unavailable(exc):
        log.warning("%s: %r", what, exc)
    else:
        log.error("%s", what, exc_info=exc)
