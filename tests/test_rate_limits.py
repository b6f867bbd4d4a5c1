"""Rate limits (API.md, Flood control): per customer and event on hold attempts, inside
the event's hold script; 429 `rate_limited` with Retry-After, RateLimit-Policy and
RateLimit; a limited request changes nothing."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec
import pytest

from service.core import errors, schemas
from service.core.keys import event_keys
from service.core.settings import Settings
from service.hotpath.context import Services
from service.hotpath.scripts import Idempotency
from service.selling import catalog, sales
from tests.apiserver import ApiServer
from tests.conftest import (
    ADMIN,
    event_body,
    expire_hold,
    new_event_id,
    on_redis,
    server_env,
    services_with,
)
from tests.servers import LocalCluster

# Every answer of the lean lane's routes agrees with the OpenAPI document.
pytestmark = pytest.mark.openapi_checked

# Over HTTP: a window long enough that nothing comes back during a test (GCRA gives one
# attempt back every WINDOW / LIMIT = 12 s).
LIMIT, WINDOW = 5, 60
# In process: a short window, to see the quota come back (an attempt every 2 s: a
# stall of the machine under test shorter than that does not give one back early).
SHORT_LIMIT, SHORT_WINDOW = 3, 6

POLICY = re.compile(r'^"customer";q=(\d+);w=(\d+)$')
STATE = re.compile(r'^"customer";r=(\d+);t=(\d+)$')


@pytest.fixture(scope="module")
def limited(settings: Settings) -> Iterator[ApiServer]:
    env = {
        **server_env(settings),
        "BOXOFFICE_RATE_LIMIT_CUSTOMER_HOLDS": str(LIMIT),
        "BOXOFFICE_RATE_LIMIT_CUSTOMER_WINDOW_SECONDS": str(WINDOW),
    }
    server = ApiServer(env, workers=2)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def http(limited: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=limited.url, timeout=30, limits=limits) as c:
        yield c


@pytest.fixture
async def short(settings: Settings) -> AsyncIterator[Services]:
    async with services_with(
        settings,
        rate_limit_customer_holds=SHORT_LIMIT,
        rate_limit_customer_window_seconds=SHORT_WINDOW,
    ) as svc:
        yield svc


def _hold(customer: str, quantity: int = 1) -> dict[str, object]:
    return {"customer_id": customer, "items": [{"category": "GA", "quantity": quantity}]}


def _ga(customer: str, quantity: int = 1) -> schemas.HoldCreate:
    return schemas.HoldCreate(customer_id=customer, items=[schemas.HoldItem("GA", quantity)])


async def _event(client: httpx.AsyncClient, capacity: int = 500) -> str:
    body = event_body()
    body["categories"][0]["capacity"] = capacity
    r = await client.post("/admin/events", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    return str(body["id"])


async def _event_in_process(svc: Services, capacity: int = 500) -> str:
    event_id = new_event_id("rl")
    body = event_body(event_id)
    body["categories"][0]["capacity"] = capacity
    await catalog.create_event(svc, msgspec.convert(body, schemas.EventCreate))
    return event_id


async def _available(client: httpx.AsyncClient, event_id: str) -> int:
    r = await client.get(f"/events/{event_id}")
    return int(next(c["available"] for c in r.json()["categories"] if c["name"] == "GA"))


def _item(field: str, policy: str) -> str:
    """The item of one policy in a RateLimit or RateLimit-Policy list (another limit may
    have its own item beside it)."""
    return next((i for i in field.split(", ") if i.startswith(f'"{policy}";')), "")


def _assert_429(r: httpx.Response) -> int:
    """A customer-limit 429 with its headers right; returns Retry-After."""
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["code"] == "rate_limited" and body["status"] == 429, body
    assert r.headers["content-type"].startswith("application/problem+json")
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= WINDOW // LIMIT, r.headers
    policy = POLICY.match(_item(r.headers["ratelimit-policy"], "customer"))
    assert policy and policy.groups() == (str(LIMIT), str(WINDOW)), r.headers
    state = STATE.match(_item(r.headers["ratelimit"], "customer"))
    # No attempt left; the reset is the same moment as Retry-After (the draft's SHOULD).
    assert state and state.groups() == ("0", str(retry_after)), r.headers
    return retry_after


async def test_exactly_the_limit_of_concurrent_attempts_pass(http: httpx.AsyncClient) -> None:
    event_id = await _event(http)
    before = await _available(http, event_id)
    n = 40
    replies = await asyncio.gather(
        *(http.post(f"/events/{event_id}/holds", json=_hold("racer")) for _ in range(n))
    )
    statuses = Counter(r.status_code for r in replies)
    assert statuses == {201: LIMIT, 429: n - LIMIT}, statuses
    for r in replies:
        if r.status_code == 429:
            _assert_429(r)
    # Only the holds that passed took tickets.
    assert await _available(http, event_id) == before - LIMIT
    # Another customer of the same event, and the same customer in another event, are
    # limited apart.
    r = await http.post(f"/events/{event_id}/holds", json=_hold("someone-else"))
    assert r.status_code == 201, r.text
    other = await _event(http)
    r = await http.post(f"/events/{other}/holds", json=_hold("racer"))
    assert r.status_code == 201, r.text


async def test_successes_say_what_is_left(http: httpx.AsyncClient) -> None:
    event_id = await _event(http)
    for left in range(LIMIT - 1, -1, -1):
        r = await http.post(f"/events/{event_id}/holds", json=_hold("counted"))
        assert r.status_code == 201, r.text
        assert r.headers["ratelimit-policy"] == f'"customer";q={LIMIT};w={WINDOW}'
        state = STATE.match(r.headers["ratelimit"])
        assert state, r.headers
        remaining, reset = (int(g) for g in state.groups())
        assert remaining == left
        # Until the whole quota is back: one interval per attempt used.
        used = LIMIT - left
        assert used * WINDOW // LIMIT - 1 <= reset <= used * WINDOW // LIMIT, r.headers
    _assert_429(await http.post(f"/events/{event_id}/holds", json=_hold("counted")))


async def test_refusals_count_too(http: httpx.AsyncClient) -> None:
    """A bot looping on a refusal the script gives meets the limit as well. (A `sold_out`
    that the API process answers itself, tests/test_sold_out.py, costs nothing and is not
    counted: only the first one reaches the script.)"""
    event_id = await _event(http, capacity=1)
    r = await http.post(f"/events/{event_id}/holds", json=_hold("buyer"))
    assert r.status_code == 201, r.text
    codes = []
    for _ in range(LIMIT + 2):
        r = await http.post(
            f"/events/{event_id}/holds", json={"customer_id": "bot", "seats": ["NO-1"]}
        )
        codes.append(r.json()["code"])
    assert codes == ["unknown_seat"] * LIMIT + ["rate_limited"] * 2, codes


async def test_a_429_changes_nothing(short: Services) -> None:
    event_id = await _event_in_process(short)
    keys = event_keys(event_id)
    for _ in range(SHORT_LIMIT):
        await sales.create_hold_counted(short, event_id, _ga("eager"), None)

    async def state() -> tuple[object, ...]:
        r = short.redis
        return (
            await r.hgetall(keys.avail),
            await r.hgetall(keys.held),
            await r.hlen(keys.holds),
            await r.hgetall(keys.cust),
            await r.hgetall(keys.stats),
            await r.get(keys.idempotency_count),
            await r.get(keys.idempotency_refusals),
            sorted([k async for k in r.scan_iter(match=f"{keys.tag}:idem:*")]),
        )

    before = await state()
    key = Idempotency("ab" * 32, "fingerprint-late")
    with pytest.raises(errors.RateLimited) as refused:
        await sales.create_hold_counted(short, event_id, _ga("eager"), key)
    assert refused.value.headers is not None
    assert refused.value.headers["ratelimit"].startswith('"customer";r=0;')
    assert await state() == before
    # The same request with the same key, once the limit allows it, is a new hold: the
    # 429 was not remembered as the key's answer.
    await asyncio.sleep(int(refused.value.headers["retry-after"]) + 0.1)
    hold, _ = await sales.create_hold_counted(short, event_id, _ga("eager"), key)
    assert hold.status == "held"
    assert (await sales.create_hold_counted(short, event_id, _ga("eager"), key))[
        0
    ] == hold  # a replay


async def test_a_loop_that_does_not_wait_stays_limited(short: Services) -> None:
    """Refused attempts count too: a client that tries again before its Retry-After
    gets nothing; once it waits as told, it gets an attempt."""
    event_id = await _event_in_process(short)
    for _ in range(SHORT_LIMIT):
        await sales.create_hold_counted(short, event_id, _ga("looper"), None)
    interval = SHORT_WINDOW / SHORT_LIMIT
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2 * interval  # long enough for two attempts to come back
    refusals = 0
    while loop.time() < deadline:
        with pytest.raises(errors.RateLimited) as refused:
            await sales.create_hold_counted(short, event_id, _ga("looper"), None)
        refusals += 1
        await asyncio.sleep(0.01)
    assert refusals > 20
    assert refused.value.headers is not None
    await asyncio.sleep(int(refused.value.headers["retry-after"]) + 0.05)
    hold, _ = await sales.create_hold_counted(short, event_id, _ga("looper"), None)
    assert hold.status == "held"


async def test_the_quota_comes_back_after_the_window(short: Services) -> None:
    event_id = await _event_in_process(short)
    for _ in range(SHORT_LIMIT):
        await sales.create_hold_counted(short, event_id, _ga("patient"), None)
    with pytest.raises(errors.RateLimited):
        await sales.create_hold_counted(short, event_id, _ga("patient"), None)
    await asyncio.sleep(SHORT_WINDOW + 0.1)
    for left in range(SHORT_LIMIT - 1, -1, -1):
        _, quota = await sales.create_hold_counted(short, event_id, _ga("patient"), None)
        assert quota is not None and quota.remaining == left
    with pytest.raises(errors.RateLimited):
        await sales.create_hold_counted(short, event_id, _ga("patient"), None)


async def test_a_hold_called_again_after_a_reclaim_counts_once(settings: Settings) -> None:
    """The script asks to be called again when overdue holds beyond its reclaim batch may
    be in the way; the attempt is counted by the call that decides, not by both."""
    async with services_with(settings, reclaim_batch=1, rate_limit_customer_holds=LIMIT) as svc:
        event_id = await _event_in_process(svc, capacity=2)
        a, _ = await sales.create_hold_counted(svc, event_id, _ga("a"), None)
        b, _ = await sales.create_hold_counted(svc, event_id, _ga("b"), None)
        for h in (a, b):
            await expire_hold(svc, event_id, h.hold_id, fire_ttl=False)
        hold, quota = await sales.create_hold_counted(svc, event_id, _ga("c", 2), None)
        assert hold.status == "held"
        assert quota is not None and quota.remaining == LIMIT - 1


async def test_no_limit_when_off(settings: Settings) -> None:
    async with services_with(settings, rate_limit_customer_holds=0) as svc:
        event_id = await _event_in_process(svc)
        for _ in range(Settings().rate_limit_customer_holds + 5):
            _, quota = await sales.create_hold_counted(svc, event_id, _ga("unlimited"), None)
            assert quota is None
        assert await svc.redis.get(event_keys(event_id).customer_rate("unlimited")) is None


# --- per client address, and admin routes apart -------------------------------------------

PER_ADDRESS, PER_ADMIN = 5, 3
ADDRESS_POLICY = f'"address";q={PER_ADDRESS};w={WINDOW}'


async def _forget_address_counts(settings: Settings) -> None:
    """Earlier runs' counts of 127.0.0.1 would still be in the window."""
    svc = Services.open(settings)
    try:
        async for key in svc.redis.scan_iter(match="*bo:rl*"):
            await svc.redis.delete(key)
    finally:
        await svc.close()


