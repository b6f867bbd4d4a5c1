"""Times on the wire: RFC 3339 in UTC with a `Z`; Redis scripts speak epoch milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime


def from_ms(ms: int) -> str:
    spec = "seconds" if ms % 1000 == 0 else "milliseconds"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec=spec)[:-6] + "Z"


def to_ms(dt: datetime) -> int:
    return round(dt.timestamp() * 1000)


def redis_ms(time_reply: tuple[int, int] | list[int]) -> int:
    """Milliseconds from a Redis TIME reply (seconds, microseconds)."""
    sec, usec = time_reply
    return int(sec) * 1000 + int(usec) // 1000


def now_ms() -> int:
    return to_ms(datetime.now(UTC))
