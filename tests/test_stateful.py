"""A Hypothesis state machine of holds, confirms, releases and the passing of time.

It drives the service's Python API (service.selling.sales, service.selling.catalog) against the real
Redis and PostgreSQL, keeps a model of every hold, predicts each outcome (success, or
which domain error) from the model, and after every step reads the event's Redis hashes
directly to check that the stock is conserved, every seat is in exactly one state, and
Redis, the public reads and the model agree.

The machine is synchronous: each example gets an event loop and Services of its own,
and a fresh event, so examples never see one another's state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, event
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from service.core import errors, schemas
from service.core.keys import event_keys
from service.core.records import decode_hold
from service.core.settings import Settings
from service.hotpath.context import Services
from service.selling import catalog, sales
from tests.conftest import event_body, expire_hold, new_event_id

# Hundreds of generated runs, each with its own event: about a minute.
pytestmark = pytest.mark.slow

T = TypeVar("T")

GA_CAPACITY = 5
GA_PRICE = 2500
VIP_PRICE = 9900
SEATS = ["A-1", "A-2", "A-3", "A-4", "BOX-1"]  # VIP, in seat order (position = index)
POSITION = {label: i for i, label in enumerate(SEATS)}
MAX_PER_ORDER = 5
MAX_PER_CUSTOMER = 4
CUSTOMERS = ["ann", "bob", "cyd", "dee", "eve"]

# Model statuses. "expired" means the hold's deadline has passed; Redis may not have
# reclaimed it yet (that happens lazily, on the next script that looks), so its raw
# record may still say "held".
HELD, CONFIRMED, RELEASED, EXPIRED = "held", "confirmed", "released", "expired"


@dataclass
class ModelHold:
    hold_id: str
    customer: str
    ga: int
    seats: list[str]
    status: str = HELD
    booking_id: str | None = None

    @property
    def tickets(self) -> int:
        return self.ga + len(self.seats)

    @property
    def total(self) -> int:
        return self.ga * GA_PRICE + len(self.seats) * VIP_PRICE


class HoldsMachine(RuleBasedStateMachine):
    app_settings: ClassVar[Settings]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.svc = Services.open(self.app_settings)
        self.event_id = new_event_id("sm")
        self.keys = event_keys(self.event_id)
        self.holds: dict[str, ModelHold] = {}
        body = event_body(
            self.event_id,
            max_per_order=MAX_PER_ORDER,
            max_per_customer=MAX_PER_CUSTOMER,
            categories=[
                {"name": "GA", "price": GA_PRICE, "currency": "EUR", "capacity": GA_CAPACITY},
                {
                    "name": "VIP",
                    "price": VIP_PRICE,
                    "currency": "EUR",
                    "seat_blocks": [{"rows": ["A"], "seats_per_row": 4}],
                    "seats": ["BOX-1"],
                },
            ],
        )
        create = msgspec.json.decode(msgspec.json.encode(body), type=schemas.EventCreate)
        event = self.run(catalog.create_event(self.svc, create))
        assert [(c.name, c.capacity, c.available) for c in event.categories] == [
            ("GA", GA_CAPACITY, GA_CAPACITY),
            ("VIP", len(SEATS), len(SEATS)),
        ]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.svc.close())
        finally:
            self.loop.close()

    # --- the model's view of the stock ---------------------------------------------------

    def live(self) -> list[ModelHold]:
        return [h for h in self.holds.values() if h.status == HELD]

    def committed(self) -> list[ModelHold]:
        """Holds whose tickets are not on sale: live ones and confirmed ones."""
        return [h for h in self.holds.values() if h.status in (HELD, CONFIRMED)]

    def available(self) -> dict[str, int]:
        taken = self.committed()
        return {
            "GA": GA_CAPACITY - sum(h.ga for h in taken),
            "VIP": len(SEATS) - sum(len(h.seats) for h in taken),
        }

    def taken_seats(self) -> set[str]:
        return {s for h in self.committed() for s in h.seats}

    def customer_count(self, customer: str) -> int:
        return sum(h.tickets for h in self.committed() if h.customer == customer)

    # --- rules ---------------------------------------------------------------------------

    @rule(
        customer=st.sampled_from(CUSTOMERS),
        ga=st.integers(0, 3),
        best=st.integers(0, 2),
        named=st.lists(st.sampled_from(SEATS), max_size=2, unique=True),
    )
    def hold(self, customer: str, ga: int, best: int, named: list[str]) -> None:
        if ga + best + len(named) == 0:
            ga = 1
        items = []
        if ga:
            items.append(schemas.HoldItem(category="GA", quantity=ga))
        if best:
            items.append(schemas.HoldItem(category="VIP", quantity=best))
        body = schemas.HoldCreate(customer_id=customer, items=items, seats=named)
        n = ga + best + len(named)

        # Every error that applies, given the model, with the extra fields it carries.
        expected: dict[type[errors.BoxofficeError], dict[str, Any]] = {}
        if n > MAX_PER_ORDER:
            expected[errors.ValidationError] = {}
        else:
            has = self.customer_count(customer)
            if has + n > MAX_PER_CUSTOMER:
                expected[errors.CustomerLimit] = {"remaining": max(0, MAX_PER_CUSTOMER - has)}
            taken = [s for s in named if s in self.taken_seats()]
            if taken:
                expected[errors.SeatsUnavailable] = {"seats": sorted(taken)}
            avail = self.available()
            wanted = {"GA": ga, "VIP": best + len(named)}
            short = {c: avail[c] for c, k in wanted.items() if k and avail[c] < k}
            if short:
                expected[errors.SoldOut] = {"available": short}

        try:
            got, _ = self.run(sales.create_hold_counted(self.svc, self.event_id, body, None))
        except errors.BoxofficeError as e:
            event(f"hold -> {e.code}")
            assert expected, f"hold {body} refused with {e!r}, the model expected success"
            assert type(e) in expected, f"{e!r} is none of {list(expected)}"
            extra = dict(e.extra)
            if "seats" in extra:
                extra["seats"] = sorted(extra["seats"])
            assert extra == expected[type(e)], (e, expected)
            return
        event("hold -> held")
        assert not expected, f"hold {body} succeeded, the model expected one of {expected}"

        free = [s for s in SEATS if s not in self.taken_seats() and s not in named]
        seats = named + free[:best]
        assert got.status == "held"
        assert got.event_id == self.event_id
        assert got.customer_id == customer
        assert got.items == items
        assert got.seats == seats, (got.seats, seats)
        assert got.currency == "EUR"
        assert got.expires_at > got.created_at
        assert got.hold_id not in self.holds
        h = ModelHold(got.hold_id, customer, ga, seats)
        assert got.total == h.total
        self.holds[h.hold_id] = h

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data(), payment_ref=st.none() | st.just("pi_1"))
    def confirm(self, data: st.DataObject, payment_ref: str | None) -> None:
        h = self.holds[data.draw(st.sampled_from(list(self.holds)), label="hold")]
        body = schemas.HoldConfirm(payment_ref=payment_ref)
        event(f"confirm a {h.status} hold")
        if h.status == HELD:
            booking = self.run(sales.confirm_hold(self.svc, self.event_id, h.hold_id, body, None))
            assert booking.status == "confirmed"
            assert booking.hold_id == h.hold_id
            assert booking.customer_id == h.customer
            assert booking.seats == h.seats
            assert booking.total == h.total
            assert booking.payment_ref == payment_ref
            h.status, h.booking_id = CONFIRMED, booking.booking_id
        elif h.status == CONFIRMED:
            # Confirming again returns the same booking.
            booking = self.run(sales.confirm_hold(self.svc, self.event_id, h.hold_id, body, None))
            assert booking.booking_id == h.booking_id
            assert booking.hold_id == h.hold_id
        else:
            error = errors.HoldExpired if h.status == EXPIRED else errors.HoldReleased
            try:
                self.run(sales.confirm_hold(self.svc, self.event_id, h.hold_id, body, None))
            except errors.BoxofficeError as e:
                assert type(e) is error, f"confirm of a {h.status} hold raised {e!r}"
            else:
                raise AssertionError(f"confirm of a {h.status} hold succeeded")

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        h = self.holds[data.draw(st.sampled_from(list(self.holds)), label="hold")]
        event(f"release a {h.status} hold")
        if h.status == CONFIRMED:
            try:
                self.run(sales.release_hold(self.svc, self.event_id, h.hold_id, None))
            except errors.BoxofficeError as e:
                assert type(e) is errors.HoldConfirmed, f"release of a confirmed hold: {e!r}"
            else:
                raise AssertionError("release of a confirmed hold succeeded")
            return
        # Live: released now. Released or expired already: a no-op that still succeeds.
        self.run(sales.release_hold(self.svc, self.event_id, h.hold_id, None))
        if h.status == HELD:
            h.status = RELEASED

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def time_passes(self, data: st.DataObject) -> None:
        """The deadlines of some live holds pass."""
        ids = [h.hold_id for h in self.live()]  # creation order: ids are random
        chosen = data.draw(st.lists(st.sampled_from(ids), min_size=1, unique=True), label="expire")
        for hold_id in chosen:
            self.run(expire_hold(self.svc, self.event_id, hold_id))
            self.holds[hold_id].status = EXPIRED

    @precondition(lambda self: bool(self.live()))
    @rule(data=st.data())
    def confirm_just_too_late(self, data: st.DataObject) -> None:
        """The deadline passes and the confirm comes at once, before any other script has
        had a chance to reclaim the hold: the confirm itself must notice."""
        ids = [h.hold_id for h in self.live()]
        h = self.holds[data.draw(st.sampled_from(ids), label="hold")]
        self.run(expire_hold(self.svc, self.event_id, h.hold_id))
        h.status = EXPIRED
        try:
            self.run(
                sales.confirm_hold(self.svc, self.event_id, h.hold_id, schemas.HoldConfirm(), None)
            )
        except errors.BoxofficeError as e:
            assert type(e) is errors.HoldExpired, f"late confirm raised {e!r}"
        else:
            raise AssertionError("a confirm after the deadline succeeded")

    @rule()
    def view(self) -> None:
        event = self.run(catalog.view_event(self.svc, self.event_id))
        assert {c.name: c.available for c in event.categories} == self.available()
        assert event.max_per_customer == MAX_PER_CUSTOMER

    @rule()
    def seat_map(self) -> None:
        seat_list = self.run(sales.list_seats(self.svc, self.event_id, None, None))
        expected = dict.fromkeys(SEATS, "available")
        for h in self.committed():
            for s in h.seats:
                expected[s] = "held" if h.status == HELD else "sold"
        assert [(s.label, s.status) for s in seat_list.seats] == list(expected.items())

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def redis_agrees_with_model(self) -> None:
        k = self.keys
        pipe = self.svc.redis.pipeline(transaction=True)
        pipe.hgetall(k.cap)
        pipe.hgetall(k.avail)
        pipe.hgetall(k.held)
        pipe.hgetall(k.sold)
        pipe.hgetall(k.seatstate)
        pipe.zrange(k.free, 0, -1, withscores=True)
        pipe.hgetall(k.holds)
        pipe.hgetall(k.cust)
        pipe.zrange(k.deadlines, 0, -1)
        pipe.time()
        cap, avail, held, sold, seatstate, free, raw_holds, cust, deadlines, (sec, usec) = self.run(
            pipe.execute()
        )
        now = sec * 1000 + usec // 1000

        def ints(raw: dict[bytes, bytes]) -> dict[str, int]:
            return {a.decode(): int(b) for a, b in raw.items()}

        cap, avail, held, sold = ints(cap), ints(avail), ints(held), ints(sold)
        records = {a.decode(): decode_hold(b) for a, b in raw_holds.items()}

        # Conservation, per category.
        assert cap == {"GA": GA_CAPACITY, "VIP": len(SEATS)}
        for cat in cap:
            assert min(avail[cat], held[cat], sold[cat]) >= 0, (cat, avail, held, sold)
            assert avail[cat] + held[cat] + sold[cat] == cap[cat], (cat, avail, held, sold)

        # Every hold Redis knows is one the model knows, in a status the model allows.
        assert set(records) == set(self.holds)
        in_redis: list[ModelHold] = []  # holds that still count as held in the hashes
        for hold_id, h in self.holds.items():
            r = records[hold_id]
            if h.status == EXPIRED:
                # Overdue: reclaimed already, or waiting for the next script to notice.
                assert r.status in (HELD, EXPIRED), (h, r)
                assert r.expires_ms <= now, (h, r)
            else:
                assert r.status == h.status, (h, r)
            if r.status == HELD:
                in_redis.append(h)
            assert r.customer_id == h.customer and r.seats == h.seats and r.quantity == h.tickets, (
                h,
                r,
            )
            assert r.booking_id == h.booking_id, (h, r)
        confirmed = [h for h in self.holds.values() if h.status == CONFIRMED]

        # The counters, exactly.
        assert held == {
            "GA": sum(h.ga for h in in_redis),
            "VIP": sum(len(h.seats) for h in in_redis),
        }
        assert sold == {
            "GA": sum(h.ga for h in confirmed),
            "VIP": sum(len(h.seats) for h in confirmed),
        }

        # Every seat in exactly one state: free (scored by its position) xor in seatstate.
        state = {a.decode(): b.decode() for a, b in seatstate.items()}
        free_seats = {a.decode(): int(score) for a, score in free}
        for label in SEATS:
            assert (label in state) != (label in free_seats), (label, state, free_seats)
        assert set(state) | set(free_seats) == set(SEATS)
        expected_state = {s: f"h:{h.hold_id}" for h in in_redis for s in h.seats}
        expected_state |= {s: f"b:{h.booking_id}" for h in confirmed for s in h.seats}
        assert state == expected_state
        assert free_seats == {s: POSITION[s] for s in SEATS if s not in expected_state}

        # Per customer: the tickets of their live (not yet reclaimed) and confirmed holds.
        expected_cust: dict[str, int] = {}
        for h in [*in_redis, *confirmed]:
            expected_cust[h.customer] = expected_cust.get(h.customer, 0) + h.tickets
        assert ints(cust) == expected_cust

        # Only live holds have a deadline to wait for.
        assert {d.decode() for d in deadlines} == {h.hold_id for h in in_redis}

    @invariant()
    def get_hold_agrees_with_model(self) -> None:
        for hold_id, h in self.holds.items():
            got = self.run(sales.get_hold(self.svc, self.event_id, hold_id))
            assert got.status == h.status, (h, got)
            assert got.booking_id == h.booking_id, (h, got)
            assert got.seats == h.seats, (h, got)
            assert got.customer_id == h.customer, (h, got)
            assert got.total == h.total, (h, got)


def test_holds_state_machine(settings: Settings) -> None:
    # A plain sync test: pytest-asyncio runs nothing here, so no loop is running in this
    # thread and each machine may drive an event loop of its own.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise AssertionError("an event loop is running in the test thread")
    HoldsMachine.app_settings = settings
    run_state_machine_as_test(
        HoldsMachine,
        settings=hsettings(
            max_examples=100,
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
