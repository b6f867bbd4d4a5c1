"""The waiting room's order, rate and stock awareness, measured over many tickets.

- Fairness at the opening: 1,000 tickets join the pre-queue in a known order; at the
  opening their positions are a permutation unrelated to that order (rank correlation
  near 0, the first 100 spread over every tenth of the join order), and they are
  admitted in position order; later arrivals follow strictly first come, first served.
- Rate: 1,200 a minute (20 a second) measured over 6 seconds: the same even spread as a
  minute at that rate, scaled down 10 times so that the test takes seconds.
- Stock: sold out, every waiting ticket reads `sold_out` and nobody is admitted; tickets
  back on sale, admission resumes.
- Races: 2,000 customers join at once: one ticket each, positions 1..2,000; a tenth of
  them joining twice more at once get the ticket they have.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

import httpx
import pytest

from service.core.keys import event_keys
from service.hotpath.context import Services
from service.hotpath.scripts import LUA_DIR
from service.selling import waitingroom
from tests.apiserver import ApiServer
from tests.conftest import ADMIN, create_event, eventually, expire_hold
from tests.test_waiting_room import LATER, admitted, ga, hold, join, poll

PRE_QUEUE = 1000
ARRIVALS = 50
FIRST = 100


async def patch(client: httpx.AsyncClient, event_id: str, body: dict[str, Any]) -> None:
    r = await client.patch(f"/admin/events/{event_id}", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text


async def figures(client: httpx.AsyncClient, event_id: str) -> dict[str, Any]:
    r = await client.get(f"/admin/events/{event_id}/queue", headers=ADMIN)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def poll_all(
    client: httpx.AsyncClient, event_id: str, tickets: list[str]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for start in range(0, len(tickets), 200):
        chunk = tickets[start : start + 200]
        out += await asyncio.gather(*(poll(client, event_id, t) for t in chunk))
    return out


def spearman(xs: list[int], ys: list[int]) -> float:
    """Rank correlation of two permutations of the same length."""
    n = len(xs)
    d2 = sum((x - y) ** 2 for x, y in zip(xs, ys, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


async def test_pre_queue_is_shuffled_at_the_opening_then_fcfs(
    client: httpx.AsyncClient, svc: Services
) -> None:
    # 1 a minute: nobody is admitted while the positions are read.
    room = {"admit_per_minute": 1}
    event_id = await create_event(client, **ga(on_sale_at=LATER, waiting_room=room))
    tickets = []
    for i in range(PRE_QUEUE):
        # One after the other, so that the join order is known; through the service's
        # own call (the HTTP route's), a thousand HTTP round trips would only add time.
        t, new = await waitingroom.join(svc, event_id, f"pre-{i:04d}", None)
        assert new and t.position is None and t.status == "waiting"
        tickets.append(t.ticket)

    await patch(client, event_id, {"on_sale_at": None})  # the on-sale moment
    late = []
    for i in range(ARRIVALS):
        t = (await join(client, event_id, f"late-{i:03d}")).json()
        assert t["position"] == PRE_QUEUE + i + 1, t  # behind the whole pre-queue, in order
        late.append(t["ticket"])

    seen = await poll_all(client, event_id, tickets + late)
    positions = [t["position"] for t in seen]
    pre, after = positions[:PRE_QUEUE], positions[PRE_QUEUE:]
    assert sorted(pre) == list(range(1, PRE_QUEUE + 1))  # a permutation, ahead of arrivals
    assert after == list(range(PRE_QUEUE + 1, PRE_QUEUE + ARRIVALS + 1))  # strictly FCFS

    # Not the join order, nor near it: rank correlation ~ N(0, 1/sqrt(999)) = ±0.032.
    rho = spearman(list(range(1, PRE_QUEUE + 1)), pre)
    assert abs(rho) < 0.15, rho
    # The first 100 in line come from all over the join order: per tenth of it about 10;
    # chi-square with 9 degrees of freedom below 27.9 (p = 0.001 for a uniform draw).
    first = sorted(i for i, p in enumerate(pre) if p <= FIRST)
    tenths = [sum(1 for i in first if i // (PRE_QUEUE // 10) == k) for k in range(10)]
    chi2 = sum((n - FIRST / 10) ** 2 / (FIRST / 10) for n in tenths)
    assert chi2 < 27.9, (tenths, chi2)
    assert all(n > 0 for n in tenths), tenths
    mean = sum(first) / FIRST  # uniform: 499.5 ± 29 (one standard deviation)
    assert 350 < mean < 650, mean
    print(f"\nfairness: spearman {rho:+.3f}, first {FIRST} per tenth {tenths}, chi2 {chi2:.1f}")

    # Admitted in position order: whoever is admitted, everyone ahead of them is too.
    admitted_positions, frontier = await admitted_after(client, event_id, tickets, pre, 1.5)
    assert len(admitted_positions) >= 20, len(admitted_positions)
    assert admitted_positions == list(range(1, frontier + 1))


async def admitted_after(
    client: httpx.AsyncClient, event_id: str, tickets: list[str], pre: list[int], seconds: float
) -> tuple[list[int], int]:
    """Admission at 1,200 a minute for `seconds`, then the event paused (the frontier
    stops): the positions (`pre`, one per ticket) of the tickets admitted, in order, and
    the frontier."""
    await patch(client, event_id, {"waiting_room": {"admit_per_minute": 1200}})
    await asyncio.sleep(seconds)
    await patch(client, event_id, {"status": "paused"})
    frontier: int = (await figures(client, event_id))["admitted"]
    seen = await poll_all(client, event_id, tickets)
    admitted = sorted(p for p, t in zip(pre, seen, strict=True) if t["status"] == "admitted")
    return admitted, frontier


async def test_admission_rate_is_even(client: httpx.AsyncClient) -> None:
    """1,200 a minute = 20 a second, over 6 s: 120 ± 10%, every 2 s about 40, never ahead.
    Each sample's time is the middle of its request (the script ran within it)."""
    rate = 1200 / 60
    event_id = await create_event(
        client, **ga(on_sale_at=LATER, waiting_room={"admit_per_minute": 1200})
    )
    await asyncio.gather(*(join(client, event_id, f"c{i}") for i in range(400)))
    await patch(client, event_id, {"on_sale_at": None})
    start = time.monotonic()  # at the latest, the opening is the first figures' call
    assert (await figures(client, event_id))["admitted"] == 0  # the opening: none yet
    samples: list[tuple[float, int]] = []
    while time.monotonic() - start < 6.0:
        before = time.monotonic()
        f = await figures(client, event_id)
        after = time.monotonic()
        samples.append(((before + after) / 2 - start, f["admitted"]))
        assert f["admitted"] <= rate * (after - start) + 2, samples  # never ahead: no burst
        await asyncio.sleep(0.25)
    seconds, total = samples[-1]
    assert abs(total - rate * seconds) <= 0.1 * rate * seconds + 1, (total, seconds, samples)
    # Evenly: every 2 s window (from sample to sample) admits its share, ±25%.
    for t0, n0 in samples:
        later = [(t, n) for t, n in samples if t >= t0 + 2.0]
        if later:
            t1, n1 = later[0]
            expected = rate * (t1 - t0)
            assert abs(n1 - n0 - expected) <= 0.25 * expected + 2, (t0, t1, samples)
    f = await figures(client, event_id)
    assert f["waiting"] == 400 - f["admitted"]
    assert f["last_admitted_position"] == f["admitted"]
    print(f"\nrate: {total} admitted in {seconds:.2f} s, expected {rate * seconds:.0f}")


