"""service/durable/outbox.py, the one place the outbox entry format lives: what lua/confirm.lua and
lua/cancel.lua write decodes to the booking change they made, and what the repair builds
is read back the same way."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from service.core.keys import event_keys
from service.core.records import decode_booking
from service.durable import outbox
from service.hotpath.context import Services
from service.selling import bookings
from tests.conftest import create_event
from tests.test_writebehind_failures import sell_in_process


async def test_entries_the_scripts_write_decode_to_their_changes(
    client: Any, svc: Services
) -> None:
    event_id = await create_event(client)
    [booking_id] = await sell_in_process(svc, event_id, 1)
    await bookings.cancel_booking(svc, event_id, booking_id, None)
    entries: Any = await svc.redis.xrange(event_keys(event_id).outbox)
    confirm, cancel = (outbox.decode(fields) for _, fields in entries)
    assert isinstance(confirm, outbox.Confirm) and confirm.booking.id == booking_id
    assert confirm.booking.quantities == {"GA": 1}
    assert isinstance(cancel, outbox.Cancel) and cancel.booking_id == booking_id
    assert cancel.at_ms >= confirm.booking.created_ms
    assert [outbox.booking_id(f) for _, f in entries] == [booking_id, booking_id]
    # What the repair builds from Redis's records reads back as the same changes.
    raw = await svc.redis.hget(event_keys(event_id).bookings, booking_id)
    assert raw is not None
    record = decode_booking(raw)
    assert outbox.decode(outbox.confirm_entry(record)) == outbox.Confirm(record)
    built = outbox.cancel_entry(booking_id, cancel.at_ms)
    assert outbox.decode(built) == cancel and built == entries[1][1]


def test_a_dead_letter_keeps_its_entry() -> None:
    entry = outbox.cancel_entry("b1", 5)
    kept = outbox.dead_letter(entry, b"1-0", "refused", 3, 7)
    assert kept[b"error"] == b"refused" and kept[b"attempts"] == 3
    assert outbox.original_fields(kept) == entry


@pytest.mark.parametrize(
    "fields",
    [{}, {b"op": b"refund"}, {b"op": b"confirm", b"booking": b"{"}, {b"op": b"cancel"}],
)
def test_an_entry_without_a_change_is_refused(fields: dict[bytes, bytes]) -> None:
    with pytest.raises((KeyError, ValueError, msgspec.DecodeError)):
        outbox.decode(fields)
    if fields.get(b"booking") != b"{":
        assert outbox.booking_id(fields) is None
