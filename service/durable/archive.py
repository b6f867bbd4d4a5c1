"""An event's life: once it is over and done with, its live state leaves Redis.

An event is over once it is closed, or once it started (or was last reopened) more than
BOXOFFICE_ARCHIVE_AFTER_SECONDS ago. lua/archive.lua then deletes its live state in one
atomic step, but only once nothing of it is unfinished: no live hold, an outbox the
write-behind has drained, no dead letter. PostgreSQL keeps everything; the event's reads
come from there (catalog.view_archived, bookings, reconcile), and only reopening it
(PATCH status on_sale) loads it again.

Two stores, written in an order that leaves nothing half done: the event's row is locked
and marked archived in one PostgreSQL transaction that stays open while the script runs,
and commits only if the script archived (so a PATCH never interleaves, and a refusal
leaves no mark). The registry of live events, on a node of its own, is updated last and
checked again (live.unregister_archived). A failure in between leaves at worst an event
that PostgreSQL does not mark while Redis lacks it: the next request loads it back, and
the worker archives it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from service.core import errors
from service.core.db import events
from service.core.keys import OUTBOX_GROUP, event_keys
from service.core.schemas import ArchiveState
from service.durable import live
from service.hotpath.context import Services
from service.hotpath.scripts import RETRY

log = logging.getLogger("boxoffice.archive")

# The outcome of one try (lua/archive.lua) when it is done; else what it waits for.
ARCHIVED = "archived"
# Reclaim rounds (a batch of overdue holds each) before a try gives up for now.
MAX_ROUNDS = 20
# How long an operator's archive writes the event's outbox itself before it tries.
DRAIN_SECONDS = 5.0
Outcome = ArchiveState


def is_over(row: Any, now: datetime, after_seconds: int) -> bool:
    """Closed, or started (reopened, if later) more than `after_seconds` before `now`."""
    if row.status == "closed":
        return True
    since = row.starts_at if row.reopened_at is None else max(row.starts_at, row.reopened_at)
    return bool(since + timedelta(seconds=after_seconds) < now)


def _over_clause(now: datetime, after_seconds: int) -> Any:
    """is_over() as SQL."""
    cutoff = now - timedelta(seconds=after_seconds)
    return sa.or_(
        events.c.status == "closed",
        sa.and_(
            events.c.starts_at < cutoff,
            sa.or_(events.c.reopened_at.is_(None), events.c.reopened_at < cutoff),
        ),
    )


async def event_row(conn: Any, event_id: str, lock: bool = False) -> tuple[Any, datetime]:
    """The event's row (FOR UPDATE when `lock`) and PostgreSQL's clock; EventNotFound."""
    query = sa.select(events).where(events.c.id == event_id)
    row = (await conn.execute(query.with_for_update() if lock else query)).first()
    if row is None:
        raise errors.EventNotFound(f"no event {event_id!r}")
    return row, await _db_now(conn)


async def _db_now(conn: Any) -> datetime:
    now: datetime = (await conn.execute(sa.select(sa.func.now()))).scalar_one()
    return now


def _require_over(row: Any, now: datetime, after_seconds: int) -> None:
    if not is_over(row, now, after_seconds):
        raise errors.EventNotOver(
            f"event {row.id!r} is not over: it is not closed, and it starts (or was"
            f" reopened) less than {after_seconds} s before now"
        )


async def archive(svc: Services, event_id: str, mode: Literal["now", "settled"]) -> Outcome:
    """One try at taking the event out of Redis. EventNotFound, EventNotOver. `now`: as
    soon as nothing of it is unfinished (an operator asked); `settled`: also once its
    ended holds have outlived their retention (the worker's own step), so that hold
    records stay readable as long as the contract promises."""
    async with svc.engine.begin() as conn:
        row, now = await event_row(conn, event_id, lock=True)
        _require_over(row, now, svc.settings.archive_after_seconds)
        reply = await _script(svc, event_id, mode)
        if reply != ARCHIVED:
            return Outcome(event_id=event_id, archived=False, waiting_for=reply)  # type: ignore[arg-type]
        if row.archived_at is None:
            await conn.execute(
                events.update().where(events.c.id == event_id).values(archived_at=now)
            )
    await live.unregister_archived(svc, event_id)
    return Outcome(event_id=event_id, archived=True, waiting_for=None)


async def _script(svc: Services, event_id: str, mode: str) -> str:
    """lua/archive.lua, reclaiming overdue holds as long as it asks."""
    keys = event_keys(event_id)
    for _ in range(MAX_ROUNDS):
        reply = await svc.scripts.call_event(
            "archive", event_id, OUTBOX_GROUP, mode, extra_keys=keys.archive
        )
        if reply == RETRY:  # more overdue holds than one batch
            await live.reclaim_all(svc, event_id)
            continue
        text = reply.decode()
        return ARCHIVED if text == "gone" else text
    return "holds"


async def ask(svc: Services, event_id: str) -> Outcome:
    """The operator's archive (the route and the CLI): refused for an event not over;
    remembered, so that the worker finishes it as soon as it may; tried now, after the
    event's outbox is written behind here (as reconcile --repair does)."""
    async with svc.engine.begin() as conn:
        row, now = await event_row(conn, event_id)
        _require_over(row, now, svc.settings.archive_after_seconds)
        if row.archived_at is not None and not await _in_redis(svc, event_id):
            return Outcome(event_id=event_id, archived=True, waiting_for=None)
        await conn.execute(
            events.update()
            .where(events.c.id == event_id, events.c.archive_asked_at.is_(None))
            .values(archive_asked_at=sa.func.now())
        )
    await _drain(svc, event_id)
    return await archive(svc, event_id, "now")


async def _in_redis(svc: Services, event_id: str) -> bool:
    return bool(await svc.redis.exists(event_keys(event_id).meta))


async def _drain(svc: Services, event_id: str) -> None:
    from service.durable.writebehind import WriteBehind  # it imports live, as this module does

    try:
        # Bounded: under steady sales the outbox is never empty for long, and the archive
        # waits for live holds anyway. Entries a cut-off drain left pending are its dead
        # consumer's: a worker (or the next drain) takes them over at once.
        async with asyncio.timeout(DRAIN_SECONDS):
            await WriteBehind(svc, f"archive-{secrets.token_hex(3)}").drain(event_id)
    except TimeoutError:
        pass
    except Exception as e:  # the worker drains it anyway; the archive waits for that
        if errors.unavailable(e):
            raise
        errors.log_failure(log, f"writing the outbox of {event_id!r} before archiving", e)


async def over_events(svc: Services) -> list[tuple[str, bool]]:
    """Events over and not archived: (id, asked by an operator)."""
    async with svc.engine.connect() as conn:
        now = await _db_now(conn)
        rows = await conn.execute(
            sa.select(events.c.id, events.c.archive_asked_at)
            .where(
                events.c.archived_at.is_(None),
                _over_clause(now, svc.settings.archive_after_seconds),
            )
            .order_by(events.c.id)
        )
        return [(r.id, r.archive_asked_at is not None) for r in rows]


async def ask_all_over(svc: Services) -> list[Outcome]:
    """The operator's archive of every event that is over (`boxoffice archive --all-over`)."""
    outcomes = []
    for event_id, _ in await over_events(svc):
        try:
            outcomes.append(await ask(svc, event_id))
        except (errors.EventNotOver, errors.EventNotFound):
            continue  # reopened or gone meanwhile
    return outcomes


async def step(svc: Services) -> list[Outcome]:
    """The worker's step: try every event that is over; an operator's request at once,
    the others once settled. One event's failure does not stop the others."""
    outcomes = []
    for event_id, asked in await over_events(svc):
        try:
            outcomes.append(await archive(svc, event_id, "now" if asked else "settled"))
        except (errors.EventNotOver, errors.EventNotFound):
            continue
        except Exception as e:
            if errors.unavailable(e):
                raise
            errors.log_failure(log, f"archiving {event_id!r}", e)
    return outcomes


class Archiver:
    """Runs in every worker: several at once serialise on each event's row lock."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.svc.settings.archive_interval_seconds
        while not stop.is_set():
            try:
                done = [o.event_id for o in await step(self.svc) if o.archived]
                if done:
                    log.info("archived %d event(s): %s", len(done), ", ".join(done[:20]))
            except Exception as e:
                errors.log_failure(log, "archive step failed; trying again later", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
