"""Times and booking ids as the API writes them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from service.core.timefmt import from_ms, to_ms
from service.selling.sales import uuid7

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1, "1970-01-01T00:00:00.001Z"),
        (1_795_000_000_000, "2026-11-18T11:06:40Z"),
        (1_795_000_000_999, "2026-11-18T11:06:40.999Z"),
        # Float division made this one a millisecond early.
        (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
    ],
)
def test_from_ms_is_exact(ms: int, text: str) -> None:
    assert from_ms(ms) == text
    assert from_ms(ms) == from_ms(ms)  # the cached second gives the same answer again


def test_from_ms_round_trips_through_to_ms() -> None:
    for ms in range(1_795_000_000_000, 1_795_000_003_000, 7):
        text = from_ms(ms)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert parsed == EPOCH + timedelta(milliseconds=ms)
        assert to_ms(parsed) == ms


def test_uuid7_is_a_version_7_uuid_ordered_by_time() -> None:
    ids = [uuid7() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert str(u) == text  # canonical form: lower-case, hyphens where they belong
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
    millis = [uuid.UUID(t).int >> 80 for t in ids]
    assert millis == sorted(millis)
    assert abs(millis[-1] - to_ms(datetime.now(UTC))) < 5_000


def test_from_ms_stays_exact_past_its_cache_of_seconds() -> None:
    # More distinct seconds than the cache keeps (it is emptied and filled again).
    for ms in range(1_795_000_000_000, 1_795_000_000_000 + 5000 * 1999, 1999):
        expected = (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")
        expected = expected.replace("+00:00", "Z").replace(".000Z", "Z")
        assert from_ms(ms) == expected
