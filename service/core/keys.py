"""Every Redis key name, and nowhere else.

All keys of one event share the hash tag ``{ev:<event_id>}``, so each script touches one
slot and the service runs unchanged on Redis Cluster.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

PREFIX = "bo:"
# Events with live state in Redis, for the sweeper and the worker to find.
EVENTS = f"{PREFIX}events"
# Pub/sub channel: every create announces its event id here (service/hotpath/eventids.py).
EVENT_CREATED = f"{PREFIX}events:created"
# One sweeper at a time across all workers.
SWEEPER_LOCK = f"{PREFIX}sweeper:lock"
# The consumer group of the write-behind workers on every outbox stream.
OUTBOX_GROUP = "writers"


def worker_alive(consumer: str) -> str:
    """A write-behind worker's liveness key: it exists, with a short TTL, while it runs."""
    return f"{PREFIX}worker:{consumer}:alive"


# Order matters: the scripts read them as KEYS[1..16] (lua/lib.lua).
EVENT_KEY_NAMES = (
    "meta",
    "cats",
    "cap",
    "avail",
    "held",
    "sold",
    "seatmap",
    "seatstate",
    "free",
    "deadlines",
    "holds",
    "ended",
    "cust",
    "stats",
    "bookings",
    "outbox",
)


class EventKeys:
    __slots__ = (
        "all",
        "archive",
        "deadletter",
        "event_id",
        "idempotency_count",
        "load_keys",
        "idempotency_refusals",
        "queue",
        "seat_order",
        "tag",
        *EVENT_KEY_NAMES,
    )

    def __init__(self, event_id: str) -> None:
        self.event_id = event_id
        self.tag = f"{PREFIX}{{ev:{event_id}}}"
        for name in EVENT_KEY_NAMES:
            setattr(self, name, f"{self.tag}:{name}")
        # Encoded once: every script call passes them all, and redis-py sends bytes as is.
        self.all: tuple[bytes, ...] = tuple(
            f"{self.tag}:{name}".encode() for name in EVENT_KEY_NAMES
        )
        # Outbox entries that failed again and again: kept for an operator, never dropped.
        self.deadletter = f"{self.tag}:deadletter"
        # list: seat labels in seat order (static), so that a page of the seat map is a
        # range, not a walk over the whole map. Only load.lua and seats.lua take it.
        self.seat_order = f"{self.tag}:order"
        # What the loader (lua/load_seats.lua, load_bookings.lua, load.lua) takes after
        # the event keys: the seat order list; the load lease (string: the token of the
        # load in progress, with a TTL); then, built a chunk at a time and put in place at
        # once, the staged seat map, free seats, seat order, seat state, tickets sold per
        # category and per customer, and the ids of the bookings counted (set).
        staged = ("seatmap", "free", "order", "seatstate", "sold", "cust", "counted")
        self.load_keys: tuple[str, ...] = (
            self.seat_order,
            f"{self.tag}:load:lease",
            *(f"{self.tag}:load:{name}" for name in staged),
        )
        # strings: Idempotency-Key records the event's scripts made in the current window,
        # of answers that changed state (lua/lib.lua, finish) and of answers that changed
        # nothing (unchanged), each bounded on its own.
        self.idempotency_count = f"{self.tag}:idemcount"
        self.idempotency_refusals = f"{self.tag}:idemrefusals"
        # The waiting room (lua/lib.lua, queue_keys): what the queue scripts take after the
        # event keys: the leave log (zset), the pre-queue's ladder (string), the order
        # (zset), the admission state (hash) and the frontier's corners (list). Cleared
        # with the room.
        self.queue: tuple[str, ...] = tuple(
            f"{self.tag}:q:{name}" for name in ("left", "ladder", "order", "state", "hist")
        )
        # What lua/archive.lua takes after the event keys: every other key of the event's
        # live state, so that an archived event leaves nothing behind but the records
        # that expire by themselves (Idempotency-Keys, customers' rate limits, hold TTLs).
        self.archive: tuple[str, ...] = (*self.load_keys, *self.queue, self.deadletter)

    meta: str
    cats: str
    cap: str
    avail: str
    held: str
    sold: str
    seatmap: str
    seatstate: str
    free: str
    deadlines: str
    holds: str
    ended: str
    cust: str
    stats: str
    bookings: str
    outbox: str

    def hold_ttl(self, hold_id: str) -> str:
        """The key whose expiry tells the keyspace listener that a hold ran out."""
        return f"{self.tag}:ttl:{hold_id}"

    def idempotency(self, key_digest: str, customer: str | None = None) -> str:
        """An Idempotency-Key's record. With customer tokens on, `customer` (the token's)
        scopes it: the same key sent by two customers names two records, so that no
        customer is ever answered from another's. Without, the key alone, as it always was."""
        if customer is None:
            return f"{self.tag}:idem:{key_digest}"
        # Hashed: a customer id is any text, and `:` in it must not forge another's name.
        scope = hashlib.sha256(customer.encode()).hexdigest()[:32]
        return f"{self.tag}:idem:c:{scope}:{key_digest}"

    def customer_rate(self, customer_id: str) -> str:
        """string: the customer's hold-attempt rate limit in this event (lua/lib.lua,
        rate_take), with a TTL: gone once the customer's quota is whole again."""
        return f"{self.tag}:rl:{customer_id}"


@lru_cache(maxsize=4096)
def event_keys(event_id: str) -> EventKeys:
    return EventKeys(event_id)


# The shard channel on which an event's scripts say that tickets may be on sale again
# (lua/lib.lua, restocked, builds the same name from the event's `meta` key).
RESTOCK_SUFFIX = ":restock"


def restock_channel(event_id: str) -> str:
    return f"{event_keys(event_id).tag}{RESTOCK_SUFFIX}"


def parse_restock_channel(channel: str) -> str | None:
    """The event id of a restock channel name, or None for any other name."""
    head = f"{PREFIX}{{ev:"
    if not (channel.startswith(head) and channel.endswith("}" + RESTOCK_SUFFIX)):
        return None
    return channel[len(head) : -len(RESTOCK_SUFFIX) - 1]


def address_rate(policy: str, address: str) -> str:
    """string: a client address's count under a per-address limit ("address", "joins",
    "tickets" or "admin"; lua/rate.lua), with a TTL. Apart from any event; the limits of
    one address share a slot (its hash tag), so that one script call counts them all."""
    return f"{PREFIX}rl:{{{address}}}:{policy}"


def global_idempotency(key_digest: str) -> str:
    """Idempotency records of requests that belong to no live event (creating one)."""
    return f"{PREFIX}idem:{key_digest}"


def parse_hold_ttl(key: str) -> tuple[str, str] | None:
    """(event_id, hold_id) from a hold TTL key name, or None for any other key."""
    if not key.startswith(f"{PREFIX}{{ev:"):
        return None
    tag_end = key.find("}:ttl:")
    if tag_end < 0:
        return None
    return key[len(PREFIX) + 4 : tag_end], key[tag_end + 6 :]