async def test_sold_out_stops_admission_and_a_release_resumes_it(
    client: httpx.AsyncClient,
) -> None:
    event_id = await create_event(client, **ga(2, waiting_room={"admit_per_minute": 6000}))
    first = await admitted(client, event_id, "first")
    r = await client.post(
        f"/events/{event_id}/holds",
        json={"customer_id": "first", "items": [{"category": "GA", "quantity": 2}]},
        headers={"boxoffice-pass": first["pass"]},
    )
    assert r.status_code == 201, r.text  # the last tickets
    hold_id = r.json()["hold_id"]
    joined = [(await join(client, event_id, f"c{i}")).json() for i in range(30)]
    started = time.monotonic()
    tickets = [t["ticket"] for t in joined]
    seen = await poll_all(client, event_id, tickets)
    assert time.monotonic() - started < 1.0
    assert {t["status"] for t in joined + seen} == {"sold_out"}, seen
    assert all(t["pass"] is None and t["position"] >= 1 for t in seen)
    before = (await figures(client, event_id))["admitted"]
    await asyncio.sleep(1.0)  # 100 would be admitted a second if anything were on sale
    seen = await poll_all(client, event_id, tickets)
    assert {t["status"] for t in seen} == {"sold_out"}
    assert (await figures(client, event_id))["admitted"] == before
    # The admitted buyer still holds its pass; with nothing left, a hold is sold_out.
    r = await hold(client, event_id, "first", first["pass"])
    assert r.status_code == 409 and r.json()["code"] == "sold_out", r.text

    assert (await client.delete(f"/events/{event_id}/holds/{hold_id}")).status_code == 204

    async def back() -> bool:  # every process's room state hears it within a second
        seen[:] = await poll_all(client, event_id, tickets)
        return "sold_out" not in {t["status"] for t in seen}

    await eventually(back, within=1.0)
    await asyncio.sleep(0.5)
    seen = await poll_all(client, event_id, tickets)
    assert sum(t["status"] == "admitted" for t in seen) >= 10, seen


