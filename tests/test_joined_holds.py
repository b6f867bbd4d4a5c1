"""Holds of one event that leave a process in the same turn of the event loop go to Redis as
one call of lua/hold_batch.lua (service/hotpath/joined.py): each still all or nothing, with
its own answer and its own Idempotency-Key record, and a failure of one never fails the
others. Raced through one process on a Redis of the module's own, whose INFO commandstats
and MONITOR see only these calls."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from service.core import errors, schemas
from service.core.keys import event_keys
from service.core.settings import Settings
from service.hotpath.context import Services
from service.hotpath.scripts import LUA_DIR, Idempotency, script_text
from service.selling import catalog, sales
from service.selling.idempotency import fingerprint
from tests.conftest import event_body, services_with
from tests.servers import RedisServer

_LIB = (LUA_DIR / "lib.lua").read_text()
SCRIPTS = ("hold", "hold_batch", "confirm", "confirm_batch", "release", "release_batch")
SHA = {n: hashlib.sha1(script_text(_LIB, n).encode()).hexdigest() for n in SCRIPTS}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def own(settings: Settings, redis_server: RedisServer) -> AsyncIterator[Services]:
    # The per-customer hold limit on (each customer's own key in each hold's part).
    changes = {"redis_url": redis_server.url, "rate_limit_customer_holds": 20}
    async with services_with(settings, **changes) as services:
        yield services


async def new_event(svc: Services, capacity: int, **overrides: Any) -> str:
    body = event_body(
        categories=[{"name": "GA", "price": 2500, "currency": "EUR", "capacity": capacity}],
        **overrides,
    )
    event = await catalog.create_event(svc, msgspec.convert(body, schemas.EventCreate))
    return event.id


def ga(customer: str, quantity: int = 1, category: str = "GA") -> schemas.HoldCreate:
    return schemas.HoldCreate(
        customer_id=customer, items=[schemas.HoldItem(category=category, quantity=quantity)]
    )


async def hold(
    svc: Services, event_id: str, body: schemas.HoldCreate, idem: Idempotency | None = None
) -> schemas.Hold | errors.BoxofficeError:
    """The hold, or the domain error it was refused with."""
    try:
        made, _ = await sales.create_hold_counted(svc, event_id, body, idem)
    except errors.BoxofficeError as e:
        return e
    return made


def key(event_id: str, name: str, body: schemas.HoldCreate) -> Idempotency:
    return fingerprint(name, "POST", f"/events/{event_id}/holds", msgspec.json.encode(body))


async def script_calls(svc: Services, work: Awaitable[Any]) -> tuple[Any, Counter[str]]:
    """What `work` returned, and the hold scripts' calls it made, by script, as MONITOR
    saw them."""
    r = svc.redis
    assert isinstance(r, Redis)  # a server of the module's own
    names = {sha: name for name, sha in SHA.items()}
    calls: Counter[str] = Counter()
    async with r.monitor() as m:
        result = await work
        await r.echo("end-of-work")
        while "end-of-work" not in (command := (await m.next_command())["command"]):
            if command.startswith("EVALSHA "):
                calls[names.get(command.split()[1], "other")] += 1
    return result, calls


def code(answer: schemas.Hold | errors.BoxofficeError) -> str:
    return "held" if isinstance(answer, schemas.Hold) else answer.code


async def stock(svc: Services, event_id: str) -> tuple[int, int, int]:
    """GA's tickets on sale, held, sold."""
    k = event_keys(event_id)
    avail, held, sold = [
        int(await svc.redis.hget(key, "GA") or 0) for key in (k.avail, k.held, k.sold)
    ]
    return avail, held, sold


