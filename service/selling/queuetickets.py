"""Queue tickets of the waiting room: signed by the API, read without a round trip.

A ticket is `<generation>.<place>.<customer>.<signature>`: the room's generation (a new
room, after the room was turned off and on again, has another; one that Redis lost comes
back as another that takes the earlier tickets back), the ticket's place in the
order (`p<k>`: the pre-queue's random k, its score k / 2^52; `a<n>`: the n-th arrival after
the opening; both hex), the customer id (URL-safe base64) and an HMAC-SHA256 (first 128
bits, URL-safe base64) over the event id and all of these with BOXOFFICE_PASS_SECRET, as
the pass is signed (service/selling/passes.py; another domain, so that neither passes for the
other). With the room's state (service/selling/roomstate.py) any API process answers a poll from
it alone, and a forged or tampered ticket, or another event's, is refused without asking
Redis. The same customer joining again gets the same place, so the same ticket.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Literal, NamedTuple

# A customer id is at most 128 characters: 512 bytes of UTF-8, 683 of base64, plus the rest.
MAX_LENGTH = 760
_HEX = frozenset("0123456789abcdef")
_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class Ticket(NamedTuple):
    generation: int
    kind: Literal["p", "a"]  # pre-queue or arrival
    number: int  # the pre-queue's k, or the arrival number
    customer: str

    @property
    def place(self) -> str:
        """As the room's leave log names it (lua/queue_leave.lua): "p<k>" or "a<n>",
        decimal."""
        return f"{self.kind}{self.number}"

    @property
    def score(self) -> float:
        """Its score in the order: k / 2^52 (exact), or 1 + n."""
        return self.number / 2**52 if self.kind == "p" else 1.0 + self.number


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signature(secret: bytes, event_id: str, body: str) -> str:
    # Lengths first: no two (event, body) pairs sign the same bytes; "t" keeps a ticket
    # from ever being a pass's message.
    message = f"t{len(event_id)}:{event_id}{len(body)}:{body}"
    # hmac.digest: OpenSSL's one-shot HMAC, the same bytes as hmac.new(...).digest() without
    # building an HMAC object (two hash copies): a fifth of a join's own CPU was this.
    return _b64(hmac.digest(secret, message.encode(), "sha256")[:16])


def issue(secret: bytes, event_id: str, t: Ticket) -> str:
    body = f"{t.generation:x}.{t.kind}{t.number:x}.{_b64(t.customer.encode())}"
    return f"{body}.{_signature(secret, event_id, body)}"


def _hex(text: str, most: int) -> int | None:
    if not (0 < len(text) <= most) or not _HEX.issuperset(text):
        return None
    return int(text, 16)


def read(secret: bytes, event_id: str, token: str) -> Ticket | None:
    """The ticket `token` stands for in this event, or None: not one this service signed
    for this event (forged, tampered, cut, another event's)."""
    if len(token) > MAX_LENGTH:
        return None
    parts = token.split(".")
    if len(parts) != 4:
        return None
    generation, place, customer, signature = parts
    body = token[: len(token) - len(signature) - 1]
    # compare_digest: the time taken does not tell how much of the signature was right.
    if not hmac.compare_digest(signature.encode(), _signature(secret, event_id, body).encode()):
        return None
    # Signed by us, so well formed; checked all the same, a secret may leak.
    gen, number = _hex(generation, 16), _hex(place[1:], 16)
    kind = place[:1]
    if gen is None or number is None or kind not in ("p", "a") or not _B64.issuperset(customer):
        return None
    try:
        who = base64.urlsafe_b64decode(customer + "=" * (-len(customer) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return Ticket(gen, "p" if kind == "p" else "a", number, who)
