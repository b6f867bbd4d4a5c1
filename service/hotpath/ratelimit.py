"""Rate limits: the headers of the IETF draft "RateLimit header fields for HTTP"
(draft-ietf-httpapi-ratelimit-headers-10), shared by every limit.

    RateLimit-Policy: "customer";q=20;w=60        the quota: q attempts per w seconds
    RateLimit: "customer";r=19;t=3                r left now; t seconds until the quota
                                                  is whole again (on a 429: until the
                                                  next attempt is allowed, = Retry-After)
"""

from __future__ import annotations

import re
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import NamedTuple, Protocol

from litestar.types import Scope

from service.core import errors, keys
from service.core.settings import Settings


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
    async def call_keyed(
        self, name: str, key: str | tuple[str, ...], *args: str | bytes | int
    ) -> bytes: ...


class Policy(NamedTuple):
    name: str
    quota: int
    window: int


# The routes that take something scarce: a place in a waiting room, tickets.
_JOIN = re.compile(r"/events/[^/]+/queue")
_HOLD = re.compile(r"/events/[^/]+/holds")


class AddressLimits:
    """Per client address: requests on the public routes (one limit for all of them); of
    those, joins of a waiting room, and the tickets that holds ask for (a hold of n tickets
    counts n), each with a limit of its own beside it; the admin routes (`/admin/…`) apart.
    Counted by lua/rate.lua (the GCRA of the customer limit, lib.lua) through the hot
    path's own script pipe: one pipelined call per request, whatever limits apply, atomic,
    so exact across API processes; the keys of one address share a slot, so a cluster
    routes the call like any other."""

    def __init__(self, settings: Settings, scripts: KeyedScripts) -> None:
        self._scripts = scripts
        self._trusted = parse_networks(settings.trusted_proxies)
        window = settings.rate_limit_address_window_seconds
        public = _policy("address", settings.rate_limit_address, window)
        self._public = public
        # Apart from the public limit, never without it: 0 there turns every one off.
        self._joins = public and _policy("joins", settings.rate_limit_address_joins, window)
        self._tickets = public and _policy("tickets", settings.rate_limit_address_tickets, window)
        self._admin = _policy(
            "admin", settings.rate_limit_admin, settings.rate_limit_admin_window_seconds
        )
        self.enabled = bool(self._public or self._admin)

    def counts_tickets(self, scope: Scope) -> bool:
        """Whether check() wants the tickets this request asks for (a hold's)."""
        return bool(self._tickets) and scope.get("method") == "POST" and _is(_HOLD, scope)

    async def check(self, scope: Scope, tickets: int = 1) -> list[Quota]:
        """Count the request against its address's limits: what is left of each that
        applies; or raise RateLimited. `tickets`: what a hold asks for."""
        policies = self._policies(scope, tickets)
        if not policies:
            return []
        # No peer (a Unix socket): one address all the same, never an empty hash tag (which
        # Redis would not take for one: the keys would fall on several slots).
        who = client_address(scope, self._trusted) or "unknown"
        args: list[int] = []
        for policy, cost in policies:
            args += [policy.quota, policy.window * 1000, cost]
        reply = await self._scripts.call_keyed(
            "rate", tuple(keys.address_rate(p.name, who) for p, _ in policies), *args
        )
        parts = reply.split(b" ")
        if parts[0] == b"-":
            refused = policies[int(parts[2]) - 1][0]
            raise _refusal(refused, int(parts[1]))
        return [
            Quota(p.name, p.quota, p.window, int(parts[2 * i]), int(parts[2 * i + 1]))
            for i, (p, _) in enumerate(policies)
        ]

    def _policies(self, scope: Scope, tickets: int) -> list[tuple[Policy, int]]:
        path: str = scope["path"]
        if path == "/admin" or path.startswith("/admin/"):
            return [(self._admin, 1)] if self._admin else []
        if not self._public:
            return []
        found = [(self._public, 1)]
        if scope.get("method") == "POST":
            if self._joins and _is(_JOIN, scope):
                found.append((self._joins, 1))
            elif self._tickets and _is(_HOLD, scope):
                found.append((self._tickets, max(1, tickets)))
        return found


def _is(route: re.Pattern[str], scope: Scope) -> bool:
    return route.fullmatch(scope["path"]) is not None


_COUNTED = {
    "address": "requests",
    "joins": "joins of a waiting room",
    "tickets": "tickets asked for in holds",
    "admin": "admin requests",
}


def _refusal(policy: Policy, retry_after: int) -> errors.BoxofficeError:
    what = _COUNTED[policy.name]
    err = errors.RateLimited(
        f"at most {policy.quota} {what} per {policy.window} s from one address;"
        f" try again in {retry_after} s"
    )
    err.headers = refusal_headers(policy.name, policy.quota, policy.window, retry_after)
    return err


def _policy(name: str, quota: int, window: int) -> Policy | None:
    return Policy(name, quota, window) if quota > 0 else None
