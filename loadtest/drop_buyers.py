"""The ticket drop's buyers (loadtest/locustfile.py): a Buyer looks, holds, then confirms,
releases or walks away; a QueuedBuyer goes through the waiting room first. The answers'
helpers (expected refusals, failures) serve the bots too (drop_bots.py)."""

from __future__ import annotations

import json
import os
import random
import secrets
import time
from typing import Any

from locust import FastHttpUser, task
from locust.contrib.fasthttp import ResponseContextManager
from locust.exception import StopUser

from loadtest.drop_counters import COUNTERS
from loadtest.drop_scenario import GA, SEATED, Scenario

# The order mix: (kind, weight).
ORDER_KINDS = (("ga", 50), ("best-available", 25), ("seats", 20), ("mixed", 5))
# Tickets per order, before the max_per_order cap: mostly 1 or 2.
QUANTITIES = (1, 2, 2, 2, 3, 4)
EXPECTED_HOLD_CONFLICTS = frozenset(
    {"sold_out", "seats_unavailable", "customer_limit", "not_on_sale"}
)


def problem_code(response: ResponseContextManager) -> str:
    try:
        body = json.loads(response.content or b"{}")
    except ValueError:
        return ""
    return str(body.get("code", "")) if isinstance(body, dict) else ""


def json_body(response: ResponseContextManager) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content or b"")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def fail(response: ResponseContextManager, why: str) -> None:
    untyped: Any = response  # locust leaves failure() and success() unannotated
    untyped.failure(why)


def unexpected(response: ResponseContextManager) -> None:
    if response.status_code >= 500:
        COUNTERS.server_errors += 1
    if response.status_code:
        text = (response.text or "")[:200]
    else:  # no response at all: the connection failed
        text = repr(getattr(response, "error", None))
    fail(response, f"unexpected {response.status_code}: {text}")


def expected(response: ResponseContextManager, name: str) -> None:
    """An expected refusal: counted under its own name, not as a failure."""
    response.request_meta["name"] = name
    untyped: Any = response
    untyped.success()


def tickets(doc: dict[str, Any]) -> int:
    """Tickets of a hold or booking: general-admission quantities plus every seat."""
    ga = sum(int(i["quantity"]) for i in doc.get("items", []) if i.get("category") == GA)
    return ga + len(doc.get("seats", []))


def own_address(first_octets: str) -> dict[str, str]:
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
                self.headers = own_address(f"10.{random.randrange(256)}")

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
            if response.status_code == 429 and problem_code(response) == "rate_limited":
                COUNTERS.rate_limited += 1
                expected(response, "event [rate_limited]")
            else:
                unexpected(response)
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
                hold = json_body(response)
                if hold is None or "hold_id" not in hold:
                    fail(response, "201 without a hold")
                    return None
                COUNTERS.holds += 1
                COUNTERS.held_tickets += tickets(hold)
                return hold
            code = problem_code(response)
            if response.status_code == 409 and code in EXPECTED_HOLD_CONFLICTS:
                setattr(COUNTERS, code, getattr(COUNTERS, code) + 1)
                expected(response, f"hold [{code}]")
            elif response.status_code == 429 and code == "rate_limited":
                COUNTERS.rate_limited += 1
                expected(response, "hold [rate_limited]")
            else:
                unexpected(response)
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
                booking = json_body(response)
                if booking is None or booking.get("status") != "confirmed":
                    fail(response, "200 without a confirmed booking")
                    return
                COUNTERS.bookings += 1
                COUNTERS.sold_tickets += tickets(booking)
                if not self.bought:
                    COUNTERS.humans_with_tickets += 1
                self.bought = True
            elif response.status_code == 429 and problem_code(response) == "rate_limited":
                COUNTERS.rate_limited += 1
                expected(response, "confirm [rate_limited]")
            elif response.status_code == 410 and problem_code(response) == "hold_expired":
                COUNTERS.confirm_too_late += 1
                expected(response, "confirm [hold_expired]")
            else:
                unexpected(response)

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
                unexpected(response)


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
                unexpected(response)
                return None
            return json_body(response) if ok != 204 else {}

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
