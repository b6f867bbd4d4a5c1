"""granian's two interfaces give the same answers: `boxoffice serve` on RSGI
(service/web/rsgi.py) and on ASGI, sent the same raw HTTP/1.1 bytes, answer byte for byte
alike (status line, every header in order but `date`, body), each on an event of its own.

The requests are the lean lane's routes and the ones it hands on to Litestar, with what
RSGI gives differently from ASGI (service/web/rsgiscope.py): repeated and non-ASCII
header values, HTTP/1.0 without Host, percent-encoded paths, query strings, chunked and
oversized bodies, `Expect: 100-continue`, a websocket handshake, a body too slow (408) and
one cut short (499 in the metrics), the per-address limit through X-Forwarded-For, the
live view's event stream. Ids the service makes, the event's own id and times are put in
place of their values first, the same way on both sides (as tests/test_lane.py does).
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from service.core.settings import Settings
from tests.apiserver import ApiServer
from tests.conftest import ADMIN_TOKEN, server_env
from tests.test_lane import normalized as lane_normalized

Answer = tuple[bytes, list[tuple[bytes, bytes]], bytes]
BODY_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def servers(settings: Settings) -> Iterator[dict[str, ApiServer]]:
    env = {
        **server_env(settings),
        "BOXOFFICE_HTTP_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
        # The per-address limit on, each side counted as the address it forwards for.
        "BOXOFFICE_RATE_LIMIT_ADDRESS": "1000",
        "BOXOFFICE_TRUSTED_PROXIES": "127.0.0.1",
    }
    started = {}
    try:
        for interface in ("rsgi", "asgi"):
            started[interface] = ApiServer(env, workers=1, interface=interface)
            started[interface].start()
        yield started
    finally:
        for server in started.values():
            server.stop()


def exchange(port: int, raw: bytes, stream: bool = False) -> Answer:
    """One request on a connection of its own; the answer read to its length (none for
    HEAD; for an event stream, its head, and whether it begins with an event)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            data += _recv(s)
        head, _, rest = data.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 100"):
            while b"\r\n\r\n" not in rest:
                rest += _recv(s)
            head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = [_header(line) for line in lines[1:]]
        length = dict(headers).get(b"content-length")
        if raw.startswith(b"HEAD "):
            pass
        elif stream:  # chunked: a chunk's size, then the event, ended by an empty line
            while b"\r\n\r\n" not in rest:
                rest += _recv(s)
            rest = b"<an event>" if re.match(rb"[0-9A-Fa-f]+\r\ndata: \{", rest) else rest
        elif length is not None:
            while len(rest) < int(length):
                rest += _recv(s)
        else:
            while chunk := _recv(s, until_closed=True):
                rest += chunk
        return lines[0], [h for h in headers if h[0] != b"date"], rest


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b": ")
    return name, value


def _recv(s: socket.socket, until_closed: bool = False) -> bytes:
    data = s.recv(65536)
    if not data and not until_closed:
        raise AssertionError("the server closed the connection before its answer ended")
    return data


def request(
    method: str,
    path: str,
    body: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
    version: bytes = b"HTTP/1.1",
) -> bytes:
    head = [b"%s %s %s" % (method.encode(), path.encode(), version)]
    if version == b"HTTP/1.1":
        head.append(b"host: test")
    if body is not None:
        head += [b"content-type: application/json", b"content-length: %d" % len(body)]
    head += [b"%s: %s" % (k.encode(), v) for k, v in headers or []]
    head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")


def chunked(method: str, path: str, body: bytes, parts: int = 3) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
    head += "transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    step = max(1, -(-len(body) // parts))
    out = head.encode()
    for i in range(0, len(body), step):
        part = body[i : i + step]
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


def hold_body(customer: str, quantity: int = 1) -> bytes:
    items = [{"category": "GA", "quantity": quantity}]
    return json.dumps({"customer_id": customer, "items": items}).encode()


ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}".encode())]


