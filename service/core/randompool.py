"""Random bytes for ids made per request (hold ids, booking ids, a join's place), from a pool
filled by one os.urandom call per 256 ids: each os.urandom is a getrandom() system call, and
secrets.token_urlsafe per hold was 5% of a hold's event-loop thread in a profile. The bytes
are the same OS randomness, each handed out once. A forked child empties its pool (granian
forks its workers): it never hands out ids its parent or a sibling also has."""

from __future__ import annotations

import binascii
import collections
import os

CHUNK = 16  # bytes per id: 128 bits
_FILL = 256  # chunks per os.urandom call
_URLSAFE = bytes.maketrans(b"+/", b"-_")

# Chunks not yet handed out. deque.popleft is atomic: two threads never get the same one,
# and two that refill at once only add more.
_chunks: collections.deque[bytes] = collections.deque()


def chunk() -> bytes:
    """16 random bytes, never handed out before in this process or its parent."""
    try:
        return _chunks.popleft()
    except IndexError:
        data = os.urandom(CHUNK * _FILL)
        _chunks.extend(data[i : i + CHUNK] for i in range(CHUNK, len(data), CHUNK))
        return data[:CHUNK]


def randbits(k: int) -> int:
    """As secrets.randbits(k), for k up to 128."""
    return int.from_bytes(chunk()) >> (CHUNK * 8 - k)


def token_urlsafe() -> str:
    """As secrets.token_urlsafe(16): 128 random bits in 22 URL-safe base64 characters."""
    return binascii.b2a_base64(chunk(), newline=False)[:22].translate(_URLSAFE).decode()


os.register_at_fork(after_in_child=_chunks.clear)
