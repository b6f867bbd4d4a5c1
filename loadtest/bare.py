"""Bare granian: the ceilings of granian's two Python interfaces for the hold's shape, for
`make bench` (loadtest/bench.py).

    .venv/bin/python -m loadtest.bare --interface asgi|rsgi [--port 8001] [--workers 2]

No framework at all: `app` is a plain ASGI callable, `rsgi` an RSGI application
(`__rsgi__(scope, protocol)`, granian's docs/spec/RSGI.md). Each answers
`POST /events/{event_id}/holds` as the twin (loadtest/twin.py) does: the body decoded
strictly by msgspec (service.core.schemas.HoldCreate), a hold-sized document (a
service.core.schemas.Hold) encoded by msgspec, 201; no Redis, no I/O. The twin's cost on
top of the ASGI one is Litestar's; the ASGI one's on top of the RSGI one, the ASGI
messages'. Both are served as `boxoffice serve` serves the service (twin.serve()), only the
interface differs for RSGI.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from granian._granian import RSGIHTTPProtocol  # granian.rsgi's HTTPProtocol, typed here
from granian.rsgi import Scope

from service.core import schemas

decode = msgspec.json.Decoder(schemas.HoldCreate, strict=True).decode
_encode = msgspec.json.Encoder().encode
_PRICE = 2500
# Timestamps of the size and shape the service writes (milliseconds, `Z`).
_CREATED_AT = "2030-01-01T00:00:00.000Z"
_EXPIRES_AT = "2030-01-01T00:05:00.000Z"
_NOT_FOUND = (404, b'{"detail":"Not Found"}')


def answer(event_id: str, body: schemas.HoldCreate) -> schemas.Hold:
    """The hold-sized answer of the twin and of the bare apps."""
    count = sum(i.quantity for i in body.items) + len(body.seats)
    return schemas.Hold(
        hold_id=secrets.token_urlsafe(16),
        event_id=event_id,
        customer_id=body.customer_id,
        status="held",
        created_at=_CREATED_AT,
        expires_at=_EXPIRES_AT,
        items=body.items,
        seats=body.seats,
        total=count * _PRICE,
        currency="EUR",
    )


def respond(method: str, path: str, body: bytes) -> tuple[int, bytes]:
    """Status and JSON body for a request: the one route, or 404; 400 for a body the
    strict decoding refuses (the twin's answer is Litestar's 400)."""
    parts = path.split("/")
    if method != "POST" or len(parts) != 4 or parts[1] != "events" or parts[3] != "holds":
        return _NOT_FOUND
    try:
        hold = decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        return 400, _encode({"detail": str(e)})
    return 201, _encode(answer(parts[2], hold))


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The ASGI app. Lifespan answered as the service's is (granian runs it at start-up)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    # granian gives a body as a message with more_body, then an empty last one.
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    status, body = respond(scope["method"], scope["path"], b"".join(chunks))
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RSGIApp:
    """The RSGI app: the whole body awaited at once, the answer handed over in one call."""

    async def __rsgi__(self, scope: Scope, protocol: RSGIHTTPProtocol) -> None:
        status, body = respond(scope.method, scope.path, await protocol())
        protocol.response_bytes(status, [("content-type", "application/json")], body)


rsgi = RSGIApp()


def main() -> None:
    from granian.constants import Interfaces

    from loadtest.twin import serve

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--interface", choices=("asgi", "rsgi"), required=True)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.interface == "asgi":
        serve("loadtest.bare:app", args.port, args.workers)
    else:
        serve("loadtest.bare:rsgi", args.port, args.workers, Interfaces.RSGI)


if __name__ == "__main__":
    main()