def make_event(port: int, event_id: str, **extra: Any) -> None:
    body = {
        "id": event_id,
        "name": "rsgi",
        "starts_at": "2030-01-01T00:00:00Z",
        "hold_ttl_seconds": 600,
        "max_per_order": 4,
        "categories": [{"name": "GA", "price": 2500, "currency": "EUR", "capacity": 3}],
        **extra,
    }
    status, _, answer = exchange(port, request("POST", "/admin/events", _json(body), ADMIN))
    assert status.startswith(b"HTTP/1.1 201"), answer


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def scenario(port: int, e: str, tag: str, forwarded: bytes) -> list[Answer]:
    """Every request once, in order; `forwarded`: the side's X-Forwarded-For address."""
    out: list[Answer] = []

    def send(raw: bytes, stream: bool = False) -> Answer:
        raw = raw.replace(
            b"connection: close", b"x-forwarded-for: %s\r\nconnection: close" % forwarded
        )
        out.append(exchange(port, raw, stream))
        return out[-1]

    holds = f"/events/{e}/holds"
    made = send(request("POST", holds, hold_body(f"{tag}-a"), [("idempotency-key", b"k1")]))
    send(request("POST", holds, hold_body(f"{tag}-a"), [("idempotency-key", b"k1")]))
    hold_id = json.loads(made[2])["hold_id"]
    send(request("GET", f"{holds}/{hold_id}"))
    send(request("GET", f"{holds}/{hold_id}?x=1"))
    send(request("GET", f"/events/%{ord(e[0]):02x}{e[1:]}/holds/{hold_id}"))
    send(request("HEAD", f"{holds}/{hold_id}"))
    send(chunked("POST", holds, hold_body(f"{tag}-b")))
    send(chunked("POST", holds, b" " * (64 * 1024 + 10), parts=4))
    send(request("POST", holds, b" " * (64 * 1024 + 1)))
    send(request("POST", holds, b"x", [("content-type", b"text/plain")]))
    send(request("POST", holds, b'{"customer_id":"x","items":['))
    send(request("POST", holds, b"\xff\xfe"))
    send(request("POST", holds, hold_body("x"), [("idempotency-key", "caf\xe9".encode("latin-1"))]))
    send(request("POST", holds, hold_body("x"), [("x-note", b"\xff"), ("idempotency-key", b"")]))
    send(request("POST", holds, hold_body(f"{tag}-c"), [("expect", b"100-continue")]))
    send(request("POST", holds, hold_body(f"{tag}-d")))  # sold out: 3 tickets held
    send(
        request(
            "GET",
            f"/admin/events/{e}",
            None,
            [("authorization", "Bearer caf\xe9".encode("latin-1"))],
        )
    )
    send(request("GET", "/health", version=b"HTTP/1.0"))
    send(request("GET", "/health?%00"))
    send(request("GET", "/nope"))
    send(request("PUT", holds, hold_body("x")))
    send(request("GET", f"/events/{e}"))
    send(request("GET", f"/events/{e}", None, [("accept", b"a"), ("accept", b"b")]))
    confirm = f"{holds}/{hold_id}/confirm"
    send(request("POST", confirm, b'{"payment_ref":"pi_1"}', [("idempotency-key", b"c1")]))
    send(request("POST", confirm, b'{"payment_ref":"pi_1"}', [("idempotency-key", b"c1")]))
    send(request("DELETE", f"{holds}/{hold_id}"))
    send(request("DELETE", f"{holds}/nope", b"{}"))
    queue = f"/events/{e}-room/queue"
    joined = send(request("POST", queue, _json({"customer_id": f"{tag}-q"})))
    ticket = json.loads(joined[2])["ticket"]
    send(request("GET", f"{queue}/{ticket}"))
    send(request("GET", f"{queue}/nope"))
    send(request("GET", "/schema/openapi.json"))
    live = f"/admin/events/{e}/live"
    send(request("GET", live, None, [*ADMIN, ("accept", b"application/json")]))
    send(request("GET", live, None, [*ADMIN, ("accept", b"text/event-stream")]), stream=True)
    # A websocket handshake: the service has none (refused, 403, before it).
    ws = "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13"
    upgrade = f"GET {live} HTTP/1.1\r\nhost: test\r\nupgrade: websocket\r\n{ws}\r\n"
    send(f"{upgrade}connection: Upgrade\r\n\r\n".encode())
    return out


# What differs by design between two runs, beside what the lane's comparison puts in place:
# the limits' figures (their buckets refill as time passes), the room's, the live figures.
_DRIFT = re.compile(rb'(;t=|;r=|"position":|"ahead":|"poll_after_seconds":)\d+')
_LIVE = re.compile(rb'^(data: |)\{"event_id".*$', re.M)


def normalized(answers: list[Answer], event_id: str, tag: str) -> list[Any]:
    return [
        (status, head, _LIVE.sub(b"<live>", body))
        for status, head, body in lane_normalized(answers, event_id, tag, _DRIFT)
    ]


def test_rsgi_answers_as_asgi(servers: dict[str, ApiServer]) -> None:
    sides = []
    for n, (interface, server) in enumerate(servers.items()):
        tag = f"{interface}-{secrets.token_hex(3)}"
        event_id = f"rsgi-{tag}"
        make_event(server.port, event_id)
        room = {"waiting_room": {"admit_per_minute": 1, "pass_ttl_seconds": 600}}
        make_event(server.port, f"{event_id}-room", **room)
        forwarded = b"192.0.2.%d" % (secrets.randbelow(120) + 120 * n + 1)  # a run's own
        answers = scenario(server.port, event_id, tag, forwarded)
        sides.append(normalized(answers, event_id, tag))
    for i, (got, want) in enumerate(zip(*sides, strict=True)):
        assert got == want, f"request {i}"


def _metric(server: ApiServer, line_start: str) -> float:
    _, _, body = exchange(server.port, request("GET", "/metrics"))
    for line in body.decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _settled(read: Callable[[], float], want: float, within: float = 5.0) -> float:
    deadline = time.monotonic() + within
    got = read()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.2)
        got = read()
    return got


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
def test_slow_and_broken_bodies(servers: dict[str, ApiServer], interface: str) -> None:
    """A body slower than the deadline is a 408; one cut short by the client leaving is
    counted 499 and answered to nobody."""
    server = servers[interface]
    event_id = f"rsgi-cut-{secrets.token_hex(3)}"
    make_event(server.port, event_id)
    path = f"/events/{event_id}/holds"
    series = 'boxoffice_requests_total{method="POST",path="/events/{event_id}/holds",'
    gone = series + 'status_code="499"}'
    before = _metric(server, gone)
    raw = request("POST", path, hold_body("x"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(raw[:-10])
        time.sleep(0.2)
    assert _settled(lambda: _metric(server, gone), before + 1) == before + 1
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(raw[:-10])
        started = time.monotonic()
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"code":"request_timeout"' in answer
        assert BODY_TIMEOUT - 0.1 < time.monotonic() - started < BODY_TIMEOUT + 2
