"""What a confirmation, refund or cancellation does on a primary with fewer replicas than
BOXOFFICE_CONFIRM_WAIT_REPLICAS asks for (BOXOFFICE_CONFIRM_WAIT_SHORTFALL).

After a failover the promoted replica has no replica of its own until one follows it (see
README, "Scaling out": two replicas per primary heal this by themselves). `refuse` (the
default) keeps asking WAIT for all of them, so every such write answers 503 until then:
the write is made, and the retry with the same Idempotency-Key gets its answer. `accept`
acknowledges it once every replica the primary has now has it, counts it in
`boxoffice_confirm_replica_shortfall_total`, and /ready warns.

Under `accept` each primary's replicas (those ROLE lists as online) are counted after its
first durable write, and again in the background once the count is older than
RECOUNT_SECONDS; a WAIT that gets fewer acknowledgements than the count promised counts
again at once. WAIT never asks for more replicas than a primary is known to have (WAIT
blocks its connection, and the calls queued behind it, until its timeout when they are
not there), and the count is chosen for the node the write is sent to as it is sent: a
write redirected by a failover to the promoted replica waits for none rather than for the
replica the dead primary had. A write to a node not counted yet waits for none, then the
node is counted and, if it has replicas, a WAIT for them follows (behind a write of
nothing, on the same node: whatever has that write has this one).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, Literal

from redis.exceptions import RedisError

from service.core import errors

if TYPE_CHECKING:
    from prometheus_client import Counter

Shortfall = Literal["refuse", "accept"]


@functools.cache
def shortfall_counter() -> Counter:
    """boxoffice_confirm_replica_shortfall_total. Made on first use, not on import: `serve`
    imports this module before it sets the metrics directory, and a metric made before
    that would keep its counts to the process (service/server.py)."""
    from prometheus_client import Counter

    return Counter(
        "boxoffice_confirm_replica_shortfall",
        "Confirmations, refunds and cancellations acknowledged with fewer Redis replicas"
        " than BOXOFFICE_CONFIRM_WAIT_REPLICAS asks for (BOXOFFICE_CONFIRM_WAIT_SHORTFALL"
        "=accept)",
    )


# How old a primary's count of replicas may be before it is taken again (in the
# background: the write goes on with the old count meanwhile).
RECOUNT_SECONDS = 1.0


def online_replicas(role: Any) -> int:
    """The replicas a ROLE reply lists as in sync; 0 for a node that is not a primary."""
    if not role or role[0] not in (b"master", "master"):
        return 0
    return len(role[2])


def warning(node: str, replicas: int, wanted: int, shortfall: Shortfall) -> str:
    """/ready's word on a primary with fewer replicas than asked (`node`: " host:port" on
    a cluster, empty for the one node)."""
    then = (
        f"its confirmations are acknowledged with {replicas} (BOXOFFICE_CONFIRM_WAIT_SHORTFALL"
        "=accept), and would be lost with it"
        if shortfall == "accept"
        else "its confirmations answer 503 until a replica is back"
        " (BOXOFFICE_CONFIRM_WAIT_SHORTFALL=refuse)"
    )
    return (
        f"Redis primary{node} has {replicas} replica(s) in sync, fewer than the {wanted}"
        f" BOXOFFICE_CONFIRM_WAIT_REPLICAS asks for: {then}"
    )


class Replicas:
    """How many replicas each durable write waits for, and whether what WAIT said will do.
    `role(slot)`: the ROLE reply of the slot's primary; `node(slot)`: which node that is
    now (None until the first call has found out)."""

    def __init__(
        self,
        wanted: int,
        shortfall: Shortfall,
        role: Callable[[int], Awaitable[Any]],
        node: Callable[[int], Hashable | None],
    ) -> None:
        self.wanted = wanted
        self._accept = shortfall == "accept"
        self._role = role
        self._node = node
        self._counted: dict[Hashable, tuple[int, float]] = {}  # node -> (replicas, when)
        self._recounting: set[Hashable] = set()
        self._tasks: set[asyncio.Task[int]] = set()

    def to_wait_for(self, node: Hashable, slot: int) -> int:
        """The count for WAIT on this node (decided as the write is sent to it): every
        replica asked for; under `accept`, those the node was counted to have when fewer,
        and none on a node not counted yet (then settle() counts and waits again)."""
        if not self._accept:
            return self.wanted
        counted = self._counted.get(node)
        if counted is None:
            return 0
        replicas, when = counted
        if time.monotonic() - when > RECOUNT_SECONDS and node not in self._recounting:
            self._recount_soon(slot, node)
        return min(self.wanted, replicas)

    async def settle(
        self,
        slot: int,
        node: Hashable,
        asked: int,
        acknowledged: int,
        wait_again: Callable[[int], Awaitable[int]],
    ) -> None:
        """Return when the write may be acknowledged, else raise errors.Unavailable.
        `wait_again(n)`: WAIT for n replicas behind a new write to the node (replicas apply
        writes in order: one that has the new write has this one)."""
        if acknowledged >= self.wanted:
            return
        if self._accept:
            try:
                if node not in self._counted or acknowledged < asked:
                    # Not counted yet, or replicas it was counted to have did not answer:
                    # gone, or only slow?
                    await self._count(slot)
                replicas, _ = self._counted.get(node, (self.wanted, 0.0))
                needed = min(self.wanted, replicas)
                if asked < needed:  # waited for fewer than it has
                    acknowledged = max(acknowledged, await wait_again(needed))
            except (RedisError, OSError):
                needed = self.wanted  # not known: as under refuse
            if acknowledged >= needed:
                if acknowledged < self.wanted:
                    shortfall_counter().inc()
                return
        raise errors.Unavailable(
            f"{acknowledged} of {self.wanted} Redis replicas acknowledged in time: the write"
            " is made but may not survive the loss of its primary; retry with the same"
            " Idempotency-Key to get its answer"
        )

    async def _count(self, slot: int) -> int:
        replicas = online_replicas(await self._role(slot))
        node = self._node(slot)  # after the call: where the call went, a failover followed
        if node is not None:
            self._counted[node] = (replicas, time.monotonic())
        return replicas

    def _recount_soon(self, slot: int, node: Hashable) -> None:
        self._recounting.add(node)
        task = asyncio.ensure_future(self._count(slot))
        self._tasks.add(task)

        def done(t: asyncio.Task[int]) -> None:
            self._tasks.discard(t)
            self._recounting.discard(node)
            if not t.cancelled():
                t.exception()  # retrieved: a failed recount is tried again next time

        task.add_done_callback(done)
