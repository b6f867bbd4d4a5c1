"""Idempotency-Key: fingerprints, and the once-only wrapper of the admin routes.

The hot routes (hold, confirm, release) check and record the key inside their own script,
in the same atomic step as the work. Admin routes are rare and touch PostgreSQL too, so
they use a record of their own: claimed before the work, filled with the response after.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import redis.exceptions
from litestar import Response

from service.core import errors
from service.core.keys import global_idempotency
from service.hotpath.context import Services
from service.hotpath.scripts import Idempotency

# How long a claimed key may stay unfinished before another request may take it over
# (a process that died mid-request must not block the key for a day).
CLAIM_SECONDS = 60

T = TypeVar("T")


def fingerprint(
    key: str, method: str, path: str, body: bytes, customer: str | None = None
) -> Idempotency:
    """`customer`: the token's (customer tokens on), whose key this is alone."""
    if not 1 <= len(key) <= 128 or not key.isascii() or not key.isprintable():
        raise errors.ValidationError("Idempotency-Key: 1 to 128 printable ASCII characters")
    request = hashlib.sha256(f"{method} {path}\n".encode() + canonical(body)).hexdigest()
    return Idempotency(hashlib.sha256(key.encode()).hexdigest(), request, customer)


def canonical(body: bytes) -> bytes:
    """The body as a JSON value: the same request whatever its key order and whitespace.
    A body that is not JSON is kept as it is (the route refuses it with 400 anyway)."""
    if not body:
        return body
    try:
        value = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return body
    # `{}` is the same request as no body at all (the confirm body is optional): as empty,
    # so that the fingerprints of requests without a body stay what they were.
    if value == {}:
        return b""
    try:
        return msgspec.json.encode(value, order="sorted")
    except msgspec.EncodeError:
        return body


class _Stored(msgspec.Struct):
    fingerprint: str
    status: int = 0  # 0: still in progress
    body: msgspec.Raw = msgspec.Raw(b"null")
    problem: bool = False


async def once(
    svc: Services,
    idem: Idempotency | None,
    status: int,
    work: Callable[[], Awaitable[T]],
) -> Response[T]:
    """Run `work` once per Idempotency-Key; a repeat gets the first response."""
    if idem is None:
        return _response(await work(), status)
    key = global_idempotency(idem.key_digest)
    claim = msgspec.json.encode(_Stored(idem.fingerprint))
    if not await svc.redis.set(key, claim, nx=True, ex=CLAIM_SECONDS):
        raw = await svc.redis.get(key)
        if raw is not None:
            return _replay(msgspec.json.decode(raw, type=_Stored), idem)
    try:
        result = await work()
    except BaseException as e:
        if _silence(e):
            # Redis did not answer: the work may have been done, and asking Redis to
            # forget the claim would wait for its silence once more. The claim expires
            # (CLAIM_SECONDS); until then a retry is told that the first is in progress.
            raise
        await _failed(svc, key, idem, e)
        raise
    await _store(svc, key, idem, status, msgspec.json.encode(result), False)
    return _response(result, status)


def _silence(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, redis.exceptions.TimeoutError):
            return True
        seen = seen.__cause__
    return False


async def _failed(svc: Services, key: str, idem: Idempotency, e: BaseException) -> None:
    """The work failed: a refusal is remembered as the answer; anything else leaves the
    key to a retry."""
    if isinstance(e, errors.BoxofficeError):
        if e.status >= 500:
            await svc.redis.delete(key)
            return
        await _store(svc, key, idem, e.status, msgspec.json.encode(e.problem()), True)
        return
    await svc.redis.delete(key)  # nothing was done: let a retry do it


def _response(result: T, status: int) -> Response[T]:
    # A route with nothing to say (202 replay) answers an empty body, not `null`.
    if result is None:
        return Response(b"", status_code=status)  # type: ignore[arg-type]
    return Response(result, status_code=status)


async def _store(
    svc: Services, key: str, idem: Idempotency, status: int, body: bytes, is_problem: bool
) -> None:
    record = _Stored(idem.fingerprint, status, msgspec.Raw(body), is_problem)
    await svc.redis.set(key, msgspec.json.encode(record), ex=svc.settings.idempotency_ttl_seconds)


def _replay(stored: _Stored, idem: Idempotency) -> Response[Any]:
    if stored.fingerprint != idem.fingerprint:
        raise errors.IdempotencyKeyReused("this Idempotency-Key was used with another request")
    if stored.status == 0:
        raise errors.IdempotencyInProgress("the first request with this key is still running")
    if bytes(stored.body) == b"null" and not stored.problem:
        return Response(b"", status_code=stored.status)
    return Response(
        stored.body,
        status_code=stored.status,
        media_type="application/problem+json" if stored.problem else "application/json",
    )
