"""The repair of one event (`reconcile --repair`): what PostgreSQL lacks is written to it
(the outbox a dead or absent worker left, dead letters, bookings whose entries were lost),
the bookings only PostgreSQL has are adopted into Redis, and the event's live state is
then recounted from its records (service/durable/recount.py): safe while the event is
selling."""

from __future__ import annotations

from typing import Any

import msgspec
import sqlalchemy as sa

from service.core import errors
from service.core.db import categories
from service.core.keys import event_keys
from service.core.records import decode_booking
from service.durable import ledger, live, outbox, scans
from service.durable.bookingrows import Poison, write
from service.durable.findings import many
from service.durable.outbox import Entry
from service.durable.recount import recount
from service.durable.writebehind import WriteBehind
from service.hotpath.context import Services


async def repair_event(svc: Services, event_id: str) -> list[str]:
    """Put Redis back in line with the records; returns what it changed."""
    keys = event_keys(event_id)
    done: list[str] = []
    if not await svc.redis.exists(keys.meta):
        try:
            await live.restore(svc, event_id)
        except errors.EventArchived:
            return ["none: the event is archived (out of Redis on purpose)"]
        return ["loaded the event from PostgreSQL (catalog and bookings)"]
    added, refused = await ledger.adopt(svc, event_id)
    if added:
        done.append(f"adopted {many(added, 'booking')} that only PostgreSQL had")
    if refused:
        done.append(f"left out {many(len(refused), 'booking')} that break the rules")
    done += await _redrive(svc, event_id)
    done += await _align_capacity(svc, event_id)
    counted = await recount(svc, event_id)
    for name, after in counted.after.items():
        before = counted.before[name]
        if before != after:
            done.append(f"{name}: counters {before} -> {after}")
    if counted.expired:
        done.append(f"released {many(counted.expired, 'hold')} past their deadline")
    if counted.released:
        held = "hold" if len(counted.released) == 1 else "holds"
        done.append(f"released {held} {', '.join(counted.released)}: their seats are sold")
    if counted.unsure:
        done.append(
            f"left the count of {many(counted.unsure, 'customer')} buying meanwhile:"
            " repair again to recount it"
        )
    return done


async def _redrive(svc: Services, event_id: str) -> list[str]:
    """Write to PostgreSQL what should be there and is not: the outbox (whatever a dead or
    absent worker left), dead letters, and Redis's bookings whose entries were lost or
    dead-lettered. Idempotent, like the worker itself. What PostgreSQL still refuses is
    left as it is (reported, and the check that follows finds the drift); only a server
    that is away stops the repair."""
    keys = event_keys(event_id)
    done: list[str] = []
    if drained := await WriteBehind(svc, "reconcile").drain(event_id):
        done.append(f"wrote {many(drained, 'outbox entry', 'outbox entries')} to PostgreSQL")
    redriven = 0
    async for chunk in scans.stream(svc, keys.deadletter):
        for entry_id, fields in chunk:
            if (
                await _try_write(svc, [(event_id, entry_id, outbox.original_fields(fields))])
                is None
            ):
                await svc.redis.xdel(keys.deadletter, entry_id)
                redriven += 1
    if redriven:
        done.append(f"re-drove {many(redriven, 'dead letter')} into PostgreSQL")
    done += await _write_lost(svc, event_id)
    if resolved := await _resolve_dead_letters(svc, event_id):
        done.append(f"removed {many(resolved, 'dead letter')} whose change PostgreSQL now has")
    return done


async def _try_write(svc: Services, entries: list[Entry]) -> str | None:
    """Write entries in one transaction; None when done, else why PostgreSQL (or the
    conversion) refused them. A server that is away raises."""
    try:
        async with svc.engine.begin() as conn:
            await write(conn, entries)
    except Exception as e:
        if errors.unavailable(e) and not isinstance(e, Poison):
            raise
        return f"{type(e).__name__}: {e}"
    return None


async def _write_lost(svc: Services, event_id: str) -> list[str]:
    """Redis's bookings (and cancellations) that PostgreSQL lacks, written from Redis's own
    records: whatever happened to their outbox entries (lost, or dead-lettered because the
    entry itself was damaged). A cancellation carries its own time (`xa`)."""
    stored = await scans.stored(svc, event_id)
    now = await scans.redis_time(svc)
    lost: list[Entry] = []
    async for pairs in scans.hscan(svc, event_keys(event_id).bookings):
        for _, raw in pairs:
            r = decode_booking(raw)
            if r.id not in stored:
                confirmed = msgspec.structs.replace(r, status="confirmed")
                lost.append((event_id, b"0-0", outbox.confirm_entry(confirmed)))
            if r.status == "cancelled" and stored.get(r.id) != "cancelled":
                at = _cancelled_at(raw) or now
                lost.append((event_id, b"0-0", outbox.cancel_entry(r.id, at)))
    if not lost or await _try_write(svc, lost) is None:
        return [f"wrote {many(len(lost), 'booking change')} the outbox had lost"] if lost else []
    # One of them is refused: the rest go in one by one, and the refused ones are said.
    done, refused = 0, []
    for entry in lost:
        if (why := await _try_write(svc, [entry])) is None:
            done += 1
        else:
            refused.append(
                f"PostgreSQL refuses {entry[2][b'op'].decode()} of booking"
                f" {outbox.booking_id(entry[2])}: {why}"
            )
    wrote = [f"wrote {many(done, 'booking change')} the outbox had lost"] if done else []
    return wrote + refused


class _CancelTime(msgspec.Struct):
    xa: int | None = None  # set by lua/cancel.lua


_decode_cancel_time = msgspec.json.Decoder(_CancelTime).decode


def _cancelled_at(raw: bytes) -> int | None:
    """When a booking was cancelled, as its Redis record says; None for a record that does
    not say (then the repair's own time stands in: the cancellation happened by then)."""
    return _decode_cancel_time(raw).xa


async def _resolve_dead_letters(svc: Services, event_id: str) -> int:
    """Dead letters whose change PostgreSQL now has (written from Redis's record) are done
    with: a confirmation whose booking is stored, a cancellation whose booking is
    cancelled. The rest stay for an operator."""
    keys = event_keys(event_id)
    stored = await scans.stored(svc, event_id)
    done = []
    async for chunk in scans.stream(svc, keys.deadletter):
        for entry_id, fields in chunk:
            booking_id = outbox.booking_id(fields)
            status = stored.get(booking_id or "")
            op = outbox.op(fields)
            if (op == outbox.CONFIRM and status) or (op == outbox.CANCEL and status == "cancelled"):
                done.append(entry_id)
    if done:
        await svc.redis.xdel(keys.deadletter, *done)
    return len(done)


async def _align_capacity(svc: Services, event_id: str) -> list[str]:
    """PostgreSQL holds the catalog: a capacity Redis has otherwise is put back."""
    keys = event_keys(event_id)
    async with svc.engine.connect() as conn:
        caps = {
            r.name: r.capacity
            for r in await conn.execute(
                sa.select(categories.c.name, categories.c.capacity).where(
                    categories.c.event_id == event_id, ~categories.c.seated
                )
            )
        }
    raw: Any = await svc.redis.hgetall(keys.cap)
    live = {k.decode(): int(v) for k, v in raw.items()}
    wrong = {name: cap for name, cap in caps.items() if live.get(name) != cap}
    if not wrong:
        return []
    await svc.redis.hset(keys.cap, mapping=wrong)  # the recount that follows fixes the rest
    return [f"capacity of {name} back to {cap}" for name, cap in wrong.items()]
