"""Times on the wire: RFC 3339 in UTC with a `Z`; Redis scripts speak epoch milliseconds."""

from __future__ import annotations

import functools
from datetime import UTC, datetime


def from_ms(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    if millis:
        return f"{_second(seconds)}.{millis:03d}Z"
    return _second(seconds) + "Z"


@functools.lru_cache(maxsize=4096)
def _second(seconds: int) -> str:
    # Every hold and booking formats a time near now: a second is formatted once, not per
    # request (a third of building a hold's answer).
    return datetime.fromtimestamp(seconds, UTC).isoformat()[:-6]


def to_ms(dt: datetime) -> int:
    return round(dt.timestamp() * 1000)


def redis_ms(time_reply: tuple[int, int] | list[int]) -> int:
    """Milliseconds from a Redis TIME reply (seconds, microseconds)."""
    sec, usec = time_reply
    return int(sec) * 1000 + int(usec) // 1000


def now_ms() -> int:
    return to_ms(datetime.now(UTC))
