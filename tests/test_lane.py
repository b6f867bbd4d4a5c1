"""The lean lane (service/web/lane.py) answers what Litestar answers.

Two apps of the same settings run in this process, one with the lane and one without it
(`create_app(settings, lean=False)`: every route through Litestar). Each scenario's
requests go to both, each app on an event of its own; the answers must agree byte for
byte: status, every header in order, body; ids the service makes (holds, bookings,
tickets, passes), the event's own id and times are put in place of their values first,
the same way on both sides.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import jwt
import msgspec
import pytest

from service.core.settings import Settings
from service.selling import passes
from service.web.app import create_app
from tests.conftest import ADMIN_TOKEN

Head = list[tuple[bytes, bytes]]
Answer = tuple[int, Head, bytes]


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[None]:
    """The app's lifespan: started before, shut down after."""
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    outbox: asyncio.Queue[Any] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.get_running_loop().create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    started = await outbox.get()
    assert started["type"] == "lifespan.startup.complete", started
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


class Client:
    """ASGI requests as granian makes them: a body in one message (or in `parts`), then
    an empty last message."""

    def __init__(self, app: Any, address: str) -> None:
        self.app = app
        self.address = address

    async def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        parts: int = 1,
        query: bytes = b"",
    ) -> Answer:
        head: Head = [(b"host", b"test")]
        if body is not None:
            head += [(b"content-type", b"application/json")]
            head += [(b"content-length", b"%d" % len(body))]
        head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        raw = body or b""
        step = max(1, -(-len(raw) // parts))
        # As granian sends a body: its parts, each with more_body, then an empty last one.
        chunks = [raw[i : i + step] for i in range(0, len(raw), step)] + [b""]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": head,
            "client": (self.address, 50000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }

        async def receive() -> Any:
            if chunks:
                chunk = chunks.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
            await asyncio.Event().wait()

        status = 0
        sent: Head = []
        out = b""

        async def send(message: Any) -> None:
            nonlocal status, sent, out
            if message["type"] == "http.response.start":
                status, sent = message["status"], list(message["headers"])
            else:
                out += message.get("body", b"")

        await self.app(scope, receive, send)
        return status, sent, out


Scenario = Callable[[Client, str, str], Awaitable[list[Answer]]]

_TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
_DRIFT = re.compile(rb'("poll_after_seconds":|"position":|"ahead":)\d+')


def normalized(
    answers: list[tuple[Any, Head, bytes]],
    event_id: str,
    tag: str,
    drift: re.Pattern[bytes] = _DRIFT,
) -> list[Any]:
    """The answers with what differs by design between the two sides put in place: the
    event id, the scenario's own tag, ids the service made, times, and the figures `drift`
    finds (its group kept, the number after it not)."""
    made: dict[bytes, bytes] = {}
    for _, _head, body in answers:
        if body.startswith(b"{"):
            doc = json.loads(body)
            for name in ("hold_id", "booking_id", "ticket", "pass"):
                value = doc.get(name)
                if isinstance(value, str) and value.encode() not in made:
                    made[value.encode()] = b"<%s-%d>" % (name.encode(), len(made))

    def clean(value: bytes) -> bytes:
        for found, placeholder in made.items():
            value = value.replace(found, placeholder)
        value = value.replace(event_id.encode(), b"<event>").replace(tag.encode(), b"<tag>")
        return drift.sub(rb"\1<n>", _TIME.sub(b"<time>", value))

    out = []
    for status, head, body in answers:
        lengths = [(k, b"<len>" if k == b"content-length" else clean(v)) for k, v in head]
        out.append((status, lengths, clean(body)))
    return out


ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


async def make_event(c: Client, event_id: str, **extra: Any) -> None:
    body = {
        "id": event_id,
        "name": "lane",
        "starts_at": "2030-01-01T00:00:00Z",
        "hold_ttl_seconds": 600,
        "max_per_order": 4,
        "categories": [{"name": "GA", "price": 2500, "currency": "EUR", "capacity": 3}],
        **extra,
    }
    status, _, answer = await c.send("POST", "/admin/events", json.dumps(body).encode(), ADMIN)
    assert status == 201, answer


def hold_body(customer: str, quantity: int = 1, **extra: Any) -> bytes:
    items = [{"category": "GA", "quantity": quantity}]
    return json.dumps({"customer_id": customer, "items": items, **extra}).encode()


async def sales(c: Client, e: str, tag: str) -> list[Answer]:
    """Holds made, refused, read, confirmed, released; idempotency; bodies refused."""
    out = []
    holds = f"/events/{e}/holds"
    key = {"idempotency-key": f"{tag}-k1"}
    out.append(await c.send("POST", holds, hold_body(f"{tag}-a"), key))
    out.append(await c.send("POST", holds, hold_body(f"{tag}-a"), key))  # replayed
    out.append(await c.send("POST", holds, hold_body(f"{tag}-b"), key))  # key reused
    out.append(await c.send("POST", holds, hold_body(f"{tag}-a"), {"idempotency-key": ""}))
    first = json.loads(out[0][2])["hold_id"]
    out.append(await c.send("GET", f"{holds}/{first}"))
    out.append(await c.send("GET", f"{holds}/nope"))
    out.append(await c.send("GET", f"{holds}/{first}", query=b"x=1"))
    out.append(await c.send("POST", holds, hold_body(f"{tag}-a", 2), {"boxoffice-pass": "x"}))
    out.append(await c.send("POST", holds, hold_body(f"{tag}-a")))  # sold out
    out.append(await c.send("POST", holds, hold_body(f"{tag}-a", 5)))  # over max_per_order
    out.append(await c.send("POST", holds, hold_body(f"{tag}-a", 0)))
    out.append(await c.send("POST", holds, b'{"customer_id":"x","items":[{"category":"VIP",'))
    out.append(await c.send("POST", holds, b'{"customer_id":"x","items":[]}'))
    out.append(await c.send("POST", holds, b'{"customer_id":"\\u0000","items":[]}'))
    out.append(await c.send("POST", holds, b"\xff\xfe"))
    out.append(await c.send("POST", holds, b""))
    out.append(await c.send("POST", holds, hold_body(f"{tag}-a"), parts=3))
    out.append(await c.send("POST", holds, b" " * (64 * 1024 + 1)))
    out.append(await c.send("POST", holds, hold_body("x"), {"content-type": "text/plain"}))
    out.append(await c.send("POST", f"/events/{e}-gone/holds", hold_body("x")))
    out.append(await c.send("POST", "/events/Not_An_Id/holds", hold_body("x")))
    out.append(await c.send("PUT", holds, hold_body("x")))
    # Confirm: with a body, without one, again, and a hold released then confirmed.
    held = [json.loads(a[2])["hold_id"] for a in out if a[0] == 201]
    assert len(held) == 3, [a[:1] + a[2:] for a in out]
    confirm = f"{holds}/{held[0]}/confirm"
    out.append(await c.send("POST", confirm, b'{"payment_ref":"pi_1"}', key))
    out.append(await c.send("POST", confirm, b'{"payment_ref":"pi_1"}', key))
    out.append(await c.send("POST", confirm))
    out.append(await c.send("POST", f"{holds}/{held[1]}/confirm", b'{"payment_ref":7}'))
    out.append(await c.send("POST", f"{holds}/{held[1]}/confirm", b"null"))
    out.append(await c.send("DELETE", f"{holds}/{held[2]}", None, {"idempotency-key": "r"}))
    out.append(await c.send("DELETE", f"{holds}/{held[2]}"))
    out.append(await c.send("POST", f"{holds}/{held[2]}/confirm", b"{}"))
    out.append(await c.send("DELETE", f"{holds}/{held[0]}"))
    out.append(await c.send("DELETE", f"{holds}/nope", b"{}"))
    out.append(await c.send("GET", f"{holds}/{held[0]}"))
    out.append(await c.send("GET", f"{holds}/{held[2]}/"))
    return out


async def room(c: Client, e: str, tag: str) -> list[Answer]:
    """The waiting room: join, join again, poll; a hold without a pass, with a forged one
    and with a valid one."""
    out = []
    queue = f"/events/{e}/queue"
    body = json.dumps({"customer_id": f"{tag}-a"}).encode()
    out.append(await c.send("POST", queue, body))
    out.append(await c.send("POST", queue, body, {"idempotency-key": f"{tag}-j"}))
    ticket = json.loads(out[0][2])["ticket"]
    out.append(await c.send("GET", f"{queue}/{ticket}"))
    out.append(await c.send("GET", f"{queue}/nope"))
    out.append(await c.send("GET", f"{queue}/{'x' * 300}"))
    out.append(await c.send("POST", queue, b'{"customer":"x"}'))
    out.append(await c.send("POST", f"/events/{e}-gone/queue", body))
    holds = f"/events/{e}/holds"
    out.append(await c.send("POST", holds, hold_body(f"{tag}-a")))
    out.append(await c.send("POST", holds, hold_body(f"{tag}-a"), {"boxoffice-pass": "forged"}))
    secret = passes.secret_of(c.app.state.svc.settings)
    good = passes.issue(secret, e, f"{tag}-a", int(time.time() * 1000) + 60_000)
    out.append(await c.send("POST", holds, hold_body(f"{tag}-a"), {"boxoffice-pass": good}))
    return out


async def no_room(c: Client, e: str, tag: str) -> list[Answer]:
    body = json.dumps({"customer_id": f"{tag}-a"}).encode()
    return [
        await c.send("POST", f"/events/{e}/queue", body),
        await c.send("GET", f"/events/{e}/queue/nope"),
    ]


async def limited(c: Client, e: str, tag: str) -> list[Answer]:
    """The per-address limit (3 a minute) and the customer's hold limit (2 a minute)."""
    holds = f"/events/{e}/holds"
    return [await c.send("POST", holds, hold_body(f"{tag}-a")) for _ in range(4)]


async def tokens(c: Client, e: str, tag: str) -> list[Answer]:
    """Customer tokens: none, a bad one, another customer's body, another's hold, a good one."""
    secret = c.app.state.svc.settings.customer_token_secret
    mine = jwt.encode({"sub": f"{tag}-a", "exp": int(time.time()) + 600}, secret, "HS256")
    theirs = jwt.encode({"sub": f"{tag}-b", "exp": int(time.time()) + 600}, secret, "HS256")
    me = {"authorization": f"Bearer {mine}"}
    holds = f"/events/{e}/holds"
    customer_less = b'{"items":[{"category":"GA","quantity":1}]}'
    out = [
        await c.send("POST", holds, customer_less),
        await c.send("POST", holds, customer_less, {"authorization": "Bearer nope"}),
        await c.send("POST", holds, hold_body(f"{tag}-b"), me),
        await c.send("POST", holds, customer_less, me),
        await c.send("POST", holds, b"[1]", me),
    ]
    hold_id = json.loads(out[3][2])["hold_id"]
    other = {"authorization": f"Bearer {theirs}"}
    out += [
        await c.send("GET", f"{holds}/{hold_id}", None, other),
        await c.send("GET", f"{holds}/{hold_id}", None, me),
        await c.send("POST", f"{holds}/{hold_id}/confirm", b"{}", other),
        await c.send("DELETE", f"{holds}/{hold_id}", None, other),
        await c.send("POST", f"/events/{e}/queue", b"{}", me),
        await c.send("POST", f"{holds}/{hold_id}/confirm", b"{}", me),
    ]
    return out


ROOM = {"waiting_room": {"admit_per_minute": 1, "pass_ttl_seconds": 600}}
CASES: dict[str, tuple[Scenario, dict[str, Any], dict[str, Any]]] = {
    "sales": (sales, {}, {}),
    "room": (room, {}, ROOM),
    "no_room": (no_room, {}, {}),
    "limited": (
        limited,
        {"rate_limit_address": 3, "rate_limit_customer_holds": 2},
        {},
    ),
    "tokens": (tokens, {"customer_token_secret": secrets.token_urlsafe(32)}, {}),
}


@asynccontextmanager
async def _both(settings: Settings) -> AsyncIterator[tuple[Any, Any]]:
    async with AsyncExitStack() as stack:
        apps = (create_app(settings), create_app(settings, lean=False))
        for app in apps:
            await stack.enter_async_context(running(app))
        yield apps


@pytest.mark.parametrize("case", sorted(CASES))
async def test_lane_answers_as_litestar(settings: Settings, case: str) -> None:
    scenario, changes, event = CASES[case]
    configured = msgspec.structs.replace(settings, **changes)
    async with _both(configured) as (lean, plain):
        sides = []
        for n, app in enumerate((lean, plain)):
            tag = f"{case.replace('_', '-')}-{secrets.token_hex(3)}"
            event_id = f"lane-{tag}"
            admin = Client(app, "127.0.0.9")
            await make_event(admin, event_id, **event)
            answers = await scenario(Client(app, f"127.0.1.{n}"), event_id, tag)
            sides.append(normalized(answers, event_id, tag))
        for i, (got, want) in enumerate(zip(*sides, strict=True)):
            assert got == want, f"request {i}"


def routed(app: Any) -> list[str]:
    """What reaches Litestar's router from now on, as "METHOD path"."""
    seen: list[str] = []
    router = app.asgi_router.handle_routing

    def spy(path: str, method: str) -> Any:
        seen.append(f"{method} {path}")
        return router(path, method)

    app.asgi_router.handle_routing = spy
    return seen


async def test_lane_serves_the_hot_routes(settings: Settings) -> None:
    """Requests the lane takes never reach Litestar's router; the others do."""
    app = create_app(settings)
    async with running(app):
        seen = routed(app)
        c = Client(app, "127.0.0.8")
        event_id = f"lane-{secrets.token_hex(3)}"
        await make_event(c, event_id)
        seen.clear()
        status, _, body = await c.send("POST", f"/events/{event_id}/holds", hold_body("x"))
        assert status == 201, body
        hold_id = json.loads(body)["hold_id"]
        await c.send("GET", f"/events/{event_id}/holds/{hold_id}")
        await c.send("POST", f"/events/{event_id}/holds/{hold_id}/confirm", b"{}")
        await c.send("DELETE", f"/events/{event_id}/holds/{hold_id}")
        await c.send("GET", f"/events/{event_id}/queue/nope")
        assert seen == []
        await c.send("GET", f"/events/{event_id}")
        await c.send("POST", f"/events/{event_id}/holds", b"{", {"content-type": "text/plain"})
        assert [s.split()[0] for s in seen] == ["GET", "POST"], seen


async def test_lane_off_by_setting(settings: Settings) -> None:
    """BOXOFFICE_LEAN_LANE=false: a hold goes through Litestar's router."""
    app = create_app(msgspec.structs.replace(settings, lean_lane=False))
    async with running(app):
        seen = routed(app)
        c = Client(app, "127.0.0.8")
        event_id = f"lane-{secrets.token_hex(3)}"
        await make_event(c, event_id)
        seen.clear()
        status, _, body = await c.send("POST", f"/events/{event_id}/holds", hold_body("x"))
        assert status == 201, body
        assert seen == [f"POST /events/{event_id}/holds"]
