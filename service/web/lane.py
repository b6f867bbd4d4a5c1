"""The lean lane: the hot routes served without Litestar's routing and handler machinery.

A hold refused or made spends more CPU in Litestar (routing, the Request, before-request
hooks, argument extraction, the handler call) than in its own work (README "Benchmarks").
This dispatcher gets every HTTP request first (on ASGI: app.App, inside the metrics and
body-deadline middleware; on RSGI: service/web/rsgi.py, straight from the protocol, with
the same deadline and metrics), recognises the hot routes' plain requests, and runs the
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
from service.web.rsgiscope import text_pairs

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


class HandBack:
    """What Lane.answer() gives for a body that Litestar must answer (its words for it)."""


HAND_BACK = HandBack()


class Lane:
    """The hot routes of one app: recognised (accept), then answered once their body is
    read (answer). Served on ASGI by asgi() (in front of Litestar), and on RSGI straight
    from the protocol (service/web/rsgi.py)."""

    def __init__(self, app: Litestar, settings: Settings) -> None:
        tokens = bool(settings.customer_token_secret)
        self.app = app
        self.table = routes(tokens)
        self.verifier = customers.Verifier(settings.customer_token_secret) if tokens else None
        self.limit = settings.max_body_bytes
        # The per-address limits, once the app's start-up has made them (service/web/app.py).
        self.limits: ratelimit.AddressLimits | None = None
        self.limits_known = False

    def accept(self, scope: Any) -> tuple[Route, list[str], bool] | None:
        """The route of a request the lane takes, its path parameters and whether it has a
        body (the route's template and parameters put in the scope, for the metrics);
        None for a request that Litestar answers as it is (a 400, 413, 415, or no lane
        route at all)."""
        found = _match(self.table, scope)
        if found is None:
            return None
        route, params = found
        content_type, length, chunked = door.body_head(scope)
        has_body = chunked or (length is not None and length != b"0")
        if (
            chunked
            or (has_body and route.body is None)
            or (route.body is not None and not has_body and not route.optional)
            or (content_type is not None and not door.json_media_type(content_type))
            or (length is not None and not (length.isdigit() and int(length) <= self.limit))
        ):
            return None
        scope["path_template"] = route.template
        scope["path_params"] = (
            {route.names[0]: params[0]}
            if len(params) == 1
            else {route.names[0]: params[0], route.names[1]: params[1]}
        )
        return route, params, has_body

    async def answer(
        self, route: Route, params: list[str], scope: Any, raw: bytes | None
    ) -> Answer[Any] | HandBack | None:
        """The answer of an accepted request whose body (None: it has none) is read, in the
        door's order: the per-address limit, the customer token, the body, the route's
        work. None: the route's answer without content."""
        call = Call(self.app, scope, b"")
        try:
            # Counted before the token is checked (a flood of bad tokens meets the limit
            # too), and with the tickets a hold's body asks for (door.rate_limit's rule).
            if not self.limits_known:
                self.limits, self.limits_known = self.app.state.limits, True
            limits = self.limits
            if limits is not None and limits.enabled:
                tickets = (
                    door.tickets_in(raw) if raw is not None and limits.counts_tickets(scope) else 1
                )
                await door.count_address(scope, limits, tickets)
            if self.verifier is not None:
                self.verifier.check(scope)
            if route.body is None:
                answer = await route.work(call, *params)
            else:
                data = None
                if raw is not None:
                    try:
                        data = route.body.decode(raw)
                        strictjson.check_body(raw, data)
                    except (msgspec.MsgspecError, UnicodeDecodeError, errors.ValidationError):
                        return HAND_BACK
                    call._body = raw
                answer = await route.work(call, *params, data)
        except errors.BoxofficeError as e:
            answer = problems.problem(call, e)
        except Exception as e:
            answer = problems.on_crash(call, e)
        if answer is not None:
            assert isinstance(answer, Answer)  # what the route functions make
        return answer

    def asgi(self, litestar: ASGIApp) -> ASGIApp:
        """The lane on ASGI, in front of Litestar (its own __call__, app.App)."""

        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            found = self.accept(scope) if scope["type"] == ScopeType.HTTP else None
            if found is None:
                await litestar(scope, receive, send)
                return
            route, params, has_body = found
            read: list[Any] = []
            raw = None
            if has_body:
                try:
                    raw = await _read(receive, read, self.limit)
                except errors.BoxofficeError as e:  # a 408 (bodies.guard)
                    await _send_answer(
                        send, scope, problems.problem(Call(self.app, scope, b""), e), 0
                    )
                    return
                except bodies.ClientGone:
                    await _send(send, problems.CLIENT_GONE, CLIENT_GONE_HEADERS, CLIENT_GONE_BODY)
                    return
                if raw is None:  # over the limit after all
                    await _handed_back(litestar, scope, read, receive, send)
                    return
            answer = await self.answer(route, params, scope, raw)
            if isinstance(answer, HandBack):
                await _handed_back(litestar, scope, read, receive, send)
                return
            await _send_answer(send, scope, answer, route.status)

        return serve


async def _read(receive: Receive, read: list[Any], limit: int) -> bytes | None:
    """A body from its ASGI messages (kept in `read`, to be handed back); None when it is
    over `limit` or not all came. granian sends a body in a message with more_body, then
    an empty last one."""
    size, more = 0, True
    while more and size <= limit:
        message: Any = await receive()
        read.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    if more or size > limit:
        return None
    return b"".join(m.get("body", b"") for m in read)


async def _handed_back(
    litestar: ASGIApp, scope: Scope, read: list[ReceiveMessage], receive: Receive, send: Send
) -> None:
    """Litestar answers, the body's messages read so far given to it again."""

    async def again() -> ReceiveMessage:
        if read:
            return read.pop(0)
        return await receive()

    await litestar(scope, again, send)


def head(scope: Any, answer: Answer[Any] | None, status: int) -> tuple[int, list[Any], bytes]:
    """Status, headers and body of a lane answer (None: the route's `status`, no
    content), the per-address limit's headers added."""
    if answer is None:
        status, headers, body = status, _NO_CONTENT, b""
    else:
        status, headers, body = answer.status_code or 200, answer.raw_headers, answer.body
    if door.rate_headers_of(scope):
        start: Any = {"type": "http.response.start", "headers": list(headers)}
        door.put_rate_headers(start, scope)
        headers = start["headers"]
    return status, headers, body


def text_head(
    scope: Any, answer: Answer[Any] | None, status: int
) -> tuple[int, list[tuple[str, str]], bytes]:
    """head(), the headers as text (for RSGI): made as text when there are no rate
    limit headers to merge (most answers: a text round trip less)."""
    if door.rate_headers_of(scope):
        status, headers, body = head(scope, answer, status)
        return status, text_pairs(headers), body
    if answer is None:
        return status, [], b""
    return answer.status_code or 200, answer.text_headers(), answer.body


async def _send_answer(send: Send, scope: Any, answer: Answer[Any] | None, status: int) -> None:
    await _send(send, *head(scope, answer, status))


# What Litestar sends for on_client_gone's Response(None, status_code=499).
CLIENT_GONE_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"4")]


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