@pytest.mark.slow  # a scale test: make test runs it, make test-fast not
async def test_2000_concurrent_joins(api: ApiServer) -> None:
    n = 2000
    # Its own client: no pool timeout, on a machine that may be slow.
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    timeout = httpx.Timeout(60, pool=None)
    async with httpx.AsyncClient(base_url=api.url, timeout=timeout, limits=limits) as client:
        event_id = await create_event(client, **ga(waiting_room={"admit_per_minute": 1}))
        customers = [f"racer-{i}" for i in range(n)]
        replies = await asyncio.gather(*(join(client, event_id, c) for c in customers))
        assert {r.status_code for r in replies} == {201}
        tickets = [r.json()["ticket"] for r in replies]
        positions = [r.json()["position"] for r in replies]
        assert len(set(tickets)) == n
        assert sorted(positions) == list(range(1, n + 1))
        # Again at once, a tenth of them twice: the same ticket each, no new one.
        again = customers[:200] * 2
        replies = await asyncio.gather(*(join(client, event_id, c) for c in again))
        assert [r.json()["ticket"] for r in replies] == tickets[:200] * 2
        f = await figures(client, event_id)
        assert (f["waiting"], f["admitted"]) == (n, 0)


async def test_background_step_advances_a_quiet_room(
    client: httpx.AsyncClient, svc: Services
) -> None:
    event_id = await create_event(client, **ga(waiting_room={"admit_per_minute": 6000}))
    for i in range(20):
        await join(client, event_id, f"c{i}")
    state = event_keys(event_id).queue[3]
    frontier = float(await svc.redis.hget(state, "f") or 0)
    await asyncio.sleep(0.1)
    assert await waitingroom.tick(svc) >= 1
    later = float(await svc.redis.hget(state, "f") or 0)
    assert later > frontier  # nobody asked: the step moved it
    # An event without a room is left alone.
    plain = await create_event(client, **ga())
    skip: dict[str, float] = {}
    await waitingroom.tick(svc, skip)
    assert await svc.redis.exists(event_keys(plain).queue[3]) == 0
    assert plain in skip and event_id not in skip  # not asked again for a while


