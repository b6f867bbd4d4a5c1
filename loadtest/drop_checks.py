"""The ticket drop's end (loadtest/locustfile.py): on the master, wait for the write-behind,
ask the reconcile endpoint, check that nothing was oversold, and give the verdict (the run
fails, exit code 1, when something is wrong); the waiting room's and the bots' figures."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import gevent
from locust.env import Environment

from loadtest.drop_buyers import tickets
from loadtest.drop_counters import Counters, gather_counters
from loadtest.drop_scenario import BOT_PREFIX, GA, SEATED, RunState, Scenario
from loadtest.drop_service import Api, ServiceError, admin_api, is_controller

log = logging.getLogger("boxoffice.drop")

POLL_SECONDS = 1.0
RECHECKS = 3  # reconcile reports, 1 s apart, that must all find drift to call it drift
RECHECK_SECONDS = 1.0


def on_test_stop(environment: Environment, **_: Any) -> None:
    if not is_controller(environment) or not RunState.event_id or RunState.scenario is None:
        return
    scenario, event_id = RunState.scenario, RunState.event_id
    RunState.event_id = ""  # check once per run
    counters, source = gather_counters(environment)
    _print_counters(event_id, counters, source)
    try:
        problems = _check(admin_api(environment), scenario, counters)
    except (ServiceError, LookupError, TypeError, ValueError) as e:
        problems = [f"the final check could not run: {e}"]
    if problems:
        print(f"\nVERDICT for {event_id}: FAIL", flush=True)
        for p in problems:
            print(f"  - {p}", flush=True)
        print(flush=True)
        environment.process_exit_code = 1
    else:
        print(f"\nVERDICT for {event_id}: OK — consistent, nothing oversold\n", flush=True)


def on_queue_stop(environment: Environment, **_: Any) -> None:
    """The waiting room's own figures, for a run that had one."""
    scenario = RunState.scenario
    if not is_controller(environment) or scenario is None or not scenario.waiting_room_apm:
        return
    try:
        figures = admin_api(environment).get(f"/admin/events/{scenario.event_id}/queue")
    except ServiceError as e:
        log.warning("waiting room figures: %s", e)
        return
    log.info("waiting room of %s: %s", scenario.event_id, json.dumps(figures))


def _print_counters(event_id: str, c: Counters, source: str) -> None:
    attempts = c.holds + c.sold_out + c.seats_unavailable + c.customer_limit
    print(
        f"\nTicket drop {event_id}: what the buyers saw ({source})\n"
        f"  event views        {c.views}\n"
        f"  hold attempts      {attempts}: {c.holds} held ({c.held_tickets} tickets), "
        f"{c.sold_out} sold_out, {c.seats_unavailable} seats_unavailable, "
        f"{c.customer_limit} customer_limit\n"
        f"  sales              {c.bookings} bookings, {c.sold_tickets} tickets\n"
        f"  releases           {c.releases}\n"
        f"  expiries           {c.walkaways + c.confirm_too_late} "
        f"({c.walkaways} walked away, {c.confirm_too_late} confirmed too late)",
        flush=True,
    )


def _categories(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["events"][0]["categories"]}


def _held(report: dict[str, Any]) -> int:
    return sum(int(c["held"] or 0) for c in _categories(report).values())


