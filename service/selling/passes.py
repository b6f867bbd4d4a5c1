"""Admission passes of the waiting room: HMAC-signed, checked without a round trip.

A pass is `<expiry ms, hex>.<signature>`, the signature an HMAC-SHA256 (first 128 bits,
URL-safe base64) over the event id, the customer id and the expiry with the server's
secret (BOXOFFICE_PASS_SECRET). Checking one is a hash in the API process: no Redis call,
so it costs a hold nothing on a single node or a cluster, and a pass cannot be forged,
moved to another event or customer, or stretched, without the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from service.core.settings import Settings

# A process without a configured secret (a test's app, a bare `create_app`) signs with one
# of its own; `boxoffice serve` sets one for all its processes before they start.
_PROCESS_SECRET = secrets.token_bytes(32)
_MAX_LENGTH = 64


def secret_of(settings: Settings) -> bytes:
    return settings.pass_secret.encode() if settings.pass_secret else _PROCESS_SECRET


def _signature(secret: bytes, event_id: str, customer_id: str, expires_ms: int) -> str:
    # Lengths first: no two (event, customer) pairs sign the same bytes.
    message = f"{len(event_id)}:{event_id}{len(customer_id)}:{customer_id}{expires_ms}"
    digest = hmac.new(secret, message.encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def issue(secret: bytes, event_id: str, customer_id: str, expires_ms: int) -> str:
    return f"{expires_ms:x}.{_signature(secret, event_id, customer_id, expires_ms)}"


def valid(secret: bytes, token: str, event_id: str, customer_id: str, now_ms: int) -> bool:
    """Whether `token` is a pass for this event and customer that has not expired."""
    if len(token) > _MAX_LENGTH:
        return False
    expiry, _, signature = token.partition(".")
    if not (0 < len(expiry) <= 12) or any(c not in "0123456789abcdef" for c in expiry):
        return False
    expires_ms = int(expiry, 16)
    expected = _signature(secret, event_id, customer_id, expires_ms)
    # compare_digest: the time taken does not tell how much of the signature was right.
    return hmac.compare_digest(signature.encode(), expected.encode()) and now_ms < expires_ms