async def test_500_holds_on_20_tickets_through_one_process(own: Services) -> None:
    """500 holds at once, each with an Idempotency-Key of its own (so none is answered by
    the process's sold-out shortcut): 20 held, 480 sold out, in a few joined calls; every
    record is its own, and each key replays its own answer."""
    event_id = await new_event(own, 20)
    bodies = [ga(f"buyer{i}") for i in range(500)]
    keys = [key(event_id, f"k{i}", b) for i, b in enumerate(bodies)]
    work = asyncio.gather(*(hold(own, event_id, b, k) for b, k in zip(bodies, keys, strict=True)))
    answers, calls = await script_calls(own, work)

    assert Counter(map(code, answers)) == {"held": 20, "sold_out": 480}
    assert calls["hold_batch"] >= 1 and sum(calls.values()) <= 50, calls
    made = [a for a in answers if isinstance(a, schemas.Hold)]
    assert len({h.hold_id for h in made}) == 20
    assert await stock(own, event_id) == (0, 20, 0)
    records = await own.redis.hgetall(event_keys(event_id).holds)
    assert sorted(records) == sorted(h.hold_id.encode() for h in made)
    for h in made:
        record = msgspec.json.decode(records[h.hold_id.encode()])
        assert record["c"] == h.customer_id and record["n"] == 1 and record["s"] == "held"

    # Each key replays its own first answer, all at once again, and nothing new is made.
    again = await asyncio.gather(
        *(hold(own, event_id, b, k) for b, k in zip(bodies, keys, strict=True))
    )
    for first, second in zip(answers, again, strict=True):
        if isinstance(first, schemas.Hold):
            assert isinstance(second, schemas.Hold) and second.hold_id == first.hold_id
            assert second.customer_id == first.customer_id
        else:
            assert code(second) == "sold_out"
    assert await stock(own, event_id) == (0, 20, 0)


async def test_a_refusal_in_a_batch_is_its_own(own: Services) -> None:
    """Holds joined in one call, some refused for reasons of their own (an unknown
    category, too many tickets, a key reused with another body, the customer's limit):
    each refused alone, the others held."""
    event_id = await new_event(own, 100, max_per_customer=2)
    reused = ga("reuser")
    cases = [
        (ga("a"), None),
        (ga("b", category="NOPE"), None),
        (ga("c"), None),
        (ga("d", quantity=11), None),  # max_per_order is 10
        (ga("e"), key(event_id, "same", ga("e"))),
        (reused, key(event_id, "same", reused)),  # after the one above, in the same call
        (ga("f"), None),
        (ga("greedy"), None),
        (ga("greedy"), None),
        (ga("greedy"), None),  # the customer's third ticket: over max_per_customer 2
    ]
    work = asyncio.gather(*(hold(own, event_id, b, k) for b, k in cases))
    answers, calls = await script_calls(own, work)
    assert calls == {"hold_batch": 1}, calls
    assert [code(a) for a in answers] == [
        "held",
        "unknown_category",
        "held",
        "validation_error",
        "held",
        "idempotency_key_reused",
        "held",
        "held",
        "held",
        "customer_limit",
    ]
    assert await stock(own, event_id) == (94, 6, 0)


async def test_an_error_in_one_hold_fails_it_alone(own: Services) -> None:
    """A request whose own part fails with an error (its customer's rate-limit key holds
    a hash: WRONGTYPE) fails alone; the others of its call are held."""
    event_id = await new_event(own, 10)
    await own.redis.hset(event_keys(event_id).customer_rate("broken"), "x", "1")
    work = asyncio.gather(
        *(hold(own, event_id, ga(c)) for c in ("a", "broken", "b")), return_exceptions=True
    )
    answers, calls = await script_calls(own, work)
    assert calls == {"hold_batch": 1}, calls
    assert code(answers[0]) == "held" and code(answers[2]) == "held"
    assert isinstance(answers[1], Exception) and "WRONGTYPE" in str(answers[1]), answers[1]
    assert await stock(own, event_id) == (8, 2, 0)


async def test_a_hold_alone_is_the_script_of_one(own: Services) -> None:
    """A hold with no other in its turn costs what it always did: one call of hold.lua."""
    event_id = await new_event(own, 10)
    answer, calls = await script_calls(own, hold(own, event_id, ga("solo")))
    assert code(answer) == "held"
    assert calls == {"hold": 1}, calls


