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
shop's login would, and sends it with every request (customer_authorization()).

Expected outcomes are counted under their own names and are not failures:
`hold [sold_out]`, `hold [seats_unavailable]`, `hold [customer_limit]`,
`hold [not_on_sale]`, `… [rate_limited]` (429) and `confirm [hold_expired]` (a buyer who
thought longer than the hold lasted). Any 5xx, any connection error and any other
unexpected status is a failure.

In distributed mode the master collects the workers' counters when the test stops (it asks
each worker to stop its buyers and report), so the figures it prints cover every worker;
the verdict itself rests on what the service reports, not on the counters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import gevent
from locust import FastHttpUser, events, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment
from locust.exception import StopUser
from locust.rpc import Message
from locust.runners import STATE_INIT, STATE_MISSING, STATE_STOPPED, MasterRunner, WorkerRunner

log = logging.getLogger("boxoffice.drop")

GA = "GA"  # the general-admission category
SEATED = "SEATED"  # the seated category: rows A, B, ... of seats_per_row seats
CURRENCY = "EUR"
PRICES = {GA: 2500, SEATED: 6500}

# The order mix: (kind, weight).
ORDER_KINDS = (("ga", 50), ("best-available", 25), ("seats", 20), ("mixed", 5))
# Tickets per order, before the max_per_order cap: mostly 1 or 2.
QUANTITIES = (1, 2, 2, 2, 3, 4)
EXPECTED_HOLD_CONFLICTS = frozenset(
    {"sold_out", "seats_unavailable", "customer_limit", "not_on_sale"}
)
BOT_PREFIX = "bot-"  # the customer ids of bots start with it, those of humans never do

MSG_REPORT = "boxoffice:report"  # master -> workers: stop your buyers and report
MSG_COUNTERS = "boxoffice:counters"  # worker -> master: the counters

HTTP_TIMEOUT = 30.0  # seconds, for the admin calls of the master
POLL_SECONDS = 1.0
RECHECKS = 3  # reconcile reports, 1 s apart, that must all find drift to call it drift
RECHECK_SECONDS = 1.0


# --- arguments ----------------------------------------------------------------------------


