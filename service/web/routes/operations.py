"""The operator's routes: health, readiness, metrics; the live view of an event (behind
the admin token) and the dashboard page that shows it; the API documentation's 404."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, Router, get
from litestar.openapi import ResponseSpec
from litestar.params import FromPath
from litestar.response import ServerSentEvent
from litestar.types import ControllerRouterHandler

from service.core import errors, schemas
from service.web import dashboard, livefeed, metrics
from service.web.asking import Asked, EventIdParam, event
from service.web.openapi import problems
from service.web.routes.admin import ADMIN


def routers() -> list[ControllerRouterHandler]:
    # In the order of the OpenAPI document's paths (docs/API.md): after the admin routes.
    return [
        Router("/", tags=["operations"], route_handlers=[health, ready, metrics_route]),
        Router("/admin/events/{event_id:str}/live", route_handlers=[live_view], **ADMIN),
        dashboard_route,
    ]


@get("/health", responses=problems(backends=False))
async def health() -> schemas.Health:
    return schemas.Health(status="ok")


@get("/ready", responses={**problems(backends=False), 503: ResponseSpec(schemas.Readiness)})
async def ready(request: Asked) -> Response[schemas.Readiness]:
    state = await metrics.readiness(request.svc)
    if state.missing:
        return Response(state, status_code=503, headers=dict(errors.Unavailable.always))
    return Response(state)


@get("/metrics", media_type="text/plain; version=0.0.4", responses=problems(backends=False))
async def metrics_route(request: Asked) -> bytes:
    return await metrics.render(request.svc)


@get(
    "/",
    media_type="text/event-stream",
    responses={
        **problems(errors.Unauthorized, errors.EventNotFound),
        200: ResponseSpec(
            livefeed.LiveFigures,
            description="Server-Sent Events, one a second: each `data` is a LiveFigures"
            " document; while Redis is away, `event: problem` with a problem document instead."
            " Asked with `Accept: application/json` (and not `text/event-stream`): one"
            " LiveFigures document, now, as `application/json`",
            media_type="text/event-stream",
            generate_examples=False,
        ),
    },
)
async def live_view(request: Request[Any, Any, Any], event_id: EventIdParam) -> Response[Any]:
    """The event's figures once a second: per category capacity, available, held, sold;
    holds, confirmations, releases, expiries, cancellations and refusals (by code) per
    second; the waiting room; the write-behind backlog and lag. However many watch, each
    API process reads an event once a second."""
    feed: livefeed.Feed = request.app.state.feed
    queue, first = await livefeed.first_reading(feed, event(event_id))
    if livefeed.wants_snapshot(request.headers.get("accept", "")):
        feed.leave(event_id, queue)
        return Response(first, media_type="application/json")
    return ServerSentEvent(livefeed.stream(feed, event_id, queue, first))


@get(
    "/admin/dashboard",
    tags=["admin"],
    media_type="text/html",  # Litestar adds "; charset=utf-8" to text/*
    responses=problems(backends=False),
)
async def dashboard_route() -> Response[bytes]:
    """The operator's live page (HTML). Served to anyone: it holds no figures, and the
    admin token never reaches the server in a page request (the page reads it from the
    URL fragment, `#token=…`, or asks, and keeps it in the browser session). Every figure
    it shows comes from admin calls made with the token: without a valid one the page
    shows that it was refused, and nothing else."""
    return Response(dashboard.page(), headers=dashboard.HEADERS)


@get("/{path:str}", include_in_schema=False)
async def schema_not_found(path: FromPath[str]) -> None:
    # Litestar answers an unknown path under /schema with an HTML page of its own; this
    # handler sits in the OpenAPI router (service/web/app.py).
    raise errors.NotFound(f"no page {path!r} under /schema")
