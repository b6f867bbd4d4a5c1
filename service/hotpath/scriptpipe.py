"""The hot path's own Redis connections: script calls written in batches, replies matched
in order, routed by slot on a Redis Cluster.

Every hold, confirm and release is one EVALSHA. Through a general-purpose client each pays
for a pool checkout, building the command argument by argument, a write, a read and a task
wake-up, and on two cores that costs as much as all of HTTP. Here the calls that arrive in
one turn of the event loop are written to one of a few long-lived connections as one
buffer, the constant head of each command (script, key count, the event's keys, the common
arguments) is encoded once per event, and each reply settles its caller's future straight
from the protocol's data callback: one call's failure is only ever its own.

On a cluster (found once, at the first call: `INFO cluster` of the URL's node) each primary
has such a pipe, and each call goes to the primary of its event's slot, computed once per
event beside the event's encoded keys; redirects, migrations and failovers are followed
within a retry budget. Here: the pipe the scripts call (one node or a cluster, found at
the first call) and the events' encoded keys; service/hotpath/connection.py holds a
connection and RESP, nodepipe.py one server's pipe, clusterpipe.py the slot table and the
cluster's protocol.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from typing import Any

from redis.connection import parse_url
from redis.crc import key_slot
from redis.exceptions import ConnectionError, RedisError, ResponseError, TimeoutError

from service.core import retries
from service.core.keys import event_keys
from service.core.settings import parse_seed_nodes
from service.hotpath.clusterpipe import Cluster
from service.hotpath.connection import REPLY_TIMEOUT, ask_once, bulk
from service.hotpath.joined import Part
from service.hotpath.nodepipe import NodePipe, Then

# Events whose encoded keys and slot are kept: any event id reaches here (an unknown one
# too, before the script says so), so the memory must be bounded. ~1 KiB each.
EVENT_KEYS_CACHED = 8192


class ScriptPipe:
    def __init__(
        self,
        url: str,
        seed_nodes: str = "",
        retry_seconds: float = retries.BUDGET_SECONDS,
        timeout: float = REPLY_TIMEOUT,
        wait_seconds: float = 0.0,
    ) -> None:
        """`timeout`: how long a call waits for its reply; `wait_seconds`: how much longer
        one followed by WAIT may (WAIT's own timeout)."""
        self._options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self._seed_nodes = parse_seed_nodes(seed_nodes)
        self._retry_seconds = retry_seconds
        self._timeout = timeout
        self._timeouts = (timeout, timeout + wait_seconds)
        self._node: NodePipe | None = None
        self._cluster: Cluster | None = None
        self._detecting: asyncio.Future[None] | None = None
        # Ordered, so the oldest goes in O(1): next(iter(dict)) would walk past every slot
        # an eviction emptied since the dict last resized (thousands, with unknown ids).
        self._event_keys: collections.OrderedDict[str, tuple[bytes, int]] = (
            collections.OrderedDict()
        )

    def event_keys(self, event_id: str) -> tuple[bytes, int]:
        """The event's keys in RESP, and their slot: computed once per event."""
        entry = self._event_keys.get(event_id)
        if entry is None:
            keys = event_keys(event_id).all
            entry = (bulk(*keys), key_slot(keys[0]))
            if len(self._event_keys) >= EVENT_KEYS_CACHED:
                self._event_keys.popitem(last=False)  # the oldest
            self._event_keys[event_id] = entry
        return entry

    async def execute(self, payload: bytes, slot: int = 0, then: Then = ()) -> Any:
        """Send one command (already in RESP) with the others of this turn; its reply. The
        slot (from event_keys()) routes it on a cluster. With `then`, more commands go right
        behind it, in the same write to the same connection (WAIT, which counts the
        replicas that have this connection's writes), and the reply is the pair of the
        first and the last replies; a redirected call is resent with its `then`."""
        node = self._node
        if node is None:
            cluster = self._cluster
            if cluster is None:
                await self._detect()
                return await self.execute(payload, slot, then)
            # Inline rather than a method of the cluster: one coroutine less per call.
            # A failover is waited out (recover) within the cluster's retry budget, whether
            # the primary died (its connections refused or reset, then CLUSTERDOWN or MOVED)
            # or hangs: its calls are silent for the timeout, then sent again to whoever
            # the slot table names, until its replica has taken over (the cluster fails a
            # silent node over after cluster-node-timeout). Every script is safe to send
            # again. On a single node there is no replica to wait for: silence is final.
            try:
                return await cluster.table[slot].submit(payload, then)
            except (ResponseError, ConnectionError, TimeoutError) as e:
                return await cluster.recover(payload, slot, e, then)
        return await node.submit(payload, then)

    async def execute_part(self, part: Part, slot: int) -> Any:
        """Send one call that may go joined with the others of its group in this turn
        (service/hotpath/joined.py); its own reply. A redirected call is sent again alone."""
        node = self._node
        if node is None:
            cluster = self._cluster
            if cluster is None:
                await self._detect()
                return await self.execute_part(part, slot)
            try:
                return await cluster.table[slot].submit_part(part)
            except (ResponseError, ConnectionError, TimeoutError) as e:
                return await cluster.recover(part.single, slot, e)
        return await node.submit_part(part)

    def options_for(self, slot: int) -> dict[str, Any] | None:
        """Where the calls of this slot go now (connection options), None until the first
        call has found out whether Redis is a cluster."""
        if self._node is not None:
            return self._options
        if self._cluster is not None and self._cluster.table:
            return self._cluster.table[slot].options
        return None

    @property
    def cluster(self) -> bool | None:
        """Whether Redis is a cluster; None until the first call has found out."""
        return None if self._node is None and self._cluster is None else self._cluster is not None

    async def _detect(self) -> None:
        if self._detecting is None:
            self._detecting = asyncio.ensure_future(self._find_mode())
            self._detecting.add_done_callback(lambda _: setattr(self, "_detecting", None))
        await asyncio.shield(self._detecting)

    async def _find_mode(self) -> None:
        """Single node or cluster, from the first start-up node that answers."""
        errors = []
        silent = True
        for options in self._startup_options():
            try:
                info: bytes = await ask_once(options, b"INFO", b"cluster", wait=self._timeout)
            except (OSError, RedisError) as e:  # TimeoutError is an OSError
                errors.append(repr(e))
                silent = silent and isinstance(e, asyncio.TimeoutError)
                continue
            if b"cluster_enabled:1" not in info:
                timeout, wait_timeout = self._timeouts
                self._node = NodePipe(self._options, timeout=timeout, wait_timeout=wait_timeout)
                return
            startup = [(o.get("host", ""), o.get("port", 6379)) for o in self._startup_options()]
            cluster = Cluster(self._options, startup, self._retry_seconds, self._timeouts)
            await cluster.refresh()
            self._cluster = cluster
            return
        if silent:  # not tried again (a refusal is): each try would wait as long
            raise TimeoutError(f"Redis did not answer within {self._timeout:g} s")
        raise ConnectionError("cannot reach Redis: " + "; ".join(errors))

    def _startup_options(self) -> Iterable[dict[str, Any]]:
        yield self._options
        for host, port in self._seed_nodes:
            yield {**self._options, "host": host, "port": port}

    def close(self) -> None:
        if self._node is not None:
            self._node.close()
        if self._cluster is not None:
            self._cluster.close()
