"""An RSGI request's ASGI scope, as granian's ASGI side builds it (granian 2.8's
src/asgi/utils.rs), for the app that service/web/rsgi.py serves on RSGI.

What RSGI gives differently, and how it is made the same:
- addresses as "host:port" text ("[::1]:8000" for IPv6): ASGI's are (host, port) with the
  port as text too;
- header names and values as text, a name once per value in the order granian's ASGI side
  lists them; a value that is not visible ASCII (obs-text, a byte >= 0x80) is left out
  by granian's RSGI side, its name kept: such a header is given the value b"\\x80", which
  every check of the service refuses as it refuses any non-ASCII value (where an answer
  quotes the value, it quotes that one);
- no Host header (HTTP/1.0): ASGI puts one first, the request's authority or empty;
- no raw path: the path (percent-decoded by both) encoded again stands in for it
  (Litestar reads `raw_path` only for mounted apps, and the service mounts none);
- the query string as text: ASGI's is bytes.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, cast

from granian.rsgi import Scope

_ASGI = {"version": "3.0", "spec_version": "2.3"}
_EXTENSIONS: dict[str, Any] = {"http.response.pathsend": {}, "websocket.http.response": {}}
# The value of a header whose own value granian's RSGI side does not show.
UNREADABLE = b"\x80"


# Addresses seen, as ASGI gives them: the server's is one, a client's repeats for as long
# as its connection lasts. Emptied when full.
_ADDRESSES: dict[str, tuple[str, str]] = {}
_ADDRESSES_KEPT = 4096


def address(text: str) -> tuple[str, str]:
    found = _ADDRESSES.get(text)
    if found is None:
        host, _, port = text.rpartition(":")
        if host.startswith("["):
            host = host[1:-1]
        if len(_ADDRESSES) >= _ADDRESSES_KEPT:
            _ADDRESSES.clear()
        found = _ADDRESSES[text] = (host, port)
    return found


def request_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The request's headers as ASGI lists them (lower-case names, bytes). The values
    granian's RSGI side shows are visible ASCII: UTF-8 encodes them as Latin-1 does."""
    given = scope.headers
    items = given.items()
    headers = [(k.encode(), v.encode()) for k, v in items]
    # len(): the names (a name once however many values it has).
    if len({k for k, _ in items}) != len(cast(Sized, given)):
        headers = _with_unreadable(given.keys(), headers)
    if "host" not in given:
        headers.insert(0, (b"host", (scope.authority or "").encode("latin-1")))
    return headers


def _with_unreadable(
    names: list[str], readable: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The headers in granian's order (each name's values together, names in the order
    they came), a name whose values were left out given UNREADABLE."""
    out = []
    for name in names:
        key = name.encode("latin-1")
        values = [pair for pair in readable if pair[0] == key]
        out += values or [(key, UNREADABLE)]
    return out


def asgi_scope(scope: Scope, state: dict[str, Any]) -> dict[str, Any]:
    """The ASGI scope of an RSGI request; `state`: the lifespan's, copied (as granian's
    ASGI side does)."""
    path = scope.path
    return {
        "asgi": _ASGI,
        "extensions": _EXTENSIONS,
        "type": "http",
        "http_version": scope.http_version,
        "server": address(scope.server),
        "client": address(scope.client),
        "scheme": scope.scheme,
        "path": path,
        "raw_path": path.encode("utf-8"),
        "query_string": scope.query_string.encode("latin-1"),
        "headers": request_headers(scope),
        "method": scope.method,
        "root_path": "",
        "state": state.copy(),
    }


def has_body_of_size(headers: list[tuple[bytes, bytes]], limit: int) -> bool:
    """Whether the body can be read whole: a declared length within `limit` (or no body
    at all), not chunked."""
    whole = True
    for name, value in headers:
        if name == b"transfer-encoding":
            return False
        if name == b"content-length":
            whole = value.isdigit() and int(value) <= limit
    return whole


def text_headers(head: Any) -> list[tuple[str, str]]:
    """An ASGI answer's headers as RSGI takes them: text (the service's are ASCII)."""
    return text_pairs(head["headers"])


def text_pairs(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