def _arguments(parser: LocustArgumentParser) -> None:
    """The scenario's options, in `locust -f loadtest/locustfile.py --help` (with the
    startup hook of loadtest/locusthelp.py), each with its environment variable."""

    def option(*flags: str, **kw: Any) -> None:
        default = f"; default: {kw['default']}" if kw.get("default") != "" else ""
        kw["help"] = f"{kw['help']} ({kw['env_var']}{default})"
        parser.add_argument(*flags, **kw)

    option(
        "--event-id",
        type=str,
        default="",
        env_var="DROP_EVENT_ID",
        help="id of the event to create (default: drop-<time>-<random>)",
    )
    option(
        "--ga-stock",
        type=int,
        default=2000,
        env_var="DROP_GA_STOCK",
        help="general-admission tickets (0: no GA category)",
    )
    option(
        "--seat-rows",
        type=int,
        default=20,
        env_var="DROP_SEAT_ROWS",
        help="rows of the seated category (0: no seated category)",
    )
    option(
        "--seats-per-row", type=int, default=25, env_var="DROP_SEATS_PER_ROW", help="seats per row"
    )
    option(
        "--hold-ttl",
        type=int,
        default=15,
        env_var="DROP_HOLD_TTL",
        help="hold time to live in seconds (>= 10)",
    )
    option(
        "--max-per-order",
        type=int,
        default=6,
        env_var="DROP_MAX_PER_ORDER",
        help="tickets per hold",
    )
    option(
        "--max-per-customer",
        type=int,
        default=0,
        env_var="DROP_MAX_PER_CUSTOMER",
        help="tickets per buyer, held plus bought (0: no limit)",
    )
    option(
        "--think-min",
        type=float,
        default=0.5,
        env_var="DROP_THINK_MIN",
        help="shortest think time between steps, seconds",
    )
    option(
        "--think-max",
        type=float,
        default=3.0,
        env_var="DROP_THINK_MAX",
        help="longest think time between steps, seconds",
    )
    option(
        "--confirm-share",
        type=float,
        default=0.60,
        env_var="DROP_CONFIRM_SHARE",
        help="share of holds that are confirmed",
    )
    option(
        "--release-share",
        type=float,
        default=0.15,
        env_var="DROP_RELEASE_SHARE",
        help="share of holds that are released (the rest expire)",
    )
    option(
        "--expire-wait",
        action="store_true",
        default=False,
        env_var="DROP_EXPIRE_WAIT",
        help="at test stop, also wait (bounded) until every hold has ended",
    )
    option(
        "--on-sale-in",
        type=float,
        default=0.0,
        env_var="DROP_ON_SALE_IN",
        help="seconds from the test start to the on-sale moment (0: on sale at once)",
    )
    option(
        "--human-attempts",
        type=int,
        default=0,
        env_var="DROP_HUMAN_ATTEMPTS",
        help="a human leaves after this many refused holds, or once it bought (0: never)",
    )
    option(
        "--bots",
        type=int,
        default=0,
        env_var="DROP_BOTS",
        help="bots among the users: each loops on holds, no think time, many customer ids",
    )
    option(
        "--bot-customers",
        type=int,
        default=1000,
        env_var="DROP_BOT_CUSTOMERS",
        help="customer ids each bot cycles through",
    )
    option(
        "--forwarded-for",
        action="store_true",
        default=False,
        env_var="DROP_FORWARDED_FOR",
        help="each user sends X-Forwarded-For with an address of its own (run the service with"
        " BOXOFFICE_TRUSTED_PROXIES naming this machine)",
    )
    # Set by the master at test start (the event's on-sale moment, epoch seconds), so
    # that it reaches the workers with the other options.
    parser.add_argument(
        "--on-sale-epoch",
        type=float,
        default=0.0,
        include_in_web_ui=False,
        help=argparse.SUPPRESS,
    )
    option(
        "--drain-timeout",
        type=float,
        default=60.0,
        env_var="DROP_DRAIN_TIMEOUT",
        help="at test stop, how long to wait for the write-behind to catch up, seconds",
    )
    option(
        "--waiting-room-apm",
        type=int,
        default=0,
        env_var="DROP_WAITING_ROOM_APM",
        help="give the event a waiting room admitting this many a minute (0: none);"
        " run the QueuedBuyer class then, named last on the command line",
    )
    option(
        "--queue-patience",
        type=float,
        default=120.0,
        env_var="DROP_QUEUE_PATIENCE",
        help="seconds a queued buyer waits for admission before it leaves the queue",
    )


