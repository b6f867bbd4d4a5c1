"""The OpenAPI document's parts that the routes do not say themselves: the problems each
route may answer, the Location header, and, once the app is built, what Litestar cannot be
told per route (document): the bearer schemes, the Idempotency-Key and pass headers, the
headers of answers. docs/API.md is generated from the result (service/web/apidoc.py)."""

from __future__ import annotations

from litestar import Litestar
from litestar.datastructures import ResponseHeader
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPIFormat,
    OpenAPIHeader,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.openapi.spec import Parameter as OpenAPIParameter

from service.core import errors, schemas
from service.web import answers

PROBLEM_JSON = answers.PROBLEM_JSON.decode()

# What any route may answer: no such route or method, a body too large or not JSON, a
# per-address rate limit, a bug.
_ANY_ROUTE = (
    errors.RateLimited,
    errors.NotFound,
    errors.MethodNotAllowed,
    errors.PayloadTooLarge,
    errors.UnsupportedMediaType,
    errors.BoxofficeError,
)


def problems(
    *classes: type[errors.BoxofficeError], backends: bool = True
) -> dict[int, ResponseSpec]:
    """A route's documented problems: `classes`, and what any route may answer."""
    by_status: dict[int, list[str]] = {}
    # A route that reads Redis or PostgreSQL may find one away (503); every one of them
    # takes parameters or a body that may be invalid (400).
    usual = (errors.ValidationError, errors.Unavailable) if backends else ()
    for cls in sorted((*classes, *usual, *_ANY_ROUTE), key=lambda c: c is errors.NotFound):
        by_status.setdefault(cls.status, []).append(f"`{cls.code}`")
    return {
        status: ResponseSpec(
            data_container=schemas.Problem,
            description="Problem details; code " + " or ".join(dict.fromkeys(codes)),
            media_type=PROBLEM_JSON,
            generate_examples=False,
        )
        for status, codes in sorted(by_status.items())
    }


def location(template: str) -> ResponseHeader:
    return ResponseHeader(
        name="Location", description=f"The new resource: `{template}`", documentation_only=True
    )


_IDEMPOTENCY_KEY = OpenAPIParameter(
    name="Idempotency-Key",
    param_in="header",
    required=False,
    schema=Schema(type=OpenAPIType.STRING, min_length=1, max_length=128),
    description="1-128 printable ASCII characters. A repeat with the same body within "
    "24 hours gets the first response and changes nothing; with another body, 422 "
    "`idempotency_key_reused`; while the first still runs, 409 `idempotency_in_progress`.",
)
_PASS = OpenAPIParameter(
    name="Boxoffice-Pass",
    param_in="header",
    required=False,
    schema=Schema(type=OpenAPIType.STRING),
    description="The admission pass of the event's waiting room (when it has one): "
    "`pass` of an admitted QueueTicket.",
)
_RETRY_AFTER = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER), description="Seconds to wait before trying again"
)
_RETRY_AFTER_IN_PROGRESS = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER),
    description="Seconds to wait before trying again; sent with `idempotency_in_progress`"
    " only, not with the other codes of this status",
)
_RATELIMIT_POLICY = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.STRING),
    description='The rate limits that apply (IETF draft "RateLimit header fields for HTTP"),'
    ' e.g. `"address";q=600;w=60, "tickets";q=40;w=60, "customer";q=20;w=60`: q attempts'
    " (tickets, for `tickets`) per w seconds. Policies: `address` (every request of the"
    " client address), `joins` (its joins of a waiting room), `tickets` (the tickets its"
    " holds ask for), `admin` (its admin requests), `customer` (the customer's hold"
    " attempts in the event). Sent by a rate limit, not with the Idempotency-Key budget's"
    " 429",
)
_RATELIMIT = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.STRING),
    description='What is left of each, e.g. `"customer";r=0;t=12`: r attempts left, t seconds'
    " until the quota is whole again (on a 429: until the next attempt, as Retry-After)",
)
_RATE_HEADERS = {"RateLimit-Policy": _RATELIMIT_POLICY, "RateLimit": _RATELIMIT}
_HEADERS_OF_STATUS = {
    "401": {"WWW-Authenticate": OpenAPIHeader(schema=Schema(const="Bearer"))},
    "409": {"Retry-After": _RETRY_AFTER},
    "429": {"Retry-After": _RETRY_AFTER, **_RATE_HEADERS},
    "503": {"Retry-After": _RETRY_AFTER},
}