async def test_joined_holds_of_named_seats(own: Services) -> None:
    """30 holds of the same seat and 30 of a seated category's best available, joined: one
    wins the seat, the others are told it is taken; each best-available hold gets a seat of
    its own until none is left."""
    body = event_body(
        categories=[
            {
                "name": "VIP",
                "price": 9900,
                "currency": "EUR",
                "seat_blocks": [{"rows": ["A", "B"], "seats_per_row": 5}],
            }
        ]
    )
    event_id = (await catalog.create_event(own, msgspec.convert(body, schemas.EventCreate))).id
    seat = [schemas.HoldCreate(customer_id=f"s{i}", seats=["A-1"]) for i in range(30)]
    best = [ga(f"b{i}", category="VIP") for i in range(30)]
    answers = await asyncio.gather(*(hold(own, event_id, b) for b in seat + best))
    assert Counter(map(code, answers[:30])) == {"held": 1, "seats_unavailable": 29}
    won = [a for a in answers[30:] if isinstance(a, schemas.Hold)]
    assert len(won) == 9  # 10 seats, one of them A-1
    seats = [s for h in won for s in h.seats or []]
    assert len(set(seats)) == 9 and "A-1" not in seats
    assert Counter(map(code, answers[30:]))["sold_out"] == 21


async def test_a_customer_over_the_rate_limit_in_a_batch(own: Services) -> None:
    """25 attempts of one customer joined with others': the limit (20 a window) refuses the
    customer's last 5 alone."""
    event_id = await new_event(own, 100, max_per_order=10)
    bodies = [ga("bot") for _ in range(25)] + [ga(f"human{i}") for i in range(5)]
    answers, calls = await script_calls(
        own, asyncio.gather(*(hold(own, event_id, b) for b in bodies))
    )
    assert calls == {"hold_batch": 1}, calls
    assert Counter(map(code, answers[:25])) == {"held": 20, "rate_limited": 5}
    assert [code(a) for a in answers[25:]] == ["held"] * 5
    assert await stock(own, event_id) == (75, 25, 0)


async def test_one_key_sent_ten_times_in_one_batch_makes_one_hold(own: Services) -> None:
    """The same request with the same Idempotency-Key, ten times in one call: the first
    makes the hold, the nine after it replay its record."""
    event_id = await new_event(own, 100)
    body = ga("twice")
    idem = key(event_id, "again", body)
    answers, calls = await script_calls(
        own, asyncio.gather(*(hold(own, event_id, body, idem) for _ in range(10)))
    )
    assert calls == {"hold_batch": 1}, calls
    assert all(isinstance(a, schemas.Hold) for a in answers), answers
    assert len({a.hold_id for a in answers if isinstance(a, schemas.Hold)}) == 1
    assert await stock(own, event_id) == (99, 1, 0)


async def settle(
    svc: Services, event_id: str, hold_id: str, how: str, idem: Idempotency | None = None
) -> str:
    """Confirm or release the hold: the booking's hold id, "released", or the error code."""
    try:
        if how == "confirm":
            booking = await sales.confirm_hold(svc, event_id, hold_id, schemas.HoldConfirm(), idem)
            return booking.hold_id
        await sales.release_hold(svc, event_id, hold_id, idem)
    except errors.BoxofficeError as e:
        return e.code
    return "released"


async def test_confirms_and_releases_of_one_turn_go_joined(own: Services) -> None:
    """40 holds, then 20 confirmed, 19 released, one confirmed twice and a hold that does
    not exist confirmed and released, all at once: one call of each batch script, each
    answer its own, every booking in the outbox once."""
    event_id = await new_event(own, 100)
    made = await asyncio.gather(*(hold(own, event_id, ga(f"c{i}")) for i in range(40)))
    ids = [h.hold_id for h in made if isinstance(h, schemas.Hold)]
    assert len(ids) == 40
    jobs = [(i, "confirm") for i in ids[:20]] + [(i, "release") for i in ids[20:39]]
    jobs += [(ids[39], "confirm"), (ids[39], "confirm"), ("nope", "confirm"), ("nope", "release")]
    answers, calls = await script_calls(
        own, asyncio.gather(*(settle(own, event_id, i, how) for i, how in jobs))
    )
    assert calls == {"confirm_batch": 1, "release_batch": 1}, calls
    assert answers[:20] == ids[:20]
    assert answers[20:39] == ["released"] * 19
    assert answers[39:] == [ids[39], ids[39], "hold_not_found", "hold_not_found"]
    assert await stock(own, event_id) == (79, 0, 21)
    k = event_keys(event_id)
    assert await own.redis.hlen(k.bookings) == 21
    assert await own.redis.xlen(k.outbox) == 21