@dataclass(frozen=True)
class Scenario:
    """The event's shape and the buyers' behaviour, from the parsed options."""

    event_id: str
    ga_stock: int
    seat_rows: int
    seats_per_row: int
    hold_ttl: int
    max_per_order: int
    max_per_customer: int
    think_min: float
    think_max: float
    confirm_share: float
    release_share: float
    expire_wait: bool
    drain_timeout: float
    waiting_room_apm: int = 0
    queue_patience: float = 120.0
    on_sale_in: float = 0.0
    human_attempts: int = 0
    bots: int = 0
    bot_customers: int = 1000
    forwarded_for: bool = False
    on_sale_epoch: float = 0.0

    @classmethod
    def from_options(cls, options: argparse.Namespace) -> Scenario:
        return cls(
            event_id=str(options.event_id),
            ga_stock=int(options.ga_stock),
            seat_rows=int(options.seat_rows),
            seats_per_row=int(options.seats_per_row),
            hold_ttl=int(options.hold_ttl),
            max_per_order=int(options.max_per_order),
            max_per_customer=int(options.max_per_customer),
            think_min=float(options.think_min),
            think_max=float(options.think_max),
            confirm_share=float(options.confirm_share),
            release_share=float(options.release_share),
            expire_wait=bool(options.expire_wait),
            drain_timeout=float(options.drain_timeout),
            waiting_room_apm=int(getattr(options, "waiting_room_apm", 0)),
            queue_patience=float(getattr(options, "queue_patience", 120.0)),
            on_sale_in=float(options.on_sale_in),
            human_attempts=int(options.human_attempts),
            bots=int(options.bots),
            bot_customers=int(options.bot_customers),
            forwarded_for=bool(options.forwarded_for),
            on_sale_epoch=float(options.on_sale_epoch),
        )

    def problems(self) -> list[str]:
        found = []
        if self.ga_stock < 0 or self.seat_rows < 0 or self.seats_per_row < 1:
            found.append("--ga-stock and --seat-rows must be >= 0, --seats-per-row >= 1")
        if self.ga_stock == 0 and self.seat_rows == 0:
            found.append("nothing to sell: --ga-stock and --seat-rows are both 0")
        if self.seat_rows > 26 * 27:
            found.append("at most 702 rows (A ... ZZ)")
        if self.hold_ttl < 10:
            found.append("--hold-ttl must be at least 10 seconds (the API minimum)")
        if not 1 <= self.max_per_order <= 100:
            found.append("--max-per-order must be 1-100")
        if self.max_per_customer < 0:
            found.append("--max-per-customer must be >= 0 (0: no limit)")
        if not 0 <= self.think_min <= self.think_max:
            found.append("need 0 <= --think-min <= --think-max")
        if self.on_sale_in < 0 or self.human_attempts < 0 or self.bots < 0:
            found.append("--on-sale-in, --human-attempts and --bots must be >= 0")
        if self.bot_customers < 1:
            found.append("--bot-customers must be >= 1")
        if min(self.confirm_share, self.release_share) < 0 or (
            self.confirm_share + self.release_share > 1
        ):
            found.append("--confirm-share and --release-share: >= 0 and at most 1 together")
        if not 0 <= self.waiting_room_apm <= 1_000_000:
            found.append("--waiting-room-apm must be 0-1000000")
        return found

    @property
    def rows(self) -> list[str]:
        return [row_name(i) for i in range(self.seat_rows)]

    @property
    def capacities(self) -> dict[str, int]:
        caps = {}
        if self.ga_stock:
            caps[GA] = self.ga_stock
        if self.seat_rows:
            caps[SEATED] = self.seat_rows * self.seats_per_row
        return caps

    def think(self) -> float:
        return random.uniform(self.think_min, self.think_max)

    def event_body(self) -> dict[str, Any]:
        starts = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
        categories: list[dict[str, Any]] = []
        if self.ga_stock:
            categories.append(
                {"name": GA, "price": PRICES[GA], "currency": CURRENCY, "capacity": self.ga_stock}
            )
        if self.seat_rows:
            categories.append(
                {
                    "name": SEATED,
                    "price": PRICES[SEATED],
                    "currency": CURRENCY,
                    "seat_blocks": [{"rows": self.rows, "seats_per_row": self.seats_per_row}],
                }
            )
        on_sale = None
        if self.on_sale_epoch:
            on_sale = datetime.fromtimestamp(self.on_sale_epoch, UTC).isoformat()
        return {
            "id": self.event_id,
            "name": f"Locust ticket drop {self.event_id}",
            "starts_at": starts,
            "on_sale_at": on_sale,
            "hold_ttl_seconds": self.hold_ttl,
            "max_per_order": self.max_per_order,
            "max_per_customer": self.max_per_customer or None,
            "categories": categories,
            **(
                {"waiting_room": {"admit_per_minute": self.waiting_room_apm}}
                if self.waiting_room_apm
                else {}
            ),
        }


