"""The ticket drop: a crowd arrives at once for a few thousand tickets.

At test start (once, on the master or the local runner) it creates its own event through
the admin API; every simulated buyer then looks at the event, holds tickets (general
admission, seated best-available or specific seats), and confirms, releases, or walks away
and lets the hold expire. At test stop it waits for the write-behind to catch up, asks the
reconcile endpoint whether Redis and PostgreSQL agree, checks that nothing was oversold,
prints a verdict and makes the run fail (exit code 1) when something is wrong.

    BOXOFFICE_ADMIN_TOKEN=... .venv/bin/locust -f loadtest/locustfile.py --headless \\
        -u 200 -r 50 -t 60s --host http://127.0.0.1:8000
    ... the same with --processes 2       # a master and two worker processes
    ... the same with --master --expect-workers 2, and on each worker machine:
    .venv/bin/locust -f loadtest/locustfile.py --worker --master-host HOST

`loadtest/drop.sh` runs it with defaults. The sizes and the buyers' behaviour are custom
arguments, each with an environment variable (DROP_...) as its default, listed with their
defaults by `.venv/bin/locust -f loadtest/locustfile.py --help` (loadtest/locusthelp.py
is why Locust shows them there).

The waiting-room run: buyers join the queue, poll when told to (`poll_after_seconds`),
and hold with the pass once admitted (a sold-out queue is waited out, within patience):

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 500 -r 100 -t 120s \\
        --host http://127.0.0.1:8000 --waiting-room-apm 600 QueuedBuyer

The drop with bots (`--bots N`): N users are bots, each looping on holds with no think
time, cycling through many customer ids, from one address each (a bot is one machine);
the rest are humans who wait for the opening, think, hold, pay, and leave after a few
refusals. The report at the end says how many humans got tickets, the bots' share of
what was sold against their share of the buyers (users), the 429s and sold_outs, and the
verdict fails the run when bots got a share of the tickets at least their share of the
buyers, or when any answer was a 5xx.

The admin token comes from BOXOFFICE_ADMIN_TOKEN, read by the master only (custom
arguments travel to the workers, and the web UI shows them: a token has no place there).
When the service runs with customer tokens on, give every locust process the same
BOXOFFICE_CUSTOMER_TOKEN_SECRET: each buyer then mints a token for its customer id, as the
shop's login would, and sends it with every request (drop_buyers.customer_authorization()).

Expected outcomes are counted under their own names and are not failures:
`hold [sold_out]`, `hold [seats_unavailable]`, `hold [customer_limit]`,
`hold [not_on_sale]`, `… [rate_limited]` (429) and `confirm [hold_expired]` (a buyer who
thought longer than the hold lasted). Any 5xx, any connection error and any other
unexpected status is a failure.

In distributed mode the master collects the workers' counters when the test stops (it asks
each worker to stop its buyers and report), so the figures it prints cover every worker;
the verdict itself rests on what the service reports, not on the counters.
"""

# The parts, beside this file (imported as loadtest.drop_*): drop_scenario (the options and
# the Scenario), drop_buyers and drop_bots (the users), drop_counters (what they saw, across
# workers), drop_service (the admin API) and drop_checks (the final checks and verdict).
# This file wires them into Locust's events and creates the event at test start.

from __future__ import annotations

import logging
import os
import time
from typing import Any

import gevent
from locust import events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtest.drop_bots import Bot
from loadtest.drop_buyers import Buyer, QueuedBuyer
from loadtest.drop_checks import on_queue_stop, on_test_stop
from loadtest.drop_counters import (
    COUNTERS,
    MSG_COUNTERS,
    MSG_REPORT,
    WORKER_REPORTS,
    on_counters,
    on_report_request,
)
from loadtest.drop_scenario import RunState, Scenario, add_arguments, new_event_id
from loadtest.drop_service import ServiceError, admin_api, is_controller

log = logging.getLogger("boxoffice.drop")

# The users Locust runs, named here for it to find.
__all__ = ["Bot", "Buyer", "QueuedBuyer"]


def _abort(environment: Environment, why: str) -> None:
    log.error("ticket drop: %s", why)
    print(f"\nTICKET DROP ABORTED: {why}\n", flush=True)
    environment.process_exit_code = 1
    if environment.runner is not None:
        gevent.spawn(environment.runner.quit)


def _on_test_start(environment: Environment, **_: Any) -> None:
    COUNTERS.reset()
    if not is_controller(environment):
        return  # a worker: the event id arrived with the spawn message's options
    WORKER_REPORTS.clear()
    RunState.event_id, RunState.scenario = "", None
    options = environment.parsed_options
    if options is None:
        _abort(environment, "no parsed options (run it with the locust command)")
        return
    options.event_id = RunState.requested_id or new_event_id()
    on_sale_in = float(options.on_sale_in)
    options.on_sale_epoch = round(time.time() + on_sale_in, 3) if on_sale_in > 0 else 0.0
    scenario = Scenario.from_options(options)
    if scenario.waiting_room_apm and any(
        cls not in (QueuedBuyer, Bot) for cls in environment.user_classes
    ):
        problems = [
            "--waiting-room-apm: run the QueuedBuyer class (name it last), with Bot for --bots"
        ]
    else:
        problems = scenario.problems()
    if problems:
        options.event_id = ""  # the buyers have nothing to do
        _abort(environment, "; ".join(problems))
        return
    if not os.environ.get("BOXOFFICE_ADMIN_TOKEN"):
        options.event_id = ""
        _abort(environment, "no admin token: set BOXOFFICE_ADMIN_TOKEN")
        return
    try:
        status, body = admin_api(environment).call("POST", "/admin/events", scenario.event_body())
    except ServiceError as e:
        status, body = 0, str(e)
    if status != 201:
        options.event_id = ""
        _abort(environment, f"could not create event {scenario.event_id}: {status} {body}")
        return
    # Workers get the parsed options (this id included) with their spawn message.
    RunState.event_id, RunState.scenario = scenario.event_id, scenario
    caps = ", ".join(f"{name} {n}" for name, n in scenario.capacities.items())
    log.info(
        "ticket drop: event %s created (%s; hold TTL %d s, max %d per order)",
        scenario.event_id,
        caps,
        scenario.hold_ttl,
        scenario.max_per_order,
    )


def _on_init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if is_controller(environment) and environment.parsed_options is not None:
        RunState.requested_id = str(environment.parsed_options.event_id)
    # Bots only when asked for: a class with fixed_count 0 would be spawned by weight.
    bots = int(getattr(environment.parsed_options, "bots", 0) or 0)
    if bots > 0:
        Bot.fixed_count = bots
    else:
        environment.user_classes = [c for c in environment.user_classes if c is not Bot]
        environment.user_classes_by_name.pop(Bot.__name__, None)
    if isinstance(runner, MasterRunner):
        runner.register_message(MSG_COUNTERS, on_counters)
    elif isinstance(runner, WorkerRunner):
        runner.register_message(MSG_REPORT, on_report_request)


# --- registration (locust's EventHook.add_listener is unannotated, hence no decorators) ---

_hooks: Any = events
_hooks.init_command_line_parser.add_listener(add_arguments)
_hooks.init.add_listener(_on_init)
_hooks.test_start.add_listener(_on_test_start)
_hooks.test_stop.add_listener(on_test_stop)
_hooks.test_stop.add_listener(on_queue_stop)
