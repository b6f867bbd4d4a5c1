"""What the ticket drop's buyers saw (loadtest/locustfile.py), counted in each process; in
distributed mode the master asks the workers for theirs when the test stops."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import gevent
from locust.env import Environment
from locust.rpc import Message
from locust.runners import STATE_INIT, STATE_MISSING, STATE_STOPPED, MasterRunner

MSG_REPORT = "boxoffice:report"  # master -> workers: stop your buyers and report
MSG_COUNTERS = "boxoffice:counters"  # worker -> master: the counters


@dataclass
class Counters:
    """What the buyers of this process saw."""

    views: int = 0
    holds: int = 0
    held_tickets: int = 0
    sold_out: int = 0
    seats_unavailable: int = 0
    customer_limit: int = 0
    bookings: int = 0
    sold_tickets: int = 0
    releases: int = 0
    walkaways: int = 0  # holds left to expire
    confirm_too_late: int = 0  # confirm after the hold expired (410)
    not_on_sale: int = 0
    rate_limited: int = 0  # humans' 429s
    server_errors: int = 0  # 5xx answers, humans' and bots' alike
    humans: int = 0  # human users started
    humans_with_tickets: int = 0  # humans that bought at least once
    bots: int = 0
    bot_attempts: int = 0
    bot_holds: int = 0
    bot_bookings: int = 0
    bot_tickets: int = 0
    bot_rate_limited: int = 0
    bot_sold_out: int = 0
    bot_other_refusals: int = 0  # not_on_sale, customer_limit, hold_expired, ...
    joins: int = 0  # humans' places in the waiting room (their first 201 of a join)
    bot_joins: int = 0  # bots' places in it
    bot_join_attempts: int = 0

    def add(self, other: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + int(other.get(f.name, 0)))

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


COUNTERS = Counters()  # this process's buyers
WORKER_REPORTS: dict[str, dict[str, Any]] = {}  # on the master: worker id -> its counters


def on_counters(environment: Environment, msg: Message, **_: Any) -> None:
    """On the master: a worker's counters (a snapshot of its totals)."""
    WORKER_REPORTS[str(msg.node_id)] = dict(msg.data or {})


def on_report_request(environment: Environment, msg: Message, **_: Any) -> None:
    """On a worker: stop the buyers (so the service settles), then report."""
    runner = environment.runner
    if runner is None:
        return
    if runner.state not in (STATE_STOPPED, STATE_INIT):
        runner.stop()
    runner.send_message(MSG_COUNTERS, asdict(COUNTERS))


def gather_counters(environment: Environment) -> tuple[Counters, str]:
    """The counters of the whole run; in distributed mode, stops the workers' buyers first."""
    runner = environment.runner
    if not isinstance(runner, MasterRunner):
        return COUNTERS, "local"
    expected = {node.id for node in runner.clients.all if node.state != STATE_MISSING}
    WORKER_REPORTS.clear()
    runner.send_message(MSG_REPORT)
    deadline = time.monotonic() + float(environment.stop_timeout or 0) + 20
    while not expected <= WORKER_REPORTS.keys() and time.monotonic() < deadline:
        gevent.sleep(0.2)
    total = Counters()
    for report in WORKER_REPORTS.values():
        total.add(report)
    got = len(expected & WORKER_REPORTS.keys())
    return total, f"{got} of {len(expected)} workers"
