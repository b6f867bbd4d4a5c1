"""The ticket drop's scenario (loadtest/locustfile.py): its options, each with a DROP_...
environment variable (listed by `locust -f loadtest/locustfile.py --help`), the event's
shape and the buyers' behaviour built from them, and the event this run created."""

from __future__ import annotations

import argparse
import random
import secrets
import string
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from locust.argument_parser import LocustArgumentParser

GA = "GA"  # the general-admission category
SEATED = "SEATED"  # the seated category: rows A, B, ... of seats_per_row seats
CURRENCY = "EUR"
PRICES = {GA: 2500, SEATED: 6500}

BOT_PREFIX = "bot-"  # the customer ids of bots start with it, those of humans never do


def add_arguments(parser: LocustArgumentParser) -> None:
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


class RunState:
    """On the master/local runner: the event this run created."""

    requested_id: str = ""  # --event-id as given; empty: a new id for every run
    event_id: str = ""
    scenario: Scenario | None = None