async def test_metrics_show_the_room(client: httpx.AsyncClient) -> None:
    event_id = await create_event(client, **ga(waiting_room={"admit_per_minute": 6000}))
    await admitted(client, event_id, "m1")
    await join(client, event_id, "m2")
    await patch(client, event_id, {"status": "paused"})  # the figures stand still
    f = await figures(client, event_id)
    text = (await client.get("/metrics")).text
    values = {
        name: float(line.rpartition(" ")[2])
        for name in ("waiting", "admitted", "active_passes")
        for line in text.splitlines()
        if line.startswith(f'boxoffice_queue_{name}{{event="{event_id}"}} ')
    }
    assert values == {
        "waiting": f["waiting"],
        "admitted": f["admitted"],
        "active_passes": f["active_passes"],
    }
    assert values["active_passes"] >= 1 and values["waiting"] + values["admitted"] == 2


# Both figures of the room at one instant: queue_figures.lua's (read-only, first) and
# queue_view.lua's (the room advanced), in one script call.
_BOTH = """
local rm = room_meta()
local now = now_ms()
local read = room_figures_read(rm, now)
return cjson.encode({read, room_figures(rm, now)})
"""


async def test_the_read_only_figures_are_the_advancing_ones(
    client: httpx.AsyncClient, svc: Services
) -> None:
    """queue_figures.lua (/metrics) computes where the room would be, without writing: the
    same figures as queue_view.lua, which moves it there, in every state the step passes
    through: before the on-sale moment, the opening, admitting, out of stock with an
    overdue hold not yet reclaimed, paused."""
    room = {"admit_per_minute": 600, "pass_ttl_seconds": 10}
    event_id = await create_event(client, **ga(1, on_sale_at=LATER, waiting_room=room))
    k = event_keys(event_id)
    keys: tuple[bytes | str, ...] = (*k.all, *k.queue)
    lib = (LUA_DIR / "lib.lua").read_text()
    common = ("", svc.settings.idempotency_ttl_seconds, svc.settings.reclaim_batch, 1000)

    async def same() -> dict[str, int]:
        reply = await svc.redis.eval(lib + _BOTH, len(keys), *keys, *common)
        read, moved = json.loads(reply)
        assert read == moved
        return cast(dict[str, int], read)

    async def unchanged_by_a_scrape() -> None:
        before = [await svc.redis.dump(key) for key in keys]
        reply = await svc.scripts.call_event("queue_figures", event_id, extra_keys=k.queue)
        assert json.loads(reply)["apm"] == 600
        assert [await svc.redis.dump(key) for key in keys] == before

    for n in range(3):
        await join(client, event_id, f"early{n}")
    await unchanged_by_a_scrape()
    assert await same() == {"waiting": 3, "admitted": 0, "active": 0, "apm": 600}
    await patch(client, event_id, {"on_sale_at": None})  # the first look opens the room
    await unchanged_by_a_scrape()
    await same()
    ticket = await admitted(client, event_id, "buyer")
    r = await hold(client, event_id, "buyer", ticket["pass"])
    assert r.status_code == 201, r.text  # the one ticket: out of stock
    for n in range(5):
        await join(client, event_id, f"late{n}")
        await asyncio.sleep(0.05)
        await same()
    await expire_hold(svc, event_id, r.json()["hold_id"], fire_ttl=False)
    await unchanged_by_a_scrape()
    await same()  # the overdue hold counted back on sale, as advance() reclaims it
    await asyncio.sleep(0.2)
    await same()
    await patch(client, event_id, {"status": "paused"})
    await asyncio.sleep(0.1)
    await same()
    await asyncio.sleep(0.1)
    assert (await same())["admitted"] >= 1
