"""The sold-out shortcut: once a category is sold out, a process answers `sold_out` itself.

After a sell-out nearly every hold is refused, and each refusal would cost a script call:
the flood after a drop would hit Redis as hard as the sale did. So a process remembers, per
(event, category), that the event's script answered `sold_out` with none left, and answers
further holds that ask only for such categories with the script's own body.

Every script that may put tickets back on sale publishes on the event's shard channel
(lua/lib.lua, restocked; SPUBLISH, in the event's slot on a cluster: on the node that runs
the event's scripts). A process subscribes to an event's channel when it first hears
`sold_out` for it, on a connection of its own to that node, and forgets the event's flags
on any message there, as soon as its socket is read. Nothing is taken on trust:

- a flag is set only from the reply to a request sent after the subscription was
  confirmed, and with no message for the event since that request was sent: a release
  that ran after the refusing script is either heard before its reply, or clears the flag;
- a subscriber connection lost, an error reply on it, a shard channel unsubscribed by
  Redis (its slot moved) or a PING unanswered for PING_SECONDS: messages may have been
  missed, so every flag is forgotten and every subscription dropped;
- the shortcut answers only where the script would answer `sold_out`: a request without
  seats (those are checked first) and without an Idempotency-Key (a replay owes the first
  answer), for categories all flagged, of no more tickets than a request already refused
  (so within `max_per_order`). An admin change publishes too (`not_on_sale` comes first).

The table is bounded: MAX_EVENTS events, the least recently refused dropped first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from service.core import errors
from service.core.keys import parse_restock_channel, restock_channel
from service.core.schemas import HoldItem
from service.core.settings import Address
from service.hotpath.connection import Connection, command, dial
from service.hotpath.scripts import Scripts, sold_out

log = logging.getLogger("boxoffice.soldout")

# Told the event id of every restock message heard (service/selling/roomstate.py: the event's
# waiting room may admit again, so its state is read anew).
RESTOCK_LISTENERS: list[Callable[[str], None]] = []
# Events a process keeps flags and subscriptions for, at most.
MAX_EVENTS = 1024
# Each subscriber connection is pinged this often; one whose answer has not come by the
# next ping is taken for lost (a peer gone without closing would otherwise keep flags).
PING_SECONDS = 0.2
# After Redis refused a subscription or a subscriber connection: none asked for this long.
RESUBSCRIBE_AFTER_SECONDS = 1.0


class _Event:
    __slots__ = ("address", "cats", "cleared", "most", "since")

    def __init__(self, address: Address) -> None:
        self.address = address  # the node subscribed to
        self.since: int | None = None  # the table's step when subscribed; None: not yet
        self.cleared = 0  # the step of the last message
        self.cats: set[str] = set()  # categories sold out
        self.most = 0  # the most tickets a refused request asked for


class _Link(Connection):
    """A subscriber connection: shard-channel pushes go to the table, as they are read."""

    table: SoldOut | None = None
    address: Address = ("", 0)
    answered = True  # the last PING's answer came

    def data_received(self, data: bytes) -> None:
        if self.waiting:  # the handshake (AUTH)
            super().data_received(data)
            return
        if self.table is None:  # forgotten: closing
            return
        self.reader.feed(data)
        while self.table is not None and (reply := self.reader.gets()) is not False:
            self.table.on_push(self, reply)  # which may forget this link: checked again

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.table is not None:
            self.table.on_lost(self, f"subscriber connection lost: {exc or 'closed'}")

    def send_command(self, *parts: bytes) -> None:
        if self.transport is not None:
            self.transport.write(command(*parts))


class SoldOut:
    """This process's sold-out flags, and the subscriber connections that clear them."""

    def __init__(self) -> None:
        self._events: OrderedDict[str, _Event] = OrderedDict()
        # Counts every change that may make a reply stale: a reply sets flags only if its
        # event saw none since its request was sent (learn).
        self.step = 0
        self._links: dict[Address, _Link] = {}
        self._dialing: dict[Address, asyncio.Task[None]] = {}
        self._scripts: Scripts | None = None
        self._pinger: asyncio.Task[None] | None = None
        self.forgotten = 0  # times every flag was forgotten (for tests and logs)
        # After a failure, no new subscription before this (time.monotonic()): a Redis that
        # refuses them is not asked again at every refusal.
        self._resume_at = 0.0

    # --- the hold path: no await ------------------------------------------------------

    def refusal(
        self, event_id: str, items: Iterable[HoldItem], count: int
    ) -> errors.BoxofficeError | None:
        """The script's `sold_out` answer, when it is known without asking; else None."""
        event = self._events.get(event_id)
        if event is None or not event.cats or count > event.most:
            return None
        available = {}
        for item in items:
            if item.category not in event.cats:
                return None
            available[item.category] = 0
        return sold_out(available)

    def learn(self, event_id: str, available: dict[str, int], count: int, since: int) -> None:
        """A fresh `sold_out` reply to a request of `count` tickets sent at step `since`."""
        if self._scripts is None:
            return  # not started (a worker, a test's own Services): never a flag
        event = self._events.get(event_id)
        if event is None:
            if time.monotonic() >= self._resume_at:
                self._subscribe(event_id)
            return
        self._events.move_to_end(event_id)
        if event.since is None or event.since > since or event.cleared > since:
            return
        empty = [category for category, left in available.items() if left <= 0]
        if empty:
            event.cats.update(empty)
            event.most = max(event.most, count)

    # --- state, for tests ---------------------------------------------------------------

    def flagged(self, event_id: str) -> set[str]:
        event = self._events.get(event_id)
        return set(event.cats) if event is not None else set()

    def subscribed(self, event_id: str) -> bool:
        event = self._events.get(event_id)
        return event is not None and event.since is not None

    def __len__(self) -> int:
        return len(self._events)

    # --- life ---------------------------------------------------------------------------

    def start(self, scripts: Scripts) -> None:
        """In the API process, once its Scripts are final (Services.start)."""
        self._scripts = scripts
        self._pinger = asyncio.get_running_loop().create_task(self._ping_every())

    async def close(self) -> None:
        self._scripts = None
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
        self.forget(None)

    def forget(self, why: str | None, pause: bool = False) -> None:
        """Every flag and every subscription: messages may have been missed. `pause`: no
        new subscription for a while (Redis refused one)."""
        self.step += 1
        self.forgotten += 1
        if pause:
            self._resume_at = time.monotonic() + RESUBSCRIBE_AFTER_SECONDS
        if why is not None and self._events:
            log.info("sold-out flags forgotten: %s", why)
        self._events.clear()
        links, self._links = self._links, {}
        for link in links.values():
            link.table = None
            if link.transport is not None:
                link.transport.abort()
        dialing, self._dialing = self._dialing, {}
        for task in dialing.values():
            task.cancel()

    # --- subscriptions ------------------------------------------------------------------

    def _subscribe(self, event_id: str) -> None:
        assert self._scripts is not None
        options = self._scripts.node_options(event_id)
        if options is None:
            return
        address: Address = (options.get("host", "127.0.0.1"), int(options.get("port", 6379)))
        self._events[event_id] = _Event(address)
        if len(self._events) > MAX_EVENTS:
            old_id, old = self._events.popitem(last=False)
            link = self._links.get(old.address)
            if link is not None:
                link.send_command(b"SUNSUBSCRIBE", restock_channel(old_id).encode())
        link = self._links.get(address)
        if link is not None:
            link.send_command(b"SSUBSCRIBE", restock_channel(event_id).encode())
        elif address not in self._dialing:
            task = asyncio.get_running_loop().create_task(self._dial(address, options))
            self._dialing[address] = task

    async def _dial(self, address: Address, options: dict[str, Any]) -> None:
        try:
            link = await dial(options, select=False, protocol=_Link)
        except Exception as e:
            if self._dialing.get(address) is asyncio.current_task():
                del self._dialing[address]
                self._drop_waiting(address)
            errors.log_failure(log, "sold-out subscriber cannot connect", e)
            self._resume_at = time.monotonic() + RESUBSCRIBE_AFTER_SECONDS
            return
        assert isinstance(link, _Link)
        if self._dialing.get(address) is not asyncio.current_task():
            if link.transport is not None:  # forgotten meanwhile: this one is not wanted
                link.transport.abort()
            return
        del self._dialing[address]
        if link.transport is None:  # lost at once
            self._drop_waiting(address)
            return
        link.table, link.address = self, address
        self._links[address] = link
        channels = [
            restock_channel(event_id).encode()
            for event_id, event in self._events.items()
            if event.address == address and event.since is None
        ]
        if channels:
            # One command per channel: on a cluster, channels of several slots in one
            # SSUBSCRIBE are refused (CROSSSLOT).
            link.transport.write(b"".join(command(b"SSUBSCRIBE", c) for c in channels))

    def _drop_waiting(self, address: Address) -> None:
        """Events waiting for a connection that could not be made: asked again later."""
        for event_id in [i for i, e in self._events.items() if e.address == address]:
            del self._events[event_id]

    def on_push(self, link: _Link, reply: Any) -> None:
        if isinstance(reply, Exception):
            # A subscription refused (MOVED: the slot table was stale), or worse.
            self.forget(f"subscriber got an error: {reply}", pause=True)
            return
        if reply == b"PONG" or (isinstance(reply, list) and reply and reply[0] == b"pong"):
            link.answered = True
            return
        if not isinstance(reply, list) or len(reply) < 2:
            return
        kind = reply[0]
        event_id = parse_restock_channel(reply[1].decode(errors="replace"))
        if event_id is None:
            return
        event = self._events.get(event_id)
        if event is None or event.address != link.address:
            return  # an event dropped since (its unsubscription follows)
        self.step += 1
        if kind == b"smessage":
            for listener in RESTOCK_LISTENERS:
                listener(event_id)
            event.cleared = self.step
            event.cats.clear()
            event.most = 0
        elif kind == b"ssubscribe":
            event.since = self.step
            event.cats.clear()
            event.most = 0
        elif kind == b"sunsubscribe" and event.since is not None:
            # Not asked for: Redis dropped it (the slot moved to another node).
            self.forget(f"Redis unsubscribed {reply[1]!r}")

    def on_lost(self, link: _Link, why: str) -> None:
        if self._links.get(link.address) is link:
            self.forget(why)

    async def _ping_every(self) -> None:
        while True:
            await asyncio.sleep(PING_SECONDS)
            for link in list(self._links.values()):
                if not link.answered:
                    self.forget(f"no answer to PING from {link.address[0]}:{link.address[1]}")
                    break
                link.answered = False
                link.send_command(b"PING")