def _wait(
    api: Api, event_id: str, what: str, done: Callable[[dict[str, Any]], bool], timeout: float
) -> tuple[dict[str, Any], bool]:
    """Poll the reconcile report until done(report) or the timeout."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    report = api.reconcile(event_id)
    while not done(report) and time.monotonic() < deadline:
        gevent.sleep(POLL_SECONDS)
        report = api.reconcile(event_id)
    ok = done(report)
    print(f"  {what}: {'yes' if ok else 'NO'} after {time.monotonic() - started:.1f} s", flush=True)
    return report, ok


def _verdict(api: Api, event_id: str) -> dict[str, Any]:
    """The reconcile report, asked again while it finds drift, up to RECHECKS reports.

    The check is not atomic: it reads the holds, then the seats and the counters, so a hold
    that expires in between shows as drift (seat_not_held, counter_mismatch) in that one
    report. Real drift does not go away by itself: it shows in every report.
    """
    report = api.reconcile(event_id)
    for attempt in range(1, RECHECKS):
        if report["consistent"]:
            break
        kinds = ", ".join(f"{k} {n}" for k, n in report["events"][0]["problem_counts"].items())
        print(
            f"  reconcile report {attempt} of at most {RECHECKS} finds drift ({kinds}), "
            f"{_held(report)} tickets held: asking again",
            flush=True,
        )
        gevent.sleep(RECHECK_SECONDS)
        report = api.reconcile(event_id)
    print(f"  reconcile: consistent={report['consistent']}", flush=True)
    return report


def _check(api: Api, scenario: Scenario, counters: Counters) -> list[str]:
    """What is wrong with the event after the run (nothing: an empty list)."""
    event_id = scenario.event_id
    problems: list[str] = []
    print("Final checks:", flush=True)

    # 1. The write-behind catches up: every confirmed booking reaches PostgreSQL.
    report, drained = _wait(
        api,
        event_id,
        "write-behind caught up (outbox waiting 0)",
        lambda r: r["events"][0]["outbox"]["waiting"] == 0,
        scenario.drain_timeout,
    )
    if not drained:
        waiting = report["events"][0]["outbox"]["waiting"]
        problems.append(f"{waiting} bookings still waiting in the outbox after the drain timeout")

    # 2. Optionally, every abandoned hold comes back on sale.
    if scenario.expire_wait:
        report, expired = _wait(
            api,
            event_id,
            f"every hold ended (held 0; was {_held(report)})",
            lambda r: _held(r) == 0,
            scenario.hold_ttl + 30.0,
        )
        if not expired:
            problems.append(f"{_held(report)} tickets still held {scenario.hold_ttl + 30} s on")

    # 3. The reconcile verdict, and the counters against the event's shape.
    report = _verdict(api, event_id)
    ev = report["events"][0]
    cats = _categories(report)
    if not report["consistent"]:
        kinds = ", ".join(f"{k} {n}" for k, n in ev["problem_counts"].items())
        problems.append(f"reconcile reports drift in {RECHECKS} reports in a row: {kinds}")
        problems.extend(f"  {p['kind']}: {p['detail']}" for p in ev["problems"][:10])
    view = api.get(f"/events/{event_id}")
    available = {c["name"]: int(c["available"]) for c in view["categories"]}
    for name, capacity in scenario.capacities.items():
        c = cats.get(name)
        if c is None or c["capacity"] is None:
            problems.append(f"{name}: not in the reconcile report")
            continue
        sold, held, free = int(c["sold"]), int(c["held"]), int(c["available"])
        print(
            f"  {name:<7} capacity {capacity:>6}  sold {sold:>6}  held {held:>5}  "
            f"available {free:>6}  (public view: {available.get(name)})",
            flush=True,
        )
        if int(c["capacity"]) != capacity:
            problems.append(f"{name}: capacity {c['capacity']} in Redis, created with {capacity}")
        if sold > capacity:
            problems.append(f"{name}: OVERSOLD, {sold} sold of {capacity}")
        if min(sold, held, free) < 0:
            problems.append(f"{name}: negative counter (sold {sold}, held {held}, free {free})")
        if sold + held + free != capacity:
            problems.append(f"{name}: sold {sold} + held {held} + available {free} != {capacity}")
        public = available.get(name, -1)
        if not 0 <= public <= capacity - sold:
            problems.append(f"{name}: public available {public}, capacity {capacity}, sold {sold}")
        if scenario.expire_wait and held == 0 and public != capacity - sold:
            problems.append(f"{name}: no holds left, yet available {public} != {capacity - sold}")

    # 4. PostgreSQL's bookings: the same tickets sold, no seat twice, none the buyers saw lost.
    bookings = api.bookings(event_id)
    ga_tickets = sum(
        int(i["quantity"]) for b in bookings for i in b["items"] if i["category"] == GA
    )
    seats = Counter(label for b in bookings for label in b["seats"])
    pg_sold = {GA: ga_tickets, SEATED: sum(seats.values())}
    print(
        f"  PostgreSQL: {len(bookings)} confirmed bookings, "
        + ", ".join(f"{name} {pg_sold[name]}" for name in scenario.capacities)
        + " tickets",
        flush=True,
    )
    if twice := [label for label, n in seats.items() if n > 1]:
        problems.append(f"OVERSOLD seats, in more than one booking: {sorted(twice)[:20]}")
    for name, capacity in scenario.capacities.items():
        if pg_sold[name] > capacity:
            problems.append(f"{name}: OVERSOLD in PostgreSQL, {pg_sold[name]} of {capacity}")
        if drained and name in cats and pg_sold[name] != int(cats[name]["sold"] or 0):
            problems.append(
                f"{name}: PostgreSQL's bookings have {pg_sold[name]} tickets, "
                f"the event has sold {cats[name]['sold']}"
            )
    # A buyer whose confirm was cut off by the test's end may not know of its booking, so
    # the service may have more than the buyers counted, never fewer.
    if drained and len(bookings) < counters.bookings:
        problems.append(
            f"buyers got {counters.bookings} confirmations, PostgreSQL has {len(bookings)}"
        )
    if drained and sum(pg_sold.values()) < counters.sold_tickets:
        problems.append(
            f"buyers bought {counters.sold_tickets} tickets, PostgreSQL has {sum(pg_sold.values())}"
        )
    if counters.server_errors:
        problems.append(f"{counters.server_errors} answers were 5xx")
    if scenario.bots:
        problems.extend(_bot_report(bookings, counters))
    return problems


def _room_line(c: Counters) -> str:
    """The waiting room's places: humans' and bots' (empty without a room)."""
    places = c.joins + c.bot_joins
    if not c.bot_join_attempts and not c.joins:
        return ""
    share = c.bot_joins / places if places else 0.0
    return (
        f"  waiting room       {places} places: {c.joins} humans, {c.bot_joins} bots "
        f"({share:.1%} of the room; the bots tried {c.bot_join_attempts} times)\n"
    )


