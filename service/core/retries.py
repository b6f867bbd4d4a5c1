"""How long, and how, a Redis call waits out Redis being away: one policy for every client.

On a cluster a call waits out a failover or a slot migration: it is sent again after pauses
that double from FIRST up to CAP, until the budget (BOXOFFICE_REDIS_CLUSTER_RETRY_SECONDS)
is spent; only then does it fail (and the request answers 503). The hot path's pipe
(service/hotpath/clusterpipe.py) follows this itself, redis-py's cluster client through
cluster() and wait_out() (service/hotpath/context.py). Nothing retries on top of another:
Scripts.call_event does not retry what the pipe gave up on.

On a single node there is no replica to wait for, only a reconnect: a connection found dead
(Redis restarted) is replaced and the call sent again within RECONNECT_SECONDS; Redis away
is an error at once, so that a request answers 503 instead of hanging. A Redis that hangs
(its connections open, nothing answered) is waited for once per request, for
BOXOFFICE_REDIS_TIMEOUT_SECONDS: a silent call is never sent again there.

The background loops (expiry listener, write-behind) never give up: they pause from
LOOP_FIRST, doubling up to LOOP_CAP, and start again.

Sized from measurements on tests/servers.py LocalCluster (3 primaries, 3 replicas,
cluster-node-timeout 2000 ms, 2 shared cores): from `kill -9` of a primary to its replica
serving writes, 3.1-4.5 s (5 runs); a hold, a read of one and a plain command asked right
after the kill were answered 3.5-4.1 s after it. A hot event's slot moved at redis-cli's
pace (10 keys per MIGRATE, 100-250 keys) took 0.2-1.1 s, a stretched move (4 keys per
MIGRATE, 20 ms apart, 230-640 keys) 1.9-3.8 s; the event's scripts are refused (TRYAGAIN)
for the whole move. The budget is above both with room to spare; with cluster-node-timeout
T, make it T + 3 s at least (a failover took up to T + 2.5 s here).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    SlotNotCoveredError,
    TryAgainError,
)

T = TypeVar("T")

# The default of BOXOFFICE_REDIS_CLUSTER_RETRY_SECONDS.
BUDGET_SECONDS = 10.0
# The default of BOXOFFICE_REDIS_TIMEOUT_SECONDS: how long a call waits for Redis's reply.
# Silence is not a failure that passes (not in PASSING): on a single node it is never
# waited out twice, so a hung Redis costs a request one such wait, then a 503. Our
# scripts take milliseconds; seconds of silence is a server or a network that hangs.
TIMEOUT_SECONDS = 3.0
# The first pause, and the longest: a call is sent again at most CAP after Redis is back.
FIRST = 0.01
CAP = 0.25
# A single node: how long a call may take to find a dead connection and reconnect.
RECONNECT_SECONDS = 0.2
# The background loops' pauses after a failure.
LOOP_FIRST = 0.1
LOOP_CAP = 5.0
# What the cluster says while a failover or a migration is under way, or a node is gone.
# Not TimeoutError: a silent node has cost its wait already (the hot path's pipe alone
# takes silence on a cluster for a failover under way: service/hotpath/scriptpipe.py).
PASSING = (ConnectionError, ClusterDownError, SlotNotCoveredError, TryAgainError)
# redis-py's cluster pipeline pauses this long between its tries (not configurable).
_PIPELINE_PAUSE = 0.25


class Backoff:
    """The pauses between tries of one call: FIRST, doubling up to CAP, while they fit in
    the budget (None: no end). Made only once a call has failed: none on the happy path."""

    __slots__ = ("_cap", "_deadline", "_delay", "_first")

    def __init__(self, budget: float | None, first: float = FIRST, cap: float = CAP) -> None:
        now = asyncio.get_running_loop().time()
        self._deadline = math.inf if budget is None else now + budget
        self._first = self._delay = first
        self._cap = cap

    def next(self) -> float | None:
        """The pause before the next try, or None when it would overrun the budget."""
        delay = self._delay
        if asyncio.get_running_loop().time() + delay > self._deadline:
            return None
        self._delay = min(delay * 2, self._cap)
        return delay

    async def pause(self) -> bool:
        """Sleep the next pause; False (at once) when the budget is spent."""
        delay = self.next()
        if delay is None:
            return False
        await asyncio.sleep(delay)
        return True

    @property
    def upcoming(self) -> float:
        """The next pause (for a log line), budget aside."""
        return self._delay

    def reset(self) -> None:
        self._delay = self._first


def forever() -> Backoff:
    """The pauses of a background loop that failed: it never gives up."""
    return Backoff(None, LOOP_FIRST, LOOP_CAP)


async def wait_out(call: Callable[[], Awaitable[T]], error: Exception, budget: float) -> T:
    """A call that failed with `error` tried again until it succeeds or the budget is spent
    (then its last error is raised). Only errors that pass (PASSING) are waited out."""
    backoff = Backoff(budget)
    while isinstance(error, PASSING) and await backoff.pause():
        try:
            return await call()
        except PASSING as e:
            error = e
    raise error


def single_node() -> Retry:
    """redis-py's retries on a single node: a dead pooled connection is replaced and the
    command sent again, as often as its pauses fit in RECONNECT_SECONDS."""
    backoff = ExponentialBackoff(cap=CAP, base=FIRST)
    # Not on TimeoutError (redis-py's default): each try would wait the timeout again.
    return Retry(
        backoff, retries=_tries(backoff, RECONNECT_SECONDS), supported_errors=(ConnectionError,)
    )


def cluster(budget: float) -> Retry:
    """redis-py's retries on a cluster. Its client tries again at once (each time with the
    slot table read again), so the pauses come from wait_out() around each command; its
    pipelines pause 0.25 s between tries, so as many tries as fill the budget."""
    return Retry(
        ExponentialBackoff(cap=CAP, base=FIRST),
        retries=math.ceil(budget / _PIPELINE_PAUSE),
        supported_errors=(ConnectionError,),
    )


def _tries(backoff: ExponentialBackoff, budget: float) -> int:
    """How many of redis-py's pauses (after the 1st failure, the 2nd, ...) fit in the budget."""
    tries, spent = 0, 0.0
    while spent + backoff.compute(tries + 1) <= budget:
        tries += 1
        spent += backoff.compute(tries)
    return tries
