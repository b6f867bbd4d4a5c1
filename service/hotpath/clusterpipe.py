"""The hot path on a Redis Cluster: a pipe per primary (service/hotpath/nodepipe.py), the
slot table that routes each call to one of them, and the cluster's own protocol followed
when a call comes back refused or unanswered: `MOVED` updates the slot table and resends
there, `ASK` sends `ASKING` and the call in one write to the named node, `TRYAGAIN` and
`CLUSTERDOWN` back off, a lost connection refreshes the slot table (`CLUSTER SLOTS` from
any node that answers). All of this within a retry budget that outlasts a slot migration
or a failover; only then does the call fail."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    RedisError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from service.core import retries
from service.core.settings import Address, parse_address
from service.hotpath.connection import REPLY_TIMEOUT, ask_once, keep
from service.hotpath.nodepipe import NodePipe, Then

# How long and how a call waits out a failover or a migration: service/core/retries.py.
# Redirects followed at once before backing off: more means nodes disagree for now.
REDIRECTS_AT_ONCE = 3
# A node asked for the slot table and silent this long is skipped.
TOPOLOGY_TIMEOUT = 0.5
# Refreshes of the slot table closer together than this add nothing.
REFRESH_INTERVAL = 0.05


class Cluster:
    """One pipe per primary, and the slot table that routes each call to one of them."""

    def __init__(
        self,
        options: dict[str, Any],
        startup: list[Address],
        retry_seconds: float,
        timeouts: tuple[float, float] = (REPLY_TIMEOUT, REPLY_TIMEOUT),
    ) -> None:
        self._options = options
        self._startup = startup
        self._retry_seconds = retry_seconds
        self._timeouts = timeouts  # a call's, and one followed by WAIT
        self._nodes: dict[Address, NodePipe] = {}
        self.table: list[NodePipe] = []
        self._replicas: list[Address] = []
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = float("-inf")
        # Asked first next time: a node that answered is likely to answer again, where a
        # hung one would cost the whole TOPOLOGY_TIMEOUT at every refresh.
        self._answered: list[Address] = []

    async def recover(self, payload: bytes, slot: int, error: RedisError, then: Then = ()) -> Any:
        """Follow redirections and wait out migrations and failovers, within the budget.
        A node silent for the timeout (TimeoutError) is taken for a failing one, as the
        cluster itself does after cluster-node-timeout: see ScriptPipe.execute."""
        backoff = retries.Backoff(self._retry_seconds)
        redirects = 0
        while True:
            ask: NodePipe | None = None
            back_off = True
            if isinstance(error, ConnectionError | TimeoutError):
                with contextlib.suppress(ConnectionError):
                    await self.refresh()
            elif isinstance(error, AskError):  # MovedError is one too
                node = self.node(parse_address(error.message.partition(" ")[2]))
                if isinstance(error, MovedError):
                    self.table[slot] = node
                    self.refresh_soon()  # a failover or a resharding moves more slots
                else:
                    ask = node
                redirects += 1
                back_off = redirects > REDIRECTS_AT_ONCE
            elif not isinstance(error, TryAgainError | ClusterDownError):
                raise error
            if back_off and not await backoff.pause():
                raise error
            try:
                if ask is not None:
                    return await ask.submit_asking(payload, then)
                return await self.table[slot].submit(payload, then)
            except (ResponseError, ConnectionError, TimeoutError) as e:
                error = e

    def node(self, address: Address) -> NodePipe:
        node = self._nodes.get(address)
        if node is None:
            options = {**self._options, "host": address[0], "port": address[1]}
            timeout, wait_timeout = self._timeouts
            node = self._nodes[address] = NodePipe(
                options, select=False, timeout=timeout, wait_timeout=wait_timeout
            )
        return node

    def refresh_soon(self) -> None:
        if self._refreshing is None:
            task = asyncio.ensure_future(self.refresh())
            keep(task)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def refresh(self) -> None:
        """The slot table again, from the first node that answers (one refresh at a time,
        shared by every caller that asks for it meanwhile)."""
        if self._refreshing is None:
            if asyncio.get_running_loop().time() - self._refreshed_at < REFRESH_INTERVAL:
                return
            self._refreshing = asyncio.ensure_future(self._refresh())
            self._refreshing.add_done_callback(self._refreshed)
        await asyncio.shield(self._refreshing)

    def _refreshed(self, _: asyncio.Future[None]) -> None:
        self._refreshing = None
        self._refreshed_at = asyncio.get_running_loop().time()

    async def _refresh(self) -> None:
        routed = set(self.table)
        primaries = [address for address, node in self._nodes.items() if node in routed]
        errors = []
        candidates = [*self._answered, *primaries, *self._startup, *self._replicas]
        for address in dict.fromkeys(candidates):
            options = {**self._options, "host": address[0], "port": address[1]}
            try:
                ranges = await ask_once(options, b"CLUSTER", b"SLOTS", wait=TOPOLOGY_TIMEOUT)
            except (OSError, RedisError) as e:  # TimeoutError is an OSError
                errors.append(f"{address[0]}:{address[1]}: {e!r}")
                continue
            if not ranges:
                errors.append(f"{address[0]}:{address[1]}: no slot assigned")
                continue
            self._apply(ranges, address[0])
            self._answered = [address]
            return
        raise ConnectionError("no node of the Redis Cluster answers: " + "; ".join(errors))

    def _apply(self, ranges: list[list[Any]], asked_host: str) -> None:
        def address(entry: list[Any]) -> Address:
            host = entry[0].decode()  # "" or "?" when the node does not know its own
            return (host if host not in ("", "?") else asked_host, int(entry[1]))

        table = list(self.table) or [self.node(address(ranges[0][2]))] * REDIS_CLUSTER_HASH_SLOTS
        replicas: list[Address] = []
        for first, last, primary, *others in ranges:
            node = self.node(address(primary))
            table[first : last + 1] = [node] * (last - first + 1)
            replicas.extend(address(other) for other in others)
        self.table = table
        self._replicas = replicas

    def close(self) -> None:
        for node in self._nodes.values():
            node.close()