def row_name(index: int) -> str:
    """A, B, ..., Z, AA, AB, ..., ZZ."""
    letters = string.ascii_uppercase
    if index < 26:
        return letters[index]
    return letters[index // 26 - 1] + letters[index % 26]


def new_event_id() -> str:
    return f"drop-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


# --- counters -----------------------------------------------------------------------------


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


class RunState:
    """On the master/local runner: the event this run created."""

    requested_id: str = ""  # --event-id as given; empty: a new id for every run
    event_id: str = ""
    scenario: Scenario | None = None


# --- the service, for the master's setup and checks ---------------------------------------


class ServiceError(Exception):
    pass


class Api:
    """Plain blocking HTTP (cooperative under gevent) for the setup and the final checks."""

    def __init__(self, base_url: str, token: str) -> None:
        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise ServiceError(f"--host must be an http(s) URL, not {base_url!r}")
        self.base = base_url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)  # noqa: S310
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token and path.startswith("/admin/"):
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:  # noqa: S310
                status, raw = int(response.status), response.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except OSError as e:
            raise ServiceError(f"{method} {path}: {e}") from e
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        if status != 200:
            raise ServiceError(f"GET {path}: {status} {body}")
        return body

    def reconcile(self, event_id: str) -> dict[str, Any]:
        report: dict[str, Any] = self.get(f"/admin/events/{event_id}/reconcile")
        return report

    def bookings(self, event_id: str) -> list[dict[str, Any]]:
        """Every confirmed booking PostgreSQL has, page by page."""
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = {"status": "confirmed", "limit": "1000"}
            if cursor:
                query["cursor"] = cursor
            page = self.get(f"/admin/events/{event_id}/bookings?{urllib.parse.urlencode(query)}")
            found.extend(page["bookings"])
            cursor = page.get("next_cursor")
            if not cursor:
                return found


def _api(environment: Environment) -> Api:
    token = os.environ.get("BOXOFFICE_ADMIN_TOKEN", "")
    return Api(environment.host or "http://127.0.0.1:8000", token)


def _is_controller(environment: Environment) -> bool:
    """The master, or the single process of a local run: not a worker."""
    return not isinstance(environment.runner, WorkerRunner)


# --- test start: create the event ---------------------------------------------------------


def _abort(environment: Environment, why: str) -> None:
    log.error("ticket drop: %s", why)
    print(f"\nTICKET DROP ABORTED: {why}\n", flush=True)
    environment.process_exit_code = 1
    if environment.runner is not None:
        gevent.spawn(environment.runner.quit)


def _on_test_start(environment: Environment, **_: Any) -> None:
    COUNTERS.reset()
    if not _is_controller(environment):
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
        status, body = _api(environment).call("POST", "/admin/events", scenario.event_body())
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


# --- the buyer ----------------------------------------------------------------------------


def _problem_code(response: ResponseContextManager) -> str:
    try:
        body = json.loads(response.content or b"{}")
    except ValueError:
        return ""
    return str(body.get("code", "")) if isinstance(body, dict) else ""


def _json(response: ResponseContextManager) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content or b"")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _fail(response: ResponseContextManager, why: str) -> None:
    untyped: Any = response  # locust leaves failure() and success() unannotated
    untyped.failure(why)


def _unexpected(response: ResponseContextManager) -> None:
    if response.status_code >= 500:
        COUNTERS.server_errors += 1
    if response.status_code:
        text = (response.text or "")[:200]
    else:  # no response at all: the connection failed
        text = repr(getattr(response, "error", None))
    _fail(response, f"unexpected {response.status_code}: {text}")


def _expected(response: ResponseContextManager, name: str) -> None:
    """An expected refusal: counted under its own name, not as a failure."""
    response.request_meta["name"] = name
    untyped: Any = response
    untyped.success()


def _tickets(doc: dict[str, Any]) -> int:
    """Tickets of a hold or booking: general-admission quantities plus every seat."""
    ga = sum(int(i["quantity"]) for i in doc.get("items", []) if i.get("category") == GA)
    return ga + len(doc.get("seats", []))


def _own_address(first_octets: str) -> dict[str, str]:
    """X-Forwarded-For with an address of the user's own, as a proxy in front would add."""
    return {"x-forwarded-for": f"{first_octets}.{random.randrange(256)}.{random.randrange(1, 255)}"}


def _wait_for_opening(scenario: Scenario) -> None:
    """Sleep until the event goes on sale (humans do not hammer a page that is not open)."""
    left = scenario.on_sale_epoch - time.time()
    if left > 0:
        time.sleep(left)


