"""Loads lua/, calls a script, and turns an error reply into a domain error."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple, cast

import msgspec
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import ConnectionError, NoScriptError, TimeoutError

from service.core import errors, packagedata, retries
from service.core.keys import event_keys
from service.core.settings import Settings
from service.core.timefmt import from_ms
from service.hotpath import ratelimit
from service.hotpath.connection import bulk, bulk_values, command
from service.hotpath.joined import Part
from service.hotpath.nodepipe import NodePipe
from service.hotpath.replicas import Replicas
from service.hotpath.scriptpipe import ScriptPipe

LUA_DIR = packagedata.directory("lua")
# A script's header line naming a shared file to put after lib.lua (lua/holding.lua).
_USES = "-- uses: "
NAMES = (
    "hold",
    "hold_batch",
    "confirm",
    "confirm_batch",
    "release",
    "release_batch",
    "cancel",
    "reclaim",
    "view",
    "hold_read",
    "seats",
    "configure",
    "load",
    "load_seats",
    "load_bookings",
    "repair_expire",
    "repair_claims",
    "repair_seats",
    "repair_read",
    "repair_adjust",
    "check_seats",
    "queue_join",
    "queue_state",
    "queue_leave",
    "queue_view",
    "queue_figures",
    "queue_tick",
    "rate",
    "live",
    "archive",
    "join_outbox",
    "replay_dead_letter",
)

NOT_LOADED = b'{"err":"not_loaded"}'
RETRY = b'{"err":"retry"}'
# The event's seat order list is missing (loaded by an earlier version): build it.
NO_ORDER = b'{"err":"no_order"}'


class Idempotency(NamedTuple):
    key_digest: str
    fingerprint: str
    # With customer tokens on, the token's customer: the key is theirs alone (keys.py).
    customer: str | None = None


class _ErrorReply(msgspec.Struct):
    err: str
    available: dict[str, int] | None = None
    seats: list[str] | None = None
    remaining: int | None = None
    category: str | None = None
    seat: str | None = None
    max_per_order: int | None = None
    committed: int | None = None
    # Times in ms (hold_expired, hold_released, not_on_sale), the event's status, a booking.
    expires_at: int | None = None
    ended_at: int | None = None
    on_sale_at: int | None = None
    opens_at: int | None = None
    status: str | None = None
    booking_id: str | None = None
    retry_after: int | None = None
    # rate_limited by a limit of the script (lua/lib.lua, rate_refusal): which, and its quota.
    policy: str | None = None
    quota: int | None = None
    window: int | None = None


_decode_error = msgspec.json.Decoder(_ErrorReply).decode


def script_text(lib: str, name: str) -> str:
    """The script as Redis is sent it: lib.lua first, then the shared files its header
    names on a line `-- uses: x.lua` (holding.lua), but a shebang (`#!lua flags=...`)
    stays the first line, the only place Redis reads it."""
    text = (LUA_DIR / f"{name}.lua").read_text()
    for line in text.splitlines():
        if not line.startswith("--"):
            break  # the header ends at the first line of code
        if line.startswith(_USES):
            lib += "\n" + (LUA_DIR / line.removeprefix(_USES).strip()).read_text()
    if text.startswith("#!"):
        shebang, _, rest = text.partition("\n")
        return f"{shebang}\n{lib}\n{rest}"
    return lib + "\n" + text


class Scripts:
    """The Lua scripts of one Redis connection pool, each with lua/lib.lua prepended."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        lib = (LUA_DIR / "lib.lua").read_text()
        self._redis = redis
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(script_text(lib, name)) for name in NAMES
        }
        self._common = bulk_values(
            (
                settings.idempotency_ttl_seconds,
                settings.reclaim_batch,
                settings.hold_retention_seconds * 1000,
            )
        )
        self._timeout = settings.redis_timeout_seconds
        self._pipe = ScriptPipe(
            settings.redis_url,
            settings.redis_seed_nodes,
            settings.redis_cluster_retry_seconds,
            timeout=settings.redis_timeout_seconds,
            # A confirm followed by WAIT may take WAIT's own timeout more.
            wait_seconds=settings.confirm_wait_timeout_ms / 1000
            if settings.confirm_wait_replicas
            else 0.0,
        )
        self._idempotency_caps = (
            settings.idempotency_max_keys_per_event,
            settings.idempotency_max_refusals_per_event,
        )
        self.replicas = Replicas(
            settings.confirm_wait_replicas,
            settings.confirm_wait_shortfall,
            lambda slot: self._pipe.execute(command(b"ROLE"), slot),
            self._node_of,
        )
        # WAIT for 0..n replicas (fewer than n: under accept, a primary that has fewer).
        self._waits = [
            command(b"WAIT", b"%d" % n, b"%d" % settings.confirm_wait_timeout_ms)
            for n in range(settings.confirm_wait_replicas + 1)
        ]

    async def load(self) -> None:
        """Load every script up front. A later SCRIPT FLUSH or restart is handled per call:
        redis-py answers NOSCRIPT by loading the script again and retrying."""
        for script in self._scripts.values():
            await self._redis.script_load(script.script)

    async def call_event(
        self,
        name: str,
        event_id: str,
        *args: str | bytes | int,
        extra_keys: tuple[str, ...] = (),
        idempotency: Idempotency | None = None,
        durable: bool = False,
    ) -> bytes:
        """The script's reply. `durable`: acknowledged only once the replicas that
        BOXOFFICE_CONFIRM_WAIT_REPLICAS asks for have the script's writes (WAIT behind it
        on the same connection), else errors.Unavailable; a repeat finds its work done."""
        keys = event_keys(event_id)
        fingerprint = ""
        if idempotency is not None:
            key = keys.idempotency(idempotency.key_digest, idempotency.customer)
            extra_keys = (*extra_keys, keys.idempotency_count, keys.idempotency_refusals, key)
            fingerprint = idempotency.fingerprint
            args = (*args, *self._idempotency_caps)
        event_keys_resp, slot = self._pipe.event_keys(event_id)
        own = (
            bulk_values(extra_keys),
            len(extra_keys),
            bulk(fingerprint.encode()),
            bulk_values(args),
            1 + len(args),
        )
        # Calls of this script and event in the same turn go as one (service/hotpath/joined.py)
        batch = _BATCHES.get(name)
        backoff: retries.Backoff | None = None  # made only once a call has failed
        loads = 0
        while True:
            script = self._scripts[name]
            part = Part(
                (batch or name, event_id),
                self._scripts[batch or name],
                script,
                event_keys_resp,
                self._common,
                own,
            )
            try:
                if durable and self.replicas.wanted:
                    # WAIT counts replicas up to the connection's last write: a repeat
                    # that writes nothing (the booking was made, on this or another
                    # connection) would be counted up to some older write. A write of
                    # nothing (a count the script keeps, plus 0) makes it now.
                    field = _COUNTED.get(name, b"confirmed")
                    touch = command(b"HINCRBY", keys.stats.encode(), field, b"0")
                    return await self._durable(part.single, slot, touch)
                if batch is None:
                    reply: bytes = await self._pipe.execute(part.single, slot)
                    return reply
                reply = await self._pipe.execute_part(part, slot)
                return reply
            except NoScriptError:
                loads += 1
                if loads > _LOADS:
                    raise ConnectionError("Redis kept refusing the script") from None
                # SCRIPT FLUSH, a restart or a promoted replica: load it again on the node
                # that said so (through the pipe: routed as the call was), then call again;
                # its batch script too, which the same flush took.
                for reload in (script, self._scripts[batch]) if batch else (script,):
                    source = cast(str, reload.script).encode()  # registered from text, above
                    sha = await self._pipe.execute(command(b"SCRIPT", b"LOAD", source), slot)
                    reload.sha = sha.decode()
            except TimeoutError as e:
                # Redis did not answer in time: never sent again (service/core/retries.py).
                raise errors.Unavailable(self._silence(name)) from e
            except ConnectionError:
                # On a cluster the pipe has already waited out its budget: not once more.
                # On a single node, a reconnect (service/core/retries.py); every script is safe
                # to repeat.
                if self._pipe.cluster:
                    raise
                backoff = backoff or retries.Backoff(retries.RECONNECT_SECONDS)
                if not await backoff.pause():
                    raise

    async def _durable(self, payload: bytes, slot: int, touch: bytes) -> bytes:
        """The call, acknowledged once the replicas asked for have its writes (WAIT behind a
        write of nothing, on the same connection), else errors.Unavailable."""
        sent: list[tuple[Hashable, int]] = []  # where it went, and WAIT for how many

        def then(node: NodePipe) -> tuple[bytes, ...]:
            where = _node_key(node.options)
            sent.append((where, self.replicas.to_wait_for(where, slot)))
            return (touch, self._waits[sent[-1][1]])

        async def wait_again(n: int) -> int:
            _, acked = await self._pipe.execute(touch, slot, (self._waits[n],))
            return cast(int, acked)

        answer: bytes
        answer, acknowledged = await self._pipe.execute(payload, slot, then)
        # An error reply (or a request to load the event first) is answered as it is: it
        # acknowledges nothing that a lost primary could take back.
        if b'"err":' not in answer:
            where, asked = sent[-1]
            await self.replicas.settle(slot, where, asked, acknowledged, wait_again)
        return answer

    def _silence(self, name: str) -> str:
        """The 503's detail when Redis said nothing: the script may have run (sent, not
        answered), so it says what a retry with the same Idempotency-Key is for, never
        that nothing was changed (a read changes nothing either way)."""
        detail = f"Redis did not answer within {self._timeout:g} s"
        if name in _READS:
            return f"{detail}; try again"
        return (
            f"{detail}; the request may have taken effect: retry it with the same"
            " Idempotency-Key to get its answer"
        )

    async def call_keyed(
        self, name: str, key: str | tuple[str, ...], *args: str | bytes | int
    ) -> bytes:
        """A script of one key, or of several in one slot, and no event (lua/rate.lua),
        through the same pipe, routed by the (first) key's slot."""
        encoded = [k.encode() for k in ((key,) if isinstance(key, str) else key)]
        slot = key_slot(encoded[0])
        tail = bulk(b"%d" % len(encoded), *encoded) + bulk_values(args)
        head = b"*%d\r\n" % (3 + len(encoded) + len(args))
        for _ in range(2):
            script = self._scripts[name]
            try:
                reply: bytes = await self._pipe.execute(
                    head + bulk(b"EVALSHA", script.sha.encode()) + tail, slot
                )
                return reply
            except NoScriptError:
                source = cast(str, script.script).encode()
                sha = await self._pipe.execute(command(b"SCRIPT", b"LOAD", source), slot)
                script.sha = sha.decode()
        raise ConnectionError("Redis kept refusing the script")

    def _node_of(self, slot: int) -> tuple[Any, ...] | None:
        """The server the slot's calls go to now, None until the pipe has found out."""
        options = self._pipe.options_for(slot)
        return None if options is None else _node_key(options)

    def node_options(self, event_id: str) -> dict[str, Any] | None:
        """Connection options of the Redis server that runs the event's scripts now; None
        until the first call has found out whether Redis is a cluster."""
        return self._pipe.options_for(self._pipe.event_keys(event_id)[1])

    def close(self) -> None:
        self._pipe.close()


