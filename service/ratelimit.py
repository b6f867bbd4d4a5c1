"""Rate limits: the headers of the IETF draft "RateLimit header fields for HTTP"
(draft-ietf-httpapi-ratelimit-headers-10), shared by every limit.

    RateLimit-Policy: "customer";q=20;w=60        the quota: q attempts per w seconds
    RateLimit: "customer";r=19;t=3                r left now; t seconds until the quota
                                                  is whole again (on a 429: until the
                                                  next attempt is allowed, = Retry-After)
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import NamedTuple, Protocol

from litestar.types import Scope

from service import errors, keys
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


class KeyedScripts(Protocol):
    async def call_keyed(self, name: str, key: str, *args: str | bytes | int) -> bytes: ...


class AddressLimits:
    """Requests per client address per window: the public routes share one limit, the
    admin routes (`/admin/…`) have another. Counted by lua/rate.lua (the GCRA of the
    customer limit, lib.lua) through the hot path's own script pipe: one pipelined call
    per request, atomic, so exact across API processes; one key per address, so a
    cluster routes it like any other."""

    def __init__(self, settings: Settings, scripts: KeyedScripts) -> None:
        self._scripts = scripts
        self._trusted = parse_networks(settings.trusted_proxies)
        self._policies = {
            False: _policy(
                "address", settings.rate_limit_address, settings.rate_limit_address_window_seconds
            ),
            True: _policy(
                "admin", settings.rate_limit_admin, settings.rate_limit_admin_window_seconds
            ),
        }
        self.enabled = any(self._policies.values())

    async def check(self, scope: Scope) -> Quota | None:
        """Count the request against its address's limit: what is left of it (None: no
        limit applies); or raise RateLimited."""
        path: str = scope["path"]
        policy = self._policies[path == "/admin" or path.startswith("/admin/")]
        if policy is None:
            return None
        name, quota, window = policy
        who = client_address(scope, self._trusted)
        reply = await self._scripts.call_keyed(
            "rate", keys.address_rate(name, who), quota, window * 1000
        )
        left, _, reset = reply.partition(b" ")
        if left != b"-":
            return Quota(name, quota, window, int(left), int(reset))
        retry_after = int(reset)
        err = errors.RateLimited(
            f"at most {quota} requests per {window} s from one address;"
            f" try again in {retry_after} s"
        )
        err.headers = refusal_headers(name, quota, window, retry_after)
        raise err


def _policy(name: str, quota: int, window: int) -> tuple[str, int, int] | None:
    return (name, quota, window) if quota > 0 else None
