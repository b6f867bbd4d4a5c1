"""Reconciliation over events (`boxoffice reconcile`, the admin API): each event checked
(service/durable/checks.py) until its drift is steady, repaired on request
(service/durable/repair.py) and checked again; the report, and its table for people."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import sqlalchemy as sa

from service.core.db import events
from service.core.timefmt import from_ms
from service.durable import live, scans
from service.durable.checks import check_event
from service.durable.findings import EventReport, Report, many
from service.durable.repair import repair_event
from service.hotpath.context import Services

# The check reads a live event a chunk at a time, not in one snapshot: a hold that expires
# between two reads looks like drift for an instant. Drift counts only when each of these
# checks, this far apart, finds it.
CHECKS = 3
RECHECK_SECONDS = 1.0


async def event_ids(svc: Services, only: str | None) -> list[str]:
    async with svc.engine.connect() as conn:
        query = sa.select(events.c.id).order_by(events.c.id)
        if only is not None:
            query = query.where(events.c.id == only)
        return [r.id for r in await conn.execute(query)]


async def _settled_check(svc: Services, event_id: str) -> EventReport:
    report = await check_event(svc, event_id)
    for _ in range(CHECKS - 1):
        if report.consistent:
            break
        await asyncio.sleep(RECHECK_SECONDS)
        report = await check_event(svc, event_id)
    return report


async def reconcile(
    svc: Services,
    only: str | None = None,
    repair: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> Report:
    ids = await event_ids(svc, only)
    if repair and only is None:
        # Ids registered by a create that then failed: no event of theirs is anywhere.
        await live.prune_registry(svc)
    reports = []
    for i, event_id in enumerate(ids):
        if progress is not None:
            progress(i, len(ids), event_id)
        report = await _settled_check(svc, event_id)
        if repair and not report.consistent:
            repairs = await repair_event(svc, event_id)
            report = await _settled_check(svc, event_id)
            report.repairs = repairs
        reports.append(report)
    return Report(
        consistent=all(r.consistent for r in reports),
        checked_at=from_ms(await scans.redis_time(svc)),
        repaired=repair,
        events=reports,
    )


def render(report: Report) -> str:
    """The report as a table for people."""
    lines = []
    for e in report.events:
        verdict = "consistent" if e.consistent else "DRIFT"
        where = "" if e.in_redis else " (archived)" if e.archived else " (not in Redis)"
        lines.append(f"event {e.event_id}: {verdict}{where}")
        lines.append(
            f"  {'category':<20} {'capacity':>9} {'available':>10} {'held':>7} {'sold':>7}"
            "   expected (available/held/sold)"
        )
        for c in e.categories:
            x = c.expected
            values = [c.capacity, c.available, c.held, c.sold]
            shown = ["-" if v is None else str(v) for v in values]
            mark = "" if c.consistent else "  <-"
            lines.append(
                f"  {c.name:<20} {shown[0]:>9} {shown[1]:>10} {shown[2]:>7} {shown[3]:>7}"
                f"   {x['available']}/{x['held']}/{x['sold']}{mark}"
            )
        s, o = e.seats, e.outbox
        if s.total:
            lines.append(
                f"  seats: {s.total} ({s.available} available, {s.held} held, {s.sold} sold)"
            )
        oldest = "" if o.oldest_seconds is None else f", oldest {o.oldest_seconds:.1f} s"
        lines.append(
            f"  bookings in PostgreSQL: {e.bookings_in_postgres}; outbox: {o.waiting} waiting"
            f"{oldest}, {many(o.dead_letters, 'dead letter')}; leaked holds: {e.leaked_holds}"
        )
        for kind, n in sorted(e.problem_counts.items()):
            lines.append(f"  ! {kind}: {n}")
        lines.extend(f"    - {p.detail}" for p in e.problems)
        lines.extend(f"  repaired: {r}" for r in e.repairs)
    total = len(report.events)
    drift = sum(not e.consistent for e in report.events)
    lines.append(
        f"{many(total, 'event')} checked, {drift} with drift"
        + (" after repair" if report.repaired else "")
    )
    return "\n".join(lines) + "\n"