# NOSCRIPT (the script loaded again each time) more often than this in one call means
# something keeps flushing the scripts.
_LOADS = 3
# Scripts whose calls of one event in one turn go joined, and the batch script that takes them.
_BATCHES = {"hold": "hold_batch", "confirm": "confirm_batch", "release": "release_batch"}
# Scripts that change nothing.
_READS = frozenset({"view", "seats", "check_seats", "queue_figures", "repair_read"})
# The stats field (lua/lib.lua) a durable script counts in.
_COUNTED = {"confirm": b"confirmed", "cancel": b"cancelled"}


def _node_key(options: dict[str, Any]) -> tuple[Any, ...]:
    return (options.get("host"), options.get("port"), options.get("path"))


def raise_for_error(reply: bytes) -> None:
    """Raise the domain error an error reply stands for; return for any other reply."""
    # Records never contain this byte sequence: a quote inside a JSON string is escaped.
    if b'"err":' not in reply:
        return
    e = _decode_error(reply)
    if e.err == "too_many":
        raise errors.ValidationError(f"at most {e.max_per_order} tickets per order")
    if e.err == "seated_capacity":
        raise errors.ValidationError(
            f"category {e.category!r} is seated: its capacity is its seat count"
        )
    cls = errors.BY_CODE[e.err]
    extra: dict[str, Any] = {}
    detail = None
    if e.err == "sold_out":
        raise sold_out(e.available or {})
    if e.err == "seats_unavailable":
        extra["seats"] = e.seats or []
        detail = "seats already taken: " + ", ".join(extra["seats"])
    elif e.err == "customer_limit":
        extra["remaining"] = e.remaining
        tickets = "ticket" if e.remaining == 1 else "tickets"
        detail = f"this customer may hold or buy {e.remaining} more {tickets} of this event"
    elif e.err == "unknown_category":
        detail = f"no category {e.category!r} in this event"
    elif e.err == "unknown_seat":
        detail = f"no seat {e.seat!r} in this event"
    elif e.err == "capacity_below_committed":
        detail = f"category {e.category!r} has {e.committed} tickets held or sold"
    elif e.err == "rate_limited" and e.policy is not None:
        detail = (
            f"at most {e.quota} hold attempts per customer per {e.window} s for this event;"
            f" try again in {e.retry_after} s"
        )
    elif e.err == "rate_limited":
        detail = (
            "this event remembers as many Idempotency-Keys as it may;"
            f" try again in {e.retry_after} s"
        )
    else:
        detail = _detail(e)
    err = cls(detail, **extra)
    if e.policy is not None and e.retry_after is not None:
        err.headers = ratelimit.refusal_headers(
            e.policy, e.quota or 0, e.window or 0, e.retry_after
        )
    elif e.retry_after is not None:
        err.headers = {"retry-after": str(e.retry_after)}
    try:
        raise err
    finally:
        del err  # else a cycle for the collector: this frame, in err's traceback, holds err


