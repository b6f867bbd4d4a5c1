"""Whatever the API acknowledges, PostgreSQL stores: a property test over the full range of
what the request schemas accept (any text of any plane, times at the ends of the
calendar with any offset, prices, quantities and limits at their bounds), fed through the
real API (create event, hold, confirm), the write-behind into PostgreSQL, and read back
from PostgreSQL: it must equal what the API answered."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from service.core.settings import Settings
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services
from tests.apiserver import ApiServer
from tests.conftest import ADMIN

# Any character PostgreSQL's text can hold: every plane, controls included; not NUL and
# not a surrogate (the door refuses those, tests/test_door.py).
TEXT_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _.-"
ROW_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_."
# ISO 4217 codes (any three letters used to pass; the door now wants real ones).
CURRENCIES = ["EUR", "USD", "JPY", "GBP", "CHF", "BHD"]


def text(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text(TEXT_CHARS, min_size=min_size, max_size=max_size)


# Offsets of whole minutes up to ±23:59, as RFC 3339 allows.
offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
times = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 1),
        max_value=datetime(9999, 12, 31, 23, 59, 59, 999999),
        timezones=offsets,
    ),
    # The very ends, where an offset pushes UTC out of the calendar.
    st.sampled_from(
        [
            datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))),
            datetime(1, 1, 1, 14, tzinfo=timezone(timedelta(hours=14))),
            datetime(1, 1, 1, tzinfo=UTC),
            datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-14))),
            datetime(1969, 12, 31, 23, 59, 59, 999500, tzinfo=UTC),
        ]
    ),
)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    """An event, a hold that must succeed on it, and its confirmation."""
    currency = draw(st.sampled_from(CURRENCIES))
    names = draw(
        st.lists(st.text(NAME_CHARS, min_size=1, max_size=64), min_size=1, max_size=3, unique=True)
    )
    categories: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    seats: list[str] = []
    used_labels: set[str] = set()
    for name in names:
        price = draw(st.sampled_from([0, 1, 10**9]) | st.integers(0, 10**9))
        if draw(st.booleans()):
            capacity = draw(st.sampled_from([1, 10_000_000]) | st.integers(1, 10_000_000))
            categories.append(
                {"name": name, "price": price, "currency": currency, "capacity": capacity}
            )
            quantity = draw(st.integers(1, min(capacity, 30)))
            items.append({"category": name, "quantity": quantity})
            continue
        rows = draw(
            st.lists(
                st.text(ROW_CHARS, min_size=1, max_size=16), min_size=1, max_size=2, unique=True
            )
        )
        per_row = draw(st.integers(1, 3))
        block = [f"{r}-{n}" for r in rows for n in range(1, per_row + 1)]
        named = draw(
            st.lists(st.text(NAME_CHARS, min_size=1, max_size=64), max_size=2, unique=True)
        )
        named = [label for label in named if label not in used_labels and label not in block]
        labels = [label for label in block if label not in used_labels] + named
        if not labels or len(set(block)) != len(block) or set(block) & used_labels:
            # A block that clashes with another category's labels: give it named seats.
            labels = [f"S{len(used_labels)}-{uuid.uuid4().hex[:6]}"]
            categories.append({"name": name, "price": price, "currency": currency})
            categories[-1]["seats"] = labels
        else:
            categories.append(
                {
                    "name": name,
                    "price": price,
                    "currency": currency,
                    "seat_blocks": [{"rows": rows, "seats_per_row": per_row}],
                    **({"seats": named} if named else {}),
                }
            )
        used_labels.update(labels)
        if draw(st.booleans()):
            quantity = draw(st.integers(1, len(labels)))
            items.append({"category": name, "quantity": quantity})
        else:
            seats += draw(st.lists(st.sampled_from(labels), min_size=1, unique=True))
    tickets = sum(i["quantity"] for i in items) + len(seats)
    if tickets > 100:  # the most an order may have: drop named seats until it fits
        seats = seats[: max(0, 100 - sum(i["quantity"] for i in items))]
        tickets = sum(i["quantity"] for i in items) + len(seats)
    prefix = draw(st.from_regex(r"[a-z0-9][a-z0-9-]{0,50}", fullmatch=True))
    event: dict[str, Any] = {
        "id": f"{prefix}-{uuid.uuid4().hex[:12]}",
        "name": draw(text(1, 200)),
        "starts_at": draw(times).isoformat(),
        "on_sale_at": draw(st.none() | times),
        "hold_ttl_seconds": draw(st.sampled_from([10, 86400]) | st.integers(10, 86400)),
        "max_per_order": draw(st.integers(max(1, tickets), 100)),
        "max_per_customer": draw(st.none() | st.integers(max(1, tickets), 10_000_000)),
        "categories": categories,
    }
    if event["on_sale_at"] is not None:
        event["on_sale_at"] = event["on_sale_at"].isoformat()
    hold: dict[str, Any] = {"customer_id": draw(text(1, 128)), "items": items, "seats": seats}
    confirm = draw(st.none() | st.builds(lambda ref: {"payment_ref": ref}, text(1, 128)))
    return {"event": event, "hold": hold, "confirm": confirm, "tickets": tickets}


async def _scenario(url: str, settings: Settings, s: dict[str, Any]) -> None:
    event = s["event"]
    event_id = event["id"]
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.post("/admin/events", json=event, headers=ADMIN)
        if r.status_code == 400:
            # Refused at the door: fine, as long as nothing was stored.
            assert r.json()["code"] == "validation_error", r.text
            r = await client.get(f"/events/{event_id}")
            assert r.status_code == 404, r.text
            return
        assert r.status_code == 201, r.text
        created = r.json()
        listed = [e for e in (await client.get("/events")).json()["events"] if e["id"] == event_id]
        # From PostgreSQL: what the API answered, exactly.
        summary = {k: created[k] for k in ("id", "name", "starts_at", "status")}
        assert listed == [summary], (listed, created)

        if created["status"] == "scheduled":  # on sale in the future: on sale now
            r = await client.patch(
                f"/admin/events/{event_id}", json={"on_sale_at": None}, headers=ADMIN
            )
            assert r.status_code == 200, r.text
        r = await client.post(f"/events/{event_id}/holds", json=s["hold"])
        assert r.status_code == 201, r.text
        held = r.json()
        assert held["customer_id"] == s["hold"]["customer_id"]
        ga = sum(i["quantity"] for i in s["hold"]["items"] if i["category"] not in seated(created))
        assert len(held["seats"]) + ga == s["tickets"], held
        r = await client.post(
            f"/events/{event_id}/holds/{held['hold_id']}/confirm",
            **({"json": s["confirm"]} if s["confirm"] is not None else {}),
        )
        assert r.status_code == 200, r.text
        acknowledged = r.json()

        svc = Services.open(settings)
        try:
            assert await WriteBehind(svc, f"prop-{uuid.uuid4().hex[:6]}").drain(event_id) == 1
        finally:
            await svc.close()

        r = await client.get(
            f"/admin/events/{event_id}/bookings",
            params={"customer_id": s["hold"]["customer_id"]},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        stored = r.json()["bookings"]
        assert stored == [{**acknowledged, "persisted": True}], (stored, acknowledged)
        r = await client.get(f"/events/{event_id}/bookings/{acknowledged['booking_id']}")
        assert r.json() == {**acknowledged, "persisted": True}


def seated(event: dict[str, Any]) -> set[str]:
    return {c["name"] for c in event["categories"] if c["seated"]}


@hsettings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(s=scenarios())
def test_what_the_api_acknowledges_postgresql_stores(
    api: ApiServer, settings: Settings, s: dict[str, Any]
) -> None:
    asyncio.run(_scenario(api.url, settings, s))
