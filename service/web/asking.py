"""What a route reads of a request: the services, the event id, a header, the
Idempotency-Key. For the Litestar handlers (service/web/routes/) and the lean lane
(service/web/lane.py) alike."""

from __future__ import annotations

import re
from typing import Annotated, Any, Protocol

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import Parameter, SkipValidation

from service.core import errors
from service.hotpath.context import Services
from service.hotpath.scripts import Idempotency
from service.selling import idempotency
from service.web import customers

_EVENT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")

EventIdParam = Annotated[
    str, Parameter(description="Event id, `^[a-z0-9][a-z0-9-]{0,63}$`; any other is 404.")
]


class Asking(Protocol):
    """What the hot routes' code reads of a request: Litestar's Request, or the lean
    lane's (service/web/lane.py), which serves those routes without Litestar."""

    @property
    def scope(self) -> Any: ...
    @property
    def app(self) -> Litestar: ...
    @property
    def method(self) -> str: ...
    @property
    def url(self) -> Any: ...
    async def body(self) -> bytes: ...


def _services(state: State) -> Services:
    svc: Services = state.svc  # opened by the app's lifespan (service/web/app.py)
    return svc


# The app's one dependency: a handler's `svc: Svc` is the process's Services (taken as it
# is: the signature model cannot convert it, and need not).
SERVICES = {"svc": Provide(_services, sync_to_thread=False)}
Svc = NamedDependency[SkipValidation[Services]]


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


def header(request: Asking, name: bytes) -> str | None:
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
