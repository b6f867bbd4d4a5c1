"""BOXOFFICE_CONFIRM_WAIT_SHORTFALL: a primary with fewer replicas than
BOXOFFICE_CONFIRM_WAIT_REPLICAS asks for `refuse`s (503, and the retry with the same
Idempotency-Key finds the booking) or `accept`s (acknowledged with the replicas there are,
counted, warned in /ready); on a cluster, after a primary is killed, confirmations on its
shard come back by themselves: with `accept` within seconds of the failover, and with
`refuse` when the topology heals itself (two replicas per primary)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx
import msgspec
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.crc import key_slot

from service.core import schemas
from service.core.keys import event_keys
from service.core.settings import Settings
from service.hotpath.context import Services
from service.hotpath.replicas import online_replicas, shortfall_counter
from service.selling import catalog, sales
from service.web import metrics
from tests.apiserver import served
from tests.conftest import create_event, event_body, server_env
from tests.servers import LocalCluster, RedisServer, wait_synced

GA = {"items": [{"category": "GA", "quantity": 1}]}
GA_ITEM = schemas.HoldItem("GA", 1)


def shortfalls(metrics: str) -> float:
    for family in text_string_to_metric_families(metrics):
        if family.name == "boxoffice_confirm_replica_shortfall":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("no boxoffice_confirm_replica_shortfall_total in /metrics")


async def _hold(client: httpx.AsyncClient, event_id: str, customer: str) -> str:
    r = await client.post(f"/events/{event_id}/holds", json={"customer_id": customer, **GA})
    assert r.status_code == 201, r.text
    hold_id: str = r.json()["hold_id"]
    return hold_id


def _env(settings: Settings, url: str, shortfall: str) -> dict[str, str]:
    return {
        **server_env(settings),
        "BOXOFFICE_REDIS_URL": url,
        "BOXOFFICE_CONFIRM_WAIT_REPLICAS": "1",
        "BOXOFFICE_CONFIRM_WAIT_TIMEOUT_MS": "1000",
        "BOXOFFICE_CONFIRM_WAIT_SHORTFALL": shortfall,
    }


# --- one node -------------------------------------------------------------------------------


@pytest.fixture
def lone_primary() -> Iterator[RedisServer]:
    with RedisServer() as primary:
        yield primary


async def test_refuse_answers_503_and_the_retry_finds_the_booking(
    settings: Settings, lone_primary: RedisServer
) -> None:
    """The default: no replica, no acknowledgement; the confirmation is made all the same,
    and once a replica is there the retry with the same key gets that booking."""
    primary = lone_primary
    async with served(_env(settings, primary.url, "refuse")) as client:
        event_id = await create_event(client)
        hold_id = await _hold(client, event_id, "a")
        key = {"idempotency-key": "confirm-a"}
        r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm", headers=key)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "unavailable"
        assert "retry with the same Idempotency-Key" in r.json()["detail"]
        k = event_keys(event_id)
        with redis.Redis(port=primary.port) as pr:
            [made] = [b.decode() for b in pr.hkeys(k.bookings)]  # booked, though 503
        ready = (await client.get("/ready")).json()
        assert ready["status"] == "ready"
        assert any("503 until a replica is back" in w for w in ready["warnings"]), ready

        with RedisServer(args=["--replicaof", "127.0.0.1", str(primary.port)]) as replica:
            wait_synced(primary, replica)
            retry = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm", headers=key)
            assert retry.status_code == 200, retry.text
            assert retry.json()["booking_id"] == made
            with redis.Redis(port=primary.port) as pr:
                assert pr.hlen(k.bookings) == 1
            assert shortfalls((await client.get("/metrics")).text) == 0


async def test_accept_acknowledges_with_the_replicas_there_are(
    settings: Settings, lone_primary: RedisServer
) -> None:
    primary = lone_primary
    async with served(_env(settings, primary.url, "accept")) as client:
        event_id = await create_event(client)
        took = []
        for i in range(5):
            hold_id = await _hold(client, event_id, f"c{i}")
            started = time.monotonic()
            r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm")
            took.append(time.monotonic() - started)
            assert r.status_code == 200, r.text
        # Counted before the first WAIT: not one waits out WAIT's timeout (1 s).
        assert max(took) < 0.5, took
        assert shortfalls((await client.get("/metrics")).text) == 5
        ready = (await client.get("/ready")).json()
        assert ready["status"] == "ready"
        assert any("has 0 replica(s) in sync" in w and "=accept" in w for w in ready["warnings"]), (
            ready
        )

        # A replica comes: it is counted within a second or two, and waited for again; then
        # one that is there but silent is not a shortfall: 503.
        with RedisServer(args=["--replicaof", "127.0.0.1", str(primary.port)]) as replica:
            wait_synced(primary, replica)
            deadline = time.monotonic() + 10
            counted = shortfalls((await client.get("/metrics")).text)
            while True:  # until a confirmation is no longer a shortfall
                hold_id = await _hold(client, event_id, f"d{time.monotonic()}")
                r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm")
                assert r.status_code == 200, r.text
                now = shortfalls((await client.get("/metrics")).text)
                if now == counted:
                    break
                counted = now
                assert time.monotonic() < deadline, "the new replica was not waited for"
                await asyncio.sleep(0.2)
            with redis.Redis(port=replica.port) as rr:
                assert rr.hexists(event_keys(event_id).bookings, r.json()["booking_id"])
            ready = (await client.get("/ready")).json()
            assert not any("replica(s) in sync" in w for w in ready["warnings"]), ready
            hold_id = await _hold(client, event_id, "paused")
            replica.pause()
            try:
                r = await client.post(
                    f"/events/{event_id}/holds/{hold_id}/confirm",
                    headers={"idempotency-key": "paused"},
                )
                assert r.status_code == 503, r.text
            finally:
                replica.resume()
            assert shortfalls((await client.get("/metrics")).text) == counted


async def test_accept_waits_for_a_replica_that_is_there(
    settings: Settings, lone_primary: RedisServer
) -> None:
    """The first confirmation on a primary not counted yet: it has a replica, so it is
    acknowledged once the replica has it, and that is no shortfall."""
    primary = lone_primary
    with RedisServer(args=["--replicaof", "127.0.0.1", str(primary.port)]) as replica:
        wait_synced(primary, replica)
        async with served(_env(settings, primary.url, "accept")) as client:
            event_id = await create_event(client)
            for i in range(3):
                hold_id = await _hold(client, event_id, f"c{i}")
                r = await client.post(f"/events/{event_id}/holds/{hold_id}/confirm")
                assert r.status_code == 200, r.text
                with redis.Redis(port=replica.port) as rr:
                    assert rr.hexists(event_keys(event_id).bookings, r.json()["booking_id"])
            assert shortfalls((await client.get("/metrics")).text) == 0


async def test_the_setting_takes_only_its_two_values() -> None:
    from service.core.settings import SettingError

    with pytest.raises(SettingError, match="BOXOFFICE_CONFIRM_WAIT_SHORTFALL: 'maybe'"):
        Settings.from_env({"BOXOFFICE_CONFIRM_WAIT_SHORTFALL": "maybe"})
    assert Settings.from_env({}).confirm_wait_shortfall == "refuse"


# --- a cluster: a primary killed ------------------------------------------------------------


def caught_up(cluster: LocalCluster, primary: RedisServer, timeout: float = 10.0) -> None:
    """Until every replica of the primary has all it wrote (so that a kill loses nothing)."""
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.call(primary, "INFO", "replication")
        offsets = [v["offset"] for k, v in info.items() if k.startswith("slave")]
        if offsets and min(offsets) >= info["master_repl_offset"]:
            return
        assert time.monotonic() < deadline, "the replicas did not catch up"
        time.sleep(0.02)


class Resumed(msgspec.Struct):
    held: float  # seconds from the kill to the first hold asked after it and answered
    confirmed: float  # ... to the first confirmation asked after it and acknowledged
    acknowledged: list[str]
    failed: int


async def confirm_through_a_kill(
    svc: Services,
    cluster: LocalCluster,
    primary: RedisServer,
    event_id: str,
    buyers: int = 8,
    once_holds_resume: Callable[[], Awaitable[None]] | None = None,
) -> Resumed:
    """Buyers hold and confirm on the event without a pause; its primary is killed (-9)
    once they are under way. `once_holds_resume` runs when the first hold asked after the
    kill is answered (the failover is done), or after 20 s. Returns when confirmations are
    acknowledged again, or 30 s after that, what happened."""
    acknowledged: list[str] = []
    failed = 0
    killed_at = float("inf")
    held_at: float | None = None
    confirmed_at: float | None = None
    stop = asyncio.Event()

    async def buyer(i: int) -> None:
        nonlocal failed, held_at, confirmed_at
        n = 0
        while not stop.is_set():
            n += 1
            asked = time.monotonic()
            try:
                hold, _ = await sales.create_hold_counted(
                    svc,
                    event_id,
                    schemas.HoldCreate(customer_id=f"c{i}-{n}", items=[GA_ITEM]),
                    None,
                )
                if asked > killed_at and held_at is None:
                    held_at = time.monotonic()
                started = time.monotonic()
                booking = await sales.confirm_hold(
                    svc, event_id, hold.hold_id, schemas.HoldConfirm(), None
                )
            except Exception:
                failed += 1
                await asyncio.sleep(0.05)
                continue
            acknowledged.append(booking.booking_id)
            if started > killed_at and confirmed_at is None:
                confirmed_at = time.monotonic()
            if confirmed_at is not None and held_at is not None:
                stop.set()

    tasks = [asyncio.ensure_future(buyer(i)) for i in range(buyers)]
    await asyncio.sleep(1.0)
    assert acknowledged, "no confirmation before the kill"
    cluster.kill(primary)
    killed_at = time.monotonic()
    if once_holds_resume is not None:
        deadline = killed_at + 20
        while held_at is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await once_holds_resume()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), 30)
    stop.set()
    await asyncio.gather(*tasks)
    assert held_at is not None, "holds did not resume after the failover"
    assert confirmed_at is not None, "confirmations did not resume after the failover"
    return Resumed(held_at - killed_at, confirmed_at - killed_at, acknowledged, failed)


async def big_event(svc: Services, event_id: str) -> None:
    big = event_body(event_id, max_per_order=1)
    big["categories"] = [{"name": "GA", "price": 100, "currency": "EUR", "capacity": 100_000}]
    await catalog.create_event(svc, msgspec.convert(big, schemas.EventCreate))


def _waiting(settings: Settings, cluster: LocalCluster, shortfall: str) -> Settings:
    return msgspec.structs.replace(
        settings,
        redis_url=cluster.url,
        confirm_wait_replicas=1,
        confirm_wait_timeout_ms=1000,
        confirm_wait_shortfall=shortfall,
    )


async def test_accept_resumes_confirmations_within_seconds_of_a_failover(
    settings: Settings, cluster: LocalCluster
) -> None:
    """One replica per primary: the promoted one has none. With `accept` its shard's
    confirmations resume as soon as its holds do, counted as shortfalls, and /ready says so."""
    svc = Services.open(_waiting(settings, cluster, "accept"))
    await svc.start()
    try:
        port, (event_id,) = next(iter(cluster.event_ids(1).items()))
        primary = next(n for n in cluster.primaries() if n.port == port)
        await big_event(svc, event_id)
        before = shortfall_counter()._value.get()
        resumed = await confirm_through_a_kill(svc, cluster, primary, event_id)
        print(
            f"accept: holds resumed {resumed.held:.1f} s after the kill, confirmations"
            f" {resumed.confirmed:.1f} s; {len(resumed.acknowledged)} acknowledged,"
            f" {resumed.failed} failed"
        )
        assert resumed.confirmed < 12
        # A confirmation redirected to the promoted replica waits for none: no WAIT times
        # out on the way (each would hold up the calls queued behind it for 1 s).
        assert resumed.confirmed - resumed.held < 2
        assert shortfall_counter()._value.get() > before
        ready = await metrics.readiness(svc)
        assert any("0 replica(s) in sync" in w and "=accept" in w for w in ready.warnings), ready
        # Every acknowledged confirmation is on the new primary.
        keys: list[bytes] = await svc.redis.hkeys(event_keys(event_id).bookings)  # type: ignore[assignment]
        assert set(resumed.acknowledged) <= {b.decode() for b in keys}
    finally:
        await svc.close()
        await asyncio.to_thread(cluster.heal)


async def test_refuse_503_on_a_promoted_primary_and_the_retry_finds_the_booking(
    settings: Settings, cluster: LocalCluster
) -> None:
    """The default after a failover: the confirmation is made on the new primary but
    answered 503; once a replica is back, the retry with the same Idempotency-Key gets that
    very booking, and there is one booking for the hold."""
    async with served(_env(settings, cluster.url, "refuse")) as client:
        port, (event_id,) = next(iter(cluster.event_ids(1).items()))
        primary = next(n for n in cluster.primaries() if n.port == port)
        await create_event(client, id=event_id)
        hold_id = await _hold(client, event_id, "a")
        await asyncio.to_thread(caught_up, cluster, primary)
        cluster.kill(primary)
        try:
            await asyncio.sleep(1)
            await asyncio.to_thread(cluster.wait_ok)
            key = {"idempotency-key": "confirm-after-failover"}
            url = f"/events/{event_id}/holds/{hold_id}/confirm"
            r = await client.post(url, headers=key)
            assert r.status_code == 503, r.text
            assert "retry with the same Idempotency-Key" in r.json()["detail"]
            ready = (await client.get("/ready")).json()
            assert any("503 until a replica is back" in w for w in ready["warnings"]), ready
            k = event_keys(event_id)
            owner = cluster.owner(key_slot(k.meta.encode()))
            [made] = [b.decode() for b in cluster.call(owner, "HKEYS", k.bookings)]
        finally:
            await asyncio.to_thread(cluster.heal)  # the old primary, back as a replica
        retry = await client.post(url, headers=key)
        assert retry.status_code == 200, retry.text
        assert retry.json()["booking_id"] == made
        assert cluster.call(owner, "HLEN", k.bookings) == 1


@pytest.fixture(scope="module")
def cluster_of_two_replicas() -> Iterator[LocalCluster]:
    """The self-healing topology (README, Scaling out): two replicas per primary."""
    with LocalCluster(replicas=2) as c:
        yield c


@pytest.mark.cluster
async def test_two_replicas_per_primary_heal_a_failover_by_themselves(
    settings: Settings, cluster_of_two_replicas: LocalCluster
) -> None:
    """With `refuse` (the default) and nobody restarting anything, confirmations on the
    killed primary's shard resume: its other replica follows the promoted one."""
    cluster = cluster_of_two_replicas
    svc = Services.open(_waiting(settings, cluster, "refuse"))
    await svc.start()
    try:
        port, (event_id,) = next(iter(cluster.event_ids(1).items()))
        primary = next(n for n in cluster.primaries() if n.port == port)
        await big_event(svc, event_id)
        resumed = await confirm_through_a_kill(svc, cluster, primary, event_id)
        print(
            f"two replicas, refuse: holds resumed {resumed.held:.1f} s after the kill,"
            f" confirmations {resumed.confirmed:.1f} s; {len(resumed.acknowledged)}"
            f" acknowledged, {resumed.failed} failed"
        )
        assert resumed.confirmed < 15
        owner = cluster.owner(key_slot(event_keys(event_id).meta.encode()))
        assert owner is not primary
        assert online_replicas(cluster.call(owner, "ROLE")) >= 1
        keys: list[bytes] = await svc.redis.hkeys(event_keys(event_id).bookings)  # type: ignore[assignment]
        assert set(resumed.acknowledged) <= {b.decode() for b in keys}
    finally:
        await svc.close()
        await asyncio.to_thread(cluster.heal)
