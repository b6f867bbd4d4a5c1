"""service/core/retries.py: the one policy by which Redis calls wait out a failover or a move."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.exceptions import ConnectionError, ResponseError, TryAgainError

from service.core import retries
from service.core.settings import Settings
from service.hotpath import context


async def test_pauses_double_up_to_the_cap_within_the_budget() -> None:
    backoff = retries.Backoff(0.5)
    pauses, started = [], time.monotonic()
    while (delay := backoff.upcoming) and await backoff.pause():
        pauses.append(delay)
    took = time.monotonic() - started
    assert pauses == [0.01, 0.02, 0.04, 0.08, 0.16]  # the next, 0.25, would overrun 0.5
    assert sum(pauses) <= took < 0.5 + 0.2  # the margin: a loaded machine sleeps late
    assert backoff.upcoming == retries.CAP
    backoff.reset()
    assert backoff.upcoming == retries.FIRST


async def test_a_background_loop_never_gives_up() -> None:
    backoff = retries.forever()
    pauses = [backoff.next() for _ in range(20)]
    assert pauses[0] == retries.LOOP_FIRST and pauses[-1] == retries.LOOP_CAP


async def test_wait_out_succeeds_once_redis_is_back() -> None:
    tries = 0

    async def call() -> str:
        nonlocal tries
        tries += 1
        if tries < 4:
            raise TryAgainError("TRYAGAIN")
        return "ok"

    assert await retries.wait_out(call, ConnectionError("gone"), 1.0) == "ok"
    assert tries == 4


async def test_wait_out_gives_up_after_one_budget_with_the_last_error() -> None:
    tries = 0

    async def call() -> None:
        nonlocal tries
        tries += 1
        raise ConnectionError(f"still gone ({tries})")

    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"still gone \(\d+\)"):
        await retries.wait_out(call, ConnectionError("gone"), 0.5)
    assert time.monotonic() - started < 0.5 + 0.2
    assert tries > 3


async def test_errors_that_do_not_pass_are_not_waited_out() -> None:
    async def call() -> None:
        raise AssertionError("not called again")

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await retries.wait_out(call, ResponseError("WRONGTYPE"), 5.0)


def test_redis_py_retries_fit_their_budgets() -> None:
    single = retries.single_node()
    pauses = [single._backoff.compute(n) for n in range(1, single.get_retries() + 1)]
    assert 0 < sum(pauses) <= retries.RECONNECT_SECONDS
    # The cluster client's pipelines pause 0.25 s between tries: as many as fill 10 s.
    assert retries.cluster(10.0).get_retries() == 40


async def test_a_connection_closed_under_a_write_is_a_lost_connection(settings: Settings) -> None:
    """The cluster client may close a node's connections (after MOVED) while another call
    is still connecting on one: that call's next write finds no writer. It must fail as a
    lost connection (ConnectionError, retried within the budget), not as an AttributeError
    (a 500: seen during a slot move). Made to happen every time: the connection is closed
    in the turn of the event loop between a write being scheduled and its running (with
    a socket timeout redis-py writes in a task of its own), on a real Redis."""

    class ClosedBeforeTheWrite(context._Connection):
        async def _send_packed_command(self, command: Any) -> None:
            await self.disconnect()  # what the cluster client's other call did
            await super()._send_packed_command(command)

    url = urlsplit(settings.redis_url)
    conn = ClosedBeforeTheWrite(host=url.hostname or "", port=url.port or 6379, socket_timeout=2)
    try:
        with pytest.raises(ConnectionError):
            await conn.send_packed_command(b"*1\r\n$4\r\nPING\r\n")
    finally:
        await conn.disconnect()
