"""The app: Litestar with the routes of service/web/routes/, the door, the problem
handlers and the API documentation; its lifespan (the process's connections); and the
lean lane (service/web/lane.py) in front of it when on."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from litestar import Litestar, Router
from litestar.enums import ScopeType
from litestar.openapi import OpenAPIConfig
from litestar.types import (
    ASGIApp,
    LifeSpanReceive,
    LifeSpanScope,
    LifeSpanSend,
    Receive,
    Scope,
    Send,
)

from service.core import errors
from service.core.settings import Settings
from service.hotpath import ratelimit
from service.hotpath.context import Services
from service.web import bodies, customers, docsui, lane, livefeed, metrics, problems, started
from service.web.asking import Asked
from service.web.door import add_rate_headers, customer_door, door
from service.web.openapi import document
from service.web.routes import admin, operations, queue, sales
from service.web.strictjson import StrictJSON

log = logging.getLogger("boxoffice.api")
# Allocations (less deallocations) between two collections of the young generation.
GC_YOUNG_THRESHOLD = 20_000


class App(Litestar):
    """Litestar, with the lean lane (service/web/lane.py) in front of it when on: the lane,
    inside the metrics and the body deadlines, gets every HTTP request first, and hands
    what it does not serve to Litestar. A hot route's request then never enters Litestar
    at all (its scope set-up and before_send wrapper cost a sold-out refusal a tenth)."""

    lean: ASGIApp | None = None
    # The lane, with what sits around it on ASGI, for the RSGI side to serve it straight
    # (service/web/rsgi.py): the request metrics and the body deadlines.
    hot_lane: lane.Lane | None = None
    # Litestar inside the same metrics and body deadlines, not behind the lane: where the
    # RSGI side hands a lane request whose body Litestar must answer.
    handed: ASGIApp | None = None
    stats: metrics.HttpStats
    deadlines: bodies.Deadlines

    async def __call__(
        self,
        scope: Scope | LifeSpanScope,
        receive: Receive | LifeSpanReceive,
        send: Send | LifeSpanSend,
    ) -> None:
        if self.lean is not None and scope["type"] == ScopeType.HTTP:
            await self.lean(scope, receive, send)  # type: ignore[arg-type]
            return
        await super().__call__(scope, receive, send)


def _lifespan(
    settings: Settings, stats: metrics.HttpStats
) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """The process's connections and background tasks, for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        svc = Services.open(settings)
        app.state.svc = svc
        flusher = asyncio.get_running_loop().create_task(stats.flush_every())
        app.state.feed = livefeed.Feed(svc)
        tallier = asyncio.get_running_loop().create_task(livefeed.flush_every(svc, stats.tally))
        try:
            try:
                await svc.start()
                await svc.scripts.load()
            except Exception as e:  # /ready says so; every call loads what it misses
                if not errors.unavailable(e):
                    raise
                log.warning("Redis unreachable at start-up: %r", e)
            svc.sold_out.start(svc.scripts)
            svc.event_ids.start(svc)
            # Everything built so far lives as long as the process. Left to the collector,
            # it is traversed again by every full collection, a 50 ms pause about once a
            # second under load (the p99 of a hold); frozen, it is never traversed again.
            gc.collect()
            gc.freeze()
            # The young generation sized for the requests in flight: at the default 700,
            # the live objects of the ~32 requests a process serves at once under load set
            # off a collection every ~40 holds that frees nothing and promotes them (and a
            # full one every ~5,000): 3-5 us a hold, timed with gc.callbacks in a served
            # process. At 20,000 none ran in 50,000 holds; garbage in cycles is still found.
            gc.set_threshold(GC_YOUNG_THRESHOLD)
            # After start(): on a cluster, svc.scripts is the cluster's.
            app.state.limits = ratelimit.AddressLimits(settings, svc.scripts)
            started.mark_started()
            yield
        finally:
            flusher.cancel()
            tallier.cancel()
            await app.state.feed.close()
            await svc.close()

    return lifespan


def _openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Boxoffice",
        version="0.1.0",
        description="Ticket reservations for ticket drops: instant, atomic holds in Redis.",
        path="/schema",
        # Redoc also at /schema/redoc, where Litestar's own default puts it. Their
        # scripts and styles from the service itself, under /schema/assets/.
        render_plugins=docsui.render_plugins("/schema"),
        openapi_router=Router(
            "/schema",
            route_handlers=[operations.schema_not_found, *docsui.asset_routers()],
            include_in_schema=False,
        ),
    )


def create_app(settings: Settings, lean: bool | None = None) -> Litestar:
    """`lean`: the hot routes go the lean lane (service/web/lane.py); by default as
    settings.lean_lane says (the tests and benchmarks compare both)."""
    lean = settings.lean_lane if lean is None else lean
    stats = metrics.HttpStats()
    tokens = bool(settings.customer_token_secret)
    verifier = customers.Verifier(settings.customer_token_secret) if tokens else None
    app = App(
        route_handlers=[
            sales.router(tokens),
            queue.router(tokens),
            admin.router(),
            *operations.routers(),
        ],
        lifespan=[_lifespan(settings, stats)],
        on_startup=[document],
        before_request=door if verifier is None else customer_door(verifier),
        before_send=[add_rate_headers],
        dto=StrictJSON,
        request_class=Asked,
        request_max_body_size=settings.max_body_bytes,
        exception_handlers=problems.handlers(settings.max_body_bytes),
        openapi_config=_openapi_config(),
    )
    # Around the whole app, not as route middleware: requests that match no route (404,
    # 405) are answered before any route's middleware runs, and they count too.
    # The body guard inside it, so that a 408 is counted as one.
    app.stats = stats
    app.deadlines = bodies.Deadlines(settings.http_body_timeout_seconds)

    def around(inner: ASGIApp) -> ASGIApp:
        return metrics.middleware(stats)(bodies.guard(app.deadlines)(inner))

    if not lean:
        app.asgi_handler = around(app.asgi_handler)
        return app

    async def litestar(scope: Scope, receive: Receive, send: Send) -> None:
        await Litestar.__call__(app, scope, receive, send)

    app.hot_lane = lane.Lane(app, settings)
    app.lean = around(app.hot_lane.asgi(litestar))
    app.handed = around(litestar)
    return app


def create_app_from_env() -> Litestar:
    """Entry point for the ASGI server's workers: each builds its own app and connections."""
    return create_app(Settings.from_env())