def sold_out(available: dict[str, int]) -> errors.BoxofficeError:
    """The `sold_out` refusal, from the script's reply or from service/hotpath/soldout.py's flags
    (the same body either way). Its title says whether some of what was asked is left."""
    short = sorted(available)
    if any(available[category] > 0 for category in short):
        left = ", ".join(f"{category} {available[category]}" for category in short)
        detail = f"fewer tickets left than asked for: {left}"
        return errors.SoldOut(detail, title=errors.NOT_ENOUGH_LEFT, available=available)
    return errors.SoldOut("no tickets left in " + ", ".join(short), available=available)


def _detail(e: _ErrorReply) -> str | None:
    """What the client can do about it, rather than the title again."""
    if e.err == "not_on_sale":
        if e.status == "paused":
            return "sales of this event are paused"
        if e.status == "closed":
            return "sales of this event are closed"
        if e.on_sale_at is not None:
            return f"this event goes on sale at {from_ms(e.on_sale_at)}"
    elif e.err == "hold_expired":
        at = f" at {from_ms(e.expires_at)}" if e.expires_at is not None else ""
        return f"the hold expired{at}; its tickets are back on sale: hold again"
    elif e.err == "hold_released":
        at = f" at {from_ms(e.ended_at)}" if e.ended_at is not None else ""
        return f"the hold was released{at}; its tickets are back on sale: hold again"
    elif e.err == "queue_not_open" and e.opens_at is not None:
        return f"the waiting room opens at {from_ms(e.opens_at)}"
    elif e.err == "hold_confirmed":
        return f"the hold is already booking {e.booking_id}: cancel the booking instead"
    return _DETAILS.get(e.err)


_DETAILS = {
    "hold_not_found": "no hold with this id in this event (an ended hold stays readable "
    "for a day, then is forgotten)",
    "booking_not_found": "no booking with this id in this event",
    "ticket_not_found": "no ticket with this id in this event's waiting room (or it left)",
    "no_waiting_room": "this event has no waiting room: hold tickets directly",
    "idempotency_key_reused": "this Idempotency-Key was used with another request",
}
