"""What a route reads of a request: the process's Services, the event id, a header, the
Idempotency-Key. For the Litestar handlers (service/web/routes/) and the lean lane
(service/web/lane.py) alike."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol, TypeVar

from litestar import Response
from litestar.params import Parameter

from service.core import errors
from service.hotpath.context import Services
from service.hotpath.scripts import Idempotency
from service.selling import idempotency
from service.web import bodies, customers

T = TypeVar("T")

_EVENT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")

EventIdParam = Annotated[
    str, Parameter(description="Event id, `^[a-z0-9][a-z0-9-]{0,63}$`; any other is 404.")
]


class Scoped(Protocol):
    """Any request: Litestar's, or the lean lane's (service/web/lane.py)."""

    @property
    def scope(self) -> Any: ...


class Asking(Scoped, Protocol):
    """What the hot routes' code reads of a request: Litestar's Request (Asked), or the
    lean lane's, which serves those routes without Litestar."""

    @property
    def method(self) -> str: ...
    @property
    def url(self) -> Any: ...
    @property
    def svc(self) -> Services: ...
    async def body(self) -> bytes: ...


class Asked(bodies.Request):
    """The app's Request (its request_class): bodies.Request, and the Services that the
    app's lifespan opened (service/web/app.py) as `request.svc`. Not a Litestar dependency:
    resolving one costs a route served by Litestar about 8 us of its 50-100 (measured with
    loadtest/bench_app.py: sold_out, read, poll through Litestar)."""

    __slots__ = ()

    @property
    def svc(self) -> Services:
        svc: Services = self.app.state.svc
        return svc


def event(event_id: str) -> str:
    # A malformed id names no event: 404, and it never reaches a Redis key.
    if not _EVENT_ID.fullmatch(event_id):
        raise errors.EventNotFound(f"no event {event_id!r}")
    return event_id


def known(svc: Services, event_id: str) -> str:
    """event(), and 404 at once, without a Redis call, for an id that no event has: the
    public routes, which a flood of made-up ids may hit (service/hotpath/eventids.py)."""
    if svc.event_ids.surely_unknown(event(event_id)):
        raise errors.EventNotFound(f"no event {event_id!r}")
    return event_id


def header(request: Scoped, name: bytes) -> str | None:
    """A request header of the hot routes, found without Litestar's Headers (built per
    request, a twentieth of a hold's CPU). These headers are documented by
    service/web/openapi.py `document`."""
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def idempotency_of(request: Asking) -> Idempotency | None:
    key = header(request, b"idempotency-key")
    if key is None:
        return None
    return idempotency.fingerprint(
        key, request.method, request.url.path, await request.body(), customers.of(request)
    )


async def once(request: Asking, status: int, work: Callable[[], Awaitable[T]]) -> Response[T]:
    """The admin routes' writes: `work` once per Idempotency-Key (selling/idempotency)."""
    return await idempotency.once(request.svc, await idempotency_of(request), status, work)
