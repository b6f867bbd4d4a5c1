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
from typing import Any

import msgspec
from granian.constants import Interfaces
from litestar import Litestar, Request, post
from litestar.exceptions import ValidationException
from litestar.params import FromPath

from loadtest.bare import answer, decode
from service.core import schemas


@post("/events/{event_id:str}/holds", status_code=201)
async def create_hold(request: Request[Any, Any, Any], event_id: FromPath[str]) -> schemas.Hold:
    try:
        body = decode(await request.body())
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ValidationException(str(e)) from e
    return answer(event_id, body)


app = Litestar(route_handlers=[create_hold], openapi_config=None)


def serve(target: str, port: int, workers: int, interface: Interfaces | None = None) -> None:
    """Serve the ASGI app `target` ("module:attribute") on 127.0.0.1:`port` the way
    `boxoffice serve` serves the service: service.cli.serve() runs with granian's Granian
    replaced by a wrapper that swaps in `target`, so every option the service's server
    gets, this one gets too (loadtest/bench.py checks that the app answering is `target`).
    `interface`: another of granian's (RSGI, for loadtest/bare.py), the options the same."""
    import granian
    import msgspec.structs

    from service import cli
    from service.core.settings import Settings

    real = granian.Granian

    def swapped(kwargs: dict[str, Any]) -> dict[str, Any]:
        # ASGI unless told: `boxoffice serve` picks the service's own (BOXOFFICE_INTERFACE).
        return {**kwargs, "factory": False, "interface": interface or Interfaces.ASGI}

    def same_server(*args: Any, **kwargs: Any) -> Any:
        if args:
            args = (target, *args[1:])
        else:
            kwargs["target"] = target
        return real(*args, **swapped(kwargs))

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
        return real_mp(*args, **swapped(kwargs))

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
