"""The lean lane: the hot routes served without Litestar's routing and handler machinery.

A hold refused or made spends more CPU in Litestar (routing, the Request, before-request
hooks, argument extraction, the handler call) than in its own work (README "Benchmarks").
This dispatcher gets every HTTP request first (app.App, inside the metrics and
body-deadline middleware), recognises the hot routes' plain requests, and runs the
very functions the Litestar handlers run (service/web/routes/sales.py: `hold`, `read_hold`,
`confirm`, `release`; routes/queue.py: `join`, `poll`), with the same checks in the same
order as the app's door (service/web/door.py): per-address limit, customer token, then the
body. What it answers is what Litestar would.

Anything unusual goes to Litestar as it is: a query string, a path it would normalise, a
body not JSON, chunked, over the limit or not decodable (then with the messages already
read handed back): whatever Litestar answers there stays its answer. The per-address
limit counts a request once either way (the door skips a request the lane already counted).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import msgspec
from litestar import Litestar, Response
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

from service.core import errors, schemas
from service.core.settings import Settings
from service.hotpath import ratelimit
from service.hotpath.context import Services
from service.web import bodies, customers, door, problems, strictjson
from service.web.answers import Answer
from service.web.routes import queue, sales

# Path segments the lane takes: an event id as the API accepts it, and ids made of URL-safe
# characters (the ids the service gives out). Anything else is Litestar's to answer.
_EVENT = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_ID = re.compile(r"[A-Za-z0-9._~-]+")
_NO_CONTENT: list[tuple[bytes, bytes]] = []
CLIENT_GONE_BODY = b"null"


class Url(NamedTuple):
    path: str


class Call:
    """What the route functions read of a request (asking.Asking)."""

    __slots__ = ("_body", "app", "scope")

    def __init__(self, app: Litestar, scope: Any, body: bytes) -> None:
        self.app = app
        self.scope = scope
        self._body = body

    @property
    def svc(self) -> Services:
        svc: Services = self.app.state.svc
        return svc

    @property
    def method(self) -> str:
        method: str = self.scope["method"]
        return method

    @property
    def url(self) -> Url:
        # Litestar's request.url.path: root_path (the lane takes none) and path.
        return Url(self.scope["path"])

    async def body(self) -> bytes:
        return self._body


# A route: its template (for the metrics), its path parameters' names, whether it reads a
# body, and the route function that does its work (given the Call, the path parameters and
# the body).
Work = Callable[..., Awaitable[Response[Any] | None]]


class Route(NamedTuple):
    template: str
    names: tuple[str, ...]
    body: msgspec.json.Decoder[Any] | None  # None: a route without a body
    optional: bool  # the body may be left out (the confirm's)
    status: int  # of an answer without content
    work: Work


def _decoder(kind: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(kind, strict=True)


def routes(tokens: bool) -> Table:
    """By (method, number of segments, the segment that names the route)."""
    hold_body = schemas.CustomerHoldCreate if tokens else schemas.HoldCreate
    join_body = schemas.CustomerQueueJoin if tokens else schemas.QueueJoin
    ids = ("event_id", "hold_id")
    return {
        ("POST", 4, "holds"): Route(
            "/events/{event_id}/holds", ids[:1], _decoder(hold_body), False, 201, sales.hold
        ),
        ("GET", 5, "holds"): Route(
            "/events/{event_id}/holds/{hold_id}", ids, None, False, 200, sales.read_hold
        ),
        ("DELETE", 5, "holds"): Route(
            "/events/{event_id}/holds/{hold_id}", ids, None, False, 204, sales.release
        ),
        ("POST", 6, "holds"): Route(
            "/events/{event_id}/holds/{hold_id}/confirm",
            ids,
            _decoder(schemas.HoldConfirm | None),
            True,
            200,
            sales.confirm,
        ),
        ("POST", 4, "queue"): Route(
            "/events/{event_id}/queue", ids[:1], _decoder(join_body), False, 201, queue.join
        ),
        ("GET", 5, "queue"): Route(
            "/events/{event_id}/queue/{ticket}",
            ("event_id", "ticket"),
            None,
            False,
            200,
            queue.poll,
        ),
    }


Table = dict[tuple[str, int, str], Route]


def _match(table: Table, scope: Any) -> tuple[Route, list[str]] | None:
    """The lane's route of a plain request to a hot path, and its parameters; else None."""
    if scope.get("query_string") or scope.get("root_path"):
        return None
    parts = scope["path"].split("/")
    if len(parts) < 4 or parts[0] or parts[1] != "events":
        return None
    route = table.get((scope["method"], len(parts), parts[3]))
    if route is None or not _EVENT.fullmatch(parts[2]):
        return None
    if len(parts) == 6 and parts[5] != "confirm":
        return None
    params = [parts[2]]
    if len(parts) >= 5:
        if not _ID.fullmatch(parts[4]):
            return None
        params.append(parts[4])
    return route, params


