"""Errors as problem documents: the domain's (service/core/errors.py), Litestar's own
(routing, parameters, body size), a client gone, and a crash; one shape for all."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ExceptionHandlersMap
from litestar.utils import normalize_path

from service.core import errors
from service.web import answers, bodies, metrics
from service.web.answers import Answer, DrainFirst
from service.web.asking import Scoped
from service.web.strictjson import plain

log = logging.getLogger("boxoffice.api")

# Status of a request whose client left before its body ended: nothing is sent (nginx's
# "client closed request"); /metrics counts it under this status, not as a 500.
CLIENT_GONE = 499

_HTTP_ERRORS: dict[int, type[errors.BoxofficeError]] = {
    400: errors.ValidationError,
    401: errors.Unauthorized,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
}


def problem(
    request: Scoped,
    exc: errors.BoxofficeError,
    answer: type[Answer[Any]] = Answer,
) -> Answer[Any]:
    """The problem document of `exc` (typed Any: a route answers it in place of its own)."""
    metrics.note_refusal(request.scope, exc.code)
    return answer(exc.problem(), exc.status, exc.headers, answers.PROBLEM_JSON)


def handlers(max_body_bytes: int) -> ExceptionHandlersMap:
    """The app's exception handlers; `max_body_bytes` for the words of a 413."""

    def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
        """Litestar's own errors (routing, parameters, body size) in the same problem shape."""
        cls = _HTTP_ERRORS.get(exc.status_code)
        if cls is None:
            return on_crash(request, exc)
        extra: dict[str, Any] = {}
        detail = None
        allow = (exc.headers or {}).get("allow")
        if allow:
            # Litestar joins a set: its order changed from one process to the next.
            allow = ", ".join(sorted(m.strip() for m in allow.split(",")))
        if isinstance(exc, ValidationException):
            detail, extra = _validation(exc)
        elif cls is errors.NotFound:
            detail = f"no route for {request.method} {request.url.path}"
        elif cls is errors.MethodNotAllowed:
            detail = f"{request.method} is not allowed here; allowed: {allow}"
        elif cls is errors.PayloadTooLarge:
            detail = f"the body is over the limit of {max_body_bytes} bytes"
        err = cls(detail, **extra)
        if allow:
            err.headers = {"allow": allow}
            _note_route(request, allow)
        if cls is errors.PayloadTooLarge:
            # Whatever of the body the drain leaves unread (past 1 MiB, or from a client
            # that stalls) stays in the connection: it cannot carry another request.
            err.headers = {"connection": "close"}
            return problem(request, err, DrainFirst)
        return problem(request, err)

    return {
        errors.BoxofficeError: on_domain_error,
        bodies.ClientGone: on_client_gone,
        HTTPException: on_http_error,
        HTTP_500_INTERNAL_SERVER_ERROR: on_crash,
        Exception: on_crash,
    }


def on_domain_error(request: Request[Any, Any, Any], exc: errors.BoxofficeError) -> Response[Any]:
    return problem(request, exc)


def _validation(exc: ValidationException) -> tuple[str, dict[str, Any]]:
    """Litestar's parameter errors in plain words: which parameter, what it must be;
    never its internals (`ParamType.QUERY`, the regex, the message of a parser)."""
    if not isinstance(exc.extra, list) or not exc.extra:
        return "invalid request", {}
    where: list[dict[str, str]] = []
    for e in exc.extra:
        source = str(e.get("source", "")).rpartition(".")[2].lower() or "request"
        if e.get("key") == "data":  # the handler's name for the body
            return "a JSON body is required", {}
        where.append(
            {
                "key": str(e.get("key")),
                "source": source,
                "message": plain(str(e.get("message")), ""),
            }
        )
    first = where[0]
    return f"{first['source']} parameter `{first['key']}`: {first['message']}", {"errors": where}


def _note_route(request: Request[Any, Any, Any], allow: str) -> None:
    """A 405's route exists: the router, asked again with a method it has, names its
    template for the metrics (it sets the template only for a route it runs)."""
    method = allow.split(",", 1)[0].strip()
    route = request.app.asgi_router.handle_routing(normalize_path(request.scope["path"]), method)
    request.scope["path_template"] = route[4]


def on_client_gone(request: Request[Any, Any, Any], exc: bodies.ClientGone) -> Response[Any]:
    log.info("%s %s: the client left before its body ended", request.method, request.url.path)
    return Response(None, status_code=CLIENT_GONE)


def on_crash(request: Scoped, exc: Exception) -> Response[Any]:
    # Driver errors that escaped the boundary mean Redis or PostgreSQL is unreachable.
    if errors.unavailable(exc):
        log.warning("backend unavailable: %r", exc)
        server = errors.server_of(exc) or "Redis or PostgreSQL"
        return problem(request, errors.Unavailable(f"{server} is unreachable; try again"))
    log.exception("unhandled error")
    return problem(request, errors.BoxofficeError("unexpected error; nothing was changed"))
