"""Rate limits: the headers of the IETF draft "RateLimit header fields for HTTP"
(draft-ietf-httpapi-ratelimit-headers-10), shared by every limit.

    RateLimit-Policy: "customer";q=20;w=60        the quota: q attempts per w seconds
    RateLimit: "customer";r=19;t=3                r left now; t seconds until the quota
                                                  is whole again (on a 429: until the
                                                  next attempt is allowed, = Retry-After)
"""

from __future__ import annotations

import math
import time
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import NamedTuple
from urllib.parse import urlsplit

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string
from litestar.types import Scope

from service import errors
from service.settings import Settings


class Quota(NamedTuple):
    """One limit's state as one answer saw it."""

    policy: str  # the policy's name: "customer", "address", "admin"
    quota: int  # attempts per window
    window: int  # seconds
    remaining: int
    reset: int  # seconds

    def headers(self) -> dict[str, str]:
        return {
            "ratelimit-policy": f'"{self.policy}";q={self.quota};w={self.window}',
            "ratelimit": f'"{self.policy}";r={self.remaining};t={self.reset}',
        }


def refusal_headers(policy: str, quota: int, window: int, retry_after: int) -> dict[str, str]:
    """The headers of a 429: Retry-After, and the same point in time as the reset."""
    return {
        "retry-after": str(retry_after),
        **Quota(policy, quota, window, 0, retry_after).headers(),
    }


def merge(*headers: dict[str, str]) -> dict[str, str]:
    """Several limits' headers as one: each field is a list, one item per policy."""
    out: dict[str, str] = {}
    for h in headers:
        for name, value in h.items():
            out[name] = f"{out[name]}, {value}" if name in out and name != "retry-after" else value
    return out


# --- per client address, before any route's work -------------------------------------


def parse_networks(text: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """BOXOFFICE_TRUSTED_PROXIES: addresses or networks, comma-separated."""
    return tuple(ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def client_address(scope: Scope, trusted: tuple[IPv4Network | IPv6Network, ...]) -> str:
    """Who is asking: the peer; or, when the peer is a trusted proxy, the address that
    proxy put last in X-Forwarded-For (and so on leftwards while that one is a trusted
    proxy too). Anything a client wrote further left is never believed."""
    client = scope.get("client")
    peer = client[0] if client else ""
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops: list[str] = []
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            hops += [h.strip() for h in value.decode("latin-1").split(",")]
    for hop in reversed(hops):
        if not _is_address(hop):
            return peer  # a proxy of ours would not write that: believe none of it
        if not _trusted(hop, trusted):
            return hop
        peer = hop
    return peer


def _is_address(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def _trusted(address: str, trusted: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def storage_uri(redis_url: str, cluster: bool, seed_nodes: str) -> str:
    """The `limits` storage URI for the service's own Redis (or cluster)."""
    parts = urlsplit(redis_url)
    if cluster:
        nodes = ",".join(n for n in (parts.netloc, *seed_nodes.split(",")) if n.strip())
        return f"async+redis+cluster://{nodes}"
    return f"async+{redis_url}"


class AddressLimits:
    """Requests per client address per window: the public routes share one limit, the
    admin routes (`/admin/…`) have another. Counted in Redis by `limits` (its sliding
    window counter: one Lua script call, atomic, so exact across API processes; a
    refused request is not counted; keys hash-tagged, so it runs on a cluster too)."""

    def __init__(self, settings: Settings, cluster: bool) -> None:
        self._trusted = parse_networks(settings.trusted_proxies)
        self._policies: dict[bool, tuple[str, RateLimitItem] | None] = {
            False: _item(
                "address", settings.rate_limit_address, settings.rate_limit_address_window_seconds
            ),
            True: _item(
                "admin", settings.rate_limit_admin, settings.rate_limit_admin_window_seconds
            ),
        }
        self.enabled = any(self._policies.values())
        self._storage: RedisStorage | None = None
        if self.enabled:
            uri = storage_uri(settings.redis_url, cluster, settings.redis_seed_nodes)
            storage = storage_from_string(uri, implementation="redispy", key_prefix="bo:rl")
            assert isinstance(storage, RedisStorage)  # the cluster's is a subclass
            self._storage = storage
        self._limiter = (
            SlidingWindowCounterRateLimiter(self._storage) if self._storage is not None else None
        )

    async def check(self, scope: Scope) -> None:
        """Count the request against its address's limit, or raise RateLimited."""
        path: str = scope["path"]
        policy = self._policies[path.startswith("/admin/") or path == "/admin"]
        if policy is None or self._limiter is None:
            return
        name, item = policy
        who = client_address(scope, self._trusted)
        if await self._limiter.hit(item, name, who):
            return
        stats = await self._limiter.get_window_stats(item, name, who)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        err = errors.RateLimited(
            f"at most {item.amount} requests per {item.get_expiry()} s from one address;"
            f" try again in {retry_after} s"
        )
        err.headers = refusal_headers(name, item.amount, item.get_expiry(), retry_after)
        raise err

    async def close(self) -> None:
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        if client is not None:
            await client.aclose()


def _item(name: str, amount: int, window: int) -> tuple[str, RateLimitItem] | None:
    if amount <= 0:
        return None
    return name, RateLimitItemPerSecond(amount, window)