def _bot_report(bookings: list[dict[str, Any]], c: Counters) -> list[str]:
    """Who got the tickets: humans or bots (by PostgreSQL's bookings); what is wrong."""
    by_bots = sum(tickets(b) for b in bookings if b["customer_id"].startswith(BOT_PREFIX))
    sold = sum(tickets(b) for b in bookings)
    humans_served = len(
        {b["customer_id"] for b in bookings if not b["customer_id"].startswith(BOT_PREFIX)}
    )
    buyers = c.humans + c.bots
    bot_share_buyers = c.bots / buyers if buyers else 0.0
    bot_share_tickets = by_bots / sold if sold else 0.0
    print(
        "The drop with bots:\n"
        f"  buyers             {buyers}: {c.humans} humans, {c.bots} bots "
        f"({bot_share_buyers:.1%} of the buyers)\n"
        f"  sold               {sold} tickets: {sold - by_bots} to {humans_served} humans, "
        f"{by_bots} to bots ({bot_share_tickets:.1%} of what was sold)\n"
        f"  humans             {c.humans_with_tickets} bought (counted by the buyers), "
        f"{c.sold_out} sold_out, {c.not_on_sale} not_on_sale, {c.rate_limited} 429s\n"
        f"  bots               {c.bot_attempts} hold attempts: {c.bot_holds} held, "
        f"{c.bot_bookings} bookings ({c.bot_tickets} tickets), {c.bot_rate_limited} 429s, "
        f"{c.bot_sold_out} sold_out, {c.bot_other_refusals} other refusals\n"
        f"{_room_line(c)}"
        f"  5xx answers        {c.server_errors}",
        flush=True,
    )
    if sold and bot_share_tickets >= bot_share_buyers:
        return [
            f"bots got {bot_share_tickets:.1%} of the tickets, their share of the buyers "
            f"is {bot_share_buyers:.1%}"
        ]
    return []
