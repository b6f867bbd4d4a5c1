"""Rate limits: the headers of the IETF draft "RateLimit header fields for HTTP"
(draft-ietf-httpapi-ratelimit-headers-10), shared by every limit.

    RateLimit-Policy: "customer";q=20;w=60        the quota: q attempts per w seconds
    RateLimit: "customer";r=19;t=3                r left now; t seconds until the quota
                                                  is whole again (on a 429: until the
                                                  next attempt is allowed, = Retry-After)
"""

from __future__ import annotations

from typing import NamedTuple


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