class Buyer(FastHttpUser):
    """One member of the crowd: look, hold, then confirm, release or walk away."""

    weight = 1
    scenario: Scenario
    customer_id: str
    idle: bool = False
    headers: dict[str, str] | None = None
    refusals: int = 0
    bought: bool = False

    def wait_time(self) -> float:
        return 0.0 if self.idle else self.scenario.think()

    def on_start(self) -> None:
        options = self.environment.parsed_options
        # No event id: it could not be created, and the run is being aborted.
        self.idle = options is None or not options.event_id
        if not self.idle:
            self.scenario = Scenario.from_options(options)
            self.customer_id = f"buyer-{secrets.token_hex(8)}"
            # FastHttpSession sends its auth_header with every request (None: none).
            self.client.auth_header = customer_authorization(self.customer_id)
            COUNTERS.humans += 1
            if self.scenario.forwarded_for:
                self.headers = _own_address(f"10.{random.randrange(256)}")

    @task
    def drop(self) -> None:
        if self.idle:
            raise StopUser()  # (raised here, not in on_start, which logs it as an error)
        s = self.scenario
        if s.human_attempts and (self.bought or self.refusals >= s.human_attempts):
            self.idle = True  # done: bought, or gave up
            raise StopUser()
        event_path = f"/events/{s.event_id}"
        if not self.view(event_path):
            return
        _wait_for_opening(s)
        time.sleep(s.think())
        hold = self.hold(event_path)
        if hold is None:
            self.refusals += 1
            return
        time.sleep(s.think())
        choice = random.random()
        if choice < s.confirm_share:
            self.confirm(event_path, hold)
        elif choice < s.confirm_share + s.release_share:
            self.release(event_path, hold)
        else:
            COUNTERS.walkaways += 1

    def view(self, event_path: str) -> bool:
        with self.client.get(
            event_path, name="event", headers=self.headers, catch_response=True
        ) as response:
            if response.status_code == 200:
                COUNTERS.views += 1
                return True
            if response.status_code == 429 and _problem_code(response) == "rate_limited":
                COUNTERS.rate_limited += 1
                _expected(response, "event [rate_limited]")
            else:
                _unexpected(response)
            return False

    def order(self) -> tuple[str, dict[str, Any]]:
        """A hold request: general admission, best-available, named seats, or a mix."""
        s = self.scenario
        kinds = [(k, w) for k, w in ORDER_KINDS if self._possible(k)]
        kind = random.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        qty = min(random.choice(QUANTITIES), s.max_per_order)
        body: dict[str, Any] = {"customer_id": self.customer_id}
        if kind == "ga":
            body["items"] = [{"category": GA, "quantity": qty}]
        elif kind == "best-available":
            body["items"] = [{"category": SEATED, "quantity": qty}]
        elif kind == "seats":
            n = min(qty, s.seats_per_row)
            row = random.choice(s.rows)
            first = random.randint(1, s.seats_per_row - n + 1)
            body["seats"] = [f"{row}-{first + i}" for i in range(n)]
        else:  # mixed: GA and best-available seats, all or nothing
            seats = random.randint(1, max(1, s.max_per_order // 2))
            ga = max(1, min(qty, s.max_per_order - seats))
            body["items"] = [
                {"category": GA, "quantity": ga},
                {"category": SEATED, "quantity": seats},
            ]
        return kind, body

    def _possible(self, kind: str) -> bool:
        s = self.scenario
        if kind == "ga":
            return s.ga_stock > 0
        if kind == "mixed":
            return s.ga_stock > 0 and s.seat_rows > 0 and s.max_per_order >= 2
        return s.seat_rows > 0

    def hold(self, event_path: str, headers: dict[str, str] | None = None) -> dict[str, Any] | None:
        kind, body = self.order()
        with self.client.post(
            f"{event_path}/holds",
            json=body,
            name=f"hold {kind}",
            headers={**(self.headers or {}), **(headers or {})} or None,
            catch_response=True,
        ) as response:
            if response.status_code == 201:
                hold = _json(response)
                if hold is None or "hold_id" not in hold:
                    _fail(response, "201 without a hold")
                    return None
                COUNTERS.holds += 1
                COUNTERS.held_tickets += _tickets(hold)
                return hold
            code = _problem_code(response)
            if response.status_code == 409 and code in EXPECTED_HOLD_CONFLICTS:
                setattr(COUNTERS, code, getattr(COUNTERS, code) + 1)
                _expected(response, f"hold [{code}]")
            elif response.status_code == 429 and code == "rate_limited":
                COUNTERS.rate_limited += 1
                _expected(response, "hold [rate_limited]")
            else:
                _unexpected(response)
            return None

    def confirm(self, event_path: str, hold: dict[str, Any]) -> None:
        body = {"payment_ref": f"pi_{secrets.token_hex(8)}"}
        with self.client.post(
            f"{event_path}/holds/{hold['hold_id']}/confirm",
            json=body,
            name="confirm",
            headers=self.headers,
            catch_response=True,
        ) as response:
            if response.status_code == 200:
                booking = _json(response)
                if booking is None or booking.get("status") != "confirmed":
                    _fail(response, "200 without a confirmed booking")
                    return
                COUNTERS.bookings += 1
                COUNTERS.sold_tickets += _tickets(booking)
                if not self.bought:
                    COUNTERS.humans_with_tickets += 1
                self.bought = True
            elif response.status_code == 429 and _problem_code(response) == "rate_limited":
                COUNTERS.rate_limited += 1
                _expected(response, "confirm [rate_limited]")
            elif response.status_code == 410 and _problem_code(response) == "hold_expired":
                COUNTERS.confirm_too_late += 1
                _expected(response, "confirm [hold_expired]")
            else:
                _unexpected(response)

    def release(self, event_path: str, hold: dict[str, Any]) -> None:
        with self.client.delete(
            f"{event_path}/holds/{hold['hold_id']}",
            name="release",
            headers=self.headers,
            catch_response=True,
        ) as response:
            if response.status_code == 204:
                COUNTERS.releases += 1
            else:
                _unexpected(response)


class QueuedBuyer(Buyer):
    """A buyer of an event with a waiting room (--waiting-room-apm): joins the queue,
    polls when the ticket says (`poll_after_seconds`), holds with the pass once admitted,
    then confirms, releases or walks away like any buyer. A sold-out queue is waited out
    (tickets may come back), up to --queue-patience; then the buyer leaves the queue.
    Without a room it is a plain Buyer."""

    joined = False  # has a place in the room (joining again returns the same one)

    @task
    def drop(self) -> None:
        if self.idle:
            raise StopUser()
        if not self.scenario.waiting_room_apm:
            super().drop()
            return
        event_path = f"/events/{self.scenario.event_id}"
        token = self.admission(event_path)
        if token is None:
            return
        hold = self.hold(event_path, headers={"Boxoffice-Pass": token})
        if hold is None:
            return
        time.sleep(self.scenario.think())
        choice = random.random()
        if choice < self.scenario.confirm_share:
            self.confirm(event_path, hold)
        elif choice < self.scenario.confirm_share + self.scenario.release_share:
            self.release(event_path, hold)
        else:
            COUNTERS.walkaways += 1

    def queue_call(
        self, method: str, path: str, name: str, ok: int, body: Any = None
    ) -> dict[str, Any] | None:
        # From the buyer's own address (--forwarded-for), as its other requests.
        with self.client.request(
            method, path, json=body, name=name, headers=self.headers, catch_response=True
        ) as response:
            if response.status_code != ok:
                _unexpected(response)
                return None
            return _json(response) if ok != 204 else {}

    def admission(self, event_path: str) -> str | None:
        """Join and wait for admission; the pass, or None (no patience left, or closed)."""
        queue = f"{event_path}/queue"
        ticket = self.queue_call(
            "POST", queue, "queue join", 201, {"customer_id": self.customer_id}
        )
        if ticket is not None and not self.joined:  # joining again: the same place
            self.joined = True
            COUNTERS.joins += 1
        deadline = time.monotonic() + self.scenario.queue_patience
        while ticket is not None and ticket.get("status") in ("waiting", "sold_out"):
            if time.monotonic() > deadline:
                self.queue_call("DELETE", f"{queue}/{ticket['ticket']}", "queue leave", 204)
                return None
            time.sleep(float(ticket["poll_after_seconds"]))
            ticket = self.queue_call("GET", f"{queue}/{ticket['ticket']}", "queue poll", 200)
        if ticket is None or ticket.get("status") != "admitted":
            return None
        token: str = ticket["pass"]
        return token


# Locust adds the tasks of base classes to a subclass's: Buyer's drop would run too.
QueuedBuyer.tasks = [QueuedBuyer.drop]


class Bot(FastHttpUser):
    """A scalper's script: holds as many tickets as an order allows, again and again, with
    no think time and a new customer id each time (from a pool of its own), from one
    address; pays at once for whatever it holds. It does not wait for the opening, nor
    for a Retry-After."""

    fixed_count = 0  # from --bots, at init (_on_init); without bots the class is dropped
    scenario: Scenario
    idle: bool = False
    headers: dict[str, str] | None = None

    def wait_time(self) -> float:
        return 0.0

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.idle = options is None or not options.event_id
        if not self.idle:
            self.scenario = Scenario.from_options(options)
            self.tag = secrets.token_hex(3)
            COUNTERS.bots += 1
            if self.scenario.forwarded_for:
                self.headers = _own_address(f"198.{18 + random.randrange(2)}")

    @task
    def grab(self) -> None:
        if self.idle:
            raise StopUser()
        s = self.scenario
        customer = f"{BOT_PREFIX}{self.tag}-{random.randrange(s.bot_customers)}"
        # With customer tokens on, a bot has one per customer id (accounts it opened).
        self.client.auth_header = customer_authorization(customer)
        category = GA if s.ga_stock else SEATED
        body = {
            "customer_id": customer,
            "items": [{"category": category, "quantity": s.max_per_order}],
        }
        event_path = f"/events/{s.event_id}"
        headers = self.headers
        if s.waiting_room_apm:
            # A place in the room for each made-up customer: a pass when it is admitted at
            # once, else the place only (it pushes humans back all the same).
            admitted = self._join(event_path, customer)
            if admitted is None:
                return
            headers = {**(self.headers or {}), "Boxoffice-Pass": admitted}
        COUNTERS.bot_attempts += 1
        with self.client.post(
            f"{event_path}/holds",
            json=body,
            name="bot hold",
            headers=headers,
            catch_response=True,
        ) as response:
            hold = _json(response) if response.status_code == 201 else None
            if hold is None:
                self._refused(response, "bot hold")
                return
            COUNTERS.bot_holds += 1
        with self.client.post(
            f"{event_path}/holds/{hold['hold_id']}/confirm",
            json={"payment_ref": f"pi_{secrets.token_hex(8)}"},
            name="bot confirm",
            headers=self.headers,
            catch_response=True,
        ) as response:
            booking = _json(response) if response.status_code == 200 else None
            if booking is None:
                self._refused(response, "bot confirm")
                return
            COUNTERS.bot_bookings += 1
            COUNTERS.bot_tickets += _tickets(booking)

    def _join(self, event_path: str, customer: str) -> str | None:
        """Join the room as `customer`: the pass when admitted at once, else None."""
        COUNTERS.bot_join_attempts += 1
        with self.client.post(
            f"{event_path}/queue",
            json={"customer_id": customer},
            name="bot join",
            headers=self.headers,
            catch_response=True,
        ) as response:
            ticket = _json(response) if response.status_code == 201 else None
            if ticket is None:
                self._refused(response, "bot join")
                return None
            COUNTERS.bot_joins += 1
            admitted: str | None = ticket.get("pass")
            return admitted

    def _refused(self, response: ResponseContextManager, what: str) -> None:
        code = _problem_code(response)
        if response.status_code == 429 and code == "rate_limited":
            COUNTERS.bot_rate_limited += 1
        elif response.status_code == 409 and code == "sold_out":
            COUNTERS.bot_sold_out += 1
        elif response.status_code in (409, 410) and code:
            COUNTERS.bot_other_refusals += 1
        else:
            _unexpected(response)
            return
        _expected(response, f"{what} [{code}]")


# --- customer tokens ----------------------------------------------------------------------

TOKEN_SECONDS = 6 * 3600  # outlasts any run


def customer_authorization(customer_id: str) -> str | None:
    """The `Authorization` value of a customer when BOXOFFICE_CUSTOMER_TOKEN_SECRET is set
    (the service's customer tokens are on), else None."""
    secret = os.environ.get("BOXOFFICE_CUSTOMER_TOKEN_SECRET")
    if not secret:
        return None
    # Here, not at the top: PyJWT imports ssl, which must come after locust's monkey-patching
    # however this file is imported.
    import jwt

    claims = {"sub": customer_id, "exp": int(time.time()) + TOKEN_SECONDS}
    return "Bearer " + jwt.encode(claims, secret, algorithm="HS256")


# --- distributed counters -----------------------------------------------------------------


def _on_init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if _is_controller(environment) and environment.parsed_options is not None:
        RunState.requested_id = str(environment.parsed_options.event_id)
    # Bots only when asked for: a class with fixed_count 0 would be spawned by weight.
    bots = int(getattr(environment.parsed_options, "bots", 0) or 0)
    if bots > 0:
        Bot.fixed_count = bots
    else:
        environment.user_classes = [c for c in environment.user_classes if c is not Bot]
        environment.user_classes_by_name.pop(Bot.__name__, None)
    if isinstance(runner, MasterRunner):
        runner.register_message(MSG_COUNTERS, _on_counters)
    elif isinstance(runner, WorkerRunner):
        runner.register_message(MSG_REPORT, _on_report_request)


def _on_counters(environment: Environment, msg: Message, **_: Any) -> None:
    """On the master: a worker's counters (a snapshot of its totals)."""
    WORKER_REPORTS[str(msg.node_id)] = dict(msg.data or {})


def _on_report_request(environment: Environment, msg: Message, **_: Any) -> None:
    """On a worker: stop the buyers (so the service settles), then report."""
    runner = environment.runner
    if runner is None:
        return
    if runner.state not in (STATE_STOPPED, STATE_INIT):
        runner.stop()
    runner.send_message(MSG_COUNTERS, asdict(COUNTERS))


def _gather_counters(environment: Environment) -> tuple[Counters, str]:
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


# --- test stop: wait, reconcile, verdict --------------------------------------------------


def _on_test_stop(environment: Environment, **_: Any) -> None:
    if not _is_controller(environment) or not RunState.event_id or RunState.scenario is None:
        return
    scenario, event_id = RunState.scenario, RunState.event_id
    RunState.event_id = ""  # check once per run
    counters, source = _gather_counters(environment)
    _print_counters(event_id, counters, source)
    try:
        problems = _check(_api(environment), scenario, counters)
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


def _on_queue_stop(environment: Environment, **_: Any) -> None:
    """The waiting room's own figures, for a run that had one."""
    scenario = RunState.scenario
    if not _is_controller(environment) or scenario is None or not scenario.waiting_room_apm:
        return
    try:
        figures = _api(environment).get(f"/admin/events/{scenario.event_id}/queue")
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
    by_bots = sum(_tickets(b) for b in bookings if b["customer_id"].startswith(BOT_PREFIX))
    sold = sum(_tickets(b) for b in bookings)
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


# --- registration (locust's EventHook.add_listener is unannotated, hence no decorators) ---

_hooks: Any = events
_hooks.init_command_line_parser.add_listener(_arguments)
_hooks.init.add_listener(_on_init)
_hooks.test_start.add_listener(_on_test_start)
_hooks.test_stop.add_listener(_on_test_stop)
_hooks.test_stop.add_listener(_on_queue_stop)
