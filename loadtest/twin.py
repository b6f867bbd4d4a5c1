"""The "twin": the HTTP ceiling for the hold's shape, for `make bench` (loadtest/bench.py).

    .venv/bin/python -m loadtest.twin [--port 8001] [--workers 2]

A bare Litestar app with one route, `POST /events/{event_id}/holds`, that decodes the
hold's request body strictly with msgspec (service.core.schemas.HoldCreate) and answers a
hold-sized document (a service.core.schemas.Hold, 201): no Redis, no I/O, no middleware, no
OpenAPI. What the service's hold costs on top of this is Redis, validation and whatever
else it does per request.

`serve()` runs an app exactly as `boxoffice serve` runs the service (service/cli.py): the
same Granian call, options and worker count, only the application swapped. The PostgreSQL
baseline (loadtest/pg_baseline.py) is served the same way.
"""

from __future__ import annotations

import argparse
import secrets
from typing import Any

import msgspec
from litestar import Litestar, Request, post
from litestar.exceptions import ValidationException

from service.core import schemas

_decode = msgspec.json.Decoder(schemas.HoldCreate, strict=True).decode
_PRICE = 2500
# Timestamps of the size and shape the service writes (milliseconds, `Z`).
_CREATED_AT = "2030-01-01T00:00:00.000Z"
_EXPIRES_AT = "2030-01-01T00:05:00.000Z"


@post("/events/{event_id:str}/holds", status_code=201)
async def create_hold(request: Request[Any, Any, Any], event_id: str) -> schemas.Hold:
    try:
        body = _decode(await request.body())
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ValidationException(str(e)) from e
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


app = Litestar(route_handlers=[create_hold], openapi_config=None)


def serve(target: str, port: int, workers: int) -> None:
    """Serve the ASGI app `target` ("module:attribute") on 127.0.0.1:`port` the way
    `boxoffice serve` serves the service: service.cli.serve() runs with granian's Granian
    replaced by a wrapper that swaps in `target`, so every option the service's server
    gets, this one gets too (loadtest/bench.py checks that the app answering is `target`)."""
    import granian
    import msgspec.structs

    from service import cli
    from service.core.settings import Settings

    real = granian.Granian

    def same_server(*args: Any, **kwargs: Any) -> Any:
        if args:
            args = (target, *args[1:])
        else:
            kwargs["target"] = target
        kwargs["factory"] = False
        return real(*args, **kwargs)

    setattr(granian, "Granian", same_server)  # noqa: B010  (cli imports it when serving)
    if hasattr(cli, "Granian"):  # in case cli.py ever imports it at module level
        setattr(cli, "Granian", same_server)  # noqa: B010
    # cli serves with service.server.Server (granian's MPServer, imported when serving).
    from service import server

    real_mp = server.Server

    def same_mp_server(*args: Any, **kwargs: Any) -> Any:
        if args:
            args = (target, *args[1:])
        else:
            kwargs["target"] = target
        kwargs["factory"] = False
        return real_mp(*args, **kwargs)

    setattr(server, "Server", same_mp_server)  # noqa: B010
    settings = msgspec.structs.replace(
        Settings.from_env(), host="127.0.0.1", port=port, workers=workers
    )
    cli.serve(settings, argparse.Namespace())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    serve("loadtest.twin:app", args.port, args.workers)


if __name__ == "__main__":
    main()