def _address_server(settings: Settings, trusted: str) -> ApiServer:
    env = {
        **server_env(settings),
        "BOXOFFICE_RATE_LIMIT_ADDRESS": str(PER_ADDRESS),
        "BOXOFFICE_RATE_LIMIT_ADDRESS_WINDOW_SECONDS": str(WINDOW),
        "BOXOFFICE_RATE_LIMIT_ADMIN": str(PER_ADMIN),
        "BOXOFFICE_RATE_LIMIT_ADMIN_WINDOW_SECONDS": str(WINDOW),
        "BOXOFFICE_TRUSTED_PROXIES": trusted,
        "BOXOFFICE_RATE_LIMIT_CUSTOMER_HOLDS": str(LIMIT),
        # The general limit alone here; joins and tickets: tests/test_flood_defaults.py.
        "BOXOFFICE_RATE_LIMIT_ADDRESS_JOINS": "0",
        "BOXOFFICE_RATE_LIMIT_ADDRESS_TICKETS": "0",
    }
    return ApiServer(env, workers=2)


@pytest.fixture
async def behind_proxy(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A service that believes X-Forwarded-For from 127.0.0.1, where the tests run."""
    await _forget_address_counts(settings)
    server = _address_server(settings, "10.9.0.0/16, 127.0.0.1")
    server.start()
    await _forget_address_counts(settings)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            yield c
    finally:
        server.stop()


@pytest.fixture
async def direct(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A service that trusts no proxy: the peer is the client."""
    await _forget_address_counts(settings)
    server = _address_server(settings, "")
    server.start()
    await _forget_address_counts(settings)  # the start's own readiness polls among them
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            yield c
    finally:
        server.stop()


def _assert_address_429(r: httpx.Response, policy: str = ADDRESS_POLICY) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "rate_limited", r.text
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= WINDOW, r.headers
    assert r.headers["ratelimit-policy"] == policy
    name = policy.split(";")[0]
    assert r.headers["ratelimit"] == f"{name};r=0;t={retry_after}", r.headers


def _from(address: str) -> dict[str, str]:
    return {"x-forwarded-for": address}


async def test_per_address_limit_is_exact_under_concurrency(
    behind_proxy: httpx.AsyncClient,
) -> None:
    replies = await asyncio.gather(
        *(behind_proxy.get("/health", headers=_from("203.0.113.7")) for _ in range(30))
    )
    statuses = Counter(r.status_code for r in replies)
    assert statuses == {200: PER_ADDRESS, 429: 30 - PER_ADDRESS}, statuses
    left = []
    for r in replies:
        if r.status_code == 429:
            _assert_address_429(r)
        else:  # a success says what is left
            assert r.headers["ratelimit-policy"] == ADDRESS_POLICY
            state = re.fullmatch(r'"address";r=(\d+);t=(\d+)', r.headers["ratelimit"])
            assert state, r.headers
            left.append(int(state.group(1)))
    assert sorted(left) == list(range(PER_ADDRESS)), left
    # Every route: a refused hold changes nothing, and another address is counted apart.
    event_id = await _event(behind_proxy)
    before = await _available(behind_proxy, event_id)
    r = await behind_proxy.post(
        f"/events/{event_id}/holds", json=_hold("limited"), headers=_from("203.0.113.7")
    )
    _assert_address_429(r)
    assert await _available(behind_proxy, event_id) == before
    r = await behind_proxy.get("/health", headers=_from("203.0.113.8"))
    assert r.status_code == 200, r.text
    # A hold answers both limits' headers, one item per policy.
    r = await behind_proxy.post(
        f"/events/{event_id}/holds", json=_hold("counted-twice"), headers=_from("203.0.113.9")
    )
    assert r.status_code == 201, r.text
    assert r.headers["ratelimit-policy"] == f"{ADDRESS_POLICY}, " + (f'"customer";q={LIMIT};w=60')
    assert re.fullmatch(r'"address";r=\d+;t=\d+, "customer";r=\d+;t=\d+', r.headers["ratelimit"]), (
        r.headers
    )


async def test_only_the_last_hop_a_trusted_proxy_added_is_believed(
    behind_proxy: httpx.AsyncClient,
) -> None:
    # What a client writes into X-Forwarded-For itself stands left of what the proxy adds.
    for n in range(PER_ADDRESS):
        r = await behind_proxy.get("/health", headers=_from(f"198.51.100.{n}, 192.0.2.1"))
        assert r.status_code == 200, r.text
    _assert_address_429(
        await behind_proxy.get("/health", headers=_from("198.51.100.99, 192.0.2.1"))
    )
    # A chain of trusted proxies: the first address that is not one of them.
    _assert_address_429(
        await behind_proxy.get("/health", headers=_from("198.51.100.1, 192.0.2.1, 10.9.3.4"))
    )
    # Not an address: nothing of the header is believed; the peer (the proxy) is counted.
    r = await behind_proxy.get("/health", headers=_from("192.0.2.1, garbage"))
    assert r.status_code == 200, r.text


async def test_without_trusted_proxies_the_header_is_ignored(direct: httpx.AsyncClient) -> None:
    for n in range(PER_ADDRESS):
        r = await direct.get("/health", headers=_from(f"198.51.100.{n}"))
        assert r.status_code == 200, r.text
    _assert_address_429(await direct.get("/health", headers=_from("198.51.100.200")))
    _assert_address_429(await direct.get("/health"))


async def test_admin_routes_have_their_own_limit(behind_proxy: httpx.AsyncClient) -> None:
    me = _from("203.0.113.50")
    for _ in range(PER_ADDRESS):
        assert (await behind_proxy.get("/health", headers=me)).status_code == 200
    _assert_address_429(await behind_proxy.get("/events", headers=me))
    # The public limit used up does not stop the admin routes, which count apart.
    for _ in range(PER_ADMIN):
        r = await behind_proxy.get("/admin/events/no-such-event/bookings", headers=ADMIN | me)
        assert r.status_code == 404, r.text
    r = await behind_proxy.get("/admin/events/no-such-event/bookings", headers=ADMIN | me)
    _assert_address_429(r, f'"admin";q={PER_ADMIN};w={WINDOW}')
    # And another address has both of its own.
    other = _from("203.0.113.51")
    r = await behind_proxy.get("/admin/events/no-such-event/bookings", headers=ADMIN | other)
    assert r.status_code == 404, r.text
    # Guessing the admin token is counted too (the limit comes before the guard's check).
    guesser = _from("203.0.113.52") | {"authorization": "Bearer guess"}
    for _ in range(PER_ADMIN):
        r = await behind_proxy.get("/admin/events/no-such-event/bookings", headers=guesser)
        assert r.status_code == 401, r.text
    r = await behind_proxy.get("/admin/events/no-such-event/bookings", headers=guesser)
    _assert_address_429(r, f'"admin";q={PER_ADMIN};w={WINDOW}')


# --- on a Redis Cluster ------------------------------------------------------------------


async def test_both_limits_on_a_cluster(cluster: LocalCluster, settings: Settings) -> None:
    """Customer limits in events on every primary; address limits, whose keys fall on
    whichever primary serves their slot."""
    csettings = on_redis(settings, cluster.url)
    env = {
        **server_env(csettings),
        "BOXOFFICE_RATE_LIMIT_CUSTOMER_HOLDS": str(LIMIT),
        "BOXOFFICE_RATE_LIMIT_ADDRESS": str(PER_ADDRESS),
        "BOXOFFICE_TRUSTED_PROXIES": "127.0.0.1",
    }
    server = ApiServer(env, workers=1)
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            for n, ids in enumerate(cluster.event_ids(1, "rl").values()):
                event_id = ids[0]
                me = _from(f"192.0.2.{n}")  # its own address: PER_ADDRESS requests each
                r = await c.post("/admin/events", json=event_body(event_id), headers=ADMIN)
                assert r.status_code == 201, r.text
                codes = []
                for i in range(LIMIT + 1):
                    who = _from(f"198.51.100.{10 * n + i}")
                    r = await c.post(f"/events/{event_id}/holds", json=_hold("one"), headers=who)
                    codes.append(r.status_code)
                assert codes == [201] * LIMIT + [429], codes
                _assert_429(r)
                for _ in range(PER_ADDRESS):
                    assert (await c.get("/health", headers=me)).status_code == 200
                _assert_address_429(await c.get("/health", headers=me))
    finally:
        server.stop()