_CUSTOMER_SCHEME = SecurityScheme(
    type="http",
    scheme="bearer",
    bearer_format="JWT",
    description="A customer token: a JWT signed HS256 with `BOXOFFICE_CUSTOMER_TOKEN_SECRET` "
    "(issued by the shop's login), `sub` the customer id, `exp` in the future. Needed only "
    "when that secret is set; then a body's `customer_id` may be left out and must otherwise "
    "be `sub` (403 `customer_mismatch`), and another customer's holds and bookings answer "
    "404. Without the secret the service trusts the body's `customer_id` (a trusted backend).",
)


def _operations(app: Litestar) -> list[tuple[str, str, Operation]]:
    found = []
    for path, item in (app.openapi_schema.paths or {}).items():
        for method in ("get", "post", "patch", "put", "delete"):
            op = getattr(item, method)
            if isinstance(op, Operation):
                found.append((path, method, op))
    return found


def document(app: Litestar) -> None:
    """What Litestar cannot be told per route: the admin's and the customers' bearer
    schemes (the routes name which they require: service/web/routes/), the Idempotency-Key
    header of every state-changing operation, the headers of answers. Run at start-up (and
    by service.web.apidoc); a second run changes nothing. The customer scheme is described
    even when no route requires it (customer tokens off), for the deployment with tokens."""
    schema = app.openapi_schema
    if schema.components and schema.components.security_schemes:
        return
    schema.components = schema.components or Components()
    schema.components.security_schemes = {
        "bearer": SecurityScheme(
            type="http", scheme="bearer", description="The admin token, `BOXOFFICE_ADMIN_TOKEN`"
        ),
        "customer": _CUSTOMER_SCHEME,
    }
    for path, method, op in _operations(app):
        if method == "post" and path.endswith("/holds"):
            op.parameters = [*(op.parameters or []), _PASS]
        if method != "get":
            op.parameters = [*(op.parameters or []), _IDEMPOTENCY_KEY]
        for status, response in (op.responses or {}).items():
            if not isinstance(response, OpenAPIResponse):
                continue
            headers = _HEADERS_OF_STATUS.get(status, {})
            # Of the 409s, only idempotency_in_progress says when to come back.
            if status == "409" and "idempotency_in_progress" not in response.description:
                headers = {}
            elif status == "409" and "` or `" in response.description:
                headers = {"Retry-After": _RETRY_AFTER_IN_PROGRESS}
            if status == "201" and path.endswith("/holds"):
                headers = _RATE_HEADERS  # the customer's hold-attempt limit, when on
            response.headers = {**(response.headers or {}), **headers} or None
            location = (response.headers or {}).get("Location")
            if isinstance(location, OpenAPIHeader):  # Litestar gives it no schema
                location.schema = Schema(
                    type=OpenAPIType.STRING, format=OpenAPIFormat.URI_REFERENCE
                )
    # "" is how CustomerHoldCreate and CustomerQueueJoin say "left out", not a value to send.
    for name in ("CustomerHoldCreate", "CustomerQueueJoin"):
        body = (schema.components.schemas or {}).get(name)
        if body is not None and body.properties:
            customer_id = body.properties["customer_id"]
            if isinstance(customer_id, Schema):
                customer_id.default = None
    # Litestar documents every `data` as required; the confirm body may be left out.
    confirm = schema.paths["/events/{event_id}/holds/{hold_id}/confirm"]  # type: ignore[index]
    if confirm.post is not None and isinstance(confirm.post.request_body, RequestBody):
        confirm.post.request_body.required = False
