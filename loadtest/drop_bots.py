"""The ticket drop's bots (loadtest/locustfile.py, --bots): scalpers' scripts."""

from __future__ import annotations

import random
import secrets

from locust import FastHttpUser, task
from locust.contrib.fasthttp import ResponseContextManager
from locust.exception import StopUser

from loadtest.drop_buyers import (
    customer_authorization,
    expected,
    json_body,
    own_address,
    problem_code,
    tickets,
    unexpected,
)
from loadtest.drop_counters import COUNTERS
from loadtest.drop_scenario import BOT_PREFIX, GA, SEATED, Scenario


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
                self.headers = own_address(f"198.{18 + random.randrange(2)}")

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
            hold = json_body(response) if response.status_code == 201 else None
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
            booking = json_body(response) if response.status_code == 200 else None
            if booking is None:
                self._refused(response, "bot confirm")
                return
            COUNTERS.bot_bookings += 1
            COUNTERS.bot_tickets += tickets(booking)

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
            ticket = json_body(response) if response.status_code == 201 else None
            if ticket is None:
                self._refused(response, "bot join")
                return None
            COUNTERS.bot_joins += 1
            admitted: str | None = ticket.get("pass")
            return admitted

    def _refused(self, response: ResponseContextManager, what: str) -> None:
        code = problem_code(response)
        if response.status_code == 429 and code == "rate_limited":
            COUNTERS.bot_rate_limited += 1
        elif response.status_code == 409 and code == "sold_out":
            COUNTERS.bot_sold_out += 1
        elif response.status_code in (409, 410) and code:
            COUNTERS.bot_other_refusals += 1
        else:
            unexpected(response)
            return
        expected(response, f"{what} [{code}]")