async def test_joined_confirms_write_what_each_alone_would(own: Services) -> None:
    """The confirms of one call share their writes (settling.lua confirms_write): each
    hold's record, sets, booking, outbox entry and the counters are what a confirm alone
    leaves, and a hold confirmed twice in the call gets its one booking both times."""
    event_id = await new_event(own, 10)
    made = await asyncio.gather(*(hold(own, event_id, ga(f"w{i}", 2)) for i in range(4)))
    ids = [h.hold_id for h in made if isinstance(h, schemas.Hold)]
    confirms = [*ids[:3], ids[0]]

    async def confirm(hold_id: str) -> schemas.Booking:
        return await sales.confirm_hold(own, event_id, hold_id, schemas.HoldConfirm(), None)

    bookings, calls = await script_calls(own, asyncio.gather(*(confirm(i) for i in confirms)))
    assert calls == {"confirm_batch": 1}, calls
    assert bookings[3] == bookings[0]
    assert len({b.booking_id for b in bookings}) == 3
    k = event_keys(event_id)
    r: Any = own.redis  # replies as bytes; redis-py's types allow str and None too
    for b in bookings[:3]:
        record = msgspec.json.decode(await r.hget(k.holds, b.hold_id))
        assert (record["s"], record["b"]) == ("confirmed", b.booking_id)
        assert await r.zscore(k.deadlines, b.hold_id) is None
        assert await r.zscore(k.ended, b.hold_id) == record["e"]
        booking = msgspec.json.decode(await r.hget(k.bookings, b.booking_id))
        assert (booking["h"], booking["n"]) == (b.hold_id, 2)
    assert await r.zscore(k.deadlines, ids[3]) is not None  # not confirmed: still live
    outbox = [msgspec.json.decode(f[b"booking"])["id"] for _, f in await r.xrange(k.outbox)]
    assert outbox == [b.booking_id for b in bookings[:3]]
    assert int(await r.hget(k.stats, "confirmed")) == 3
    assert await stock(own, event_id) == (2, 2, 6)


async def test_a_confirm_with_a_key_replays_in_its_batch(own: Services) -> None:
    """Confirms with Idempotency-Keys joined in one call: the same key twice gives the same
    booking, and each key's record is its own."""
    event_id = await new_event(own, 10)
    made = await asyncio.gather(*(hold(own, event_id, ga(f"k{i}")) for i in range(3)))
    ids = [h.hold_id for h in made if isinstance(h, schemas.Hold)]

    def idem(name: str, hold_id: str) -> Idempotency:
        path = f"/events/{event_id}/holds/{hold_id}/confirm"
        return fingerprint(name, "POST", path, b"")

    keys = [idem("a", ids[0]), idem("a", ids[0]), idem("b", ids[1]), idem("c", ids[2])]
    targets = [ids[0], ids[0], ids[1], ids[2]]
    answers, calls = await script_calls(
        own,
        asyncio.gather(
            *(settle(own, event_id, i, "confirm", k) for i, k in zip(targets, keys, strict=True))
        ),
    )
    assert calls == {"confirm_batch": 1}, calls
    assert answers == targets
    again = await asyncio.gather(
        *(settle(own, event_id, i, "confirm", k) for i, k in zip(targets, keys, strict=True))
    )
    assert again == targets
    assert await own.redis.hlen(event_keys(event_id).bookings) == 3