def lane(app: Litestar, settings: Settings) -> Callable[[ASGIApp], ASGIApp]:
    """Wraps Litestar (its own __call__, app.App): the hot routes here, the rest there."""
    tokens = bool(settings.customer_token_secret)
    table = routes(tokens)
    verifier = customers.Verifier(settings.customer_token_secret) if tokens else None
    limit = settings.max_body_bytes
    # The per-address limits, once the app's start-up has made them (service/web/app.py).
    address_limits: list[ratelimit.AddressLimits | None] = []

    def wrap(litestar: ASGIApp) -> ASGIApp:
        async def handed_back(
            scope: Scope, read: list[ReceiveMessage], receive: Receive, send: Send
        ) -> None:
            """Litestar answers, the body's messages read so far given to it again."""

            async def again() -> ReceiveMessage:
                if read:
                    return read.pop(0)
                return await receive()

            await litestar(scope, again, send)

        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            found = _match(table, scope) if scope["type"] == ScopeType.HTTP else None
            if found is None:
                await litestar(scope, receive, send)
                return
            route, params = found
            content_type, length, chunked = door.body_head(scope)
            has_body = chunked or (length is not None and length != b"0")
            if (
                chunked
                or (has_body and route.body is None)
                or (route.body is not None and not has_body and not route.optional)
                or (content_type is not None and not door.json_media_type(content_type))
                or (length is not None and not (length.isdigit() and int(length) <= limit))
            ):
                await litestar(scope, receive, send)  # Litestar's answer (a 400, 413, 415)
                return
            state: Any = scope
            state["path_template"] = route.template
            state["path_params"] = (
                {route.names[0]: params[0]}
                if len(params) == 1
                else {route.names[0]: params[0], route.names[1]: params[1]}
            )
            call = Call(app, scope, b"")
            if not address_limits:
                address_limits.append(app.state.limits)
            limits = address_limits[0]
            raw_send = send  # for Litestar, should the lane hand the request on
            try:
                data = None
                raw = b""
                if has_body and route.body is not None:
                    # granian sends a body in a message with more_body, then an empty last one.
                    read: list[Any] = []
                    size, more = 0, True
                    while more and size <= limit:
                        message: Any = await receive()
                        read.append(message)
                        if message["type"] != "http.request":
                            break
                        size += len(message.get("body", b""))
                        more = message.get("more_body", False)
                    if more or size > limit:
                        await handed_back(scope, read, receive, raw_send)
                        return
                    raw = b"".join(m.get("body", b"") for m in read)
                # Counted before the token is checked (a flood of bad tokens meets the limit
                # too), and with the tickets a hold's body asks for (door.rate_limit's rule).
                if limits is not None and limits.enabled:
                    tickets = door.tickets_in(raw) if limits.counts_tickets(scope) else 1
                    await door.count_address(scope, limits, tickets)
                    send = door.sending_rate_headers(send, scope)
                if verifier is not None:
                    verifier.check(scope)
                if has_body and route.body is not None:
                    try:
                        data = route.body.decode(raw)
                        strictjson.check_body(raw, data)
                    except (msgspec.MsgspecError, UnicodeDecodeError, errors.ValidationError):
                        # Litestar's words for it (the body's messages handed back).
                        await handed_back(scope, read, receive, raw_send)
                        return
                    call._body = raw
                if route.body is None:
                    answer = await route.work(call, *params)
                else:
                    answer = await route.work(call, *params, data)
            except errors.BoxofficeError as e:
                answer = problems.problem(call, e)
            except bodies.ClientGone:
                await _send(send, problems.CLIENT_GONE, _CLIENT_GONE_HEADERS, CLIENT_GONE_BODY)
                return
            except Exception as e:
                answer = problems.on_crash(call, e)
            if answer is None:
                await _send(send, route.status, _NO_CONTENT, b"")
                return
            assert isinstance(answer, Answer)  # what the route functions make
            await answer(scope, receive, send)

        return serve

    return wrap


# What Litestar sends for on_client_gone's Response(None, status_code=499).
_CLIENT_GONE_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"4")]


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
