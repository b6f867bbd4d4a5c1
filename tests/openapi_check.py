"""Does an answer of the lean lane's routes agree with the OpenAPI document?

Used by the `client` fixture (tests/conftest.py) of the modules marked `openapi_checked`:
each answer of a route the lane serves (service/web/lane.py) is checked against the
document's description of that route and status: the status is documented, the body is
of the documented media type and validates against its schema, a problem's `code` is one
the status lists, and every header that a client reads (Location, Retry-After, the
RateLimit fields, WWW-Authenticate) is documented for that status (Location, documented
on a 201, is there). The JSON Schema subset the document uses is checked here (the
project has no JSON Schema library; the document uses few keywords).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import httpx

from service.web import apidoc

# The routes the lean lane serves (service/web/lane.py), as the document names them.
LANE_ROUTES = {
    ("post", "/events/{event_id}/holds"),
    ("get", "/events/{event_id}/holds/{hold_id}"),
    ("delete", "/events/{event_id}/holds/{hold_id}"),
    ("post", "/events/{event_id}/holds/{hold_id}/confirm"),
    ("post", "/events/{event_id}/queue"),
    ("get", "/events/{event_id}/queue/{ticket}"),
}
_READ_HEADERS = ("location", "retry-after", "ratelimit", "ratelimit-policy", "www-authenticate")
_CODES = re.compile(r"`([a-z_]+)`")


@functools.cache
def document() -> dict[str, Any]:
    doc: dict[str, Any] = apidoc.openapi_document()
    return doc


@functools.cache
def _templates() -> list[tuple[re.Pattern[str], str, str]]:
    found = []
    for method, template in sorted(LANE_ROUTES):
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template))
        found.append((re.compile(pattern), method, template))
    return found


def route_of(method: str, path: str) -> str | None:
    for pattern, m, template in _templates():
        if m == method.lower() and pattern.fullmatch(path):
            return template
    return None


def disagreements(response: httpx.Response) -> list[str]:
    """What of this answer the document does not describe (nothing: it agrees)."""
    request = response.request
    template = route_of(request.method, request.url.path)
    if template is None:
        return []
    doc = document()
    op = doc["paths"][template][request.method.lower()]
    where = f"{request.method} {template} {response.status_code}"
    described = op["responses"].get(str(response.status_code))
    if described is None:
        return [f"{where}: status not documented"]
    found = []
    headers = described.get("headers") or {}
    documented = {name.lower() for name in headers}
    for name in _READ_HEADERS:
        if name in response.headers and name not in documented:
            found.append(f"{where}: header {name} not documented")
    if response.status_code == 201 and "location" in documented - set(response.headers):
        found.append(f"{where}: no Location")
    content = described.get("content")
    if not response.content:
        if content:
            found.append(f"{where}: no body, one documented")
        return found
    media = response.headers.get("content-type", "").partition(";")[0].strip()
    if not content or media not in content:
        return [*found, f"{where}: body of {media!r}, documented {sorted(content or ())}"]
    body = json.loads(response.content)
    found += [f"{where}: {e}" for e in errors(doc, content[media]["schema"], body, "$")]
    if media == "application/problem+json":
        codes = _CODES.findall(described.get("description", ""))
        if body.get("code") not in codes:
            found.append(f"{where}: code {body.get('code')!r} is not one of {codes}")
    return found


_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is(kind: str, value: Any) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def errors(doc: dict[str, Any], schema: dict[str, Any], value: Any, at: str) -> list[str]:
    """Where `value` breaks `schema` (the keywords the document uses)."""
    if "$ref" in schema:
        name = schema["$ref"].rpartition("/")[2]
        return errors(doc, doc["components"]["schemas"][name], value, at)
    for union in ("oneOf", "anyOf"):
        if union in schema:
            matching = [m for m in schema[union] if not errors(doc, m, value, at)]
            if not matching or (union == "oneOf" and len(matching) > 1):
                return [f"{at}: {len(matching)} of {union} match"]
    found: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(k, value) for k in kinds):
            return [f"{at}: {value!r} is not {kinds}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        found.append(f"{at}: {value!r} is not {schema['const']!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1e9):
            found.append(f"{at}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            found.append(f"{at}: {value!r} does not match {schema['pattern']}")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        found.append(f"{at}: {value} out of bounds")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1e9):
            found.append(f"{at}: {len(value)} items out of bounds")
        for i, item in enumerate(value):
            found += errors(doc, schema.get("items", {}), item, f"{at}[{i}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                found.append(f"{at}: `{name}` missing")
        for name, item in value.items():
            if name in properties:
                found += errors(doc, properties[name], item, f"{at}.{name}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{at}: `{name}` not documented")
    return found


async def check(response: httpx.Response) -> None:
    """An httpx response hook: raise when the answer and the document disagree."""
    if route_of(response.request.method, response.request.url.path) is None:
        return
    await response.aread()
    found = disagreements(response)
    assert not found, found
