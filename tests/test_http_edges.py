"""Requests at the edges of HTTP, against a real server: a body trickled or abandoned, a
method a route does not have, readiness refused."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from service.core.settings import Settings
from tests.apiserver import ApiServer
from tests.conftest import availability, create_event, eventually, missing_database_env, server_env

# Every answer of the lean lane's routes agrees with the OpenAPI document.
pytestmark = pytest.mark.openapi_checked

BODY_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def edge_api(settings: Settings) -> Iterator[ApiServer]:
    env = {**server_env(settings), "BOXOFFICE_HTTP_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT)}
    server = ApiServer(env, workers=1)
    server.start()
    yield server
    server.stop()


def hold_head(event_id: str, length: int) -> bytes:
    return (
        f"POST /events/{event_id}/holds HTTP/1.1\r\nHost: boxoffice\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def metric(client: httpx.AsyncClient, line_start: str) -> float:
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def requests_line(method: str, path: str, status: int) -> str:
    return f'boxoffice_requests_total{{method="{method}",path="{path}",status_code="{status}"}}'


async def test_a_body_trickled_slowly_is_answered_408_and_changes_nothing(
    edge_api: ApiServer,
) -> None:
    async with httpx.AsyncClient(base_url=edge_api.url) as client:
        event_id = await create_event(client)
        before = await availability(client, event_id)
        body = json.dumps({"customer_id": "slow", "items": [{"category": "GA", "quantity": 1}]})
        body = body.ljust(1000)

        def trickle() -> tuple[float, bytes]:
            with socket.create_connection(("127.0.0.1", edge_api.port), timeout=30) as sock:
                sock.sendall(hold_head(event_id, len(body)))
                started = time.monotonic()
                sock.setblocking(False)
                answer = b""
                for i in range(0, len(body), 2):  # 2 bytes every 0.25 s
                    try:
                        sock.sendall(body[i : i + 2].encode())
                    except OSError:  # closed by the server
                        break
                    time.sleep(0.25)
                    try:
                        answer += sock.recv(65536)
                    except BlockingIOError:
                        continue
                    if answer:
                        break
                sock.setblocking(True)
                answer += read_all(sock)  # to the end: the server closes the connection
                return time.monotonic() - started, answer

        took, answer = await asyncio.to_thread(trickle)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:500]
        assert b"application/problem+json" in head.lower()
        assert json.loads(payload)["code"] == "request_timeout"
        assert BODY_TIMEOUT * 0.8 < took < BODY_TIMEOUT + 3, took
        assert await availability(client, event_id) == before
        line = requests_line("POST", "/events/{event_id}/holds", 408)
        await eventually(lambda: _at_least(client, line, 1), within=10)


async def _at_least(client: httpx.AsyncClient, line: str, count: float) -> bool:
    return await metric(client, line) >= count


async def test_a_client_that_leaves_mid_body_is_not_counted_as_a_server_error(
    edge_api: ApiServer,
) -> None:
    async with httpx.AsyncClient(base_url=edge_api.url) as client:
        event_id = await create_event(client)
        before = await availability(client, event_id)
        path = "/events/{event_id}/holds"
        errors_before = await metric(client, requests_line("POST", path, 500))
        gone_before = await metric(client, requests_line("POST", path, 499))
        with socket.create_connection(("127.0.0.1", edge_api.port), timeout=5) as sock:
            sock.sendall(hold_head(event_id, 1000) + b'{"customer_id": "le')
            await asyncio.sleep(0.3)
        line = requests_line("POST", path, 499)
        await eventually(lambda: _at_least(client, line, gone_before + 1), within=10)
        assert await metric(client, requests_line("POST", path, 500)) == errors_before
        assert await metric(client, 'boxoffice_refusals_total{code="internal_error"}') == 0
        assert await availability(client, event_id) == before
    log = edge_api.log()
    assert "unhandled error" not in log and "Traceback" not in log, log[-2000:]


async def test_a_405_is_counted_under_the_route_it_matched(edge_api: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=edge_api.url) as client:
        event_id = await create_event(client)
        line = requests_line("PUT", "/events/{event_id}", 405)
        before = await metric(client, line)
        r = await client.put(f"/events/{event_id}", json={})
        assert r.status_code == 405
        await eventually(lambda: _at_least(client, line, before + 1), within=10)
        assert await metric(client, requests_line("PUT", "<unmatched>", 405)) == 0


async def test_ready_answering_503_says_when_to_try_again(settings: Settings) -> None:
    server = ApiServer(missing_database_env(settings), workers=1)
    try:
        await asyncio.to_thread(server.start)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            r = await client.get("/ready")
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["missing"] == ["postgresql"]
    finally:
        await asyncio.to_thread(server.stop)
